"""What keeps a training run from losing work, kept beside train.py's loop instead of inside it.

- StopRequest: Ctrl+C, SIGTERM or SIGHUP (a closed terminal, a dropped SSH session) lets the step
  finish, saves last.pt and exits 128 + the signal's number; several processes agree first.
- step_guard: running out of memory inside a step saves the progress and names a batch that fits.
- compile_or_eager: a torch.compile that fails falls back to eager before the first step.
- lost_peer_explained: when another training process dies, this one says so and stops.
- stop_if_diverged: a loss that is no longer a number stops the run with what to change.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import signal
import sys

import torch

from lib.runtime.errors import PipelineError
from lib.runtime.stage import keep_in_log, log
from lib.training.checkpoints import (restore_rng_state, rng_state, save_checkpoint, save_resumable,
                                      training_checkpoint)
from lib.training.distributed import lost_peer
from lib.training.commands import resume_command
from lib.training.hardware import smaller_batch_hint

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
# Several processes: each one's request rides on the step's loss exchange as one number, summed over the
# processes; the strongest signal any of them got is the one they all stop for.
STOP_VOTES = {signal.SIGINT: 1.0, signal.SIGTERM: 1e3, signal.SIGHUP: 1e6}


class StopRequest:
    """First Ctrl+C / SIGTERM / SIGHUP: finish the current step, save, exit. Second Ctrl+C: abort at once."""

    def __init__(self):
        self.signum = None  # the signal this process got
        self.agreed = None  # several processes: the one they all stop for, known after each step's exchange

    def listen(self) -> StopRequest:
        for stream in ("stdout", "stderr"):
            setattr(sys, stream, OutlivesTerminal(getattr(sys, stream)))
        for signum in STOP_SIGNALS:
            signal.signal(signum, self)
        return self

    def __call__(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: stopping after this step and saving (Ctrl+C again aborts at once)",
              file=sys.stderr, flush=True)

    def due(self, world) -> int | None:
        """The signal to stop for before the next step; with several processes, the one they agreed on."""
        return self.agreed if world.distributed else self.signum

    def agree(self, world, loss: float, tokens: int, device) -> float:
        """The batch's loss over every process (token-weighted), and in the same all-reduce whether any of them
        was asked to stop: all stop before the same step, as the save gathers every process's random state."""
        if not world.distributed:
            return loss
        total, count, asked = world.sum([loss * tokens, tokens, STOP_VOTES.get(self.signum, 0.0)], device)
        self.agreed = max((s for s, votes in STOP_VOTES.items() if asked >= votes), key=STOP_VOTES.get, default=None)
        return total / count


class OutlivesTerminal:
    """sys.stdout / sys.stderr that survive their terminal closing (SIGHUP): writes to a terminal that is
    gone fail with EIO, and one of those in the save's messages would end the run with a traceback instead.
    The first EIO points the stream at /dev/null; the run's train.log still gets every log line."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> int:
        return self._survive(self.stream.write, text)

    def flush(self) -> None:
        self._survive(self.stream.flush)

    def _survive(self, call, *args):
        try:
            return call(*args)
        except OSError as exc:
            if exc.errno != errno.EIO:
                raise
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, self.stream.fileno())
            os.close(null)
            return call(*args)  # what is still buffered now drains into /dev/null

    def __getattr__(self, name):
        return getattr(self.stream, name)


def save_and_exit(run, state, epoch: int, batch: int, signum: int) -> None:
    """last.pt at this batch, the command that resumes, and exit 128 + signal: 130 Ctrl+C, 143 SIGTERM, 129 SIGHUP."""
    save_resumable(run, state, run.dir / "last.pt", "last", epoch, batch)
    if run.world.is_main:
        saved = f"saved {run.dir / 'last.pt'} at epoch {epoch + 1}, batch {batch}; resume with: {run.resume}"
        keep_in_log(saved)  # after a closed terminal the printed line goes nowhere: train.log keeps it
        print(saved, file=sys.stderr, flush=True)
    run.world.close()
    sys.exit(128 + signum)


@contextlib.contextmanager
def step_guard(run, state, epoch: int, batch: int):
    """Out of memory inside a step: the progress is saved (one process) and the message names a batch to try."""
    try:
        yield
    except (torch.OutOfMemoryError, RuntimeError) as exc:
        if "memory" not in str(exc).lower():
            raise
        run.optimizer.zero_grad(set_to_none=True)
        if run.world.distributed:  # the other ranks wait in a gradient exchange: no saving together now
            where = f"progress up to epoch {epoch} is in {run.dir / 'last.pt'}" if epoch else "nothing was saved yet"
            where = f"rank {run.world.rank} of {run.world.size}; {where}"
        else:
            save_checkpoint(run.dir / "last.pt", training_checkpoint(run, state, "last", epoch, batch, [rng_state()]))
            where = f"progress saved in {run.dir / 'last.pt'}"
        cfg = run.cfg
        raise PipelineError(
            f"Out of memory at BATCH_SIZE={cfg['batch_size']}, SEQ_LEN={cfg['max_seq_length']} (epoch {epoch + 1}, "
            f"step {state.step}); {where}", smaller_batch_hint(cfg), "out-of-memory")


def compile_or_eager(run) -> None:
    """torch.compile the model, or train in eager mode where compiling fails: it is an optimisation, never a
    reason to fail. It compiles at its first call, so one forward and backward on a batch of zeros happen
    here; the gradients are dropped and the random state put back, so training goes on as if they never had."""
    run.model.enable_compile()
    x = torch.zeros((run.cfg["batch_size"] // run.world.size, run.cfg["max_seq_length"]), dtype=torch.long,
                    device=run.device)
    saved = rng_state()
    try:
        with run.autocast():
            loss = run.model.loss(x, x)
        loss.backward()
    except Exception as exc:  # noqa: BLE001 - a compiler fails in many ways (a missing C++ compiler, a lowering error)
        if "memory" not in str(exc).lower():  # out of memory: the first step meets it again, under step_guard
            log(f"torch.compile failed ({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); continuing in eager mode")
            run.model.disable_compile()
    finally:
        run.optimizer.zero_grad(set_to_none=True)
        restore_rng_state(saved)


@contextlib.contextmanager
def lost_peer_explained(run, state):
    """Several processes: an exchange that fails because another process died or stopped becomes one message."""
    try:
        yield
    except RuntimeError as exc:
        if not run.world.distributed or not lost_peer(exc):
            raise
        saved = f"the last save is {run.dir / 'last.pt'} (epoch {len(state.history)})" if state.history else "nothing saved"
        raise PipelineError(f"rank {run.world.rank}: another training process stopped or died, so this one stops too "
                            f"({str(exc).splitlines()[0][:120]}); {saved}",
                            "see the first error above (torchrun names the failed rank and its exit code); "
                            f"rerun the same command to resume from the last save ({run.resume})",
                            "scaling-out") from None


def stop_if_diverged(loss: float, lr: float, state, epoch: int, batch: int, batches: int, cfg: dict) -> None:
    """The fix names the run's command with half its LR (the schedule's peak): a new run."""
    if not math.isfinite(loss):
        peak = cfg["learning_rate"]
        raise PipelineError(f"loss became {loss} at epoch {epoch + 1}, step {batch + 1} of {batches} "
                            f"(step {state.step + 1} of the run, lr {lr:.2e})",
                            f"type: {resume_command(cfg, learning_rate=float(f'{peak / 2:.2g}'))} (half the run's LR "
                            f"{peak:g}; a new run, the diverged one is archived); keep GRAD_CLIP on",
                            "diverging-or-nan-loss")
