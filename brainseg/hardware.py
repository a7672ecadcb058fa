"""What this CPU can do and how to use it: threads per process, bfloat16, model precision.

Threads. More intra-op threads than cores makes ranks on the same node fight over the cores; the
seed project hand-tuned 57 threads on 68-core nodes. Here 0 means "work it out": the cores
in this process's CPU affinity (what mpirun binding gave it), or, when it is not bound, the
node's cores shared evenly between the ranks on the node.

Precision. AMX tiles (Sapphire Rapids and later) roughly double the float32 rate, so with AMX
PRECISION = "auto" trains in bfloat16. AVX512_BF16 alone can go either way: on an Intel Xeon
VM (bench/training.py, reference U-Net, batch 16, 2 threads) mixed_bfloat16 trained at 0.67x
float32, oneDNN's avx512_core_bf16 convolutions themselves taking 1.62x the time of its
float32 avx512_core ones; on an AMD EPYC VM the same kernels took 0.57x and training ran
1.34-1.40x faster. So on such a CPU "auto" is timed: train_horovod.py times a training step in
both precisions once and records the faster (recorded_choice). Without either flag TensorFlow
emulates bfloat16, and "auto" is float32.

Memory. glibc gives every block above 32 MB its own mapping and unmaps it when freed, so the
next volume-sized array is page-faulted and zeroed by the kernel again: keep_freed_memory.
NumPy asks the kernel for 2 MB pages for every array of 4 MB or more, each zeroed (and made
room for) when first touched: avoid_huge_pages.
"""
import contextlib
import ctypes
import fcntl
import hashlib
import json
import os

import numpy as np

from brainseg import atomic

PRECISIONS = ("auto", "float32", "mixed_bfloat16")
FAST_BF16_CPU_FLAGS = ("amx_bf16",)
# Timed on a CPU with AVX512_BF16 but no AMX, bfloat16 must train this much faster to be
# chosen: the CPUs measured so far were far from it either way (0.67x and 1.34x).
BF16_MIN_SPEEDUP = 1.1
# Where a CPU's measured choices are recorded (the Horovod wheel is cached here too).
CACHE_DIR = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                         "unet-horovod")


# mallopt(3) parameters (malloc.h)
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4


def keep_freed_memory():
    """Serves large arrays from the heap and keeps freed heap memory for the next one,
    instead of a fresh mapping per array that the kernel must fault in and zero again (glibc
    maps every block above 32 MB and unmaps it on free). A process that makes the same few
    volume-sized arrays case after case then reuses the same pages: the converter's system
    time on 32 BraTS cases fell from 6.0 to 1.1 s with 1 worker and from 7.4 to 2.6 s with 2;
    its peak memory is 8-19% higher (bench/converter.py), still flat in the number of cases.
    Forked workers inherit it. Returns False where the C library is not glibc (it then
    changes nothing)."""
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2 ** 30))


def avoid_huge_pages():
    """Stops NumPy from advising the kernel to back every array of 4 MB or more with 2 MB
    pages (transparent huge pages; this host grants them on request). Each fault then zeroes
    2 MB, and the kernel compacts memory to find them, again for every case's new arrays:
    reading a case for inference took 0.17-0.71 s for the same files, up to 0.5 s of it
    system time. With this and keep_freed_memory, inference segments a case in 1.30 s,
    against 1.58-1.62 with the heap kept alone and 1.75-1.91 with neither (reading it: 0.24,
    0.46, 0.59 s; OpenVINO, medians of 6 cases in one process). Not in the converter: there
    the system time fell (4.2 -> 3.1 s for 32 cases, 2 workers) by about what the user time
    rose (16.8 -> 18.1 s, more TLB misses over its larger arrays), and its wall time did not
    move (11.7 against 11.9 s, medians of 4 alternating rounds)."""
    # NumPy's switch for it (private; the variable NUMPY_MADVISE_HUGEPAGE=0 sets it at import)
    advice = getattr(np._core.multiarray, "_set_madvise_hugepage", None)
    if advice:
        advice(False)


