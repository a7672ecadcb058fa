"""converter.py on NIfTI files that lie or surprise (issue 13, "Untrusted NIfTI"): absurd
headers, intensities that overflow the normalization, label maps that are not, empty scans,
modalities on different grids are skipped with the file and the problem named; other
orientations and a trailing dimension of 1 convert to exactly the arrays of the ordinary
case; names in a release's JSON file do not lead anywhere."""
import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from brainseg import dataset, synthetic
from conftest import SMALL_SHAPE, case_names, convert, file_of, read_arrays
from test_layouts import ORIENTATIONS, lying_header, reorient

MESSAGE_LIMIT = 300  # characters: a reason in a log line, not a dump




def replace(path, array, affine=None):
    """Rewrites a case's file with `array`, on the file's own grid unless told otherwise."""
    image = nib.load(path)
    nib.save(nib.Nifti1Image(array, image.affine if affine is None else affine), str(path))


def voxels(path, dtype=np.float32):
    return np.asarray(nib.load(path).dataobj, dtype)



# --- Bad input: skipped, the file and the problem named -----------------------------------

def absurd_voxel_count(folder):
    """2000^3 voxels declared in a tiny file (16 GB of int16 if allocated)."""
    path = file_of(folder, "flair")
    lying_header(path, (2000, 2000, 2000))
    return path, "the header declares 8,000,000,000 voxels"


def more_than_gzip_can_hold(folder):
    """128 MB declared in a few kB of gzip, which expands at most 1032 times."""
    path = file_of(folder, "flair")
    lying_header(path, (400, 400, 400))
    return path, "more than a"


def more_than_the_file_holds(folder):
    """An uncompressed .nii whose header declares more data than the file has."""
    gzipped = file_of(folder, "t1")
    path = gzipped.with_name(gzipped.name.replace(".nii.gz", ".nii"))
    gzipped.unlink()
    lying_header(path, (100, 100, 100), gzipped=False)
    return path, "the file holds"


def overflowing_voxel(folder):
    path = file_of(folder, "flair")
    volume = voxels(path)
    volume[24, 24, 12] = 1e38  # finite in float32; its square is not
    replace(path, volume)
    return path, "overflow"


def overflowing_scale(folder):
    path = file_of(folder, "t2")
    replace(path, voxels(path) * np.float32(1e34))  # every value finite, their sum is not
    return path, "overflow"


def infinite_voxel(folder):
    path = file_of(folder, "t1ce")
    volume = voxels(path)
    volume[24, 24, 12] = np.inf
    replace(path, volume)
    return path, "NaN or infinite"


def fractional_labels(folder):
    """Labels 1 and 2 stored as 0.5 and 1.7, and a strip of thousands of distinct
    non-integers (a probability map, or a label map resampled linearly)."""
    path = file_of(folder, "seg")
    labels = voxels(path)
    labels[labels == 1], labels[labels == 2] = 0.5, 1.7
    labels[:, :, 0] = np.random.default_rng(0).uniform(2.01, 2.99, labels.shape[:2])
    replace(path, labels)
    return path, "non-integer"


def many_unknown_labels(folder):
    path = file_of(folder, "seg")
    labels = np.asarray(nib.load(path).dataobj).astype(np.uint8)
    strip = labels[:, :, 0].size
    labels[:, :, 0] = (10 + np.arange(strip) % 240).reshape(labels.shape[:2])  # 240 unknown
    replace(path, labels)
    return path, "outside the brats2020 set"


def every_modality_zero(folder):
    for kind in ("flair", "t1", "t1ce", "t2"):
        path = file_of(folder, kind)
        replace(path, np.zeros(SMALL_SHAPE, np.int16))
    return file_of(folder, "flair"), "every voxel is zero"


def one_modality_zero(folder):
    path = file_of(folder, "t1ce")
    replace(path, np.zeros(SMALL_SHAPE, np.int16))
    return path, "every voxel is zero"


def modality_on_a_shifted_grid(folder):
    """Same shape, but the affine puts the voxels 3 mm away: not the same scan grid."""
    path = file_of(folder, "t1")
    image = nib.load(path)
    affine = image.affine.copy()
    affine[:3, 3] += [3.0, 0.0, 0.0]
    replace(path, np.asarray(image.dataobj), affine)
    return path, "must share one grid"


def labels_on_another_grid(folder):
    path = file_of(folder, "seg")
    image = nib.load(path)
    replace(path, np.asarray(image.dataobj), image.affine @ np.diag([2.0, 2.0, 2.0, 1.0]))
    return path, "must share one grid"


@pytest.mark.parametrize("damage", [
    absurd_voxel_count, more_than_gzip_can_hold, more_than_the_file_holds, overflowing_voxel,
    overflowing_scale, infinite_voxel, fractional_labels, many_unknown_labels,
    every_modality_zero, one_modality_zero, modality_on_a_shifted_grid, labels_on_another_grid])
