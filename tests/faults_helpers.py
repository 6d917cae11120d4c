"""Real faults for the tests: a small tmpfs is a full disk, a read-only bind mount a read-only folder.

Both need root (this machine and CI run as root); elsewhere the tests that use them are skipped.
Importing this module (conftest.py does) also arms the fault hooks of tests/fault_hooks/sitecustomize.py
(FAULT_AT_STEP, FAULT_ENOSPC, ...) in every Python process the tests start, and in this one.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

FAULT_HOOKS = str(Path(__file__).resolve().parent / "fault_hooks")
if FAULT_HOOKS not in os.environ.get("PYTHONPATH", "").split(os.pathsep):
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [FAULT_HOOKS, os.environ.get("PYTHONPATH")]))
if FAULT_HOOKS not in sys.path:
    sys.path.insert(0, FAULT_HOOKS)
import sitecustomize  # noqa: E402,F401 - the hooks, for the modules this process imports from now on
from sitecustomize import signalled_marker  # noqa: E402,F401 - for the tests that pause a run


def wait_for(path, seconds=180, proc=None):
    """Until `path` exists; a run that ends first fails the test with its output, not after the whole wait."""
    deadline = time.time() + seconds
    while not path.exists() and time.time() < deadline and (proc is None or proc.poll() is None):
        time.sleep(0.05)
    if not path.exists():
        output = "" if proc is None or proc.poll() is None or proc.stderr is None else proc.communicate()[1]
        raise AssertionError(f"{path} never appeared\n{output}")


def _mount(*args) -> None:
    result = subprocess.run(["mount", *map(str, args)], capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount here (needs root): {result.stderr.strip()}")


def umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


@contextlib.contextmanager
def small_disk(path: Path, size: str):
    """`path` becomes a tmpfs of `size` (e.g. '3m'): writing more than that fails with ENOSPC."""
    path.mkdir(parents=True, exist_ok=True)
    _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", path)
    try:
        yield path
    finally:
        umount(path)


def resize(path: Path, size: str) -> None:
    _mount("-o", f"remount,size={size}", path)


@contextlib.contextmanager
def read_only(path: Path):
    """`path` stays readable, and every write under it fails with EROFS (a read-only bind mount of itself)."""
    _mount("--bind", path, path)
    try:
        _mount("-o", "remount,bind,ro", path)
        yield path
    finally:
        umount(path)


def fill(folder: Path, leave_bytes: int) -> Path:
    """Fill the file system of `folder` until `leave_bytes` are free (a filler file the test can delete)."""
    filler = folder / "filler.bin"
    free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, free - leave_bytes))
    return filler
