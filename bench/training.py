"""Training speed, scaling and memory on this machine, measured side by side in one run.

    .venv/bin/python -m bench.training [--json FILE] [--steps N] [--batch-size N] ...

What it measures (images per second after a warm-up epoch, aggregate over all ranks):
  - plain single-process Keras fit() on the same model and data: the baseline a user would
    write; train_horovod.py with 1 rank must be within 5% of it;
  - train_horovod.py under mpirun for every (ranks x threads per rank) that fits the cores,
    each rank bound to its own cores as run_multinode.sh does: 1x1, 1x2, 2x1 on 2 cores;
  - float32 against mixed_bfloat16 (1 rank on all cores); the rest runs in the precision
    PRECISION="auto" picks here (bfloat16 with AMX, timed with AVX512_BF16 alone); and
    oneDNN's own time per step in each kernel for both precisions, which shows whether the
    bfloat16 kernels are faster on this CPU at all (bench/precision.py compares the Dice the
    two precisions reach);
  - achieved GFLOP/s: images/s x 3 x the model's forward FLOPs per slice (forward, input
    gradient and weight gradient each cost about one forward pass);
  - data.py alone (the same tf.data pipeline, no model): it must deliver >= 10x the training
    rate, or it, not the model, would set the pace;
  - peak resident memory per rank on a dataset and on one 4x larger (it must not grow);
  - when 2 ranks x 1 thread reach less than 90% of the best 1-rank configuration (or with
    --diagnose), the same 2 ranks without core binding, with a short and a long Horovod
    cycle time, with Open MPI busy-polling, and two independent 1-thread trainings
    without Horovod at all, to separate Horovod's cost from what sharing the machine costs.

Every training configuration runs once per round (--repeats rounds, alternating, so that a
change in machine load hits them all alike) and the medians are compared; with one run each,
the noise of this shared machine (about 5%) is as large as the 1-rank target's margin.
Every measurement starts its own processes (TensorFlow's thread pools are fixed at start)
and trains the settings.py model (BASE_FILTERS, DEPTH, IMAGE_SIZE) on random slices: speed
does not depend on pixel values, and random data needs no conversion step. Absolute numbers
drift with machine load; compare the ratios, which are measured minutes apart.
"""
import argparse
import dataclasses
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time

import settings
from brainseg import dataset, hardware, layouts, preprocessing

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable
TRAIN_SCRIPT = os.path.join(REPO_DIR, "train_horovod.py")


# --- Data ------------------------------------------------------------------------------------
def write_random_split(folder, split, num_slices, image_size, seed):
    """imgs_<split>.npy / msks_<split>.npy as converter.py writes them (settings.IMAGE_DTYPE
    images, three nested region masks), filled chunk by chunk through a memory map so that
    even the large dataset never sits in this process's memory."""
    import numpy as np

    rng = np.random.default_rng(seed)
    imgs = np.lib.format.open_memmap(os.path.join(folder, f"imgs_{split}.npy"), "w+",
                                     settings.IMAGE_DTYPE, (num_slices, image_size, image_size, 4))
    msks = np.lib.format.open_memmap(os.path.join(folder, f"msks_{split}.npy"), "w+",
                                     np.uint8, (num_slices, image_size, image_size, 3))
    for start in range(0, num_slices, 64):
        chunk = rng.standard_normal((min(64, num_slices - start), image_size, image_size, 4),
                                    dtype=np.float32)
        imgs[start:start + len(chunk)] = chunk
        # Whole tumor ~16% of the pixels, core and enhancing tumor nested inside it.
        msks[start:start + len(chunk)] = chunk[..., :1] > np.array([1.0, 1.5, 2.0])
    imgs.flush()
    msks.flush()


def make_dataset(folder, num_train, image_size):
    """A dataset folder of random slices that training opens like a converted one: the
    arrays, and a manifest vouching for them (training refuses arrays without one)."""
    os.makedirs(folder, exist_ok=True)
    write_random_split(folder, "train", num_train, image_size, seed=1)
    write_random_split(folder, "test", 16, image_size, seed=2)  # validation: kept negligible
    options = preprocessing.Preprocessing(image_size=image_size,
                                          image_dtype=settings.IMAGE_DTYPE)
    dataset.write_manifest(folder, {"preprocessing": dataclasses.asdict(options),
                                    "modalities": list(layouts.MODALITIES),
                                    "targets": list(options.target_names),
                                    "random_slices": True})
    return folder


