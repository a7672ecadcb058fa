"""brainseg/layouts.py reading real NIfTI files through nibabel: headers checked before any
voxel is read, one orientation for every volume and segmentations written back in the
file's own, a trailing dimension of 1. (The converter's skip path for each bad input is
tested in test_converter_untrusted.py.)"""
import gzip
import re
import tracemalloc

import nibabel as nib
import numpy as np
import pytest
from conftest import SMALL_SHAPE

from brainseg import layouts, nifti, synthetic

# Orientations a case may be stored in, as nibabel axis codes: the BraTS one (the synthetic
# cases), its mirror image RAS, and one whose axis 2 runs front to back (coronal slices).
ORIENTATIONS = {"LPS": ("L", "P", "S"), "RAS": ("R", "A", "S"), "coronal": ("R", "S", "A")}


def reorient(path, axcodes):
    """Rewrites a NIfTI file with the same voxels at the same places in the world, stored in
    the orientation `axcodes` (voxel order, affine and header changed together)."""
    image = nib.load(path)
    transform = nib.orientations.ornt_transform(nib.io_orientation(image.affine),
                                                nib.orientations.axcodes2ornt(axcodes))
    nib.save(image.as_reoriented(transform), str(path))
    return transform


def lying_header(path, shape, gzipped=True):
    """Writes a NIfTI whose header declares an int16 volume of `shape` but whose body holds
    only a 48 x 48 x 24 volume's bytes: the header lies about the size."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.int16)
    header.set_data_offset(352)
    raw = header.binaryblock + b"\0" * 4 + np.ones(SMALL_SHAPE, np.int16).tobytes()
    path.write_bytes(gzip.compress(raw) if gzipped else raw)
    return path


@pytest.fixture(scope="module")
def case_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    synthetic.write_dataset(str(root), 1, seed=3, shape=SMALL_SHAPE)
    return root / synthetic.case_id(1)


def case_in(folder):
    return layouts.find_cases(str(folder.parent))[1][0]


@pytest.mark.parametrize("orientation", ["RAS", "coronal"])
def test_every_orientation_is_read_as_the_brats_one_and_written_back_as_its_own(
        case_folder, tmp_path, orientation):
    """The same case stored in another orientation reads as exactly the same arrays, and a
    segmentation of those arrays is written back voxel for voxel onto the file's own grid."""
    original_image, original_labels = layouts.read_case(case_in(case_folder))
    copy = tmp_path / case_folder.name
    copy.mkdir()
    for path in case_folder.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
        reorient(copy / path.name, ORIENTATIONS[orientation])
    case = case_in(copy)
    image, labels = layouts.read_case(case)
    np.testing.assert_array_equal(image, original_image)
    np.testing.assert_array_equal(labels, original_labels)

    reference = layouts.reference_image(case)
    written = layouts.like_reference(layouts.to_release_labels(labels, case.layout), reference)
    stored = nib.load(case.label)
    np.testing.assert_array_equal(np.asarray(written.dataobj), np.asarray(stored.dataobj))
    np.testing.assert_array_equal(written.affine, reference.affine)
    assert written.header.get_zooms() == reference.header.get_zooms()
    assert written.get_sform(coded=True)[1] == reference.get_sform(coded=True)[1]
    assert nib.aff2axcodes(written.affine) == ORIENTATIONS[orientation]


def test_a_trailing_dimension_of_one_is_a_3d_volume(case_folder, tmp_path):
    original_image, original_labels = layouts.read_case(case_in(case_folder))
    copy = tmp_path / case_folder.name
    copy.mkdir()
    for path in case_folder.iterdir():
        image = nib.load(path)
        data = np.asarray(image.dataobj)[..., None]  # (X, Y, Z, 1)
        nib.save(nib.Nifti1Image(data, image.affine, image.header), str(copy / path.name))
    assert nib.load(copy / path.name).shape == (*SMALL_SHAPE, 1)
    image, labels = layouts.read_case(case_in(copy))
    np.testing.assert_array_equal(image, original_image)
    np.testing.assert_array_equal(labels, original_labels)


def test_an_absurd_header_is_refused_before_anything_is_allocated(case_folder, tmp_path):
    """A 128 MB volume declared in a file of a few kB: nibabel would allocate the declared
    size before finding the data short. The header alone must refuse it."""
    copy = tmp_path / case_folder.name
    copy.mkdir()
    for path in case_folder.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    flair = lying_header(copy / f"{case_folder.name}_flair.nii.gz", (400, 400, 400))
    tracemalloc.start()
    try:
        with pytest.raises(layouts.CaseError) as error:
            layouts.read_case(case_in(copy))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(error.value).startswith(f"{flair}: the header declares")
    assert peak < 16 * 2**20, f"{peak / 2**20:.0f} MiB allocated for a refused file"


