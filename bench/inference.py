"""Inference speed on this machine: float32 against bfloat16, measured side by side in one run.

    .venv/bin/python -m bench.inference [--checkpoint FILE] [--batch-size N] [--json FILE]

Predicts a 155-slice volume (the BraTS depth) with the U-Net of settings.py (or a given
checkpoint) the way inference.py does, in float32 and in mixed bfloat16, and prints slices
per second and seconds of model time per volume (best of --repeats, after a warm-up). Target
on the 2-core development machine: under one second per volume with bfloat16.
"""
import argparse
import json
import os

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

import inference
import model as unet
import settings
from brainseg import hardware, layouts

VOLUME_SLICES = 155


def bfloat16_hardware():
    if hardware.cpu_has_fast_bfloat16():
        return "AMX"
    return "AVX512_BF16 only, no AMX" if hardware.cpu_supports_bfloat16() else "none"


def seconds_per_volume(model, volume, batch_size, repeats):
    inference.predict(model, volume[:batch_size], batch_size)  # warm-up: trace and allocate
    return min(inference.predict(model, volume, batch_size)[1] for _ in range(repeats))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="default: an untrained settings.py U-Net")
    parser.add_argument("--batch-size", type=int, default=settings.INFERENCE_BATCH_SIZE)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args()

    intra, _ = hardware.configure(settings.NUM_INTRA_THREADS, settings.NUM_INTER_THREADS)
    model = inference.load_checkpoint(args.checkpoint) if args.checkpoint else unet.build_unet(
        settings.IMAGE_SIZE, len(layouts.MODALITIES), 1, settings.BASE_FILTERS, settings.DEPTH)
    _, size, _, channels = model.input_shape
    volume = np.random.default_rng(0).normal(size=(VOLUME_SLICES, size, size, channels))
    volume = volume.astype(np.float32)
    print(f"{VOLUME_SLICES} slices of {size}x{size}x{channels}, batch {args.batch_size}, "
          f"{intra} threads; CPU bfloat16: {bfloat16_hardware()}")

    figures = {}
    for precision, key in (("float32", "fp32"), ("mixed_bfloat16", "bf16")):
        seconds = seconds_per_volume(hardware.in_precision(model, precision), volume,
                                     args.batch_size, args.repeats)
        figures[f"{key}_volume_s"] = round(seconds, 3)
        figures[f"{key}_slices_per_s"] = round(VOLUME_SLICES / seconds, 1)
        print(f"  {precision:<15} {VOLUME_SLICES / seconds:8.1f} slices/s "
              f"{seconds:7.3f} s per volume", flush=True)
    figures["bf16_speedup"] = round(figures["fp32_volume_s"] / figures["bf16_volume_s"], 2)
    fastest = min(("fp32", "bf16"), key=lambda key: figures[f"{key}_volume_s"])
    print(f"  bfloat16 speed-up: {figures['bf16_speedup']}x (inference.py's 'auto' precision "
          f"uses {hardware.resolve_precision('auto')})")
    verdict = "met" if figures["bf16_volume_s"] < 1 else "NOT met"
    print(f"  target, a volume in under 1 s: bf16 {verdict}; fastest ({fastest}) "
          f"{figures[f'{fastest}_volume_s']} s")
    if args.json:
        with open(args.json, "w") as file:
            json.dump(figures, file, indent=1)


if __name__ == "__main__":
    main()
