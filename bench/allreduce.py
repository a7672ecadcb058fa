"""How training would scale to many nodes: the gradient allreduce measured on rate-limited
links, fitted to the ring-allreduce cost model, and extrapolated to 8, 64 and 512 nodes.

    sudo .venv/bin/python -m bench.allreduce [--rates 1 10] [--json FILE]

Hosts are network namespaces on this machine (brainseg/netns.py). Every host limits its own
interface's egress with a token bucket (`tc qdisc ... tbf rate R`), so every path between two
hosts crosses one shaped link of R Gbit/s. On 2 and 3 hosts, one rank each, Horovod
allreduces the real gradient set (every trainable tensor of settings.py's U-Net, float32) as
training does (one fused group), plain and with Horovod's fp16 compression, and times it
(median of --repeats after a warm-up; the slowest rank's).

The ring allreduce of S bytes over N nodes sends 2(N-1) messages of S/N in sequence:

    t(N) = 2(N-1) * alpha + 2(N-1)/N * S / beta

alpha (latency per message, software included) and beta (bandwidth achieved) are fitted per
link from the 2- and 3-host times. With the step time T of one node (forward and backward
of one per-rank batch, measured here, with no communication), the predicted efficiency of N
nodes, if the allreduce does not overlap the computation, is T / (T + t(N)). Horovod does
overlap part of it (it starts reducing the last layers' gradients while earlier ones are
still being computed), so this is a lower bound. A network's latency adds to alpha: the
predictions are also given with 0.1 ms and 1 ms more per message. (They are not measured:
this machine's kernel has no netem qdisc to add delay; `tc` reports it unknown.)

The namespaces share this machine's cores: a shaped 10 Gbit/s link may not be reached
(the achieved beta says so), and the absolute step time is this 2-core machine's.
"""
import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import time

REPO_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from brainseg import netns

PYTHON = sys.executable
PREDICTED_NODES = (8, 64, 512)
ADDED_LATENCIES_MS = (0.1, 1.0)  # network latencies added to the fitted alpha in predictions


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rates", type=float, nargs="+", default=[1.0, 10.0],
                        help="link rates to shape, Gbit/s")
    parser.add_argument("--hosts", type=int, nargs="+", default=[2, 3])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=None,
                        help="per-rank batch of the timed step (default: settings.BATCH_SIZE)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


# --- On every rank (under mpirun) ----------------------------------------------------------

def shape_own_link(rate_gbit):
    """Limits this namespace's egress to rate_gbit with a token bucket whose burst is 1 ms
    of traffic (at least 64 kB) and whose queue holds 50 ms."""
    burst = max(64 * 1024, int(rate_gbit * 1e9 / 8 / 1000))
    subprocess.run(["tc", "qdisc", "replace", "dev", "eth0", "root", "tbf",
                    "rate", f"{rate_gbit}gbit", "burst", str(burst), "latency", "50ms"],
                   check=True)


def time_allreduce(hvd, tensors, compression, repeats):
    """Median seconds of one fused allreduce of the whole gradient set, the slowest rank's."""
    import tensorflow as tf
    hvd.grouped_allreduce(tensors, compression=compression)  # warm-up: negotiation, buffers
    times = []
    for _ in range(repeats):
        hvd.allreduce(tf.constant(0.0), name="barrier")
        start = time.perf_counter()
        hvd.grouped_allreduce(tensors, compression=compression)
        times.append(time.perf_counter() - start)
    return float(hvd.allreduce(tf.constant(statistics.median(times)), op=hvd.Max))


