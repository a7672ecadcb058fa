"""Training submitted to a real Slurm cluster: slurmctld and one slurmd per network-namespace
host on this machine (brainseg/slurm_cluster.py), munge authentication, Open MPI's own Slurm
support. The job is the project's scripts/slurm_example.sbatch, submitted as the README tells a
user to; its hosts and slots come from the allocation, not hosts.txt.
"""
import os
import time

import pytest
from conftest import REPO_DIR, weights_fingerprints
from test_multihost import (
    FAULT_RUN_EPOCHS,
    assert_checkpoint_intact,
    checkpoint_epoch,
    fault_run_flags,
)

from brainseg import slurm, slurm_cluster

pytestmark = [pytest.mark.multihost, pytest.mark.slurm]

SBATCH_SCRIPT = os.path.join(REPO_DIR, "scripts", "slurm_example.sbatch")
JOB_TIMEOUT = 300
# MPI over TCP between the hosts only (no shared memory), as in tests/test_multihost.py.
JOB_ENVIRONMENT = {"OMPI_MCA_btl": "tcp,self", "TF_CPP_MIN_LOG_LEVEL": "2"}


@pytest.fixture
def cluster(tmp_path):
    """A 2-node Slurm cluster, stopped (every daemon, every namespace) after the test."""
    reason = slurm_cluster.unavailable_reason()
    if reason:
        pytest.skip(reason)
    with slurm_cluster.slurm_cluster(2, tmp_path / "slurm") as started:
        yield started


def submit(cluster, log_path, train_flags, wait):
    """sbatch of the project's script from the project folder, one task per node; returns the
    job id (after the job ended, with wait)."""
    command = ["sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1",
               f"--output={log_path}", *(["--wait"] if wait else []),
               SBATCH_SCRIPT, *train_flags]
    cluster.environment.update(JOB_ENVIRONMENT)
    result = cluster.run(command, cwd=REPO_DIR, check=False, timeout=JOB_TIMEOUT)
    job_id = result.stdout.strip().split(";")[0]
    assert job_id.isdigit(), f"sbatch failed: {result.stderr}"
    return job_id


def training_processes(cluster):
    """{host index: pids} of train_horovod.py processes still running on each host."""
    found = {}
    for index in range(len(cluster.nodes)):
        for pid in cluster.cluster.pids(index):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as file:
                    if b"train_horovod.py" in file.read():
                        found.setdefault(index, []).append(pid)
            except FileNotFoundError:
                continue
    return found


def wait_until(condition, timeout, failure):
    """Polls condition(); fails with failure() (a message made only then) after timeout s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    pytest.fail(f"{failure()} (waited {timeout} s)")


def test_tasks_per_node_expands_slurm_counts():
    assert slurm.tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert slurm.tasks_per_node("4") == [4]
    with pytest.raises(ValueError, match="cannot read '2x3'"):
        slurm.tasks_per_node("2x3")


def test_sbatch_trains_on_the_allocation(cluster, converted_dir, tmp_path):
    """sbatch --wait on 2 nodes: the launcher takes the job's nodes as hosts, both ranks end
    with the same weights, rank 0 writes the checkpoint, and Slurm records exit code 0."""
    output_dir = tmp_path / "run"
    log_path = tmp_path / "job.out"
    flags = ["--data-dir", str(converted_dir), "--output-dir", str(output_dir),
             "--epochs", "2", "--steps-per-epoch", "3", "--base-filters", "4", "--depth", "2",
             "--batch-size", "4"]
    job_id = submit(cluster, log_path, flags, wait=True)
    output = log_path.read_text()
    first, second = cluster.nodes
    assert f"Launching 2 workers on {first}:1,{second}:1" in output, output
    assert f"preflight: checking {first}, {second}" in output, output
    prints = weights_fingerprints(output)
    assert sorted(prints) == ["0", "1"] and len(set(prints.values())) == 1, output
    assert checkpoint_epoch(output_dir) == 2
    assert_checkpoint_intact(output_dir)
    record = cluster.completion_record(job_id)
    assert record and record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", record
    assert record["NodeCnt"] == "2"
    assert not training_processes(cluster)


def test_scancel_stops_every_rank_and_resubmitting_resumes(cluster, converted_dir, tmp_path):
    output_dir = tmp_path / "run"
    flags = fault_run_flags(converted_dir, output_dir)
    job_id = submit(cluster, tmp_path / "job.out", flags, wait=False)
    record = output_dir / "training_state.json"
    wait_until(lambda: record.exists() and checkpoint_epoch(output_dir) >= 1, JOB_TIMEOUT,
               lambda: f"job {job_id} checkpointed no epoch: {cluster.job_fields(job_id)}")
    assert set(training_processes(cluster)) == {0, 1}, "a rank on each node"

    cluster.run(["scancel", job_id])
    cancelled_at = time.monotonic()
    wait_until(lambda: not training_processes(cluster), 60,
               lambda: f"ranks still running after scancel: {training_processes(cluster)}")
    print(f"every rank gone {time.monotonic() - cancelled_at:.1f} s after scancel")
    wait_until(lambda: cluster.job_fields(job_id)["JobState"] == "CANCELLED", 60,
               lambda: f"the job is not recorded as cancelled: {cluster.job_fields(job_id)}")
    state = assert_checkpoint_intact(output_dir)
    assert state.progress.epoch < FAULT_RUN_EPOCHS

    log_path = tmp_path / "resubmitted.out"
    job_id = submit(cluster, log_path, flags, wait=True)
    output = log_path.read_text()
    assert f"Resuming from {state.path} after epoch {state.progress.epoch}" in output, output
    prints = weights_fingerprints(output)
    assert sorted(prints) == ["0", "1"] and len(set(prints.values())) == 1, output
    assert checkpoint_epoch(output_dir) == FAULT_RUN_EPOCHS
    assert cluster.completion_record(job_id)["ExitCode"] == "0:0"
