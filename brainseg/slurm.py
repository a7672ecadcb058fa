"""The hosts and slots of the Slurm allocation this process runs in, as hosts.txt lines.

    python -m brainseg.slurm        (inside a job: sbatch, salloc or srun)

Inside an allocation, run_multinode.sh takes its hosts from here instead of hosts.txt: the
nodes Slurm gave the job (SLURM_JOB_NODELIST, expanded by `scontrol show hostnames`) with as
many slots as tasks it allotted to each (SLURM_TASKS_PER_NODE, e.g. "2(x3),1" for 2 tasks on
each of three nodes and 1 on a fourth). So `sbatch --nodes=N --ntasks-per-node=K` is the
one place where the job's size is chosen.
"""
import os
import re
import subprocess


class NotInAllocation(RuntimeError):
    pass


def tasks_per_node(value):
    """SLURM_TASKS_PER_NODE -> one task count per node: "2(x3),1" -> [2, 2, 2, 1]."""
    counts = []
    for part in value.split(","):
        match = re.fullmatch(r"([1-9][0-9]*)(?:\(x([1-9][0-9]*)\))?", part.strip())
        if not match:
            raise ValueError(f"SLURM_TASKS_PER_NODE={value!r}: cannot read {part!r} "
                             f"(expected counts like '2(x3),1')")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts


def expand_node_list(node_list):
    """SLURM_JOB_NODELIST ("node[01-03],gpu7") -> host names, as Slurm itself expands it."""
    result = subprocess.run(["scontrol", "show", "hostnames", node_list], check=False,
                            capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise RuntimeError(f"scontrol show hostnames {node_list}: {result.stderr.strip()}")
    return result.stdout.split()


def allocation_hosts(environ):
    """[(host, slots)] of the job's allocation, in Slurm's node order (the first node runs
    the batch script, and so rank 0)."""
    node_list = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST")
    tasks = environ.get("SLURM_TASKS_PER_NODE")
    if not node_list or not tasks:
        raise NotInAllocation("not inside a Slurm allocation (SLURM_JOB_NODELIST and "
                              "SLURM_TASKS_PER_NODE are not set)")
    hosts, counts = expand_node_list(node_list), tasks_per_node(tasks)
    if len(hosts) != len(counts):
        raise ValueError(f"Slurm lists {len(hosts)} nodes ({node_list}) but task counts for "
                         f"{len(counts)} (SLURM_TASKS_PER_NODE={tasks})")
    return list(zip(hosts, counts))


def main():
    try:
        hosts = allocation_hosts(os.environ)
    except (NotInAllocation, ValueError, RuntimeError, OSError) as error:
        raise SystemExit(f"brainseg.slurm: {error}")
    for host, slots in hosts:
        print(f"{host} slots={slots}")


if __name__ == "__main__":
    main()
