"""Faults during conversion, each reproduced with a real converter process: killed converter,
killed worker, hung worker, full disk, read-only folder, two conversions at once, overlapping
folders. Every one ends in a clear message, and the previous dataset intact (checked by hash)."""
import contextlib
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

import converter
from brainseg import dataset, folders, layouts, synthetic
from conftest import (REPO_DIR, SMALL_CROP_SIZE, SMALL_IMAGE_SIZE, SMALL_SHAPE, alive, children,
                      convert)


def converter_command(raw_dir, out_dir, *extra):
    return [sys.executable, "converter.py", "--raw-dir", str(raw_dir), "--data-dir",
            str(out_dir), "--image-size", str(SMALL_IMAGE_SIZE), "--crop-size",
            str(SMALL_CROP_SIZE), *extra]


def run_converter(raw_dir, out_dir, *extra):
    return subprocess.run(converter_command(raw_dir, out_dir, *extra), cwd=REPO_DIR,
                          capture_output=True, text=True, timeout=300)


def hashes(folder):
    """{relative path: sha256} of every file under a folder."""
    return {os.path.relpath(os.path.join(parent, name), folder):
            hashlib.sha256(open(os.path.join(parent, name), "rb").read()).hexdigest()
            for parent, _, names in os.walk(folder) for name in names}


@pytest.fixture()
def previous_dataset(raw_dir, tmp_path):
    """A complete converted folder, and its hashes, that a failed conversion must not touch."""
    out_dir = tmp_path / "converted"
    convert(raw_dir, out_dir, "--split-seed", "1")
    return out_dir, hashes(out_dir)


def assert_intact(out_dir, expected_hashes):
    assert hashes(out_dir) == expected_hashes
    for split in dataset.SPLITS:
        dataset.open_split(out_dir, split)  # still vouched for by its manifest


@pytest.fixture(scope="module")
def many_cases(tmp_path_factory):
    """Enough cases that a conversion lasts a few seconds, to be interrupted midway (16 took
    half a second once the converter got faster, and finished before the kill)."""
    root = tmp_path_factory.mktemp("many")
    synthetic.write_dataset(str(root), 96, seed=11, shape=(64, 64, 40))
    return root


