"""train_horovod.py as if its ranks ran on two CPU models (a mixed cluster): each rank has a
CPU id of its own, PRECISION "auto" is timed (as with AVX512_BF16 but no AMX, whatever this
CPU has), and the timing finds bfloat16 faster on rank 0 only. tests/test_launcher.py runs it
under mpirun in place of train_horovod.py."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_horovod  # noqa: E402 (the project's root first)
from brainseg import hardware  # noqa: E402


def main():
    rank = int(os.environ.get("OMPI_COMM_WORLD_RANK", "0"))
    hardware.cpu_id = lambda *args: f"cpu-of-rank-{rank}"
    hardware.precision_is_timed = lambda precision, *args: precision == "auto"
    seconds = {"float32": 1.0, "mixed_bfloat16": 0.5 if rank == 0 else 2.0}
    hardware.faster_training_precision = lambda seconds_per_step: (
        "mixed_bfloat16" if seconds["mixed_bfloat16"] < seconds["float32"] else "float32",
        {"seconds_per_step": seconds})
    train_horovod.main(sys.argv[1:])


if __name__ == "__main__":
    main()
