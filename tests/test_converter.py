"""converter.py on small synthetic cases: arrays, normalization, patient split, manifest,
every release layout, the conversion options, bad input, parallel = serial, interruption."""
import gzip
import os
import shutil

import nibabel as nib
import numpy as np
import pytest

import converter
from brainseg import dataset, layouts, preprocessing, synthetic
from conftest import (NUM_CASES, SMALL_CROP_SIZE, SMALL_IMAGE_SIZE, SMALL_SHAPE, case_names,
                      convert, file_of, read_arrays)

SMALL_OPTIONS = preprocessing.Preprocessing(SMALL_IMAGE_SIZE, SMALL_CROP_SIZE)


def manifest(out_dir):
    return dataset.load_manifest(out_dir)



# --- The default conversion --------------------------------------------------------------

def test_arrays_have_expected_shapes_and_dtypes(converted_dir):
    for split in ("train", "test"):
        imgs, msks = dataset.open_split(converted_dir, split)
        entries = manifest(converted_dir)["splits"][split]
        assert len(imgs) == sum(len(entry["slices"]) for entry in entries)
        assert imgs.shape[1:] == (SMALL_IMAGE_SIZE, SMALL_IMAGE_SIZE, 4)
        # the default label mode, "regions": whole tumor, tumor core, enhancing tumor
        assert msks.shape[1:] == (SMALL_IMAGE_SIZE, SMALL_IMAGE_SIZE, 3)
        assert imgs.dtype == np.float16 and msks.dtype == np.uint8
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
        assert entries[0]["rows"][0] == 0
        assert [e["rows"][0] for e in entries[1:]] == [e["rows"][1] for e in entries[:-1]]
        assert all(e["rows"][1] - e["rows"][0] == len(e["slices"]) for e in entries)


def test_manifest_rows_hold_that_case(converted_dir, raw_dir):
    entry = manifest(converted_dir)["splits"]["test"][0]
    _, cases = layouts.find_cases(str(raw_dir))
    case = next(case for case in cases if case.case_id == entry["case"])
    expected_imgs, expected_msks, geometry = preprocessing.preprocess_case(
        *layouts.read_case(case), SMALL_OPTIONS)
    imgs, msks = dataset.open_split(converted_dir, "test")
    first, end = entry["rows"]
    np.testing.assert_array_equal(imgs[first:end], expected_imgs)
    np.testing.assert_array_equal(msks[first:end], expected_msks)
    assert msks[first:end].any(), "the whole-tumor mask of a synthetic case is not empty"
    assert entry["slices"] == geometry["slices"] and entry["shape"] == list(SMALL_SHAPE)


def test_manifest_records_layout_labels_and_preprocessing(converted_dir):
    content = manifest(converted_dir)
    assert content["layout"] == "brats2020"
    assert content["label_map"] == {"0": 0, "1": 1, "2": 2, "4": 4}
    assert content["preprocessing"]["image_size"] == SMALL_IMAGE_SIZE
    assert content["targets"] == ["whole_tumor", "tumor_core", "enhancing_tumor"]
    assert content["skipped"] == []


def test_split_is_deterministic_for_a_seed():
    ids = [f"case{i}" for i in range(20)]
    assert converter.split_cases(ids, 0.8, 1) == converter.split_cases(list(reversed(ids)), 0.8, 1)
    assert converter.split_cases(ids, 0.8, 1) != converter.split_cases(ids, 0.8, 2)
    train, test = converter.split_cases(ids[:2], 0.99, 1)
    assert len(train) == 1 and len(test) == 1  # never an empty test split


# --- Preprocessing --------------------------------------------------------------------------


def test_options_change_the_arrays(raw_dir, tmp_path):
    convert(raw_dir, tmp_path / "options", "--label-mode", "regions", "--slice-policy", "all",
            "--crop-mode", "brain_box", "--image-dtype", "float32")
    imgs, msks = dataset.open_split(tmp_path / "options", "train")
    entries = manifest(tmp_path / "options")["splits"]["train"]
    assert imgs.dtype == np.float32 and msks.shape[-1] == 3
    assert len(imgs) == len(entries) * SMALL_SHAPE[2]  # every slice
    whole_tumor, core, enhancing = (msks[..., k].astype(bool) for k in range(3))
    assert not (core & ~whole_tumor).any() and not (enhancing & ~core).any()
    assert enhancing.any()
    top, left, side = entries[0]["crop_box"]
    assert side < min(SMALL_SHAPE[:2])  # the brain box is smaller than the grid


