"""run_multinode.sh: hosts.txt parsing and the mpirun command it builds (--dry-run)."""
import os
import shlex
import subprocess

import pytest

from conftest import REPO_DIR

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
