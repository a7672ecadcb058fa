"""Converter memory and speed, measured side by side in one run.

    .venv/bin/python -m bench.converter [--small 20] [--large 80] [--workers N] [--rounds 3]
                                        [--json FILE]

Converts `small` and `large` (4x as many) synthetic full-size cases, `rounds` times over:
  - serially and with N worker processes: peak resident memory of the whole process tree
    must not grow with the number of cases (target: large/small within 10%), and cases/s;
  - with a reimplementation of the seed project's approach (every case in memory as float64,
    every 25 cases the saved arrays reloaded, concatenated and saved again; whole-volume
    preprocessing, bench/whole_volume.py, and gzip decoded by zlib, as the seed did), for
    speed and memory against the same cases.
Ratios are computed within each round (the runs of a round follow one another, so a machine
busy with other work slows them alike) and their median over the rounds is printed: the seed
approach's time over the converter's (target: at least 3x), serial and with N workers.
The synthetic cases are generated once into data/bench/ and reused by later runs.
"""
import argparse
import json
import os
import statistics
import sys

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import numpy as np

from bench import whole_volume
from bench.process_memory import run_sampled
from brainseg import layouts, nifti, preprocessing, synthetic

PYTHON = sys.executable
SEED_BLOCK = 25  # the seed project saved (reloaded, concatenated) every 25 patients


def seed_style_convert(raw_dir, out_dir):
    """The seed project's approach: arrays kept in lists, and every SEED_BLOCK cases the
    saved file reloaded, concatenated with them and saved again. Its cases are read with
    zlib and prepared by whole-volume code (this project's until it was sped up), so the
    baseline stays the seed's when brainseg gets faster."""
    nifti.igzip = None  # nibabel's own gzip reader, as the seed used
    _, cases = layouts.find_cases(raw_dir)
    options = preprocessing.Preprocessing(slice_policy="all", image_dtype="float32")
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "imgs_train.npy")
    if os.path.exists(path):  # a previous run's: not to be concatenated with this run's
        os.remove(path)
    block = []
    for number, case in enumerate(cases, 1):
        imgs, _, _ = whole_volume.preprocess_case(*layouts.read_case(case), options)
        block.append(imgs.astype(np.float64))
        if number % SEED_BLOCK == 0 or number == len(cases):
            saved = [np.load(path)] if os.path.exists(path) else []
            np.save(path, np.concatenate(saved + block))
            block = []


def ensure_cases(root, count, shape):
    """root/all holds `count` synthetic cases (generated once); root/first<count> links the
    first ones, so the small and large runs share cases."""
    all_dir = os.path.join(root, "all")
    have = len(os.listdir(all_dir)) if os.path.isdir(all_dir) else 0
    if have < count:
        synthetic.write_dataset(all_dir, count, seed=99, shape=shape)
    subset = os.path.join(root, f"first{count}")
    if not os.path.isdir(subset):
        os.makedirs(subset)
        for index in range(1, count + 1):
            name = synthetic.case_id(index)
            os.symlink(os.path.join(all_dir, name), os.path.join(subset, name))
    return subset


def measure(label, command, num_cases, round_number):
    seconds, peak, _ = run_sampled(command, cwd=REPO_DIR)
    row = {"run": label, "cases": num_cases, "round": round_number,
           "seconds": round(seconds, 2), "cases_per_second": round(num_cases / seconds, 3),
           "peak_rss_mib": round(peak / 2**20, 1)}
    print(f"  {round_number:>5} {label:<26} {num_cases:>5} {seconds:>9.1f} "
          f"{row['cases_per_second']:>10.2f} {row['peak_rss_mib']:>14.0f}", flush=True)
    return row


def streaming(workers):
    return f"streaming, {workers} worker(s)"


SEED = "seed project's approach"


def median_ratio(rows, numerator, denominator, key):
    """The median over rounds of numerator's `key` / denominator's, each pair from one
    round; numerator and denominator are (run label, cases)."""
    def value(label, cases, round_number):
        return next(row[key] for row in rows if (row["run"], row["cases"], row["round"])
                    == (label, cases, round_number))
    rounds = sorted({row["round"] for row in rows})
    return round(statistics.median(value(*numerator, r) / value(*denominator, r)
                                   for r in rounds), 3)


def summarize(rows, args):
    """The ratios the converter's targets are about, each the median over the rounds."""
    summary = {}
    for workers in sorted({1, args.workers}):
        summary[f"memory_ratio_{workers}_workers"] = median_ratio(
            rows, (streaming(workers), args.large), (streaming(workers), args.small),
            "peak_rss_mib")
    summary["parallel_speedup"] = median_ratio(
        rows, (streaming(1), args.large), (streaming(args.workers), args.large), "seconds")
    if not args.skip_seed_style:
        summary["seed_style_memory_ratio"] = median_ratio(
            rows, (SEED, args.large), (SEED, args.small), "peak_rss_mib")
        summary["speedup_vs_seed_style_serial"] = median_ratio(
            rows, (SEED, args.large), (streaming(1), args.large), "seconds")
        summary["speedup_vs_seed_style"] = median_ratio(
            rows, (SEED, args.large), (streaming(args.workers), args.large), "seconds")
    return summary


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", type=int, default=20)
    parser.add_argument("--large", type=int, default=80)
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work-dir", default=os.path.join(REPO_DIR, "data", "bench"),
                        help="cases are generated here once; use a new folder for a new --shape")
    parser.add_argument("--shape", type=int, nargs=3, default=[240, 240, 155])
    parser.add_argument("--skip-seed-style", action="store_true")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()

    print(f"Preparing {args.large} synthetic cases in {args.work_dir} (once)")
    raw = {count: ensure_cases(os.path.join(args.work_dir, "raw"), count, tuple(args.shape))
           for count in (args.large, args.small)}
    out_dir = os.path.join(args.work_dir, "out")
    print(f"\n  {'round':>5} {'run':<26} {'cases':>5} {'seconds':>9} {'cases/s':>10} "
          f"{'peak RSS MiB':>14}")
    rows = []
    for round_number in range(1, args.rounds + 1):
        for count in (args.small, args.large):
            for workers in sorted({1, args.workers}):
                rows.append(measure(streaming(workers),
                                    [PYTHON, "converter.py", "--raw-dir", raw[count],
                                     "--data-dir", out_dir, "--convert-workers", str(workers),
                                     "--slice-policy", "all"], count, round_number))
            if not args.skip_seed_style:
                rows.append(measure(SEED, [PYTHON, "-m", "bench.converter", "--seed-style",
                                           raw[count], os.path.join(args.work_dir, "seed_out")],
                                    count, round_number))
    summary = summarize(rows, args)
    print(f"\nMedians over {args.rounds} rounds of ratios measured within a round "
          f"({args.large} cases; memory: {args.large} against {args.small} cases, target "
          f"within 10%; speedup: the seed approach's time over the converter's, target 3x):")
    for name, value in summary.items():
        print(f"  {name:<32} {value}")
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"runs": rows, "summary": summary}, file, indent=1)


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--seed-style":
        seed_style_convert(sys.argv[2], sys.argv[3])
    else:
        main()
