"""The converted dataset on disk: the one module that knows its file names and format.

converter.py writes a folder through it; training, inference, the launcher's preflight and
the benchmarks read the folder through it. TensorFlow-free, so every one of them can.

    imgs_train.npy  [N, S, S, C] float16 (or float32): channels in layouts.MODALITIES order
    msks_train.npy  [N, S, S, K] uint8: the target channels of the label mode
    imgs_test.npy, msks_test.npy
    manifest.json   layout and label mapping, preprocessing, which case went to which split,
                    its rows, slices and crop box, and the skipped cases with the reason

Every file is written under a temporary name (atomic.temporary_path: a hidden `.partial.`
prefix, so no pattern below matches a leftover) and renamed when complete, manifest.json
last: a folder without a manifest is incomplete.
"""
import io
import json
import os

import numpy as np

from brainseg import atomic

SPLITS = ("train", "test")
MANIFEST = "manifest.json"
# Every file of a converted folder, as glob patterns (the launcher compares and copies these).
DATA_PATTERNS = ["imgs_*.npy", "msks_*.npy", MANIFEST]


def split_paths(data_dir, split):
    """Paths of the image and mask arrays of one split ('train' or 'test')."""
    return (os.path.join(data_dir, f"imgs_{split}.npy"),
            os.path.join(data_dir, f"msks_{split}.npy"))


def manifest_path(data_dir):
    return os.path.join(data_dir, MANIFEST)


def load_manifest(data_dir):
    """The manifest of a converted folder, or None when there is none."""
    path = manifest_path(data_dir)
    if not os.path.exists(path):
        return None
    with open(path) as file:
        return json.load(file)


def write_manifest(data_dir, manifest):
    """Written last, atomically: its presence says the arrays beside it are complete."""
    atomic.write_json(manifest_path(data_dir), manifest)


def open_split(data_dir, split, image_size=None, channels=None):
    """Opens imgs_<split>.npy and msks_<split>.npy memory-mapped (nothing is read), after
    checking that they exist and agree: [N, H, W, C] images and [N, H, W, K] masks with the
    same N, H and W. image_size / channels, when given, are what the caller (a model) expects."""
    imgs_path, msks_path = split_paths(data_dir, split)
    arrays = []
    for path in (imgs_path, msks_path):
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: not found; run converter.py first "
                                    f"(or pass --data-dir pointing at its output)")
        try:
            array = np.load(path, mmap_mode="r", allow_pickle=False)
        except ValueError as error:
            raise ValueError(f"{path}: not a readable .npy array ({error})") from error
        if array.ndim != 4:
            raise ValueError(f"{path}: expected a 4-D array [N, H, W, C], got shape {array.shape}")
        arrays.append(array)
    imgs, msks = arrays
    if imgs.shape[:3] != msks.shape[:3]:
        raise ValueError(f"{imgs_path} has shape {imgs.shape} but {msks_path} has shape "
                         f"{msks.shape}: the first three dimensions must agree")
    if image_size is not None and imgs.shape[1:3] != (image_size, image_size):
        raise ValueError(f"{imgs_path}: slices are {imgs.shape[1]}x{imgs.shape[2]}, "
                         f"expected {image_size}x{image_size}")
    if channels is not None and imgs.shape[3] != channels:
        raise ValueError(f"{imgs_path}: {imgs.shape[3]} channels, expected {channels}")
    return imgs, msks


class NpyAppender:
    """Appends rows to a .npy file under a temporary name; finish() writes the final row count
    into the header, truncates unused space and renames the file into place.

    Rows are written with ordinary file writes rather than through a memory map: written
    pages then belong to the page cache, not to this process, so its resident memory stays at
    one case whatever the output size (a memory map counts every page it touched)."""

    def __init__(self, path, capacity, row_shape, dtype):
        self.path, self.rows = path, 0
        self.row_shape, self.dtype = tuple(row_shape), np.dtype(dtype)
        self.partial_path = atomic.temporary_path(path)
        self.file = open(self.partial_path, "wb")
        self.header_size = self.file.write(self._header(capacity))

    def _header(self, rows, size=None):
        """The .npy header for `rows` rows, padded with spaces to `size` bytes when given
        (a smaller row count has fewer digits, so the final header always fits)."""
        buffer = io.BytesIO()
        np.lib.format.write_array_header_1_0(buffer, {
            "descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
            "shape": (rows, *self.row_shape)})
        header = buffer.getvalue()
        if size is None or len(header) == size:
            return header
        text = header[10:].rstrip(b" \n")
        text += b" " * (size - 10 - len(text) - 1) + b"\n"
        return header[:8] + len(text).to_bytes(2, "little") + text

    def append(self, rows):
        self.file.write(np.ascontiguousarray(rows, dtype=self.dtype).tobytes())
        self.rows += len(rows)

    def finish(self):
        self.file.seek(0)
        self.file.write(self._header(self.rows, self.header_size))
        self.file.truncate(self.header_size + self.rows * self.dtype.itemsize *
                           int(np.prod(self.row_shape)))
        self.file.close()
        os.replace(self.partial_path, self.path)

    def discard(self):
        self.file.close()
        os.remove(self.partial_path)
