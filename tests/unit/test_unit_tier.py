"""The unit tier keeps its promise: a test here cannot start a process, even one whose error is caught."""

from __future__ import annotations

import multiprocessing
import os
import subprocess

import pytest

from unit.conftest import ProcessInUnitTier, guarded


@pytest.mark.parametrize("start, name", [
    pytest.param(lambda: subprocess.run(["true"]), "subprocess", id="subprocess.run"),
    pytest.param(lambda: os.popen("true").read(), "subprocess", id="os.popen"),
    pytest.param(lambda: os.system("true"), "os.system", id="os.system"),
    pytest.param(lambda: os.spawnlp(os.P_WAIT, "true", "true"), "os.fork", id="os.spawnlp"),
    pytest.param(lambda: multiprocessing.get_context("fork").Process(target=print).start(), "os.fork",
                 id="multiprocessing-fork"),
    pytest.param(lambda: multiprocessing.get_context("spawn").Process(target=print).start(),
                 "_posixsubprocess.fork_exec", id="multiprocessing-spawn"),
])
def test_every_way_to_start_a_process_is_refused_and_noted(process_guard, start, name):
    with pytest.raises(ProcessInUnitTier, match="integration tier"):
        start()
    assert process_guard.attempts == [name]
    process_guard.attempts.clear()  # noted: the hook would fail this test after it, as it must fail a real one


def test_an_attempt_the_code_caught_still_fails_the_test(process_guard):
    class Item:
        nodeid = "tests/unit/test_x.py::test_quiet"

    phase = guarded(Item)
    next(phase)  # the test phase starts, under the guard
    try:
        subprocess.run(["true"])
    except Exception:  # noqa: BLE001 - code under test that swallows the error
        pass
    with pytest.raises(pytest.fail.Exception, match=r"test_quiet tried to start a process \(subprocess\)"):
        phase.send(None)  # the phase ends
    process_guard.attempts.clear()
