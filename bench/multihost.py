"""Training throughput on 1, 2 and 3 hosts of a network-namespace cluster (1 rank each), for
each way a cluster launches the job: the custom agent, ssh, horovodrun over ssh, and Slurm.

Each "host" is a network namespace on this machine (brainseg/netns.py); run_multinode.sh
launches train_horovod.py across the first N of them, with MPI restricted to TCP on the
namespaces' subnet, exactly as the multi-host tests do. --engines picks how:
  agent   mpirun through scripts/netns_rsh.sh (tests/test_multihost.py)
  ssh     mpirun through real OpenSSH servers (brainseg/netns_ssh.py, tests/test_engines.py)
  gloo    horovodrun --gloo through the same ssh servers
  slurm   sbatch --wait of scripts/slurm_example.sbatch on a Slurm cluster of the hosts
          (brainseg/slurm_cluster.py, tests/test_slurm.py)
Reported: training images per second (mean over the epochs after the first, which includes
tracing), scaling efficiency = images/s with N hosts / (N x images/s with 1 host), images/s
relative to 1 host, the bytes host 1 sent onto the bridge per training step, and the share of
the training's wall time in which an allreduce was in progress, from a Horovod timeline of
the run (every epoch, validation included). Every rank runs the same number of intra-op
threads (--intra-threads).

All hosts share this machine's cores, so N hosts do not add compute: the ideal is the same
images/s as 1 host (efficiency 1/N); what falls short of it is the cost of synchronizing
gradients over TCP (and of sharing the cores), not a speed-up. Needs root (and sshd, Slurm
for those engines).

    sudo .venv/bin/python -m bench.multihost [--engines agent ssh gloo slurm] [--json FILE]
"""
import argparse
import contextlib
import csv
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from brainseg import cli, netns, netns_ssh, slurm_cluster

