"""Fault hooks for the tests, kept out of the pipeline's own modules.

tests/conftest.py puts this folder on PYTHONPATH, so every Python process a test starts (a stage,
torchrun's training processes, make's recipes) imports this file at startup. It wraps a few of the
pipeline's functions as their modules are imported; each wrapper acts only while its variable is set:

    FAULT_AT_STEP=N:ACTION     train.py, at the start of training step N (inside its step guard):
                               sigint | sigterm | sighup | sigkill (sent to itself), oom, error (raised),
                               pause=FILE (writes FILE, then waits until the test deletes it; once a
                               stop signal has reached the waiting process it also writes FILE.signalled)
    FAULT_RANK=R               with several training processes only rank R acts (default: every rank)
    FAULT_ENOSPC=NAME          a write through atomic_path to a file whose name holds NAME fails: disk full
    FAULT_KILL_BEFORE_RENAME=NAME  kill -9 once that file's complete temp copy is written, before its rename
"""

from __future__ import annotations

import contextlib
import errno
import importlib.abc
import importlib.machinery
import os
import signal
import sys
import time
from pathlib import Path


def signalled_marker(marker: Path) -> Path:
    """The file a paused process writes beside its pause marker once a stop signal has reached it."""
    return marker.with_name(marker.name + ".signalled")


def fault_at_step(step: int, rank: int) -> None:
    spec = os.environ.get("FAULT_AT_STEP")
    if not spec or os.environ.get("FAULT_RANK", str(rank)) != str(rank):
        return
    at, action = spec.split(":", 1)
    if int(at) != step:
        return
    if action.startswith("pause="):
        marker = Path(action.split("=", 1)[1])
        marker.write_text(str(os.getpid()))
        signalled = signalled_marker(marker)
        while marker.exists():
            time.sleep(0.05)  # a signal cuts the sleep short and its handler runs here
            got = any(getattr(signal.getsignal(s), "signum", None) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP))
            if got and not signalled.exists():
                signalled.write_text(str(os.getpid()))  # train.py's stop request has its signal
    elif action in ("sigint", "sigterm", "sighup", "sigkill"):
        os.kill(os.getpid(), getattr(signal, action.upper()))
    elif action == "oom":
        import torch
        raise torch.OutOfMemoryError("injected: DefaultCPUAllocator: can't allocate memory")
    elif action == "error":
        raise RuntimeError("injected fault")


def wrap_step_guard(guards) -> None:
    original = guards.step_guard

    @contextlib.contextmanager
    def step_guard(run, state, *args):
        with original(run, state, *args):
            fault_at_step(state.step, run.world.rank)
            yield

    guards.step_guard = step_guard


def wrap_atomic_path(files) -> None:
    original = files.atomic_path

    @contextlib.contextmanager
    def atomic_path(path, *args, **kwargs):
        name = Path(path).name
        with original(path, *args, **kwargs) as tmp:
            if os.environ.get("FAULT_ENOSPC") and os.environ["FAULT_ENOSPC"] in name:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            yield tmp
            if os.environ.get("FAULT_KILL_BEFORE_RENAME") and os.environ["FAULT_KILL_BEFORE_RENAME"] in name:
                os.kill(os.getpid(), signal.SIGKILL)

    files.atomic_path = atomic_path


WRAPPERS = {"lib.training.guards": wrap_step_guard, "lib.runtime.files": wrap_atomic_path}


class WrapOnImport(importlib.abc.MetaPathFinder):
    """Finds the modules of WRAPPERS as Python would, and wraps their functions once they have run,
    before any `from module import function` can take the unwrapped one."""

    def find_spec(self, name, path, target=None):
        if name not in WRAPPERS:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None:
            return None
        run_module = spec.loader.exec_module

        def exec_module(module):
            run_module(module)
            WRAPPERS[name](module)

        spec.loader.exec_module = exec_module
        return spec


if not any(isinstance(finder, WrapOnImport) for finder in sys.meta_path):
    sys.meta_path.insert(0, WrapOnImport())
