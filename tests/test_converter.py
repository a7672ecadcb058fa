"""converter.py on small synthetic cases: arrays, normalization, patient split, manifest,
broken cases, and outputs that appear only when complete."""
import gzip
import json
import os
import shutil

import numpy as np
import pytest

import converter
import data
from conftest import NUM_CASES, SMALL_CROP_SIZE, SMALL_IMAGE_SIZE, SMALL_SHAPE, convert


def manifest(out_dir):
    with open(os.path.join(out_dir, converter.MANIFEST)) as file:
        return json.load(file)


def test_arrays_have_expected_shapes_and_dtypes(converted_dir):
    for split in ("train", "test"):
        imgs, msks = data.load_split(converted_dir, split)
        rows = sum(e["rows"][1] - e["rows"][0] for e in manifest(converted_dir)["splits"][split])
        assert imgs.shape == (rows, SMALL_IMAGE_SIZE, SMALL_IMAGE_SIZE, 4)
        assert msks.shape == (rows, SMALL_IMAGE_SIZE, SMALL_IMAGE_SIZE, 1)
        assert imgs.dtype == np.float32 and msks.dtype == np.uint8
        assert set(np.unique(msks)) <= {0, 1}
        assert np.isfinite(imgs).all()


def test_split_is_by_patient_and_covers_every_case(converted_dir):
    splits = manifest(converted_dir)["splits"]
    train = {entry["case"] for entry in splits["train"]}
    test = {entry["case"] for entry in splits["test"]}
    assert not train & test
    assert len(train | test) == NUM_CASES
    assert len(train) == round(0.85 * NUM_CASES)
    for entries in splits.values():  # rows are contiguous, in order, one block per case
        assert [e["rows"][0] for e in entries[1:]] == [e["rows"][1] for e in entries[:-1]]
        assert all(e["rows"][1] - e["rows"][0] == SMALL_SHAPE[2] for e in entries)


def test_manifest_rows_hold_that_case(converted_dir, raw_dir):
    entry = manifest(converted_dir)["splits"]["test"][0]
    image, label = converter.load_case(converter.find_cases(str(raw_dir))[entry["case"]])
    expected_imgs, expected_msks = converter.preprocess_case(
        image, label, SMALL_CROP_SIZE, SMALL_IMAGE_SIZE)
    imgs, msks = data.load_split(converted_dir, "test")
    first, end = entry["rows"]
    np.testing.assert_array_equal(imgs[first:end], expected_imgs)
    np.testing.assert_array_equal(msks[first:end], expected_msks)
    assert msks[first:end].any(), "the whole-tumor mask of a synthetic case is not empty"


def test_split_is_deterministic_for_a_seed():
    ids = [f"case{i}" for i in range(20)]
    assert converter.split_cases(ids, 0.8, 1) == converter.split_cases(list(reversed(ids)), 0.8, 1)
    assert converter.split_cases(ids, 0.8, 1) != converter.split_cases(ids, 0.8, 2)
    train, test = converter.split_cases(ids[:2], 0.99, 1)
    assert len(train) == 1 and len(test) == 1  # never an empty test split


