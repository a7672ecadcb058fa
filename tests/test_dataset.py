"""brainseg/dataset.py: the converted folder's files, opened with their checks."""
import numpy as np
import pytest

from brainseg import dataset


def test_missing_or_mismatched_arrays_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="imgs_train.npy"):
        dataset.open_split(tmp_path, "train")
    np.save(tmp_path / "imgs_train.npy", np.zeros((4, 8, 8, 4), np.float32))
    np.save(tmp_path / "msks_train.npy", np.zeros((3, 8, 8, 1), np.uint8))
    with pytest.raises(ValueError, match="msks_train.npy"):
        dataset.open_split(tmp_path, "train")
    np.save(tmp_path / "msks_train.npy", np.zeros((4, 8, 8, 1), np.uint8))
    with pytest.raises(ValueError, match="expected 16x16"):
        dataset.open_split(tmp_path, "train", image_size=16)
    with pytest.raises(ValueError, match="4 channels, expected 3"):
        dataset.open_split(tmp_path, "train", channels=3)
    (tmp_path / "imgs_test.npy").write_bytes(b"garbage")
    np.save(tmp_path / "msks_test.npy", np.zeros((4, 8, 8, 1), np.uint8))
    with pytest.raises(ValueError, match="imgs_test.npy"):
        dataset.open_split(tmp_path, "test")
