"""Checks, before a multi-node run, that every host can run the same training as this one.

run_multinode.sh calls it before mpirun: a job that starts on a node with a missing array or
another TensorFlow fails minutes later with an obscure error, or worse, trains on other
data. Each host is reached with the launch agent (ssh, or the agent given to the launcher),
runs `preflight.py --report` from the same project path, and its report is compared with
this host's:
- it answers within HOST_TIMEOUT_SECONDS;
- the project is at the same path, with the same Python files and the same Python
  environment (interpreter path and package versions);
- DATA_DIR holds the same converted arrays: same files, shapes, dtypes and sizes.
With --sync-data the arrays are first copied with rsync over the same agent (rsync sends
only what differs). Every problem is printed with the host and file it concerns.
"""
import concurrent.futures
import glob
import hashlib
import importlib.metadata
import json
import os
import shlex
import socket
import subprocess
import sys

import numpy as np

from brainseg import cli, dataset

REPO_DIR = os.path.dirname(os.path.abspath(__file__))
SETTINGS = ["DATA_DIR", "LAUNCH_AGENT", "HOST_TIMEOUT_SECONDS"]
HELP = {"LAUNCH_AGENT": "remote-shell command that reaches the hosts",
        "HOST_TIMEOUT_SECONDS": "a host that does not answer within this is reported"}
PACKAGES = ["tensorflow-cpu", "tensorflow", "keras", "horovod", "numpy", "mpi4py"]
NOT_ANSWERING = 255  # ssh's exit status when it cannot reach the host


# --- What a host reports about itself ------------------------------------------------------

def package_versions():
    versions = {}
    for package in PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def project_files_digest():
    """One hash per Python file of the project (scripts and the brainseg package): a node
    with an older copy is caught."""
    digests = {}
    for pattern in ("*.py", os.path.join("brainseg", "*.py")):
        for path in sorted(glob.glob(os.path.join(REPO_DIR, pattern))):
            with open(path, "rb") as file:
                digests[os.path.relpath(path, REPO_DIR)] = \
                    hashlib.sha256(file.read()).hexdigest()[:16]
    return digests


def describe_data_file(path):
    """Size, and for .npy files shape and dtype from the header (the array is not read)."""
    description = {"size": os.path.getsize(path)}
    if path.endswith(".npy"):
        array = np.load(path, mmap_mode="r")  # maps the file: only the header is read
        description.update(shape=list(array.shape), dtype=str(array.dtype))
    return description


def host_report(data_dir):
    data = {}
    for pattern in dataset.DATA_PATTERNS:
        for path in sorted(glob.glob(os.path.join(data_dir, pattern))):
            data[os.path.basename(path)] = describe_data_file(path)
    return {"hostname": socket.gethostname(), "repo_dir": REPO_DIR, "python": sys.executable,
            "python_version": sys.version.split()[0], "packages": package_versions(),
            "project_files": project_files_digest(), "data_dir": data_dir,
            "data_dir_exists": os.path.isdir(data_dir), "data": data}


# --- Comparing a host with this one ----------------------------------------------------

def compare_reports(host, here, there):
    """The differences between this host's report and another host's, one message each."""
    problems = []
    if there["python"] != here["python"] or there["python_version"] != here["python_version"]:
        problems.append(f"{host}: Python is {there['python']} ({there['python_version']}), "
                        f"here {here['python']} ({here['python_version']})")
    for package in sorted(set(here["packages"]) | set(there["packages"])):
        mine, theirs = here["packages"].get(package), there["packages"].get(package)
        if mine != theirs:
            problems.append(f"{host}: package {package} is {theirs or 'not installed'}, "
                            f"here {mine or 'not installed'}")
    for name in sorted(set(here["project_files"]) | set(there["project_files"])):
        if here["project_files"].get(name) != there["project_files"].get(name):
            state = "missing" if name not in there["project_files"] else "differs"
            problems.append(f"{host}: {os.path.join(here['repo_dir'], name)} {state} "
                            "from this host's copy")
    problems += compare_data(host, here, there)
    return problems


def compare_data(host, here, there):
    data_dir = here["data_dir"]
    if not there["data_dir_exists"]:
        return [f"{host}: data folder {data_dir} does not exist (copy it, or use --sync-data)"]
    problems = []
    for name, mine in here["data"].items():
        path = os.path.join(data_dir, name)
        theirs = there["data"].get(name)
        if theirs is None:
            problems.append(f"{host}: {path} is missing")
            continue
        for key in ("shape", "dtype", "size"):
            if mine.get(key) != theirs.get(key):
                problems.append(f"{host}: {path} has {key} {theirs.get(key)}, "
                                f"here {mine.get(key)}")
                break
    return problems


# --- Reaching the hosts --------------------------------------------------------------------

def is_this_host(host):
    """True when `host` names this machine (mpirun starts its ranks without the agent):
    binding a socket to an address only succeeds for an address of this host."""
    try:
        address = socket.gethostbyname(host)
    except OSError:
        return False
    with socket.socket() as probe:
        try:
            probe.bind((address, 0))
            return True
        except OSError:
            return False


