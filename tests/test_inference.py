"""inference.py and metrics.py: BraTS metrics against hand-computed answers and an independent
implementation, NIfTI in and out on the scan's grid, release label conventions, bad input."""
import csv
import glob
import os
import shutil
import threading
import time

import keras
import nibabel as nib
import numpy as np
import pytest

import inference
import model as unet
from brainseg import folders, layouts, metrics, preprocessing, synthetic
from conftest import SMALL_IMAGE_SIZE, SMALL_SHAPE

# --- Metrics ---------------------------------------------------------------------------------


# --- Geometry and labels ----------------------------------------------------------------------


# --- NIfTI in, NIfTI out --------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoint(trained_run):
    return str(trained_run[0] / "model.keras")


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("release2023")
    synthetic.write_dataset(str(root), 2, seed=21, shape=SMALL_SHAPE, layout="brats2023")
    return root


def test_a_case_folder_is_segmented_on_its_own_grid(checkpoint, converted_dir, release, tmp_path):
    case_dir = release / "BraTS-GLI-00001-000"
    inference.main(["--input", str(case_dir), "--checkpoint", checkpoint, "--data-dir",
                    str(converted_dir), "--output-dir", str(tmp_path), "--probabilities",
                    "--min-lesion-mm3", "0", "--min-enhancing-mm3", "0"])  # no post-processing
    scan = nib.load(case_dir / "BraTS-GLI-00001-000-t2f.nii.gz")
    segmentation = nib.load(tmp_path / "BraTS-GLI-00001-000.nii.gz")
    assert segmentation.shape == scan.shape == SMALL_SHAPE
    np.testing.assert_array_equal(segmentation.affine, scan.affine)
    assert segmentation.header.get_zooms() == scan.header.get_zooms()
    labels = np.asarray(segmentation.dataobj)
    assert set(np.unique(labels)) <= {0, 1, 2, 3}  # a regions model; BraTS 2023 labels
    probabilities = nib.load(tmp_path / "BraTS-GLI-00001-000_probabilities.nii.gz").get_fdata()
    assert probabilities.shape == (*SMALL_SHAPE, 3)
    assert 0 <= probabilities.min() <= probabilities.max() <= 1
    np.testing.assert_array_equal(labels > 0, (probabilities > 0.5).any(axis=-1))  # nested
    np.testing.assert_array_equal(labels == 3, probabilities[..., 2] > 0.5)  # enhancing
    with open(tmp_path / "per_case_metrics.csv") as file:
        [row] = list(csv.DictReader(file))
    truth_labels = np.asarray(nib.load(case_dir / "BraTS-GLI-00001-000-seg.nii.gz").dataobj)
    assert float(row["whole_tumor_dice"]) == pytest.approx(
        metrics.dice(truth_labels > 0, np.asarray(segmentation.dataobj) > 0))
    # Lesion-wise scores of what was written, by the official package and as BraTS 2023
    # ranked, beside the others.
    lesions = metrics.lesion_wise(layouts.to_internal_labels(truth_labels, "brats2023"),
                                  layouts.to_internal_labels(labels, "brats2023"),
                                  scan.header.get_zooms())
    for region in ("whole_tumor", "tumor_core", "enhancing_tumor"):
        assert float(row[f"{region}_lesion_dice"]) == pytest.approx(
            lesions[region]["dice"], nan_ok=True)
    written, true = (preprocessing.targets(layouts.to_internal_labels(labels, "brats2023"),
                                           "regions") for labels in (labels, truth_labels))
    for k, region in enumerate(("whole_tumor", "tumor_core", "enhancing_tumor")):
        assert float(row[f"{region}_ranking_lesion_dice"]) == pytest.approx(
            metrics.ranking_lesion_wise(true[..., k], written[..., k],
                                        scan.header.get_zooms())["dice"])
    assert os.path.exists(tmp_path / "BraTS-GLI-00001-000_montage.png")
    assert os.path.exists(tmp_path / "dice_distribution.png")


def test_a_regions_model_writes_the_release_labels(converted_dir, release, tmp_path):
    """A three-region model that predicts enhancing tumor everywhere it looks is enough to
    check the convention: BraTS 2023 calls enhancing tumor 3, not 4."""
    net = unet.build_unet(SMALL_IMAGE_SIZE, 4, 3, base_filters=4, depth=2)
    output_layer = net.layers[-1]
    output_layer.kernel.assign(np.zeros(output_layer.kernel.shape))
    output_layer.bias.assign([3.0, 3.0, 3.0])  # probability 0.95 for every region
    net.save(tmp_path / "regions.keras")
    inference.main(["--input", str(release), "--checkpoint", str(tmp_path / "regions.keras"),
                    "--data-dir", str(converted_dir), "--output-dir", str(tmp_path / "out")])
    labels = np.asarray(nib.load(tmp_path / "out" / "BraTS-GLI-00002-000.nii.gz").dataobj)
    assert set(np.unique(labels)) == {0, 3}  # 0 on slices without brain
    with open(tmp_path / "out" / "summary_metrics.csv") as file:
        regions = {row["region"] for row in csv.DictReader(file)}
    assert regions == {"whole_tumor", "tumor_core", "enhancing_tumor"}


