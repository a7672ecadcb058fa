"""brainseg/atomic.py: complete files or none, durable, under names no one else can plant."""
import os

import pytest

from brainseg import atomic


def test_the_file_is_flushed_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(descriptor):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{descriptor}")))
        real_fsync(descriptor)

    def replace(source, destination):
        events.append(("rename", str(destination)))
        real_replace(source, destination)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    atomic.write_json(tmp_path / "report.json", {"dice": 0.9})
    assert [kind for kind, _ in events] == ["fsync", "rename", "fsync"]
    assert os.path.basename(events[0][1]).startswith(".partial.")  # the temporary file
    assert events[1][1] == str(tmp_path / "report.json")
    assert events[2][1] == str(tmp_path)  # the folder that holds the new name


def test_a_symlink_planted_at_the_old_fixed_temporary_name_is_not_followed(tmp_path):
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (tmp_path / "out").mkdir()
    os.symlink(victim, tmp_path / "out" / ".partial.report.json")
    atomic.write_json(tmp_path / "out" / "report.json", {"a": 1})
    assert victim.read_text() == "keep me"
    assert (tmp_path / "out" / "report.json").read_text() == '{\n "a": 1\n}'


def test_temporary_names_are_unique_and_keep_the_extension(tmp_path):
    names = {atomic.create_temporary(tmp_path / "model.keras") for _ in range(20)}
    assert len(names) == 20
    assert all(name.endswith(".model.keras") for name in names)
    assert all(os.path.basename(n).startswith(atomic.PARTIAL_PREFIX) for n in names)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    (tmp_path / "report.json").write_text("old")

    def write(path):
        with open(path, "w") as file:
            file.write("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic.replace_atomically(tmp_path / "report.json", write)
    assert os.listdir(tmp_path) == ["report.json"]
    assert (tmp_path / "report.json").read_text() == "old"


def test_outputs_get_the_usual_permissions(tmp_path):
    previous = os.umask(0o022)
    os.umask(previous)
    atomic.write_json(tmp_path / "report.json", {})
    assert (tmp_path / "report.json").stat().st_mode & 0o777 == 0o666 & ~previous
