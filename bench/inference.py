"""Inference speed on this machine: TensorFlow float32 and bfloat16 against OpenVINO, side by
side in one run, and one full-size NIfTI case end to end with where its time goes.

    .venv/bin/python -m bench.inference [--checkpoint FILE] [--case FOLDER] [--batch-size N]
                                        [--repeats N] [--json FILE]

Model time: a 155-slice volume (the BraTS depth) predicted the way inference.py does, by each
runtime and precision in turn, --repeats rounds (interleaved, so a change in the machine's load
hits every configuration alike) after a warm-up; the best round of each is reported, and its
ratio to TensorFlow float32. Target on the 2-core development machine: under one second per
volume.

End to end: one 240x240x155 case (--case, or a synthetic case generated once into
runs/bench_inference/), through inference.segment_case with each runtime at its "auto"
precision, each in a process of its own: read, preprocess, predict, post-process, write,
score, seconds per phase (median of --repeats rounds); then inference.py itself as a new
process, which adds the imports, loading the model (converting it on a first run) and the
figures. The model is an untrained settings.py U-Net unless --checkpoint names one: pass a
trained one, as untrained masks make scoring unrepresentative.
"""
import argparse
import concurrent.futures
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

import inference
import model as unet
import settings
from brainseg import hardware, layouts, preprocessing, runtime, synthetic
from brainseg.atomic import OutputFolder

VOLUME_SLICES = 155
CASE_SHAPE = (240, 240, 155)
CASE_FOLDER = os.path.join(REPO_DIR, "runs", "bench_inference")
# (JSON key, runtime, INFERENCE_PRECISION); the first is the reference of the ratios. The
# TensorFlow keys are those of earlier versions of this benchmark.
CONFIGURATIONS = [("fp32", "tensorflow", "float32"), ("bf16", "tensorflow", "mixed_bfloat16"),
                  ("ov_fp32", "openvino", "float32"), ("ov_bf16", "openvino", "mixed_bfloat16")]
PHASES = ("read", "preprocess", "predict", "postprocess", "write", "score")


def bfloat16_hardware():
    if hardware.cpu_has_fast_bfloat16():
        return "AMX"
    return "AVX512_BF16 only, no AMX" if hardware.cpu_supports_bfloat16() else "none"


def seconds_per_volume(model, volume, batch_size):
    return inference.predict(model, volume, batch_size)[1]


def checkpoint_file(path, folder):
    """The checkpoint to measure: the given one, else an untrained settings.py U-Net saved
    into folder (OpenVINO converts from a file, as inference.py does)."""
    if path:
        return path
    path = os.path.join(folder, "untrained.keras")
    unet.build_unet(settings.IMAGE_SIZE, len(layouts.MODALITIES),
                    len(preprocessing.LABEL_MODES[settings.LABEL_MODE]), settings.BASE_FILTERS,
                    settings.DEPTH, use_batch_norm=settings.USE_BATCH_NORM).save(path)
    return path


def available_configurations():
    if runtime.openvino_installed():
        return CONFIGURATIONS
    print("  openvino is not installed: TensorFlow only")
    return [entry for entry in CONFIGURATIONS if entry[1] == "tensorflow"]


def model_speed(checkpoint, batch_size, repeats, intra):
    """{key}_volume_s, {key}_slices_per_s (best round) for every configuration, and
    {key}_speedup (against TensorFlow float32) for the others."""
    configurations = available_configurations()
    models = {key: runtime.load(checkpoint, name, precision, inference.load_checkpoint,
                                intra)[0] for key, name, precision in configurations}
    _, size, _, channels = models["fp32"].input_shape
    volume = np.random.default_rng(0).normal(size=(VOLUME_SLICES, size, size, channels))
    volume = volume.astype(np.float32)
    print(f"Model time: {VOLUME_SLICES} slices of {size}x{size}x{channels}, batch "
          f"{batch_size}, {intra} threads, {repeats} rounds; CPU bfloat16: "
          f"{bfloat16_hardware()}")
    rounds = {key: [] for key in models}
    for model in models.values():
        seconds_per_volume(model, volume[:batch_size], batch_size)  # warm-up: trace, allocate
    for _ in range(repeats):
        for key, model in models.items():
            rounds[key].append(seconds_per_volume(model, volume, batch_size))
    figures = {}
    for key, name, precision in configurations:
        best = min(rounds[key])
        figures[f"{key}_volume_s"] = round(best, 3)
        figures[f"{key}_slices_per_s"] = round(VOLUME_SLICES / best, 1)
        speedup = round(min(rounds["fp32"]) / best, 2)
        if key != "fp32":
            figures[f"{key}_speedup"] = speedup
        print(f"  {name:<10} {precision:<15} {VOLUME_SLICES / best:8.1f} slices/s "
              f"{best:7.3f} s per volume  x{speedup:.2f} of TensorFlow float32   "
              f"rounds: {' '.join(f'{s:.3f}' for s in rounds[key])}", flush=True)
    auto = runtime.load(checkpoint, "auto", "auto", inference.load_checkpoint, intra)[1]
    print(f"  inference.py's 'auto': {auto}")
    fastest = min(models, key=lambda key: figures[f"{key}_volume_s"])
    verdict = "met" if figures[f"{fastest}_volume_s"] < 1 else "NOT met"
    print(f"  target, a volume in under 1 s: {verdict} (fastest: {fastest}, "
          f"{figures[f'{fastest}_volume_s']} s)")
    return figures


