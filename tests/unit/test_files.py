"""Atomic writes and the run lock, in the pytest process: a write that fails at any point leaves the old
file and no temp file; a second training process is refused with the holder's pid (lib/runtime/files.py)."""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import signal
from pathlib import Path

import pytest

from lib.runtime.errors import PipelineError
from lib.runtime.files import atomic_path, read_json, write_bytes_atomic, write_json_atomic, write_text_atomic
from lib.training.runs import acquire_lock

OLD = "the previous version\n"


@pytest.fixture
def old_file(tmp_path) -> Path:
    path = tmp_path / "report.json"
    path.write_text(OLD, encoding="utf-8")
    return path


def folder_names(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


@contextlib.contextmanager
def file_size_limit(limit: int):
    """Writes past `limit` bytes fail with EFBIG, as a full disk fails them (SIGXFSZ ignored, not fatal)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def test_a_write_replaces_the_file_whole_and_leaves_no_temp_file(old_file):
    write_json_atomic(old_file, {"b": 1, "a": "ñ"})
    assert old_file.read_text(encoding="utf-8") == '{\n  "a": "ñ",\n  "b": 1\n}\n'
    assert folder_names(old_file) == ["report.json"]


def test_a_write_that_fails_halfway_leaves_the_old_file(old_file):
    with file_size_limit(4096), pytest.raises(OSError) as error:
        write_bytes_atomic(old_file, b"x" * 100_000)  # the first 4096 bytes land, then the write fails
    assert error.value.errno == errno.EFBIG
    assert old_file.read_text(encoding="utf-8") == OLD
    assert folder_names(old_file) == ["report.json"], "the half-written temp file is removed"


def test_an_error_while_the_caller_writes_leaves_the_old_file(old_file):
    with pytest.raises(KeyboardInterrupt), atomic_path(old_file) as tmp:
        tmp.write_text("half of the new", encoding="utf-8")
        raise KeyboardInterrupt  # Ctrl+C mid-write
    assert old_file.read_text(encoding="utf-8") == OLD
    assert folder_names(old_file) == ["report.json"]


def test_a_full_disk_says_so_and_keeps_the_old_file(old_file, monkeypatch):
    monkeypatch.setenv("FAULT_ENOSPC", "report.json")  # the pipeline's own hook: this write fails with ENOSPC
    with pytest.raises(PipelineError) as error:
        write_text_atomic(old_file, "new text")
    assert f"disk full while writing {old_file}" in error.value.message and "free in" in error.value.message
    assert "previous version of the file is untouched" in error.value.message
    assert "free some disk space" in error.value.fix
    assert old_file.read_text(encoding="utf-8") == OLD and folder_names(old_file) == ["report.json"]


def test_temp_files_of_dead_writers_are_cleaned_up_and_live_ones_kept(old_file):
    dead_pid = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1  # no process can have it
    live_pid = os.getppid()
    (old_file.parent / f".report.json.tmp{dead_pid}").write_text("left by a writer killed mid-write")
    (old_file.parent / f".report.json.tmp{live_pid}").write_text("another writer, still writing")
    write_text_atomic(old_file, "new text")
    assert old_file.read_text() == "new text"
    assert folder_names(old_file) == [f".report.json.tmp{live_pid}", "report.json"]


def test_a_write_creates_missing_folders(tmp_path):
    path = tmp_path / "artifacts" / "params" / "train.json"
    write_text_atomic(path, "{}\n")
    assert path.read_text() == "{}\n"


def test_read_json_names_the_file_and_the_fix(tmp_path):
    with pytest.raises(PipelineError, match=r"token file sidecar .*train.json is missing") as error:
        read_json(tmp_path / "train.json", "token file sidecar", "run `make encode`")
    assert error.value.fix == "run `make encode`"
    (tmp_path / "train.json").write_text('{"tokens": 12', encoding="utf-8")
    with pytest.raises(PipelineError, match="is not valid JSON"):
        read_json(tmp_path / "train.json", "token file sidecar", "run `make encode`")


def test_a_second_training_process_is_refused_with_the_holders_pid(tmp_path):
    artifacts = tmp_path / "artifacts"
    first = acquire_lock(artifacts)  # flock: a second open file is refused, in this process as in another
    assert (artifacts / ".train.lock").read_text() == str(os.getpid())
    with pytest.raises(PipelineError) as error:
        acquire_lock(artifacts)
    assert f"another training run (pid {os.getpid()}) is already using {artifacts}" in error.value.message
    assert "this one did not touch it" in error.value.message and "another ARTIFACTS_DIR" in error.value.fix
    assert (artifacts / ".train.lock").read_text() == str(os.getpid()), "the refused one leaves the lock file as it was"

    first.close()
    assert not (artifacts / ".train.lock").exists(), "the lock file goes with the run"
    second = acquire_lock(artifacts)
    second.close()


def test_a_lock_file_left_by_a_killed_run_does_not_block_the_next(tmp_path):
    artifacts = tmp_path / "artifacts"
    artifacts.mkdir()
    (artifacts / ".train.lock").write_text("12345")  # its process died: the file stays, its flock went with it
    lock = acquire_lock(artifacts)
    assert (artifacts / ".train.lock").read_text() == str(os.getpid())
    lock.close()