PYTHON = sys.executable
LAUNCHER = os.path.join(REPO_DIR, "run_multinode.sh")
SBATCH_SCRIPT = os.path.join(REPO_DIR, "scripts", "slurm_example.sbatch")
ENGINES = ("agent", "ssh", "gloo", "slurm")
# MPI over TCP between the hosts only (no shared memory), as in the multi-host tests.
JOB_ENVIRONMENT = {"OMPI_MCA_btl": "tcp,self", "TF_CPP_MIN_LOG_LEVEL": "2"}
NOTE = ("Note: these namespace hosts share this machine's {cores} cores, so adding hosts adds "
        "no compute:\nthe ideal is 1.00x the images/s of 1 host (efficiency 1/N), and the "
        "shortfall measures\ncommunication and synchronization overhead (TCP between "
        "namespaces, shared cores), not speed-up.")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # Smaller than the training defaults so that three runs take a few minutes on 2 cores.
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=["agent"])
    parser.add_argument("--hosts", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3, help="the first one is not timed")
    parser.add_argument("--steps-per-epoch", type=int, default=10)
    parser.add_argument("--intra-threads", type=int, default=os.cpu_count(),
                        help="intra-op threads of every rank, whatever the number of hosts")
    parser.add_argument("--data-dir", help="converted arrays to use (default: synthetic cases "
                        "converted at --image-size into a temporary folder)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    cli.add_settings(parser, ["BATCH_SIZE", "BASE_FILTERS", "DEPTH", "PRECISION"])
    parser.set_defaults(BATCH_SIZE=16, BASE_FILTERS=8, DEPTH=3)
    return parser.parse_args(argv)


def make_data(scratch, image_size):
    raw_dir, data_dir = os.path.join(scratch, "raw"), os.path.join(scratch, "converted")
    crop = image_size * 3 // 2
    subprocess.run([PYTHON, "synthetic_brats.py", "--raw-dir", raw_dir,
                    "--synthetic-num-cases", "6", "--synthetic-shape", str(crop), str(crop), "32"],
                   cwd=REPO_DIR, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    subprocess.run([PYTHON, "converter.py", "--raw-dir", raw_dir, "--data-dir", data_dir,
                    "--image-size", str(image_size), "--crop-size", str(crop)], cwd=REPO_DIR,
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return data_dir


def train_flags(args, data_dir, output_dir):
    return ["--data-dir", data_dir, "--train-dir", output_dir,
            "--epochs", str(args.epochs), "--steps-per-epoch", str(args.steps_per_epoch),
            "--batch-size", str(args.BATCH_SIZE), "--base-filters", str(args.BASE_FILTERS),
            "--depth", str(args.DEPTH), "--precision", args.PRECISION,
            "--early-stopping-patience", "0", "--num-intra-threads", str(args.intra_threads),
            "--num-inter-threads", "1", "--timeline", os.path.join(output_dir + ".timeline")]


def run_logged(argv, log, env):
    """Runs a launch from the project folder, its output in the file `log`; exit status."""
    with open(log, "w") as file:
        return subprocess.run(argv, env=env, cwd=REPO_DIR, stdout=file,
                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, check=False,
                              timeout=1800).returncode


@contextlib.contextmanager
def engine_cluster(engine, num_hosts, scratch):
    """The hosts for an engine: (a run(num_hosts, flags, log) function, the NamespaceCluster)."""
    env = dict(os.environ, **JOB_ENVIRONMENT)
    if engine == "agent":
        with netns.namespace_cluster(num_hosts) as cluster:
            def run(hosts, flags, log):
                hosts_file = cluster.write_hosts_file(log + ".hosts", hosts)
                command = [LAUNCHER, "--hosts", hosts_file, "--agent", netns.AGENT,
                           "--network", cluster.subnet, "--", *flags]
                return run_logged(cluster.command_on(0, shlex.join(command)), log, env)
            yield run, cluster
    elif engine in ("ssh", "gloo"):
        ssh = netns_ssh.SshCluster(num_hosts)
        try:
            ssh.create()

            def run(hosts, flags, log):
                hosts_file = ssh.write_hosts_file(log + ".hosts", hosts)
                if engine == "ssh":
                    network = ["--network", ssh.cluster.subnet]
                else:  # horovodrun on one host runs over loopback, which eth0 would exclude
                    network = ["--gloo", *(["--network", "eth0"] if hosts > 1 else [])]
                command = [LAUNCHER, "--hosts", hosts_file, *network, "--", *flags]
                return run_logged(ssh.on_host(0, command), log, env)
            yield run, ssh.cluster
        finally:
            ssh.destroy()
    else:
        with slurm_cluster.slurm_cluster(num_hosts, os.path.join(scratch, "slurm")) as slurm:
            slurm.environment.update(JOB_ENVIRONMENT)

            def run(hosts, flags, log):
                command = ["sbatch", "--wait", f"--nodes={hosts}", "--ntasks-per-node=1",
                           f"--output={log}", SBATCH_SCRIPT, *flags]
                return slurm.run(command, cwd=REPO_DIR, check=False, timeout=1800).returncode
            yield run, slurm.cluster


def allreduce_share(timeline_path):
    """Share of the timeline's span in which some tensor's allreduce was in progress: the
    union of the ALLREDUCE activities, from the first event to the last. Activities nest
    within a tensor's track (B opens one, E closes the innermost); Horovod writes the trace
    as a JSON array it never closes."""
    with open(timeline_path) as file:
        text = file.read().strip().rstrip(",")
    events = json.loads(text if text.endswith("]") else text + "]")
    open_activities, intervals, stamps = {}, [], []
    for event in events:
        if "ts" not in event:
            continue
        stamps.append(event["ts"])
        track = open_activities.setdefault(event.get("pid"), [])
        if event.get("ph") == "B":
            track.append((event.get("name"), event["ts"]))
        elif event.get("ph") == "E" and track:
            name, start = track.pop()
            if name == "ALLREDUCE":
                intervals.append((start, event["ts"]))
    busy, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        busy += max(0.0, end - max(start, reach))
        reach = max(reach, end)
    span = max(stamps) - min(stamps) if stamps else 0
    return busy / span if span else None


def train_on(run, cluster, num_hosts, args, data_dir, output_dir):
    """One training run on the first `num_hosts` hosts; returns images/s, bytes/step and
    the allreduce share."""
    sent_before = cluster.transmitted_bytes(0)
    log = output_dir + ".log"
    if run(num_hosts, train_flags(args, data_dir, output_dir), log) != 0:
        with open(log) as file:
            sys.exit(f"training on {num_hosts} host(s) failed:\n{file.read()}")
    with open(os.path.join(output_dir, "training_log.csv")) as file:
        rows = list(csv.DictReader(file))[1:]  # the first epoch includes tracing
    images_per_second = sum(float(row["images_per_second"]) for row in rows) / len(rows)
    steps = args.epochs * args.steps_per_epoch
    return (images_per_second, (cluster.transmitted_bytes(0) - sent_before) / steps,
            allreduce_share(output_dir + ".timeline"))


def print_results(results):
    print(f"\n{'engine':>6} {'hosts':>5} {'images/s':>9} {'efficiency':>10} {'vs 1 host':>9} "
          f"{'host 1 sends/step':>18} {'allreduce share':>16}")
    for result in results:
        baseline = next((r["images_per_second"] for r in results
                         if r["engine"] == result["engine"] and r["hosts"] == 1), None)
        relative = result["images_per_second"] / baseline if baseline else None
        result["relative_to_one_host"] = relative
        result["scaling_efficiency"] = relative / result["hosts"] if baseline else None
        efficiency = f"{result['scaling_efficiency']:.0%}" if baseline else "n/a"
        versus = f"{relative:.2f}x" if baseline else "n/a"
        share = result["allreduce_share"]
        print(f"{result['engine']:>6} {result['hosts']:>5} {result['images_per_second']:>9.1f} "
              f"{efficiency:>10} {versus:>9} "
              f"{result['host1_bytes_sent_per_step'] / 1e6:>15.2f} MB "
              f"{f'{share:.0%}' if share is not None else 'n/a':>16}")


def main(argv=None):
    args = parse_args(argv)
    for engine, reason in (("agent", netns.unavailable_reason()),
                           ("ssh", netns_ssh.unavailable_reason()),
                           ("gloo", netns_ssh.unavailable_reason()),
                           ("slurm", slurm_cluster.unavailable_reason())):
        if engine in args.engines and reason:
            sys.exit(f"bench/multihost.py: engine {engine}: {reason}")
    print("Configuration:\n" + cli.format_config(args))
    scratch = tempfile.mkdtemp(prefix="bench_multihost_")
    results = []
    try:
        data_dir = args.data_dir or make_data(scratch, args.image_size)
        for engine in args.engines:
            with engine_cluster(engine, max(args.hosts), scratch) as (run, cluster):
                for num_hosts in args.hosts:
                    started = time.perf_counter()
                    output_dir = os.path.join(scratch, f"{engine}{num_hosts}")
                    images_per_second, bytes_per_step, share = train_on(
                        run, cluster, num_hosts, args, data_dir, output_dir)
                    results.append({"engine": engine, "hosts": num_hosts, "ranks": num_hosts,
                                    "images_per_second": images_per_second,
                                    "host1_bytes_sent_per_step": bytes_per_step,
                                    "allreduce_share": share,
                                    "wall_seconds": time.perf_counter() - started})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    print_results(results)
    print(NOTE.format(cores=os.cpu_count()))
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"config": {k: v for k, v in vars(args).items() if k != "json"},
                       "cores": os.cpu_count(), "results": results,
                       "note": NOTE.format(cores=os.cpu_count())}, file, indent=2)
        print(f"Wrote {args.json}")


if __name__ == "__main__":
    main()
