"""Shared fixtures: a few small synthetic BraTS cases, converted once per test session.

Small volumes (48x48x24) and 32x32 slices keep the suite fast; the code paths are the ones
the full-size demo runs.
"""
import json
import os
import re
import shlex
import shutil
import subprocess
import time

import pytest

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import converter
from brainseg import synthetic

SMALL_SHAPE = (48, 48, 24)
SMALL_IMAGE_SIZE = 32
SMALL_CROP_SIZE = 48
NUM_CASES = 6


def children(pid):
    """The pids of a process's children, whichever of its threads started them (/proc)."""
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as file:
            found += [int(child) for child in file.read().split()]
    return found


def alive(pid):
    """Whether a process is running (not gone, not a zombie awaiting its parent's wait)."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            return file.read().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def convert(raw_dir, out_dir, *extra):
    converter.main(["--raw-dir", str(raw_dir), "--out-dir", str(out_dir),
                    "--image-size", str(SMALL_IMAGE_SIZE), "--crop-size", str(SMALL_CROP_SIZE),
                    *extra])


@pytest.fixture(scope="session")
def raw_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("raw")
    synthetic.write_dataset(str(root), NUM_CASES, seed=7, shape=SMALL_SHAPE)
    return root


def case_names(root):
    """The case folders of a release (not the generator's hidden marker file)."""
    return sorted(name for name in os.listdir(root) if not name.startswith("."))


def file_of(folder, kind):
    """A case folder's file of one kind (flair, t1, t1ce, t2, seg)."""
    return next(folder / name for name in os.listdir(folder) if f"_{kind}." in name)


def read_arrays(out_dir):
    """{file name: bytes} of every .npy in a converted folder."""
    return {name: (out_dir / name).read_bytes() for name in sorted(os.listdir(out_dir))
            if name.endswith(".npy")}


@pytest.fixture()
def raw_copy(raw_dir, tmp_path):
    """A copy of the session's release that a test may damage."""
    copy = tmp_path / "raw"
    shutil.copytree(raw_dir, copy)
    return copy


@pytest.fixture(scope="session")
def converted_dir(raw_dir, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("converted")
    convert(raw_dir, out_dir)
    return out_dir


def run(command, timeout):
    """Runs a command from the repository root; returns the CompletedProcess."""
    environment = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    return subprocess.run(command, cwd=REPO_DIR, capture_output=True, text=True,
                          timeout=timeout, env=environment)


def weights_fingerprints(output, kind="final"):
    """{rank: fingerprint} from the "rank N: <kind> weights fingerprint HEX" lines that
    train_horovod.py prints on every rank (kind: "final" or "resumed")."""
    return dict(re.findall(rf"rank (\d+): {kind} weights fingerprint ([0-9a-f]{{16}})", output))


def launch_command(script):
    """run_multinode.sh's own mpirun command on this machine (--dry-run), running `script`
    (a tests/ wrapper that injects a fault or fakes a CPU) in place of train_horovod.py."""
    dry_run = subprocess.run([os.path.join(REPO_DIR, "run_multinode.sh"), "--dry-run"],
                             capture_output=True, text=True, check=True, timeout=60)
    return [os.path.join(REPO_DIR, "tests", script) if word.endswith("train_horovod.py")
            else word for word in shlex.split(dry_run.stdout)]


TINY_MODEL = ["--base-filters", "4", "--depth", "2", "--batch-size", "8"]
# The session's trained run (trained_run): 40 steps per epoch (an epoch of the 6 small cases
# is 6), enough for the tiny U-Net to find the tumor, not just to output probabilities near
# one half. Its weight average spans about the last 10 steps: the default's 100 would be most
# of these 160, the steps before the tiny network found the tumor included.
TRAINED_RUN_FLAGS = ["--epochs", "4", "--steps-per-epoch", "40", "--learning-rate", "3e-3",
                     "--weight-average-momentum", "0.9", *TINY_MODEL]


@pytest.fixture(scope="session")
def trained_run(converted_dir, tmp_path_factory):
    """(output folder, stdout) of a real 2-process run_multinode.sh training of a tiny U-Net
    on the converted synthetic cases; its model.keras serves the inference tests."""
    output_dir = tmp_path_factory.mktemp("train")
    result = run([os.path.join(REPO_DIR, "run_multinode.sh"), "--",
                  "--data-dir", str(converted_dir), "--output-dir", str(output_dir),
                  *TRAINED_RUN_FLAGS], timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return output_dir, result.stdout


# --- Launches across namespace hosts (test_multihost.py, test_engines.py) ------------------

LAUNCH_TIMEOUT = 240  # seconds for a tiny multi-host training, start to end, under load


def finish(process, log_path, timeout=LAUNCH_TIMEOUT):
    """(exit status, output) of a launch writing to log_path; fails the test, with the
    output, if it has not ended within `timeout` (a distributed job must never hang a test)."""
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"the launch did not finish within {timeout} s:\n{log_path.read_text()}")
    return process.returncode, log_path.read_text()


def assert_nothing_left_running(cluster, within=15):
    """No process is left on any host of `cluster` (its all_pids()) after `within` s."""
    deadline = time.monotonic() + within
    while any(cluster.all_pids().values()) and time.monotonic() < deadline:
        time.sleep(0.2)
    leftovers = {namespace: [open(f"/proc/{pid}/cmdline").read().replace("\0", " ")[:120]
                             for pid in pids if os.path.exists(f"/proc/{pid}")]
                 for namespace, pids in cluster.all_pids().items() if pids}
    assert not leftovers, f"processes left behind: {leftovers}"


def wait_for_epochs(output_dir, epochs, process, log_path, timeout=LAUNCH_TIMEOUT):
    """Waits until the training state records `epochs` finished epochs."""
    record = os.path.join(output_dir, "training_state.json")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, f"training ended early:\n{log_path.read_text()}"
        if os.path.exists(record):
            with open(record) as file:
                if json.load(file)["epoch"] >= epochs:
                    return
        time.sleep(0.1)
    pytest.fail(f"no checkpoint of epoch {epochs} within {timeout} s")


def rank_pid(cluster, host_index, rank):
    """The pid of the training process of `rank` on host `host_index`: its rank is in its
    environment, from mpirun (OMPI_COMM_WORLD_RANK) or horovodrun (HOROVOD_RANK)."""
    wanted = {f"OMPI_COMM_WORLD_RANK={rank}".encode(), f"HOROVOD_RANK={rank}".encode()}
    for pid in cluster.pids(host_index):
        try:
            with open(f"/proc/{pid}/environ", "rb") as file:
                environment = set(file.read().split(b"\0"))
            with open(f"/proc/{pid}/cmdline", "rb") as file:
                argv = file.read().split(b"\0")
        except FileNotFoundError:
            continue
        # The Python process itself, not a shell whose command line names the script.
        if b"python" in os.path.basename(argv[0]) and b"train_horovod.py" in b" ".join(argv) \
                and wanted & environment:
            return pid
    pytest.fail(f"no rank {rank} on host {cluster.hosts[host_index]}")