def time_step(model_and_batch, repeats):
    """Median seconds of one forward + backward pass (no communication)."""
    import tensorflow as tf
    model, images, masks = model_and_batch

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(images, training=True) - masks))
        return tape.gradient(loss, model.trainable_weights)

    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        [gradient.numpy() for gradient in step()]
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def build_model(batch_size):
    """settings.py's U-Net (4 modalities in, the 3 BraTS regions out) and a random batch."""
    import numpy as np

    import settings
    from bench.training import settings_unet
    model = settings_unet(settings.IMAGE_SIZE, 4, 3)
    rng = np.random.default_rng(0)
    shape = (batch_size, settings.IMAGE_SIZE, settings.IMAGE_SIZE)
    images = rng.normal(size=(*shape, 4)).astype("float32")
    masks = (rng.random((*shape, 3)) > 0.9).astype("float32")
    return model, images, masks


def worker(args):
    import horovod.tensorflow as hvd
    import tensorflow as tf
    hvd.init()
    model, images, masks = build_model(args.batch_size)
    gradients = [tf.random.normal(weight.shape) for weight in model.trainable_weights]
    gradient_bytes = sum(4 * int(tf.size(tensor)) for tensor in gradients)
    # The fit also needs smaller messages, down to one float (latency alone).
    payloads = {4: [tf.zeros([1])], gradient_bytes // 16: [tf.zeros([gradient_bytes // 64])],
                gradient_bytes // 4: [tf.zeros([gradient_bytes // 16])],
                gradient_bytes: gradients}
    rows = []
    for rate in args.rates:
        shape_own_link(rate)
        hvd.allreduce(tf.constant(0.0), name="shaped")  # every rank has shaped its link
        for name, compression in (("none", hvd.Compression.none),
                                  ("fp16", hvd.Compression.fp16)):
            for size, tensors in payloads.items():
                seconds = time_allreduce(hvd, tensors, compression, args.repeats)
                rows.append({"hosts": hvd.size(), "rate_gbit": rate, "compression": name,
                             "bytes": size, "seconds": seconds})
    if hvd.rank() == 0:
        result = {"gradient_bytes": gradient_bytes, "rows": rows}
        if hvd.size() == min(args.hosts):  # the step time once, on one rank's host
            result["step_seconds"] = time_step((model, images, masks), args.repeats)
        with open(args.result, "w") as file:
            json.dump(result, file)


# --- The driver --------------------------------------------------------------------------

def run_on(cluster, num_hosts, args, result_path):
    command = ["mpirun", "-np", str(num_hosts),
               "--host", ",".join(f"{host}:1" for host in cluster.hosts[:num_hosts]),
               "--mca", "plm_rsh_agent", netns.AGENT,
               "--mca", "btl", "tcp,self", "--mca", "btl_tcp_if_include", cluster.subnet,
               "--mca", "oob_tcp_if_include", cluster.subnet, "--allow-run-as-root",
               "-x", "PYTHONPATH", "-x", "TF_CPP_MIN_LOG_LEVEL", "-x", "PATH",
               "--wdir", REPO_DIR,
               PYTHON, "-m", "bench.allreduce", "--worker", "--result", result_path,
               "--repeats", str(args.repeats), "--batch-size", str(args.batch_size),
               "--hosts", *map(str, args.hosts), "--rates", *map(str, args.rates)]
    env = dict(os.environ, PYTHONPATH=REPO_DIR, TF_CPP_MIN_LOG_LEVEL="2")
    subprocess.run(cluster.command_on(0, shlex.join(command)), check=True, env=env,
                   timeout=1800)
    with open(result_path) as file:
        return json.load(file)


def fit_ring_model(points):
    """alpha (s per message) and beta (bytes/s) of t = 2(N-1) alpha + 2(N-1)/N S / beta,
    least squares over the measured (hosts N, bytes S on the wire, seconds t) points."""
    import numpy as np
    design = np.array([[2 * (n - 1), 2 * (n - 1) / n * size] for n, size, _ in points])
    times = np.array([t for _, _, t in points])
    alpha, inverse_beta = np.linalg.lstsq(design, times, rcond=None)[0]
    return float(alpha), float(1 / inverse_beta) if inverse_beta > 0 else float("inf")


def ring_seconds(num_nodes, alpha, beta, gradient_bytes):
    return 2 * (num_nodes - 1) * alpha + 2 * (num_nodes - 1) / num_nodes * gradient_bytes / beta


