"""The inference runtime: TensorFlow, or OpenVINO, Intel's runtime built for CPU inference.

OpenVINO predicts the same masks faster on a CPU (measured with bench/inference.py on quiet
2-core hosts without AMX: 1.16-1.31x TensorFlow float32 in float32; in bfloat16 2.28x on an
AMD EPYC, 1.01x on a Xeon, so "auto" times both on the CPU at hand). INFERENCE_RUNTIME =
"auto" uses it when the `openvino` package is installed, TensorFlow otherwise.

OpenVINO runs a model converted to its own format (IR: an .xml graph and a .bin of weights).
Converting takes seconds and needs TensorFlow, so it is done once per checkpoint and the IR
cached next to it, in `<checkpoint>.openvino/<key>/`. The key is the SHA-256 of the
checkpoint's bytes (a retrained or copied-over checkpoint never meets a stale cache, whatever
its time stamp says), with the OpenVINO version and CACHE_FORMAT. An entry is built in a
temporary folder and renamed into place whole, so a reader sees a complete entry or none, and
two runs racing to build the same entry both end up using one of them. On a cache hit neither
TensorFlow nor the Keras checkpoint is loaded at all, which is most of a run's start-up.

OpenVINO's compiled-model cache (its CACHE_DIR property) is not used: it saved 0.07 s of a
0.1 s compilation here, for 15 MB per model and precision.
"""
import contextlib
import functools
import hashlib
import importlib.util
import os
import secrets
import shutil
import time

import numpy as np

from brainseg import atomic, hardware

RUNTIMES = ("auto", "tensorflow", "openvino")
CACHE_SUFFIX = ".openvino"
CACHE_FORMAT = 1  # bump when the conversion below changes, so old entries are rebuilt
IR_NAME = "model.xml"  # the graph; OpenVINO writes the weights beside it as model.bin
OPENVINO_PRECISIONS = {"float32": "f32", "mixed_bfloat16": "bf16"}


def openvino_installed():
    return importlib.util.find_spec("openvino") is not None


def resolve_runtime(runtime):
    """"tensorflow" or "openvino" for an INFERENCE_RUNTIME setting: "auto" is OpenVINO when the
    package is installed. Asking for OpenVINO without it is an error, not a silent fallback."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
    if runtime == "auto":
        return "openvino" if openvino_installed() else "tensorflow"
    if runtime == "openvino" and not openvino_installed():
        raise ValueError("runtime openvino: the openvino package is not installed "
                         "(pip install -r requirements.txt)")
    return runtime


def openvino_precision(precision, cpuinfo_path="/proc/cpuinfo"):
    """OpenVINO's INFERENCE_PRECISION_HINT for an INFERENCE_PRECISION setting, or None for
    "auto" on a CPU with bfloat16 in hardware (AVX512_BF16 or AMX): whether it pays there is
    measured (fastest_model), not told by the flags. OpenVINO's bfloat16 ran the U-Net at 1.97x
    its float32 on an AMD EPYC with AVX512_BF16 (259 against 132 slices/s) and at 0.78x on a
    Xeon with AVX512_BF16 but no AMX (95 against 122); its masks agree with TensorFlow
    float32's at Dice 0.9996. Without bfloat16 in hardware "auto" is float32."""
    if precision == "auto":
        return None if hardware.cpu_supports_bfloat16(cpuinfo_path) else "f32"
    if precision not in OPENVINO_PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(hardware.PRECISIONS)}, "
                         f"got {precision!r}")
    return OPENVINO_PRECISIONS[precision]


# --- The converted-model cache -----------------------------------------------------------------

