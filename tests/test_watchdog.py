"""brainseg/watchdog.py on its own, in a process without MPI: when the watchdog ends a process,
what it says, and Horovod's stall settings derived from its timeout. Real jobs with a rank
stopped or blocked are in test_faults_hang.py."""
import signal
import subprocess
import sys
import time

from brainseg import watchdog
from conftest import REPO_DIR


def test_horovod_shuts_down_before_the_watchdog_fires():
    """Horovod's stall check names the missing rank, so it must act first: a cached tensor
    is seen as stalled up to 3 check periods after the shutdown time."""
    assert watchdog.horovod_stall_environment(300) == {
        "HOROVOD_STALL_CHECK_TIME_SECONDS": "30", "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": "150"}
    assert watchdog.horovod_stall_environment(0) == {}
    for timeout in range(10, 2000):
        environment = watchdog.horovod_stall_environment(timeout)
        check = int(environment["HOROVOD_STALL_CHECK_TIME_SECONDS"])
        shutdown = int(environment["HOROVOD_STALL_SHUTDOWN_TIME_SECONDS"])
        assert 1 <= check < shutdown  # Horovod ignores a shutdown time below the check time
        assert shutdown + 3 * check < timeout, timeout


def run_python(code):
    return subprocess.Popen([sys.executable, "-c", code], cwd=REPO_DIR, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


FED_FOR_TWO_SECONDS = """
import time
from brainseg import watchdog
dog = watchdog.Watchdog(1.0, "rank 0 on testhost").start()
started = time.monotonic()
step = 0
while time.monotonic() - started < 2:
    step += 1
    dog.feed(f"step {step}")
    time.sleep(0.05)
print("stopped feeding", flush=True)
time.sleep(60)
"""


def test_a_watchdog_not_fed_ends_its_process_and_says_why():
    started = time.monotonic()
    process = run_python(FED_FOR_TWO_SECONDS)
    stdout, stderr = process.communicate(timeout=60)
    took = time.monotonic() - started
    assert process.returncode == watchdog.STALL_EXIT_STATUS, stderr
    assert "stopped feeding" in stdout  # fed every 50 ms, it let the process run
    assert 3 < took < 10, took
    assert "watchdog: rank 0 on testhost made no progress for 1 s (last finished: step " \
        in stderr
    assert "the other ranks cannot be asked (no MPI beside Horovod)" in stderr


STEPS_OF_HALF_A_SECOND_OF_CPU = """
import time
from brainseg import watchdog
dog = watchdog.Watchdog(3.0, "rank 0 on testhost").start()
print("started", flush=True)
while True:
    # A step of CPU work: a process stopped in the middle of one still has work to do when
    # resumed, so the watchdog thread wakes up before the step can end and feed it.
    started = time.thread_time()
    while time.thread_time() - started < 0.5:
        pass
    dog.feed("step")
"""


def test_a_process_stopped_as_a_whole_does_not_blame_itself_when_resumed():
    """kill -STOP for longer than the timeout, then -CONT: its last feed is older than the
    timeout, but its main thread gets the time to move on (mpirun resumes a stopped rank to
    end it; the other ranks report the stop)."""
    process = run_python(STEPS_OF_HALF_A_SECOND_OF_CPU)
    assert process.stdout.readline() == "started\n"
    time.sleep(1.2)
    process.send_signal(signal.SIGSTOP)
    time.sleep(5)
    process.send_signal(signal.SIGCONT)
    time.sleep(2)  # several steps' time: fed since, and no timeout yet
    alive = process.poll() is None
    process.kill()
    _, stderr = process.communicate(timeout=30)
    assert alive, stderr
