"""A hung rank must not hang the job, and a stopped launcher must leave nothing running.

Real 2-process mpirun jobs under run_multinode.sh: a rank stopped with SIGSTOP (rank 1, and
rank 0, Horovod's coordinator) must make the job exit non-zero within the stall timeout and a
margin, with a message naming the stopped rank, no process of the job left (the stopped one
included), the last checkpoint unchanged and a rerun resuming from it. A rank whose main
thread blocks while its Horovod thread runs on (as in a read from a dead NFS mount) must be
named by Horovod's stall check. And a SIGTERM to run_multinode.sh while it checks the hosts,
copies the data or trains must end everything it started.

Every process of a job carries a marker in its environment, so that `ps` finds them all:
the launcher, preflight, the launch agent and rsync, mpirun and the ranks.
"""
import hashlib
import os
import re
import signal
import subprocess
import threading
import time
import uuid

import pytest

from brainseg import checkpoints, watchdog
from conftest import REPO_DIR, launch_command, weights_fingerprints
from test_multihost import assert_checkpoint_intact
from test_resume import LAUNCHER, TRAIN_FLAGS, rank_pid

# Small, so that the test is short; above twice the longest pause between two steps of
# these tiny runs (about 5 s, the first step's compilation, on a loaded 2-core machine).
STALL_TIMEOUT = 12
# From a rank stopped to the job's exit: the timeout, then the watchdog's poll (1 s), its
# question to the other ranks (ANSWER_SECONDS) and mpirun's teardown (measured: 14 s in all
# with a 10 s timeout).
EXIT_BOUND = STALL_TIMEOUT + watchdog.ANSWER_SECONDS + 15
MARKER = "HANG_TEST_JOB"


@pytest.fixture
def job_marker(monkeypatch):
    """A value of MARKER in this test's environment, inherited by every process it starts;
    whatever still carries it after the test (when it failed) is killed."""
    value = uuid.uuid4().hex
    monkeypatch.setenv(MARKER, value)
    yield value
    for line in job_processes(value):
        try:
            os.kill(int(line.split()[0]), signal.SIGKILL)
        except ProcessLookupError:
            pass


def job_processes(marker):
    """`ps` lines (pid, state, command and environment) of the processes carrying the marker:
    `ps e` prints each process's environment after its command. (ps itself runs without it.)"""
    listing = subprocess.run(["ps", "-e", "e", "-ww", "-o", "pid=,stat=,args="],
                             capture_output=True, text=True, check=True,
                             env={k: v for k, v in os.environ.items() if k != MARKER}).stdout
    return [line[:200] for line in listing.splitlines() if f"{MARKER}={marker}" in line]


def assert_nothing_left(marker, within=10):
    """No process of the job within `within` seconds (an ended process may take a moment to
    be reaped); a stopped rank shows as state T."""
    deadline = time.monotonic() + within
    while job_processes(marker) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert job_processes(marker) == []


class Output:
    """A process's merged stdout and stderr, read by a thread as it comes."""

    def __init__(self, process):
        self.lines = []
        self._reader = threading.Thread(target=lambda: self.lines.extend(process.stdout),
                                        daemon=True)
        self._reader.start()

    def wait_for(self, text, process, timeout=180):
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.lines):
            assert process.poll() is None, f"ended before '{text}':\n{self.text()}"
            assert time.monotonic() < deadline, f"no '{text}' within {timeout} s:\n{self.text()}"
            time.sleep(0.05)

    def text(self):
        self._reader.join(timeout=0.1)
        return "".join(self.lines)


def checkpoint_digest(output_dir):
    """SHA-256 of the committed training state, the state file it names and the best
    model: what a rerun resumes from."""
    state = checkpoints.load_state(str(output_dir))
    digest = hashlib.sha256()
    for path in (os.path.join(output_dir, checkpoints.STATE_RECORD), state.path,
                 os.path.join(output_dir, checkpoints.EXPORT_NAME)):
        with open(path, "rb") as file:
            digest.update(file.read())
    return digest.hexdigest()


def launch_training(output_dir, converted_dir, *extra_flags):
    """run_multinode.sh training as test_resume.py launches it, with a small stall timeout."""
    return subprocess.Popen(
        [LAUNCHER, "--", "--data-dir", str(converted_dir), "--output-dir", str(output_dir),
         *TRAIN_FLAGS, "--stall-timeout-seconds", str(STALL_TIMEOUT), *extra_flags],
        cwd=REPO_DIR, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))


