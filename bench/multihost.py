"""Training throughput on 1, 2 and 3 hosts of a network-namespace cluster (1 rank each).

Each "host" is a network namespace on this machine (tests/netns.py); run_multinode.sh
launches train_horovod.py across the first N of them through scripts/netns_rsh.sh, with MPI
restricted to TCP on the namespaces' subnet, exactly as the multi-host tests do. Reported:
training images per second (mean over the epochs after the first, which includes tracing),
scaling efficiency = images/s with N hosts / (N x images/s with 1 host), images/s relative
to 1 host, and the bytes host 1 sent onto the bridge per training step. Every rank is bound
by mpirun to its host's cores and runs the same number of intra-op threads (--intra-threads).

All hosts share this machine's cores, so N hosts do not add compute: the ideal is the same
images/s as 1 host (efficiency 1/N); what falls short of it is the cost of synchronizing
gradients over TCP (and of sharing the cores), not a speed-up. Needs root.

    sudo .venv/bin/python -m bench.multihost [--json FILE]
"""
import argparse
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

from brainseg import cli, netns

PYTHON = sys.executable
LAUNCHER = os.path.join(REPO_DIR, "run_multinode.sh")
NOTE = ("Note: these namespace hosts share this machine's {cores} cores, so adding hosts adds "
        "no compute:\nthe ideal is 1.00x the images/s of 1 host (efficiency 1/N), and the "
        "shortfall measures\ncommunication and synchronization overhead (TCP between "
        "namespaces, shared cores), not speed-up.")


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # Smaller than the training defaults so that three runs take a few minutes on 2 cores.
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


def train_on(cluster, num_hosts, args, data_dir, output_dir):
    """One training run on the first `num_hosts` hosts; returns images/s and bytes/step."""
    hosts_file = cluster.write_hosts_file(os.path.join(output_dir + ".hosts"), num_hosts)
    command = [LAUNCHER, "--hosts", hosts_file, "--agent", netns.AGENT,
               "--network", cluster.subnet, "--",
               "--data-dir", data_dir, "--train-dir", output_dir,
               "--epochs", str(args.epochs), "--steps-per-epoch", str(args.steps_per_epoch),
               "--batch-size", str(args.BATCH_SIZE), "--base-filters", str(args.BASE_FILTERS),
               "--depth", str(args.DEPTH), "--precision", args.PRECISION,
               "--early-stopping-patience", "0", "--num-intra-threads", str(args.intra_threads),
               "--num-inter-threads", "1"]
    env = dict(os.environ, OMPI_MCA_btl="tcp,self", TF_CPP_MIN_LOG_LEVEL="2")
    sent_before = cluster.transmitted_bytes(0)
    result = subprocess.run(cluster.command_on(0, shlex.join(command)), cwd=REPO_DIR, env=env,
                            capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        sys.exit(f"training on {num_hosts} host(s) failed:\n{result.stdout}\n{result.stderr}")
    with open(os.path.join(output_dir, "training_log.csv")) as file:
        rows = list(csv.DictReader(file))[1:]  # the first epoch includes tracing
    images_per_second = sum(float(row["images_per_second"]) for row in rows) / len(rows)
    steps = args.epochs * args.steps_per_epoch
    return images_per_second, (cluster.transmitted_bytes(0) - sent_before) / steps


def main(argv=None):
    args = parse_args(argv)
    reason = netns.unavailable_reason()
    if reason:
        sys.exit(f"bench/multihost.py: {reason}")
    print("Configuration:\n" + cli.format_config(args))
    scratch = tempfile.mkdtemp(prefix="bench_multihost_")
    results = []
    try:
        data_dir = args.data_dir or make_data(scratch, args.image_size)
        with netns.namespace_cluster(max(args.hosts)) as cluster:
            for num_hosts in args.hosts:
                started = time.perf_counter()
                images_per_second, bytes_per_step = train_on(
                    cluster, num_hosts, args, data_dir, os.path.join(scratch, f"run{num_hosts}"))
                results.append({"hosts": num_hosts, "ranks": num_hosts,
                                 "images_per_second": images_per_second,
                                 "host1_bytes_sent_per_step": bytes_per_step,
                                 "wall_seconds": time.perf_counter() - started})
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    baseline = next((r["images_per_second"] for r in results if r["hosts"] == 1), None)
    print(f"\n{'hosts':>5} {'images/s':>9} {'efficiency':>10} {'vs 1 host':>9} "
          f"{'host 1 sends/step':>18}")
    for result in results:
        relative = result["images_per_second"] / baseline if baseline else None
        result["relative_to_one_host"] = relative
        result["scaling_efficiency"] = relative / result["hosts"] if baseline else None
        efficiency = f"{result['scaling_efficiency']:.0%}" if baseline else "n/a"
        versus = f"{relative:.2f}x" if baseline else "n/a"
        print(f"{result['hosts']:>5} {result['images_per_second']:>9.1f} {efficiency:>10} "
              f"{versus:>9} {result['host1_bytes_sent_per_step'] / 1e6:>15.2f} MB")
    print(NOTE.format(cores=os.cpu_count()))
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"config": {k: v for k, v in vars(args).items() if k != "json"},
                       "cores": os.cpu_count(), "results": results,
                       "note": NOTE.format(cores=os.cpu_count())}, file, indent=2)
        print(f"Wrote {args.json}")


if __name__ == "__main__":
    main()
