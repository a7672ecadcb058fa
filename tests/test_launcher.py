"""run_multinode.sh: hosts.txt parsing, the mpirun or horovodrun command it builds
(--dry-run), and two real runs on this machine: horovodrun --gloo, and a TERM that stops every
rank. Runs across hosts are in test_multihost.py."""
import glob
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest

from brainseg import hardware
from conftest import REPO_DIR, launch_command, weights_fingerprints

LAUNCHER = os.path.join(REPO_DIR, "run_multinode.sh")


def dry_run(hosts_text, tmp_path, *train_flags):
    hosts = tmp_path / "hosts.txt"
    hosts.write_text(hosts_text)
    result = subprocess.run([LAUNCHER, "--hosts", str(hosts), "--dry-run", "--", *train_flags],
                            capture_output=True, text=True, timeout=60)
    return result


def test_command_from_hosts_with_slots_comments_and_blank_lines(tmp_path):
    result = dry_run("# cluster\n\nnode-a slots=2   # first\n10.0.0.7\nnode-b.example slots=3\n",
                     tmp_path, "--epochs", "3", "--data-dir", "/data/my dir")
    assert result.returncode == 0, result.stderr
    command = shlex.split(result.stdout)
    assert command[0] == "mpirun"
    assert command[command.index("-np") + 1] == "6"
    assert command[command.index("--host") + 1] == "node-a:2,10.0.0.7:1,node-b.example:3"
    assert command[command.index("--bind-to") + 1] == "core"
    assert command[-4:] == ["--epochs", "3", "--data-dir", "/data/my dir"]
    assert command[-5].endswith("train_horovod.py")
    exported = {command[i + 1] for i, word in enumerate(command) if word == "-x"}
    assert {"PATH", "PYTHONPATH", "VIRTUAL_ENV", "OMP_NUM_THREADS", "KMP_BLOCKTIME",
            "KMP_AFFINITY"} <= exported
    assert ("--allow-run-as-root" in command) == (os.geteuid() == 0)


@pytest.mark.parametrize("hosts_text,problem", [
    ("node;rm -rf /\n", "not a valid host name"),
    ("$(reboot)\n", "not a valid host name"),
    ("node slots=two\n", "expected 'slots=N'"),
    ("node slots=0\n", "expected 'slots=N'"),
    ("node slots=2 extra\n", "unexpected 'extra'"),
    ("# only a comment\n\n", "no hosts listed"),
])
def test_bad_hosts_files_are_rejected_with_the_line(tmp_path, hosts_text, problem):
    result = dry_run(hosts_text, tmp_path)
    assert result.returncode != 0
    assert problem in result.stderr and "hosts.txt" in result.stderr


def test_unknown_option_and_missing_hosts_file(tmp_path):
    result = subprocess.run([LAUNCHER, "--epochs", "3"], capture_output=True, text=True)
    assert result.returncode != 0 and "after --" in result.stderr
    result = subprocess.run([LAUNCHER, "--hosts", str(tmp_path / "none.txt"), "--dry-run"],
                            capture_output=True, text=True)
    assert result.returncode != 0 and "none.txt: hosts file not found" in result.stderr


def test_default_hosts_file_runs_two_workers_on_this_machine():
    with open(os.path.join(REPO_DIR, "hosts.txt")) as file:
        hosts = [line.split("#")[0].split() for line in file]
    assert [h for h in hosts if h] == [["localhost", "slots=2"]]


