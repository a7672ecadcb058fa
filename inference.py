"""Segments brain tumors with a trained checkpoint: converted test arrays or NIfTI cases.

    python inference.py --data-dir DIR --checkpoint FILE --output-dir DIR
    python inference.py --input PATH --checkpoint FILE --output-dir DIR [--probabilities]

Standalone: no Horovod, one process.
  - Test arrays (--data-dir, the default): predicts imgs_test.npy in batches through a memory
    map and scores it against msks_test.npy, case by case from the converter's manifest.
  - NIfTI (--input): a case folder, a release folder of any layout the converter reads, or
    one 4-D file. Each case goes through the converter's own preprocessing, the predictions
    are put back on the original grid, and <case>_seg.nii.gz is written with the scan's
    shape, affine and header, labels in the convention of the input release. Cases with a
    label map are scored; cases without (validation data) are only segmented.
Written to --output-dir: per_case_metrics.csv (Dice, HD95 in mm, sensitivity, specificity
per region), summary_metrics.csv (mean, median, std), metrics.json, a PNG montage per scored
case, dice_distribution.png. Files are written atomically and never overwritten unless
--overwrite is given.
"""
import csv
import os
import sys
import time

import keras
import matplotlib

matplotlib.use("Agg")  # headless: no display on cluster nodes
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402

import atomic  # noqa: E402
import cli  # noqa: E402
import converter  # noqa: E402
import data  # noqa: E402
import layouts  # noqa: E402
import metrics  # noqa: E402
import model as unet  # noqa: E402
import preprocessing  # noqa: E402
import settings  # noqa: E402
import threads  # noqa: E402

SETTINGS = ["DATA_DIR", "CHECKPOINT", "INFERENCE_DIR", "INFERENCE_BATCH_SIZE",
            "INFERENCE_PRECISION", "NUM_FIGURES", "NUM_INTRA_THREADS", "NUM_INTER_THREADS"]
FLAGS = {"INFERENCE_DIR": "--output-dir", "INFERENCE_BATCH_SIZE": "--batch-size",
         "INFERENCE_PRECISION": "--precision"}
HELP = {"DATA_DIR": "converted arrays; with --input, only its manifest's preprocessing is used",
        "INFERENCE_PRECISION": "auto, float32 or mixed_bfloat16",
        "NUM_FIGURES": "montages of at most this many cases; 0: all"}
FLAIR = settings.MODALITIES.index("flair")


class InferenceError(Exception):
    """A problem with the checkpoint or the inputs; the message names the file."""


# --- Model -------------------------------------------------------------------------------------

def load_checkpoint(path):
    """The trained U-Net, loaded in Keras safe mode (no arbitrary code from the file)."""
    if not os.path.exists(path):
        raise InferenceError(f"{path}: checkpoint not found; train first with "
                             f"run_multinode.sh or pass --checkpoint")
    try:
        return keras.models.load_model(path, compile=False, safe_mode=True)
    except Exception as error:
        raise InferenceError(f"{path}: not a loadable Keras model ({error})") from error


def with_precision(model, precision):
    """The model computing in the given precision: a bfloat16 copy sharing the weights
    (about 3x faster on CPUs with AMX-BF16), the output layer kept in float32."""
    policy = unet.resolve_precision(precision)
    if policy == model.layers[1].dtype_policy.name:
        return model

    def clone_layer(layer):
        config = layer.get_config()
        if layer.name != model.layers[-1].name and not isinstance(layer, keras.layers.InputLayer):
            config["dtype"] = policy
        return layer.__class__.from_config(config)
    clone = keras.models.clone_model(model, clone_function=clone_layer)
    clone.set_weights(model.get_weights())
    return clone


def check_fits(model, checkpoint, image_size, channels, what):
    """InferenceError unless the model takes slices of this size and channel count."""
    _, model_size, _, model_channels = model.input_shape
    if (model_size, model_channels) != (image_size, channels):
        raise InferenceError(f"{checkpoint}: trained on {model_size}x{model_size} slices with "
                             f"{model_channels} channels, but {what} has {image_size}x"
                             f"{image_size} with {channels}")


def predict(model, imgs, batch_size):
    """Probabilities [N, S, S, K] float32, and the seconds the model took."""
    probabilities = np.empty((*imgs.shape[:3], model.output_shape[-1]), np.float32)
    seconds = 0.0
    for start in range(0, len(imgs), batch_size):
        batch = np.asarray(imgs[start:start + batch_size], dtype=np.float32)
        started = time.perf_counter()
        probabilities[start:start + batch_size] = model.predict_on_batch(batch)
        seconds += time.perf_counter() - started
    return probabilities, seconds


# --- Outputs ---------------------------------------------------------------------------------