# --- Measurements ----------------------------------------------------------------------------
def run(command, env=None, timeout=900):
    result = subprocess.run(command, cwd=REPO_DIR, capture_output=True, text=True,
                            timeout=timeout, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2",
                                                      **(env or {})))
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stdout[-3000:]}"
                           f"\n{result.stderr[-3000:]}")
    return result.stdout


def train_flags(args, data_dir, output_dir, precision, threads):
    """Two epochs of args.steps steps: the first warms up (graph tracing, oneDNN kernel
    selection, tf.data autotuning), the second is measured."""
    return ["--data-dir", data_dir, "--train-dir", output_dir, "--epochs", "2",
            "--steps-per-epoch", str(args.steps), "--batch-size", str(args.batch_size),
            "--precision", precision, "--num-intra-threads", str(threads),
            "--num-inter-threads", "1", "--early-stopping-patience", "0",
            "--log-every-steps", "100000", "--warmup-epochs", "0"]


def horovod(args, data_dir, ranks, threads, precision, bind=True, env=None):
    """train_horovod.py under mpirun, each rank bound to `threads` cores of its own (the
    launcher's --bind-to core --map-by slot:PE=k), or unbound. Returns the measured epoch's
    images/s (all ranks) and each rank's memory line."""
    output_dir = tempfile.mkdtemp(prefix="bench_train_", dir=args.work_dir)
    binding = (["--bind-to", "core", "--map-by", f"slot:PE={threads}"] if bind
               else ["--bind-to", "none"])
    command = ["mpirun", "-np", str(ranks), *binding, "--oversubscribe"]
    if os.geteuid() == 0:
        command.append("--allow-run-as-root")
    command += [PYTHON, TRAIN_SCRIPT, *train_flags(args, data_dir, output_dir, precision,
                                                    threads)]
    stdout = run(command, env)
    rates = re.findall(r"^epoch 2/2 .* ([0-9.]+) img/s", stdout, re.MULTILINE)
    memory = re.findall(r"rank (\d+): peak RSS (\d+) MiB \(now (\d+) MiB anonymous",
                        stdout)
    return {"img_s": float(rates[-1]),
            "peak_rss_mib": {int(rank): int(peak) for rank, peak, _ in memory},
            "anon_rss_mib": {int(rank): int(anon) for rank, _, anon in memory}}


def plain_fit(args, data_dir, precision, threads, cpus=None):
    """The plain Keras baseline in its own process (optionally pinned to `cpus`)."""
    command = [PYTHON, "-m", "bench.training", "--plain-fit-worker", "--data-dir", data_dir,
               "--precision", precision, "--threads", str(threads), "--steps", str(args.steps),
               "--batch-size", str(args.batch_size)]
    if cpus is not None:
        command = ["taskset", "-c", cpus, *command]
    return json.loads(run(command).strip().splitlines()[-1])["img_s"]


def settings_unet(image_size, channels, classes):
    """The U-Net of settings.py, the one train_horovod.py trains by default."""
    import model as unet

    return unet.build_unet(image_size, channels, classes, settings.BASE_FILTERS, settings.DEPTH,
                           settings.USE_TRANSPOSED_CONV, settings.USE_BATCH_NORM,
                           settings.DROPOUT)


def compiled_worker_model(args, image_size, channels, classes):
    """Inside a worker subprocess: TensorFlow's threads and the precision policy set (both
    before the first operation), then the settings.py U-Net compiled with Adam and the
    training loss, as in the Keras examples."""
    import keras
    import tensorflow as tf

    import model as unet

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    hardware.set_precision(args.precision)
    keras.utils.set_random_seed(settings.SEED)
    net = settings_unet(image_size, channels, classes)
    net.compile(optimizer=keras.optimizers.Adam(settings.LEARNING_RATE),
                loss=unet.bce_dice_loss)
    return net


def plain_fit_worker(args):
    """Runs inside the subprocess: model.compile + model.fit, as in the Keras examples, on the
    same model, loss and tf.data pipeline as train_horovod.py (whole training set, one rank)."""
    import keras

    import data

    imgs, msks = dataset.open_split(args.data_dir, "train")
    net = compiled_worker_model(args, imgs.shape[1], imgs.shape[3], msks.shape[3])
    batches = data.training_dataset(imgs, msks, data.shard_indices(len(imgs), 0, 1),
                                    args.batch_size, seed=settings.SEED)
    epoch_seconds = []
    timer = keras.callbacks.LambdaCallback(
        on_epoch_begin=lambda epoch, logs: epoch_seconds.append(-time.perf_counter()),
        on_epoch_end=lambda epoch, logs: epoch_seconds.__setitem__(
            -1, epoch_seconds[-1] + time.perf_counter()))
    # Two epochs, the second measured, exactly as the train_horovod.py runs are measured.
    net.fit(batches, epochs=2, steps_per_epoch=args.steps, verbose=0, callbacks=[timer])
    print(json.dumps({"img_s": args.steps * args.batch_size / epoch_seconds[-1]}))


