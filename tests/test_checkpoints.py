"""checkpoints.py: the resumable state (weights, optimizer, progress) round-trips, is committed
atomically, bad records name the file, early stopping survives a restart, and the export for
inference loads in safe mode without the optimizer, also when trained in bfloat16."""
import dataclasses
import json
import os
import re

import keras
import numpy as np
import pytest
import tensorflow as tf

from brainseg import checkpoints
import model as unet


def compiled_unet(steps=0, dropout=0.0):
    """A tiny compiled U-Net whose optimizer made `steps` updates on random data."""
    net = unet.build_unet(image_size=16, channels=2, base_filters=2, depth=1, dropout=dropout)
    optimizer = keras.optimizers.Adam(
        keras.optimizers.schedules.CosineDecay(1e-3, decay_steps=100))
    optimizer.build(net.trainable_variables)
    net.compile(optimizer=optimizer, jit_compile=False)
    images = np.random.default_rng(0).random((4, 16, 16, 2), dtype=np.float32)
    masks = (images[..., :1] > 0.5).astype(np.float32)
    for _ in range(steps):
        with tf.GradientTape() as tape:
            loss = unet.bce_dice_loss(masks, net(images, training=True))
        optimizer.apply(tape.gradient(loss, net.trainable_variables), net.trainable_variables)
    return net


def test_state_round_trip_restores_weights_optimizer_and_progress(tmp_path):
    trained = compiled_unet(steps=3)
    progress = checkpoints.Progress(2, 10, epoch=1)
    checkpoints.save_state(trained, tmp_path, progress)
    checkpoints.save_state(trained, tmp_path, dataclasses.replace(progress, epoch=2))
    assert sorted(os.listdir(tmp_path)) == ["training_state.json",
                                            "training_state_epoch0002.keras"]

    state = checkpoints.load_state(tmp_path)
    assert state.progress.epoch == 2 and state.progress.num_workers == 2
    fresh = compiled_unet(steps=0)
    assert checkpoints.weights_fingerprint(fresh) != checkpoints.weights_fingerprint(trained)
    checkpoints.restore_state(fresh, state)
    assert checkpoints.weights_fingerprint(fresh) == checkpoints.weights_fingerprint(trained)
    assert int(fresh.optimizer.iterations) == 3  # the learning-rate schedule position
    for restored, saved in zip(fresh.optimizer.variables, trained.optimizer.variables):
        np.testing.assert_array_equal(np.asarray(restored), np.asarray(saved))


def test_the_state_restores_where_dropout_draws_next(tmp_path):
    """Keras saves no random-number state in a .keras file: the record carries them, so a
    resumed run draws the dropout masks the uninterrupted run would have drawn."""
    trained = compiled_unet(steps=3, dropout=0.5)
    checkpoints.save_state(trained, tmp_path, checkpoints.Progress(2, 10, epoch=1))
    fresh = compiled_unet(steps=0, dropout=0.5)
    [trained_state], [fresh_state] = map(checkpoints.random_states, (trained, fresh))
    assert not np.array_equal(np.asarray(trained_state), np.asarray(fresh_state))  # 3 draws
    checkpoints.restore_state(fresh, checkpoints.load_state(tmp_path))
    np.testing.assert_array_equal(np.asarray(fresh_state), np.asarray(trained_state))
    images = np.random.default_rng(1).random((2, 16, 16, 2), dtype=np.float32)
    np.testing.assert_array_equal(fresh(images, training=True), trained(images, training=True))

    without_dropout = compiled_unet(steps=0)
    with pytest.raises(ValueError, match="1 random-number states recorded, the model has 0"):
        checkpoints.restore_state(without_dropout, checkpoints.load_state(tmp_path))


def test_no_state_means_a_fresh_run_and_bad_records_name_the_file(tmp_path):
    assert checkpoints.load_state(tmp_path) is None
    record = tmp_path / checkpoints.STATE_RECORD
    record.write_text("{not json")
    with pytest.raises(ValueError, match="training_state.json: not a valid"):
        checkpoints.load_state(tmp_path)
    record.write_text(json.dumps({"epoch": 4, "state_file": "training_state_epoch0004.keras"}))
    with pytest.raises(FileNotFoundError, match="training_state_epoch0004.keras"):
        checkpoints.load_state(tmp_path)


def test_a_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    net = compiled_unet(steps=1)
    checkpoints.save_state(net, tmp_path, checkpoints.Progress(1, 5, epoch=1))
    before = {name: (tmp_path / name).read_bytes() for name in os.listdir(tmp_path)}

    def crash(path):
        with open(path, "wb") as file:
            file.write(b"half a zip")
        raise OSError("disk full")
    monkeypatch.setattr(net, "save", crash)
    with pytest.raises(OSError):
        checkpoints.save_state(net, tmp_path, checkpoints.Progress(1, 5, epoch=2))
    for name, content in before.items():
        assert (tmp_path / name).read_bytes() == content
    assert checkpoints.load_state(tmp_path).progress.epoch == 1


