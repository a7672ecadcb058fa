"""Segments brain tumors with a trained checkpoint: converted test arrays or NIfTI cases.

    python inference.py --data-dir DIR --checkpoint FILE --inference-dir DIR
    python inference.py --input PATH --checkpoint FILE --inference-dir DIR [--probabilities]

Standalone: no Horovod, one process.
  - Test arrays (--data-dir, the default): predicts imgs_test.npy in batches through a memory
    map and scores it against msks_test.npy, case by case from the converter's manifest.
  - NIfTI (--input): a case folder, a release folder of any layout the converter reads, or
    one 4-D file. Each case goes through the converter's own preprocessing, the predictions
    are put back on the original grid, and <case>.nii.gz is written with the scan's
    shape, affine and header, labels in the convention of the input release. (The name the
    BraTS challenge asks for, and one no layout reads as a label map; the inference folder
    may not lie inside an input folder, so no input is ever replaced.) Cases with a
    label map are scored; cases without (validation data) are only segmented.
Written to --inference-dir: per_case_metrics.csv (Dice, HD95 in mm, sensitivity, specificity
per region), summary_metrics.csv (mean, median, std), metrics.json, a PNG montage per scored
case, dice_distribution.png. Files are written atomically and never overwritten unless
--overwrite is given.
"""
import concurrent.futures
import contextlib
import os
import sys
import threading
import time

import nibabel as nib
import numpy as np

from brainseg import (checkpoints, cli, context, dataset, figures, folders, hardware,
                      json_names, layouts, metrics, nifti, postprocessing, preprocessing,
                      runtime)
from brainseg.atomic import OutputFolder

SETTINGS = ["DATA_DIR", "TRAIN_DIR", "CHECKPOINT", "INFERENCE_DIR", "INFERENCE_BATCH_SIZE",
            "INFERENCE_PRECISION", "INFERENCE_RUNTIME", "TEST_TIME_FLIPS", "MIN_LESION_MM3",
            "MIN_ENHANCING_MM3", "MIN_ENHANCING_LESION_MM3", "MIN_CORE_MM3", "FAR_LESION_MM",
            "LESION_WISE",
            "NUM_FIGURES", "NUM_INTRA_THREADS", "NUM_INTER_THREADS", "CASE_TIMEOUT_SECONDS",
            "CROP_SIZE", "CROP_MODE", "SLICE_POLICY"]
# Earlier spellings of the flags, still accepted (the README used them).
ALIASES = {"INFERENCE_DIR": ["--output-dir"], "INFERENCE_BATCH_SIZE": ["--batch-size"],
           "INFERENCE_PRECISION": ["--precision"]}
HELP = {"DATA_DIR": "converted arrays (with --input: only used for a checkpoint that does not "
                    "describe its preprocessing)",
        "CHECKPOINT": "default: TRAIN_DIR/model.keras",
        "INFERENCE_PRECISION": "auto, float32 or mixed_bfloat16",
        "INFERENCE_RUNTIME": "auto (openvino when installed, else tensorflow), openvino or "
                             "tensorflow",
        "NUM_FIGURES": "montages of at most this many cases; 0: all",
        "TEST_TIME_FLIPS": "average the prediction with that of the left-right mirror image",
        "MIN_LESION_MM3": "remove predicted tumor components smaller than this; 0: keep all",
        "MIN_ENHANCING_MM3": "less enhancing tumor than this becomes core; 0: keep it",
        "MIN_ENHANCING_LESION_MM3": "enhancing-tumor components smaller than this become "
                                    "core; 0: keep all",
        "MIN_CORE_MM3": "tumor-core components smaller than this become edema; 0: keep all",
        "FAR_LESION_MM": "remove tumor components without core this far from any with core "
                         "and from the largest; 0: keep all",
        "LESION_WISE": "also score lesion-wise Dice and HD95 (official package; 2023 ranking)",
        "CASE_TIMEOUT_SECONDS": "with --input: a case whose files are not read within this "
                                "many seconds fails, and the others go on; 0 = no limit",
        "CROP_SIZE": "with --input, for a checkpoint without its preprocessing and no manifest",
        "CROP_MODE": "with --input, for a checkpoint without its preprocessing and no manifest",
        "SLICE_POLICY": "with --input, for a checkpoint without its preprocessing and no "
                        "manifest"}
