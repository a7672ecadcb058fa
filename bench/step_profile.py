"""Where a training step's time goes: the convolutions, and everything else.

    .venv/bin/python -m bench.step_profile [--json FILE] [--batch-size N] [--steps N]
        [--rounds N] [--precision P]

oneDNN's convolutions are the work a U-Net has to do; the rest of a step (normalization,
activations, the optimizer, the loss, the framework between ops) is overhead to cut. This
runs train_horovod.py's own training step (one rank, the settings.py model, threads as
train_horovod.py sets them, random slices: speed does not depend on pixel values) and:

  - times steps side by side, rounds alternating, for: the settings.py model; the same with
    Keras' own BatchNormalization (element-wise ops) in place of the fused kernel; and
    without batch normalization, the floor normalization cannot beat;
  - traces the settings.py model's steps with TensorFlow's profiler and adds up the time of
    every op by the layer it belongs to (convolution, batch normalization, ReLU, pooling,
    concatenation), the optimizer, the gradient sums of the skip connections, the loss (an
    XLA-compiled function, timed by its wall time on the intra-op threads), and the Dice,
    casts and the rest; what is left of the wall time ran no op at all (Python, the
    executor, waits);
  - reports GFLOP/s (3x the convolutions' forward FLOPs per slice x images/s) and their
    share of what a large matrix product reaches on the same threads in the same precision
    (bfloat16 runs on AMX where the CPU has it): the practical peak of this CPU.
"""
import argparse
import collections
import glob
import os
import re
import statistics
import sys
import tempfile
import time

import numpy as np

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_DIR)

import settings  # noqa: E402
from bench.training import default_precision, forward_flops_per_slice  # noqa: E402
from brainseg import atomic, hardware  # noqa: E402

LAYER_KINDS = {"Conv2D": "convolutions", "Conv2DTranspose": "convolutions",
               "TransposedConvolution": "convolutions",
               "BatchNormalization": "batch normalization",
               "FusedBatchNormalization": "batch normalization", "Activation": "ReLU",
               "MaxPooling2D": "pooling", "Concatenate": "concatenation",
               "Dropout": "dropout"}
# How the profiler names the run of an XLA-compiled function (model.bce_dice_loss_from_logits,
# forward and gradient): its kernels run on the intra-op threads, outside the op executor.
XLA_EVENT = "ThunkExecutor::Execute"


def matmul_gflops(precision, size=2048, repeats=10):
    """The rate of a large matrix product in the step's compute type (bfloat16 under
    mixed_bfloat16: AMX tiles where the CPU has them), on the same threads: the most this
    CPU does in practice, which a nominal clock x FLOP-per-cycle figure misstates inside a
    VM (the clock shown is not the one that runs, nor is the number of FMA units known)."""
    import tensorflow as tf

    dtype = tf.bfloat16 if precision == "mixed_bfloat16" else tf.float32
    a = tf.random.normal((size, size), dtype=tf.float32)
    a = tf.cast(a, dtype)
    best = 0.0
    for _ in range(repeats):
        started = time.perf_counter()
        tf.linalg.matmul(a, a).numpy()
        best = max(best, 2 * size ** 3 / (time.perf_counter() - started) / 1e9)
    return best


def build_step(batch_norm, precision):
    """train_horovod.py's training step for the settings.py model with batch normalization
    "fused", "keras" (element-wise) or None; returns (step, model)."""
    import keras

    import model as unet
    import train_horovod

    hardware.set_precision(precision)
    keras.utils.set_random_seed(settings.SEED)
    model = unet.build_unet(settings.IMAGE_SIZE, 4, 3, settings.BASE_FILTERS, settings.DEPTH,
                            settings.USE_TRANSPOSED_CONV, batch_norm is not None,
                            settings.DROPOUT, fused_batch_norm=batch_norm == "fused")
    optimizer = keras.optimizers.Adam(settings.LEARNING_RATE)
    optimizer.build(model.trainable_variables)
    loss = lambda masks, probabilities: unet.bce_dice_loss(  # noqa: E731
        masks, probabilities, settings.DICE_PER_REGION)
    return train_horovod.make_train_step(model, optimizer, loss), model


def time_steps(step, batch, steps):
    started = time.perf_counter()
    for _ in range(steps):
        step(*batch)[0].numpy()  # the loop's own read of the loss, as in training
    return (time.perf_counter() - started) / steps


def trace(step, batch, steps, log_dir):
    """The op events of `steps` traced steps, as (op name, op type, start ps, duration ps),
    and the wall seconds they took."""
    import tensorflow as tf
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    tf.profiler.experimental.start(log_dir)
    wall = time_steps(step, batch, steps) * steps
    tf.profiler.experimental.stop()
    space = xplane_pb2.XSpace()
    with open(sorted(glob.glob(os.path.join(log_dir, "**", "*.xplane.pb"),
                               recursive=True))[-1], "rb") as file:
        space.ParseFromString(file.read())
    host = next(plane for plane in space.planes if plane.name == "/host:CPU")
    events = []
    for line in host.lines:
        for event in line.events:
            name = host.event_metadata[event.metadata_id].name
            if name == XLA_EVENT:  # an XLA-compiled function, run on the intra-op threads
                events.append(("", XLA_EVENT, line.timestamp_ns * 1000 + event.offset_ps,
                               event.duration_ps))
            if not line.name.startswith("tf_Compute"):  # the executor threads that run ops
                continue
            if ":" in name.replace("::", ""):  # "scope/op:OpType", not "ExecutorState::..."
                op, op_type = name.rsplit(":", 1)
                if op_type.endswith("PartitionedCall"):  # a function call: its ops count
                    continue
                events.append((op, op_type, line.timestamp_ns * 1000 + event.offset_ps,
                               event.duration_ps))
    return events, wall


