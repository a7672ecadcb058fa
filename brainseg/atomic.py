"""Files that appear complete or not at all.

Every output of the project (arrays' manifest, checkpoints, segmentations, figures, reports)
is written under a temporary name in its destination folder and then renamed: os.replace is
atomic on one filesystem, so a reader, or a rerun after a crash, sees the old file or the
complete new one, never a half-written one.
"""
import csv
import json
import os


def temporary_path(path):
    """A hidden name beside path that keeps its extension, which Keras, nibabel and
    matplotlib use to pick the file format."""
    folder, name = os.path.split(path)
    return os.path.join(folder, ".partial." + name)


def replace_atomically(path, write):
    """Calls write(temporary path), then renames the result to path."""
    temporary = temporary_path(path)
    write(temporary)
    os.replace(temporary, path)
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