def launch_hang_rank(converted_dir, tmp_path, stall_timeout, extra_flags, environment):
    """The launcher's mpirun command running tests/hang_rank.py, which blocks a rank where
    `environment` says."""
    return subprocess.Popen(
        [*launch_command("hang_rank.py"), "--data-dir", str(converted_dir),
         "--output-dir", str(tmp_path / "run"), *TRAIN_FLAGS, *extra_flags,
         "--stall-timeout-seconds", str(stall_timeout)],
        cwd=REPO_DIR, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=REPO_DIR, **environment))


@pytest.mark.parametrize("stopped_rank", [1, 0])
def test_a_stopped_rank_stops_the_job_and_the_rerun_resumes(converted_dir, tmp_path,
                                                            job_marker, stopped_rank):
    """SIGSTOP on a rank in the middle of epoch 2: the other rank's watchdog ends the job
    and names the stopped rank, mpirun kills the stopped one, the checkpoint of epoch 1 is
    untouched, and the same command resumes from it."""
    output_dir = tmp_path / "run"
    job = launch_training(output_dir, converted_dir)
    output = Output(job)
    output.wait_for("epoch 2 step 10/60", job)
    before = checkpoint_digest(output_dir)
    os.kill(rank_pid(job.pid, stopped_rank), signal.SIGSTOP)
    stopped_at = time.monotonic()
    try:
        returncode = job.wait(timeout=EXIT_BOUND)
    except subprocess.TimeoutExpired:
        job.kill()  # the launcher only: the ranks would stay, stopped, for assert_nothing_left
        pytest.fail(f"the job still runs {EXIT_BOUND} s after rank {stopped_rank} stopped:\n"
                    f"{output.text()}\n" + "\n".join(job_processes(job_marker)))
    took = time.monotonic() - stopped_at
    print(f"job exited {took:.1f} s after rank {stopped_rank} was stopped")  # pytest -s
    text = output.text()
    assert returncode != 0, text
    waiting_rank = 1 - stopped_rank
    assert re.search(rf"watchdog: rank {waiting_rank} on \S+ made no progress for "
                     rf"{STALL_TIMEOUT} s", text), text
    assert re.search(rf"watchdog: rank {stopped_rank} on \S+ did not answer within .*: "
                     r"presumed stuck", text), text
    assert_nothing_left(job_marker)
    assert checkpoint_digest(output_dir) == before
    state = assert_checkpoint_intact(output_dir)
    assert state.progress.epoch == 1

    rerun = launch_training(output_dir, converted_dir)
    rerun_output, _ = rerun.communicate(timeout=240)
    assert rerun.returncode == 0, rerun_output
    assert f"Resuming from {state.path} after epoch 1 (step 60)" in rerun_output
    resumed = weights_fingerprints(rerun_output, "resumed")
    assert sorted(resumed) == ["0", "1"] and len(set(resumed.values())) == 1, rerun_output
    final = weights_fingerprints(rerun_output)
    assert sorted(final) == ["0", "1"] and len(set(final.values())) == 1, rerun_output
    assert checkpoints.load_state(str(output_dir)).progress.epoch == 3


def test_a_rank_blocked_in_its_main_thread_is_named_by_horovod(converted_dir, tmp_path,
                                                             job_marker):
    """Rank 1's main thread blocks before a batch (tests/hang_rank.py: as a read from a dead
    NFS mount would) while its Horovod thread runs on: Horovod's stall check, set from the
    stall timeout, names rank 1 as missing ("1!") and shuts down before the watchdog's
    timeout, and the job exits non-zero."""
    timeout = 20  # Horovod shuts down after 10 s without the rank, checking every 2 s
    job = launch_hang_rank(converted_dir, tmp_path, timeout, [],
                           {"HANG_RANK": "1", "HANG_AT_BATCH": "80"})
    output = Output(job)
    output.wait_for("rank 1: blocking before batch 80", job)
    blocked_at = time.monotonic()
    returncode = job.wait(timeout=timeout + 30)
    took = time.monotonic() - blocked_at
    print(f"job exited {took:.1f} s after rank 1 blocked")  # pytest -s
    text = output.text()
    assert returncode != 0, text
    assert re.search(r"^1!: \[", text, re.MULTILINE), text  # Horovod: rank 1 is missing
    shutdown = text.index("is stalled for longer than 10 seconds. Will shutdown.")
    # Horovod acted first (within 0.8 of the timeout); a watchdog may still speak while the
    # job is torn down, but it must not blame a rank for not answering.
    assert "watchdog:" not in text[:shutdown], text
    assert "presumed stuck" not in text, text
    assert took < timeout + 10, text
    assert_nothing_left(job_marker)


