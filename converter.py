"""Converts BraTS NIfTI volumes into the slice arrays that training and inference read.

For every case folder (`<case>/<case>_{flair,t1,t1ce,t2,seg}.nii.gz`) it loads the four
modalities and the label map, z-scores each modality over the brain, centre-crops and
resamples every axial slice to IMAGE_SIZE x IMAGE_SIZE, and writes

    imgs_train.npy, msks_train.npy, imgs_test.npy, msks_test.npy, manifest.json

images [N, S, S, 4] float32 (channels in MODALITIES order) and whole-tumor masks [N, S, S, 1]
uint8. Cases are split by patient, never by slice: slices of one patient are nearly identical,
so a slice-level split would let the test set leak into training. The manifest records which
case went to which split and which rows hold its slices.

Arrays are written case by case into preallocated memory-mapped files, so memory holds one
case at a time whatever the dataset size. Everything is written under temporary names and
renamed when complete; manifest.json is renamed last, so an output folder without a manifest
is incomplete.
"""
import glob
import json
import os
import sys

import nibabel as nib
import numpy as np
import scipy.ndimage
from tqdm import tqdm

import cli
import data
import settings

SETTINGS = ["RAW_DIR", "DATA_DIR", "TRAIN_FRACTION", "SPLIT_SEED", "IMAGE_SIZE", "CROP_SIZE"]
FLAGS = {"RAW_DIR": "--raw-dir", "DATA_DIR": "--out-dir", "TRAIN_FRACTION": "--split",
         "SPLIT_SEED": "--seed"}
LABEL = "seg"
KNOWN_LABELS = {0, 1, 2, 4}  # BraTS 2017-2020: necrotic core, edema, enhancing tumor
MANIFEST = "manifest.json"


class CaseError(Exception):
    """A case that cannot be converted; the message names the file and the problem."""


def find_cases(raw_dir):
    """{case_id: {modality or 'seg': path}} for every folder holding a FLAIR volume named
    after the folder. Missing files are left out here and reported by load_case."""
    cases = {}
    pattern = os.path.join(raw_dir, "**", f"*_{settings.MODALITIES[0]}.nii*")
    for flair_path in sorted(glob.glob(pattern, recursive=True)):
        case_dir = os.path.dirname(flair_path)
        case_id = os.path.basename(case_dir)
        files = {}
        for kind in (*settings.MODALITIES, LABEL):
            matches = glob.glob(os.path.join(case_dir, f"{case_id}_{kind}.nii*"))
            files[kind] = matches[0] if matches else os.path.join(case_dir,
                                                                  f"{case_id}_{kind}.nii.gz")
        cases[case_id] = files
    return cases


def split_cases(case_ids, train_fraction, seed):
    """Shuffles patients with the seed and cuts the list: (train_ids, test_ids). Both splits
    get at least one patient when there are two or more."""
    shuffled = list(np.random.default_rng(seed).permutation(sorted(case_ids)))
    num_train = round(train_fraction * len(shuffled))
    if len(shuffled) >= 2:
        num_train = min(max(num_train, 1), len(shuffled) - 1)
    return sorted(shuffled[:num_train]), sorted(shuffled[num_train:])


def read_volume(path):
    """A 3-D float32 volume from a NIfTI file, or CaseError naming the file and the problem."""
    if not os.path.exists(path):
        raise CaseError(f"{path}: file not found")
    try:
        volume = np.asarray(nib.load(path).dataobj, dtype=np.float32)
    except Exception as error:  # nibabel and gzip raise many types for damaged files
        raise CaseError(f"{path}: unreadable NIfTI ({type(error).__name__}: {error})") from error
    if volume.ndim != 3:
        raise CaseError(f"{path}: expected a 3-D volume, got shape {volume.shape}")
    if not np.isfinite(volume).all():
        raise CaseError(f"{path}: contains NaN or infinite voxels")
    return volume


