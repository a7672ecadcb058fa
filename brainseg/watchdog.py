"""A rank that stops making progress stops the whole job, and says which rank is stuck.

Every allreduce waits for every rank. A rank that dies is noticed by mpirun, which stops the
job; a host that goes silent, by TCP keepalive (HOST_TIMEOUT_SECONDS). A rank that is alive
but stuck (stopped with kill -STOP, frozen on a dead NFS mount, deadlocked) keeps its
connections healthy, so nothing notices it, and it holds every other rank in its allreduce
forever. Two checks bound that, both set from STALL_TIMEOUT_SECONDS:

- Horovod's stall check (horovod_stall_environment): rank 0, Horovod's coordinator, notices
  a tensor that some ranks submitted and others did not, logs "Missing ranks" with the stuck
  ones marked "!", and shuts Horovod down, so the allreduce fails on every rank. It only
  works while the stuck rank's Horovod thread still runs (its main thread blocked in a read,
  a lock, a loop): that thread meets every rank in an MPI collective at each cycle, and rank
  0 checks for stalls between cycles, so a whole process stopped holds rank 0's check too.
- The Watchdog, in every rank: a thread that training feeds after every step, batch,
  validation and checkpoint. Fed nothing for STALL_TIMEOUT_SECONDS, it asks the other ranks
  whether they are alive (MpiPeers: MPI beside Horovod, answered by a thread in each rank), so
  a rank that does not answer is named as the stuck one; then it ends its own process with
  os._exit (an interpreter blocked in a collective cannot unwind), and mpirun, seeing a rank
  exit non-zero, kills every other rank, the stuck one too (SIGKILL ends a stopped process).
"""
import os
import socket
import sys
import threading
import time

# Exit status of a process the watchdog ended: that of timeout(1), "took too long".
STALL_EXIT_STATUS = 124
# How long the watchdog waits for the other ranks' answers. A living rank answers within its
# answering thread's poll (ANSWER_POLL_SECONDS); this leaves room for a loaded machine.
ANSWER_SECONDS = 3.0
ANSWER_POLL_SECONDS = 0.5
_QUESTION, _ANSWER = 1, 2  # message tags on the watchdog's own communicator


def horovod_stall_environment(timeout_seconds):
    """Horovod's stall check for a watchdog timeout, as environment variables (integer
    seconds, as Horovod reads them; {} when the watchdog is off). Horovod shuts down after a
    tensor waited half the timeout, checking every tenth of it: a tensor Horovod has cached
    (every tensor after the first step) is only seen as stalled at the check after it waited
    one check period, so the shutdown comes within 0.5 + 3 x 0.1 of the timeout, before the
    watchdog's, and its report names the missing rank."""
    if timeout_seconds <= 0:
        return {}
    check = max(1, round(timeout_seconds / 10))
    shutdown = max(2 * check, round(timeout_seconds / 2))
    return {"HOROVOD_STALL_CHECK_TIME_SECONDS": str(check),
            "HOROVOD_STALL_SHUTDOWN_TIME_SECONDS": str(shutdown)}


class MpiPeers:
    """The other ranks of an MPI job, reachable beside Horovod on a communicator of their own.

    Each rank answers questions from a thread of its own, so that a rank can be asked while
    its main thread waits in an allreduce; a rank that does not answer is stopped or frozen
    as a whole. Needs MPI_THREAD_MULTIPLE (Horovod asks MPI for it) and MPI already
    initialized (by hvd.init()); creating it is collective, like hvd.init()."""

    def __init__(self):
        from mpi4py import MPI  # here, not at the top: only MPI jobs need it
        self._mpi = MPI
        self._comm = MPI.COMM_WORLD.Dup()
        # A peer that vanished must not abort this rank: errors come back as exceptions.
        self._comm.Set_errhandler(MPI.ERRORS_RETURN)
        self.rank = self._comm.Get_rank()
        self.hosts = self._comm.allgather(socket.gethostname())
        self._lock = threading.Lock()
        self._closed = False
        self._pending = []  # questions sent, kept until this process ends

    def _call(self, method, *args, **kwargs):
        """One MPI call, unless closed or MPI finalized: MPI aborts a process that calls it
        after MPI_Finalize, which Horovod calls from its own thread when it shuts down (at
        exit, or when its stall check stops the job). Open MPI's MPI_Finalized waits for a
        finalization under way, so only one that starts between the check and the call,
        microseconds, on a job that is stopping anyway, is not caught."""
        with self._lock:
            if self._closed or self._mpi.Is_finalized():
                raise EOFError("MPI is closed")
            return method(*args, **kwargs)

    def close(self):
        """Stops all MPI use here; call before Horovod shuts down at exit (atexit does)."""
        with self._lock:
            self._closed = True

    def answer_from_thread(self, status):
        """Answers every question with status() (a short text), from a daemon thread."""
        threading.Thread(target=self._answer_questions, args=(status,), daemon=True,
                         name="watchdog answers").start()

    def _answer_questions(self, status):
        probe = self._mpi.Status()
        try:
            while True:
                while self._call(self._comm.Iprobe, source=self._mpi.ANY_SOURCE,
                                 tag=_QUESTION, status=probe):
                    asker = probe.Get_source()
                    self._call(self._comm.recv, source=asker, tag=_QUESTION)
                    self._pending.append(self._call(self._comm.isend, status(), dest=asker,
                                                    tag=_ANSWER))
                time.sleep(ANSWER_POLL_SECONDS)
        except (EOFError, self._mpi.Exception):
            return

    def ask_others(self, seconds=ANSWER_SECONDS):
        """{rank: its answer} of every other rank, None for those that did not answer
        within `seconds`; None if this rank cannot ask (MPI closed here: Horovod shut down)."""
        others = [rank for rank in range(len(self.hosts)) if rank != self.rank]
        answers = dict.fromkeys(others)
        try:
            for rank in others:
                self._pending.append(self._call(self._comm.isend, None, dest=rank,
                                                tag=_QUESTION))
            deadline = time.monotonic() + seconds
            while None in answers.values() and time.monotonic() < deadline:
                for rank in [rank for rank, answer in answers.items() if answer is None]:
                    if self._call(self._comm.Iprobe, source=rank, tag=_ANSWER):
                        answers[rank] = self._call(self._comm.recv, source=rank, tag=_ANSWER)
                time.sleep(0.05)
        except (EOFError, self._mpi.Exception):
            return None  # a rank that did not answer may have been asked or not: no verdict
        return answers


