"""brainseg/dataset.py: the converted folder's files, opened with their checks."""
import numpy as np
import pytest

from brainseg import dataset


def test_missing_or_mismatched_arrays_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="imgs_train.npy"):
        dataset.open_split(tmp_path, "train")
    np.save(tmp_path / "imgs_train.npy", np.zeros((4, 8, 8, 4), np.float32))
    np.save(tmp_path / "msks_train.npy", np.zeros((3, 8, 8, 1), np.uint8))
    dataset.write_manifest(tmp_path, {})
    with pytest.raises(ValueError, match="msks_train.npy"):
        dataset.open_split(tmp_path, "train")
    np.save(tmp_path / "msks_train.npy", np.zeros((4, 8, 8, 1), np.uint8))
    dataset.write_manifest(tmp_path, {})
    with pytest.raises(ValueError, match="expected 16x16"):
        dataset.open_split(tmp_path, "train", image_size=16)
    with pytest.raises(ValueError, match="4 channels, expected 3"):
        dataset.open_split(tmp_path, "train", channels=3)
    (tmp_path / "imgs_test.npy").write_bytes(b"garbage")
    np.save(tmp_path / "msks_test.npy", np.zeros((4, 8, 8, 1), np.uint8))
    dataset.write_manifest(tmp_path, {})
    with pytest.raises(ValueError, match="imgs_test.npy"):
        dataset.open_split(tmp_path, "test")


def test_the_manifest_vouches_for_its_arrays_by_size_and_content(tmp_path):
    np.save(tmp_path / "imgs_train.npy", np.zeros((4, 8, 8, 4), np.float32))
    np.save(tmp_path / "msks_train.npy", np.zeros((4, 8, 8, 1), np.uint8))
    with pytest.raises(ValueError, match="imgs_train.npy: there is no manifest.json beside it"):
        dataset.open_split(tmp_path, "train")
    dataset.write_manifest(tmp_path, {"layout": "brats2020"})
    assert dataset.open_split(tmp_path, "train")[0].shape == (4, 8, 8, 4)
    np.save(tmp_path / "msks_train.npy", np.ones((4, 8, 8, 1), np.uint8))  # same size
    with pytest.raises(ValueError, match="msks_train.npy: not the file manifest.json describes"):
        dataset.open_split(tmp_path, "train")


def test_only_an_empty_folder_or_a_dataset_may_be_replaced_by_a_conversion(tmp_path):
    dataset.check_replaceable(tmp_path / "new")
    dataset.check_replaceable(tmp_path)
    np.save(tmp_path / "imgs_train.npy", np.zeros(3))
    (tmp_path / dataset.MANIFEST).write_text("{}")
    dataset.check_replaceable(tmp_path)
    (tmp_path / "scan_flair.nii.gz").write_bytes(b"")
    with pytest.raises(ValueError, match="not a converted dataset \\(scan_flair.nii.gz\\)"):
        dataset.check_replaceable(tmp_path)