# --- End to end --------------------------------------------------------------------------------

def bench_case(path):
    """The case folder to segment: the given one, else one synthetic full-size case,
    generated on the first run."""
    if path:
        return path
    raw = os.path.join(CASE_FOLDER, "raw")
    if not os.path.isdir(raw):
        synthetic.write_dataset(raw, 1, seed=12, shape=CASE_SHAPE)
    return os.path.join(raw, synthetic.case_id(1))


def case_phases(checkpoint, case_path, name, repeats, folder):
    """Median seconds per phase of segment_case with one runtime at its auto precision, in a
    fresh process of its own, as inference.py runs one runtime: nothing the other runtime or
    the model timing loaded or allocated is in it."""
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as process:
        return process.submit(_case_phases, checkpoint, case_path, name, repeats,
                              folder).result()


def _case_phases(checkpoint, case_path, name, repeats, folder):
    inference.reuse_memory_across_cases()  # as inference.main does
    hardware.configure(settings.NUM_INTRA_THREADS, settings.NUM_INTER_THREADS)
    args = inference.parse_args(["--input", case_path, "--checkpoint", checkpoint,
                                 "--inference-runtime", name, "--overwrite"])
    model = runtime.load(checkpoint, name, "auto", inference.load_checkpoint)[0]
    options, _ = inference.preprocessing_for(model, args)
    [case] = inference.input_cases(case_path)
    context_slices, _ = inference.context_slices_for(model, checkpoint)
    output = OutputFolder(os.path.join(folder, name), overwrite=True)
    rounds = []
    for _ in range(repeats):
        clock = inference.Stopwatch()
        inference.segment_case(model, case, options, args, output, context_slices, clock)
        rounds.append(clock.seconds)
    return {phase: statistics.median(r.get(phase, 0.0) for r in rounds) for phase in PHASES}


def process_seconds(checkpoint, case_path, name, folder):
    """Wall time of `inference.py --input CASE` as a new process (model already converted)."""
    started = time.perf_counter()
    subprocess.run([sys.executable, os.path.join(REPO_DIR, "inference.py"), "--input",
                    case_path, "--checkpoint", checkpoint, "--inference-runtime", name,
                    "--inference-dir", os.path.join(folder, f"process_{name}"), "--overwrite"],
                   cwd=REPO_DIR, check=True, capture_output=True)
    return time.perf_counter() - started


def end_to_end(checkpoint, case_path, repeats, folder):
    names = [name for name in ("tensorflow", "openvino")
             if name == "tensorflow" or runtime.openvino_installed()]
    print(f"End to end: {case_path}, {repeats} rounds (median)")
    print(f"  {'runtime':<10} " + " ".join(f"{phase:>11}" for phase in PHASES)
          + f" {'total':>8} {'process':>8} {'other':>8}")
    figures = {}
    for name in names:
        phases = case_phases(checkpoint, case_path, name, repeats, folder)
        total = sum(phases.values())
        process = process_seconds(checkpoint, case_path, name, folder)
        figures[f"case_{name}_s"] = round(total, 2)
        figures[f"case_{name}_phases_s"] = {phase: round(s, 3) for phase, s in phases.items()}
        figures[f"case_{name}_process_s"] = round(process, 2)
        print(f"  {name:<10} " + " ".join(f"{phases[phase]:>10.2f}s" for phase in PHASES)
              + f" {total:>7.2f}s {process:>7.2f}s {process - total:>7.2f}s", flush=True)
    print("  (process: inference.py as a new process; other: what it adds to the phases, i.e."
          " imports, loading the model, the figures and the reports)")
    return figures


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="default: an untrained settings.py U-Net")
    parser.add_argument("--case", help="case folder for the end-to-end time (default: a "
                                       "synthetic full-size case)")
    parser.add_argument("--batch-size", type=int, default=settings.INFERENCE_BATCH_SIZE)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()

    intra, _ = hardware.configure(settings.NUM_INTRA_THREADS, settings.NUM_INTER_THREADS)
    with tempfile.TemporaryDirectory() as folder:
        checkpoint = checkpoint_file(args.checkpoint, folder)
        figures = model_speed(checkpoint, args.batch_size, args.repeats, intra)
        figures.update(end_to_end(checkpoint, bench_case(args.case), args.repeats, folder))
    if args.json:
        with open(args.json, "w") as file:
            json.dump(figures, file, indent=1)


if __name__ == "__main__":
    main()