def category(op, op_type, layer_kinds):
    """What an op is for: a convolution by its type (oneDNN fuses a convolution with the bias
    and ReLU after it, under the ReLU's name), else from its name scope: the layer it
    belongs to (forward, or its gradient under gradient_tape/), the optimizer, or the Dice,
    casts and bookkeeping around the model; the one XLA-compiled function is the loss."""
    if "Conv2D" in op_type:
        return "convolutions"
    if op_type == XLA_EVENT:
        return "loss (XLA-compiled)"
    for part in op.split("/"):
        layer = re.sub(r"_\d+$", "", part)  # tf.function scopes add "_1" to layer names
        if layer in layer_kinds:
            return layer_kinds[layer]
    if op.startswith("adam") or "/adam/" in op.lower():
        return "optimizer (Adam)"
    if op_type == "AddN":
        return "gradient sums (skip connections)"
    return "Dice, casts and step bookkeeping"


def profile(step, batch, steps, layer_kinds):
    """{what: ms per step and % of the wall time} for `steps` traced steps, largest first."""
    with tempfile.TemporaryDirectory() as log_dir:
        events, wall = trace(step, batch, steps, log_dir)
    seconds = collections.Counter()
    for op, op_type, _, duration in events:
        if op_type != XLA_EVENT:
            seconds[category(op, op_type, layer_kinds)] += duration / 1e12
    # An XLA function runs on both intra-op threads at once at times: count its wall time.
    xla = [event for event in events if event[1] == XLA_EVENT]
    if xla:
        seconds[category("", XLA_EVENT, layer_kinds)] = busy_seconds(xla)
    seconds["no op running (Python, executor, waits)"] = max(0.0, wall - busy_seconds(events))
    return {what: {"ms_per_step": total / steps * 1000, "percent": 100 * total / wall}
            for what, total in seconds.most_common()}


def busy_seconds(events):
    """Wall time during which at least one of the events ran."""
    busy, end = 0, None
    for _, _, start, duration in sorted(events, key=lambda event: event[2]):
        stop = start + duration
        if end is None or start > end:
            busy += duration
            end = stop
        elif stop > end:
            busy += stop - end
            end = stop
    return busy / 1e12


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--batch-size", type=int, default=settings.BATCH_SIZE)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--precision", default=settings.PRECISION)
    args = parser.parse_args()

    import horovod.tensorflow as hvd
    import tensorflow as tf

    hvd.init()  # one rank: the step skips the allreduce, as train_horovod.py does
    intra, inter = hardware.configure(settings.NUM_INTRA_THREADS, settings.NUM_INTER_THREADS)
    precision = default_precision(args.batch_size, settings.IMAGE_SIZE, intra) \
        if args.precision == "auto" else hardware.resolve_precision(args.precision)
    rng = np.random.default_rng(0)
    batch = (tf.constant(rng.normal(size=(args.batch_size, settings.IMAGE_SIZE,
                                          settings.IMAGE_SIZE, 4)).astype(np.float32)),
             tf.constant((rng.random((args.batch_size, settings.IMAGE_SIZE,
                                      settings.IMAGE_SIZE, 3)) > 0.9).astype(np.uint8)))

    variants = {"settings.py model (fused batch normalization)": "fused",
                "Keras BatchNormalization (element-wise ops)": "keras",
                "no batch normalization": None}
    if not settings.USE_BATCH_NORM:
        variants = {"settings.py model (no batch normalization)": None}
    steps, flops = {}, None
    for name, batch_norm in variants.items():
        step, model = build_step(batch_norm, precision)
        for _ in range(3):  # tracing, then oneDNN's first calls
            step(*batch)
        steps[name] = step
        if flops is None:
            flops = forward_flops_per_slice(model)
            layer_kinds = {layer.name: LAYER_KINDS.get(type(layer).__name__, "other layers")
                           for layer in model.layers}
    seconds = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            seconds[name].append(time_steps(step, batch, args.steps))

    peak = matmul_gflops(precision)
    print(f"\n{precision}, batch {args.batch_size}, {intra} intra-op x {inter} inter-op threads; "
          f"a 2048x2048 matrix product: {peak:.0f} GFLOP/s (the peak below)")
    print(f"{'configuration (median of rounds)':<50} {'ms/step':>8} {'img/s':>7} "
          f"{'GFLOP/s':>8} {'% peak':>7}")
    results = {"precision": precision, "batch_size": args.batch_size, "intra_threads": intra,
               "inter_threads": inter, "matmul_gflop_s": peak,
               "forward_gflop_per_slice": flops / 1e9, "configurations": {}}
    for name, every in seconds.items():
        step_s = statistics.median(every)
        gflop_s = args.batch_size / step_s * 3 * flops / 1e9
        results["configurations"][name] = {"step_ms": step_s * 1000, "rounds_ms": [
            s * 1000 for s in every], "img_s": args.batch_size / step_s, "gflop_s": gflop_s}
        print(f"{name:<50} {step_s * 1000:8.0f} {args.batch_size / step_s:7.1f} "
              f"{gflop_s:8.1f} {100 * gflop_s / peak:6.1f}%")

    results["profile"] = {}
    for name, step in steps.items():
        results["profile"][name] = profile(step, batch, args.steps, layer_kinds)
        print(f"\nwhere a step of the {name} goes (profiler trace, {args.steps} steps):")
        for what, share in results["profile"][name].items():
            print(f"  {what:<45} {share['ms_per_step']:8.1f} ms  {share['percent']:5.1f}%")
    if args.json:
        atomic.write_json(args.json, results)


if __name__ == "__main__":
    main()
