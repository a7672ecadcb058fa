"""float32 against mixed_bfloat16: the Dice each reaches and how fast each trains, in one run.

    .venv/bin/python -m bench.precision [--data-dir DIR] [--epochs N] [--json FILE]

Trains the same model twice on the same synthetic BraTS data (or on converted arrays given
with --data-dir), the way `make demo` does (run_multinode.sh: 2 workers on this machine, the
settings.py model and schedule, the same seed), once per precision, and compares the final
and best validation Dice and the training images per second. Target: bfloat16's final
validation Dice within 0.01 of float32's (its speed target, 1.8x, needs AMX; see
bench/training.py for the kernel-level measurement on CPUs without it).
"""
import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import settings

PYTHON = sys.executable
PRECISIONS = ("float32", "mixed_bfloat16")


def run(command):
    """Runs a step of the pipeline, its output shown as it goes."""
    print(f"$ {' '.join(command)}", flush=True)
    subprocess.run(command, cwd=REPO_DIR, check=True,
                   env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))


def synthetic_data(work_dir, num_cases):
    """Synthetic cases as `make demo` makes them, converted to slice arrays."""
    raw_dir, data_dir = os.path.join(work_dir, "raw"), os.path.join(work_dir, "converted")
    run([PYTHON, "synthetic_brats.py", "--raw-dir", raw_dir, "--synthetic-num-cases",
         str(num_cases)])
    run([PYTHON, "converter.py", "--raw-dir", raw_dir, "--data-dir", data_dir])
    return data_dir


def train(data_dir, output_dir, precision, epochs):
    run(["./run_multinode.sh", "--no-preflight", "--", "--data-dir", data_dir,
         "--train-dir", output_dir, "--precision", precision, "--epochs", str(epochs),
         "--early-stopping-patience", "0"])
    with open(os.path.join(output_dir, "training_log.csv")) as file:
        epochs_logged = list(csv.DictReader(file))
    val_dice = [float(row["val_dice"]) for row in epochs_logged]
    images_per_second = [float(row["images_per_second"]) for row in epochs_logged]
    return {"final_val_dice": val_dice[-1], "best_val_dice": max(val_dice),
            "val_dice_per_epoch": val_dice,
            # the first epoch includes tracing and warm-up
            "img_s": max(images_per_second[1:] or images_per_second)}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", help="converted arrays to train on (default: generate "
                                           "--num-cases synthetic cases)")
    parser.add_argument("--num-cases", type=int, default=settings.SYNTHETIC_NUM_CASES)
    parser.add_argument("--epochs", type=int, default=settings.EPOCHS)
    parser.add_argument("--work-dir", help="scratch folder (default: a temporary one)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()

    work_dir = args.work_dir or tempfile.mkdtemp(prefix="bench_precision_")
    data_dir = args.data_dir or synthetic_data(work_dir, args.num_cases)
    results = {precision: train(data_dir, os.path.join(work_dir, precision), precision,
                                args.epochs)
               for precision in PRECISIONS}
    float32, bfloat16 = (results[precision] for precision in PRECISIONS)
    results["final_val_dice_difference"] = bfloat16["final_val_dice"] - float32["final_val_dice"]
    results["bf16_over_fp32_img_s"] = bfloat16["img_s"] / float32["img_s"]

    print(f"\n{'precision':<16} {'final val Dice':>15} {'best val Dice':>14} {'img/s':>8}")
    for precision in PRECISIONS:
        figures = results[precision]
        print(f"{precision:<16} {figures['final_val_dice']:15.4f} "
              f"{figures['best_val_dice']:14.4f} {figures['img_s']:8.1f}")
    difference = results["final_val_dice_difference"]
    print(f"\nbfloat16 - float32 final validation Dice: {difference:+.4f} "
          f"(target: within 0.01: {'met' if abs(difference) <= 0.01 else 'MISSED'})")
    print(f"bfloat16 / float32 images per second: {results['bf16_over_fp32_img_s']:.2f}")
    if args.json:
        with open(args.json, "w") as file:
            json.dump(results, file, indent=2)
        print(f"Wrote {args.json}")


if __name__ == "__main__":
    main()
