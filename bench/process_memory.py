"""Runs a command and samples the resident memory of its whole process tree.

A converter with worker processes uses memory in several processes at once, so the peak of
the sum over the tree is what a machine must provide (getrusage only reports the largest
single process).
"""
import os
import subprocess
import time


def _children(pid):
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as file:
            return [int(child) for child in file.read().split()]
    except OSError:
        return []


def _rss_bytes(pid):
    try:
        with open(f"/proc/{pid}/status") as file:
            for line in file:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def tree_rss_bytes(pid):
    """Resident memory of pid and all its descendants."""
    total, pending = 0, [pid]
    while pending:
        current = pending.pop()
        total += _rss_bytes(current)
        pending.extend(_children(current))
    return total


def run_sampled(command, interval=0.05, **kwargs):
    """(seconds, peak tree RSS in bytes, CompletedProcess-like stdout) of a command; raises
    CalledProcessError when it fails."""
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, **kwargs)
    peak = 0
    while process.poll() is None:
        peak = max(peak, tree_rss_bytes(process.pid))
        time.sleep(interval)
    output = process.stdout.read()
    seconds = time.perf_counter() - started
    if process.returncode:
        raise subprocess.CalledProcessError(process.returncode, command, output)
    return seconds, peak, output


if __name__ == "__main__":  # a quick self-check: a child that allocates ~200 MB
    import sys
    _, peak, _ = run_sampled([sys.executable, "-c",
                              "import numpy, time; a = numpy.ones(25_000_000); time.sleep(0.5)"])
    print(f"peak {peak / 2**20:.0f} MiB")
    os._exit(0 if peak > 150 * 2**20 else 1)
