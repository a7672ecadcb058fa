"""Accuracy on realistic tumors: the benchmark every change to the training recipe is judged by.

    .venv/bin/python -m bench.accuracy --json runs/bench_accuracy.json [--seed 1]
        [--train-cases 24] [--test-cases 24] [--name NAME] [--trained-dir DIR]
        [--convert-flags "..."] [--train-flags "..."] [--inference-flags "..."]
    .venv/bin/python -m bench.accuracy --table RESULT.json ... [--against REFERENCE.json ...]
        (a markdown table of runs; with --against, each one's paired difference from the
        reference of its seed, and the seeds of one recipe pooled)

Generates realistic synthetic cases (brainseg/phantom.py: real brain anatomy, lobulated and
multifocal tumors, thin broken enhancing rims, lower-grade tumors without enhancement,
FLAIR-bright lesions that are not tumor, bias fields, noise, thick slices) for training, and
held-out cases with another seed; converts the training cases and trains on them the way the
README tells a user to (converter.py, then run_multinode.sh: 2 workers on this machine, the
documented defaults of settings.py); segments the held-out NIfTI cases with
`inference.py --input`; and reports, per region, the mean and median Dice and HD95 over the
held-out cases, the worst case, the training time and images per second, and the tumor
core's mean Dice on the high-grade and the lower-grade cases (no enhancing tumor) apart.

The seed fixes the cases, the split, the initial weights and the batches; inference on a
trained model reproduces every figure, but training repeated on the same data differed in
the 4th decimal of its first-epoch loss (README), so small differences may be noise.
Everything is kept in --work-dir and reused by the next run with the same seed, case counts,
flags and settings.py defaults: an ablation of --inference-flags alone (post-processing,
test-time flips) costs only its inference, since train_horovod.py returns at once on a finished run
(the training time reported is then the one logged when it trained). The held-out cases are
keyed apart from the training: case k of a seed is the same whatever their number, and
--trained-dir scores a model trained earlier (for one, on fewer held-out cases).

24 held-out cases by default: with 8 (until 2026-11-27), the tumor-core Dice of one recipe
differed by 0.13 between the two seeds' case sets; with 24, by 0.06. --against pairs two
recipes on the same cases, which cancels the cases' own difficulty.
"""
import argparse
import ast
import csv
import hashlib
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import time

import numpy as np

from brainseg import atomic, layouts, metrics

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable
REGIONS = ("whole_tumor", "tumor_core", "enhancing_tumor")