FLAIR = layouts.MODALITIES.index("flair")


class InferenceError(Exception):
    """A problem with the checkpoint or the inputs; the message names the file."""


# --- Model -------------------------------------------------------------------------------------

def check_exists(path):
    if not os.path.exists(path):
        raise InferenceError(f"{path}: checkpoint not found; train first with "
                             f"run_multinode.sh or pass --checkpoint")


def load_checkpoint(path):
    """The trained U-Net, loaded in Keras safe mode (no arbitrary code from the file).
    Keras (and TensorFlow) are imported here, not at the top: OpenVINO with a cached model
    needs neither, which saves seconds of start-up."""
    import keras

    check_exists(path)
    try:
        return keras.models.load_model(path, compile=False, safe_mode=True)
    except Exception as error:
        raise InferenceError(f"{path}: not a loadable Keras model ({error})") from error


def check_fits(model, checkpoint, image_size, channels, what):
    """InferenceError unless the model takes slices of this size and channel count."""
    _, model_size, _, model_channels = model.input_shape
    if (model_size, model_channels) != (image_size, channels):
        raise InferenceError(f"{checkpoint}: trained on {model_size}x{model_size} slices with "
                             f"{model_channels} channels, but {what} has {image_size}x"
                             f"{image_size} with {channels}")


def context_slices_for(model, checkpoint):
    """The neighbouring slices on each side the model takes with every slice (2.5D input,
    brainseg/context.py), and where that was read: the checkpoint's description, else its
    input channels (modalities x (2k + 1)). A count that is neither gives 0, and then
    check_fits names the mismatch."""
    description = checkpoints.read_description(checkpoint) or {}
    if "context_slices" in description:
        return int(description["context_slices"]), checkpoint
    channels = model.input_shape[-1]
    return (context.from_channels(channels, len(layouts.MODALITIES)) or 0,
            f"the model's {channels} input channels")


def intra_threads(args):
    """The threads this process predicts, prepares and reads a case with (one per core it
    owns unless NUM_INTRA_THREADS says otherwise)."""
    return hardware.resolve(args.NUM_INTRA_THREADS, args.NUM_INTER_THREADS)[0]


def reuse_memory_across_cases():
    """Every case makes the same volume-sized arrays again: keep their pages instead of
    having the kernel fault in and zero new ones (brainseg/hardware.py)."""
    hardware.keep_freed_memory()
    hardware.avoid_huge_pages()


def load_model(args):
    """The model that predicts (brainseg/runtime.py: TensorFlow or OpenVINO, in the
    precision asked for), saying which."""
    check_exists(args.CHECKPOINT)
    try:
        model, description = runtime.load(args.CHECKPOINT, args.INFERENCE_RUNTIME,
                                           args.INFERENCE_PRECISION, load_checkpoint,
                                           intra_threads(args))
    except RuntimeError as error:  # OpenVINO's errors: conversion, reading, compiling
        raise InferenceError(f"{args.CHECKPOINT}: OpenVINO failed ({error}); "
                             f"--inference-runtime tensorflow avoids it") from error
    print(description)
    return model


class Stopwatch:
    """Seconds spent in each phase of a run, summed over its cases: where the time goes
    (bench/inference.py prints it)."""

    def __init__(self):
        self.seconds = {}

    @contextlib.contextmanager
    def __call__(self, phase):
        started = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = (self.seconds.get(phase, 0.0)
                                   + time.perf_counter() - started)


def say_context(context_slices, source):
    if context_slices:
        print(f"2.5D input: {context_slices} neighbouring slice(s) on each side of every "
              f"slice (from {source})")