def test_restoring_into_a_different_model_names_the_file(tmp_path):
    checkpoints.save_state(compiled_unet(), tmp_path, checkpoints.Progress(1, 5))
    other = unet.build_unet(image_size=16, channels=2, base_filters=4, depth=1)
    with pytest.raises(ValueError, match="training_state_epoch0000.keras: cannot restore"):
        checkpoints.restore_state(other, checkpoints.load_state(tmp_path))


def test_a_state_saved_before_a_layer_changed_class_is_refused_saying_why(tmp_path,
                                                                          monkeypatch):
    """Training states written before the up-sampling layers became
    model.TransposedConvolution hold them as Keras' Conv2DTranspose, whose weights Keras
    files under another name: restoring says that the model code may differ, and how to go
    on, rather than half-loading."""
    with monkeypatch.context() as patch:
        patch.setattr(unet, "TransposedConvolution", keras.layers.Conv2DTranspose)
        checkpoints.save_state(compiled_unet(), tmp_path, checkpoints.Progress(1, 5))
    with pytest.raises(ValueError, match="another version of model.py.*new --train-dir"):
        checkpoints.restore_state(compiled_unet(), checkpoints.load_state(tmp_path))


def test_restored_weights_that_differ_from_the_recorded_ones_are_refused(tmp_path):
    """Keras may skip parts of a weights file with only a warning; the recorded fingerprint
    catches a restore that left some layers freshly initialized."""
    checkpoints.save_state(compiled_unet(steps=1), tmp_path, checkpoints.Progress(1, 5))
    state = dataclasses.replace(checkpoints.load_state(tmp_path), weights_fingerprint="0" * 16)
    with pytest.raises(ValueError, match="training_state_epoch0000.keras: restored weights"):
        checkpoints.restore_state(compiled_unet(), state)


def test_early_stopping_counts_epochs_without_a_better_dice():
    progress = checkpoints.Progress(1, 5)
    improvements = [progress.record_epoch(epoch, dice, patience=2)
                    for epoch, dice in enumerate([0.5, 0.7, 0.6, 0.7])]
    assert improvements == [True, True, False, False]
    assert progress.best_epoch == 2 and progress.best_val_dice == 0.7
    assert progress.stopped_early and progress.epoch == 4 and progress.finished(epochs=10)
    never = checkpoints.Progress(1, 5)
    for epoch in range(10):
        never.record_epoch(epoch, 0.1, patience=0)
    assert not never.stopped_early and not never.finished(epochs=11) and never.finished(10)


def test_bfloat16_export_loads_for_inference_and_predicts_like_the_trained_model(tmp_path):
    keras.mixed_precision.set_dtype_policy("mixed_bfloat16")
    try:
        trained = compiled_unet(steps=2)
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    path = tmp_path / "model.keras"
    checkpoints.export_for_inference(trained, str(path))
    assert os.listdir(tmp_path) == ["model.keras"]  # the temporary file was renamed
    loaded = keras.models.load_model(path, compile=False, safe_mode=True)
    assert getattr(loaded, "optimizer", None) is None
    assert loaded.get_layer("down0_conv1").dtype_policy.name == "mixed_bfloat16"
    images = np.random.default_rng(1).random((3, 16, 16, 2), dtype=np.float32)
    predicted = np.asarray(loaded(images))
    assert predicted.dtype == np.float32
    np.testing.assert_allclose(predicted, np.asarray(trained(images)), atol=1e-6)
    assert checkpoints.weights_fingerprint(loaded) == checkpoints.weights_fingerprint(trained)


def test_the_export_describes_how_its_input_was_prepared(tmp_path):
    description = {"preprocessing": {"image_size": 16, "crop_size": 48, "crop_mode": "center",
                                     "slice_policy": "all", "label_mode": "whole_tumor",
                                     "image_dtype": "float16"},
                   "modalities": ["flair", "t1", "t1ce", "t2"], "regions": ["whole_tumor"]}
    trained = compiled_unet(steps=1)
    checkpoints.export_for_inference(trained, str(tmp_path / "model.keras"), description)
    assert checkpoints.read_description(str(tmp_path / "model.keras")) == description
    loaded = keras.models.load_model(tmp_path / "model.keras", compile=False, safe_mode=True)
    assert checkpoints.weights_fingerprint(loaded) == checkpoints.weights_fingerprint(trained)
    checkpoints.export_for_inference(trained, str(tmp_path / "plain.keras"))
    assert checkpoints.read_description(str(tmp_path / "plain.keras")) is None
    assert checkpoints.describe(None) is None


@pytest.mark.parametrize("relative", [True, False])
def test_a_record_naming_a_file_outside_its_folder_is_refused(tmp_path, relative):
    """The record is JSON anyone could edit: its state_file must stay in the training
    folder (a '..' component or an absolute path is refused, even if the file exists)."""
    train_dir = tmp_path / "train"
    train_dir.mkdir()
    outside = tmp_path / "outside.keras"
    outside.write_bytes(b"not yours")
    name = "../outside.keras" if relative else str(outside)
    record = dict(dataclasses.asdict(checkpoints.Progress(2, 10, epoch=4)), state_file=name)
    (train_dir / checkpoints.STATE_RECORD).write_text(json.dumps(record))
    with pytest.raises(ValueError, match=re.escape(f"training_state.json: state_file '{name}'")):
        checkpoints.load_state(train_dir)
