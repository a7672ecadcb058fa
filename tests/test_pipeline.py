"""The real thing, end to end: run_multinode.sh launches 2 Horovod processes with mpirun,
they train a tiny U-Net on converted synthetic NIfTI cases, and inference.py segments the
test split with the saved checkpoint."""
import csv
import json
import os
import re
import sys

import pytest

import converter
import settings
from brainseg import folders
from conftest import (REPO_DIR, TINY_MODEL, TRAINED_RUN_FLAGS, case_names, convert, file_of, run,
                      weights_fingerprints)


def test_two_workers_train_and_the_loss_goes_down(trained_run):
    output_dir, stdout = trained_run
    assert "Horovod: 2 workers" in stdout
    with open(os.path.join(output_dir, "training_log.csv")) as file:
        epochs = list(csv.DictReader(file))
    assert len(epochs) == 4
    losses = [float(epoch["loss"]) for epoch in epochs]
    assert losses[-1] < losses[0], losses
    assert os.path.exists(os.path.join(output_dir, "model.keras"))
    assert not [f for f in os.listdir(output_dir) if ".partial" in f]


def test_both_workers_end_with_identical_weights(trained_run):
    _, stdout = trained_run
    fingerprints = weights_fingerprints(stdout)
    assert set(fingerprints) == {"0", "1"}, stdout
    assert fingerprints["0"] == fingerprints["1"]