def test_bad_option_is_a_clear_error(raw_dir, tmp_path):
    with pytest.raises(SystemExit, match="'sagittal' is not one of"):
        convert(raw_dir, tmp_path / "out", "--slice-policy", "sagittal")


# --- Layouts -------------------------------------------------------------------------------

def write_release(root, layout, num_cases=3, **kwargs):
    synthetic.write_dataset(str(root), num_cases, seed=11, shape=SMALL_SHAPE,
                                  layout=layout, **kwargs)
    return root


@pytest.fixture(scope="module")
def reference_release(tmp_path_factory):
    """The brats2020 conversion of the cases every layout test writes."""
    root = write_release(tmp_path_factory.mktemp("brats2020"), "brats2020")
    out_dir = tmp_path_factory.mktemp("reference")
    convert(root, out_dir, "--label-mode", "regions")
    return read_arrays(out_dir)


@pytest.mark.parametrize("layout", ["brats2017", "brats2023", "msd"])
def test_every_layout_converts_to_the_same_arrays(layout, reference_release, tmp_path):
    """Same synthetic cases written in another release's names and label convention: after
    detection and label mapping the arrays are identical (three regions: labels matter)."""
    root = write_release(tmp_path / layout, layout)
    convert(root, tmp_path / "out", "--label-mode", "regions")
    content = manifest(tmp_path / "out")
    assert content["layout"] == layout
    assert content["label_map"] == {str(k): v for k, v in layouts.LAYOUTS[layout].label_map.items()}
    assert read_arrays(tmp_path / "out") == reference_release


def test_uncompressed_nii_and_the_brats2020_case_355_label_name(reference_release, tmp_path):
    root = write_release(tmp_path / "raw", "brats2020")
    folder = root / synthetic.case_id(1)
    for path in folder.iterdir():  # every file of case 1 as plain .nii
        plain = folder / path.name.replace(".nii.gz", ".nii")
        plain.write_bytes(gzip.decompress(path.read_bytes()))
        path.unlink()
    os.rename(folder / f"{synthetic.case_id(1)}_seg.nii", folder / "W39_1998.09.19_Segm.nii")
    convert(root, tmp_path / "out", "--label-mode", "regions")
    assert manifest(tmp_path / "out")["skipped"] == []
    assert read_arrays(tmp_path / "out") == reference_release


def test_a_release_without_labels_converts_images_only(tmp_path):
    root = write_release(tmp_path / "validation", "brats2023", with_labels=False)
    convert(root, tmp_path / "out")
    content = manifest(tmp_path / "out")
    assert content["has_masks"] is False and content["splits"]["train"] == []
    assert len(content["splits"]["test"]) == 3
    assert sorted(os.listdir(tmp_path / "out")) == ["imgs_test.npy", "imgs_train.npy",
                                                    "manifest.json"]


def test_a_folder_of_no_known_layout_says_what_was_expected(tmp_path):
    (tmp_path / "raw" / "scans").mkdir(parents=True)
    (tmp_path / "raw" / "notes.txt").write_text("x")
    with pytest.raises(SystemExit) as exit_info:
        convert(tmp_path / "raw", tmp_path / "out")
    message = str(exit_info.value)
    assert "no BraTS layout recognized" in message and "brats2023" in message
    assert "Found: notes.txt, scans" in message


def test_empty_root_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no BraTS layout recognized"):
        convert(tmp_path, tmp_path / "out")


# --- Bad input -----------------------------------------------------------------------------

def save(path, array):
    """Replaces a case's file with `array` on the file's own grid (its affine kept)."""
    nib.save(nib.Nifti1Image(array, nib.load(path).affine), str(path))




def truncate(folder):
    path = file_of(folder, "flair")
    path.write_bytes(path.read_bytes()[:2000])
    return path, "unreadable NIfTI"


def corrupt_body(folder):
    """A valid header before a cut-short body: passes the sizing pass, fails on reading."""
    path = file_of(folder, "t1ce")
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:len(raw) // 2]))
    return path, "unreadable NIfTI"


def remove_modality(folder):
    path = file_of(folder, "t2")
    path.unlink()
    return path, "file not found"


def remove_label(folder):
    path = file_of(folder, "seg")
    path.unlink()
    return folder, "label map missing"


def mismatch_shape(folder):
    path = file_of(folder, "t1")
    save(path, np.ones((40, 48, 24), np.int16))
    return path, "differs from"


def nan_voxels(folder):
    path = file_of(folder, "flair")
    volume = np.asarray(nib.load(path).dataobj, np.float32)
    volume[10, 10, 10] = np.nan
    save(path, volume)
    return path, "NaN or infinite"