def onednn_kernel_ms(args, precision):
    """Milliseconds per training step spent in each oneDNN kernel (primitive kind and
    implementation, e.g. 'convolution brg_conv_fwd:avx512_core_bf16'), from oneDNN's own
    timing (ONEDNN_VERBOSE=1) of one step after two warm-up steps. It shows which instruction
    set the kernels run on, and whether bfloat16's kernels are faster than float32's on this
    CPU, independently of TensorFlow, Keras and Horovod."""
    command = [PYTHON, "-m", "bench.training", "--onednn-worker", "--precision", precision,
               "--threads", str(len(os.sched_getaffinity(0))),
               "--batch-size", str(args.batch_size), "--image-size", str(args.image_size)]
    stdout = run(command, env={"ONEDNN_VERBOSE": "1"})
    kernels = {}
    for line in stdout.split(MEASURED_STEP_MARKER, 1)[1].splitlines():
        fields = line.split(",")
        if fields[0] == "onednn_verbose" and "exec" in fields:
            at = fields.index("exec")
            name = f"{fields[at + 2]} {fields[at + 4]} {fields[at + 3]}"
            kernels[name] = kernels.get(name, 0.0) + float(fields[-1])
    kernels = dict(sorted(kernels.items(), key=lambda item: -item[1]))
    return {"kernels": kernels, "total": sum(kernels.values())}


MEASURED_STEP_MARKER = "--- measured step ---"


def onednn_worker(args):
    """Runs inside the subprocess: two warm-up steps, the marker, one measured step."""
    import numpy as np

    net = compiled_worker_model(args, args.image_size, 4, 1)
    rng = np.random.default_rng(0)
    images = rng.standard_normal((args.batch_size, args.image_size, args.image_size, 4),
                                 dtype=np.float32)
    masks = (images[..., :1] > 1.0).astype(np.float32)
    for _ in range(2):
        net.train_on_batch(images, masks)
    print(MEASURED_STEP_MARKER, flush=True)
    net.train_on_batch(images, masks)
    sys.stdout.flush()


def data_pipeline_img_s(data_dir, batch_size, batches=200):
    """data.py alone: shuffled, augmented batches read from the memory map, no model."""
    import data

    imgs, msks = dataset.open_split(data_dir, "train")
    stream = iter(data.training_dataset(imgs, msks, data.shard_indices(len(imgs), 0, 1),
                                        batch_size, seed=settings.SEED))
    for _ in range(20):  # warm-up: autotuning and the first reads
        next(stream)
    started = time.perf_counter()
    for _ in range(batches):
        next(stream)
    return batches * batch_size / (time.perf_counter() - started)


def forward_flops_per_slice(model):
    """Multiply-adds x 2 of the convolutions (all but a fraction of a percent of a U-Net's
    arithmetic) for one slice through the network. Training costs about 3x this (forward,
    gradient of the input, gradient of the weights)."""
    from keras import layers

    flops = 0
    for layer in model.layers:
        if isinstance(layer, (layers.Conv2D, layers.Conv2DTranspose)):
            kernel = layer.kernel.shape  # (kh, kw, in, out) for both kinds
            grid = layer.input.shape if isinstance(layer, layers.Conv2DTranspose) \
                else layer.output.shape  # a transposed conv applies its kernel per input pixel
            flops += 2 * grid[1] * grid[2] * kernel[0] * kernel[1] * kernel[2] * kernel[3]
    return flops


def default_precision(batch_size, image_size, threads):
    """The precision PRECISION="auto" trains the settings.py model in here, at this batch
    size and thread count: from the CPU flags, or on a CPU with AVX512_BF16 but no AMX as
    train_horovod.py times it (its record reused, or made for the next run). Call it after
    hardware.configure and before this process runs anything else in TensorFlow."""
    if not hardware.precision_is_timed("auto"):
        return hardware.resolve_precision("auto")
    import train_horovod

    run = train_horovod.cli.parse("bench", train_horovod.SETTINGS, [
        "--batch-size", str(batch_size)], train_horovod.HELP, train_horovod.ALIASES)
    images_shape, masks_shape = (1, image_size, image_size, 4), (1, image_size, image_size, 3)
    return train_horovod.timed_precision(run, images_shape, masks_shape, threads)[0]


