"""Several processes training one model: PyTorch's DistributedDataParallel, launched by torchrun.

    make train NPROC=2                       # torchrun --standalone --nproc_per_node=2 stages/train.py ...
    make train NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 NPROC=4   # on each machine

train.py started with --nproc/--nnodes above 1 checks the launch (below) and replaces
itself with torchrun, which starts one train.py per process with RANK, WORLD_SIZE, ...
in its environment; those join one process group (gloo on the CPU, nccl on CUDA).
Every rank walks the same shuffled windows and takes its own slice of each global
batch; DDP averages the gradients, so a step equals the one-process step on the whole
batch. Figures (losses, validation) are summed over the ranks; rank 0 alone writes files.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from lib.runtime.config import LAUNCH_KEYS
from lib.runtime.errors import EXIT_SIGINT, EXIT_SIGTERM, PipelineError
from lib.runtime.stage import log


@dataclass
class World:
    """This process's place among the training processes (one process: rank 0 of 1)."""
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    backend: str = "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def sum(self, values: list[float], device) -> list[float]:
        """Each value summed over all ranks (float64; one all-reduce)."""
        if not self.distributed:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def gather(self, obj) -> list:
        """obj from every rank, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        gathered = [None] * self.size
        dist.all_gather_object(gathered, obj)
        return gathered

    def broadcast(self, obj):
        """Rank 0's obj on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def share(self, windows: np.ndarray) -> tuple[np.ndarray, float]:
        """This rank's contiguous slice of a global batch, and its loss weight.

        DDP averages the ranks' gradients, each the gradient of a mean over its slice; a
        weight of (slice size x ranks / batch size) turns that average into the gradient
        of the mean over the whole batch, also when the last batch of an epoch does not
        divide evenly. A rank left without a window computes one with weight 0: every
        rank must take part in each gradient exchange.
        """
        if not self.distributed:
            return windows, 1.0
        mine = np.array_split(windows, self.size)[self.rank]
        if len(mine) == 0:
            return windows[:1], 0.0
        return mine, len(mine) * self.size / len(windows)

    def close(self) -> None:
        """Leave the process group together: a rank that tears its connections down while
        another still uses them makes that one abort."""
        if self.distributed and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def lost_peer(exc: BaseException) -> bool:
    """Whether a collective failed because another rank went away (died, or stopped on its own error)."""
    text = str(exc)
    return isinstance(exc, dist.DistError) or any(mark in text for mark in (
        "Connection closed by peer", "Connection reset by peer", "Broken pipe", "gloo", "NCCL", "Socket Timeout"))


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or "WORLD_SIZE" in os.environ


def join(device_name: str) -> World:
    """Join the process group torchrun set up (nothing to join for one process)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device_name == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    # A rank that dies makes the others fail at their next exchange; the timeout only
    # matters for a rank that hangs without dying.
    dist.init_process_group(backend, timeout=timedelta(minutes=10))
    return World(rank=rank, size=size, local_rank=local_rank,
                 local_size=int(os.environ.get("LOCAL_WORLD_SIZE", "1")), backend=backend)


# ----------------------------------------------------------------------------- launching


def check_launch(cfg: dict) -> None:
    """Every launch problem at once, before any process starts (PipelineError); warnings are logged."""
    nproc, nnodes, world = cfg["nproc"], cfg["nnodes"], cfg["nproc"] * cfg["nnodes"]
    problems = []
    if cfg["batch_size"] % world:
        problems.append(f"BATCH_SIZE={cfg['batch_size']} does not divide among {world} processes "
                        f"(NPROC={nproc} x NNODES={nnodes}); BATCH_SIZE is the global batch, split evenly over them")
    if not 0 <= cfg["node_rank"] < nnodes:
        problems.append(f"NODE_RANK={cfg['node_rank']} must be within 0..{nnodes - 1} for NNODES={nnodes}")
    if nnodes > 1 and cfg["node_rank"] == 0:
        port_problem = busy_port(cfg["master_port"])
        if port_problem:
            problems.append(port_problem)
    if cfg["device"] == "cuda" and torch.cuda.is_available() and nproc > torch.cuda.device_count():
        problems.append(f"NPROC={nproc} processes but {torch.cuda.device_count()} GPU(s) on this machine: one GPU each")
    if problems:
        raise PipelineError("cannot launch training on several processes:\n  - " + "\n  - ".join(problems),
                            "fix the Make variables named above", "scaling-out")
    cores = os.cpu_count() or 1
    if cfg["device"] != "cuda" and nproc > cores:
        log(f"warning: NPROC={nproc} is more than this machine's {cores} cores: the processes will share cores "
            f"and be slower than fewer of them")


def busy_port(port: int) -> str:
    """Why MASTER_PORT cannot be used by the rendezvous on this machine, or ''."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(("", port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return (f"MASTER_PORT={port} is already in use on this machine (another training job?); "
                        f"pick a free one, e.g. MASTER_PORT={port + 1}, the same on every machine")
            return f"MASTER_PORT={port} cannot be used here ({exc.strerror})"
    return ""


