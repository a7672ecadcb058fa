"""Tests of the synthetic BraTS generator: layout, labels, contrast, size and variety.

Small grids keep the file fast; the anatomy is defined in mm, so a small grid holds the same
head as the full BraTS grid, only coarser. One test generates a full-size case.
"""
import os
import time

import nibabel as nib
import numpy as np
import pytest

import synthetic_brats
from brainseg import phantom, synthetic
from brainseg.synthetic import CASE_PREFIX, case_id, make_case, write_case, write_dataset

SMALL_SHAPE = (48, 48, 24)
MEDIUM_SHAPE = (64, 64, 40)
FULL_SHAPE = (240, 240, 155)
MODALITIES = ("flair", "t1", "t1ce", "t2")
FILE_NAMES = MODALITIES + ("seg",)


def test_case_id_matches_brats_naming():
    assert CASE_PREFIX == "BraTS20_Training_"
    assert case_id(1) == "BraTS20_Training_001"
    assert case_id(42) == "BraTS20_Training_042"
    assert case_id(369) == "BraTS20_Training_369"


def test_make_case_is_deterministic_in_the_seed():
    first, again, other = (make_case(seed, SMALL_SHAPE) for seed in (7, 7, 8))
    assert sorted(first) == sorted(FILE_NAMES)
    for name in FILE_NAMES:
        np.testing.assert_array_equal(first[name], again[name])
        assert not np.array_equal(first[name], other[name]), name


def _load(root, index, name):
    """Voxel array of one written file, as stored (no scaling)."""
    return np.asanyarray(nib.load(os.path.join(root, case_id(index),
                                               f"{case_id(index)}_{name}.nii.gz")).dataobj)


def test_write_dataset_layout_and_nifti_headers(tmp_path):
    seed = 123
    folders = write_dataset(tmp_path / "three", 3, seed, SMALL_SHAPE)
    expected = [case_id(i) for i in (1, 2, 3)]
    assert [os.path.basename(f) for f in folders] == expected
    assert sorted(os.listdir(tmp_path / "three")) == [synthetic.MARKER, *expected]
    for case in expected:
        folder = tmp_path / "three" / case
        # Exactly the five files: no temporary file of the atomic write is left behind.
        assert sorted(os.listdir(folder)) == sorted(f"{case}_{n}.nii.gz" for n in FILE_NAMES)
        for name in FILE_NAMES:
            image = nib.load(folder / f"{case}_{name}.nii.gz")
            data = np.asanyarray(image.dataobj)
            assert data.shape == SMALL_SHAPE
            assert data.dtype == (np.uint8 if name == "seg" else np.int16)
            assert image.header.get_zooms() == (1.0, 1.0, 1.0)
            assert np.allclose(np.abs(np.diag(image.affine)), 1)
            assert int(image.header["sform_code"]) > 0 and int(image.header["qform_code"]) > 0

    # Case 2 does not depend on how many cases are written.
    write_dataset(tmp_path / "two", 2, seed, SMALL_SHAPE)
    for name in FILE_NAMES:
        two, three = (_load(tmp_path / root, 2, name) for root in ("two", "three"))
        np.testing.assert_array_equal(two, three)
    three = tmp_path / "three"
    assert not np.array_equal(_load(three, 1, "t1"), _load(three, 2, "t1"))  # cases differ


def test_write_case_overwrites_and_round_trips(tmp_path):
    write_case(tmp_path, 5, seed=1, shape=SMALL_SHAPE)
    folder = write_case(tmp_path, 5, seed=2, shape=SMALL_SHAPE)
    assert folder == os.path.join(tmp_path, case_id(5))
    expected = make_case(2, SMALL_SHAPE)
    for name in FILE_NAMES:
        np.testing.assert_array_equal(_load(tmp_path, 5, name), expected[name])


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_labels_tumor_inside_brain_and_zero_background(seed):
    case, tissue = synthetic._generate(seed, MEDIUM_SHAPE)
    seg = case["seg"]
    assert seg.dtype == np.uint8
    assert set(np.unique(seg)) <= {0, 1, 2, 4}
    tumor = seg > 0
    assert tumor.sum() >= 20  # a whole tumor of reasonable size in every case
    assert np.isin(tissue[tumor], synthetic.BRAIN_TISSUES).all()
    for name in MODALITIES:
        volume = case[name]
        assert volume.dtype == np.int16 and volume.min() >= 0
        assert (volume[tumor] > 0).all(), name  # the tumor lies inside the head
        assert not volume[:4, :4, :4].any() and not volume[-4:, -4:, -4:].any(), name
        assert 200 < volume.max() < 10000, name  # the scale of real MRI values