def cores_for_this_process(ranks_on_node=1):
    available = len(os.sched_getaffinity(0))
    if available == os.cpu_count() and ranks_on_node > 1:
        available //= ranks_on_node  # unbound: share the node
    return max(1, available)


def resolve(intra_threads, inter_threads, ranks_on_node=1):
    """(intra, inter) thread counts, replacing 0 by the automatic choice: one intra-op thread
    per owned core, and 1 inter-op thread (a U-Net is a chain of big ops; running two at
    once only splits the same cores), 2 when there are 8 cores or more."""
    cores = cores_for_this_process(ranks_on_node)
    intra = intra_threads or cores
    inter = inter_threads or (2 if cores >= 8 else 1)
    return intra, inter


def configure(intra_threads, inter_threads, ranks_on_node=1):
    """Applies the thread counts to TensorFlow. Must run before TensorFlow executes its first
    operation (it raises RuntimeError otherwise, rather than silently ignoring them)."""
    import tensorflow as tf

    intra, inter = resolve(intra_threads, inter_threads, ranks_on_node)
    # OpenMP builds of TensorFlow (Intel's) size their pool from OMP_NUM_THREADS when the
    # first op runs, i.e. after this; stock TensorFlow ignores it. The launcher's value wins.
    os.environ.setdefault("OMP_NUM_THREADS", str(intra))
    tf.config.threading.set_intra_op_parallelism_threads(intra)
    tf.config.threading.set_inter_op_parallelism_threads(inter)
    return intra, inter


def cpuinfo_lines(prefixes, cpuinfo_path="/proc/cpuinfo"):
    """The lines of /proc/cpuinfo that start with one of `prefixes` (one per core); none
    where there is no such file (not Linux: no way to tell)."""
    try:
        with open(cpuinfo_path) as file:
            return [line for line in file if line.startswith(prefixes)]
    except OSError:
        return []


def cpu_flags(cpuinfo_path="/proc/cpuinfo"):
    """The CPU feature flags Linux lists in /proc/cpuinfo; empty elsewhere."""
    return {word for line in cpuinfo_lines("flags", cpuinfo_path) for word in line.split()}


def cpu_id(cpuinfo_path="/proc/cpuinfo"):
    """A short hash of the CPU's model name and feature flags: what a speed measured on one
    machine can be reused for on the next (a cluster's nodes, a cache beside a checkpoint)."""
    described = "".join(sorted(set(cpuinfo_lines(("model name", "flags"), cpuinfo_path))))
    return hashlib.sha256(described.encode()).hexdigest()[:12]


def cpu_supports_bfloat16(cpuinfo_path="/proc/cpuinfo"):
    """True when the CPU does bfloat16 arithmetic in hardware (AVX512_BF16 or AMX-BF16),
    whether or not that is faster than float32 (see cpu_has_fast_bfloat16)."""
    return bool(cpu_flags(cpuinfo_path) & {"avx512_bf16", "amx_bf16"})


def cpu_has_fast_bfloat16(cpuinfo_path="/proc/cpuinfo"):
    """True when /proc/cpuinfo lists AMX-BF16: bfloat16 matrix tiles, where mixed precision
    pays. With AVX512_BF16 alone it is slower than float32 (see FAST_BF16_CPU_FLAGS), and
    without either TensorFlow emulates bfloat16."""
    return bool(cpu_flags(cpuinfo_path) & set(FAST_BF16_CPU_FLAGS))