def peers_report(peers, answers):
    """Lines naming the ranks presumed stuck: those that did not answer."""
    if peers is None:
        return ["watchdog: the other ranks cannot be asked (no MPI beside Horovod): if one "
                "is stuck, which one is not known"]
    if answers is None:
        return ["watchdog: the other ranks cannot be asked: MPI is closed here, as Horovod "
                "shut down (when its stall check did, it named the missing rank above)"]
    silent = [rank for rank, answer in answers.items() if answer is None]
    if silent:
        answered = len(answers) - len(silent)
        return [f"watchdog: rank {rank} on {peers.hosts[rank]} did not answer within "
                f"{ANSWER_SECONDS:g} s: presumed stuck (stopped, or frozen, e.g. on a dead "
                f"NFS mount)" for rank in silent] + \
               ([f"watchdog: the {answered} other rank(s) answered"] if answered else [])
    return ["watchdog: every other rank answers, so none is stopped; one may be stuck in its "
            "own work (Horovod's stall check names it above, 'Missing ranks', when it sees "
            "it):"] + [f"watchdog:   rank {rank} on {peers.hosts[rank]}: {answer}"
                       for rank, answer in answers.items()]


class Watchdog:
    """Ends this process, after saying why, when it is not fed for `timeout_seconds`
    (0: never). Training calls feed(done) after every piece of work, `done` naming it for the
    report; `who` names this rank and host; `peers` (MpiPeers or None) are asked which rank
    is stuck."""

    def __init__(self, timeout_seconds, who, peers=None):
        self.timeout_seconds = timeout_seconds
        self.who = who
        self.peers = peers
        self.longest_wait = 0.0  # the longest time between two feeds: what the timeout must exceed
        self._last = (time.monotonic(), "start-up")

    def start(self):
        if self.timeout_seconds > 0:
            threading.Thread(target=self._watch, daemon=True, name="watchdog").start()
            if self.peers:
                self.peers.answer_from_thread(self.status)
        return self

    def feed(self, done):
        now = time.monotonic()
        self.longest_wait = max(self.longest_wait, now - self._last[0])
        self._last = (now, done)

    def status(self):
        since, done = self._last
        return f"last finished {done}, {time.monotonic() - since:.0f} s ago"

    def _watch(self):
        poll = min(1.0, self.timeout_seconds / 10)
        resumed = 0.0  # when this process last woke up from being stopped as a whole
        while True:
            before = time.monotonic()
            time.sleep(poll)
            now = time.monotonic()
            if now - before > poll + self.timeout_seconds / 2:
                # The whole process was stopped or frozen (kill -STOP, a suspended VM): the
                # wait starts anew, or a rank resumed would blame itself before its main
                # thread could move on (mpirun resumes a stopped rank to end it).
                resumed = now
            since, done = self._last
            if now - max(since, resumed) > self.timeout_seconds:
                self._stop_the_job(done)

    def _stop_the_job(self, done):
        """Says why (this rank first: asking the others takes seconds), then exits."""
        say_now(f"watchdog: {self.who} made no progress for {self.timeout_seconds:g} s "
                f"(last finished: {done}); ending this rank so that mpirun stops the job "
                f"(STALL_TIMEOUT_SECONDS, --stall-timeout-seconds)")
        answers = self.peers.ask_others() if self.peers else None
        say_now("\n".join(peers_report(self.peers, answers)))
        os._exit(STALL_EXIT_STATUS)


def say_now(text):
    """Writes whole lines to stderr at once and flushes: os._exit flushes nothing."""
    sys.stderr.write(f"{text}\n")
    sys.stderr.flush()