def run(command):
    """Runs one step of the pipeline from the repository root, its output shown as it goes;
    returns its wall-clock seconds."""
    print(f"$ {shlex.join(command)}", flush=True)
    started = time.perf_counter()
    subprocess.run(command, cwd=REPO_DIR, check=True,
                   env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    return time.perf_counter() - started


def generate(raw_dir, num_cases, seed, phenomena=()):
    """Realistic cases 1..num_cases of `seed` (with these "NAME=VALUE" phenomena), unless a
    complete earlier run left them."""
    done = os.path.join(raw_dir, ".complete")
    if not os.path.exists(done):
        run([PYTHON, "synthetic_brats.py", "--synthetic-kind", "realistic", "--raw-dir", raw_dir,
             "--synthetic-num-cases", str(num_cases), "--synthetic-seed", str(seed),
             *(f"--phenomenon={setting}" for setting in phenomena)])
        open(done, "w").close()
    return raw_dir


def convert(raw_dir, data_dir, convert_flags):
    if not os.path.exists(os.path.join(data_dir, "manifest.json")):
        run([PYTHON, "converter.py", "--raw-dir", raw_dir, "--data-dir", data_dir,
             *convert_flags])
    return data_dir


def train(data_dir, train_dir, seed, train_flags):
    """Trains as the README does (run_multinode.sh on hosts.txt)."""
    run(["./run_multinode.sh", "--no-preflight", "--", "--data-dir", data_dir,
         "--train-dir", train_dir, "--seed", str(seed), *train_flags])


def training_figures(train_dir):
    """The seconds a training run's epochs took, their number, and the median images per
    second of the epochs after the first (which traces graphs), from its training log."""
    with open(os.path.join(train_dir, "training_log.csv")) as file:
        epochs = list(csv.DictReader(file))
    rates = [float(row["images_per_second"]) for row in epochs]
    return (sum(float(row["epoch_seconds"]) for row in epochs), len(epochs),
            statistics.median(rates[1:] or rates))


def segment(test_raw_dir, train_dir, inference_dir, inference_flags):
    """inference.py --input on the held-out release; its per-case rows."""
    seconds = run([PYTHON, "inference.py", "--input", test_raw_dir, "--train-dir", train_dir,
                   "--inference-dir", inference_dir, "--num-figures", "4", "--overwrite",
                   *inference_flags])
    with open(os.path.join(inference_dir, "per_case_metrics.csv")) as file:
        rows = [{key: value if key == "case" else float(value) for key, value in row.items()}
                for row in csv.DictReader(file)]
    return seconds, rows


# metrics.summarize() statistics -> the keys of the results' "regions" entries.
SUMMARY_KEYS = {("dice", "mean"): "dice_mean", ("dice", "median"): "dice_median",
                ("hd95_mm", "mean"): "hd95_mean_mm", ("hd95_mm", "median"): "hd95_median_mm",
                ("lesion_dice", "mean"): "lesion_dice_mean",
                ("lesion_hd95_mm", "mean"): "lesion_hd95_mean_mm",
                ("ranking_lesion_dice", "mean"): "ranking_lesion_dice_mean",
                ("ranking_lesion_hd95_mm", "mean"): "ranking_lesion_hd95_mean_mm"}


def summarize(rows):
    """{region: mean and median Dice and HD95, mean lesion-wise Dice and HD95} over the
    held-out cases, from metrics.summarize (which leaves out the lesion-wise figures of cases
    without a true lesion), and the worst case."""
    regions = [region for region in REGIONS if f"{region}_dice" in rows[0]]
    figures = {region: {} for region in regions}
    for summary in metrics.summarize(rows, regions):
        for (metric, statistic), key in SUMMARY_KEYS.items():
            if summary["metric"] == metric:
                figures[summary["region"]][key] = float(summary[statistic])
    worst = min(rows, key=lambda row: row["whole_tumor_dice"])
    return figures, {"case": worst["case"], "whole_tumor_dice": worst["whole_tumor_dice"],
                     **{f"{region}_dice": worst[f"{region}_dice"] for region in regions}}


ENHANCING = 4  # the internal label of enhancing tumor (layouts.INTERNAL_LABELS)


def lower_grade_cases(release_dir):
    """The IDs of a release's cases whose ground truth has no enhancing tumor: lower-grade
    gliomas, whose tumor core is non-enhancing tumor. Those cores are the ones every recipe
    finds worst (README), and how many of them a seed's held-out cases hold (2 to 9 of 24)
    moves the tumor core's mean more than any recipe did, so it is reported apart."""
    _, cases = layouts.find_cases(release_dir)
    return sorted(case.case_id for case in cases if not (layouts.to_internal_labels(
        layouts.read_volume(case.label)[0], case.layout) == ENHANCING).any())


def core_by_grade(result):
    """{"high_grade" | "lower_grade": (cases, mean tumor-core Dice)} of a result, or None for
    one that did not record its lower-grade cases."""
    if "lower_grade_cases" not in result:
        return None
    lower = set(result["lower_grade_cases"])
    split = {}
    for grade, rows in (("high_grade", [r for r in result["per_case"] if r["case"] not in lower]),
                        ("lower_grade", [r for r in result["per_case"] if r["case"] in lower])):
        dice = [row["tumor_core_dice"] for row in rows]
        split[grade] = (len(dice), float(np.mean(dice)) if dice else math.nan)
    return split


def format_core_by_grade(result):
    split = core_by_grade(result)
    if split is None:
        return "-"
    (high_cases, high), (lower_cases, lower) = split["high_grade"], split["lower_grade"]
    return f"{high:.3f} ({high_cases}) / {lower:.3f} ({lower_cases})"


def markdown_table(results):
    """One row per result file: the recipe, its seed, mean (median) Dice and mean HD95 per
    region, lesion-wise Dice, the worst case, the tumor core's Dice on the high- and
    lower-grade cases apart, and the training time."""
    lines = [("| recipe | seed | WT Dice | TC Dice | ET Dice | WT / TC / ET HD95 (mm) | "
              "lesion-wise Dice WT / TC / ET, package (BraTS 2023 ranking) | worst WT | "
              "TC high- / lower-grade (cases) | train min (img/s) |"),
             "|---|---|---|---|---|---|---|---|---|---|"]
    for result in results:
        regions = result["regions"]
        dice = [f"{regions[r]['dice_mean']:.3f} ({regions[r]['dice_median']:.3f})"
                for r in REGIONS]
        hd95 = " / ".join(f"{regions[r]['hd95_mean_mm']:.1f}" for r in REGIONS)
        lesion = " / ".join(f"{regions[r].get('lesion_dice_mean', math.nan):.3f}"
                            for r in REGIONS)
        ranking = " / ".join(f"{regions[r].get('ranking_lesion_dice_mean', math.nan):.3f}"
                             for r in REGIONS)
        lines.append(f"| {result['name']} | {result['seed']} | {' | '.join(dice)} | {hd95} | "
                     f"{lesion} ({ranking}) | {result['worst_case']['whole_tumor_dice']:.3f} | "
                     f"{format_core_by_grade(result)} | "
                     f"{result['train_seconds'] / 60:.1f} ({result['train_img_s']:.0f}) |")
    return "\n".join(lines)


def read_result(path):
    """A --json result; one written before the lower-grade cases were recorded gets them from
    its held-out folder when that is still there."""
    with open(path) as file:
        result = json.load(file)
    held_out = os.path.join(os.path.dirname(result["train_dir"]),
                            f"held_out_{result['test_cases']}")
    if "lower_grade_cases" not in result and os.path.isdir(held_out):
        result["lower_grade_cases"] = lower_grade_cases(held_out)
    return result


def case_differences(reference, result, region):
    """result's Dice minus reference's, case by case on the same held-out cases (sorted).
    Paired, they cancel what the cases themselves contribute (one case's core found by every
    recipe, another's by none), which dominates the difference between two means on
    different seeds."""
    before = {row["case"]: row[f"{region}_dice"] for row in reference["per_case"]}
    after = {row["case"]: row[f"{region}_dice"] for row in result["per_case"]}
    if before.keys() != after.keys():
        raise ValueError(f"{result['name']} and {reference['name']} were scored on different "
                         f"held-out cases")
    return np.array([after[case] - before[case] for case in sorted(before)])


def bootstrap(differences, resamples=10000):
    """(mean, 2.5th and 97.5th percentiles, cases gained, cases lost) of paired differences,
    the interval from a bootstrap over the cases (seeded: the same numbers every time)."""
    means = np.random.default_rng(0).choice(differences, (resamples, len(differences))).mean(1)
    low, high = np.percentile(means, [2.5, 97.5])
    return differences.mean(), low, high, int((differences > 0).sum()), int((differences < 0).sum())


def held_out_cases(result):
    """What a result's held-out cases are: seed, number and phenomena other than default."""
    return result["seed"], result["test_cases"], result.get("held_out_phenomena", [])


def reference_for(result, references):
    """The reference of result's seed and held-out cases among several (one per seed)."""
    for reference in references:
        if held_out_cases(reference) == held_out_cases(result):
            return reference
    seed, test_cases, phenomena = held_out_cases(result)
    raise ValueError(f"no reference for {result['name']} (seed {seed}, {test_cases} held-out "
                     f"cases{', ' + ' '.join(phenomena) if phenomena else ''})")


def paired_table(references, results):
    """One row per result: its Dice minus the reference of its seed per region, paired on the
    cases; then, for a recipe run on several seeds, a row pooling their cases (the seeds'
    held-out cases are distinct patients), the interval from a bootstrap over all of them."""
    lines = [f"Against {' / '.join(sorted({r['name'] for r in references}))} (seeds "
             f"{', '.join(str(r['seed']) for r in references)}): mean Dice difference "
             f"[95% interval] (cases better / worse)",
             "| recipe | seed | WT | TC | ET |", "|---|---|---|---|---|"]

    def row(name, seeds, differences_of):
        cells = ["{:+.3f} [{:+.3f}, {:+.3f}] ({} / {})".format(*bootstrap(differences_of(region)))
                 for region in REGIONS]
        return f"| {name} | {seeds} | {' | '.join(cells)} |"
    by_name = {}
    for result in results:
        reference = reference_for(result, references)
        by_name.setdefault(result["name"], []).append((reference, result))
        lines.append(row(result["name"], result["seed"],
                         lambda region: case_differences(reference, result, region)))
    for name, pairs in by_name.items():
        if len({result["seed"] for _, result in pairs}) > 1:
            lines.append(row(f"{name}, pooled", " + ".join(str(r["seed"]) for _, r in pairs),
                             lambda region: np.concatenate([case_differences(*pair, region)
                                                            for pair in pairs])))
    return "\n".join(lines)


def flags_key(*flag_lists):
    return hashlib.sha256(json.dumps(flag_lists).encode()).hexdigest()[:10]


def defaults_of(script):
    """The settings.py values a script takes as its defaults (its SETTINGS list, read from
    its source without importing it), folders left out. They are part of the cache keys: a
    changed default (USE_BATCH_NORM once) must not be served data or a model made under the
    old one, which flags alone would have keyed the same."""
    import settings
    with open(os.path.join(REPO_DIR, script)) as file:
        tree = ast.parse(file.read())
    names = next(ast.literal_eval(node.value) for node in tree.body
                 if isinstance(node, ast.Assign)
                 and any(getattr(target, "id", None) == "SETTINGS" for target in node.targets))
    return {name: repr(getattr(settings, name)) for name in names if not name.endswith("_DIR")}


# The code a trained model depends on beyond its flags and settings: a changed network or
# loss (model.py's output prior once) is a new training too.
TRAINING_SOURCES = ("model.py", "data.py", "train_horovod.py", "brainseg/weight_average.py")


def source_digest(paths):
    digest = hashlib.sha256()
    for path in paths:
        with open(os.path.join(REPO_DIR, path), "rb") as file:
            digest.update(file.read())
    return digest.hexdigest()[:10]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--name", default="defaults", help="the recipe's name in the results")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--train-cases", type=int, default=24)
    parser.add_argument("--test-cases", type=int, default=24)
    parser.add_argument("--held-out-phenomenon", action="append", default=[],
                        metavar="NAME=VALUE",
                        help="held-out cases drawn with this phenomenon changed (the same "
                             "patients otherwise), e.g. bias_field_strength=0.3; repeatable")
    parser.add_argument("--convert-flags", default="", help="extra converter.py flags")
    parser.add_argument("--train-flags", default="", help="extra train_horovod.py flags")
    parser.add_argument("--inference-flags", default="", help="extra inference.py flags")
    parser.add_argument("--work-dir", default=os.path.join(REPO_DIR, "data", "bench_accuracy"))
    parser.add_argument("--trained-dir",
                        help="score the model this earlier training run left (its train_* "
                             "folder) instead of training: more held-out cases for a recipe "
                             "already measured; --train-flags then only document it")
    parser.add_argument("--table", nargs="+", metavar="RESULT",
                        help="print a markdown table of earlier --json results, run nothing")
    parser.add_argument("--against", nargs="+", metavar="REFERENCE",
                        help="with --table: also each result's Dice minus the reference of "
                             "its seed, paired case by case (same held-out cases), and a row "
                             "pooling the seeds of each recipe run on several")
    args = parser.parse_args()
    if args.table:
        results = [read_result(path) for path in args.table]
        print(markdown_table(results))
        if args.against:
            print()
            print(paired_table([read_result(path) for path in args.against], results))
        return
    convert_flags, train_flags, inference_flags = (
        shlex.split(flags) for flags in (args.convert_flags, args.train_flags,
                                         args.inference_flags))
    started = time.perf_counter()

    # Data: training and held-out cases from different seeds, kept for the next run. Case k
    # of a seed is the same whatever the number of cases, so more held-out cases score the
    # same trained models on a superset.
    data_key = f"seed{args.seed}_{args.train_cases}"
    train_raw = generate(os.path.join(args.work_dir, data_key, "train_raw"), args.train_cases,
                         args.seed)
    held_out = "_".join([f"held_out_{args.test_cases}", *args.held_out_phenomenon])
    test_raw = generate(os.path.join(args.work_dir, data_key, held_out), args.test_cases,
                        args.seed + 1000, args.held_out_phenomenon)
    convert_recipe = [convert_flags, defaults_of("converter.py")]
    data_dir = convert(train_raw, os.path.join(args.work_dir, data_key,
                                               f"converted_{flags_key(*convert_recipe)}"),
                       convert_flags)

    # The recipe: training for these flags and defaults (reused when it already ran), then
    # inference.
    train_recipe = [*convert_recipe, train_flags, defaults_of("train_horovod.py"),
                    source_digest(TRAINING_SOURCES)]
    train_dir = args.trained_dir or os.path.join(args.work_dir, data_key,
                                                 f"train_{flags_key(*train_recipe)}")
    held_out_key = [args.held_out_phenomenon] if args.held_out_phenomenon else []  # as before
    inference_key = flags_key(*train_recipe, inference_flags, train_dir, *held_out_key)
    inference_dir = os.path.join(args.work_dir, data_key,
                                 f"inference_{args.name}_{args.test_cases}_{inference_key}")
    if not args.trained_dir:
        train(data_dir, train_dir, args.seed, train_flags)
    train_seconds, epochs, img_s = training_figures(train_dir)
    inference_seconds, rows = segment(test_raw, train_dir, inference_dir, inference_flags)
    regions, worst = summarize(rows)

    result = {"name": args.name, "seed": args.seed, "train_cases": args.train_cases,
              "test_cases": args.test_cases,
              "held_out_phenomena": args.held_out_phenomenon, "convert_flags": convert_flags,
              "train_flags": train_flags, "inference_flags": inference_flags,
              "train_dir": train_dir,
              "regions": regions, "worst_case": worst, "epochs": epochs,
              "train_seconds": train_seconds,
              "train_img_s": img_s, "inference_seconds": inference_seconds,
              "total_seconds": time.perf_counter() - started, "per_case": rows,
              "lower_grade_cases": lower_grade_cases(test_raw)}
    print(f"\n{args.name} (seed {args.seed}): {len(rows)} held-out cases; {epochs} epochs "
          f"trained in {train_seconds / 60:.1f} min at {img_s:.1f} img/s")
    print(f"{'region':<16} {'Dice mean':>9} {'median':>7} {'HD95 mean':>10} {'median':>7} "
          f"{'lesion-wise Dice':>17} {'HD95':>7} {'BraTS 2023 ranking':>19} {'HD95':>7}")
    for region, figures in regions.items():
        print(f"{region:<16} {figures['dice_mean']:9.3f} {figures['dice_median']:7.3f} "
              f"{figures['hd95_mean_mm']:8.1f}mm {figures['hd95_median_mm']:5.1f}mm "
              f"{figures.get('lesion_dice_mean', math.nan):17.3f} "
              f"{figures.get('lesion_hd95_mean_mm', math.nan):5.1f}mm "
              f"{figures.get('ranking_lesion_dice_mean', math.nan):19.3f} "
              f"{figures.get('ranking_lesion_hd95_mean_mm', math.nan):5.1f}mm")
    print(f"worst case {worst['case']}: whole-tumor Dice {worst['whole_tumor_dice']:.3f}")
    print(f"tumor-core Dice, high- / lower-grade cases (no enhancing tumor): "
          f"{format_core_by_grade(result)}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        atomic.write_json(args.json, result)
        print(f"Wrote {args.json}")


if __name__ == "__main__":
    main()