def resolve_precision(precision, cpuinfo_path="/proc/cpuinfo"):
    """The Keras dtype policy name for a PRECISION setting: 'auto' becomes mixed_bfloat16
    when the CPU has AMX-BF16, float32 otherwise."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if precision == "auto":
        return "mixed_bfloat16" if cpu_has_fast_bfloat16(cpuinfo_path) else "float32"
    return precision


def precision_is_timed(precision, cpuinfo_path="/proc/cpuinfo"):
    """True when "auto" cannot tell from the CPU flags which precision is faster: AVX512_BF16
    without AMX (see the module docstring)."""
    return (precision == "auto" and cpu_supports_bfloat16(cpuinfo_path)
            and not cpu_has_fast_bfloat16(cpuinfo_path))


@contextlib.contextmanager
def _locked(path):
    """An exclusive flock on `path` while the block runs; none where the file cannot be made
    (a read-only cache) or locked (ENOLCK: a network filesystem without locks): the block then
    runs unlocked."""
    with contextlib.ExitStack() as stack:
        with contextlib.suppress(OSError):
            file = stack.enter_context(open(path, "a"))
            fcntl.flock(file, fcntl.LOCK_EX)  # released when the file is closed
        yield


def recorded_choice(record, choices, measure):
    """(choice, "recorded" or "measured"): the choice recorded in the JSON file `record` when
    it is one of `choices`, else measure() -> (choice, details), recorded there with its
    details for the next run. Processes asking at once (the ranks of a node) take turns under
    a lock beside the record, so one measures, alone on the cores, and the others read what
    it found. A record that cannot be read or written only means measuring again next time."""
    with contextlib.suppress(OSError):
        os.makedirs(os.path.dirname(record), exist_ok=True)
    with _locked(record + ".lock"):
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            with open(record) as file:
                choice = json.load(file)["choice"]
            if choice in choices:
                return choice, "recorded"
        choice, details = measure()
        with contextlib.suppress(OSError):
            atomic.write_json(record, {"choice": choice, **details})
    return choice, "measured"


def faster_training_precision(seconds_per_step):
    """(policy, details) for recorded_choice: mixed_bfloat16 when seconds_per_step(policy),
    a timed training step, is BF16_MIN_SPEEDUP times shorter in it than in float32."""
    seconds = {policy: seconds_per_step(policy) for policy in ("float32", "mixed_bfloat16")}
    faster = seconds["float32"] >= BF16_MIN_SPEEDUP * seconds["mixed_bfloat16"]
    return "mixed_bfloat16" if faster else "float32", {"seconds_per_step": seconds}


def set_precision(precision):
    """Sets the global Keras dtype policy; call it before building the model. Under
    mixed_bfloat16 layers compute in bfloat16 but keep float32 weights (the optimizer updates
    those), the output layer is float32 (see model.build_unet) and the losses cast to float32. No
    loss scaling: bfloat16 has float32's exponent range, so gradients do not underflow."""
    import keras

    policy = resolve_precision(precision)
    keras.mixed_precision.set_dtype_policy(policy)
    return policy


def in_precision(model, precision):
    """The model computing in the given precision ("auto" resolved for this CPU), sharing
    nothing with the original but the weights' values: a clone whose layers take the policy,
    the output layer kept in float32 (sigmoid and losses need the range). The model itself
    when it already computes in that precision. precision None keeps each layer's own policy
    (a plain copy, e.g. a training model without its optimizer). The clone is made of stock
    Keras layers."""
    import keras

    policy = resolve_precision(precision) if precision else None
    if policy is not None and policy == model.layers[1].dtype_policy.name:
        return model

    def clone_layer(layer):
        config = layer.get_config()
        if policy and layer.name != model.layers[-1].name and \
                not isinstance(layer, keras.layers.InputLayer):
            config["dtype"] = policy
        # Stock Keras layers only: a layer that only trains differently names the stock
        # class it stands for (model.FusedBatchNormalization), so exported models load
        # anywhere.
        return getattr(layer, "STOCK_LAYER", layer.__class__).from_config(config)
    clone = keras.models.clone_model(model, clone_function=clone_layer)
    clone.set_weights(model.get_weights())
    return clone
