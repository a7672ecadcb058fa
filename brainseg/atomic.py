"""Files that appear complete or not at all, and stay so after a crash or a power loss.

Every output of the project (arrays, manifest, checkpoints, segmentations, figures, reports)
is written under a temporary name in its destination folder and then renamed: os.replace is
atomic on one filesystem, so a reader, or a rerun after a crash, sees the old file or the
complete new one, never a half-written one.

A rename alone is not durable: after a power loss the new name can point at a file whose data
never reached the disk, while the old file is already gone. So the file is flushed (fsync)
before the rename and its folder after it. Temporary names are unique and created exclusively
(O_EXCL: never following a symlink planted at that name, never shared by two writers), carry
a hidden `.partial.` prefix that no data pattern matches, and are removed on any error.
"""
import contextlib
import csv
import json
import os
import tempfile

PARTIAL_PREFIX = ".partial."
# mkstemp creates files readable by their owner only; outputs get the usual permissions
# (0666 less the umask), as a plain open() would give them. Read once: os.umask can only be
# read by setting it.
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def fsync_path(path):
    """Flushes a file, or a folder's entries, to the disk."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def create_temporary(path):
    """Creates, exclusively, a new empty file beside path whose name ends with path's name
    (Keras, nibabel and matplotlib pick the format from the extension); returns its path."""
    folder, name = os.path.split(os.path.abspath(path))
    descriptor, temporary = tempfile.mkstemp(prefix=PARTIAL_PREFIX, suffix="." + name,
                                             dir=folder)
    os.fchmod(descriptor, 0o666 & ~_UMASK)
    os.close(descriptor)
    return temporary


def commit(temporary, path):
    """Makes a finished temporary file path's content, durably: flush, rename, flush folder."""
    fsync_path(temporary)
    os.replace(temporary, path)
    fsync_path(os.path.dirname(os.path.abspath(path)))


@contextlib.contextmanager
def removed_on_error(temporary):
    """Removes the temporary file if the block raises (or is interrupted), then re-raises."""
    try:
        yield temporary
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise


def replace_atomically(path, write):
    """Calls write(temporary path), then renames the result to path."""
    with removed_on_error(create_temporary(path)) as temporary:
        write(temporary)
        commit(temporary, path)
    return path


def dump_json(path, content):
    with open(path, "w") as file:
        json.dump(content, file, indent=1)


def write_json(path, content):
    return replace_atomically(path, lambda temporary: dump_json(temporary, content))


class OutputFolder:
    """Atomic writes into an output folder, refusing to replace an existing file unless
    overwrite is set (FileExistsError names the file)."""

    def __init__(self, folder, overwrite):
        self.folder, self.overwrite = folder, overwrite
        os.makedirs(folder, exist_ok=True)

    def write(self, name, save):
        """Calls save(temporary_path), then renames the result to name."""
        path = os.path.join(self.folder, name)
        if os.path.exists(path) and not self.overwrite:
            raise FileExistsError(f"{path}: exists; pass --overwrite to replace it")
        return replace_atomically(path, save)

    def csv(self, name, rows):
        def save(path):
            with open(path, "w", newline="") as file:
                writer = csv.DictWriter(file, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
        return self.write(name, save)

    def json(self, name, content):
        return self.write(name, lambda path: dump_json(path, content))
