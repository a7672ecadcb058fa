"""run_multinode.sh across hosts with addresses of their own: network namespaces on this
machine (tests/netns.py), reached with scripts/netns_rsh.sh as the launch agent.

The launcher runs on the first host, as a user would on a cluster's first node. MPI is
limited to its TCP transport on the namespaces' subnet (no shared memory), so gradients
cross the bridge between namespaces. Faults: a rank SIGKILLed mid-training, a host whose
link goes down, a host that does not answer, data that differs between hosts.
"""
import json
import os
import shlex
import shutil
import signal
import subprocess
import time

import keras
import numpy as np
import pytest

import model  # noqa: F401  (registers the layers a training state holds)
from brainseg import checkpoints, netns
from conftest import (REPO_DIR, assert_nothing_left_running, finish, rank_pid,
                      wait_for_epochs, weights_fingerprints)

pytestmark = pytest.mark.multihost

LAUNCHER = os.path.join(REPO_DIR, "run_multinode.sh")
TINY_MODEL = ["--base-filters", "4", "--depth", "2", "--batch-size", "4"]
# Bounds on how long a broken job takes to exit after the fault (measured: about 3 s after
# a SIGKILL, 7-11 s after a link goes down with --host-timeout 10).
HOST_TIMEOUT = 10
KILLED_RANK_BOUND = 30
CUT_OFF_HOST_BOUND = HOST_TIMEOUT + 20


@pytest.fixture
def make_cluster():
    """Creates namespace clusters on demand; each is torn down after the test, pass or
    fail (processes killed, namespaces, veths and the bridge deleted)."""
    reason = netns.unavailable_reason()
    if reason:
        pytest.skip(reason)
    clusters = []

    def make(num_hosts):
        cluster = netns.NamespaceCluster(num_hosts)
        clusters.append(cluster)
        return cluster.create()

    yield make
    for cluster in clusters:
        cluster.destroy()


def launch(cluster, tmp_path, num_hosts, train_flags, launcher_flags=(), private_dir=None,
           log_name="launch.log"):
    """Starts run_multinode.sh on the first host; returns the process and its log path."""
    hosts_file = cluster.write_hosts_file(tmp_path / "hosts.txt", num_hosts)
    command = [LAUNCHER, "--hosts", hosts_file, "--agent", netns.AGENT,
               "--network", cluster.subnet, "--host-timeout", str(HOST_TIMEOUT),
               *launcher_flags, "--", *train_flags]
    env = dict(os.environ, OMPI_MCA_btl="tcp,self", TF_CPP_MIN_LOG_LEVEL="2")
    if private_dir:
        env["NETNS_RSH_PRIVATE_DIR"] = str(private_dir)
    log_path = tmp_path / log_name
    with open(log_path, "w") as log:
        process = subprocess.Popen(cluster.command_on(0, shlex.join(command)), cwd=REPO_DIR,
                                   env=env, stdout=log, stderr=subprocess.STDOUT)
    return process, log_path


def assert_checkpoint_intact(output_dir):
    """The committed training state loads, and names a state file Keras can open."""
    state = checkpoints.load_state(str(output_dir))
    assert state and state.progress.epoch >= 1
    keras.models.load_model(state.path, compile=False)
    keras.models.load_model(os.path.join(output_dir, checkpoints.EXPORT_NAME), compile=False)
    return state


