"""Converts a BraTS release (NIfTI volumes) into the slice arrays training and inference read.

    python converter.py --raw-dir DIR --data-dir DIR [--train-fraction 0.85] [--split-seed N]

It detects the release's layout (brainseg/layouts.py: BraTS 2017-2023 or the Decathlon task),
reads every case, prepares its axial slices (brainseg/preprocessing.py) and writes the image
and mask arrays of a training and a test split, and their manifest, to the data folder
(brainseg/dataset.py describes the files).

Cases are split by patient, never by slice: slices of one patient are nearly identical, so a
slice-level split would leak the test set into training. A release without label maps
(validation data) converts images only, all into the test split.

Memory stays bounded whatever the release size: cases are read by worker processes
(a bounded number in flight) and appended to the .npy files in case order, so the output is
byte-for-byte the same for any number of workers. The whole dataset is written into a hidden
staging folder beside the data folder, manifest.json last, and swapped in when complete
(brainseg/folders.py): until then the previous dataset stays whole and readable, and a run
killed midway leaves it untouched. The data folder is locked while converting, and must not
overlap the release.
"""
import collections
import dataclasses
import os
import sys

import numpy as np
from tqdm import tqdm

from brainseg import case_processes, cli, dataset, folders, hardware, layouts, preprocessing

SETTINGS = ["RAW_DIR", "DATA_DIR", "TRAIN_FRACTION", "SPLIT_SEED", "LAYOUT", "IMAGE_SIZE",
            "CROP_SIZE", "CROP_MODE", "SLICE_POLICY", "LABEL_MODE", "IMAGE_DTYPE",
            "CONVERT_WORKERS", "CASE_TIMEOUT_SECONDS", "STRICT"]
# Earlier spellings of the flags, still accepted (the README used them).
ALIASES = {"DATA_DIR": ["--out-dir"], "TRAIN_FRACTION": ["--split"], "SPLIT_SEED": ["--seed"],
           "CONVERT_WORKERS": ["--workers"]}
HELP = {"LAYOUT": "auto, " + ", ".join(layouts.LAYOUTS), "CROP_MODE": "center or brain_box",
        "SLICE_POLICY": "brain or all", "LABEL_MODE": "whole_tumor or regions",
        "IMAGE_DTYPE": "float16 or float32", "CONVERT_WORKERS": "0 = one per core",
        "CASE_TIMEOUT_SECONDS": "0 = no limit",
        "STRICT": "fail when any case is skipped"}


def split_cases(case_ids, train_fraction, seed):
    """Shuffles patients with the seed and cuts the list: (train_ids, test_ids). Both splits
    get at least one patient when there are two or more."""
    shuffled = list(np.random.default_rng(seed).permutation(sorted(case_ids)))
    num_train = round(train_fraction * len(shuffled))
    if len(shuffled) >= 2:
        num_train = min(max(num_train, 1), len(shuffled) - 1)
    return sorted(shuffled[:num_train]), sorted(shuffled[num_train:])


def prepare_case(case, options):
    """Worker task: (imgs, msks, geometry) of one case, or why it is skipped."""
    try:
        image, labels = layouts.read_case(case)
        return preprocessing.preprocess_case(image, labels, options)
    except layouts.CaseError as error:
        return str(error)
    except MemoryError:
        return "not enough memory to read and prepare it"


# Cases in a row lost at the time limit, also when retried alone, after which the conversion
# stops: every read of a release on a stalled network filesystem hangs, and each further case
# would cost the limit twice (at 600 s, 200 cases take days to be skipped one by one).
STALLED_AFTER_CASES = 3


class StallGuard:
    """Counts the cases in a row that the time limit took, across the header and preparation
    passes, and stops the conversion (ValueError: main reports it, the staging folder goes,
    the previous dataset stays) when they reach STALLED_AFTER_CASES."""

    def __init__(self, timeout):
        self.timeout, self.lost_in_a_row = timeout, []

    def record(self, case, timed_out):
        self.lost_in_a_row = self.lost_in_a_row + [case.case_id] if timed_out else []
        if len(self.lost_in_a_row) >= STALLED_AFTER_CASES:
            folder = os.path.dirname(os.path.abspath(case.images[layouts.MODALITIES[0]]))
            raise ValueError(
                f"{len(self.lost_in_a_row)} cases in a row ({', '.join(self.lost_in_a_row)}) "
                f"were not read within {self.timeout:g} s (--case-timeout-seconds), also when "
                f"retried alone: is the filesystem of {os.path.dirname(folder)} stalled? "
                f"Stopping; nothing was written")


WORKER_DIED = ("the worker process {doing} died (killed, by the out-of-memory killer or a "
               "signal), also when it was retried alone")


def retry_warning(doing, timeout):
    """ordered_map's on_retry: a warning naming the case, what its worker was doing and why
    it is retried."""
    def warn(case, lost):
        what = f"took more than {timeout:g} s" if lost is case_processes.TIMED_OUT else "died"
        tqdm.write(f"WARNING: the worker process {doing} {case.case_id} {what}; "
                   f"retrying it alone")
    return warn


def prepared_cases(cases, options, workers, timeout, stalls=None):
    """Yields (case, result of prepare_case) in case order, the cases prepared by `workers`
    worker processes (brainseg/case_processes.py), a bounded number in flight. A case whose
    worker is killed midway, or takes more than `timeout` seconds (0: no limit), is retried
    once, alone; when that happens again it is skipped with the reason. stalls: a StallGuard
    told of every case."""
    def prepare(case):
        return prepare_case(case, options)

    stalls = stalls or StallGuard(timeout)
    for case, result in case_processes.ordered_map(
            prepare, cases, workers, retry_warning("preparing", timeout), timeout):
        stalls.record(case, result is case_processes.TIMED_OUT)
        if result is case_processes.DIED:
            result = WORKER_DIED.format(doing="preparing it")
        elif result is case_processes.TIMED_OUT:
            result = (f"not prepared within {timeout:g} s (--case-timeout-seconds), also when "
                      f"retried alone: a file on a stalled network filesystem, a hung worker?")
        yield case, result