def predict(model, imgs, batch_size, flips=False):
    """Probabilities [N, S, S, K] float32, and the seconds the model took. With flips, the
    mean of the predictions for each slice and for its left-right mirror image (mirrored
    back): brains are nearly symmetric, and averaging two views evens out some errors."""
    probabilities = np.empty((*imgs.shape[:3], model.output_shape[-1]), np.float32)
    seconds = 0.0
    for start in range(0, len(imgs), batch_size):
        batch = np.asarray(imgs[start:start + batch_size], dtype=np.float32)
        started = time.perf_counter()
        predicted = model.predict_on_batch(batch)
        if flips:
            mirrored = model.predict_on_batch(np.ascontiguousarray(batch[:, ::-1]))
            predicted = (predicted + mirrored[:, ::-1]) / 2
        probabilities[start:start + batch_size] = predicted
        seconds += time.perf_counter() - started
    return probabilities, seconds


def lesion_scores(truth_labels, labels, spacing, label_mode, args):
    """Lesion-wise scores of the written label map against the true one, when asked for
    (regions models only; both internal label maps)."""
    if not args.LESION_WISE or label_mode != "regions":
        return None
    return metrics.lesion_wise(truth_labels, labels, spacing)


def segmentation(labels, spacing, label_mode, args):
    """The predicted internal label map -> the post-processed one that is written, and the
    target channels [..., K] of that map, which are what is scored."""
    far_lesion_mm = args.FAR_LESION_MM if label_mode == "regions" else 0  # needs the core
    labels = postprocessing.postprocess(labels, spacing, args.MIN_LESION_MM3,
                                        args.MIN_ENHANCING_MM3, args.MIN_ENHANCING_LESION_MM3,
                                        args.MIN_CORE_MM3, far_lesion_mm)
    return labels, preprocessing.targets(labels, label_mode).astype(bool)


# --- Outputs ---------------------------------------------------------------------------------

def wants_montage(scored_before, num_figures):
    return num_figures == 0 or scored_before < num_figures


def write_figure(output, name, figure):
    return output.write(name, lambda path: figures.save(figure, path))


def report(output, rows, regions, extra):
    """Writes the CSVs, metrics.json and the distribution figure; prints and returns the
    summary."""
    summary = metrics.summarize(rows, regions)
    output.csv("per_case_metrics.csv", rows)
    output.csv("summary_metrics.csv", summary)
    write_figure(output, "dice_distribution.png", figures.dice_distribution(rows, regions))
    means = {f"{s['region']}_{s['metric']}_mean": s["mean"] for s in summary}
    output.json("metrics.json", {**means, **extra, "num_cases": len(rows)})
    print("\n" + metrics.format_summary(summary))
    return summary


# --- Mode 1: converted test arrays --------------------------------------------------------

def infer_arrays(model, args, output):
    manifest = dataset.load_manifest(args.DATA_DIR)
    if manifest is None:
        raise InferenceError(f"{dataset.manifest_path(args.DATA_DIR)}: not found; "
                             f"the per-case scores need the converter's manifest")
    for entry in manifest["splits"]["test"]:  # case names become output file names
        json_names.check(entry["case"], dataset.manifest_path(args.DATA_DIR), "case")
    options = preprocessing.Preprocessing(**manifest["preprocessing"])
    imgs, msks = dataset.open_split(args.DATA_DIR, "test")
    imgs_path = dataset.split_paths(args.DATA_DIR, "test")[0]
    context_slices, source = context_slices_for(model, args.CHECKPOINT)
    check_fits(model, args.CHECKPOINT, imgs.shape[1],
               context.channels(imgs.shape[3], context_slices), imgs_path)
    inputs = imgs
    if context_slices:  # each slice with its neighbours in its case, assembled per batch
        say_context(context_slices, source)
        inputs = context.StackedRows(imgs, context.split_neighbours(
            manifest, "test", len(imgs), context_slices))
    probabilities, seconds = predict(model, inputs, args.INFERENCE_BATCH_SIZE,
                                     args.TEST_TIME_FLIPS)
    predictions = probabilities > 0.5
    regions = options.target_names
    rows = []
    for number, entry in enumerate(manifest["splits"]["test"]):
        first, end = entry["rows"]
        spacing = preprocessing.slice_spacing(entry.get("spacing", [1.0, 1.0, 1.0]),
                                              entry["crop_box"][2], options.image_size)
        truth = msks[first:end].astype(bool)
        labels, prediction = segmentation(
            preprocessing.labels_from_targets(predictions[first:end], options.label_mode),
            spacing, options.label_mode, args)
        predictions[first:end] = prediction
        row = metrics.score_case(entry["case"], end - first, truth, prediction, regions, spacing,
                                 lesion_scores(preprocessing.labels_from_targets(
                                     truth, options.label_mode), labels, spacing,
                                     options.label_mode, args))
        rows.append(row)
        print(f"  {entry['case']:<28} {row['slices']:4d} slices  "
              f"{metrics.case_scores(row, regions)}")
        if wants_montage(number, args.NUM_FIGURES):
            write_figure(output, f"{entry['case']}_montage.png", figures.montage(
                np.asarray(imgs[first:end, ..., FLAIR], np.float32), truth, prediction,
                regions, entry["case"]))
    pooled_dice = metrics.dice(msks[..., 0], predictions[..., 0])
    mean_dice = float(np.mean([row["whole_tumor_dice"] for row in rows]))
    summary = report(output, rows, regions, {
        "whole_tumor_dice_mean_over_cases": mean_dice,
        "whole_tumor_dice_all_slices": pooled_dice, "slices_per_second": len(imgs) / seconds,
        "num_slices": len(imgs), "checkpoint": os.path.abspath(args.CHECKPOINT)})
    print(f"Whole-tumor Dice: {mean_dice:.4f} mean over "
          f"{len(rows)} test cases, {pooled_dice:.4f} over all {len(imgs)} slices; "
          f"{len(imgs) / seconds:.1f} slices/s")
    print("Mean Dice per region: " + ", ".join(
        f"{s['region'].replace('_', ' ')} {s['mean']:.4f}" for s in summary
        if s["metric"] == "dice"))