def test_normalize_zscores_brain_voxels_and_keeps_background_zero():
    rng = np.random.default_rng(0)
    image = np.zeros((10, 10, 4, 2), np.float32)
    image[2:8, 2:8] = rng.normal([300.0, 1200.0], [40.0, 90.0], size=(6, 6, 4, 2))
    normalized = converter.normalize(image)
    brain = normalized[2:8, 2:8].reshape(-1, 2)
    np.testing.assert_allclose(brain.mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(brain.std(axis=0), 1, atol=1e-5)
    assert not normalized[:2].any() and not normalized[8:].any()


def test_to_slices_crops_centre_and_resamples():
    volume = np.zeros((60, 60, 3, 1), np.float32)
    volume[20:40, 20:40] = 1  # a centred square, half the 40-voxel crop
    slices = converter.to_slices(volume, crop_size=40, image_size=20, order=0)
    assert slices.shape == (3, 20, 20, 1)
    assert slices[0, 5:15, 5:15].all() and slices[0].sum() == 100


def break_case(case_dir, kind, how):
    path = next(os.path.join(case_dir, f) for f in os.listdir(case_dir) if f"_{kind}." in f)
    if how == "missing":
        os.remove(path)
    elif how == "truncated":
        with open(path, "rb") as file:
            head = file.read(2000)
        with open(path, "wb") as file:
            file.write(head)
    elif how == "not_gzip":
        with open(path, "wb") as file:
            file.write(b"this is not a NIfTI file")
    return path


@pytest.fixture()
def raw_copy(raw_dir, tmp_path):
    copy = tmp_path / "raw"
    shutil.copytree(raw_dir, copy)
    return copy


def test_broken_cases_are_skipped_with_the_file_named(raw_copy, tmp_path, capsys):
    cases = sorted(os.listdir(raw_copy))
    truncated = break_case(raw_copy / cases[0], "flair", "truncated")
    missing = break_case(raw_copy / cases[1], "t2", "missing")
    out_dir = tmp_path / "out"
    convert(raw_copy, out_dir)
    output = capsys.readouterr().out
    assert truncated in output and missing in output
    skipped = {entry["case"]: entry["error"] for entry in manifest(out_dir)["skipped"]}
    assert set(skipped) == {cases[0], cases[1]}
    assert missing in skipped[cases[1]] and "not found" in skipped[cases[1]]
    converted = [e["case"] for split in manifest(out_dir)["splits"].values() for e in split]
    assert sorted(converted) == cases[2:]
    imgs, _ = data.load_split(out_dir, "train")
    assert len(imgs) == sum(e["rows"][1] - e["rows"][0]
                            for e in manifest(out_dir)["splits"]["train"])
    assert not [f for f in os.listdir(out_dir) if ".partial" in f or ".trimmed" in f]


def test_a_case_that_fails_after_allocation_leaves_no_gap(raw_copy, tmp_path):
    """A corrupt body behind a valid header passes the sizing pass and fails on read: the
    arrays must be trimmed to the slices actually written."""
    case = sorted(os.listdir(raw_copy))[0]
    path = next(p for p in (raw_copy / case).iterdir() if "_t1ce." in p.name)
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:len(raw) // 2]))  # header intact, voxels cut short
    out_dir = tmp_path / "out"
    convert(raw_copy, out_dir)
    assert [e["case"] for e in manifest(out_dir)["skipped"]] == [case]
    cases = converter.find_cases(str(raw_copy))
    for split, entries in manifest(out_dir)["splits"].items():
        imgs, msks = data.load_split(out_dir, split)
        assert len(imgs) == len(msks) == entries[-1]["rows"][1]
        last = entries[-1]  # its rows sit right after the others': no gap was left
        expected_imgs, _ = converter.preprocess_case(
            *converter.load_case(cases[last["case"]]), SMALL_CROP_SIZE, SMALL_IMAGE_SIZE)
        np.testing.assert_array_equal(imgs[last["rows"][0]:last["rows"][1]], expected_imgs)


def test_nothing_converted_fails_and_writes_nothing(raw_copy, tmp_path):
    for case in os.listdir(raw_copy):
        break_case(raw_copy / case, "seg", "not_gzip")
    out_dir = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        convert(raw_copy, out_dir)
    assert "could be converted" in str(exit_info.value)
    assert os.listdir(out_dir) == []


def test_empty_root_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        convert(tmp_path, tmp_path / "out")
    assert str(tmp_path) in str(exit_info.value) and "no BraTS case" in str(exit_info.value)


def test_flags_override_settings_and_default_to_them():
    import cli
    import settings
    args = cli.parse("test", converter.SETTINGS, ["--split", "0.5", "--seed", "3"],
                     flags=converter.FLAGS)
    assert args.TRAIN_FRACTION == 0.5 and args.SPLIT_SEED == 3
    assert args.IMAGE_SIZE == settings.IMAGE_SIZE and args.RAW_DIR == settings.RAW_DIR
