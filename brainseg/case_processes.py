"""Runs a function over a list of items in forked worker processes and yields the results in
item order; a worker that gets killed, or that hangs past a time limit, costs its item one
retry, not the run.

Why not concurrent.futures.ProcessPoolExecutor: its workers send results through one shared
queue behind one lock. A worker killed while sending (the out-of-memory killer's SIGKILL)
leaves half a message in the queue and the lock held: the executor's thread waits forever
for the rest of the message, the other workers forever for the lock, and the pool hangs
instead of reporting itself broken (CPython 3.11; the converter hung this way in CI). Here
each worker has pipes of its own and is the only writer of its result pipe, so its death,
at any moment, is an end-of-file on that pipe and touches nothing else. A worker that stops
halfway through sending (SIGSTOP, a frozen cgroup) would leave the caller blocked reading the
rest of the message, past every time limit: results are framed here, and read against the
worker's deadline (_ResultReader).

A forked child inherits every Python object of its parent, including garbage not yet
collected: a TensorFlow dataset iterator, an OpenVINO compiled model. Were the child's garbage
collector to destroy one, its C++ destructor would wait for threads that exist only in the
parent: the child hangs, or aborts ("terminate called after throwing an instance of
'std::system_error'"). In CI every worker of a conversion aborted so, in a test process that
had trained and segmented before. So the parent collects its garbage and freezes
what remains before it forks (the recipe of Python's gc.freeze documentation): the child
collects only what it makes itself.
"""
import collections
import ctypes
import gc
import math
import multiprocessing
import multiprocessing.connection
import os
import pickle
import select
import signal
import struct
import time
import traceback

_FORK = multiprocessing.get_context("fork")  # the child is this process's: it dies with it
_PR_SET_PDEATHSIG = 1
_STOP_SECONDS = 10  # an idle worker told to stop ends at once; one that does not is killed
# A result that began to arrive before its worker's deadline may take this long to finish:
# sending even a gigabyte through a pipe takes under a second.
_SEND_GRACE_SECONDS = 10
_LENGTH = struct.Struct("!Q")  # the header of a result: the length of its pickle


class Died:
    """The result of an item whose worker died twice (killed, by a signal or the out-of-memory
    killer): the first time it is retried, alone."""


DIED = Died()


class TimedOut:
    """The result of an item whose worker ran past the time limit twice without an answer
    (a read stuck on a network filesystem, a stopped process): each time the worker is killed,
    the first time the item retried, alone."""


TIMED_OUT = TimedOut()


class _Stop:
    """Sent to a worker: no more items."""


class ChildError(RuntimeError):
    """The function raised in a child process; carries the child's traceback."""