class OutputFolder:
    """Atomic writes into the output folder, refusing to replace an existing file unless
    overwrite is set."""

    def __init__(self, folder, overwrite):
        self.folder, self.overwrite = folder, overwrite
        os.makedirs(folder, exist_ok=True)

    def write(self, name, save):
        """Calls save(temporary_path), then renames the result to name."""
        path = os.path.join(self.folder, name)
        if os.path.exists(path) and not self.overwrite:
            raise InferenceError(f"{path}: exists; pass --overwrite to replace it")
        return atomic.replace_atomically(path, save)

    def csv(self, name, rows):
        def save(path):
            with open(path, "w", newline="") as file:
                writer = csv.DictWriter(file, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
        return self.write(name, save)

    def json(self, name, content):
        return self.write(name, lambda path: atomic.dump_json(path, content))

    def figure(self, name, figure):
        path = self.write(name, lambda partial_path: figure.savefig(partial_path, dpi=90))
        plt.close(figure)
        return path


def wants_montage(scored_before, num_figures):
    return num_figures == 0 or scored_before < num_figures


def montage(flair, truth, prediction, title, count=4):
    """A figure of `count` axial slices through the tumor: FLAIR with the ground truth
    (green) and prediction (red) outlined. Arrays are [slices, H, W]."""
    tumor = np.flatnonzero((truth | prediction).any(axis=(1, 2)) if truth is not None
                           else prediction.any(axis=(1, 2)))
    picks = tumor[np.linspace(0, len(tumor) - 1, count).round().astype(int)] if len(tumor) \
        else np.linspace(0, len(flair) - 1, count).round().astype(int)
    figure, axes = plt.subplots(1, count, figsize=(3 * count, 3.3))
    for ax, index in zip(np.atleast_1d(axes), picks):
        ax.imshow(flair[index].T, cmap="gray", origin="lower")
        for mask, color in ((truth, "lime"), (prediction, "red")):
            if mask is not None and mask[index].any():
                ax.contour(mask[index].T, levels=[0.5], colors=color, linewidths=1)
        ax.set_title(f"slice {index}", fontsize=9)
        ax.axis("off")
    figure.suptitle(f"{title}   (green: ground truth, red: prediction)", fontsize=10)
    figure.tight_layout()
    return figure


def dice_distribution(rows, regions):
    """One figure for the run: the per-case Dice of every region, box plot and points."""
    figure, ax = plt.subplots(figsize=(2 + 1.6 * len(regions), 3.5))
    values = [[row[f"{region}_dice"] for row in rows] for region in regions]
    ax.boxplot(values, showfliers=False)
    for position, region_values in enumerate(values, 1):
        ax.scatter(np.full(len(region_values), position), region_values, s=12, alpha=0.6)
    ax.set_xticks(range(1, len(regions) + 1), [r.replace("_", " ") for r in regions])
    ax.set_ylabel("Dice")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"Per-case Dice, {len(rows)} cases")
    figure.tight_layout()
    return figure


def whole_tumor_scores(row):
    return (f"whole-tumor Dice {row['whole_tumor_dice']:.4f}  "
            f"HD95 {row['whole_tumor_hd95_mm']:.1f} mm")


def score_case(case_id, num_slices, truth, prediction, regions, spacing):
    """A per-case metrics row: every metric of every region (channel k of the [..., K]
    masks), on a grid of the given voxel spacing in mm."""
    row = {"case": case_id, "slices": num_slices}
    for k, region in enumerate(regions):
        scores = metrics.region_metrics(truth[..., k], prediction[..., k], spacing)
        row.update({f"{region}_{name}": value for name, value in scores.items()})
    return row


def report(output, rows, regions, extra):
    """Writes the CSVs, metrics.json and the distribution figure; prints the summary."""
    summary = metrics.summarize(rows, regions)
    output.csv("per_case_metrics.csv", rows)
    output.csv("summary_metrics.csv", summary)
    output.figure("dice_distribution.png", dice_distribution(rows, regions))
    means = {f"{s['region']}_{s['metric']}_mean": s["mean"] for s in summary}
    output.json("metrics.json", {**means, **extra, "num_cases": len(rows)})
    print(f"\n{'region':<16} {'metric':<12} {'mean':>8} {'median':>8} {'std':>8}")
    for s in summary:
        print(f"{s['region']:<16} {s['metric']:<12} {s['mean']:8.4f} {s['median']:8.4f} "
              f"{s['std']:8.4f}")


# --- Mode 1: converted test arrays --------------------------------------------------------

def slice_grid_spacing(entry, options):
    """(slice thickness, pixel, pixel) in mm of a case's resampled slices."""
    x_mm, y_mm, z_mm = entry.get("spacing", [1.0, 1.0, 1.0])
    scale = entry["crop_box"][2] / options.image_size  # crop side / resampled side
    return (z_mm, x_mm * scale, y_mm * scale)


