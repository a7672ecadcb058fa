"""brainseg/hardware.py: thread counts from the cores a process owns, the precision policy
from the CPU flags or timed and recorded, and a model cloned into another precision."""
import json
import multiprocessing
import os
import time

import keras
import numpy as np
import pytest

import model as unet
from brainseg import hardware


@pytest.mark.parametrize("flags,expected,timed", [
    ("fpu sse avx512f avx512_bf16 amx_bf16 amx_tile", "mixed_bfloat16", False),
    ("fpu sse avx512f avx512_bf16", "float32", True),  # either may be faster without AMX
    ("fpu sse avx512f", "float32", False)])
def test_auto_precision_follows_the_cpu_flags(tmp_path, flags, expected, timed):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: {flags}\n\n"
                       f"processor\t: 1\nflags\t\t: {flags}\n")
    assert hardware.resolve_precision("auto", str(cpuinfo)) == expected
    assert hardware.precision_is_timed("auto", str(cpuinfo)) == timed
    assert not hardware.precision_is_timed("float32", str(cpuinfo))
    assert hardware.cpu_supports_bfloat16(str(cpuinfo)) == ("bf16" in flags)
    assert hardware.resolve_precision("float32", str(cpuinfo)) == "float32"
    assert hardware.resolve_precision("auto", str(tmp_path / "absent")) == "float32"
    with pytest.raises(ValueError, match="bfloat16"):
        hardware.resolve_precision("float16")


@pytest.mark.parametrize("float32_seconds,expected", [
    (1.34, "mixed_bfloat16"),  # the AMD EPYC without AMX
    (1.05, "float32"),  # within the noise: not worth a change of numerics
    (0.67, "float32")])  # the Intel Xeon without AMX
def test_bfloat16_trains_when_timed_clearly_faster(float32_seconds, expected):
    seconds = {"float32": float32_seconds, "mixed_bfloat16": 1.0}
    choice, details = hardware.faster_training_precision(seconds.get)
    assert choice == expected
    assert details == {"seconds_per_step": seconds}


def test_a_choice_is_measured_once_then_read_from_its_record(tmp_path):
    record = str(tmp_path / "cache" / "choice.json")
    measured = []

    def measure():
        measured.append(1)
        return "b", {"seconds": {"a": 2.0, "b": 1.0}}
    assert hardware.recorded_choice(record, ("a", "b"), measure) == ("b", "measured")
    assert json.load(open(record)) == {"choice": "b", "seconds": {"a": 2.0, "b": 1.0}}
    assert hardware.recorded_choice(record, ("a", "b"), measure) == ("b", "recorded")
    assert len(measured) == 1
    # A record naming no valid choice (another version's, or damaged) is measured again.
    for content in ('{"choice": "c"}', "{not json", '["b"]'):
        with open(record, "w") as file:
            file.write(content)
        assert hardware.recorded_choice(record, ("a", "b"), measure) == ("b", "measured")
    assert len(measured) == 4


def test_a_choice_that_cannot_be_recorded_is_still_made(tmp_path):
    not_a_folder = tmp_path / "file"  # (read-only folders do not stop root)
    not_a_folder.write_text("")
    record = str(not_a_folder / "choice.json")
    for _ in range(2):
        assert hardware.recorded_choice(record, ("a",), lambda: ("a", {})) == ("a", "measured")


def test_a_filesystem_without_locks_only_means_choosing_unlocked(tmp_path, monkeypatch):
    def no_locks(file, operation):
        raise OSError(37, "No locks available")  # ENOLCK: an NFS mount without lockd
    monkeypatch.setattr(hardware.fcntl, "flock", no_locks)
    record = str(tmp_path / "choice.json")
    assert hardware.recorded_choice(record, ("a",), lambda: ("a", {})) == ("a", "measured")
    assert hardware.recorded_choice(record, ("a",), lambda: ("b", {})) == ("a", "recorded")


def _choose_slowly(record, log):
    def measure():
        with open(log, "a") as file:
            file.write("measured\n")
        time.sleep(1)
        return "a", {}
    hardware.recorded_choice(record, ("a",), measure)


def test_processes_asking_at_once_measure_once(tmp_path):
    """The ranks of a node start together: one times, alone on the cores, and the others
    wait for its record rather than time beside it."""
    record, log = str(tmp_path / "choice.json"), str(tmp_path / "log")
    processes = [multiprocessing.get_context("fork").Process(target=_choose_slowly,
                                                             args=(record, log))
                 for _ in range(3)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    assert open(log).read() == "measured\n"


def test_threads_zero_means_the_cores_this_process_owns(monkeypatch):
    cores = len(os.sched_getaffinity(0))
    assert hardware.resolve(0, 0, ranks_on_node=1)[0] == cores
    assert hardware.resolve(3, 2, ranks_on_node=1) == (3, 2)
    # On a 16-core node: unbound ranks share the node's cores; a bound rank uses its own.
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert hardware.resolve(0, 0, ranks_on_node=2) == (8, 2)
    assert hardware.resolve(0, 0, ranks_on_node=32) == (1, 1)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {4, 5, 6})
    assert hardware.resolve(0, 0, ranks_on_node=4) == (3, 1)


def test_bfloat16_predicts_like_float32():
    keras.utils.set_random_seed(0)
    net = unet.build_unet(32, 4, 1, base_filters=4, depth=2)
    bf16 = hardware.in_precision(net, "mixed_bfloat16")
    assert bf16.layers[1].dtype_policy.name == "mixed_bfloat16"
    assert bf16.layers[-1].dtype_policy.name == "float32"
    slices = np.random.default_rng(0).normal(size=(4, 32, 32, 4)).astype(np.float32)
    np.testing.assert_allclose(bf16.predict_on_batch(slices), net.predict_on_batch(slices),
                               atol=0.05)
    assert hardware.in_precision(net, "float32") is net


FAULTS_OF_REPEATED_ARRAYS = """
import resource, sys
import numpy as np
from brainseg import hardware
kept = hardware.keep_freed_memory() if sys.argv[1] == "keep" else None
if sys.argv[1] == "keep":
    hardware.avoid_huge_pages()
faults = []
for _ in range(6):  # a volume-sized array made and freed, case after case
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    volume = np.ones((240, 240, 155), np.float32)  # 36 MB: above glibc's mmap threshold
    del volume
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(kept, sum(faults[1:]), np._core.multiarray._get_madvise_hugepage())
"""


def test_kept_memory_serves_the_next_volume_without_page_faults():
    """Without keep_freed_memory every 36 MB array is a fresh mapping the kernel faults in
    (and zeroes) again; with it, the arrays after the first reuse the same heap pages (and
    with avoid_huge_pages, NumPy no longer asks for 2 MB pages)."""
    import subprocess
    import sys

    def faults(mode):
        output = subprocess.run([sys.executable, "-c", FAULTS_OF_REPEATED_ARRAYS, mode],
                                capture_output=True, text=True, check=True,
                                cwd=os.path.dirname(os.path.dirname(__file__))).stdout.split()
        return output[0], int(output[1]), output[2]
    kept, with_kept, huge_pages_kept = faults("keep")
    _, without, huge_pages_plain = faults("plain")
    assert (huge_pages_plain, huge_pages_kept) == ("True", "False")
    if kept == "False":
        pytest.skip("not glibc: keep_freed_memory changes nothing")
    assert without >= 5 * 8  # each of 5 arrays faulted, if only in 2 MB huge pages
    assert with_kept * 10 < without, (with_kept, without)
