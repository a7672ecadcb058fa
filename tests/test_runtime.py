"""brainseg/runtime.py: OpenVINO predicts TensorFlow's masks on a trained checkpoint, its
converted model is cached beside the checkpoint, reused, and rebuilt when the checkpoint
changes; the runtime and precision settings."""
import os
import shutil

import keras
import nibabel as nib
import numpy as np
import pytest

import inference
import model as unet
from brainseg import atomic, checkpoints, dataset, hardware, metrics, runtime, synthetic
from conftest import SMALL_IMAGE_SIZE, SMALL_SHAPE


@pytest.fixture()
def checkpoint(trained_run, tmp_path):
    """A copy of the session's trained checkpoint: its cache lands in this test's folder."""
    path = tmp_path / "model.keras"
    shutil.copy(trained_run[0] / "model.keras", path)
    return str(path)


def masks(model, imgs):
    return inference.predict(model, imgs, batch_size=64)[0] > 0.5


def assert_same_masks(expected, found):
    """Dice >= 0.99 between the two runtimes' masks, region by region (two empty masks agree:
    the tiny model finds no enhancing tumor); the whole tumor must be found, or any runtime
    would agree with any other."""
    assert expected[..., 0].sum() > 100, "the trained model predicts no tumor"
    for region in range(expected.shape[-1]):
        assert metrics.dice(expected[..., region], found[..., region]) >= 0.99


@pytest.mark.parametrize("precision", ["auto", "float32"])
def test_openvino_predicts_the_masks_of_tensorflow(checkpoint, converted_dir, precision):
    # the training split: the test split's 2 small cases hold a few dozen tumor pixels
    imgs = np.asarray(dataset.open_split(str(converted_dir), "train")[0], np.float32)
    tensorflow_model, _ = runtime.load(checkpoint, "tensorflow", "float32",
                                       inference.load_checkpoint)
    openvino_model, description = runtime.load(checkpoint, "openvino", precision,
                                               inference.load_checkpoint)
    assert description.startswith("runtime: OpenVINO")
    assert openvino_model.input_shape == tensorflow_model.input_shape
    assert openvino_model.output_shape == tensorflow_model.output_shape
    assert_same_masks(masks(tensorflow_model, imgs), masks(openvino_model, imgs))


def test_both_runtimes_write_the_same_segmentation(checkpoint, tmp_path, capsys):
    """The --inference-runtime flag through inference.py's whole NIfTI path."""
    synthetic.write_dataset(str(tmp_path / "raw"), 1, seed=5, shape=SMALL_SHAPE)
    case = "BraTS20_Training_001"
    labels = {}
    for name in ("tensorflow", "openvino"):
        inference.main(["--input", str(tmp_path / "raw" / case), "--checkpoint", checkpoint,
                        "--inference-runtime", name, "--inference-precision", "float32",
                        "--output-dir", str(tmp_path / name), "--lesion-wise", "false",
                        # With the default MIN_LESION_MM3 (500) the tiny test model's tumor
                        # on these 5 mm voxels was all removed: compare the runtimes without.
                        "--min-lesion-mm3", "0"])
        assert f"runtime: {'OpenVINO' if name == 'openvino' else 'TensorFlow'}" in \
            capsys.readouterr().out
        labels[name] = np.asarray(nib.load(tmp_path / name / f"{case}.nii.gz").dataobj)
    assert (labels["tensorflow"] > 0).sum() > 100
    assert metrics.dice(labels["tensorflow"] > 0, labels["openvino"] > 0) >= 0.99


# --- The cache ---------------------------------------------------------------------------------

class CountingLoader:
    """inference.load_checkpoint, counting the calls: each one is a conversion."""

    def __init__(self):
        self.calls = 0

    def __call__(self, path):
        self.calls += 1
        return inference.load_checkpoint(path)


