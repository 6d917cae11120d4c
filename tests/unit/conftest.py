"""The unit tier runs inside the pytest process: no stage script, make, torchrun or any other process.

While a test of this folder sets up and runs, every way Python starts a process is replaced by one
that raises ProcessInUnitTier and notes the attempt; a noted attempt fails the test even when the
code under test caught the error. A test that needs a process belongs in tests/ (the integration tier).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import _posixsubprocess
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "stages"))  # lib.* and the stage scripts import as they do when run

# Every road to a new process ends in one of these: subprocess.* and os.popen in Popen._execute_child,
# multiprocessing in os.fork or _posixsubprocess.fork_exec, os.spawn* in os.fork, os.exec* in execv(e).
SPAWNERS = [(subprocess.Popen, "_execute_child", "subprocess"),
            (_posixsubprocess, "fork_exec", "_posixsubprocess.fork_exec"),
            (os, "fork", "os.fork"), (os, "forkpty", "os.forkpty"), (os, "system", "os.system"),
            (os, "posix_spawn", "os.posix_spawn"), (os, "posix_spawnp", "os.posix_spawnp"),
            (os, "execv", "os.execv"), (os, "execve", "os.execve")]


class ProcessInUnitTier(RuntimeError):
    pass


class ProcessGuard:
    """Refuses to start processes while active, and remembers who tried."""

    def __init__(self):
        self.attempts: list[str] = []

    def refuse(self, name: str):
        def refused(*args, **kwargs):
            self.attempts.append(name)
            raise ProcessInUnitTier(f"{name} called in tests/unit/, whose tests run inside the pytest process only; "
                                    f"a test that starts a process belongs in the integration tier, tests/")
        return refused

    @contextlib.contextmanager
    def active(self):
        with pytest.MonkeyPatch.context() as patch:
            for owner, attribute, name in SPAWNERS:
                patch.setattr(owner, attribute, self.refuse(name))
            yield


GUARD = ProcessGuard()


def guarded(item):
    """Run a test phase under the guard; fail the test if anything tried to start a process."""
    GUARD.attempts.clear()
    with GUARD.active():
        result = yield
    if GUARD.attempts:
        pytest.fail(f"{item.nodeid} tried to start a process ({', '.join(GUARD.attempts)}); "
                    f"tests/unit/ runs in-process only", pytrace=False)
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    return (yield from guarded(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    return (yield from guarded(item))


@pytest.fixture
def process_guard() -> ProcessGuard:
    return GUARD