def checkpoint_digest(path):
    """SHA-256 (hex) of a checkpoint's bytes: 0.03 s for a 23 MB U-Net."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_folder(checkpoint):
    return os.path.abspath(checkpoint) + CACHE_SUFFIX


def cache_entry(checkpoint, digest):
    """The folder holding the IR of this checkpoint content for this OpenVINO version."""
    import openvino

    version = openvino.get_version().split("-")[0]
    return os.path.join(cache_folder(checkpoint),
                        f"{digest[:32]}-ov{version}-f{CACHE_FORMAT}")


def export_ir(keras_model, folder):
    """Writes the float32 forward pass of a Keras model as OpenVINO IR into folder. Keras
    traces it with TensorFlow and hands the graph to openvino.convert_model, in memory. A
    bfloat16-trained model is exported in float32 too: OpenVINO's precision is chosen when
    compiling (INFERENCE_PRECISION_HINT), which bfloat16 casts in the graph would override."""
    float32_model = hardware.in_precision(keras_model, "float32")
    float32_model.export(os.path.join(folder, IR_NAME), format="openvino", verbose=False)


def build_entry(entry, keras_model):
    """Converts into a temporary folder beside entry, flushes it, and renames it to entry.
    If another run got there first, its entry is kept (the same checkpoint bytes make the
    same model) and ours removed."""
    parent = os.path.dirname(entry)
    os.makedirs(parent, exist_ok=True)
    temporary = os.path.join(parent, atomic.PARTIAL_PREFIX + secrets.token_hex(8))
    os.mkdir(temporary)  # not mkdtemp: its 0700 would keep the cache from other users
    try:
        export_ir(keras_model, temporary)
        for name in os.listdir(temporary):
            atomic.fsync_path(os.path.join(temporary, name))
        try:
            os.rename(temporary, entry)  # fails if entry exists: a racing run built it
        except OSError:
            if not os.path.isfile(os.path.join(entry, IR_NAME)):
                raise
        atomic.fsync_path(parent)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def remove_stale_entries(entry):
    """Removes the entries of earlier checkpoint contents (and leftovers of interrupted
    builds older than a day): each holds a copy of the model's weights."""
    parent, keep = os.path.split(entry)
    for name in os.listdir(parent):
        path = os.path.join(parent, name)
        if name == keep:
            continue
        if name.startswith(atomic.PARTIAL_PREFIX):
            with contextlib.suppress(OSError):
                if os.path.getmtime(path) > time.time() - 86400:
                    continue  # perhaps a build in progress in another run
        shutil.rmtree(path, ignore_errors=True)


def cached_ir(checkpoint, load_keras):
    """(path of the OpenVINO IR of this checkpoint, whether it was converted now). Converts
    on a cache miss: load_keras(checkpoint) loads the Keras model (and reports a bad file in
    the caller's words). The digest is taken again after loading, so a checkpoint replaced
    while it was read is never cached under the other content's key."""
    digest = checkpoint_digest(checkpoint)
    entry = cache_entry(checkpoint, digest)
    converted = not os.path.isfile(os.path.join(entry, IR_NAME))
    if converted:
        keras_model = load_keras(checkpoint)
        if checkpoint_digest(checkpoint) != digest:
            raise ValueError(f"{checkpoint}: changed while it was being read; run again")
        try:
            build_entry(entry, keras_model)
        except OSError as error:  # a read-only or full filesystem, say
            raise ValueError(f"{cache_folder(checkpoint)}: cannot write the converted OpenVINO "
                             f"model beside the checkpoint ({error}); make the folder "
                             f"writable or use --inference-runtime tensorflow") from error
        remove_stale_entries(entry)
    return os.path.join(entry, IR_NAME), converted


# --- Models with one interface -------------------------------------------------------------------

class OpenVINOModel:
    """A compiled OpenVINO model with the part of the Keras model interface inference uses:
    input_shape, output_shape and predict_on_batch. One synchronous request with the
    LATENCY hint (one stream using every thread): a U-Net batch of 64 slices keeps all the
    cores busy on its own, and was measured 2x faster than the THROUGHPUT hint's streams
    fed one request at a time."""

    def __init__(self, ir_path, precision_hint, threads):
        import openvino

        core = openvino.Core()
        self.compiled = core.compile_model(ir_path, "CPU", {
            "INFERENCE_PRECISION_HINT": precision_hint, "PERFORMANCE_HINT": "LATENCY",
            "INFERENCE_NUM_THREADS": threads})
        self.request = self.compiled.create_infer_request()
        self.input_shape = _shape(self.compiled.input(0).get_partial_shape())
        self.output_shape = _shape(self.compiled.output(0).get_partial_shape())
        self.precision = precision_hint

    def predict_on_batch(self, batch):
        self.request.infer({0: batch})
        return self.request.get_output_tensor(0).data.copy()


def _shape(partial_shape):
    return tuple(None if dimension.is_dynamic else dimension.get_length()
                 for dimension in partial_shape)