def _case_with_all_labels(shape, min_voxels=30):
    """First seed whose case has a necrotic core, edema and an enhancing rim."""
    for seed in range(100):
        case = make_case(seed, shape)
        if all((case["seg"] == label).sum() >= min_voxels for label in (1, 2, 4)):
            return case
    raise AssertionError("no case with all labels in 100 seeds")


def test_tissue_contrast_per_modality_matches_real_scans():
    case = _case_with_all_labels(MEDIUM_SHAPE)
    seg = case["seg"]
    normal = (seg == 0) & (case["t1"] > 0)
    edema, rim, necrosis = seg == 2, seg == 4, seg == 1

    def mean(name, region):
        return case[name][region].mean()

    # Clearly brighter, not just brighter than a mean pulled down by dark CSF and bone.
    assert mean("flair", edema) > 1.3 * mean("flair", normal)
    assert mean("t2", edema) > 1.2 * mean("t2", normal)
    assert mean("t1ce", rim) > 1.3 * mean("t1ce", normal)
    assert mean("t1ce", rim) > 1.2 * mean("t1ce", necrosis)
    # The rim enhances on T1ce only: relative to normal brain it is brighter there than on T1.
    assert mean("t1", rim) / mean("t1", normal) < mean("t1ce", rim) / mean("t1ce", normal)


def test_full_size_case_fits_the_brats_grid(tmp_path):
    seed = 2018
    start = time.perf_counter()
    folder = write_case(tmp_path, 1, seed, FULL_SHAPE)
    print(f"\nmake_case + write_case, {FULL_SHAPE}: {time.perf_counter() - start:.2f} s")

    assert folder == os.path.join(tmp_path, case_id(1))
    t1 = _load(tmp_path, 1, "t1")
    assert t1.shape == FULL_SHAPE
    _, tissue = synthetic._generate(seed, FULL_SHAPE)
    for region, max_extent, (first_slice, last_slice) in [
        (np.isin(tissue, synthetic.BRAIN_TISSUES), (150, 180), (18, 142)),
        (t1 > 0, (175, 210), (8, 150)),  # the head: brain, skull and scalp
    ]:
        x, y, z = (np.flatnonzero(region.any(axis=axes)) for axes in [(1, 2), (0, 2), (0, 1)])
        extent = (x[-1] - x[0] + 1, y[-1] - y[0] + 1)
        assert 100 < extent[0] <= max_extent[0] and 120 < extent[1] <= max_extent[1], extent
        assert first_slice <= z[0] and z[-1] <= last_slice, (z[0], z[-1])
    assert not np.isin(tissue, synthetic.BRAIN_TISSUES)[t1 == 0].any()


def test_tumors_vary_in_position_and_size():
    segs = [make_case(seed, SMALL_SHAPE)["seg"] for seed in range(10, 16)]
    volumes = [int((seg > 0).sum()) for seg in segs]
    centroids = np.array([np.argwhere(seg > 0).mean(axis=0) for seg in segs])
    assert len(set(volumes)) == len(volumes), volumes
    distances = np.linalg.norm(centroids[:, None] - centroids[None, :], axis=-1)
    assert distances[np.triu_indices(len(segs), k=1)].min() > 0.5, centroids
    assert centroids[:, 0].std() > 2 and centroids[:, 1].std() > 2  # spread over the brain
    assert max(volumes) > 2 * min(volumes)


def test_command_line_writes_the_requested_cases(tmp_path, capsys):
    synthetic_brats.main(["--out-dir", str(tmp_path), "--num-cases", "2", "--seed", "5",
                          "--shape", "32", "32", "20"])
    assert sorted(os.listdir(tmp_path)) == [synthetic.MARKER, case_id(1), case_id(2)]
    image = nib.load(tmp_path / case_id(2) / f"{case_id(2)}_flair.nii.gz")
    assert image.shape == (32, 32, 20)
    output = capsys.readouterr().out
    assert "seed 5" in output and str(tmp_path) in output