def wait_for(condition, timeout=60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


def test_a_killed_conversion_leaves_the_previous_dataset_whole_and_no_worker(
        many_cases, previous_dataset):
    out_dir, before = previous_dataset
    process = subprocess.Popen(converter_command(many_cases, out_dir, "--workers", "2"),
                               cwd=REPO_DIR, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    def staged():
        return [name for name in os.listdir(out_dir.parent) if ".staging." in name]
    assert wait_for(lambda: staged() and len(children(process.pid)) >= 2), \
        "the conversion never started its workers"
    workers = children(process.pid)
    time.sleep(0.2)  # into the cases
    assert process.poll() is None, "the conversion finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert wait_for(lambda: not any(alive(pid) for pid in workers), timeout=10), \
        "worker processes outlived the killed converter"
    assert_intact(out_dir, before)

    result = run_converter(many_cases, out_dir)  # the rerun completes and tidies up
    assert result.returncode == 0, result.stderr
    assert "left by an interrupted run" in result.stdout
    assert not [name for name in os.listdir(out_dir.parent) if ".staging." in name]
    assert hashes(out_dir) != before and dataset.open_split(out_dir, "train")


def test_a_worker_killed_midway_is_retried_and_the_output_is_unchanged(many_cases, tmp_path):
    clean = tmp_path / "clean"
    assert run_converter(many_cases, clean, "--workers", "2").returncode == 0
    out_dir = tmp_path / "out"
    process = subprocess.Popen(converter_command(many_cases, out_dir, "--workers", "2"),
                               cwd=REPO_DIR, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    assert wait_for(lambda: len(children(process.pid)) >= 2)
    time.sleep(0.2)
    assert process.poll() is None, "the conversion finished before a worker could be killed"
    os.kill(children(process.pid)[0], signal.SIGKILL)  # what the out-of-memory killer does
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    assert "died; retrying it alone" in stdout + stderr
    assert hashes(out_dir) == hashes(clean)


def test_a_worker_that_hangs_is_killed_at_the_time_limit_and_the_output_is_unchanged(
        many_cases, tmp_path):
    """A stopped worker (SIGSTOP) neither answers nor dies, as one stuck reading from a stalled
    network filesystem: at --case-timeout-seconds it is killed and its case retried alone."""
    clean = tmp_path / "clean"
    assert run_converter(many_cases, clean, "--workers", "2").returncode == 0
    out_dir = tmp_path / "out"
    process = subprocess.Popen(
        converter_command(many_cases, out_dir, "--workers", "2", "--case-timeout-seconds", "3"),
        cwd=REPO_DIR, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert wait_for(lambda: len(children(process.pid)) >= 2)
    time.sleep(0.2)
    assert process.poll() is None, "the conversion finished before a worker could be stopped"
    os.kill(children(process.pid)[0], signal.SIGSTOP)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    assert "took more than 3 s; retrying it alone" in stdout + stderr
    assert "skipped" not in stdout
    assert hashes(out_dir) == hashes(clean)


def test_a_case_that_hangs_again_when_retried_is_skipped_naming_the_time_limit(
        raw_dir, monkeypatch):
    _, cases = layouts.find_cases(str(raw_dir), "auto")
    hung = cases[1].case_id

    def prepare_case(case, options):  # the forked workers inherit this stand-in
        if case.case_id == hung:
            time.sleep(3600)
        return f"prepared {case.case_id}"

    monkeypatch.setattr(converter, "prepare_case", prepare_case)
    results = {case.case_id: result for case, result
               in converter.prepared_cases(cases[:4], None, workers=2, timeout=1)}
    assert results.pop(hung).startswith("not prepared within 1 s (--case-timeout-seconds)")
    assert results == {case.case_id: f"prepared {case.case_id}" for case in cases[:4]
                       if case.case_id != hung}


def test_a_header_read_that_hangs_is_skipped_at_the_time_limit(raw_dir, tmp_path, monkeypatch,
                                                               capsys):
    """The output is sized from the headers before any case is prepared; a header read stuck
    on a stalled filesystem hung the converter itself. Now a worker reads it, is killed at
    the limit, the read retried once; the case is skipped naming its file, the rest converted."""
    _, cases = layouts.find_cases(str(raw_dir), "auto")
    hung = cases[0].case_id
    real_grid = converter.grid

    def grid(case):  # the forked workers inherit this stand-in
        if case.case_id == hung:
            time.sleep(3600)
        return real_grid(case)

    monkeypatch.setattr(converter, "grid", grid)
    out_dir = tmp_path / "converted"
    converter.main(["--raw-dir", str(raw_dir), "--data-dir", str(out_dir),
                    "--case-timeout-seconds", "1", "--workers", "2"])
    output = "".join(capsys.readouterr())
    assert f"reading the header of {hung} took more than 1 s; retrying it alone" in output
    assert re.search(rf"skipped {hung}: \S*{hung}\S*: header not read within 1 s "
                     rf"\(--case-timeout-seconds\), also when retried alone", output), output
    manifest = dataset.load_manifest(str(out_dir))
    converted = {entry["case"] for split in manifest["splits"].values() for entry in split}
    assert converted == {case.case_id for case in cases} - {hung}


def test_a_release_whose_every_read_hangs_stops_the_conversion_and_keeps_the_dataset(
        raw_dir, converted_dir, tmp_path, monkeypatch, capsys):
    """A stalled network filesystem: every read hangs. Skipping case after case would cost
    each the time limit twice (days at the default); after STALLED_AFTER_CASES in a row the
    converter stops, naming them and the limit, and the previous dataset stays as it was."""
    out_dir = tmp_path / "converted"
    shutil.copytree(converted_dir, out_dir)
    before = hashes(out_dir)
    _, cases = layouts.find_cases(str(raw_dir), "auto")
    assert len(cases) > converter.STALLED_AFTER_CASES + 1  # it stops before the end

    def grid(case):  # the forked workers inherit this stand-in
        time.sleep(3600)

    monkeypatch.setattr(converter, "grid", grid)
    started = time.monotonic()
    with pytest.raises(SystemExit) as exit_info:
        converter.main(["--raw-dir", str(raw_dir), "--data-dir", str(out_dir),
                        "--case-timeout-seconds", "1", "--workers", "2"])
    assert time.monotonic() - started < 60
    message = str(exit_info.value.code)
    assert re.match(rf"ERROR: {converter.STALLED_AFTER_CASES} cases in a row \(.+\) were not "
                    rf"read within 1 s \(--case-timeout-seconds\), also when retried alone: "
                    rf"is the filesystem of {raw_dir} stalled\? Stopping; nothing was written",
                    message), message
    assert hashes(out_dir) == before
    assert not [name for name in os.listdir(tmp_path) if ".staging." in name]


def test_the_stall_guard_counts_only_cases_in_a_row():
    stalls = converter.StallGuard(timeout=5)
    case = layouts.Case("BraTS20_Training_001", "brats2020",
                        {m: f"/raw/BraTS20_Training_001/{m}.nii.gz" for m in layouts.MODALITIES})
    for timed_out in [True] * (converter.STALLED_AFTER_CASES - 1) + [False]:
        stalls.record(case, timed_out)  # a case read in time breaks the streak
    for _ in range(converter.STALLED_AFTER_CASES - 1):
        stalls.record(case, True)
    with pytest.raises(ValueError, match="is the filesystem of /raw stalled"):
        stalls.record(case, True)


@contextlib.contextmanager
def small_disk(folder, size):
    """A tmpfs of `size` mounted at folder for the block (a real filesystem that fills up
    or turns read-only); skips the test without root."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    folder.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                   check=True)
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_a_full_disk_leaves_the_previous_dataset_whole(raw_dir, tmp_path):
    with small_disk(tmp_path / "disk", "400k") as disk:
        out_dir = disk / "converted"
        result = run_converter(raw_dir, out_dir, "--image-size", "16", "--crop-size", "48")
        assert result.returncode == 0, result.stderr  # a small dataset fits
        before = hashes(out_dir)
        result = run_converter(raw_dir, out_dir)  # 32x32 slices: four times larger
        assert result.returncode != 0
        assert "No space left on device" in result.stderr and str(out_dir) in result.stderr
        assert "previous content is unchanged" in result.stderr
        assert_intact(out_dir, before)
        assert sorted(os.listdir(disk)) == [".converted.lock", "converted"]  # no staging left


def test_a_read_only_folder_is_a_clear_error(raw_dir, previous_dataset):
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only folders")
    out_dir, before = previous_dataset
    os.chmod(out_dir.parent, 0o555)
    try:
        result = run_converter(raw_dir, out_dir)
    finally:
        os.chmod(out_dir.parent, 0o755)
    assert result.returncode != 0 and "Permission denied" in result.stderr
    assert_intact(out_dir, before)


def test_a_read_only_filesystem_is_a_clear_error(raw_dir, tmp_path):
    with small_disk(tmp_path / "disk", "4m") as disk:
        out_dir = disk / "converted"
        assert run_converter(raw_dir, out_dir).returncode == 0
        before = hashes(out_dir)
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        result = run_converter(raw_dir, out_dir)
        assert result.returncode != 0
        assert "Read-only file system" in result.stderr and str(out_dir) in result.stderr
        assert_intact(out_dir, before)


def test_a_second_conversion_into_a_busy_folder_is_refused_naming_the_first(
        many_cases, previous_dataset):
    out_dir, before = previous_dataset
    first = subprocess.Popen(converter_command(many_cases, out_dir, "--workers", "1"),
                             cwd=REPO_DIR, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_for(lambda: os.path.exists(folders.lock_path(out_dir)) and
                        str(first.pid) in open(folders.lock_path(out_dir)).read())
        first.send_signal(signal.SIGSTOP)  # holds the lock for as long as the test needs
        second = run_converter(many_cases, out_dir)
        assert second.returncode != 0
        assert f"in use by another run (process {first.pid} on " in second.stderr
        assert "converter.py" in second.stderr
        assert hashes(out_dir) == before  # the first is still converting, the second did nothing
        first.send_signal(signal.SIGCONT)
        assert first.wait(timeout=300) == 0
    finally:
        first.kill()


@pytest.mark.parametrize("where", ["same", "inside", "around"])
def test_a_data_folder_overlapping_the_release_is_refused(raw_dir, tmp_path, where):
    release = tmp_path / "release"
    synthetic.write_dataset(str(release), 2, seed=3, shape=SMALL_SHAPE)
    before = hashes(release)
    out_dir = {"same": release, "inside": release / "converted", "around": tmp_path}[where]
    result = run_converter(release, out_dir)
    assert result.returncode != 0 and "overlaps the input" in result.stderr
    assert hashes(release) == before


def test_a_folder_holding_other_files_is_not_replaced(raw_dir, tmp_path):
    out_dir = tmp_path / "mine"
    out_dir.mkdir()
    (out_dir / "notes.txt").write_text("a user's file")
    result = run_converter(raw_dir, out_dir)
    assert result.returncode != 0
    assert "not a converted dataset (notes.txt)" in result.stderr
    assert os.listdir(out_dir) == ["notes.txt"]


def test_arrays_the_manifest_does_not_vouch_for_are_refused(raw_dir, previous_dataset,
                                                            tmp_path):
    out_dir, _ = previous_dataset
    other = tmp_path / "other"
    convert(raw_dir, other, "--split-seed", "2")  # another conversion of the same cases
    os.replace(other / "imgs_train.npy", out_dir / "imgs_train.npy")  # a mixed folder
    with pytest.raises(ValueError, match="imgs_train.npy: not the file manifest.json describes"):
        dataset.open_split(out_dir, "train")
    os.remove(out_dir / "manifest.json")  # a folder whose conversion never finished
    with pytest.raises(ValueError, match="no manifest.json beside it"):
        dataset.open_split(out_dir, "test")


def test_a_data_folder_reached_through_a_symlink_stays_on_its_target(raw_dir, tmp_path):
    """Data on a scratch filesystem, linked from the project: the new dataset must land on
    the target (not beside the link), and the link keep pointing at it."""
    (tmp_path / "scratch").mkdir()
    os.symlink(tmp_path / "scratch" / "converted", tmp_path / "link")
    for split_seed in ("1", "2"):  # a first conversion, then one replacing it
        result = run_converter(raw_dir, tmp_path / "link", "--split-seed", split_seed)
        assert result.returncode == 0, result.stderr
        assert os.path.islink(tmp_path / "link")
        assert dataset.load_manifest(tmp_path / "scratch" / "converted")["split_seed"] == int(
            split_seed)
    assert sorted(os.listdir(tmp_path)) == ["link", "scratch"]
