"""Segments the converted test slices with a saved checkpoint and reports whole-tumor Dice.

Standalone: no Horovod, one process. It predicts imgs_test.npy in batches (read through a
memory map, so the test set need not fit in memory), compares with msks_test.npy, and writes
to the output folder:

    metrics.json        mean whole-tumor Dice over test cases and over all slices, slices/s
    per_case_dice.csv   Dice of every test case (its slices from the converter's manifest)
    slice_*.png         FLAIR with ground truth and prediction, for the largest tumors
"""
import csv
import json
import os
import sys
import time

import keras
import matplotlib

matplotlib.use("Agg")  # headless: no display on cluster nodes
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import cli  # noqa: E402
import converter  # noqa: E402
import data  # noqa: E402
import model as unet  # noqa: E402
import settings  # noqa: E402
import threads  # noqa: E402

SETTINGS = ["DATA_DIR", "CHECKPOINT", "INFERENCE_DIR", "INFERENCE_BATCH_SIZE", "NUM_FIGURES",
            "NUM_INTRA_THREADS", "NUM_INTER_THREADS"]
FLAGS = {"INFERENCE_DIR": "--output-dir", "INFERENCE_BATCH_SIZE": "--batch-size"}


def load_checkpoint(path):
    """The trained U-Net, loaded in Keras safe mode (no arbitrary code from the file)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: checkpoint not found; train first with "
                                f"run_multinode.sh or pass --checkpoint")
    try:
        return keras.models.load_model(path, compile=False, safe_mode=True)
    except Exception as error:
        raise ValueError(f"{path}: not a loadable Keras model ({error})") from error


def predict_masks(model, imgs, batch_size):
    """Thresholded predictions [N, H, W, K] uint8, and the seconds the model took."""
    masks = np.empty((*imgs.shape[:3], model.output_shape[-1]), dtype=np.uint8)
    seconds = 0.0
    for start in range(0, len(imgs), batch_size):
        batch = np.asarray(imgs[start:start + batch_size], dtype=np.float32)
        started = time.perf_counter()
        probabilities = model(batch, training=False)
        seconds += time.perf_counter() - started
        masks[start:start + batch_size] = np.asarray(probabilities) > 0.5
    return masks, seconds


def dice(truth, prediction):
    truth, prediction = truth.astype(bool), prediction.astype(bool)
    return unet.dice_from_sums(np.count_nonzero(truth & prediction),
                               np.count_nonzero(truth) + np.count_nonzero(prediction))


def test_cases(data_dir, num_slices):
    """[(case_id, first_row, end_row)] of the test split from the manifest; the whole array
    as one unnamed case when there is no manifest."""
    manifest_path = os.path.join(data_dir, converter.MANIFEST)
    if not os.path.exists(manifest_path):
        print(f"WARNING: {manifest_path} not found: no per-case Dice")
        return [("all_slices", 0, num_slices)]
    with open(manifest_path) as file:
        return [(entry["case"], *entry["rows"]) for entry in json.load(file)["splits"]["test"]]


def save_figure(path, flair, truth, prediction, title):
    """FLAIR alone, then with the ground truth (green) and prediction (red) outlines."""
    figure, axes = plt.subplots(1, 2, figsize=(8, 4.3))
    for ax in axes:
        ax.imshow(flair.T, cmap="gray", origin="lower")
        ax.axis("off")
    for mask, color, label in ((truth, "lime", "ground truth"), (prediction, "red", "prediction")):
        if mask.any():
            axes[1].contour(mask.T, levels=[0.5], colors=color, linewidths=1.2)
        axes[1].plot([], [], color=color, label=label)
    axes[0].set_title("FLAIR")
    axes[1].set_title("whole tumor")
    axes[1].legend(loc="lower right", fontsize=8)
    figure.suptitle(title)
    figure.tight_layout()
    partial_path = path.replace(".png", ".partial.png")
    figure.savefig(partial_path, dpi=100)
    plt.close(figure)
    os.replace(partial_path, path)


def largest_tumor_slices(msks, cases, count):
    """(case, row) of the slice with the most tumor in each of up to `count` cases."""
    areas = msks.reshape(len(msks), -1).sum(axis=1, dtype=np.int64)
    picks = [(case_id, first + int(np.argmax(areas[first:end])))
             for case_id, first, end in cases if end > first]
    picks.sort(key=lambda pick: -areas[pick[1]])
    return picks[:count]


def write_outputs(output_dir, metrics, per_case):
    partial_path = os.path.join(output_dir, "per_case_dice.partial.csv")
    with open(partial_path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=list(per_case[0]))
        writer.writeheader()
        writer.writerows(per_case)
    os.replace(partial_path, os.path.join(output_dir, "per_case_dice.csv"))
    converter.write_json_atomically(os.path.join(output_dir, "metrics.json"), metrics)


def main(argv=None):
    args = cli.parse(__doc__.splitlines()[0], SETTINGS, argv, flags=FLAGS)
    print(f"Inference\nConfiguration:\n{cli.format_config(args)}")
    threads.configure(args.NUM_INTRA_THREADS, args.NUM_INTER_THREADS)
    try:
        model = load_checkpoint(args.CHECKPOINT)
        _, image_size, _, channels = model.input_shape
        imgs, msks = data.load_split(args.DATA_DIR, "test", image_size, channels)
    except (FileNotFoundError, ValueError) as error:
        sys.exit(f"ERROR: {error}")

    predictions, model_seconds = predict_masks(model, imgs, args.INFERENCE_BATCH_SIZE)
    cases = test_cases(args.DATA_DIR, len(imgs))
    per_case = [{"case": case_id, "slices": end - first,
                 "dice": dice(msks[first:end], predictions[first:end]),
                 "true_voxels": int(msks[first:end].sum()),
                 "predicted_voxels": int(predictions[first:end].sum())}
                for case_id, first, end in cases]
    metrics = {
        "whole_tumor_dice_mean_over_cases": float(np.mean([c["dice"] for c in per_case])),
        "whole_tumor_dice_all_slices": dice(msks, predictions),
        "slices_per_second": len(imgs) / model_seconds,
        "num_slices": len(imgs), "num_cases": len(per_case),
        "checkpoint": os.path.abspath(args.CHECKPOINT)}

    os.makedirs(args.INFERENCE_DIR, exist_ok=True)
    for case_id, row in largest_tumor_slices(msks, cases, args.NUM_FIGURES):
        save_figure(os.path.join(args.INFERENCE_DIR, f"slice_{case_id}_{row}.png"),
                    imgs[row, ..., settings.MODALITIES.index("flair")], msks[row, ..., 0],
                    predictions[row, ..., 0],
                    f"{case_id}, row {row}: slice Dice {dice(msks[row], predictions[row]):.3f}")
    write_outputs(args.INFERENCE_DIR, metrics, per_case)

    for case in per_case:
        print(f"  {case['case']:<28} {case['slices']:4d} slices  Dice {case['dice']:.4f}")
    print(f"Whole-tumor Dice: {metrics['whole_tumor_dice_mean_over_cases']:.4f} mean over "
          f"{len(per_case)} test cases, {metrics['whole_tumor_dice_all_slices']:.4f} over all "
          f"{len(imgs)} slices; {metrics['slices_per_second']:.1f} slices/s")
    print(f"Metrics, per-case CSV and pictures in {args.INFERENCE_DIR}")


if __name__ == "__main__":
    main()
