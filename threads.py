"""How many TensorFlow threads a process should use, from the cores it actually owns.

More intra-op threads than cores makes ranks on the same node fight over the cores; the
seed project hand-tuned 57 threads on 68-core nodes. Here 0 means "work it out": the cores
in this process's CPU affinity (what mpirun binding gave it), or, when it is not bound, the
node's cores shared evenly between the ranks on the node.
"""
import os


def cores_for_this_process(ranks_on_node=1):
    available = len(os.sched_getaffinity(0))
    if available == os.cpu_count() and ranks_on_node > 1:
        available //= ranks_on_node  # unbound: share the node
    return max(1, available)


def resolve(intra_threads, inter_threads, ranks_on_node=1):
    """(intra, inter) thread counts, replacing 0 by the automatic choice: one intra-op thread
    per owned core, and 1 inter-op thread (a U-Net is a chain of big ops; running two at
    once only splits the same cores), 2 when there are 8 cores or more."""
    cores = cores_for_this_process(ranks_on_node)
    intra = intra_threads or cores
    inter = inter_threads or (2 if cores >= 8 else 1)
    return intra, inter


def configure(intra_threads, inter_threads, ranks_on_node=1):
    """Applies the thread counts to TensorFlow. Must run before TensorFlow executes its first
    operation (it raises RuntimeError otherwise, rather than silently ignoring them)."""
    import tensorflow as tf

    intra, inter = resolve(intra_threads, inter_threads, ranks_on_node)
    # OpenMP builds of TensorFlow (Intel's) size their pool from OMP_NUM_THREADS when the
    # first op runs, i.e. after this; stock TensorFlow ignores it. The launcher's value wins.
    os.environ.setdefault("OMP_NUM_THREADS", str(intra))
    tf.config.threading.set_intra_op_parallelism_threads(intra)
    tf.config.threading.set_inter_op_parallelism_threads(inter)
    return intra, inter