def torchrun_command(cfg: dict, argv: list[str]) -> list[str]:
    """The torchrun command line that starts this script once per process."""
    if cfg["nnodes"] == 1:
        rendezvous = ["--standalone"]
    else:
        rendezvous = [f"--nnodes={cfg['nnodes']}", f"--node_rank={cfg['node_rank']}",
                      f"--master_addr={cfg['master_addr']}", f"--master_port={cfg['master_port']}"]
    return [sys.executable, "-m", "torch.distributed.run", *rendezvous, f"--nproc_per_node={cfg['nproc']}", *argv]


def without_launch_flags(argv: list[str]) -> list[str]:
    """argv minus --nproc/--nnodes/...: the processes torchrun starts must not launch again, and
    torchrun would take those flags (or their prefixes) for its own."""
    flags = {"--" + key.replace("_", "-") for key in LAUNCH_KEYS}
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in flags:
            skip = True
        elif arg.split("=", 1)[0] not in flags:
            kept.append(arg)
    return kept


# A rank stopped by Ctrl+C / SIGTERM writes the exit code here and exits 0, so that torchrun ends
# quietly (a rank's non-zero exit makes it print a traceback) and the launcher exits with the code.
STOP_FILE_ENV = "TRAIN_STOP_CODE_FILE"
# The launch settings the ranks do not see as flags (torchrun must not take them for its own), for the
# resume command they print: JSON {key: value} of those that differ from the defaults.
LAUNCH_SETTINGS_ENV = "TRAIN_LAUNCH_SETTINGS"


def launch_ranks(cfg: dict) -> None:
    """Run torchrun, which starts this script once per process, and wait for it.

    torchrun runs in a session of its own, so a Ctrl+C at the terminal reaches this launcher only;
    the launcher passes each signal on to the training processes below torchrun (not to torchrun's
    agent, which would answer with a traceback), they save once and stop, and it exits 130 / 143 like
    one process does.
    """
    check_launch(cfg)
    command = torchrun_command(cfg, without_launch_flags(sys.argv))
    log("launching: torchrun " + " ".join(command[3:]))
    sys.stdout.flush()
    sys.stderr.flush()
    with tempfile.TemporaryDirectory(prefix="train-launch-") as tmp:
        stop_file = Path(tmp) / "stop_code"
        torchrun = subprocess.Popen(command, start_new_session=True, preexec_fn=_die_with_parent,
                                    env={**os.environ, STOP_FILE_ENV: str(stop_file), LAUNCH_SETTINGS_ENV: json.dumps(
                                        {k: cfg[k] for k in cfg.get("_overridden", []) if k in LAUNCH_KEYS})})

        def pass_on(signum, frame):
            for pid in _descendants(torchrun.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signum)

        signal.signal(signal.SIGINT, pass_on)
        signal.signal(signal.SIGTERM, pass_on)
        code = torchrun.wait()
        stopped = stop_file.read_text().strip() if stop_file.exists() else ""
    if stopped:
        sys.exit(int(stopped))
    if code:
        sys.exit(code)  # torchrun and the failed rank have said what happened


def _die_with_parent() -> None:
    """torchrun gets SIGTERM (and stops its ranks) if the launcher is killed with -9."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _descendants(root: int) -> list[int]:
    """Every process below `root` (torchrun's training processes, each in a session of its own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])  # after the name: state, ppid, ...
            children.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


@contextlib.contextmanager
def report_stop_to_launcher():
    """Under launch_ranks: a rank's exit 130 / 143 is written to the launcher's file, and the rank exits 0."""
    stop_file = os.environ.get(STOP_FILE_ENV)
    try:
        yield
    except SystemExit as exc:
        if stop_file and launched_by_torchrun() and exc.code in (EXIT_SIGINT, EXIT_SIGTERM):
            with contextlib.suppress(OSError):
                Path(stop_file).write_text(str(exc.code))
            raise SystemExit(0) from None
        raise
