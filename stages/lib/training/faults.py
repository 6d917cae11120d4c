"""Stopping cleanly and failing on purpose: the Ctrl+C / SIGTERM handler of training, and the
fault hook the tests use to interrupt, kill or break a run at an exact step."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import torch


class StopRequest:
    """First Ctrl+C / SIGTERM: finish the current step, save, exit. Second Ctrl+C: abort at once."""

    def __init__(self):
        self.signum = None

    def __call__(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: stopping after this step and saving (Ctrl+C again aborts at once)",
              file=sys.stderr, flush=True)


def inject_fault(step: int, rank: int = 0) -> None:
    """Deterministic fault hook for tests: FAULT_AT_STEP='N:sigint|sigterm|sigkill|oom|error|pause=FILE'.

    With several processes every rank acts on it, or only rank R with FAULT_RANK=R.
    """
    spec = os.environ.get("FAULT_AT_STEP")
    if not spec or os.environ.get("FAULT_RANK", str(rank)) != str(rank):
        return
    at, action = spec.split(":", 1)
    if int(at) != step:
        return
    if action.startswith("pause="):
        # Create the marker file, then wait until the test deletes it (no sleeps in tests).
        marker = Path(action.split("=", 1)[1])
        marker.write_text(str(os.getpid()))
        while marker.exists():
            time.sleep(0.05)
    elif action in ("sigint", "sigterm", "sigkill"):
        os.kill(os.getpid(), {"sigint": signal.SIGINT, "sigterm": signal.SIGTERM, "sigkill": signal.SIGKILL}[action])
    elif action == "oom":
        raise torch.OutOfMemoryError("injected: DefaultCPUAllocator: can't allocate memory")
    elif action == "error":
        raise RuntimeError("injected fault")