def test_training_across_three_hosts_over_tcp(make_cluster, converted_dir, tmp_path):
    """Every host has its own disk: --sync-data copies the arrays to hosts 2 and 3, ranks
    average gradients over TCP between namespaces, all end with the same weights, and only
    rank 0 (host 1) writes the checkpoint."""
    cluster = make_cluster(3)
    node_disk = tmp_path / "node"  # a different folder on every host (bind mounts)
    shutil.copytree(converted_dir, f"{node_disk}@{cluster.namespaces[0]}/data")
    sent_before = [cluster.transmitted_bytes(i) for i in range(3)]
    epochs, steps = 2, 3
    process, log_path = launch(
        cluster, tmp_path, 3,
        ["--data-dir", f"{node_disk}/data", "--output-dir", f"{node_disk}/run",
         "--epochs", str(epochs), "--steps-per-epoch", str(steps), *TINY_MODEL],
        launcher_flags=["--sync-data"], private_dir=node_disk)
    returncode, output = finish(process, log_path)
    assert returncode == 0, output
    for host in cluster.hosts[1:]:
        copied = [line for line in output.splitlines() if f"preflight: {host}: copied" in line]
        assert copied and "imgs_train.npy" in copied[0] and "msks_test.npy" in copied[0]
    assert "Horovod: 3 workers" in output

    prints = weights_fingerprints(output)
    assert sorted(prints) == ["0", "1", "2"], output
    assert len(set(prints.values())) == 1, prints

    trained = keras.models.load_model(f"{node_disk}@{cluster.namespaces[0]}/run/model.keras",
                                      compile=False)
    gradient_bytes = 4 * trained.count_params()
    for i in (1, 2):
        # Each step every rank sends at least its whole gradient once, over the bridge.
        sent = cluster.transmitted_bytes(i) - sent_before[i]
        assert sent > epochs * steps * gradient_bytes, (i, sent, gradient_bytes)
        # The checkpoint is written once: nothing on the other hosts' disks.
        assert not os.path.exists(f"{node_disk}@{cluster.namespaces[i]}/run")
    assert_nothing_left_running(cluster)


FAULT_RUN_EPOCHS = 6


def fault_run_flags(converted_dir, output_dir):
    # The fault lands after the first epoch, leaving a few to run; no early stopping.
    return ["--data-dir", str(converted_dir), "--output-dir", str(output_dir),
            "--epochs", str(FAULT_RUN_EPOCHS), "--steps-per-epoch", "10",
            "--early-stopping-patience", "0", *TINY_MODEL]


def assert_rerun_resumes_and_finishes(cluster, tmp_path, flags, output_dir, state):
    """The same command again: it continues after the last checkpointed epoch, and all ranks
    finish with the same weights."""
    process, log_path = launch(cluster, tmp_path, 2, flags, log_name="rerun.log")
    returncode, output = finish(process, log_path)
    assert returncode == 0, output
    assert f"Resuming from {state.path} after epoch {state.progress.epoch}" in output, output
    prints = weights_fingerprints(output)
    assert sorted(prints) == ["0", "1"] and len(set(prints.values())) == 1, output
    assert checkpoint_epoch(output_dir) == FAULT_RUN_EPOCHS
    assert_nothing_left_running(cluster)


def test_killed_rank_stops_the_job_and_a_rerun_resumes(make_cluster, converted_dir,
                                                      tmp_path):
    cluster = make_cluster(2)
    output_dir = tmp_path / "run"
    flags = fault_run_flags(converted_dir, output_dir)
    process, log_path = launch(cluster, tmp_path, 2, flags)
    wait_for_epochs(output_dir, 1, process, log_path)

    os.kill(rank_pid(cluster, 1, rank=1), signal.SIGKILL)
    killed_at = time.monotonic()
    returncode, output = finish(process, log_path, timeout=KILLED_RANK_BOUND + 30)
    took = time.monotonic() - killed_at
    print(f"job exited {took:.1f} s after rank 1 was killed")  # shown with pytest -s
    assert returncode != 0
    assert took < KILLED_RANK_BOUND, f"took {took:.0f} s"
    assert "rank 1 with PID" in output and f"on node {cluster.hosts[1]}" in output, output
    assert "Rerun the same command to resume" in output
    assert_nothing_left_running(cluster)
    state = assert_checkpoint_intact(output_dir)
    assert state.progress.epoch < FAULT_RUN_EPOCHS
    assert_rerun_resumes_and_finishes(cluster, tmp_path, flags, output_dir, state)