def test_igzip_reads_the_values_nibabel_reads_with_zlib(case_folder, tmp_path, monkeypatch):
    """Every file of a case, and one with float voxels and a scale factor in its header,
    read with igzip and with nibabel's own gzip (the fallback without isal)."""
    assert nifti.igzip is not None, "isal is pinned in requirements.txt"
    scaled = tmp_path / "scaled.nii.gz"
    image = nib.Nifti1Image(np.arange(np.prod(SMALL_SHAPE), dtype=np.float32)
                            .reshape(SMALL_SHAPE) / 7, np.eye(4))
    image.header.set_slope_inter(0.5, 3.0)
    nib.save(image, str(scaled))
    paths = sorted(case_folder.iterdir()) + [scaled]
    with_igzip = [nifti.read(str(path)) for path in paths]
    monkeypatch.setattr(nifti, "igzip", None)
    for path, (volume, grid) in zip(paths, with_igzip):
        expected, expected_grid = nifti.read(str(path))
        assert volume.dtype == expected.dtype == np.float32
        np.testing.assert_array_equal(volume, expected)
        np.testing.assert_array_equal(grid.affine, expected_grid.affine)


def test_only_the_declared_bytes_are_decompressed(case_folder, tmp_path):
    """64 MiB of zeros after a file's data (a few kB of gzip): igzip stops at the data the
    header declares, so reading allocates nothing like 64 MiB."""
    flair = next(path for path in case_folder.iterdir() if "_flair." in path.name)
    padded = tmp_path / "padded_flair.nii.gz"
    padded.write_bytes(gzip.compress(gzip.decompress(flair.read_bytes()) + bytes(64 * 2**20),
                                     compresslevel=1))
    tracemalloc.start()
    try:
        volume, _ = nifti.read(str(padded))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    np.testing.assert_array_equal(volume, nifti.read(str(flair))[0])
    assert peak < 16 * 2**20, f"{peak / 2**20:.0f} MiB allocated"


def test_a_truncated_gzip_is_unreadable_with_either_decoder(case_folder, tmp_path, monkeypatch):
    flair = next(path for path in case_folder.iterdir() if "_flair." in path.name)
    cut = tmp_path / "cut_flair.nii.gz"
    cut.write_bytes(gzip.compress(gzip.decompress(flair.read_bytes())[:-1000]))
    for decoder in (nifti.igzip, None):
        monkeypatch.setattr(nifti, "igzip", decoder)
        with pytest.raises(nifti.NiftiError, match="unreadable NIfTI"):
            nifti.read(str(cut))


def test_distinct_values_are_those_of_np_unique():
    for volume in (np.array([[3.0, 0.0], [2.0, 3.0]], np.float32), np.array([1.0, 4.0]),
                   np.zeros((2, 2), np.float32), np.array([-0.0, 2.5], np.float32)):
        expected = np.unique(volume)
        actual = layouts.distinct_values(volume)
        assert actual.dtype == expected.dtype
        np.testing.assert_array_equal(actual, expected)


def test_messages_name_the_first_few_items_and_say_when_there_are_more():
    from brainseg import messages
    assert messages.first_few(["a", "b"], 3) == "a, b"
    assert messages.first_few(["a", "b", "c"], 3) == "a, b, c"
    assert messages.first_few(range(10_000), 3) == "0, 1, 2, ..."


def test_a_case_read_by_two_threads_is_the_case_read_alone(tmp_path):
    """read_case with threads reads the same arrays, in the same memory order, and a damaged
    file still fails naming it (after the files before it were checked)."""
    synthetic.write_dataset(str(tmp_path / "raw"), 1, seed=5, shape=SMALL_SHAPE)
    [case] = layouts.find_cases(str(tmp_path / "raw"))[1]
    alone, in_threads = layouts.read_case(case), layouts.read_case(case, threads=2)
    for one, other in zip(alone, in_threads):
        np.testing.assert_array_equal(one, other)
        assert one.strides == other.strides
    with open(case.images["t1ce"], "r+b") as file:  # the third of the four files
        file.truncate(200)
    with pytest.raises(layouts.CaseError, match=re.escape(case.images["t1ce"])):
        layouts.read_case(case, threads=2)
