"""brainseg/case_processes.py with real forked workers and real SIGKILLs: results in order, a
killed worker's item retried (also when killed halfway through sending its result, where
ProcessPoolExecutor hung), a second death reported, a hung worker killed at the time limit,
errors raised, nothing left running, and the parent's garbage (a TensorFlow iterator among it)
never destroyed in a worker."""
import gc
import os
import signal
import sys
import textwrap
import threading
import time

import pytest

from brainseg import case_processes
from conftest import alive, children, run


def first_time(marker):
    """True the first time it is asked for this marker file (across processes)."""
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
        return True
    except FileExistsError:
        return False


def kill_myself():
    os.kill(os.getpid(), signal.SIGKILL)


def recording(retried):
    """An on_retry that appends (item, DIED or TIMED_OUT) to retried."""
    return lambda item, lost: retried.append((item, lost))


def living_children():
    """The pids of this process's children that are still running (not zombies)."""
    return [pid for pid in children(os.getpid()) if alive(pid)]


def test_results_come_in_item_order_whatever_order_they_finish_in():
    def slow_for_small(item):
        time.sleep(0.02 * (5 - item % 5))
        return item * item

    items = list(range(12))
    results = list(case_processes.ordered_map(slow_for_small, items, workers=3))
    assert results == [(item, item * item) for item in items]


def test_a_worker_killed_is_retried_once_and_the_others_continue(tmp_path):
    def dies_once_on_3(item):
        if item == 3 and first_time(tmp_path / "killed"):
            kill_myself()
        return -item

    retried = []
    results = list(case_processes.ordered_map(dies_once_on_3, range(8), 2, recording(retried)))
    assert results == [(item, -item) for item in range(8)]
    assert retried == [(3, case_processes.DIED)]


def test_a_worker_killed_halfway_through_sending_its_result_is_retried(tmp_path):
    """The result (8 MB) fills the pipe and the worker blocks sending it while the caller is
    busy with the item before; it is killed there, leaving half a message in its pipe."""
    big = bytes(8 << 20)

    def killed_while_sending(item):
        if item == 1 and first_time(tmp_path / "killed"):
            threading.Timer(1.5, kill_myself).start()
            time.sleep(0.5)  # item 0 is yielded first, and the caller then sleeps
        return big if item == 1 else item

    retried, results = [], []
    for item, result in case_processes.ordered_map(killed_while_sending, range(3), 2,
                                                   recording(retried)):
        if item == 0:
            time.sleep(3)  # not reading: item 1's worker blocks in send and is killed there
        results.append((item, result))
    assert retried == [(1, case_processes.DIED)]
    assert results == [(0, 0), (1, big), (2, 2)]


def test_a_worker_stopped_halfway_through_sending_its_result_is_killed_at_its_deadline(
        tmp_path, monkeypatch):
    """As above, but the worker is stopped (SIGSTOP), not killed: its pipe holds half a
    message and never the rest. Reading the rest waited forever (the converter hung in 1 run
    in 10 of test_faults_conversion.py's stopped worker); it is now read against the worker's
    deadline plus a grace, and the worker killed and its item retried."""
    monkeypatch.setattr(case_processes, "_SEND_GRACE_SECONDS", 1)
    big = bytes(8 << 20)

    def stopped_while_sending(item):
        if item == 1 and first_time(tmp_path / "stopped"):
            threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGSTOP)).start()
            time.sleep(0.5)  # item 0 is yielded first, and the caller then sleeps
        return big if item == 1 else item

    retried, results = [], []
    started = time.monotonic()
    for item, result in case_processes.ordered_map(stopped_while_sending, range(3), 2,
                                                   recording(retried), timeout=2):
        if item == 0:
            time.sleep(2.5)  # not reading: item 1's worker blocks in send and is stopped there
        results.append((item, result))
    assert retried == [(1, case_processes.TIMED_OUT)]
    assert results == [(0, 0), (1, big), (2, 2)]
    assert time.monotonic() - started < 30
    assert living_children() == []


def test_an_item_that_kills_its_worker_twice_is_reported_dead(tmp_path):
    def always_dies_on_2(item):
        if item == 2:
            kill_myself()
        return item

    retried = []
    results = list(case_processes.ordered_map(always_dies_on_2, range(5), 2, recording(retried)))
    assert results == [(0, 0), (1, 1), (2, case_processes.DIED), (3, 3), (4, 4)]
    assert retried == [(2, case_processes.DIED)]


def test_a_worker_that_hangs_is_killed_at_the_time_limit_and_its_item_retried(tmp_path):
    def hangs_once_on_2(item):
        if item == 2 and first_time(tmp_path / "hung"):
            time.sleep(3600)  # a read stuck on a network filesystem
        return -item

    retried = []
    start = time.monotonic()
    results = list(case_processes.ordered_map(hangs_once_on_2, range(6), 2, recording(retried),
                                              timeout=1))
    assert results == [(item, -item) for item in range(6)]
    assert retried == [(2, case_processes.TIMED_OUT)]
    assert time.monotonic() - start < 30
    assert not living_children()


