"""converter.py on NIfTI files that lie or surprise (issue 13, "Untrusted NIfTI"): absurd
headers are skipped with the file and the problem named; a trailing dimension of 1 converts
to exactly the arrays of the ordinary case."""
import os
import shutil

import nibabel as nib
import numpy as np
import pytest

from brainseg import dataset
from conftest import SMALL_SHAPE, convert
from test_layouts import lying_header

MESSAGE_LIMIT = 300  # characters: a reason in a log line, not a dump


def read_arrays(out_dir):
    """{file name: bytes} of every .npy in a converted folder."""
    return {name: (out_dir / name).read_bytes() for name in sorted(os.listdir(out_dir))
            if name.endswith(".npy")}


def file_of(folder, kind):
    return next(folder / name for name in os.listdir(folder) if f"_{kind}." in name)


def replace(path, array, affine=None):
    """Rewrites a case's file with `array`, on the file's own grid unless told otherwise."""
    image = nib.load(path)
    nib.save(nib.Nifti1Image(array, image.affine if affine is None else affine), str(path))


@pytest.fixture()
def raw_copy(raw_dir, tmp_path):
    copy = tmp_path / "raw"
    shutil.copytree(raw_dir, copy)
    return copy


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


@pytest.mark.parametrize("damage", [
    absurd_voxel_count, more_than_gzip_can_hold, more_than_the_file_holds])
def test_an_untrusted_case_is_skipped_with_a_short_reason_naming_the_file(
        raw_copy, tmp_path, capsys, damage):
    cases = sorted(os.listdir(raw_copy))
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


# --- Surprising but valid input: the same arrays as the ordinary case -----------------------

def test_a_trailing_dimension_of_one_converts_like_the_3d_file(raw_copy, converted_dir,
                                                               tmp_path):
    for case in os.listdir(raw_copy):
        for kind in ("flair", "seg"):
            path = file_of(raw_copy / case, kind)
            replace(path, np.asarray(nib.load(path).dataobj)[..., None])
    convert(raw_copy, tmp_path / "out")
    assert dataset.load_manifest(tmp_path / "out")["skipped"] == []
    assert read_arrays(tmp_path / "out") == read_arrays(converted_dir)