def test_the_converted_model_is_reused_and_rebuilt_when_the_checkpoint_changes(
        checkpoint, converted_dir):
    loader = CountingLoader()
    first, converted = runtime.cached_ir(checkpoint, loader)
    assert converted and loader.calls == 1
    assert os.path.dirname(os.path.dirname(first)) == checkpoint + runtime.CACHE_SUFFIX
    again, converted = runtime.cached_ir(checkpoint, loader)
    assert (again, converted, loader.calls) == (first, False, 1)

    os.utime(checkpoint, (1, 1))  # a new time stamp alone (a copy, a touch): same model
    assert runtime.cached_ir(checkpoint, loader) == (first, False)

    # Retrained: new weights under the same file name and time stamp.
    stat = os.stat(checkpoint)
    model = inference.load_checkpoint(checkpoint)
    model.set_weights([weights * 0.5 for weights in model.get_weights()])
    atomic.replace_atomically(checkpoint, model.save)
    os.utime(checkpoint, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    rebuilt, converted = runtime.cached_ir(checkpoint, loader)
    assert converted and loader.calls == 2 and rebuilt != first
    assert not os.path.exists(os.path.dirname(first))  # the stale entry is gone
    imgs = np.asarray(dataset.open_split(str(converted_dir), "test")[0][:64], np.float32)
    served = runtime.OpenVINOModel(rebuilt, "f32", threads=1).predict_on_batch(imgs)
    np.testing.assert_allclose(served, model.predict_on_batch(imgs), atol=1e-4)


def test_a_bfloat16_trained_checkpoint_is_converted_in_float32(tmp_path):
    """OpenVINO's precision is chosen when compiling: the IR must not carry bfloat16 casts,
    or --inference-precision float32 would still compute in bfloat16."""
    keras.mixed_precision.set_dtype_policy("mixed_bfloat16")
    try:
        net = unet.build_unet(SMALL_IMAGE_SIZE, 4, 3, base_filters=4, depth=2)
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    checkpoints.export_for_inference(net, str(tmp_path / "bf16.keras"))
    ir_path, _ = runtime.cached_ir(str(tmp_path / "bf16.keras"), inference.load_checkpoint)
    images = np.random.default_rng(3).normal(size=(8, SMALL_IMAGE_SIZE, SMALL_IMAGE_SIZE, 4))
    images = images.astype(np.float32)
    served = runtime.OpenVINOModel(ir_path, "f32", threads=1).predict_on_batch(images)
    float32 = hardware.in_precision(net, "float32").predict_on_batch(images)
    np.testing.assert_allclose(served, float32, atol=1e-5)


def test_a_run_that_loses_the_race_to_build_the_cache_uses_the_winners(checkpoint):
    """Two runs converting one checkpoint at once: the second rename finds the first's
    entry, keeps it, and leaves no temporary folder behind."""
    entry = os.path.dirname(runtime.cached_ir(checkpoint, inference.load_checkpoint)[0])
    before = {name: os.path.getmtime(os.path.join(entry, name)) for name in os.listdir(entry)}
    runtime.build_entry(entry, inference.load_checkpoint(checkpoint))
    assert {name: os.path.getmtime(os.path.join(entry, name))
            for name in os.listdir(entry)} == before
    assert os.listdir(os.path.dirname(entry)) == [os.path.basename(entry)]


def test_a_failed_conversion_leaves_no_entry(checkpoint, monkeypatch):
    def fail(keras_model, folder):
        open(os.path.join(folder, runtime.IR_NAME), "w").close()
        raise RuntimeError("conversion failed")
    monkeypatch.setattr(runtime, "export_ir", fail)
    with pytest.raises(RuntimeError):
        runtime.cached_ir(checkpoint, inference.load_checkpoint)
    assert os.listdir(checkpoint + runtime.CACHE_SUFFIX) == []


def test_a_cache_that_cannot_be_written_is_named(checkpoint, monkeypatch):
    def full_disk(keras_model, folder):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(runtime, "export_ir", full_disk)
    with pytest.raises(ValueError, match=f"{checkpoint}.openvino: cannot write .* No space"):
        runtime.cached_ir(checkpoint, inference.load_checkpoint)


# --- Settings ----------------------------------------------------------------------------------

def test_auto_is_openvino_where_it_is_installed(monkeypatch):
    assert runtime.resolve_runtime("auto") == "openvino"
    assert runtime.resolve_runtime("tensorflow") == "tensorflow"
    monkeypatch.setattr(runtime, "openvino_installed", lambda: False)
    assert runtime.resolve_runtime("auto") == "tensorflow"
    with pytest.raises(ValueError, match="openvino package is not installed"):
        runtime.resolve_runtime("openvino")
    with pytest.raises(ValueError, match="runtime must be one of"):
        runtime.resolve_runtime("onnx")


def test_openvino_precision_follows_the_setting(tmp_path):
    avx512_bf16, plain = tmp_path / "bf16", tmp_path / "plain"
    avx512_bf16.write_text("flags\t\t: fpu sse2 avx512f avx512_bf16\n")
    plain.write_text("flags\t\t: fpu sse2 avx2\n")
    assert runtime.openvino_precision("auto", str(avx512_bf16)) is None  # measured
    assert runtime.openvino_precision("auto", str(plain)) == "f32"
    assert runtime.openvino_precision("float32", str(avx512_bf16)) == "f32"
    assert runtime.openvino_precision("mixed_bfloat16", str(plain)) == "bf16"
    with pytest.raises(ValueError, match="precision must be one of"):
        runtime.openvino_precision("int8")


def test_auto_compiles_the_precision_measured_faster_and_remembers_it_per_cpu(
        checkpoint, tmp_path, monkeypatch):
    ir_path, _ = runtime.cached_ir(checkpoint, inference.load_checkpoint)
    xeon, epyc = tmp_path / "xeon", tmp_path / "epyc"
    xeon.write_text("model name\t: Intel(R) Xeon(R)\nflags\t\t: avx512f avx512_bf16\n")
    epyc.write_text("model name\t: AMD EPYC\nflags\t\t: avx512f avx512_bf16\n")
    timed = []

    def bf16_slower(model):  # what the Xeon without AMX measured
        timed.append(model.precision)
        return {"f32": 1.0, "bf16": 1.3}[model.precision]
    monkeypatch.setattr(runtime, "seconds_per_batch", bf16_slower)
    assert runtime.fastest_model(ir_path, 1, str(xeon)).precision == "f32"
    assert sorted(timed) == ["bf16", "f32"]
    assert runtime.fastest_model(ir_path, 1, str(xeon)).precision == "f32"  # recorded
    assert len(timed) == 2

    monkeypatch.setattr(runtime, "seconds_per_batch", lambda model: {"f32": 1.0, "bf16": 0.5}[
        model.precision])
    chosen = runtime.fastest_model(ir_path, 1, str(epyc))  # another CPU: measured again
    assert chosen.precision == "bf16"
    assert runtime.fastest_model(ir_path, 1, str(xeon)).precision == "f32"
    assert hardware.cpu_id(str(xeon)) != hardware.cpu_id(str(epyc))
    records = sorted(name for name in os.listdir(os.path.dirname(ir_path))
                     if name.startswith("precision-") and name.endswith(".json"))
    assert len(records) == 2  # (the real timing runs in the "auto" test above)


def test_tensorflow_auto_predicts_in_the_precision_measured_faster_and_remembers_it(
        checkpoint, tmp_path, monkeypatch):
    """On a CPU with AVX512_BF16 but no AMX, TensorFlow's "auto" times both precisions once
    per CPU, TensorFlow and checkpoint; the model it returns computes in the faster."""
    monkeypatch.setattr(hardware, "CACHE_DIR", str(tmp_path / "cache"))
    epyc = tmp_path / "epyc"
    epyc.write_text("model name\t: AMD EPYC\nflags\t\t: avx512f avx512_bf16\n")
    timed = []

    def bf16_faster(model):  # what the AMD EPYC measured (1.34x)
        policy = model.layers[1].dtype_policy.name
        timed.append(policy)
        return {"float32": 1.34, "mixed_bfloat16": 1.0}[policy]
    monkeypatch.setattr(runtime, "seconds_per_batch", bf16_faster)
    trained = inference.load_checkpoint(checkpoint)
    for _ in range(2):  # measured, then recorded
        chosen = runtime.faster_keras_model(checkpoint, trained, str(epyc))
        assert chosen.layers[1].dtype_policy.name == "mixed_bfloat16"
        assert chosen.layers[-1].dtype_policy.name == "float32"
    assert sorted(timed) == ["float32", "mixed_bfloat16"]
    assert len(os.listdir(tmp_path / "cache")) == 2  # the record and its lock

    # load() goes through it for "auto" where the flags cannot tell, and only there.
    monkeypatch.setattr(hardware, "precision_is_timed", lambda precision: precision == "auto")
    model, said = runtime.load(checkpoint, "tensorflow", "auto", inference.load_checkpoint)
    assert said == "runtime: TensorFlow, mixed_bfloat16 (the faster here)"
    model, said = runtime.load(checkpoint, "tensorflow", "float32", inference.load_checkpoint)
    assert said == "runtime: TensorFlow, float32"
    assert len(timed) == 2 + 2 * (hardware.cpu_id() != hardware.cpu_id(str(epyc)))


def test_a_missing_checkpoint_is_named_whatever_the_runtime(converted_dir, tmp_path):
    with pytest.raises(SystemExit, match=f"{tmp_path / 'none.keras'}: checkpoint not found"):
        inference.main(["--data-dir", str(converted_dir), "--checkpoint",
                        str(tmp_path / "none.keras"), "--output-dir", str(tmp_path / "out"),
                        "--inference-runtime", "openvino"])