def test_an_untrusted_case_is_skipped_with_a_short_reason_naming_the_file(
        raw_copy, tmp_path, capsys, damage):
    cases = case_names(raw_copy)
    named_path, problem = damage(raw_copy / cases[0])
    convert(raw_copy, tmp_path / "out")
    output = capsys.readouterr().out
    content = dataset.load_manifest(tmp_path / "out")
    skipped = {entry["case"]: entry["error"] for entry in content["skipped"]}
    assert list(skipped) == [cases[0]], output
    reason = skipped[cases[0]]
    assert reason.startswith(f"{named_path}: ") and problem in reason, reason
    assert len(reason) < len(str(named_path)) + MESSAGE_LIMIT, reason
    assert f"skipped {cases[0]}: {reason}" in output
    converted = [entry["case"] for entries in content["splits"].values() for entry in entries]
    assert sorted(converted) == cases[1:]
    for split in content["splits"]:
        imgs, _ = dataset.open_split(tmp_path / "out", split)
        assert np.isfinite(imgs).all()


def test_the_short_label_messages_show_a_few_values(raw_copy, tmp_path):
    cases = case_names(raw_copy)
    fractional_labels(raw_copy / cases[0])
    many_unknown_labels(raw_copy / cases[1])
    convert(raw_copy, tmp_path / "out")
    skipped = {entry["case"]: entry["error"]
               for entry in dataset.load_manifest(tmp_path / "out")["skipped"]}
    first, second = skipped[cases[0]], skipped[cases[1]]
    assert "0.5" in first and "1.7" in first  # examples, not every value
    shown = second.split("label values [")[1].split("]")[0]
    assert shown.startswith("10, 11, 12") and "..." in shown and len(shown.split(",")) <= 6
    assert "240 values" in second


# --- Surprising but valid input: the same arrays as the ordinary case -----------------------

def reoriented_release(raw_dir, root, orientation_of):
    """A copy of the release with every file stored in orientation_of(file name)."""
    shutil.copytree(raw_dir, root)
    for path in sorted(root.glob("*/*.nii.gz")):
        reorient(path, orientation_of(path.name))
    return root


MIXED = {"flair": ("R", "A", "S"), "t1": ("R", "S", "A"), "t1ce": ("L", "P", "S"),
         "t2": ("A", "I", "L"), "seg": ("S", "R", "P")}  # one case, five orientations


@pytest.mark.parametrize("orientation", ["RAS", "coronal", "mixed"])
def test_any_orientation_converts_to_the_arrays_of_the_brats_one(
        raw_dir, converted_dir, tmp_path, orientation):
    """The synthetic cases are stored as BraTS stores them (LPS); the same voxels stored
    mirrored, with axis 2 front to back, or each file of a case differently, must reach the
    model as exactly the same slices."""
    def orientation_of(name):
        kind = name.split("_")[-1].split(".")[0]
        return MIXED[kind] if orientation == "mixed" else ORIENTATIONS[orientation]
    root = reoriented_release(raw_dir, tmp_path / "raw", orientation_of)
    convert(root, tmp_path / "out")
    assert read_arrays(tmp_path / "out") == read_arrays(converted_dir)
    entries, expected = (
        {split: [{k: v for k, v in entry.items() if k not in ("images", "label")}
                 for entry in entries]
         for split, entries in dataset.load_manifest(folder)["splits"].items()}
        for folder in (tmp_path / "out", converted_dir))
    assert entries == expected  # shape and spacing of the grid the slices are cut from


def test_a_4d_decathlon_file_in_another_orientation(tmp_path):
    """The Decathlon's 4-D images and its label maps, stored RAS and coronal: the arrays of
    the same cases in the BraTS layout."""
    for layout in ("brats2020", "msd"):
        synthetic.write_dataset(str(tmp_path / layout), 2, seed=11, shape=SMALL_SHAPE,
                                layout=layout)
    for path in (tmp_path / "msd" / "imagesTr").iterdir():
        reorient(path, ORIENTATIONS["RAS"])
    for path in (tmp_path / "msd" / "labelsTr").iterdir():
        reorient(path, ORIENTATIONS["coronal"])
    for layout in ("brats2020", "msd"):
        convert(tmp_path / layout, tmp_path / f"{layout}_out")
    assert read_arrays(tmp_path / "msd_out") == read_arrays(tmp_path / "brats2020_out")


def test_a_trailing_dimension_of_one_converts_like_the_3d_file(raw_copy, converted_dir,
                                                               tmp_path):
    for case in case_names(raw_copy):
        for kind in ("flair", "seg"):
            path = file_of(raw_copy / case, kind)
            replace(path, np.asarray(nib.load(path).dataobj)[..., None])
    convert(raw_copy, tmp_path / "out")
    assert dataset.load_manifest(tmp_path / "out")["skipped"] == []
    assert read_arrays(tmp_path / "out") == read_arrays(converted_dir)


# --- Names from JSON files -----------------------------------------------------------------

def test_the_decathlon_dataset_json_names_no_file_that_is_read(tmp_path):
    """The Decathlon layout finds its cases in imagesTr/ and labelsTr/ and never follows the
    paths listed in dataset.json, so hostile entries there reach nothing."""
    root = tmp_path / "msd"
    synthetic.write_dataset(str(root), 2, seed=11, shape=SMALL_SHAPE, layout="msd")
    description = json.loads((root / "dataset.json").read_text())
    description["training"] = [{"image": "../../outside/BRATS_666.nii.gz",
                                "label": "/etc/passwd"}]
    (root / "dataset.json").write_text(json.dumps(description))
    convert(root, tmp_path / "out")
    content = dataset.load_manifest(tmp_path / "out")
    converted = sorted(entry["case"] for entries in content["splits"].values()
                       for entry in entries)
    assert converted == ["BRATS_001", "BRATS_002"] and content["skipped"] == []
