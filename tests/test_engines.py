"""The cluster engines users have, for real: run_multinode.sh over OpenSSH, with mpirun and
with horovodrun --gloo, across 2 namespace hosts that each run an sshd (brainseg/netns_ssh.py).

The launcher runs on host 1 exactly as the README tells a user to: the default launch agent
(`ssh`), passwordless login with a key, host keys checked against ~/.ssh/known_hosts, the
port in ~/.ssh/config; nothing ssh-specific on its command line. Secret-looking variables in
the launcher's environment must not reach the ssh command lines (where horovodrun writes
the environment), which every sshd records.
"""
import os
import re
import secrets
import shlex
import signal
import subprocess
import time

import pytest

from brainseg import netns_ssh
from brainseg import checkpoints
from conftest import (REPO_DIR, assert_nothing_left_running, finish, rank_pid,
                      wait_for_epochs, weights_fingerprints)

pytestmark = [pytest.mark.multihost, pytest.mark.engines]

LAUNCHER = os.path.join(REPO_DIR, "run_multinode.sh")
TINY_MODEL = ["--base-filters", "4", "--depth", "2", "--batch-size", "4"]
TINY_RUN = ["--epochs", "2", "--steps-per-epoch", "3", *TINY_MODEL]
HOST_TIMEOUT = 10
# A killed rank must stop a --gloo job this fast (measured: about 1 s), and the other host's
# rank must be gone soon after (measured: about 4 s when rank 0 was killed).
KILLED_RANK_BOUND = 30
# Variables a user may well have exported on the launching node, each with a value that
# must appear in no ssh command line.
SECRETS = {name: secrets.token_hex(12) for name in
           ["BRAINSEG_TEST_API_TOKEN", "BRAINSEG_TEST_SECRET", "AWS_SECRET_ACCESS_KEY",
            "BRAINSEG_TEST_DB_PASSWORD", "HOROVOD_TEST_SECRET_KEY"]}

# What the README says horovodrun exports, HOROVOD_* aside: run_multinode.sh's forwarded
# variables, what horovodrun and ssh need on the launching host, LC_CTYPE (Python sets it
# when the locale is C) and horovodrun's NCCL_SOCKET_IFNAME.
README_EXPORTED = {"PATH", "PYTHONPATH", "VIRTUAL_ENV", "LD_LIBRARY_PATH", "PYTHONUNBUFFERED",
                   "OMP_NUM_THREADS", "KMP_BLOCKTIME", "KMP_AFFINITY", "TF_CPP_MIN_LOG_LEVEL",
                   "HOME", "USER", "LOGNAME", "LANG", "SSH_AUTH_SOCK", "LC_CTYPE",
                   "NCCL_SOCKET_IFNAME"}


@pytest.fixture
def ssh_hosts():
    """2 namespace hosts, each running sshd; all stopped and removed after the test, pass or
    fail."""
    reason = netns_ssh.unavailable_reason()
    if reason:
        pytest.skip(reason)
    cluster = netns_ssh.SshCluster(2)
    try:
        yield cluster.create()
    finally:
        cluster.destroy()


def start(cluster, tmp_path, launcher_flags, train_flags):
    """Starts run_multinode.sh on host 1, with the secrets exported; (process, log path)."""
    hosts_file = cluster.write_hosts_file(tmp_path / "hosts.txt")
    command = [LAUNCHER, "--hosts", hosts_file, "--host-timeout", str(HOST_TIMEOUT),
               *launcher_flags, "--", *train_flags]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **SECRETS)
    log_path = tmp_path / "launch.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(cluster.on_host(0, command), cwd=REPO_DIR, env=env,
                                   stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL)
    return process, log_path


def launch(cluster, tmp_path, launcher_flags, train_flags):
    """run_multinode.sh on host 1 over ssh, to its end; (exit status, output)."""
    return finish(*start(cluster, tmp_path, launcher_flags, train_flags))


def assert_trained_on_both_hosts(cluster, output, output_dir):
    """Both ranks ran, on different hosts, ended with the same weights; rank 0 saved."""
    prints = weights_fingerprints(output)
    assert sorted(prints) == ["0", "1"] and len(set(prints.values())) == 1, output
    assert (output_dir / "model.keras").exists()
    assert (output_dir / "training_state.json").exists()
    remote = [command for command in cluster.recorded_commands() if "train_horovod.py" in
              command or "orted" in command]
    assert remote, f"nothing was started on host 2 over ssh: {cluster.recorded_commands()}"
    assert_nothing_left_running(cluster)


def assert_no_secret_on_ssh_command_lines(cluster):
    for command in cluster.recorded_commands():
        for name, value in SECRETS.items():
            assert name not in command and value not in command, command


def exported_names(command):
    """Names of the NAME=VALUE words of a shell command (horovodrun's `env NAME=VALUE...`)."""
    return {word.split("=", 1)[0] for word in shlex.split(command.split(";", 1)[-1])
            if re.match(r"[A-Za-z_][A-Za-z0-9_]*=", word)}