# --- Mode 2: NIfTI cases ---------------------------------------------------------------------

def input_cases(path):
    """[Case] for a release folder, one case folder, or one 4-D NIfTI file."""
    if os.path.isfile(path):
        case_id = os.path.basename(path).split(".nii")[0]
        return [layouts.Case(case_id, "msd", {m: path for m in layouts.MODALITIES})]
    try:
        return layouts.find_cases(path)[1]
    except layouts.LayoutError:  # not a release: perhaps one case folder inside one
        parent, name = os.path.split(os.path.normpath(path))
        cases = [case for case in layouts.find_cases(parent)[1] if case.case_id == name]
        if not cases:
            raise
        return cases


def read_inputs(case, threads):
    """What segmenting a case reads from its files, `threads` files at a time: (image, label
    map or None, the reference NIfTI whose grid and header the prediction is written on)."""
    return (*layouts.read_case(case, threads), layouts.reference_image(case))


def start_reading(case, threads):
    """A future of read_inputs(case), read by a thread of its own. A daemon thread: a read
    stuck on a stalled network filesystem can be given up (segment_case's time limit), and
    a thread that never returns must not keep the process from exiting, as a thread pool's
    would (its threads are joined at exit)."""
    reading = concurrent.futures.Future()

    def read():
        try:
            reading.set_result(read_inputs(case, threads))
        except BaseException as error:  # a bad file: raised when the case's turn comes
            reading.set_exception(error)

    reading.set_running_or_notify_cancel()
    threading.Thread(target=read, name="read-ahead", daemon=True).start()
    return reading


def read_ahead(cases, threads):
    """Yields (case, a future of read_inputs(case)), reading the next case in a background
    thread while the caller segments the current one: gzip decoding and NumPy release the
    GIL, so a release folder streams instead of alternating between reading and predicting.
    At most two cases are being read or held at once (besides reads given up as stuck)."""
    upcoming = start_reading(cases[0], threads) if cases else None
    for index, case in enumerate(cases):
        current = upcoming
        if index + 1 < len(cases):
            upcoming = start_reading(cases[index + 1], threads)
        yield case, current


def read_within_limit(case, inputs, seconds):
    """inputs.result(), or InferenceError naming the case's folder after `seconds` (0: wait
    as long as it takes); its reading thread is left behind, so the other cases go on."""
    try:
        return inputs.result(timeout=seconds or None)
    except concurrent.futures.TimeoutError:
        folder = os.path.dirname(case.images[layouts.MODALITIES[0]])
        raise InferenceError(f"{folder}: {case.case_id}'s files not read within {seconds} s "
                             f"(--case-timeout-seconds; a stalled filesystem?)") from None