def seconds_per_batch(model, batch_size=16, repeats=3):
    """The best of `repeats` timed predictions of a batch of zeros, after one warm-up (the
    first inference allocates): a convolutional network's time does not depend on the values."""
    batch = np.zeros((batch_size, *model.input_shape[1:]), np.float32)
    model.predict_on_batch(batch)
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        model.predict_on_batch(batch)
        timings.append(time.perf_counter() - started)
    return min(timings)


def fastest_of(record, builders):
    """The model, of builders {choice: () -> model}, that predicts faster: all are built and
    timed the first time and the faster choice recorded in `record` (hardware.recorded_choice),
    so later runs build only that one."""
    models = {}

    def measure():
        models.update({choice: build() for choice, build in builders.items()})
        seconds = {choice: seconds_per_batch(model) for choice, model in models.items()}
        return min(seconds, key=seconds.get), {"seconds_per_batch": seconds}
    choice, _ = hardware.recorded_choice(record, builders, measure)
    return models.get(choice) or builders[choice]()


def fastest_model(ir_path, threads, cpuinfo_path="/proc/cpuinfo"):
    """The IR compiled in float32 or bfloat16, whichever predicts faster on this CPU: both are
    timed the first time (about a second for the U-Net) and the choice is recorded in the
    cache entry per CPU model (precision-<cpu id>.json), so later runs compile only that one."""
    record = os.path.join(os.path.dirname(ir_path),
                          f"precision-{hardware.cpu_id(cpuinfo_path)}.json")
    return fastest_of(record, {hint: functools.partial(OpenVINOModel, ir_path, hint, threads)
                               for hint in OPENVINO_PRECISIONS.values()})


def faster_keras_model(checkpoint, keras_model, cpuinfo_path="/proc/cpuinfo"):
    """The Keras model in float32 or bfloat16, whichever predicts faster with TensorFlow on
    this CPU (with AVX512_BF16 but no AMX either can: bfloat16 ran at 1.34x float32 on an AMD
    EPYC). Timed the first time, about two seconds, and recorded per CPU model, TensorFlow
    version and checkpoint content in hardware.CACHE_DIR."""
    import tensorflow as tf

    record = os.path.join(hardware.CACHE_DIR, f"inference-precision-"
                          f"{hardware.cpu_id(cpuinfo_path)}-tf{tf.__version__}-"
                          f"{checkpoint_digest(checkpoint)[:16]}.json")
    return fastest_of(record, {policy: functools.partial(hardware.in_precision, keras_model,
                                                         policy)
                               for policy in hardware.PRECISIONS[1:]})


def load(checkpoint, runtime, precision, load_keras, threads=0):
    """(model with input_shape, output_shape and predict_on_batch, a line saying what runs).
    TensorFlow: the Keras model in the given precision (hardware.in_precision), for "auto"
    on a CPU with AVX512_BF16 but no AMX the faster of the two (faster_keras_model). OpenVINO:
    the cached IR (converted now if needed), compiled for this CPU with the given number of
    threads (0: hardware.resolve's choice), in the precision asked for or, for "auto" on a
    CPU with bfloat16 in hardware, the faster of the two (fastest_model)."""
    runtime = resolve_runtime(runtime)
    if runtime == "tensorflow":
        if hardware.precision_is_timed(precision):
            keras_model = faster_keras_model(checkpoint, load_keras(checkpoint))
            precision_said = f"{keras_model.layers[1].dtype_policy.name} (the faster here)"
        else:
            keras_model = hardware.in_precision(load_keras(checkpoint), precision)
            precision_said = keras_model.layers[1].dtype_policy.name
        return keras_model, f"runtime: TensorFlow, {precision_said}"
    ir_path, converted = cached_ir(checkpoint, load_keras)
    hint = openvino_precision(precision)
    threads = threads or hardware.resolve(0, 0)[0]
    if hint is None:
        model = fastest_model(ir_path, threads)
        precision_said = f"{model.precision} (the faster on this CPU)"
    else:
        model = OpenVINOModel(ir_path, hint, threads)
        precision_said = hint
    return model, (f"runtime: OpenVINO, {precision_said}, model "
                   f"{'converted into' if converted else 'from'} {os.path.dirname(ir_path)}")
