"""train_horovod.py with the main thread of one rank blocked for good before one of its
training batches, as a read from a dead NFS mount blocks it; its other threads (Horovod's,
the watchdog's) run on. tests/test_faults_hang.py runs it under mpirun in place of
train_horovod.py:

    HANG_RANK=1 HANG_AT_BATCH=80 mpirun ... python tests/hang_rank.py TRAIN_FLAGS...

or, with HANG_WHILE_TIMING_PRECISION=1, with whichever rank times PRECISION "auto" (as on a
CPU with AVX512_BF16 but no AMX, whatever this one has) blocked while it times.
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402 (the project's root first)
import train_horovod  # noqa: E402
from brainseg import hardware  # noqa: E402


def blocking_before(batches, rank, at_batch):
    for number, batch in enumerate(batches):
        if number == at_batch:
            print(f"rank {rank}: blocking before batch {at_batch}", flush=True)
            time.sleep(24 * 3600)
        yield batch


def blocking_while_timing(seconds_per_step):
    print(f"rank {os.environ.get('OMPI_COMM_WORLD_RANK', '0')}: blocking while timing the "
          f"training precision", flush=True)
    time.sleep(24 * 3600)


def main():
    if os.environ.get("HANG_WHILE_TIMING_PRECISION"):
        hardware.precision_is_timed = lambda precision, *args: precision == "auto"
        hardware.faster_training_precision = blocking_while_timing
        return train_horovod.main(sys.argv[1:])
    rank, at_batch = int(os.environ["HANG_RANK"]), int(os.environ["HANG_AT_BATCH"])
    if int(os.environ.get("OMPI_COMM_WORLD_RANK", "0")) == rank:
        training_dataset = data.training_dataset
        data.training_dataset = lambda *args, **kwargs: blocking_before(
            training_dataset(*args, **kwargs), rank, at_batch)
    train_horovod.main(sys.argv[1:])


if __name__ == "__main__":
    main()