def test_agent_network_and_host_timeout_reach_mpirun(tmp_path):
    hosts = tmp_path / "hosts.txt"
    hosts.write_text("node-a\nnode-b\n")
    result = subprocess.run([LAUNCHER, "--hosts", str(hosts), "--agent", "ssh -p 2222",
                             "--network", "10.1.0.0/16,eth1", "--host-timeout", "12",
                             "--dry-run"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    command = shlex.split(result.stdout)
    mca = {command[i + 1]: command[i + 2] for i, word in enumerate(command) if word == "--mca"}
    assert mca["plm_rsh_agent"] == "ssh -p 2222"
    assert mca["oob_tcp_if_include"] == mca["btl_tcp_if_include"] == "10.1.0.0/16,eth1"
    # Keepalive: idle time plus interval x probes is the host timeout.
    assert (int(mca["oob_tcp_keepalive_time"]) + int(mca["oob_tcp_keepalive_intvl"]) *
            int(mca["oob_tcp_keepalive_probes"])) == 12


def test_default_agent_is_ssh_and_no_interface_is_forced(tmp_path):
    command = shlex.split(dry_run("node-a\n", tmp_path).stdout)
    assert command[command.index("plm_rsh_agent") + 1] == "ssh"
    assert "oob_tcp_if_include" not in command and "btl_tcp_if_include" not in command


@pytest.mark.parametrize("flags,problem", [
    (["--network", "eth0;reboot"], "not a list of interfaces or subnets"),
    (["--host-timeout", "soon"], "--host-timeout needs whole seconds"),
    (["--agent", ""], "--agent needs a command"),
    (["--gloo", "--agent", "/opt/rsh"], "horovodrun reaches other hosts with ssh only"),
    (["--gloo", "--network", "10.0.0.0/8"], "interface names (e.g. eth0), not the subnet"),
])
def test_bad_launcher_flags_are_rejected(tmp_path, flags, problem):
    hosts = tmp_path / "hosts.txt"
    hosts.write_text("node-a\n")
    result = subprocess.run([LAUNCHER, "--hosts", str(hosts), *flags, "--dry-run"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0 and problem in result.stderr


def test_gloo_builds_the_horovodrun_command(tmp_path):
    hosts = tmp_path / "hosts.txt"
    hosts.write_text("node-a slots=2\nnode-b slots=2\n")
    result = subprocess.run([LAUNCHER, "--hosts", str(hosts), "--gloo", "--network", "eth1",
                             "--dry-run", "--", "--epochs", "2"],
                            capture_output=True, text=True, timeout=60,
                            env=dict(os.environ, BRAINSEG_TEST_TOKEN="t", MY_PASSWORD="p",
                                     HOROVOD_SECRET_KEY="k", HOROVOD_CYCLE_TIME="5"))
    assert result.returncode == 0, result.stderr
    command = shlex.split(result.stdout)
    # horovodrun writes its environment into the ssh command line: it starts with only the
    # forwarded variables (env -i), never a secret-looking one.
    assert command[:2] == ["env", "-i"]
    start = next(i for i, word in enumerate(command) if word.endswith("horovodrun"))
    assert "--gloo" in command
    names = {word.split("=", 1)[0] for word in command[2:start]}
    assert {"PATH", "PYTHONPATH", "VIRTUAL_ENV", "HOROVOD_CYCLE_TIME"} <= names, names
    assert not names & {"BRAINSEG_TEST_TOKEN", "HOROVOD_SECRET_KEY", "MY_PASSWORD"}, names
    assert command[command.index("-np") + 1] == "4"
    assert command[command.index("-H") + 1] == "node-a:2,node-b:2"
    assert command[command.index("--network-interfaces") + 1] == "eth1"
    assert command[-3:] == [os.path.join(REPO_DIR, "train_horovod.py"), "--epochs", "2"]


def test_gloo_training_runs_two_workers_without_mpirun(converted_dir, tmp_path):
    """horovodrun --gloo on this machine: both ranks train and end with the same weights."""
    result = subprocess.run(
        [LAUNCHER, "--gloo", "--", "--data-dir", str(converted_dir),
         "--output-dir", str(tmp_path / "run"), "--epochs", "1", "--steps-per-epoch", "2",
         "--batch-size", "4", "--base-filters", "4", "--depth", "2"],
        capture_output=True, text=True, timeout=300,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    assert result.returncode == 0, result.stdout + result.stderr
    prints = weights_fingerprints(result.stdout)
    assert sorted(prints) == ["0", "1"] and len(set(prints.values())) == 1, result.stdout
    assert (tmp_path / "run" / "model.keras").exists()


@pytest.mark.skipif(not hardware.precision_is_timed("auto"),
                    reason="this CPU's flags decide the precision (AMX, or no bfloat16)")
def test_auto_precision_is_timed_by_one_rank_and_followed_by_every_rank(converted_dir,
                                                                       tmp_path):
    """On a CPU with AVX512_BF16 but no AMX: the first run times a step in both precisions on
    one rank while the other waits for its record, both train in the recorded choice, and
    the next run reads the record without timing, and trains to the same weights (the timed
    models leave no trace in the run's)."""
    def train(name):
        result = subprocess.run(
            [LAUNCHER, "--", "--data-dir", str(converted_dir), "--precision", "auto",
             "--output-dir", str(tmp_path / name), "--epochs", "1", "--steps-per-epoch", "2",
             "--batch-size", "4", "--base-filters", "4", "--depth", "2"],
            capture_output=True, text=True, timeout=300,
            env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", XDG_CACHE_HOME=str(tmp_path)))
        assert result.returncode == 0, result.stdout + result.stderr
        prints = weights_fingerprints(result.stdout)
        assert sorted(prints) == ["0", "1"] and len(set(prints.values())) == 1, result.stdout
        return result.stdout

    first = train("first")
    [record] = glob.glob(str(tmp_path / "unet-horovod" / "training-precision-*.json"))
    with open(record) as file:
        recorded = json.load(file)
    assert set(recorded["seconds_per_step"]) == {"float32", "mixed_bfloat16"}
    chosen = recorded["choice"]
    assert sorted(re.findall(rf"rank \d: {chosen} (\w+) as the faster", first)) == \
        ["measured", "recorded"], first
    assert f"precision {chosen} (timed on this CPU;" in first

    second = train("second")
    assert re.findall(rf"rank \d: {chosen} (\w+) as the faster", second) == ["recorded"] * 2
    assert f"precision {chosen} (timed on this CPU;" in second
    assert weights_fingerprints(first) == weights_fingerprints(second)


def test_ranks_whose_cpus_disagree_on_the_faster_precision_all_train_in_float32(
        converted_dir, tmp_path):
    """A mixed cluster (tests/two_cpus_rank.py): bfloat16 timed faster on rank 0's CPU model,
    float32 on rank 1's. Every rank must compute alike, so both train in float32, say why,
    and end with the same weights; each CPU model's record keeps its own finding."""
    result = subprocess.run(
        [*launch_command("two_cpus_rank.py"), "--data-dir", str(converted_dir),
         "--output-dir", str(tmp_path / "run"), "--precision", "auto", "--epochs", "1",
         "--steps-per-epoch", "2", "--batch-size", "4", "--base-filters", "4", "--depth", "2"],
        cwd=REPO_DIR, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=REPO_DIR,
                 XDG_CACHE_HOME=str(tmp_path / "cache")))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "rank 0: mixed_bfloat16 measured as the faster" in result.stdout, result.stdout
    assert "rank 1: float32 measured as the faster" in result.stdout, result.stdout
    assert "precision float32 (the ranks' CPUs disagree on the faster;" in result.stdout
    prints = weights_fingerprints(result.stdout)
    assert sorted(prints) == ["0", "1"] and len(set(prints.values())) == 1, result.stdout
    records = {}
    for path in glob.glob(str(tmp_path / "cache" / "unet-horovod" / "training-precision-*.json")):
        with open(path) as file:
            records[re.search(r"cpu-of-rank-(\d)", path).group(1)] = json.load(file)["choice"]
    assert records == {"0": "mixed_bfloat16", "1": "float32"}


def test_terminating_the_launcher_stops_every_rank(converted_dir, tmp_path):
    """A TERM sent to run_multinode.sh (a batch system's time limit, Ctrl-C) reaches mpirun
    and the ranks: nothing keeps training in the background."""
    output_dir = tmp_path / "run"
    launcher = subprocess.Popen(
        [LAUNCHER, "--", "--data-dir", str(converted_dir), "--output-dir", str(output_dir),
         "--epochs", "500", "--steps-per-epoch", "5", "--batch-size", "4", "--base-filters",
         "4", "--depth", "2", "--early-stopping-patience", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))
    deadline = time.monotonic() + 180
    while not (output_dir / "training_state.json").exists():
        assert launcher.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    launcher.send_signal(signal.SIGTERM)
    output, _ = launcher.communicate(timeout=60)
    assert launcher.returncode != 0
    assert "stopped by a signal. Rerun the same command to resume" in output
    time.sleep(1)  # ranks already killed may take a moment to be reaped
    assert processes_mentioning(str(output_dir)) == []


def processes_mentioning(text):
    """Command lines of running processes that contain `text`."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as file:
                command_line = file.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in command_line:
            found.append(command_line)
    return found


def test_launch_settings_come_from_settings_and_the_training_flags():
    """The launcher's one Python entry point: settings.py's launch defaults, and DATA_DIR as
    train_horovod.py would parse it from the training flags, as shell assignments."""
    import settings

    def assignments(*train_flags):
        result = subprocess.run(
            ["bash", "-c", 'eval "$(python -m brainseg.launch_settings -- "$@")"; '
             'printf "%s\\n" "$setting_data_dir" "$setting_launch_agent" "$setting_hosts_file"',
             "bash", *train_flags],
            cwd=REPO_DIR, capture_output=True, text=True, timeout=60,
            env=dict(os.environ, PATH=f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}"))
        assert result.returncode == 0, result.stderr
        return result.stdout.splitlines()

    assert assignments("--epochs", "3") == [settings.DATA_DIR, settings.LAUNCH_AGENT,
                                            settings.HOSTS_FILE]
    assert assignments("--data-dir", "/data/it's here", "--epochs", "3")[0] == "/data/it's here"
    assert assignments("--epochs", "3", "--data-dir=/data/b")[0] == "/data/b"


@pytest.mark.parametrize("flags", [["--data", "/data/b"], ["--data=/data/b"],
                                   ["--epochs", "2", "--data-di", "/data/b"]])
def test_an_abbreviated_data_dir_is_refused_before_anything_runs(flags):
    """train_horovod.py takes no abbreviated flags (cli: allow_abbrev=False). The launcher,
    which reads the data folder from the training flags for its checks and --sync-data, must
    not take `--data X` for --data-dir, nor check and copy the default folder instead and
    let training fail later: it stops at once, naming the flag."""
    import train_horovod
    from brainseg import cli
    with pytest.raises(SystemExit):
        cli.parse("training", train_horovod.SETTINGS, flags, train_horovod.HELP,
                  train_horovod.ALIASES)
    result = subprocess.run([LAUNCHER, "--dry-run", "--", *flags], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode != 0 and result.stdout == ""
    name = flags[-2] if len(flags) > 1 else flags[0].split("=")[0]
    assert f"training flag '{name}': train_horovod.py takes no abbreviated flags" \
        in result.stderr