def forward_flops(image_size):
    return forward_flops_per_slice(settings_unet(image_size, 4, 1))


# --- Report ----------------------------------------------------------------------------------
def print_table(results, flops):
    print(f"\n{'configuration (median over rounds)':<56} {'img/s':>8} {'GFLOP/s':>8}  "
          f"{'all rounds':<}")
    for name, img_s in results["configurations"].items():
        gflop_s = "" if name.startswith("data.py") else f"{img_s * 3 * flops / 1e9:8.1f}"
        every = " ".join(f"{v:.1f}" for v in results["rounds_img_s"].get(name, []))
        print(f"{name:<56} {img_s:8.1f} {gflop_s:>8}  {every}")
    print()
    for name, value in results["ratios"].items():
        print(f"{name:<60} {value:6.2f}")
    print()
    for line in results["memory"]["lines"]:
        print(line)
    print_kernel_times(results["onednn_kernel_ms_per_step"])
    for line in results.get("findings", []):
        print(line)


def print_kernel_times(by_precision):
    """oneDNN's time per training step by kernel, float32 beside bfloat16."""
    print("\noneDNN kernels, ms per training step (ONEDNN_VERBOSE)")
    for precision, profile in by_precision.items():
        print(f"  {precision}: {profile['total']:.1f} ms in all")
        for name, ms in list(profile["kernels"].items())[:6]:
            print(f"    {name:<84} {ms:7.1f}")
    ratio = by_precision["mixed_bfloat16"]["total"] / by_precision["float32"]["total"]
    print(f"  => bfloat16 kernels take {ratio:.2f}x the time of float32 kernels")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("--steps", type=int, default=40, help="measured steps per run")
    parser.add_argument("--repeats", type=int, default=3,
                        help="rounds over all configurations; medians are reported")
    parser.add_argument("--batch-size", type=int, default=16, help="per rank")
    parser.add_argument("--image-size", type=int, default=settings.IMAGE_SIZE)
    parser.add_argument("--train-slices", type=int, default=1024,
                        help="small dataset; the memory check also uses 4x this")
    parser.add_argument("--work-dir", default=None, help="scratch folder (default: a temp)")
    parser.add_argument("--diagnose", action="store_true",
                        help="measure why 2 ranks fall short even when they reach 90%%")
    parser.add_argument("--plain-fit-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--onednn-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", help=argparse.SUPPRESS)
    parser.add_argument("--precision", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain_fit_worker:
        return plain_fit_worker(args)
    if args.onednn_worker:
        return onednn_worker(args)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

    args.work_dir = args.work_dir or tempfile.mkdtemp(prefix="bench_training_")
    cores = len(os.sched_getaffinity(0))
    hardware.configure(cores, 1)  # this process's own TensorFlow: the timing, the FLOP count
    fast = default_precision(args.batch_size, args.image_size, cores)
    print(f"{cores} cores, default precision {fast} (AMX-BF16: "
          f"{hardware.cpu_has_fast_bfloat16()}, AVX512_BF16: {hardware.cpu_supports_bfloat16()}); "
          f"batch {args.batch_size} per rank, {args.steps} measured steps after a warm-up "
          f"epoch; scratch in {args.work_dir}",
          flush=True)
    small = make_dataset(os.path.join(args.work_dir, "small"), args.train_slices,
                         args.image_size)
    large = make_dataset(os.path.join(args.work_dir, "large"), 4 * args.train_slices,
                         args.image_size)
    flops = forward_flops(args.image_size)

    def step(name):
        print(f"  measuring {name} ...", flush=True)
        return name

    # Every configuration once per round, rounds alternating, so that a drift in machine
    # load hits all of them alike; the figures reported are the medians over the rounds.
    plain_name = f"plain keras fit, 1 process x {cores} threads, {fast}"
    other = "float32" if fast == "mixed_bfloat16" else "mixed_bfloat16"
    other_name = f"train_horovod 1 rank x {cores} threads, {other}"
    grid = [(ranks, threads) for ranks in (1, 2) for threads in range(1, cores // ranks + 1)]
    names = {(ranks, threads): f"train_horovod {ranks} rank{'s' * (ranks > 1)} x {threads} "
                               f"thread{'s' * (threads > 1)}, {fast}" for ranks, threads in grid}
    large_name = f"{names[(2, cores // 2)]}, {4 * args.train_slices} slices"
    rounds = {name: [] for name in [plain_name, *names.values(), other_name, large_name]}
    memory = {"small": [], "large": []}  # the 2-rank runs' memory lines, round by round
    for repeat in range(1, args.repeats + 1):
        print(f"  round {repeat}/{args.repeats}: {len(rounds)} configurations", flush=True)
        rounds[plain_name].append(plain_fit(args, small, fast, cores))
        for key, name in names.items():
            run_result = horovod(args, small, *key, fast)
            rounds[name].append(run_result["img_s"])
        memory["small"].append(run_result)  # the grid ends with 2 ranks x 1 thread
        rounds[other_name].append(horovod(args, small, 1, cores, other)["img_s"])
        memory["large"].append(horovod(args, large, 2, cores // 2, fast))
        rounds[large_name].append(memory["large"][-1]["img_s"])
    configurations = {name: statistics.median(rates) for name, rates in rounds.items()}
    sweep = {key: configurations[name] for key, name in names.items()}
    by_precision = {fast: sweep[(1, cores)], other: configurations[other_name]}
    step("data.py alone")
    data_img_s = data_pipeline_img_s(small, args.batch_size)
    configurations["data.py alone (no model)"] = data_img_s
    step("oneDNN kernel times per training step, float32 and mixed_bfloat16")
    kernels = {precision: onednn_kernel_ms(args, precision)
               for precision in ("float32", "mixed_bfloat16")}

    best_one_rank = max(sweep[(1, t)] for t in range(1, cores + 1))
    plain = configurations[plain_name]
    results = {
        "cores": cores, "default_precision": fast, "batch_size_per_rank": args.batch_size,
        "measured_steps": args.steps, "image_size": args.image_size, "repeats": args.repeats,
        "forward_gflop_per_slice": flops / 1e9,
        "plain_fit_img_s": plain,
        "hvd_1rank_img_s": sweep[(1, cores)],
        "hvd_2rank_img_s": sweep[(2, cores // 2)],
        "fp32_img_s": by_precision["float32"],
        "bf16_img_s": by_precision["mixed_bfloat16"],
        "data_pipeline_img_s": data_img_s,
        "threads_sweep_img_s": {f"{r}x{t}": v for (r, t), v in sweep.items()},
        "configurations": configurations,
        "rounds_img_s": rounds,
        "onednn_kernel_ms_per_step": kernels,
    }
    results["gflop_s"] = {name: v * 3 * flops / 1e9 for name, v in configurations.items()
                          if not name.startswith("data.py")}
    results["ratios"] = {
        "horovod 1 rank / plain fit (target >= 0.95)": results["hvd_1rank_img_s"] / plain,
        "2 ranks x 1 thread / best 1 rank (target >= 0.90)":
            results["hvd_2rank_img_s"] / best_one_rank,
        "data.py alone / best training rate (target >= 10)":
            data_img_s / max(v for k, v in configurations.items() if "data.py" not in k),
    }
    results["ratios"]["bf16 / float32 (target >= 1.8 with AMX)"] = \
        results["bf16_img_s"] / results["fp32_img_s"]
    # The same ratio within each round (the runs minutes apart, under the same load):
    one_rank_rounds = [horovod_rate / plain_rate for horovod_rate, plain_rate
                       in zip(rounds[names[(1, cores)]], rounds[plain_name])]
    results["hvd_1rank_over_plain_per_round"] = one_rank_rounds
    results["ratios"]["horovod 1 rank / plain fit, median of the rounds' ratios"] = \
        statistics.median(one_rank_rounds)
    results["memory"] = memory_summary(memory, args.train_slices)
    if (args.diagnose or results["hvd_2rank_img_s"] < 0.9 * best_one_rank) and cores >= 2:
        results["diagnosis"] = diagnose_two_ranks(args, small, fast, results["hvd_2rank_img_s"],
                                                  sweep[(1, 1)], best_one_rank)
        results["findings"] = results["diagnosis"].pop("findings")
    print_table(results, flops)
    if args.json:
        with open(args.json, "w") as file:
            json.dump(results, file, indent=2)
        print(f"\nWrote {args.json}")


def memory_summary(memory, train_slices):
    """Peak and anonymous resident memory of each rank, median over the rounds, on the small
    dataset and on the one 4x larger: with memory-mapped shards neither may grow."""
    summary = {"small_train_slices": train_slices, "large_train_slices": 4 * train_slices}
    for size in ("small", "large"):
        for kind in ("peak_rss_mib", "anon_rss_mib"):
            ranks = sorted(memory[size][0][kind])
            summary[f"{size}_{kind}"] = {
                rank: statistics.median(run[kind][rank] for run in memory[size])
                for rank in ranks}
    summary["lines"] = []
    for rank in sorted(summary["small_peak_rss_mib"]):
        small, large = summary["small_peak_rss_mib"][rank], summary["large_peak_rss_mib"][rank]
        summary["lines"].append(
            f"rank {rank}: peak RSS {small:.0f} MiB with {train_slices} slices, {large:.0f} MiB "
            f"with {4 * train_slices} (x{large / small:.2f}; anonymous "
            f"{summary['small_anon_rss_mib'][rank]:.0f} -> "
            f"{summary['large_anon_rss_mib'][rank]:.0f} MiB; medians of the rounds)")
    return summary


def diagnose_two_ranks(args, data_dir, precision, two_rank_img_s, one_by_one_img_s,
                       best_one_rank):
    """Why 2 ranks x 1 thread fall short: the same job unbound; with Horovod's cycle time
    at 0.1 ms and 20 ms instead of HOROVOD_CYCLE_TIME_MS (5 ms in settings.py; its
    background thread meets the other ranks in MPI every
    HOROVOD_CYCLE_TIME ms); with Open MPI busy-polling while it waits (train_horovod.py
    asks it to yield the core instead, OMPI_MCA_mpi_yield_when_idle=1); and two independent
    1-thread plain trainings, each pinned to a core, which have no Horovod at all: if they
    fall short too, the cores themselves slow down when both work (shared execution units,
    caches or memory bandwidth), not Horovod."""
    print("  diagnosing 2 ranks x 1 thread ...", flush=True)
    unbound = horovod(args, data_dir, 2, 1, precision, bind=False)["img_s"]
    short_cycle = horovod(args, data_dir, 2, 1, precision,
                          env={"HOROVOD_CYCLE_TIME": "0.1"})["img_s"]
    long_cycle = horovod(args, data_dir, 2, 1, precision,
                         env={"HOROVOD_CYCLE_TIME": "20"})["img_s"]
    busy_polling = horovod(args, data_dir, 2, 1, precision,
                           env={"OMPI_MCA_mpi_yield_when_idle": "0"})["img_s"]
    independent = run_in_parallel([
        lambda: plain_fit(args, data_dir, precision, 1, cpus="0"),
        lambda: plain_fit(args, data_dir, precision, 1, cpus="1")])
    alone = plain_fit(args, data_dir, precision, 1, cpus="0")
    together = sum(independent)
    findings = [
        "",
        "Why 2 ranks x 1 thread fall short of the best 1-rank configuration:",
        f"  2 ranks x 1 thread, bound:                 {two_rank_img_s:8.1f} img/s",
        f"  2 ranks x 1 thread, unbound:               {unbound:8.1f} img/s",
        f"  2 ranks, HOROVOD_CYCLE_TIME=0.1 ms:        {short_cycle:8.1f} img/s",
        f"  2 ranks, HOROVOD_CYCLE_TIME=20 ms:         {long_cycle:8.1f} img/s",
        f"  2 ranks, Open MPI busy-polling (yield 0):  {busy_polling:8.1f} img/s",
        f"  1 rank x 1 thread (Horovod), x 2:          {2 * one_by_one_img_s:8.1f} img/s",
        f"  plain fit, 1 thread, one core alone:       {alone:8.1f} img/s",
        f"  plain fit, 1 thread, both cores at once:   {together:8.1f} img/s "
        f"({independent[0]:.1f} + {independent[1]:.1f}; no Horovod)",
        f"  best 1 rank:                               {best_one_rank:8.1f} img/s",
        f"  => two busy cores give {together / (2 * alone):.2f}x two cores' worth of one busy "
        f"core; Horovod's share: {two_rank_img_s / together:.2f} of the independent runs",
    ]
    return {"unbound_img_s": unbound, "short_cycle_img_s": short_cycle,
            "long_cycle_img_s": long_cycle, "busy_polling_img_s": busy_polling,
            "independent_plain_1thread_img_s": independent, "plain_1thread_alone_img_s": alone,
            "findings": findings}


def run_in_parallel(calls):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(calls)) as pool:
        return [future.result() for future in [pool.submit(call) for call in calls]]


if __name__ == "__main__":
    main()