def test_a_rank_stuck_while_timing_the_precision_stops_the_job(converted_dir, tmp_path,
                                                               job_marker):
    """PRECISION "auto" timed on a fresh node (tests/hang_rank.py): the rank that took the
    record's lock blocks while it times, the other waits for the lock. Neither is fed, so a
    watchdog ends the job within the stall timeout and a margin, saying what it waited for,
    and nothing of the job is left."""
    job = launch_hang_rank(converted_dir, tmp_path, STALL_TIMEOUT, ["--precision", "auto"],
                           {"XDG_CACHE_HOME": str(tmp_path / "cache"),
                            "HANG_WHILE_TIMING_PRECISION": "1"})
    output = Output(job)
    output.wait_for("blocking while timing the training precision", job)
    blocked_at = time.monotonic()
    try:
        returncode = job.wait(timeout=EXIT_BOUND)
    except subprocess.TimeoutExpired:
        job.kill()
        pytest.fail(f"the job still runs {EXIT_BOUND} s after a rank blocked:\n"
                    f"{output.text()}\n" + "\n".join(job_processes(job_marker)))
    text = output.text()
    assert returncode != 0, text
    assert re.search(rf"watchdog: rank \d on \S+ made no progress for {STALL_TIMEOUT} s "
                     r"\(last finished: reading the data; next, the training precision",
                     text), text
    assert time.monotonic() - blocked_at < EXIT_BOUND
    assert_nothing_left(job_marker)


def slow_agent(tmp_path, slow_on):
    """A launch agent that hangs (a child `sleep`, as an unreachable ssh would) when the
    remote command contains `slow_on`, and otherwise does nothing and succeeds."""
    agent = tmp_path / "slow_agent.sh"
    agent.write_text(f'#!/bin/sh\ncase "$*" in *{slow_on}*) sleep 300 ;; esac\nexit 0\n')
    agent.chmod(0o755)
    return agent


@pytest.mark.parametrize("phase", ["preflight", "sync", "training"])
def test_terminating_the_launcher_ends_everything_it_started(converted_dir, tmp_path,
                                                            job_marker, phase):
    """SIGTERM to run_multinode.sh while preflight waits for a host's report, while rsync
    copies the data, or while the ranks train: it exits non-zero, saying so, and no process
    it started is left (preflight, the agent and its children, rsync, mpirun, the ranks)."""
    hosts = tmp_path / "hosts.txt"
    hosts.write_text("192.0.2.254 slots=2\n" if phase != "training" else "localhost slots=2\n")
    launcher_flags = []
    if phase == "preflight":
        launcher_flags = ["--agent", str(slow_agent(tmp_path, "preflight.py"))]
    elif phase == "sync":
        launcher_flags = ["--agent", str(slow_agent(tmp_path, "rsync")), "--sync-data"]
    launcher = subprocess.Popen(
        [LAUNCHER, "--hosts", str(hosts), *launcher_flags, "--", "--data-dir",
         str(converted_dir), "--output-dir", str(tmp_path / "run"), *TRAIN_FLAGS],
        cwd=REPO_DIR, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    output = Output(launcher)
    if phase == "training":
        output.wait_for("epoch 1 step 10/60", launcher)
    else:
        deadline = time.monotonic() + 60
        while not any(" sleep 300 " in line for line in job_processes(job_marker)):
            assert launcher.poll() is None, output.text()
            assert time.monotonic() < deadline, job_processes(job_marker)
            time.sleep(0.1)
    launcher.send_signal(signal.SIGTERM)
    try:
        returncode = launcher.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the launcher still runs 30 s after SIGTERM:\n{output.text()}")
    assert returncode != 0
    assert_nothing_left(job_marker)
    assert "stopped by a signal. Rerun the same command" in output.text(), output.text()