def infer_arrays(model, args, output):
    manifest = converter.load_manifest(args.DATA_DIR)
    if manifest is None:
        raise InferenceError(f"{os.path.join(args.DATA_DIR, converter.MANIFEST)}: not found; "
                             f"the per-case scores need the converter's manifest")
    options = preprocessing.Preprocessing(**manifest["preprocessing"])
    imgs, msks = data.load_split(args.DATA_DIR, "test")
    imgs_path = converter.split_paths(args.DATA_DIR, "test")[0]
    check_fits(model, args.CHECKPOINT, imgs.shape[1], imgs.shape[3], imgs_path)
    probabilities, seconds = predict(model, imgs, args.INFERENCE_BATCH_SIZE)
    predictions = probabilities > 0.5
    regions = options.target_names
    rows = []
    for number, entry in enumerate(manifest["splits"]["test"]):
        first, end = entry["rows"]
        truth, prediction = msks[first:end].astype(bool), predictions[first:end]
        row = score_case(entry["case"], end - first, truth, prediction, regions,
                         slice_grid_spacing(entry, options))
        rows.append(row)
        print(f"  {entry['case']:<28} {row['slices']:4d} slices  {whole_tumor_scores(row)}")
        if wants_montage(number, args.NUM_FIGURES):
            output.figure(f"{entry['case']}_montage.png", montage(
                np.asarray(imgs[first:end, ..., FLAIR], np.float32), truth[..., 0],
                prediction[..., 0], entry["case"]))
    pooled_dice = metrics.dice(msks[..., 0], predictions[..., 0])
    mean_dice = float(np.mean([row["whole_tumor_dice"] for row in rows]))
    report(output, rows, regions, {
        "whole_tumor_dice_mean_over_cases": mean_dice,
        "whole_tumor_dice_all_slices": pooled_dice, "slices_per_second": len(imgs) / seconds,
        "num_slices": len(imgs), "checkpoint": os.path.abspath(args.CHECKPOINT)})
    print(f"Whole-tumor Dice: {mean_dice:.4f} mean over "
          f"{len(rows)} test cases, {pooled_dice:.4f} over all {len(imgs)} slices; "
          f"{len(imgs) / seconds:.1f} slices/s")


# --- Mode 2: NIfTI cases ---------------------------------------------------------------------

def input_cases(path):
    """[Case] for a release folder, one case folder, or one 4-D NIfTI file."""
    if os.path.isfile(path):
        case_id = os.path.basename(path).split(".nii")[0]
        return [layouts.Case(case_id, "msd", {m: path for m in settings.MODALITIES})]
    try:
        return layouts.find_cases(path)[1]
    except layouts.LayoutError:  # not a release: perhaps one case folder inside one
        parent, name = os.path.split(os.path.normpath(path))
        cases = [case for case in layouts.find_cases(parent)[1] if case.case_id == name]
        if not cases:
            raise
        return cases


def release_labels(masks, label_mode, layout):
    """Target channels [X, Y, Z, K] -> one label map in the release's convention. Regions
    are nested (enhancing within core within whole tumor), so each voxel takes the label of
    the innermost region predicted there. A whole-tumor model writes 1 for tumor."""
    if label_mode == "whole_tumor":
        return masks[..., 0].astype(np.uint8)
    whole_tumor, core, enhancing = (masks[..., k] for k in range(3))
    internal = np.zeros(masks.shape[:3], np.uint8)
    internal[whole_tumor | core | enhancing] = 2
    internal[core | enhancing] = 1
    internal[enhancing] = 4
    to_release = np.zeros(max(layouts.INTERNAL_LABELS) + 1, np.uint8)
    for release_label, internal_label in layouts.LAYOUTS[layout].label_map.items():
        to_release[internal_label] = release_label
    return to_release[internal]


def nifti_like(volume, reference):
    """A NIfTI of `volume` on the reference scan's grid: same affine and header fields."""
    header = reference.header.copy()
    header.set_data_shape(volume.shape)
    header.set_data_dtype(volume.dtype)
    image = nib.Nifti1Image(volume, reference.affine, header)
    image.set_qform(*reference.get_qform(coded=True))
    image.set_sform(*reference.get_sform(coded=True))
    return image


