"""Surviving a crash: a rank of a real 2-process mpirun run is SIGKILLed mid-epoch, the job must
go down (no hang), and rerunning the same command must continue from the last checkpoint
with the saved weights, ending exactly where an uninterrupted run ends (which also writes a
Horovod timeline)."""
import csv
import json
import os
import re
import signal
import subprocess
import threading
import time

import keras

import model  # noqa: F401  (registers the layers a training state holds)
from brainseg import checkpoints, weight_average  # noqa: F401  (and its optimizer)
from conftest import REPO_DIR, weights_fingerprints

LAUNCHER = os.path.join(REPO_DIR, "run_multinode.sh")
# float32: the uninterrupted and the resumed run must agree bit for bit. Dropout on: its
# masks must continue where the crashed run's stopped, not start again. A weight average
# on: it must continue too (the exported model is the average).
TRAIN_FLAGS = ["--epochs", "3", "--steps-per-epoch", "60", "--log-every-steps", "10",
               "--batch-size", "8", "--base-filters", "4", "--depth", "2", "--dropout", "0.3",
               "--precision", "float32", "--early-stopping-patience", "0",
               "--weight-average-momentum", "0.9"]


def launch(converted_dir, output_dir, *extra_flags):
    return subprocess.Popen(
        [LAUNCHER, "--", "--data-dir", str(converted_dir), "--output-dir", str(output_dir),
         *TRAIN_FLAGS, *extra_flags], cwd=REPO_DIR, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))


def run_to_end(converted_dir, output_dir, *extra_flags):
    job = launch(converted_dir, output_dir, *extra_flags)
    stdout, _ = job.communicate(timeout=240)
    assert job.returncode == 0, stdout
    return stdout


def rank_pid(launcher_pid, rank):
    """The pid of a rank among the launcher's descendants (launcher -> mpirun -> ranks), found
    by the rank number Open MPI puts in each rank's environment."""
    parents = dict(tuple(map(int, line.split())) for line in subprocess.run(
        ["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True).stdout.splitlines())

    def descends_from_launcher(pid):
        while pid > 1:
            pid = parents.get(pid, 0)
            if pid == launcher_pid:
                return True
        return False
    for pid in filter(descends_from_launcher, parents):
        try:
            with open(f"/proc/{pid}/environ", "rb") as file:
                if f"OMPI_COMM_WORLD_RANK={rank}".encode() in file.read().split(b"\0"):
                    return pid
        except OSError:  # exited meanwhile
            continue
    raise AssertionError(f"no rank {rank} among the processes of launcher {launcher_pid}")


def test_killed_rank_stops_the_job_and_the_rerun_resumes_exactly(converted_dir, tmp_path):
    output_dir = tmp_path / "run"
    job = launch(converted_dir, output_dir)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(job.stdout), daemon=True)
    reader.start()
    deadline = time.monotonic() + 180
    while not any("epoch 2 step 10/60" in line for line in lines):  # mid-epoch 2
        assert job.poll() is None, "".join(lines)
        assert time.monotonic() < deadline, "".join(lines)
        time.sleep(0.05)
    os.kill(rank_pid(job.pid, 1), signal.SIGKILL)
    killed_at = time.monotonic()
    assert job.wait(timeout=60) != 0  # mpirun takes the whole job down, within a minute
    reader.join(timeout=10)
    crashed_stdout = "".join(lines)
    assert time.monotonic() - killed_at < 60
    assert "final weights fingerprint" not in crashed_stdout

    with open(output_dir / checkpoints.STATE_RECORD) as file:
        record = json.load(file)
    assert record["epoch"] == 1, crashed_stdout
    saved = keras.models.load_model(output_dir / record["state_file"])
    assert int(saved.optimizer.iterations) == 60  # one epoch of steps: the schedule position
    saved_fingerprint = checkpoints.weights_fingerprint(saved)

    # Another epoch length would continue another schedule: refused, saying how to continue.
    refused = launch(converted_dir, output_dir, "--steps-per-epoch", "50")
    refused_stdout, _ = refused.communicate(timeout=120)
    assert refused.returncode != 0
    assert ": saved by 2 workers with 60 steps per epoch; this run has 2 and 50. Continue it " \
           "with 2 workers and --steps-per-epoch 60, or use another --train-dir" in refused_stdout
    assert "Traceback" not in refused_stdout

    resumed_stdout = run_to_end(converted_dir, output_dir)
    assert "after epoch 1 (step 60)" in resumed_stdout
    assert weights_fingerprints(resumed_stdout, "resumed") == {"0": saved_fingerprint,
                                                               "1": saved_fingerprint}
    assert not re.search(r"^epoch 1/3", resumed_stdout, re.MULTILINE)  # not trained again
    with open(output_dir / "training_log.csv") as file:
        assert [row["epoch"] for row in csv.DictReader(file)] == ["0", "1", "2"]
    assert [f for f in os.listdir(output_dir) if f.startswith("training_state_epoch")] == \
        ["training_state_epoch0003.keras"]

    # The reference run also writes a Horovod timeline (it does not change the numbers).
    timeline = tmp_path / "timeline.json"
    uninterrupted_stdout = run_to_end(converted_dir, tmp_path / "uninterrupted",
                                      "--timeline", str(timeline))
    assert '"name": "ALLREDUCE"' in timeline.read_text()
    final = weights_fingerprints(resumed_stdout)
    assert final["0"] == final["1"]
    assert final == weights_fingerprints(uninterrupted_stdout)
    exports = [keras.models.load_model(folder / checkpoints.EXPORT_NAME, compile=False)
               for folder in (output_dir, tmp_path / "uninterrupted")]
    assert checkpoints.weights_fingerprint(exports[0]) == \
        checkpoints.weights_fingerprint(exports[1])
    assert checkpoints.weights_fingerprint(exports[0]) != final["0"]  # the average