def test_validation_cases_are_segmented_but_not_scored(checkpoint, converted_dir, tmp_path):
    root = tmp_path / "validation"
    synthetic.write_dataset(str(root), 2, seed=4, shape=SMALL_SHAPE, with_labels=False)
    inference.main(["--input", str(root), "--checkpoint", checkpoint, "--data-dir",
                    str(converted_dir), "--output-dir", str(tmp_path / "out")])
    written = sorted(os.listdir(tmp_path / "out"))
    assert written == ["BraTS20_Training_001.nii.gz", "BraTS20_Training_002.nii.gz"]


# --- Bad input ----------------------------------------------------------------------------

def test_a_folder_run_carries_on_past_bad_cases_and_lists_them(checkpoint, converted_dir,
                                                               tmp_path, capsys):
    root = tmp_path / "raw"
    synthetic.write_dataset(str(root), 3, seed=8, shape=SMALL_SHAPE)
    missing = root / "BraTS20_Training_001" / "BraTS20_Training_001_t1.nii.gz"
    missing.unlink()
    wrong = root / "BraTS20_Training_002" / "BraTS20_Training_002_t2.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((*SMALL_SHAPE, 2), np.int16), np.eye(4)), str(wrong))
    with pytest.raises(SystemExit) as exit_info:
        inference.main(["--input", str(root), "--checkpoint", checkpoint, "--data-dir",
                        str(converted_dir), "--output-dir", str(tmp_path / "out")])
    assert exit_info.value.code == 1
    output = capsys.readouterr().out
    assert f"failed BraTS20_Training_001: {missing}: file not found" in output
    assert f"failed BraTS20_Training_002: {wrong}: expected a 3-D volume" in output
    assert os.path.exists(tmp_path / "out" / "BraTS20_Training_003.nii.gz")


def test_a_case_whose_read_hangs_fails_at_the_time_limit_and_the_others_go_on(
        checkpoint, converted_dir, tmp_path, capsys, monkeypatch):
    """A read stuck on a stalled network filesystem: at --case-timeout-seconds its case fails,
    naming its folder and the limit; the cases after it are read and segmented."""
    root = tmp_path / "raw"
    synthetic.write_dataset(str(root), 3, seed=8, shape=SMALL_SHAPE)
    stalled, read_case = threading.Event(), layouts.read_case

    def read_case_stalling_on_the_first(case, threads=1):
        if case.case_id == "BraTS20_Training_001":
            stalled.wait(600)  # until the test ends; without the limit inference waits too
        return read_case(case, threads)

    monkeypatch.setattr(layouts, "read_case", read_case_stalling_on_the_first)
    started = time.monotonic()
    try:
        with pytest.raises(SystemExit) as exit_info:
            inference.main(["--input", str(root), "--checkpoint", checkpoint, "--data-dir",
                            str(converted_dir), "--output-dir", str(tmp_path / "out"),
                            "--case-timeout-seconds", "2"])
    finally:
        stalled.set()
    assert exit_info.value.code == 1
    assert time.monotonic() - started < 120
    output = capsys.readouterr().out
    assert (f"failed BraTS20_Training_001: {root / 'BraTS20_Training_001'}: "
            "BraTS20_Training_001's files not read within 2 s (--case-timeout-seconds"
            in output)
    assert "Segmented 2 of 3 case(s)" in output
    assert not os.path.exists(tmp_path / "out" / "BraTS20_Training_001.nii.gz")
    for case_id in ("BraTS20_Training_002", "BraTS20_Training_003"):
        assert nib.load(tmp_path / "out" / f"{case_id}.nii.gz").shape == SMALL_SHAPE