def test_with_batch_normalization_both_workers_still_end_identical(converted_dir, tmp_path):
    """Batch normalization's moving statistics are not trained: without averaging them
    across ranks every epoch, each rank kept its own and the final weights differed."""
    result = run([os.path.join(REPO_DIR, "run_multinode.sh"), "--",
                  "--data-dir", str(converted_dir), "--train-dir", str(tmp_path / "bn"),
                  "--epochs", "1", "--use-batch-norm", "true", *TINY_MODEL], timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    fingerprints = weights_fingerprints(result.stdout)
    assert set(fingerprints) == {"0", "1"} and fingerprints["0"] == fingerprints["1"]


def test_sampling_and_augmentation_flags_train_through_the_launcher(converted_dir, tmp_path):
    """The sampling, augmentation and loss flags reach both ranks: rank 0 reports the tumor
    slices of its shard, and the two ranks still end with the same weights."""
    result = run([os.path.join(REPO_DIR, "run_multinode.sh"), "--",
                  "--data-dir", str(converted_dir), "--train-dir", str(tmp_path / "augmented"),
                  "--epochs", "1", "--tumor-sample-share", "0.5", "--scale-augmentation",
                  "0.2", "--rotation-augmentation-degrees", "30", "--gamma-augmentation", "0.5",
                  "--modality-dropout", "0.5", "--bias-field-augmentation", "0.2",
                  "--dice-false-negative-weight", "0.7", *TINY_MODEL], timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    reported = re.search(r"Tumor-slice oversampling: 50% of the samples drawn from the "
                         r"(\d+) of (\d+) slices with tumor", result.stdout)
    assert reported and 0 < int(reported[1]) < int(reported[2]), result.stdout
    assert re.search(r"SCALE_AUGMENTATION += 0.2$", result.stdout, re.MULTILINE)
    assert re.search(r"GAMMA_AUGMENTATION += 0.5$", result.stdout, re.MULTILINE)
    assert re.search(r"MODALITY_DROPOUT += 0.5$", result.stdout, re.MULTILINE)
    assert re.search(r"BIAS_FIELD_AUGMENTATION += 0.2$", result.stdout, re.MULTILINE)
    assert re.search(r"DICE_FALSE_NEGATIVE_WEIGHT += 0.7$", result.stdout, re.MULTILINE)
    fingerprints = weights_fingerprints(result.stdout)
    assert set(fingerprints) == {"0", "1"} and fingerprints["0"] == fingerprints["1"]


def test_with_a_weight_average_the_export_differs_from_the_state(converted_dir, tmp_path):
    """With WEIGHT_AVERAGE_MOMENTUM the export holds the moving average of the weights (see
    test_training.py for its values), while the resumable state keeps the weights
    themselves, from which training continues; the batch statistics are the same in both,
    and both ranks still end identical."""
    import keras
    import numpy as np
    import model  # noqa: F401 (registers the custom layers load_model reads)
    train_dir = tmp_path / "averaged"
    result = run([os.path.join(REPO_DIR, "run_multinode.sh"), "--",
                  "--data-dir", str(converted_dir), "--train-dir", str(train_dir),
                  "--epochs", "1", "--steps-per-epoch", "10", "--use-batch-norm", "true",
                  "--weight-average-momentum", "0.9", *TINY_MODEL], timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"WEIGHT_AVERAGE_MOMENTUM += 0.9$", result.stdout, re.MULTILINE)
    fingerprints = weights_fingerprints(result.stdout)
    assert set(fingerprints) == {"0", "1"} and fingerprints["0"] == fingerprints["1"]
    exported, state = (keras.saving.load_model(train_dir / name, compile=False)
                       for name in ("model.keras", "training_state_epoch0001.keras"))
    assert all(not np.array_equal(export.numpy(), weights.numpy()) for export, weights
               in zip(exported.trainable_variables, state.trainable_variables))
    for export, saved in zip(exported.non_trainable_variables, state.non_trainable_variables):
        np.testing.assert_array_equal(export.numpy(), saved.numpy())


def test_rerunning_a_finished_run_returns_without_building_a_model(trained_run,
                                                                  converted_dir):
    """The same command again: both ranks read the finished state, say so and stop before
    the data pipeline or a model exists, and nothing in the output folder changes."""
    output_dir, _ = trained_run
    before = {name: os.path.getmtime(os.path.join(output_dir, name))
              for name in os.listdir(output_dir)}
    result = run([os.path.join(REPO_DIR, "run_multinode.sh"), "--",
                  "--data-dir", str(converted_dir), "--train-dir", str(output_dir),
                  *TRAINED_RUN_FLAGS], timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{output_dir} holds a finished run (epoch 4); nothing to train" in result.stdout
    assert "weights fingerprint" not in result.stdout  # no model was built or restored
    assert "steps per epoch" in result.stdout  # the only data read: the arrays' headers
    assert before == {name: os.path.getmtime(os.path.join(output_dir, name))
                      for name in os.listdir(output_dir)}


def test_inference_on_the_saved_checkpoint_prints_a_dice(trained_run, converted_dir, tmp_path):
    output_dir, _ = trained_run
    result = run([sys.executable, "inference.py", "--data-dir", str(converted_dir),
                  "--checkpoint", os.path.join(output_dir, "model.keras"),
                  "--output-dir", str(tmp_path)], timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    printed = re.search(r"Whole-tumor Dice: ([0-9.]+) mean over (\d+) test cases", result.stdout)
    assert printed, result.stdout
    with open(tmp_path / "metrics.json") as file:
        metrics = json.load(file)
    assert float(printed.group(1)) == pytest.approx(metrics["whole_tumor_dice_mean_over_cases"],
                                                    abs=1e-4)
    assert 0 <= metrics["whole_tumor_dice_all_slices"] <= 1
    assert metrics["slices_per_second"] > 0
    with open(tmp_path / "per_case_metrics.csv") as file:
        assert len(list(csv.DictReader(file))) == int(printed.group(2)) == metrics["num_cases"]
    assert [f for f in os.listdir(tmp_path) if f.endswith(".png")]


def test_a_failing_worker_takes_the_job_down_with_a_clear_message(tmp_path):
    result = run([os.path.join(REPO_DIR, "run_multinode.sh"), "--",
                  "--data-dir", str(tmp_path / "missing"), "--output-dir", str(tmp_path)],
                 timeout=120)
    assert result.returncode != 0
    assert f"{tmp_path / 'missing'}/imgs_train.npy: not found" in result.stdout + result.stderr


def test_a_dataset_without_training_slices_is_a_clear_error(raw_copy, tmp_path):
    """Every training case unreadable: the converter skips them and writes an empty training
    split; training stops naming the file, not with a traceback (the log's passes over the
    training slices divide by their number)."""
    release = raw_copy
    cases = case_names(release)
    train_ids, _ = converter.split_cases(cases, settings.TRAIN_FRACTION, settings.SPLIT_SEED)
    for case in train_ids:
        with open(file_of(release / case, "flair"), "r+b") as file:
            file.truncate(100)  # not even a whole header
    convert(release, tmp_path / "converted")
    result = run([os.path.join(REPO_DIR, "run_multinode.sh"), "--",
                  "--data-dir", str(tmp_path / "converted"), "--train-dir",
                  str(tmp_path / "train"), *TINY_MODEL], timeout=300)
    assert result.returncode != 0
    assert f"{tmp_path / 'converted'}/imgs_train.npy: no training slices (the converter " \
           f"skipped every training case" in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_a_second_training_into_a_busy_folder_is_refused_naming_the_first(converted_dir,
                                                                           tmp_path):
    """Two runs writing one TRAIN_DIR would interleave their checkpoints: while another run
    (here this test process) holds the folder, both ranks stop before training."""
    train_dir = tmp_path / "train"
    with folders.locked(train_dir):
        result = run([os.path.join(REPO_DIR, "run_multinode.sh"), "--",
                      "--data-dir", str(converted_dir), "--train-dir", str(train_dir),
                      "--epochs", "1", *TINY_MODEL], timeout=300)
    assert result.returncode != 0
    assert f"{train_dir}: in use by another run (process {os.getpid()} on " in result.stderr
    assert not os.path.exists(train_dir) or not os.listdir(train_dir)


def test_inference_without_a_checkpoint_names_the_file(converted_dir, tmp_path):
    result = run([sys.executable, "inference.py", "--data-dir", str(converted_dir),
                  "--checkpoint", str(tmp_path / "absent.keras")], timeout=120)
    assert result.returncode != 0
    assert f"{tmp_path / 'absent.keras'}: checkpoint not found" in result.stderr