def summarize(results, args):
    gradient_bytes = results[0]["gradient_bytes"]
    step = next(r["step_seconds"] for r in results if "step_seconds" in r)
    rows = [row for result in results for row in result["rows"]]
    fits = []
    for rate in args.rates:
        for compression in ("none", "fp16"):
            wire = 2 if compression == "fp16" else 1  # fp16 halves what is sent
            points = [(row["hosts"], row["bytes"] // wire, row["seconds"]) for row in rows
                      if (row["rate_gbit"], row["compression"]) == (rate, compression)]
            alpha, beta = fit_ring_model(points)
            size = gradient_bytes // wire
            measured = {n: t for n, on_wire, t in points if on_wire == size}
            efficiency = {
                latency_ms: {n: step / (step + ring_seconds(n, alpha + latency_ms / 1e3, beta,
                                                            size))
                             for n in PREDICTED_NODES}
                for latency_ms in (0.0, *ADDED_LATENCIES_MS)}
            fits.append({"rate_gbit": rate, "compression": compression,
                         "measured_seconds": measured, "points": points,
                         "alpha_ms": 1e3 * alpha,
                         "beta_gbit": 8 * beta / 1e9,
                         "predicted_seconds": {n: ring_seconds(n, alpha, beta, size)
                                               for n in PREDICTED_NODES},
                         "predicted_efficiency": efficiency})
    return {"gradient_bytes": gradient_bytes, "step_seconds": step,
            "batch_size": args.batch_size, "fits": fits}


def print_summary(summary):
    print(f"\nGradient set {summary['gradient_bytes'] / 1e6:.2f} MB (float32); step time on "
          f"one node {summary['step_seconds'] * 1e3:.0f} ms (batch {summary['batch_size']}, "
          f"forward + backward, no communication)")
    latencies = (0.0, *ADDED_LATENCIES_MS)
    nodes = "/".join(map(str, PREDICTED_NODES))
    print("\n| link | compression | allreduce on 2 / 3 hosts | fitted alpha | achieved beta | "
          + " | ".join(f"efficiency at {nodes} nodes, +{latency:g} ms" for latency in latencies)
          + " |")
    print("|---|---|---|---|---|" + "---|" * len(latencies))
    for fit in summary["fits"]:
        measured = " / ".join(f"{fit['measured_seconds'][n] * 1e3:.1f}"
                              for n in sorted(fit["measured_seconds"]))
        predicted = " | ".join(
            " / ".join(f"{fit['predicted_efficiency'][latency][n]:.0%}" for n in PREDICTED_NODES)
            for latency in latencies)
        print(f"| {fit['rate_gbit']:g} Gbit/s | {fit['compression']} | {measured} ms | "
              f"{fit['alpha_ms']:.2f} ms | {fit['beta_gbit']:.2f} Gbit/s | {predicted} |")


def main(argv=None):
    args = parse_args(argv)
    if args.batch_size is None:
        import settings
        args.batch_size = settings.BATCH_SIZE
    if args.worker:
        return worker(args)
    reason = netns.unavailable_reason()
    if reason or shutil.which("tc") is None:
        raise SystemExit(f"bench.allreduce: {reason or 'needs the tc command (iproute2)'}")
    import tempfile
    results = []
    with tempfile.TemporaryDirectory() as scratch, \
            netns.namespace_cluster(max(args.hosts)) as cluster:
        for num_hosts in args.hosts:
            print(f"allreduce on {num_hosts} hosts, links of "
                  f"{', '.join(f'{rate:g}' for rate in args.rates)} Gbit/s ...", flush=True)
            results.append(run_on(cluster, num_hosts, args,
                                  os.path.join(scratch, f"{num_hosts}.json")))
    summary = summarize(results, args)
    print_summary(summary)
    if args.json:
        with open(args.json, "w") as file:
            json.dump(summary, file, indent=2)


if __name__ == "__main__":
    main()
