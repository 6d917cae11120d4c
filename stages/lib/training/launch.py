"""Launching several training processes: train.py with --nproc/--nnodes above 1 checks the launch,
then runs torchrun, which starts train.py once per process (lib/training/distributed.py joins them).

The launcher stays in the terminal's session and passes Ctrl+C, SIGTERM and SIGHUP on to the
training processes; they save once and stop, and it exits with their code, as one process does.
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
from pathlib import Path

import torch

from lib.runtime.config import LAUNCH_KEYS
from lib.runtime.errors import PipelineError
from lib.runtime.stage import log
from lib.training.commands import LAUNCH_SETTINGS_ENV
from lib.training.guards import STOP_SIGNALS


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or "WORLD_SIZE" in os.environ


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


# A rank stopped by Ctrl+C / SIGTERM / SIGHUP writes the exit code here and exits 0, so that torchrun ends
# quietly (a rank's non-zero exit makes it print a traceback) and the launcher exits with the code.
STOP_FILE_ENV = "TRAIN_STOP_CODE_FILE"
# The launch settings the ranks do not see as flags (torchrun must not take them for its own), for the
# resume command they print: JSON {key: value} of those that differ from the defaults, in
# LAUNCH_SETTINGS_ENV (lib/training/commands.py).


def launch_ranks(cfg: dict) -> None:
    """Run torchrun, which starts this script once per process, and wait for it.

    torchrun runs in a session of its own, so a Ctrl+C at the terminal reaches this launcher only;
    the launcher passes each signal on to the training processes below torchrun (not to torchrun's
    agent, which would answer with a traceback), they save once and stop, and it exits 130 / 143 / 129
    like one process does.
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

        for signum in STOP_SIGNALS:
            signal.signal(signum, pass_on)
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
def end_of_rank():
    """How a training process that torchrun started ends (one process ends as any script does).

    - A stop (exit 130 / 143 / 129) is written to launch_ranks' file and the rank exits 0: torchrun would call
      a rank's non-zero exit a failure and stop the others; the launcher exits with the stop's code instead.
    - The rank leaves by os._exit once its output is flushed, skipping Python's teardown: gloo's threads can
      still hold tensors then, and one that frees its tensor while the interpreter shuts down aborts the
      process ("terminate called without an active exception", SIGABRT), which torchrun reports as a failed
      run, however well it finished. The process group is already left (World.close) and every file written.
    """
    if not launched_by_torchrun():
        yield
        return
    code = 0
    try:
        yield
    except SystemExit as exc:
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
        code = 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 1
        stop_file = os.environ.get(STOP_FILE_ENV)
        if stop_file and code in {128 + signum for signum in STOP_SIGNALS}:
            with contextlib.suppress(OSError):
                Path(stop_file).write_text(str(code))
            code = 0
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