def test_realistic_kind_writes_brats_cases_and_an_unknown_kind_is_refused(tmp_path):
    folders = write_dataset(str(tmp_path), 2, seed=3, shape=SMALL_SHAPE, kind="realistic")
    assert [os.path.basename(f) for f in folders] == [case_id(1), case_id(2)]
    seg = np.asarray(nib.load(tmp_path / case_id(1) / f"{case_id(1)}_seg.nii.gz").dataobj)
    cartoon = make_case(synthetic._case_seed(3, 1), SMALL_SHAPE)["seg"]
    assert seg.shape == SMALL_SHAPE and set(np.unique(seg)) <= {0, 1, 2, 4} and seg.any()
    assert not np.array_equal(seg, cartoon)
    with pytest.raises(ValueError, match="realistic"):
        write_dataset(str(tmp_path), 1, seed=3, shape=SMALL_SHAPE, kind="photographic")


def test_a_phenomenon_changed_draws_the_same_patients_otherwise(tmp_path):
    """--phenomenon: a stronger bias field shades the same case (the same labels, other
    intensities); every case lower-grade has no enhancing tumor; the cartoon takes none."""
    synthetic_brats.main(["--raw-dir", str(tmp_path / "plain"), "--num-cases", "2", "--seed",
                          "4", "--shape", *map(str, SMALL_SHAPE), "--synthetic-kind",
                          "realistic"])
    synthetic_brats.main(["--raw-dir", str(tmp_path / "shaded"), "--num-cases", "2", "--seed",
                          "4", "--shape", *map(str, SMALL_SHAPE), "--synthetic-kind",
                          "realistic", "--phenomenon", "bias_field_strength=0.6"])
    write_dataset(str(tmp_path / "lower"), 2, seed=4, shape=SMALL_SHAPE, kind="realistic",
                  phenomena=phantom.phenomena_from(["lower_grade_probability=1"]))
    for index in (1, 2):
        name = case_id(index)

        def read(folder, kind):
            return np.asarray(nib.load(tmp_path / folder / name / f"{name}_{kind}.nii.gz")
                              .dataobj)
        np.testing.assert_array_equal(read("plain", "seg"), read("shaded", "seg"))
        assert not np.array_equal(read("plain", "flair"), read("shaded", "flair"))
        assert read("lower", "seg").any() and not (read("lower", "seg") == 4).any()
    with pytest.raises(ValueError, match="realistic"):
        write_dataset(str(tmp_path / "cartoon"), 1, seed=4, shape=SMALL_SHAPE,
                      phenomena=phantom.phenomena_from(["lobulation=0"]))
    with pytest.raises(SystemExit, match="no phenomenon 'bias'"):
        synthetic_brats.main(["--raw-dir", str(tmp_path / "typo"), "--num-cases", "1",
                              "--synthetic-kind", "realistic", "--phenomenon", "bias=0.3"])


def test_case_k_is_the_same_whatever_the_number_of_cases(tmp_path):
    """bench/accuracy.py scores trained models on more held-out cases of a seed: the first
    ones must be the cases it scored before, byte for byte."""
    write_dataset(str(tmp_path / "one"), 1, seed=7, shape=SMALL_SHAPE, kind="realistic")
    write_dataset(str(tmp_path / "two"), 2, seed=7, shape=SMALL_SHAPE, kind="realistic")
    for name in ("flair", "seg"):
        files = [tmp_path / count / case_id(1) / f"{case_id(1)}_{name}.nii.gz"
                 for count in ("one", "two")]
        first, again = (np.asarray(nib.load(path).dataobj) for path in files)
        np.testing.assert_array_equal(first, again)
    second = np.asarray(nib.load(tmp_path / "two" / case_id(2) / f"{case_id(2)}_seg.nii.gz")
                        .dataobj)
    assert not np.array_equal(second, again)


def test_the_generator_refuses_a_folder_it_did_not_write(tmp_path):
    """Synthetic cases carry real BraTS IDs: they must not overwrite a user's release."""
    release = tmp_path / "release"
    (release / "BraTS20_Training_001").mkdir(parents=True)
    (release / "BraTS20_Training_001" / "BraTS20_Training_001_flair.nii.gz").write_bytes(b"real")
    with pytest.raises(ValueError, match="holds files this generator did not write"):
        write_dataset(release, 1, seed=3, shape=SMALL_SHAPE)
    assert os.listdir(release / "BraTS20_Training_001") == ["BraTS20_Training_001_flair.nii.gz"]
    write_dataset(tmp_path / "mine", 1, seed=3, shape=SMALL_SHAPE)
    write_dataset(tmp_path / "mine", 2, seed=4, shape=SMALL_SHAPE)  # its own folder: rewritten
    assert len([name for name in os.listdir(tmp_path / "mine") if name.startswith("BraTS")]) == 2
