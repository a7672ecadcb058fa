"""Output folders: one writer at a time, replaced whole, never overlapping the inputs.

Three guarantees for the folders the scripts write (converted data, training runs,
inference results):
- A lock: two runs writing one folder would interleave their files. The second is refused
  with a message naming the first (its process, host, start time and command). It is an
  flock on a hidden file beside the folder, so the kernel releases it when its holder dies,
  however it dies: a lock is never stale.
- A folder built elsewhere and swapped in: a conversion writes into a hidden staging folder
  beside its destination and replaces the destination in one atomic exchange (Linux
  renameat2 RENAME_EXCHANGE) when everything is written. Until then the previous dataset
  stays complete and readable; a crash leaves it untouched.
- No overlap: an output folder equal to, inside, or around an input folder is refused, so an
  output can never replace an input file.
"""
import contextlib
import ctypes
import datetime
import errno
import fcntl
import glob
import os
import shlex
import shutil
import socket
import sys
import tempfile

from brainseg import atomic


class FolderBusyError(RuntimeError):
    """Another run holds the folder's lock."""


def lock_path(folder):
    """The lock file of a folder: beside it (beside its target, for a symbolic link), so
    swapping the folder keeps the lock."""
    parent, name = os.path.split(os.path.realpath(folder))
    return os.path.join(parent, f".{name}.lock")


@contextlib.contextmanager
def locked(folder):
    """Holds the folder's lock for the block; FolderBusyError names the current holder."""
    path = lock_path(folder)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(descriptor, 4096, 0).decode(errors="replace").strip()
            raise FolderBusyError(f"{folder}: in use by another run ({holder or 'unknown'}); "
                                  f"wait for it to finish or stop it first") from None
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, _holder().encode(), 0)
        yield folder
    finally:
        os.close(descriptor)  # releases the lock


def _holder():
    started = datetime.datetime.now().isoformat(timespec="seconds")
    return (f"process {os.getpid()} on {socket.gethostname()} since {started}: "
            f"{shlex.join(sys.argv)}\n")


def inside(path, folder):
    """True when path is folder or lies inside it (symbolic links resolved)."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def refuse_overlap(output, inputs, around=True):
    """Raises ValueError when the output folder equals or lies inside an input folder, or
    (with `around`, for a folder replaced whole) contains one."""
    for source in inputs:
        if inside(output, source) or (around and inside(source, output)):
            raise ValueError(f"output folder {output} overlaps the input {source}: an output "
                             f"there could replace input files; choose a separate folder")


def _staging_prefix(folder):
    return f".{os.path.basename(os.path.realpath(folder))}.staging."


@contextlib.contextmanager
def staging(folder):
    """A new hidden folder beside `folder` (same filesystem, so it can be swapped in),
    removed when the block ends unless swap_in moved it into place. Call under locked():
    stagings that crashed runs left behind are removed first. A folder reached through a
    symbolic link (data on a scratch filesystem, say) is staged beside the link's target:
    the data stays on that filesystem and the link keeps pointing at it."""
    parent = os.path.dirname(os.path.realpath(folder))
    os.makedirs(parent, exist_ok=True)
    for leftover in glob.glob(os.path.join(parent, glob.escape(_staging_prefix(folder)) + "*")):
        print(f"Removing {leftover}, left by an interrupted run")
        shutil.rmtree(leftover)
    path = tempfile.mkdtemp(prefix=_staging_prefix(folder), dir=parent)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def swap_in(staged, folder):
    """Puts the finished staging folder in folder's place in one step; the previous content
    of folder ends up in `staged` (deleted when the staging block ends). Durable: the parent
    folder is flushed after the exchange. A symbolic link is kept: its target is replaced."""
    folder = os.path.realpath(folder)
    if not os.path.lexists(folder):
        os.rename(staged, folder)
        os.mkdir(staged)  # staging() expects a folder to remove
    elif not _exchange(staged, folder):
        # Without an atomic exchange (NFS): two renames. For an instant there is no folder
        # (a reader then gets "not found"), but never a mix of old and new files.
        previous = staged + ".previous"
        os.rename(folder, previous)
        os.rename(staged, folder)
        os.rename(previous, staged)
    atomic.fsync_path(os.path.dirname(folder))


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(first, second):
    """Atomically exchanges two paths (renameat2 RENAME_EXCHANGE, Linux 3.15+); False when
    the C library or the filesystem cannot."""
    libc = ctypes.CDLL(None, use_errno=True)
    if not hasattr(libc, "renameat2"):
        return False
    result = libc.renameat2(_AT_FDCWD, os.fsencode(first), _AT_FDCWD, os.fsencode(second),
                            _RENAME_EXCHANGE)
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(code, f"cannot swap {first} into {second}: {os.strerror(code)}")
