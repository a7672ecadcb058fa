"""Converts a BraTS release (NIfTI volumes) into the slice arrays training and inference read.

    python converter.py --raw-dir DIR --out-dir DIR [--split 0.85] [--seed N]

It detects the release's layout (layouts.py: BraTS 2017-2023 or the Decathlon task), reads
every case, prepares its axial slices (preprocessing.py) and writes to the output folder

    imgs_train.npy  [N, S, S, 4] float16 (or float32): channels in MODALITIES order
    msks_train.npy  [N, S, S, K] uint8: whole tumor, or whole tumor, tumor core, enhancing
    imgs_test.npy, msks_test.npy
    manifest.json   layout and label mapping, preprocessing, which case went to which split,
                    its rows, slices and crop box, and the skipped cases with the reason

Cases are split by patient, never by slice: slices of one patient are nearly identical, so a
slice-level split would leak the test set into training. A release without label maps
(validation data) converts images only, all into the test split.

Memory stays bounded whatever the release size: cases are read by a pool of worker processes
(a bounded number in flight) and appended to the .npy files in case order, so the output is
byte-for-byte the same for any number of workers. Everything is written under temporary names
and renamed when complete, manifest.json last: a folder without a manifest is incomplete.
"""
import collections
import concurrent.futures
import dataclasses
import io
import json
import os
import sys

import nibabel as nib
import numpy as np
from tqdm import tqdm

import atomic
import cli
import layouts
import preprocessing
import settings

SETTINGS = ["RAW_DIR", "DATA_DIR", "TRAIN_FRACTION", "SPLIT_SEED", "LAYOUT", "IMAGE_SIZE",
            "CROP_SIZE", "CROP_MODE", "SLICE_POLICY", "LABEL_MODE", "IMAGE_DTYPE",
            "CONVERT_WORKERS", "STRICT"]
FLAGS = {"RAW_DIR": "--raw-dir", "DATA_DIR": "--out-dir", "TRAIN_FRACTION": "--split",
         "SPLIT_SEED": "--seed", "CONVERT_WORKERS": "--workers"}
HELP = {"LAYOUT": "auto, " + ", ".join(layouts.LAYOUTS), "CROP_MODE": "center or brain_box",
        "SLICE_POLICY": "brain or all", "LABEL_MODE": "whole_tumor or regions",
        "IMAGE_DTYPE": "float16 or float32", "CONVERT_WORKERS": "0 = one per core",
        "STRICT": "fail when any case is skipped"}
MANIFEST = "manifest.json"


def split_cases(case_ids, train_fraction, seed):
    """Shuffles patients with the seed and cuts the list: (train_ids, test_ids). Both splits
    get at least one patient when there are two or more."""
    shuffled = list(np.random.default_rng(seed).permutation(sorted(case_ids)))
    num_train = round(train_fraction * len(shuffled))
    if len(shuffled) >= 2:
        num_train = min(max(num_train, 1), len(shuffled) - 1)
    return sorted(shuffled[:num_train]), sorted(shuffled[num_train:])


def split_paths(data_dir, split):
    """Paths of the image and mask arrays of one split ('train' or 'test')."""
    return (os.path.join(data_dir, f"imgs_{split}.npy"),
            os.path.join(data_dir, f"msks_{split}.npy"))


def prepare_case(case, options):
    """Worker task: (imgs, msks, geometry) of one case, or the CaseError message."""
    try:
        image, labels = layouts.read_case(case)
    except layouts.CaseError as error:
        return str(error)
    return preprocessing.preprocess_case(image, labels, options)


def prepared_cases(cases, options, workers):
    """Yields (case, result of prepare_case) in case order. With several workers at most
    2 x workers cases are in flight, so memory does not grow with the number of cases."""
    if workers <= 1:
        for case in cases:
            yield case, prepare_case(case, options)
        return
    with concurrent.futures.ProcessPoolExecutor(workers) as pool:
        in_flight = collections.deque()
        for case in cases:
            in_flight.append((case, pool.submit(prepare_case, case, options)))
            if len(in_flight) >= 2 * workers:
                case, future = in_flight.popleft()
                yield case, future.result()
        while in_flight:
            case, future = in_flight.popleft()
            yield case, future.result()


class NpyAppender:
    """Appends rows to a .npy file under a temporary name; finish() writes the final row count
    into the header, truncates unused space and renames the file into place.

    Rows are written with ordinary file writes rather than through a memory map: written
    pages then belong to the page cache, not to this process, so its resident memory stays at
    one case whatever the output size (a memory map counts every page it touched)."""

    def __init__(self, path, capacity, row_shape, dtype):
        self.path, self.rows = path, 0
        self.row_shape, self.dtype = tuple(row_shape), np.dtype(dtype)
        self.partial_path = path.replace(".npy", ".partial.npy")
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


def grid(case):
    """Shape and voxel spacing (mm) of a case's scans, from the header."""
    header = nib.load(case.images[settings.MODALITIES[0]]).header
    return {"shape": [int(n) for n in header.get_data_shape()[:3]],
            "spacing": [float(mm) for mm in header.get_zooms()[:3]]}