def load_case(files):
    """(image [X, Y, Z, 4], label [X, Y, Z] or None) of one case; every volume is checked."""
    channels = [read_volume(files[modality]) for modality in settings.MODALITIES]
    label = read_volume(files[LABEL]) if files.get(LABEL) else None
    for kind, volume in zip((*settings.MODALITIES, LABEL), (*channels, label)):
        if volume is not None and volume.shape != channels[0].shape:
            raise CaseError(f"{files[kind]}: shape {volume.shape} differs from "
                            f"{files[settings.MODALITIES[0]]} {channels[0].shape}")
    if label is not None:
        unknown = set(np.unique(label).astype(int).tolist()) - KNOWN_LABELS
        if unknown:
            raise CaseError(f"{files[LABEL]}: label values {sorted(unknown)} outside the "
                            f"known set {sorted(KNOWN_LABELS)}")
    return np.stack(channels, axis=-1), label


def normalize(image):
    """Z-scores each modality over the brain (voxels non-zero in any modality), because MRI
    intensities have no absolute scale: they differ between scanners, cases and modalities.
    The background stays 0."""
    brain = image.any(axis=-1)
    normalized = np.zeros_like(image)
    for channel in range(image.shape[-1]):
        values = image[..., channel][brain]
        std = values.std() if values.size else 0.0
        normalized[..., channel][brain] = (values - values.mean()) / (std or 1.0)
    return normalized


def to_slices(volume, crop_size, image_size, order):
    """[X, Y, Z, C] -> [Z, S, S, C]: centre-crops each axial slice to crop_size (the BraTS
    brain sits in the middle of a 240x240 grid with empty margins) and resamples it to
    image_size with spline interpolation of the given order (0, nearest, for labels)."""
    height, width = volume.shape[:2]
    crop = min(crop_size, height, width)
    top, left = (height - crop) // 2, (width - crop) // 2
    cropped = volume[top:top + crop, left:left + crop]
    factor = image_size / crop
    resampled = scipy.ndimage.zoom(cropped, (factor, factor, 1, 1), order=order,
                                   grid_mode=True, mode="nearest")
    return np.ascontiguousarray(resampled.transpose(2, 0, 1, 3))


def preprocess_case(image, label, crop_size, image_size):
    """Model-ready (imgs [Z, S, S, 4] float32, msks [Z, S, S, 1] uint8 or None)."""
    imgs = to_slices(normalize(image), crop_size, image_size, order=1).astype(np.float32)
    if label is None:
        return imgs, None
    whole_tumor = (label > 0).astype(np.uint8)[..., np.newaxis]
    return imgs, to_slices(whole_tumor, crop_size, image_size, order=0)


class SliceArrayWriter:
    """Appends slices to a preallocated memory-mapped .npy under a temporary name; finish()
    trims unused rows (cases that failed after allocation) and renames it into place."""

    def __init__(self, path, capacity, row_shape, dtype):
        self.path, self.rows = path, 0
        self.partial_path = path.replace(".npy", ".partial.npy")
        self.array = np.lib.format.open_memmap(self.partial_path, mode="w+", dtype=dtype,
                                               shape=(capacity, *row_shape))

    def append(self, rows):
        self.array[self.rows:self.rows + len(rows)] = rows
        self.rows += len(rows)

    def discard(self):
        del self.array
        os.remove(self.partial_path)

    def finish(self):
        self.array.flush()
        if self.rows < len(self.array):
            trimmed_path = self.path.replace(".npy", ".trimmed.npy")
            trimmed = np.lib.format.open_memmap(trimmed_path, mode="w+", dtype=self.array.dtype,
                                                shape=(self.rows, *self.array.shape[1:]))
            trimmed[:] = self.array[:self.rows]
            trimmed.flush()
            del trimmed
            os.replace(trimmed_path, self.partial_path)
        del self.array
        os.replace(self.partial_path, self.path)