def test_an_item_that_hangs_twice_is_reported_timed_out_and_the_others_complete():
    def always_hangs_on_1(item):
        if item == 1:
            time.sleep(3600)
        return item

    retried = []
    results = list(case_processes.ordered_map(always_hangs_on_1, range(4), 2,
                                              recording(retried), timeout=1))
    assert results == [(0, 0), (1, case_processes.TIMED_OUT), (2, 2), (3, 3)]
    assert retried == [(1, case_processes.TIMED_OUT)]
    assert not living_children()


def test_an_item_slower_than_the_others_but_within_the_time_limit_is_not_retried():
    def slow_on_0(item):
        time.sleep(1.5 if item == 0 else 0.01)
        return item

    retried = []
    results = list(case_processes.ordered_map(slow_on_0, range(6), 2, recording(retried),
                                              timeout=4))
    assert results == [(item, item) for item in range(6)]
    assert retried == []


def test_an_idle_worker_that_does_not_stop_is_killed(monkeypatch):
    """A worker stopped (SIGSTOP) while it waits for work never reads the request to stop."""
    monkeypatch.setattr(case_processes, "_STOP_SECONDS", 1)

    def stops_itself_once_idle(item):
        if item == 0:
            threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGSTOP)).start()
        return item

    def consume():
        for result in case_processes.ordered_map(stops_itself_once_idle, range(1), 1):
            time.sleep(1)  # the worker, idle, is stopped meanwhile
            done.append(result)
        done.append("workers stopped")

    done = []
    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    thread.join(30)
    assert done == [(0, 0), "workers stopped"], "stopping a worker that does not stop hung"
    assert not living_children()


def test_an_exception_in_the_function_is_raised_with_the_item_and_the_traceback():
    def fails_on_1(item):
        if item == 1:
            raise ValueError("no such modality")
        return item

    with pytest.raises(case_processes.ChildError, match=r"(?s)1: .*ValueError: no such modality"):
        list(case_processes.ordered_map(fails_on_1, range(4), 2))


def test_at_most_twice_the_workers_are_started_ahead_of_the_caller(tmp_path):
    def record_start(item):
        (tmp_path / str(item)).touch()
        return item

    for item, _ in case_processes.ordered_map(record_start, range(20), 2):
        if item == 0:
            time.sleep(0.5)
            assert len(os.listdir(tmp_path)) <= 4
    assert len(os.listdir(tmp_path)) == 20


def test_a_caller_that_stops_early_leaves_no_worker_running():
    def slow(item):
        time.sleep(0.2 if item == 0 else 60)
        return item

    results = case_processes.ordered_map(slow, range(6), 2)
    assert next(results) == (0, 0)
    assert living_children(), "the busy workers should be running"
    results.close()
    assert not living_children()


class FatalOutsideItsProcess:
    """Stands for an object with threads (a TensorFlow iterator, an OpenVINO model): destroyed
    in a forked child, it kills the child, as their C++ destructors hang or abort there."""

    def __init__(self):
        self.owner, self.cycle = os.getpid(), self  # a cycle: only the collector frees it

    def __del__(self):
        if os.getpid() != self.owner:
            kill_myself()


def collect_and_double(item):
    gc.collect()  # the child's collector runs, whenever its allocations would make it run
    return 2 * item


def test_the_parents_garbage_is_not_destroyed_in_a_worker():
    FatalOutsideItsProcess()  # garbage at the fork
    retried = []
    results = list(case_processes.ordered_map(collect_and_double, range(4), 2,
                                              recording(retried)))
    assert results == [(item, 2 * item) for item in range(4)]
    assert retried == []


def test_workers_survive_a_tensorflow_iterator_left_as_garbage_in_the_parent():
    """The conversion CI saw fail: workers forked by a process that had used TensorFlow. A
    prefetching iterator destroyed in a forked child waits forever for its thread."""
    script = textwrap.dedent("""
        import gc
        import numpy as np, tensorflow as tf
        from brainseg import case_processes

        def collect_and_double(item):
            gc.collect()
            return 2 * item

        dataset = tf.data.Dataset.from_tensor_slices(np.arange(8.0)).batch(2).prefetch(2)
        iterator = iter(dataset)
        next(iterator)
        holder = {"iterator": iterator}
        holder["itself"] = holder  # a cycle: garbage once dropped, until a collection
        del iterator, holder
        print(list(case_processes.ordered_map(collect_and_double, range(4), 2)))
        """)
    result = run([sys.executable, "-c", script], timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-1] == "[(0, 0), (1, 2), (2, 4), (3, 6)]", result.stdout