def checkpoint_epoch(output_dir):
    with open(os.path.join(output_dir, "training_state.json")) as file:
        return json.load(file)["epoch"]


def test_host_cut_off_stops_the_job_within_the_host_timeout(make_cluster, converted_dir,
                                                           tmp_path):
    """The host keeps running but hears nothing: the job must stop on its own (the ranks
    would otherwise wait in their allreduce), and so must the host's own processes."""
    cluster = make_cluster(2)
    output_dir = tmp_path / "run"
    flags = fault_run_flags(converted_dir, output_dir)
    process, log_path = launch(cluster, tmp_path, 2, flags)
    wait_for_epochs(output_dir, 1, process, log_path)

    cluster.cut_off(1)
    cut_at = time.monotonic()
    returncode, output = finish(process, log_path, timeout=CUT_OFF_HOST_BOUND + 60)
    took = time.monotonic() - cut_at
    print(f"job exited {took:.1f} s after host 2 was cut off (--host-timeout {HOST_TIMEOUT})")
    assert returncode != 0
    assert took < CUT_OFF_HOST_BOUND, f"took {took:.0f} s"
    assert "lost communication with a remote daemon" in output, output
    assert f"on node {cluster.hosts[1]}" in output
    assert_nothing_left_running(cluster, within=HOST_TIMEOUT + 10)
    state = assert_checkpoint_intact(output_dir)

    cluster.reconnect(1)
    assert_rerun_resumes_and_finishes(cluster, tmp_path, flags, output_dir, state)


def test_preflight_names_unreachable_hosts_and_differing_data(make_cluster, converted_dir,
                                                              tmp_path):
    cluster = make_cluster(3)
    node_disk = tmp_path / "node"
    for namespace in cluster.namespaces[:2]:
        shutil.copytree(converted_dir, f"{node_disk}@{namespace}/data")
    # Host 2 has a shorter copy of one array, host 3 no data at all.
    short = f"{node_disk}@{cluster.namespaces[1]}/data/imgs_test.npy"
    np.save(short, np.load(short)[:-1])
    flags = ["--data-dir", f"{node_disk}/data"]

    process, log_path = launch(cluster, tmp_path, 3, flags, ["--preflight-only"], node_disk)
    returncode, output = finish(process, log_path, timeout=60)
    assert returncode == 2
    assert f"{cluster.hosts[1]}: {node_disk}/data/imgs_test.npy has shape" in output, output
    assert f"{cluster.hosts[2]}: data folder {node_disk}/data does not exist" in output

    process, log_path = launch(cluster, tmp_path, 3, flags, ["--preflight-only", "--sync-data"],
                               node_disk)
    returncode, output = finish(process, log_path, timeout=60)
    assert returncode == 0, output
    assert f"{cluster.hosts[1]}: copied imgs_test.npy" in output
    assert "every host has the same project, Python environment and data" in output

    process, log_path = launch(cluster, tmp_path, 3, flags, ["--preflight-only", "--sync-data"],
                               node_disk)
    returncode, output = finish(process, log_path, timeout=60)
    assert returncode == 0 and output.count("data up to date") == 2, output

    # A listed host with no namespace behind its address: reported before any training.
    hosts_file = tmp_path / "hosts.txt"
    hosts_file.write_text(hosts_file.read_text() + f"{cluster.subnet_prefix}.99\n")
    command = [LAUNCHER, "--hosts", str(hosts_file), "--agent", netns.AGENT, "--", *flags,
               "--epochs", "1"]
    result = subprocess.run(cluster.command_on(0, shlex.join(command)), capture_output=True,
                            text=True, timeout=60,
                            env=dict(os.environ, NETNS_RSH_PRIVATE_DIR=str(node_disk)))
    assert result.returncode == 2
    assert f"{cluster.subnet_prefix}.99: does not answer" in result.stderr
    assert "Launching" not in result.stdout and "Horovod" not in result.stdout