def remote_report(agent, host, data_dir, timeout):
    """Runs `preflight.py --report` on `host` through the agent. Returns (report, problem).
    The agent hands the command to a shell there (as ssh does): every path in it, the
    messages included, is quoted."""
    python, quote = sys.executable, shlex.quote
    script = (f"cd {quote(REPO_DIR)} 2>/dev/null || "
              f"{{ echo {quote(f'project folder {REPO_DIR} not found')}; exit 3; }}; "
              f"[ -x {quote(python)} ] || {{ echo {quote(f'Python {python} not found')}; "
              f"exit 4; }}; "
              f"exec {quote(python)} preflight.py --report --data-dir {quote(data_dir)}")
    command = shlex.split(agent)
    if os.path.basename(command[0]) == "ssh":
        # Never wait at a password prompt: a host that needs one is a host mpirun can't use.
        command += ["-o", "BatchMode=yes", "-o", f"ConnectTimeout={max(1, int(timeout))}"]
    command += [host, script]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                                stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return None, f"{host}: did not answer within {timeout:g} s via '{agent}'"
    except OSError as error:
        return None, f"{host}: cannot run the launch agent '{agent}': {error}"
    said = (result.stdout.strip().splitlines() or result.stderr.strip().splitlines() or [""])[-1]
    if result.returncode in (3, 4):
        return None, f"{host}: {said}"
    if result.returncode != 0:
        reason = "does not answer" if result.returncode == NOT_ANSWERING else "check failed"
        detail = (result.stderr.strip().splitlines() or [said])[-1]
        return None, f"{host}: {reason} via '{agent}' (exit {result.returncode}: {detail})"
    try:
        return json.loads(result.stdout.strip().splitlines()[-1]), None
    except (json.JSONDecodeError, IndexError):
        return None, f"{host}: unexpected answer: {said!r}"


def sync_data(agent, host, data_dir, timeout):
    """Copies DATA_DIR to the same path on `host` with rsync over the launch agent; rsync's
    quick check (size and modification time) skips files that are already there. rsync
    before 3.2.4 pasted the remote path into the agent's shell command unquoted: -s
    (--protect-args, --secluded-args since 3.3) sends it inside rsync's protocol instead."""
    # rsync creates only the last folder of the destination (--mkpath needs rsync >= 3.2.3).
    mkdir = shlex.split(agent) + [host, f"mkdir -p {shlex.quote(os.path.dirname(data_dir))}"]
    command = ["rsync", "--archive", "-s", "--out-format=%n", "-e", agent,
               *(f"--include={pattern}" for pattern in dataset.DATA_PATTERNS),
               "--exclude=*", data_dir.rstrip("/") + "/", f"{host}:{data_dir.rstrip('/')}/"]
    try:
        subprocess.run(mkdir, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                                stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return f"{host}: rsync of {data_dir} did not finish within {timeout:g} s"
    if result.returncode != 0:
        return f"{host}: rsync of {data_dir} failed: {result.stderr.strip()}"
    copied = [line for line in result.stdout.split() if line and line != "./"]
    print(f"preflight: {host}: {'copied ' + ', '.join(copied) if copied else 'data up to date'}")
    return None


def check_hosts(hosts, agent, data_dir, timeout, sync=False):
    """All problems found on `hosts` (an empty list when they can all run the job)."""
    remote_hosts = [host for host in dict.fromkeys(hosts) if not is_this_host(host)]
    if not remote_hosts:
        return []  # mpirun starts every rank here: nothing to compare
    here = host_report(data_dir)
    if not here["data"]:
        return [f"this host ({here['hostname']}): {data_dir} holds no converted arrays "
                f"({', '.join(dataset.DATA_PATTERNS)}) to compare the other hosts with"]

    def check(host):
        if sync:
            problem = sync_data(agent, host, data_dir, max(timeout, 600))
            if problem:
                return [problem]
        there, problem = remote_report(agent, host, data_dir, timeout)
        return [problem] if problem else compare_reports(host, here, there)

    with concurrent.futures.ThreadPoolExecutor(max(1, len(remote_hosts))) as pool:
        return [problem for problems in pool.map(check, remote_hosts) for problem in problems]


def main(argv=None):
    parser = cli.parser_for(__doc__.splitlines()[0], SETTINGS, HELP)
    parser.add_argument("hosts", nargs="*", help="host names or addresses to check")
    parser.add_argument("--sync-data", action="store_true",
                        help="first rsync DATA_DIR to every host (only what differs)")
    parser.add_argument("--report", action="store_true",
                        help="print this host's report as JSON (what the other hosts run)")
    args = parser.parse_args(argv)
    data_dir = os.path.abspath(args.DATA_DIR)
    if args.report:
        print(json.dumps(host_report(data_dir)))
        return 0
    if all(is_this_host(host) for host in args.hosts):
        print("preflight: every rank runs on this host: nothing to check")
        return 0
    print(f"preflight: checking {', '.join(args.hosts)} via '{args.LAUNCH_AGENT}' "
          f"(data {data_dir})")
    problems = check_hosts(args.hosts, args.LAUNCH_AGENT, data_dir, args.HOST_TIMEOUT_SECONDS,
                           args.sync_data)
    for problem in problems:
        print(f"preflight: {problem}", file=sys.stderr)
    if problems:
        print(f"preflight: {len(problems)} problem(s): not launching", file=sys.stderr)
        return 2
    print("preflight: every host has the same project, Python environment and data")
    return 0


if __name__ == "__main__":
    sys.exit(main())