def die_with_parent(parent_pid):
    """The kernel sends this process SIGKILL when its parent dies, however it dies (SIGKILL
    included), so no child outlives the converter holding its output files open."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def _serve(function, tasks, results_fd, parent_pid):
    """A worker's life: items from its task pipe, (ok, value) to its result pipe, until it
    receives _Stop() (not end-of-file: workers forked later hold copies of its writer)."""
    die_with_parent(parent_pid)
    with open(results_fd, "wb") as results:
        while True:
            item = tasks.recv()
            if isinstance(item, _Stop):
                return
            try:
                outcome = (True, function(item))
            except BaseException:  # a bug or MemoryError: reported, not taken for a killed worker
                outcome = (False, traceback.format_exc())
            message = pickle.dumps(outcome, protocol=pickle.HIGHEST_PROTOCOL)
            results.write(_LENGTH.pack(len(message)))
            results.write(message)
            results.flush()


class _ResultReader:
    """The caller's end of a worker's result pipe: one message at a time, read against a
    deadline. (multiprocessing's Connection.recv, once a message has begun, waits for its
    end however long that takes.)"""

    def __init__(self, fd):
        self.fd = fd

    def fileno(self):
        return self.fd

    def receive(self, deadline):
        """(ok, value), or DIED at an end of file (the worker died, before or while sending),
        or TIMED_OUT when the message is not complete by the deadline (monotonic seconds)."""
        try:
            size, = _LENGTH.unpack(self._read(_LENGTH.size, deadline))
            return pickle.loads(self._read(size, deadline))
        except _Late:
            return TIMED_OUT
        except (EOFError, OSError):
            return DIED

    def _read(self, size, deadline):
        """Exactly `size` bytes; EOFError at an end of file, _Late at the deadline."""
        buffer = bytearray(size)
        view, got = memoryview(buffer), 0
        readable = select.poll()
        readable.register(self.fd, select.POLLIN)
        while got < size:
            if deadline != math.inf:
                wait_ms = (deadline - time.monotonic()) * 1000
                if wait_ms <= 0 or not readable.poll(wait_ms):
                    raise _Late
            count = os.readv(self.fd, [view[got:]])
            if count == 0:
                raise EOFError
            got += count
        return buffer

    def close(self):
        os.close(self.fd)


class _Late(Exception):
    """A message not complete by its deadline."""


class _Worker:
    """A forked process with two pipes of its own, items in and results out. Being the only
    writer of its result pipe, its death at any moment is an end-of-file there."""

    def __init__(self, function):
        task_reader, self.tasks = _FORK.Pipe(duplex=False)
        result_reader, result_writer = os.pipe()
        self.results = _ResultReader(result_reader)
        self.process = _FORK.Process(target=_serve, daemon=True,
                                     args=(function, task_reader, result_writer, os.getpid()))
        gc.collect()  # the parent's garbage is destroyed here, with the threads it belongs to
        gc.freeze()  # and the child never collects what it inherits
        try:
            self.process.start()
        finally:
            gc.unfreeze()
        task_reader.close()
        os.close(result_writer)
        self.task, self.deadline = None, math.inf

    def give(self, task, timeout=None):
        self.task = task
        self.deadline = time.monotonic() + timeout if timeout else math.inf
        try:
            self.tasks.send(task.item)
        except BrokenPipeError:  # already dead: its result pipe says so
            pass

    def receive(self):
        """(ok, value) for the task it was given; (True, DIED) when it died before sending
        all of it, (True, TIMED_OUT) when it stopped sending past its deadline (plus a grace
        for a message that began in time): killed, in both cases."""
        deadline = self.deadline + _SEND_GRACE_SECONDS
        outcome = self.results.receive(deadline)
        if isinstance(outcome, (Died, TimedOut)):
            self.stop(kill=True)
            return True, outcome
        return outcome

    def stop(self, kill=False):
        if not kill:
            try:
                self.tasks.send(_Stop())
            except BrokenPipeError:  # died while idle
                pass
            self.process.join(_STOP_SECONDS)
        self.process.kill()
        self.tasks.close()
        self.process.join()
        self.results.close()


class _Task:
    def __init__(self, item):
        self.item, self.retried, self.done, self.result = item, False, False, None


def ordered_map(function, items, workers, on_retry=lambda item, lost: None, timeout=None):
    """Yields (item, function(item)) in item order, computed by `workers` worker processes,
    with at most 2 x workers items started but not yet yielded, so memory does not grow with
    the number of items.

    An item whose worker dies without its result (lost: DIED), or has not answered `timeout`
    seconds after it got the item (lost: TIMED_OUT; the worker is killed), is started again
    once, after on_retry(item, lost), alone (as the out-of-memory killer's victim should be):
    nothing else starts until it ends. When it is lost again the result is DIED or TIMED_OUT.
    An exception in `function` is raised here as ChildError. Workers still busy when the
    caller stops iterating are killed."""
    pending = collections.deque(_Task(item) for item in items)
    started = collections.deque()  # in item order, until yielded
    retries = collections.deque()
    idle, busy = [], {}  # busy: result pipe -> worker
    try:
        while pending or started:
            if retries and not busy:
                assign(retries.popleft(), idle, busy, function, timeout)
            while (pending and not retries and not any(w.task.retried for w in busy.values())
                   and len(busy) < workers and len(started) < 2 * workers):
                started.append(pending.popleft())
                assign(started[-1], idle, busy, function, timeout)
            for worker, (ok, value) in answers(busy):
                task = worker.task
                lost = ok and isinstance(value, (Died, TimedOut))
                if lost and not task.retried:
                    task.retried = True
                    on_retry(task.item, value)
                    retries.append(task)
                    continue
                if not lost:
                    idle.append(worker)
                if not ok:
                    raise ChildError(f"{task.item}: {value}")
                task.done, task.result = True, value
            while started and started[0].done:
                task = started.popleft()
                yield task.item, task.result
    finally:
        for worker in busy.values():
            worker.stop(kill=True)
        for worker in idle:
            worker.stop()


def assign(task, idle, busy, function, timeout):
    """Gives the task to an idle worker, or to a new one."""
    worker = idle.pop() if idle else _Worker(function)
    worker.give(task, timeout)
    busy[worker.results] = worker


def answers(busy):
    """Waits until busy workers answer, die or pass their deadline, takes them out of busy and
    returns them with (ok, value): the function's result, or DIED, or TIMED_OUT for a worker
    that was killed at its deadline."""
    deadline = min((worker.deadline for worker in busy.values()), default=math.inf)
    wait = None if deadline == math.inf else max(0.0, deadline - time.monotonic())
    found = []
    for pipe in multiprocessing.connection.wait(list(busy), wait):
        worker = busy.pop(pipe)
        found.append((worker, worker.receive()))
    now = time.monotonic()
    for pipe, worker in list(busy.items()):
        if worker.deadline <= now:
            del busy[pipe]
            worker.stop(kill=True)
            found.append((worker, (True, TIMED_OUT)))
    return found