def segment_case(model, case, options, args, output, context_slices=0, clock=None,
                 inputs=None):
    """Segments one case and writes its NIfTI. Returns its metrics row and the [slice, H, W]
    FLAIR, truth and prediction for a montage; (None, None) for a case without labels.
    A 2.5D model (context_slices > 0) gets each slice with its neighbours in the case.
    clock (a Stopwatch) adds the seconds of each phase to its totals. inputs: a future of
    read_inputs(case) already under way (read_ahead), waited for at most
    --case-timeout-seconds; without it the case is read here."""
    clock = clock or Stopwatch()
    threads = intra_threads(args)
    with clock("read"):
        image, labels, reference = (read_within_limit(case, inputs, args.CASE_TIMEOUT_SECONDS)
                                    if inputs else read_inputs(case, threads))
    with clock("preprocess"):
        imgs, _, geometry = preprocessing.preprocess_case(image, None, options, threads=threads)
        check_fits(model, args.CHECKPOINT, options.image_size,
                   context.channels(image.shape[3], context_slices),
                   case.images[layouts.MODALITIES[0]])
        if context_slices:
            imgs = context.stack_case(imgs, geometry["slices"], context_slices)
    with clock("predict"):
        slice_probabilities, seconds = predict(model, imgs, args.INFERENCE_BATCH_SIZE,
                                               args.TEST_TIME_FLIPS)
    with clock("postprocess"):
        spacing = nifti.canonical_grid(reference).zooms  # the axes of `image`, not the file's
        internal, masks = segmentation(
            preprocessing.to_label_volume(slice_probabilities, geometry, image.shape[:3],
                                          options.label_mode),
            spacing, options.label_mode, args)
        release = layouts.to_release_labels(internal, case.layout)
    with clock("write"):
        output.write(f"{case.case_id}.nii.gz",
                     lambda path: nib.save(layouts.like_reference(release, reference), path))
        if args.probabilities:
            probabilities = preprocessing.to_volume(slice_probabilities, geometry,
                                                    image.shape[:3])
            squeezed = probabilities[..., 0] if probabilities.shape[-1] == 1 else probabilities
            output.write(f"{case.case_id}_probabilities.nii.gz",
                         lambda path: nib.save(layouts.like_reference(squeezed, reference),
                                               path))
    print(f"  {case.case_id:<28} {len(imgs):4d} slices in {seconds:.2f} s", end="")
    if labels is None:
        print("  (no label map: not scored)")
        return None, None
    with clock("score"):
        # In the prediction's memory order (C; a NIfTI map is read x fastest): comparing two
        # layouts voxel by voxel crosses memory at every step (scoring took 0.58 s, now 0.41).
        labels = np.ascontiguousarray(labels)
        truth = preprocessing.targets(labels, options.label_mode).astype(bool)
        row = metrics.score_case(case.case_id, len(imgs), truth, masks, options.target_names,
                                 spacing,
                                 lesion_scores(labels, internal, spacing, options.label_mode,
                                               args))
    print(f"  {metrics.case_scores(row, options.target_names)}")
    return row, (np.moveaxis(image[..., FLAIR], 2, 0), np.moveaxis(truth, 2, 0),
                 np.moveaxis(masks, 2, 0), options.target_names)


def preprocessing_for(model, args):
    """How the model's training slices were prepared, and where that was read: from the
    checkpoint itself (every model train_horovod.py exports describes it), else from the data
    folder's manifest, else the crop and slice flags, with a warning. The slice size and
    label mode always follow the model (its input size and output channels)."""
    description = checkpoints.read_description(args.CHECKPOINT)
    manifest = None if description else dataset.load_manifest(args.DATA_DIR)
    if description or manifest:
        options = preprocessing.Preprocessing(**(description or manifest)["preprocessing"])
        source = args.CHECKPOINT if description else dataset.manifest_path(args.DATA_DIR)
    else:
        print(f"WARNING: {args.CHECKPOINT} does not say how its training data was prepared "
              f"and {args.DATA_DIR} holds no manifest: using --crop-size {args.CROP_SIZE}, "
              f"--crop-mode {args.CROP_MODE}, --slice-policy {args.SLICE_POLICY}")
        options = preprocessing.Preprocessing(crop_size=args.CROP_SIZE, crop_mode=args.CROP_MODE,
                                              slice_policy=args.SLICE_POLICY)
        source = "the flags"
    label_mode = next(mode for mode, channels in preprocessing.LABEL_MODES.items()
                      if len(channels) == model.output_shape[-1])
    return preprocessing.Preprocessing(model.input_shape[1], options.crop_size, options.crop_mode,
                                       options.slice_policy, label_mode,
                                       options.image_dtype), source