def grid(case):
    """Shape and voxel spacing (mm) of a case's scans in the orientation they are sliced in,
    from the header."""
    return layouts.case_grid(case)


def read_grids(cases, workers, timeout, stalls=None):
    """{case ID: grid} of the cases whose header can be read; the others get their problem
    set. The headers are read by worker processes under the same time limit as a case's
    preparation: a header on a stalled network filesystem would otherwise hang the converter
    itself, before any worker starts. stalls: a StallGuard told of every case."""
    def read(case):
        try:
            return grid(case)
        except Exception as error:
            return f"{case.images[layouts.MODALITIES[0]]}: unreadable header ({error})"

    grids, stalls = {}, stalls or StallGuard(timeout)
    readable = [case for case in cases if not case.problem]
    for case, found in case_processes.ordered_map(
            read, readable, workers, retry_warning("reading the header of", timeout), timeout):
        stalls.record(case, found is case_processes.TIMED_OUT)
        if isinstance(found, dict):
            grids[case.case_id] = found
        elif found is case_processes.TIMED_OUT:
            case.problem = (f"{case.images[layouts.MODALITIES[0]]}: header not read within "
                            f"{timeout:g} s (--case-timeout-seconds), also when retried alone")
        elif found is case_processes.DIED:
            case.problem = WORKER_DIED.format(doing="reading its header")
        else:
            case.problem = found
    return grids


def convert_split(split, cases, options, out_dir, workers, with_masks, skipped, timeout,
                  stalls):
    """Fills temporary imgs_<split>.npy (and msks_<split>.npy); returns the manifest entries
    and the writers, which the caller finishes or discards once every split is done."""
    # The output is sized before any voxel is read.
    grids = read_grids(cases, workers, timeout, stalls)
    size = options.image_size
    total = sum(found["shape"][2] for found in grids.values() if found)
    imgs_path, msks_path = dataset.split_paths(out_dir, split)
    writers = [dataset.NpyAppender(imgs_path, total, (size, size, len(layouts.MODALITIES)),
                           options.image_dtype)]
    if with_masks:
        writers.append(dataset.NpyAppender(msks_path, total,
                                           (size, size, len(options.target_names)), np.uint8))
    entries = []
    progress = tqdm(prepared_cases(cases, options, workers, timeout, stalls), total=len(cases),
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


def main(argv=None):
    args = cli.parse(__doc__.splitlines()[0], SETTINGS, argv, HELP, ALIASES)
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
    hardware.keep_freed_memory()  # before the workers fork: they inherit it
    with_masks = any(case.label for case in cases)
    print(f"{len(cases)} cases in the {layout} layout; {workers} worker processes"
          + ("" if with_masks else "; no label maps: images only, all in the test split"))

    try:
        folders.refuse_overlap(args.DATA_DIR, [args.RAW_DIR])
        dataset.check_replaceable(args.DATA_DIR)
        with folders.locked(args.DATA_DIR), folders.staging(args.DATA_DIR) as staged:
            convert(args, layout, cases, options, workers, with_masks, staged)
            folders.swap_in(staged, args.DATA_DIR)
    except (ValueError, folders.FolderBusyError) as error:
        sys.exit(f"ERROR: {error}")
    except OSError as error:  # a full disk, a read-only folder
        sys.exit(f"ERROR: converting into {args.DATA_DIR} failed ({error}); "
                 f"its previous content is unchanged")
    print(f"Wrote {', '.join(sorted(os.listdir(args.DATA_DIR)))} to {args.DATA_DIR}")


def convert(args, layout, cases, options, workers, with_masks, out_dir):
    """Writes the whole dataset into out_dir (a staging folder), manifest last; exits with an
    error, having written nothing that counts, when no case (or with --strict, not every case)
    could be converted."""
    by_id = collections.defaultdict(list)  # duplicated IDs: all copies, all skipped
    for case in cases:
        by_id[case.case_id].append(case)
    if with_masks:
        train_ids, test_ids = split_cases(by_id, args.TRAIN_FRACTION, args.SPLIT_SEED)
    else:
        train_ids, test_ids = [], sorted(by_id)
    skipped, splits, writers = [], {}, []
    stalls = StallGuard(args.CASE_TIMEOUT_SECONDS)
    for split, ids in (("train", train_ids), ("test", test_ids)):
        members = [case for case_id in ids for case in by_id[case_id]]
        splits[split], split_writers = convert_split(split, members, options, out_dir,
                                                     workers, with_masks, skipped,
                                                     args.CASE_TIMEOUT_SECONDS, stalls)
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
                 f"converted{' (--strict)' if converted else ''}; {args.DATA_DIR} is unchanged")
    for writer in writers:
        writer.finish()
    dataset.write_manifest(out_dir, {
        "layout": layout,
        "label_map": {str(k): v for k, v in layouts.LAYOUTS[layout].label_map.items()},
        "internal_labels": {str(k): v for k, v in layouts.INTERNAL_LABELS.items()},
        "modalities": list(layouts.MODALITIES), "targets": list(options.target_names),
        "preprocessing": dataclasses.asdict(options), "has_masks": with_masks,
        "train_fraction": args.TRAIN_FRACTION, "split_seed": args.SPLIT_SEED,
        "raw_dir": os.path.abspath(args.RAW_DIR), "splits": splits, "skipped": skipped})

if __name__ == "__main__":
    main()