def unknown_label(folder):
    path = file_of(folder, "seg")
    labels = np.asarray(nib.load(path).dataobj).astype(np.uint8)
    labels[0, 0, 0] = 7
    save(path, labels)
    return path, "label values [7] outside"


def four_dimensional(folder):
    path = file_of(folder, "t2")
    save(path, np.ones((*SMALL_SHAPE, 2), np.int16))
    return path, "expected a 3-D volume"



@pytest.mark.parametrize("damage", [truncate, corrupt_body, remove_modality, remove_label,
                                    mismatch_shape, nan_voxels, unknown_label, four_dimensional])
def test_a_bad_case_is_skipped_with_the_file_and_problem_named(raw_copy, tmp_path, capsys,
                                                               damage):
    cases = case_names(raw_copy)
    named_path, problem = damage(raw_copy / cases[0])
    convert(raw_copy, tmp_path / "out")
    output = capsys.readouterr().out
    skipped = {entry["case"]: entry["error"] for entry in manifest(tmp_path / "out")["skipped"]}
    assert list(skipped) == [cases[0]]
    assert str(named_path) in skipped[cases[0]] and problem in skipped[cases[0]]
    assert f"skipped {cases[0]}: {skipped[cases[0]]}" in output
    splits = manifest(tmp_path / "out")["splits"]
    converted = [entry["case"] for entries in splits.values() for entry in entries]
    assert sorted(converted) == cases[1:]
    for split, entries in splits.items():
        imgs, msks = dataset.open_split(tmp_path / "out", split)  # no gap left by the bad case
        assert len(imgs) == len(msks) == entries[-1]["rows"][1]
    assert not [f for f in os.listdir(tmp_path / "out") if ".partial" in f]


def test_a_3d_file_where_the_decathlon_expects_4d(tmp_path):
    root = write_release(tmp_path / "msd", "msd")
    path = root / "imagesTr" / "BRATS_002.nii.gz"
    save(path, np.ones(SMALL_SHAPE, np.int16))
    convert(root, tmp_path / "out")
    [skipped] = manifest(tmp_path / "out")["skipped"]
    assert str(path) in skipped["error"] and "expected a 4-D volume" in skipped["error"]


def test_two_cases_with_the_same_id_are_both_skipped(tmp_path):
    root = write_release(tmp_path / "raw", "brats2017", num_cases=4)
    shutil.copytree(root / "HGG" / "Brats17_001_1", root / "LGG" / "Brats17_001_1")
    convert(root, tmp_path / "out")
    skipped = manifest(tmp_path / "out")["skipped"]
    assert [entry["case"] for entry in skipped] == ["Brats17_001_1", "Brats17_001_1"]
    assert "appears 2 times" in skipped[0]["error"] and "HGG" in skipped[0]["error"]


def test_nothing_converted_fails_and_writes_nothing(raw_copy, tmp_path):
    for case in case_names(raw_copy):
        file_of(raw_copy / case, "seg").write_bytes(b"this is not a NIfTI file")
    with pytest.raises(SystemExit, match="could not be converted"):
        convert(raw_copy, tmp_path / "out")
    assert not os.path.exists(tmp_path / "out")
    assert not [name for name in os.listdir(tmp_path) if ".staging." in name]


def test_strict_fails_on_any_skipped_case_and_writes_nothing(raw_copy, tmp_path):
    remove_modality(raw_copy / case_names(raw_copy)[0])
    with pytest.raises(SystemExit, match="--strict"):
        convert(raw_copy, tmp_path / "out", "--strict", "true")
    assert not os.path.exists(tmp_path / "out")


# --- Parallel runs (interrupted ones: test_faults_conversion.py) -----------------------------

def test_parallel_output_is_byte_identical_to_serial(raw_dir, tmp_path):
    convert(raw_dir, tmp_path / "serial", "--workers", "1")
    convert(raw_dir, tmp_path / "parallel", "--workers", "3")
    assert read_arrays(tmp_path / "serial") == read_arrays(tmp_path / "parallel")
    assert manifest(tmp_path / "serial")["splits"] == manifest(tmp_path / "parallel")["splits"]


def test_flags_override_settings_and_default_to_them():
    from brainseg import cli
    import settings
    args = cli.parse("test", converter.SETTINGS, ["--split", "0.5", "--seed", "3"],
                     aliases=converter.ALIASES)
    assert args.TRAIN_FRACTION == 0.5 and args.SPLIT_SEED == 3
    assert args.IMAGE_SIZE == settings.IMAGE_SIZE and args.RAW_DIR == settings.RAW_DIR