def infer_nifti(model, args, output):
    try:
        cases = input_cases(args.input)
    except layouts.LayoutError as error:
        raise InferenceError(str(error)) from error
    options, source = preprocessing_for(model, args)
    print(f"{len(cases)} case(s) from {args.input}; preprocessing from {source}: {options}")
    context_slices, context_source = context_slices_for(model, args.CHECKPOINT)
    say_context(context_slices, context_source)
    rows, failures = [], []
    for case, inputs in read_ahead(cases, intra_threads(args)):
        try:
            row, views = segment_case(model, case, options, args, output, context_slices,
                                      inputs=inputs)
        except (layouts.CaseError, InferenceError, FileExistsError) as error:
            print(f"  {case.case_id}: FAILED: {error}")
            failures.append((case.case_id, str(error)))
            continue
        if row:
            rows.append(row)
            if wants_montage(len(rows) - 1, args.NUM_FIGURES):
                flair, truth, prediction, regions = views
                write_figure(output, f"{case.case_id}_montage.png",
                             figures.montage(flair, truth, prediction, regions, case.case_id))
    if rows:
        report(output, rows, options.target_names, {"checkpoint": os.path.abspath(args.CHECKPOINT)})
    print(f"Segmented {len(cases) - len(failures)} of {len(cases)} case(s) into "
          f"{args.INFERENCE_DIR}")
    for case_id, error in failures:
        print(f"  failed {case_id}: {error}")
    if failures:
        sys.exit(1)


def configure_tensorflow(args):
    """TensorFlow's threads; OpenVINO takes its own (load_model) and needs no TensorFlow."""
    try:
        hardware.configure(args.NUM_INTRA_THREADS, args.NUM_INTER_THREADS)
    except RuntimeError:  # called as a library after TensorFlow started: keep its threads
        print("TensorFlow is already running in this process; keeping its thread settings")


def parse_args(argv=None):
    """The settings and flags of a run (bench/inference.py runs its pieces with them)."""
    parser = cli.parser_for(__doc__.splitlines()[0], SETTINGS, HELP, ALIASES)
    parser.add_argument("--input", help="case folder, release folder or 4-D NIfTI to segment")
    parser.add_argument("--probabilities", action="store_true",
                        help="also write float probability maps (NIfTI mode)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    args = parser.parse_args(argv)
    args.CHECKPOINT = args.CHECKPOINT or os.path.join(args.TRAIN_DIR, checkpoints.EXPORT_NAME)
    return args


def main(argv=None):
    args = parse_args(argv)
    print(f"Inference\nConfiguration:\n{cli.format_config(args)}")
    reuse_memory_across_cases()
    try:
        if runtime.resolve_runtime(args.INFERENCE_RUNTIME) == "tensorflow":
            configure_tensorflow(args)
        if args.input:  # outputs never land among the inputs, where they could replace one
            input_folder = args.input if os.path.isdir(args.input) else os.path.dirname(args.input)
            folders.refuse_overlap(args.INFERENCE_DIR, [input_folder or "."], around=False)
        model = load_model(args)
        with folders.locked(args.INFERENCE_DIR):
            output = OutputFolder(args.INFERENCE_DIR, args.overwrite)
            (infer_nifti if args.input else infer_arrays)(model, args, output)
    except (InferenceError, FileNotFoundError, FileExistsError, ValueError,
            folders.FolderBusyError) as error:
        sys.exit(f"ERROR: {error}")
    print(f"Metrics, per-case CSV and pictures in {args.INFERENCE_DIR}")


if __name__ == "__main__":
    main()
