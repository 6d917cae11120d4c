"""Where a training step's time goes: each PyTorch operator call timed, and named by the line of this
repository's code that issued it (bench.py --profile).

    with StepProfile(REPO_ROOT) as prof:
        train_step(model, optimizer, x, y, autocast, loss_fn, clip, phase=prof.phase)
    prof.rows()   # one row per (call site, operator): calls and milliseconds in forward / backward / optimizer

Why not torch.profiler: its records, allocated between a step's tensors, fragment the heap, so the
step's tensors land on fresh pages that the kernel must zero (thousands of page faults a step against
none unprofiled: bench.py --profile counts both), and the time goes to whichever operator touched the
new memory first, mostly elementwise ones (clamp_min, mul, copy_). This timer measures each call alone
with a wall clock; what it keeps between operators is small Python objects and anomaly mode's
tracebacks (a few hundred page faults a step).

A call site is the innermost frame in the repository's own files (model/, stages/) that was not
already running when the phase began (train_step itself names nothing). In the backward pass only
train_step's frames are ours, so a built-in autograd node's operators are named by the forward line
that built the node: anomaly mode records that traceback on each node (its NaN checks stay off; the
traceback costs Python time outside the timed calls). Operators outside any phase are not counted.
"""

from __future__ import annotations

import ast
import functools
import os
import re
import sys
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

PHASES = ("forward", "backward", "optimizer")
TRACEBACK_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)')


class StepProfile(TorchDispatchMode):
    def __init__(self, repo: Path):
        super().__init__()
        self.repo, self.this_file = str(Path(repo).resolve()), str(Path(__file__).resolve())
        self.current: str | None = None  # the phase running; None: outside train_step's phases, not counted
        self.ns: dict[tuple[str, str, str], int] = defaultdict(int)
        self.calls: dict[tuple[str, str, str], int] = defaultdict(int)
        self.steps = 0
        self.outer: set[int] = set()

    @contextmanager
    def phase(self, name: str):
        """train_step's `phase` argument: labels the operators run inside."""
        previous, previous_outer, self.current = self.current, self.outer, name
        self.outer = set()  # the frames already running (train_step): they name no operator of this phase
        frame = sys._getframe(2)
        while frame is not None:
            self.outer.add(id(frame))
            frame = frame.f_back
        if name == "forward":
            self.steps += 1
        try:
            if name == "forward":
                with torch.autograd.set_detect_anomaly(True, check_nan=False):
                    yield
            else:
                yield
        finally:
            self.current, self.outer = previous, previous_outer

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if self.current is None:
            return func(*args, **(kwargs or {}))
        start = time.perf_counter_ns()
        out = func(*args, **(kwargs or {}))
        elapsed = time.perf_counter_ns() - start
        key = (self.current, self.site(), func.__name__.split(".")[0])
        self.ns[key] += elapsed
        self.calls[key] += 1
        return out

    def ours(self, filename: str) -> bool:
        return (filename.startswith(self.repo + os.sep) and filename != self.this_file
                and "site-packages" not in filename and f"{os.sep}.venv{os.sep}" not in filename)

    def site(self) -> str:
        frame, caller = sys._getframe(2), None
        while frame is not None:
            if self.ours(frame.f_code.co_filename):
                if id(frame) not in self.outer:
                    # the model's code, or a custom autograd Function's backward: its own line names it
                    return self.label(frame.f_code.co_filename, frame.f_lineno)
                caller = caller or frame
            frame = frame.f_back
        node = torch._C._current_autograd_node()
        if node is not None:  # an autograd node's backward: the forward line that built the node
            trace = node.metadata.get("traceback_", "")  # formatted stack lines (a list in recent torch)
            trace = trace if isinstance(trace, str) else "".join(map(str, trace))
            frames = [m for m in TRACEBACK_FRAME.finditer(trace) if self.ours(m[1])]
            if frames:
                return self.label(frames[-1][1], int(frames[-1][2])) + f" ({node.name()})"
            return f"(autograd: {node.name()})"
        # called by the step itself (clipping, the optimizer's own calls)
        return self.label(caller.f_code.co_filename, caller.f_lineno) if caller else "(no frame of ours)"

    def label(self, filename: str, line: int) -> str:
        return f"{Path(filename).relative_to(self.repo)}:{line} {qualified_name(filename, line)}"

    def rows(self) -> list[dict]:
        """One row per (site, operator), milliseconds per step by phase, largest first."""
        rows: dict[tuple[str, str], dict] = {}
        steps = max(1, self.steps)
        for (phase, site, op), ns in self.ns.items():
            row = rows.setdefault((site, op), {"site": site, "op": op, "calls": 0, **dict.fromkeys(PHASES, 0.0)})
            row[phase] += ns / 1e6 / steps
            row["calls"] += self.calls[(phase, site, op)] / steps
        for row in rows.values():
            row["total"] = sum(row[p] for p in PHASES)
        return sorted(rows.values(), key=lambda r: -r["total"])


@functools.lru_cache(maxsize=None)
def _functions(filename: str) -> list[tuple[int, int, str]]:
    """(first line, last line, qualified name) of every function in a file."""
    tree = ast.parse(Path(filename).read_text(encoding="utf-8"))
    found = []

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                found.append((child.lineno, child.end_lineno, prefix + child.name))
                visit(child, prefix + child.name + ".")
            elif isinstance(child, ast.ClassDef):
                visit(child, prefix + child.name + ".")
    visit(tree, "")
    return found


def qualified_name(filename: str, line: int) -> str:
    """The innermost function around a line: `MLP.forward`."""
    inside = [(first, name) for first, last, name in _functions(filename) if first <= line <= last]
    return max(inside)[1] if inside else "<module>"