def convert_split(split, cases, options, out_dir, workers, with_masks, skipped):
    """Fills temporary imgs_<split>.npy (and msks_<split>.npy); returns the manifest entries
    and the writers, which the caller finishes or discards once every split is done."""
    grids = {}  # from the headers alone: the output is sized before any voxel is read
    for case in cases:
        try:
            grids[case.case_id] = grid(case) if not case.problem else None
        except Exception as error:
            grids[case.case_id] = None
            case.problem = f"{case.images[settings.MODALITIES[0]]}: unreadable header ({error})"
    size = options.image_size
    total = sum(found["shape"][2] for found in grids.values() if found)
    imgs_path, msks_path = split_paths(out_dir, split)
    writers = [NpyAppender(imgs_path, total, (size, size, len(settings.MODALITIES)),
                           options.image_dtype)]
    if with_masks:
        writers.append(NpyAppender(msks_path, total, (size, size, len(options.target_names)),
                                   np.uint8))
    entries = []
    progress = tqdm(prepared_cases(cases, options, workers), total=len(cases),
                    desc=f"{split:>5} cases", unit="case")
    for case, result in progress:
        if isinstance(result, str):
            tqdm.write(f"WARNING: skipping {case.case_id}: {result}")
            skipped.append({"case": case.case_id, "error": result})
            continue
        imgs, msks, geometry = result
        first_row = writers[0].rows
        entries.append({"case": case.case_id, "rows": [first_row, first_row + len(imgs)],
                        "images": sorted(set(case.images.values())), "label": case.label,
                        **grids[case.case_id], **geometry})
        writers[0].append(imgs)
        if with_masks:
            writers[1].append(msks)
    return entries, writers


def load_manifest(data_dir):
    """The manifest of a converted folder, or None when there is none."""
    path = os.path.join(data_dir, MANIFEST)
    if not os.path.exists(path):
        return None
    with open(path) as file:
        return json.load(file)


def main(argv=None):
    args = cli.parse(__doc__.splitlines()[0], SETTINGS, argv, HELP, FLAGS)
    print(f"Converting a BraTS release\nConfiguration:\n{cli.format_config(args)}")
    try:
        layout, cases = layouts.find_cases(args.RAW_DIR, args.LAYOUT)
        options = preprocessing.Preprocessing(args.IMAGE_SIZE, args.CROP_SIZE, args.CROP_MODE,
                                              args.SLICE_POLICY, args.LABEL_MODE,
                                              args.IMAGE_DTYPE)
    except (layouts.LayoutError, ValueError) as error:
        sys.exit(f"ERROR: {error}")
    if not cases:
        sys.exit(f"ERROR: {args.RAW_DIR}: a {layout} layout without any case in it")
    workers = args.CONVERT_WORKERS or len(os.sched_getaffinity(0))
    with_masks = any(case.label for case in cases)
    print(f"{len(cases)} cases in the {layout} layout; {workers} worker processes"
          + ("" if with_masks else "; no label maps: images only, all in the test split"))

    os.makedirs(args.DATA_DIR, exist_ok=True)
    manifest_path = os.path.join(args.DATA_DIR, MANIFEST)
    if os.path.exists(manifest_path):
        os.remove(manifest_path)  # the folder is incomplete until the new manifest lands

    by_id = collections.defaultdict(list)  # duplicated IDs: all copies, all skipped
    for case in cases:
        by_id[case.case_id].append(case)
    if with_masks:
        train_ids, test_ids = split_cases(by_id, args.TRAIN_FRACTION, args.SPLIT_SEED)
    else:
        train_ids, test_ids = [], sorted(by_id)
    skipped, splits, writers = [], {}, []
    for split, ids in (("train", train_ids), ("test", test_ids)):
        members = [case for case_id in ids for case in by_id[case_id]]
        splits[split], split_writers = convert_split(split, members, options, args.DATA_DIR,
                                                     workers, with_masks, skipped)
        writers.extend(split_writers)

    converted = sum(len(entries) for entries in splits.values())
    print(f"Converted {converted} of {len(cases)} cases "
          f"({len(splits['train'])} train, {len(splits['test'])} test)")
    for case in skipped:
        print(f"  skipped {case['case']}: {case['error']}")
    if converted == 0 or (args.STRICT and skipped):
        for writer in writers:
            writer.discard()
        sys.exit(f"ERROR: {len(skipped)} of {len(cases)} cases in {args.RAW_DIR} could not be "
                 f"converted{' (--strict)' if converted else ''}; nothing was written")
    for writer in writers:
        writer.finish()
    atomic.write_json(manifest_path, {
        "layout": layout,
        "label_map": {str(k): v for k, v in layouts.LAYOUTS[layout].label_map.items()},
        "internal_labels": {str(k): v for k, v in layouts.INTERNAL_LABELS.items()},
        "modalities": list(settings.MODALITIES), "targets": list(options.target_names),
        "preprocessing": dataclasses.asdict(options), "has_masks": with_masks,
        "train_fraction": args.TRAIN_FRACTION, "split_seed": args.SPLIT_SEED,
        "raw_dir": os.path.abspath(args.RAW_DIR), "splits": splits, "skipped": skipped})
    print(f"Wrote {', '.join(sorted(os.listdir(args.DATA_DIR)))} to {args.DATA_DIR}")


if __name__ == "__main__":
    main()