def convert_split(split, case_ids, cases, args, skipped):
    """Fills temporary imgs_<split>.npy and msks_<split>.npy; returns the manifest entries
    and the two writers, which the caller finishes (or discards) when every split is done."""
    num_slices = {}
    for case_id in case_ids:  # header-only: sizes the arrays without reading voxels
        try:
            num_slices[case_id] = nib.load(cases[case_id][settings.MODALITIES[0]]).shape[2]
        except Exception as error:
            skipped.append({"case": case_id, "error": f"{cases[case_id][settings.MODALITIES[0]]}: {error}"})
    size = args.IMAGE_SIZE
    imgs_path, msks_path = data.split_paths(args.DATA_DIR, split)
    imgs = SliceArrayWriter(imgs_path, sum(num_slices.values()),
                            (size, size, len(settings.MODALITIES)), np.float32)
    msks = SliceArrayWriter(msks_path, sum(num_slices.values()), (size, size, 1), np.uint8)
    entries = []
    for case_id in tqdm(list(num_slices), desc=f"{split:>5} cases", unit="case"):
        try:
            image, label = load_case(cases[case_id])
            if label is None:
                raise CaseError(f"{cases[case_id][LABEL]}: label map missing")
        except CaseError as error:
            tqdm.write(f"WARNING: skipping {case_id}: {error}")
            skipped.append({"case": case_id, "error": str(error)})
            continue
        case_imgs, case_msks = preprocess_case(image, label, args.CROP_SIZE, size)
        entries.append({"case": case_id, "rows": [imgs.rows, imgs.rows + len(case_imgs)],
                        "source": os.path.dirname(cases[case_id][settings.MODALITIES[0]]),
                        "shape": list(image.shape[:3])})
        imgs.append(case_imgs)
        msks.append(case_msks)
    return entries, (imgs, msks)


def write_json_atomically(path, content):
    partial_path = path + ".partial"
    with open(partial_path, "w") as file:
        json.dump(content, file, indent=1)
    os.replace(partial_path, path)


def main(argv=None):
    args = cli.parse(__doc__.splitlines()[0], SETTINGS, argv, flags=FLAGS)
    print(f"Converting BraTS cases\nConfiguration:\n{cli.format_config(args)}")
    cases = find_cases(args.RAW_DIR)
    if not cases:
        sys.exit(f"ERROR: {args.RAW_DIR}: no BraTS case folders found (expected "
                 f"<case>/<case>_{{{','.join(settings.MODALITIES)},seg}}.nii.gz)")
    os.makedirs(args.DATA_DIR, exist_ok=True)
    manifest_path = os.path.join(args.DATA_DIR, MANIFEST)
    if os.path.exists(manifest_path):
        os.remove(manifest_path)  # the folder is incomplete until the new manifest lands

    train_ids, test_ids = split_cases(cases, args.TRAIN_FRACTION, args.SPLIT_SEED)
    skipped, splits, writers = [], {}, []
    for split, ids in (("train", train_ids), ("test", test_ids)):
        splits[split], split_writers = convert_split(split, ids, cases, args, skipped)
        writers.extend(split_writers)

    converted = sum(len(entries) for entries in splits.values())
    print(f"Converted {converted} of {len(cases)} cases "
          f"({len(splits['train'])} train, {len(splits['test'])} test)")
    for case in skipped:
        print(f"  skipped {case['case']}: {case['error']}")
    if converted == 0:
        for writer in writers:
            writer.discard()
        sys.exit(f"ERROR: none of the {len(cases)} cases in {args.RAW_DIR} could be converted; "
                 f"nothing was written")
    for writer in writers:
        writer.finish()
    write_json_atomically(manifest_path, {
        "image_size": args.IMAGE_SIZE, "crop_size": args.CROP_SIZE,
        "modalities": list(settings.MODALITIES), "mask": "whole tumor (label > 0)",
        "train_fraction": args.TRAIN_FRACTION, "split_seed": args.SPLIT_SEED,
        "raw_dir": os.path.abspath(args.RAW_DIR), "splits": splits, "skipped": skipped})
    print(f"Wrote {', '.join(sorted(os.listdir(args.DATA_DIR)))} to {args.DATA_DIR}")


if __name__ == "__main__":
    main()