def test_existing_outputs_are_kept_unless_overwrite(checkpoint, converted_dir, release, tmp_path,
                                                    capsys):
    arguments = ["--input", str(release / "BraTS-GLI-00001-000"), "--checkpoint", checkpoint,
                 "--data-dir", str(converted_dir), "--output-dir", str(tmp_path)]
    target = tmp_path / "BraTS-GLI-00001-000.nii.gz"
    target.write_bytes(b"precious")
    with pytest.raises(SystemExit):
        inference.main(arguments)
    assert "exists; pass --overwrite" in capsys.readouterr().out
    assert target.read_bytes() == b"precious"
    inference.main(arguments + ["--overwrite"])
    assert nib.load(target).shape == SMALL_SHAPE
    assert not [f for f in os.listdir(tmp_path) if ".partial" in f]


def test_a_checkpoint_for_other_slices_is_refused_naming_it(converted_dir, tmp_path):
    unet.build_unet(64, 4, 1, base_filters=4, depth=2).save(tmp_path / "big.keras")
    with pytest.raises(SystemExit) as exit_info:
        inference.main(["--data-dir", str(converted_dir), "--checkpoint",
                        str(tmp_path / "big.keras"), "--output-dir", str(tmp_path / "out")])
    expected = f"{tmp_path / 'big.keras'}: trained on 64x64 slices with 4 channels"
    assert expected in str(exit_info.value)
    unet.build_unet(SMALL_IMAGE_SIZE, 2, 1, base_filters=4, depth=2).save(tmp_path / "two.keras")
    with pytest.raises(SystemExit, match="with 2 channels, but .*imgs_test.npy has 32x32 with 4"):
        inference.main(["--data-dir", str(converted_dir), "--checkpoint",
                        str(tmp_path / "two.keras"), "--output-dir", str(tmp_path / "out")])


def test_a_file_that_is_not_a_model_is_refused_naming_it(converted_dir, tmp_path):
    (tmp_path / "model.keras").write_bytes(b"not a zip")
    with pytest.raises(SystemExit, match=f"{tmp_path / 'model.keras'}: not a loadable Keras model"):
        inference.main(["--data-dir", str(converted_dir), "--checkpoint",
                        str(tmp_path / "model.keras"), "--output-dir", str(tmp_path / "out")])


def test_the_checkpoint_says_how_to_prepare_cases_without_the_training_data(
        checkpoint, release, tmp_path, capsys):
    """On a machine without the training data folder, the exported model itself tells
    inference how its slices were made; a model that does not is used with a warning."""
    arguments = ["--input", str(release / "BraTS-GLI-00001-000"), "--data-dir",
                 str(tmp_path / "no_data_here")]
    inference.main(arguments + ["--checkpoint", checkpoint, "--output-dir", str(tmp_path / "a")])
    output = capsys.readouterr().out
    assert f"preprocessing from {checkpoint}: " in output and "WARNING" not in output
    assert os.path.exists(tmp_path / "a" / "BraTS-GLI-00001-000.nii.gz")
    plain = keras.models.load_model(checkpoint, compile=False)
    plain.save(tmp_path / "plain.keras")  # plain Keras: no description
    inference.main(arguments + ["--checkpoint", str(tmp_path / "plain.keras"), "--output-dir",
                                str(tmp_path / "b")])
    output = capsys.readouterr().out
    assert "does not say how its training data was prepared" in output
    assert "preprocessing from the flags" in output


def test_small_enhancement_is_written_as_core_when_post_processing_asks(converted_dir, release,
                                                                        tmp_path):
    net = unet.build_unet(SMALL_IMAGE_SIZE, 4, 3, base_filters=4, depth=2)
    output_layer = net.layers[-1]
    output_layer.kernel.assign(np.zeros(output_layer.kernel.shape))
    output_layer.bias.assign([3.0, 3.0, 3.0])  # every region everywhere in the brain
    net.save(tmp_path / "regions.keras")
    inference.main(["--input", str(release), "--checkpoint", str(tmp_path / "regions.keras"),
                    "--data-dir", str(converted_dir), "--output-dir", str(tmp_path / "out"),
                    "--min-enhancing-mm3", "1e9"])
    labels = np.asarray(nib.load(tmp_path / "out" / "BraTS-GLI-00002-000.nii.gz").dataobj)
    assert set(np.unique(labels)) == {0, 1}  # enhancing (3 in BraTS 2023) became core (1)
    with open(tmp_path / "out" / "per_case_metrics.csv") as file:
        rows = list(csv.DictReader(file))
    # Scored as written: no enhancing tumor predicted, so Dice 0 where the truth has some
    # (the model's own enhancing channel overlapped it) and 1 where it has none.
    dice = [float(row["enhancing_tumor_dice"]) for row in rows]
    assert set(dice) <= {0.0, 1.0} and 0.0 in dice


# --- Outputs never replace inputs ------------------------------------------------------------