def segment_case(model, case, options, args, output):
    """Segments one case and writes its NIfTI. Returns its metrics row and the [slice, H, W]
    FLAIR, truth and prediction for a montage; (None, None) for a case without labels."""
    image, labels = layouts.read_case(case)
    imgs, _, geometry = preprocessing.preprocess_case(image, None, options)
    check_fits(model, args.CHECKPOINT, options.image_size, image.shape[3],
               case.images[settings.MODALITIES[0]])
    slice_probabilities, seconds = predict(model, imgs, args.INFERENCE_BATCH_SIZE)
    probabilities = np.zeros((*image.shape[:3], slice_probabilities.shape[-1]), np.float32)
    probabilities[:, :, geometry["slices"]] = preprocessing.from_slices(
        slice_probabilities, geometry["crop_box"], image.shape[:2], order=1)
    masks = probabilities > 0.5

    reference = layouts.reference_image(case)
    segmentation = release_labels(masks, options.label_mode, case.layout)
    output.write(f"{case.case_id}_seg.nii.gz",
                 lambda path: nib.save(nifti_like(segmentation, reference), path))
    if args.probabilities:
        squeezed = probabilities[..., 0] if probabilities.shape[-1] == 1 else probabilities
        output.write(f"{case.case_id}_probabilities.nii.gz",
                     lambda path: nib.save(nifti_like(squeezed, reference), path))
    print(f"  {case.case_id:<28} {len(imgs):4d} slices in {seconds:.2f} s", end="")
    if labels is None:
        print("  (no label map: not scored)")
        return None, None
    truth = preprocessing.targets(labels, options.label_mode).astype(bool)
    row = score_case(case.case_id, len(imgs), truth, masks, options.target_names,
                     reference.header.get_zooms()[:3])
    print(f"  {whole_tumor_scores(row)}")
    return row, (np.moveaxis(image[..., FLAIR], 2, 0), np.moveaxis(truth[..., 0], 2, 0),
                 np.moveaxis(masks[..., 0], 2, 0))


def preprocessing_for(model, data_dir):
    """The converter's preprocessing from the data folder's manifest (settings.py without
    one), with the label mode the model was trained for (its output channels)."""
    manifest = converter.load_manifest(data_dir)
    options = preprocessing.Preprocessing(**manifest["preprocessing"]) if manifest else \
        preprocessing.Preprocessing(settings.IMAGE_SIZE, settings.CROP_SIZE, settings.CROP_MODE,
                                    settings.SLICE_POLICY, settings.LABEL_MODE)
    label_mode = next(mode for mode, channels in preprocessing.LABEL_MODES.items()
                      if len(channels) == model.output_shape[-1])
    return preprocessing.Preprocessing(model.input_shape[1], options.crop_size, options.crop_mode,
                                       options.slice_policy, label_mode, options.image_dtype)


def infer_nifti(model, args, output):
    try:
        cases = input_cases(args.input)
    except layouts.LayoutError as error:
        raise InferenceError(str(error)) from error
    options = preprocessing_for(model, args.DATA_DIR)
    print(f"{len(cases)} case(s) from {args.input}; preprocessing {options}")
    rows, failures = [], []
    for case in cases:
        try:
            row, views = segment_case(model, case, options, args, output)
        except (layouts.CaseError, InferenceError) as error:
            print(f"  {case.case_id}: FAILED: {error}")
            failures.append((case.case_id, str(error)))
            continue
        if row:
            rows.append(row)
            if wants_montage(len(rows) - 1, args.NUM_FIGURES):
                output.figure(f"{case.case_id}_montage.png", montage(*views, case.case_id))
    if rows:
        report(output, rows, options.target_names, {"checkpoint": os.path.abspath(args.CHECKPOINT)})
    print(f"Segmented {len(cases) - len(failures)} of {len(cases)} case(s) into "
          f"{args.INFERENCE_DIR}")
    for case_id, error in failures:
        print(f"  failed {case_id}: {error}")
    if failures:
        sys.exit(1)


def main(argv=None):
    parser = cli.parser_for(__doc__.splitlines()[0], SETTINGS, HELP, FLAGS)
    parser.add_argument("--input", help="case folder, release folder or 4-D NIfTI to segment")
    parser.add_argument("--probabilities", action="store_true",
                        help="also write float probability maps (NIfTI mode)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    args = parser.parse_args(argv)
    print(f"Inference\nConfiguration:\n{cli.format_config(args)}")
    try:
        threads.configure(args.NUM_INTRA_THREADS, args.NUM_INTER_THREADS)
    except RuntimeError:  # called as a library after TensorFlow started: keep its threads
        print("TensorFlow is already running in this process; keeping its thread settings")
    try:
        model = with_precision(load_checkpoint(args.CHECKPOINT), args.INFERENCE_PRECISION)
        output = OutputFolder(args.INFERENCE_DIR, args.overwrite)
        (infer_nifti if args.input else infer_arrays)(model, args, output)
    except (InferenceError, FileNotFoundError, ValueError) as error:
        sys.exit(f"ERROR: {error}")
    print(f"Metrics, per-case CSV and pictures in {args.INFERENCE_DIR}")


if __name__ == "__main__":
    main()