def test_mpirun_over_ssh_trains_on_two_hosts(ssh_hosts, converted_dir, tmp_path):
    """The default launch (mpirun, agent ssh) as the README documents it."""
    output_dir = tmp_path / "run"
    returncode, output = launch(ssh_hosts, tmp_path, [],
                                ["--data-dir", str(converted_dir), "--output-dir",
                                 str(output_dir), *TINY_RUN])
    assert returncode == 0, output
    assert "preflight: every host has the same project, Python environment and data" in output
    assert "Horovod: 2 workers" in output
    assert_trained_on_both_hosts(ssh_hosts, output, output_dir)
    assert_no_secret_on_ssh_command_lines(ssh_hosts)


@pytest.mark.parametrize("network_flags", [[], ["--network", "eth0"]],
                         ids=["interface-found-by-horovodrun", "network-eth0"])
def test_horovodrun_gloo_over_ssh_trains_on_two_hosts(ssh_hosts, converted_dir, tmp_path,
                                                      network_flags):
    """--gloo: horovodrun reaches host 2 with ssh and writes the ranks' environment on the
    ssh command line; only the variables run_multinode.sh forwards get there. Without
    --network, horovodrun first finds the hosts' common interface with a probe on each.
    The training flags reach train_horovod.py untouched, --timeline too (horovodrun's
    parser would otherwise take it for its --timeline-filename)."""
    output_dir = tmp_path / "run"
    timeline = tmp_path / "timeline.json"
    returncode, output = launch(ssh_hosts, tmp_path, ["--gloo", *network_flags],
                                ["--data-dir", str(converted_dir), "--output-dir",
                                 str(output_dir), "--timeline", str(timeline), *TINY_RUN])
    assert returncode == 0, output
    assert '"ALLREDUCE"' in timeline.read_text()
    assert "Horovod: 2 workers" in output
    assert_trained_on_both_hosts(ssh_hosts, output, output_dir)
    assert_no_secret_on_ssh_command_lines(ssh_hosts)
    rank_launches = [command for command in ssh_hosts.recorded_commands()
                     if "train_horovod.py" in command]
    assert len(rank_launches) == 1, rank_launches  # rank 1; rank 0 runs on host 1 itself
    names = exported_names(rank_launches[0])
    assert {name for name in names if not name.startswith("HOROVOD_")} <= README_EXPORTED, names
    assert "HOROVOD_GLOO_RENDEZVOUS_ADDR" in names and "PYTHONPATH" in names


@pytest.mark.parametrize("launcher_flags", [[], ["--gloo", "--network", "eth0"]],
                         ids=["mpirun", "gloo"])
def test_a_host_whose_key_is_not_known_is_refused_before_launching(ssh_hosts, converted_dir,
                                                                   tmp_path, launcher_flags):
    """Host keys are checked, never accepted on first use: with host 2's key missing from
    known_hosts, the checks before launching name the host and nothing starts (horovodrun
    itself would connect anyway: it passes StrictHostKeyChecking=no)."""
    known_hosts = os.path.join(ssh_hosts.home_ssh, "known_hosts")
    with open(known_hosts) as file:
        lines = file.readlines()
    with open(known_hosts, "w") as file:
        file.writelines(line for line in lines if f"[{ssh_hosts.hosts[1]}]" not in line)
    returncode, output = launch(ssh_hosts, tmp_path, launcher_flags,
                                ["--data-dir", str(converted_dir), "--output-dir",
                                 str(tmp_path / "run"), *TINY_RUN])
    assert returncode == 2, output
    assert f"preflight: {ssh_hosts.hosts[1]}: does not answer via 'ssh'" in output, output
    assert "Host key verification failed" in output, output
    assert "Launching" not in output and not (tmp_path / "run").exists()
    assert_nothing_left_running(ssh_hosts)


@pytest.mark.parametrize("killed_rank", [0, 1])
def test_gloo_job_stops_when_a_rank_is_killed(ssh_hosts, converted_dir, tmp_path,
                                              killed_rank):
    """Under horovodrun a rank runs behind an ssh client (rank 1) or on the launching host
    (rank 0). Either killed mid-training, the job must exit non-zero within a bound naming
    the rank, and the surviving rank must end too, on its host, whichever it is: horovodrun
    only kills its local ssh client, so rank 1 has to notice on its own."""
    output_dir = tmp_path / "run"
    flags = ["--data-dir", str(converted_dir), "--output-dir", str(output_dir),
             "--epochs", "6", "--steps-per-epoch", "10", "--early-stopping-patience", "0",
             *TINY_MODEL]
    process, log_path = start(ssh_hosts, tmp_path, ["--gloo", "--network", "eth0"], flags)
    wait_for_epochs(output_dir, 1, process, log_path)

    os.kill(rank_pid(ssh_hosts, killed_rank, killed_rank), signal.SIGKILL)
    killed_at = time.monotonic()
    returncode, output = finish(process, log_path, timeout=KILLED_RANK_BOUND + 30)
    took = time.monotonic() - killed_at
    assert returncode != 0 and took < KILLED_RANK_BOUND, (took, output)
    assert f"Process name: {killed_rank}" in output, output
    assert "Rerun the same command to resume" in output
    assert_nothing_left_running(ssh_hosts, within=KILLED_RANK_BOUND)
    state = checkpoints.load_state(str(output_dir))
    assert state and 1 <= state.progress.epoch < 6
