"""The converted dataset on disk: the one module that knows its file names and format.

converter.py writes a folder through it; training, inference, the launcher's preflight and
the benchmarks read the folder through it. TensorFlow-free, so every one of them can.

    imgs_train.npy  [N, S, S, C] float16 (or float32): channels in layouts.MODALITIES order
    msks_train.npy  [N, S, S, K] uint8: the target channels of the label mode
    imgs_test.npy, msks_test.npy
    manifest.json   layout and label mapping, preprocessing, which case went to which split,
                    its rows, slices and crop box, and the skipped cases with the reason

Every file is written under a temporary name (atomic.create_temporary: a unique hidden
`.partial.` name, so no pattern below matches a leftover) and renamed when complete, manifest.json
last: a folder without a manifest is incomplete.
"""
import fnmatch
import hashlib
import io
import json
import os

import numpy as np

from brainseg import atomic, messages

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
    """Written last, atomically: its presence says the arrays beside it are complete, and
    its "files" entry (each array's size and fingerprint) which arrays those are."""
    files = {name: fingerprint(os.path.join(data_dir, name))
             for name in sorted(os.listdir(data_dir)) if name.endswith(".npy")}
    atomic.write_json(manifest_path(data_dir), {**manifest, "files": files})


# Bytes hashed at each end of an array file: enough to tell two conversions apart (the
# header holds the row count; the first and last rows differ between datasets) while reading
# milliseconds' worth of a file of gigabytes.
FINGERPRINT_BYTES = 1 << 20


def fingerprint(path):
    """Size and a SHA-256 of the first and last FINGERPRINT_BYTES of a file."""
    size = os.path.getsize(path)
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        digest.update(file.read(FINGERPRINT_BYTES))
        file.seek(max(size - FINGERPRINT_BYTES, 0))
        digest.update(file.read(FINGERPRINT_BYTES))
    return {"bytes": size, "sha256_ends": digest.hexdigest()}


def check_vouched(path, manifest):
    """Raises ValueError unless the manifest beside path describes this very file: arrays
    from another or an interrupted conversion must never be trained on silently."""
    folder, name = os.path.split(path)
    expected = (manifest or {}).get("files", {}).get(name)
    if expected is None:
        reason = ("there is no manifest.json beside it (an incomplete conversion)"
                  if manifest is None else "manifest.json does not list it")
        raise ValueError(f"{path}: {reason}; run converter.py into {folder} again")
    found = fingerprint(path)
    if found != expected:
        raise ValueError(f"{path}: not the file manifest.json describes ({found['bytes']} bytes, "
                         f"expected {expected['bytes']}, or different content): the folder "
                         f"mixes files of different conversions; run converter.py again")


def check_replaceable(data_dir):
    """Raises ValueError unless data_dir is absent, empty or a converted dataset: a conversion
    replaces the whole folder, which must not take anything else with it."""
    data_dir = os.path.realpath(data_dir)  # a link to a folder yet to be made is fine
    if not os.path.isdir(data_dir):
        if os.path.lexists(data_dir):
            raise ValueError(f"{data_dir}: exists and is not a folder")
        return
    others = sorted(name for name in os.listdir(data_dir)
                    if not (name.startswith(atomic.PARTIAL_PREFIX) or any(
                        fnmatch.fnmatchcase(name, pattern) for pattern in DATA_PATTERNS)))
    if others:
        raise ValueError(f"{data_dir}: holds files that are not a converted dataset "
                         f"({messages.first_few(others)}); "
                         f"a conversion replaces the whole folder: choose a new or empty one")


def open_split(data_dir, split, image_size=None, channels=None):
    """Opens imgs_<split>.npy and msks_<split>.npy memory-mapped (only their ends are read),
    after checking that they exist, that the folder's manifest vouches for them, and that they
    agree: [N, H, W, C] images and [N, H, W, K] masks with the same N, H and W.
    image_size / channels, when given, are what the caller (a model) expects."""
    imgs_path, msks_path = split_paths(data_dir, split)
    manifest = load_manifest(data_dir)
    arrays = []
    for path in (imgs_path, msks_path):
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: not found; run converter.py first "
                                    f"(or pass --data-dir pointing at its output)")
        check_vouched(path, manifest)
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
        self.partial_path = atomic.create_temporary(path)
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
        atomic.commit(self.partial_path, self.path)

    def discard(self):
        self.file.close()
        os.remove(self.partial_path)
