"""preflight.py: how a host's report is compared with the launching host's, and the commands
it runs on the other hosts."""
import copy
import json
import shutil
import subprocess
import sys

import preflight
from conftest import REPO_DIR


def reports(converted_dir):
    here = preflight.host_report(str(converted_dir))
    return here, copy.deepcopy(here)


def test_a_report_describes_the_arrays_from_their_headers(converted_dir):
    here = preflight.host_report(str(converted_dir))
    import numpy as np
    images = np.load(converted_dir / "imgs_train.npy", mmap_mode="r")
    assert here["data"]["imgs_train.npy"]["shape"] == list(images.shape)
    assert here["data"]["imgs_train.npy"]["dtype"] == str(images.dtype)
    assert set(here["data"]) == {"imgs_train.npy", "msks_train.npy", "imgs_test.npy",
                                 "msks_test.npy", "manifest.json"}
    assert "train_horovod.py" in here["project_files"] and here["packages"]["horovod"]


def test_identical_hosts_have_no_problems(converted_dir):
    here, there = reports(converted_dir)
    assert preflight.compare_reports("node2", here, there) == []


def test_each_difference_is_named_with_host_and_file(converted_dir):
    here, there = reports(converted_dir)
    there["packages"]["tensorflow-cpu"] = "2.20.0"
    there["project_files"]["train_horovod.py"] = "0" * 16
    there["data"]["imgs_test.npy"]["shape"][0] -= 1
    there["data"]["msks_train.npy"]["dtype"] = "float64"
    del there["data"]["manifest.json"]
    problems = preflight.compare_reports("node2", here, there)
    data_dir = str(converted_dir)
    expected = [
        f"node2: package tensorflow-cpu is 2.20.0, here {here['packages']['tensorflow-cpu']}",
        f"node2: {REPO_DIR}/train_horovod.py differs from this host's copy",
        f"node2: {data_dir}/imgs_test.npy has shape",
        f"node2: {data_dir}/msks_train.npy has dtype float64",
        f"node2: {data_dir}/manifest.json is missing",
    ]
    for text in expected:
        assert any(problem.startswith(text) for problem in problems), (text, problems)
    assert len(problems) == len(expected)


def test_another_python_and_a_missing_data_folder(converted_dir):
    here, there = reports(converted_dir)
    there["python"] = "/usr/bin/python3"
    there["data_dir_exists"], there["data"] = False, {}
    problems = preflight.compare_reports("10.0.0.2", here, there)
    assert problems[0].startswith("10.0.0.2: Python is /usr/bin/python3")
    assert problems[-1] == (f"10.0.0.2: data folder {converted_dir} does not exist "
                            "(copy it, or use --sync-data)")


def test_this_host_is_recognized_and_not_checked(converted_dir, tmp_path):
    assert preflight.is_this_host("localhost") and preflight.is_this_host("127.0.0.1")
    assert not preflight.is_this_host("192.0.2.254")  # TEST-NET: never this host
    # Only local hosts: nothing is contacted, even with an agent that cannot run.
    assert preflight.check_hosts(["localhost"], "/nonexistent/agent", str(tmp_path), 5) == []


def test_an_agent_that_fails_is_reported_for_its_host(converted_dir, tmp_path):
    agent = tmp_path / "agent.sh"
    agent.write_text("#!/bin/sh\necho \"ssh: connect to host $1 port 22: No route\" >&2\n"
                     "exit 255\n")
    agent.chmod(0o755)
    problems = preflight.check_hosts(["192.0.2.254"], str(agent), str(converted_dir), 5)
    assert problems == [f"192.0.2.254: does not answer via '{agent}' "
                        "(exit 255: ssh: connect to host 192.0.2.254 port 22: No route)"]


def test_report_mode_prints_json_for_the_launching_host(converted_dir):
    result = subprocess.run([sys.executable, "preflight.py", "--report", "--data-dir",
                             str(converted_dir)], cwd=REPO_DIR, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["data"]["imgs_test.npy"]["size"] > 0


def test_a_host_that_hangs_is_reported_after_the_timeout(converted_dir, tmp_path):
    agent = tmp_path / "agent.sh"
    agent.write_text("#!/bin/sh\nexec sleep 30\n")
    agent.chmod(0o755)
    problems = preflight.check_hosts(["192.0.2.253"], str(agent), str(converted_dir), 1)
    assert problems == [f"192.0.2.253: did not answer within 1 s via '{agent}'"]


def test_leftover_temporary_files_are_not_taken_for_data(converted_dir, tmp_path):
    """A killed writer's short `.partial.` file once matched imgs_*.npy and crashed the
    check; temporary names are hidden, so no data pattern (nor rsync's) picks them up."""
    from brainseg import atomic
    folder = tmp_path / "converted"
    shutil.copytree(converted_dir, folder)
    leftover = atomic.create_temporary(folder / "imgs_train.npy")
    with open(leftover, "wb") as file:
        file.write(b"\x93NUMPY")  # a header cut short
    report = preflight.host_report(str(folder))
    assert set(report["data"]) == {"imgs_train.npy", "msks_train.npy", "imgs_test.npy",
                                   "msks_test.npy", "manifest.json"}
def ssh_like_agent(tmp_path):
    """An agent that runs the remote command here the way ssh runs it there: the words
    after the host joined with spaces, then run by a shell."""
    agent = tmp_path / "ssh_like.sh"
    agent.write_text('#!/bin/sh\nshift\nexec sh -c "$*"\n')
    agent.chmod(0o755)
    return str(agent)


# A path with every character a shell would act on: spaces, quotes, $( ), ;, a glob.
AWKWARD = "it's a \"folder\"; $(touch PWNED) *"


def test_paths_in_remote_commands_are_quoted(converted_dir, tmp_path, monkeypatch):
    """Every path pasted into a remote command reaches the remote shell as one word, even in
    the messages that report it missing; nothing in it is run."""
    agent = ssh_like_agent(tmp_path)
    monkeypatch.chdir(tmp_path)
    missing_project = str(tmp_path / AWKWARD / "project")
    monkeypatch.setattr(preflight, "REPO_DIR", missing_project)
    assert preflight.remote_report(agent, "node2", str(converted_dir), 30) == (
        None, f"node2: project folder {missing_project} not found")
    monkeypatch.setattr(preflight, "REPO_DIR", REPO_DIR)
    missing_python = str(tmp_path / AWKWARD / "python")
    monkeypatch.setattr(sys, "executable", missing_python)
    assert preflight.remote_report(agent, "node2", str(converted_dir), 30) == (
        None, f"node2: Python {missing_python} not found")
    assert not (tmp_path / "PWNED").exists()


def test_sync_data_to_an_awkward_path(converted_dir, tmp_path, monkeypatch, capsys):
    """--sync-data creates the data folder's parent and runs rsync over the agent with a
    path a shell would split, expand or run: the folder is found, as it is."""
    agent = ssh_like_agent(tmp_path)
    monkeypatch.chdir(tmp_path)
    data_dir = tmp_path / AWKWARD / "data"
    data_dir.parent.mkdir()
    shutil.copytree(converted_dir, data_dir)
    monkeypatch.setenv("RSYNC_OLD_ARGS", "1")  # rsync < 3.2.4 pasted paths into the command
    # The "remote" host is this one: the same folder, so rsync finds nothing to copy.
    assert preflight.sync_data(agent, "node2", str(data_dir), 60) is None
    assert "preflight: node2: data up to date" in capsys.readouterr().out
    assert not (tmp_path / "PWNED").exists()
