"""Files that appear complete or not at all.

Every output of the project (arrays' manifest, checkpoints, segmentations, figures, reports)
is written under a temporary name in its destination folder and then renamed: os.replace is
atomic on one filesystem, so a reader, or a rerun after a crash, sees the old file or the
complete new one, never a half-written one.
"""
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