@pytest.mark.parametrize("where", ["case", "inside"])
def test_an_inference_folder_inside_an_input_folder_is_refused(checkpoint, release, tmp_path,
                                                               where):
    """`--input CASE --output-dir CASE --overwrite` once replaced the case's own label map."""
    case_dir = tmp_path / "BraTS-GLI-00001-000"
    shutil.copytree(release / "BraTS-GLI-00001-000", case_dir)
    before = {name: (case_dir / name).read_bytes() for name in os.listdir(case_dir)}
    output_dir = case_dir if where == "case" else case_dir / "predictions"
    with pytest.raises(SystemExit, match=f"output folder {output_dir} overlaps the input"):
        inference.main(["--input", str(case_dir), "--checkpoint", checkpoint,
                        "--output-dir", str(output_dir), "--overwrite"])
    assert {name: (case_dir / name).read_bytes() for name in os.listdir(case_dir)} == before


def test_predictions_are_not_named_like_label_maps(checkpoint, release, tmp_path):
    """Written next to a release, a prediction must never be read back as ground truth."""
    inference.main(["--input", str(release), "--checkpoint", checkpoint,
                    "--output-dir", str(tmp_path / "out")])
    predictions = [name for name in os.listdir(tmp_path / "out") if name.endswith(".nii.gz")]
    cases = sorted(glob.glob("BraTS*", root_dir=release))
    assert predictions and all(name == f"{case}.nii.gz"
                               for name, case in zip(sorted(predictions), cases))
    for layout in [layout for layout in layouts.LAYOUTS.values() if layout.file_names]:
        label_suffix = layout.separator + layout.file_names["seg"] + ".nii"
        assert not any(label_suffix in name for name in predictions)


def test_a_busy_inference_folder_is_refused_naming_the_other_run(checkpoint, converted_dir,
                                                                   tmp_path):
    with folders.locked(tmp_path / "out"):
        with pytest.raises(SystemExit, match=f"in use by another run \\(process {os.getpid()} "):
            inference.main(["--data-dir", str(converted_dir), "--checkpoint", checkpoint,
                            "--output-dir", str(tmp_path / "out")])


def test_read_ahead_reads_the_next_case_while_one_is_segmented(monkeypatch):
    """A release folder streams: case k+1 is read while case k is segmented, in order, and a
    case that cannot be read fails alone, when its turn comes."""
    events = []

    def read_inputs(case, threads):
        assert threads == 2
        if case == "broken":
            raise layouts.CaseError("broken: unreadable")
        events.append(("read", case))
        return case

    monkeypatch.setattr(inference, "read_inputs", read_inputs)
    outcomes = []
    for case, inputs in inference.read_ahead(["a", "broken", "c", "d"], threads=2):
        try:
            outcomes.append(inputs.result(timeout=10))
        except layouts.CaseError as error:
            outcomes.append(str(error))
        time.sleep(0.2)  # segmenting: the next read completes meanwhile
        events.append(("segmented", case))
    assert outcomes == ["a", "broken: unreadable", "c", "d"]
    assert events.index(("read", "c")) < events.index(("segmented", "broken"))
    assert events.index(("read", "d")) < events.index(("segmented", "c"))
    assert list(inference.read_ahead([], threads=2)) == []


def test_far_lesions_are_removed_by_region_only_where_a_core_is_predicted():
    """FAR_LESION_MM needs the tumor core: with the three regions a far island of edema
    goes; a whole-tumor model predicts no core, so its islands stay, even one that rule 4
    (MIN_CORE_MM3 above its volume) has labelled edema."""
    import argparse
    import settings
    args = argparse.Namespace(**{name: getattr(settings, name) for name in inference.SETTINGS})
    args.FAR_LESION_MM, args.MIN_LESION_MM3, args.MIN_CORE_MM3 = 20.0, 200.0, 300.0
    labels = np.zeros((80, 30, 30), np.uint8)
    labels[30:40, 10:20, 10:20] = 2
    labels[33:37, 13:17, 13:17] = 1
    labels[74:80, 0:6, 0:6] = 2  # 216 mm^3: above MIN_LESION_MM3, 35 mm from the tumor
    written, masks = inference.segmentation(labels, (1.0, 1.0, 1.0), "regions", args)
    assert not written[74:].any() and masks[..., 0].sum() == np.count_nonzero(labels[:74])
    binary = (labels > 0).astype(np.uint8)
    written, masks = inference.segmentation(binary, (1.0, 1.0, 1.0), "whole_tumor", args)
    np.testing.assert_array_equal(written > 0, binary > 0)
    np.testing.assert_array_equal(masks[..., 0], binary > 0)
