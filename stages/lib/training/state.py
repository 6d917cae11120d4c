"""A training run's state: what is fixed for the run (Run), what changes as it trains (Progress),
what its checkpoint files hold, and how a saved run is restored for an exact resume.

train.py builds a Run in setup() and a Progress in restore(); the checkpoint keys are
those documented in lib/training/checkpoints.py.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lib.data.batches import TrainingData
from lib.training.checkpoints import restore_rng_state
from lib.runtime.config import public
from lib.training.distributed import World
from lib.runtime.errors import PipelineError
from lib.runtime.stage import log
from model import ModelConfig, TinyTransformer


@dataclass
class Run:
    """Everything fixed for the whole run: settings, data, model, optimizer, schedule, identity."""
    cfg: dict
    paths: dict
    device: torch.device
    autocast: object  # a context-manager factory: bf16 autocast, or nullcontext
    data: TrainingData  # token files, their windows, the tokenizer
    prompts: dict
    model_config: ModelConfig
    model: TinyTransformer
    optimizer: torch.optim.Optimizer
    windows_by_epoch: list
    total_steps: int
    identity: dict
    fingerprint: str
    world: World  # this process among the training processes (one process: rank 0 of 1)
    step_loss: object  # (x, y) -> the training loss; DistributedDataParallel-wrapped with several processes
    save_sizes: tuple | None = None  # bytes of (a model checkpoint, a training checkpoint), measured once

    @property
    def dir(self) -> Path:
        return self.paths["checkpoints"]


@dataclass
class Progress:
    """What changes as training goes: saved in last.pt, restored on resume."""
    epoch: int = 0
    position: int = 0  # batches already done in the current epoch
    step: int = 0
    best_val: float = float("inf")
    history: list = field(default_factory=list)
    running_sum: float = 0.0
    running_count: int = 0
    first_step: int = 0  # the step this process started at (torch.compile may fall back only there)


def restore(run: Run, ckpt: dict | None) -> Progress:
    """A fresh Progress, or the one saved in `ckpt` with the model, optimizer and random state."""
    if ckpt is None:
        if run.world.is_main:
            (run.dir / "metrics.jsonl").unlink(missing_ok=True)
        return Progress()
    if ckpt["model_config"] != run.model_config.to_dict():
        raise PipelineError(f"the checkpoint's model shape {ckpt['model_config']} differs from {run.model_config.to_dict()}",
                            "use RESUME=no to start over", "checkpoint-and-tokenizer-mismatch")
    run.model.load_state_dict(ckpt["model"])
    run.optimizer.load_state_dict(ckpt["optimizer"])
    restore_rank_rng(run, ckpt)
    return Progress(epoch=ckpt["epoch"], position=ckpt["position"], step=ckpt["step"], best_val=ckpt["best_val_loss"],
                    history=list(ckpt["history"]), running_sum=ckpt["running_loss_sum"],
                    running_count=ckpt["running_loss_count"], first_step=ckpt["step"])


def restore_rank_rng(run: Run, ckpt: dict) -> None:
    """Each rank continues its own saved random streams; a run saved with another number of processes
    continues with freshly seeded streams (dropout and input noise draw differently from then on)."""
    saved = ckpt.get("rng_by_rank") or [ckpt["rng"]]  # checkpoints of one process have only "rng"
    if len(saved) == run.world.size:
        restore_rng_state(saved[run.world.rank])
        return
    log(f"warning: {run.dir / 'last.pt'} was saved by {len(saved)} training process(es), this run has {run.world.size}: "
        f"the weights, optimizer and data position resume exactly, but the dropout and input-noise random streams "
        f"start afresh, so the losses will not match an uninterrupted run's (resume with NPROC={len(saved)} for that)")
    reseed_rank(run.cfg["seed"] + ckpt["step"], run.world.rank)


def reseed_rank(seed: int, rank: int) -> None:
    """Seed this process's random generators with a stream of its own."""
    seed = seed * 1_000 + rank
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)


def model_checkpoint(run: Run, state: Progress, kind: str, epoch: int, **extra) -> dict:
    """best_model.pt / final_model.pt: the weights and what they are (see lib/training/checkpoints.py)."""
    return {"kind": kind, "model": run.model.state_dict(), "model_config": run.model_config.to_dict(),
            "config": public(run.cfg), "tokenizer_sha256": run.data.tokenizer["model_sha256"], "fingerprint": run.fingerprint,
            "epoch": epoch, "step": state.step, "best_val_loss": state.best_val, **extra}


def training_checkpoint(run: Run, state: Progress, kind: str, epoch: int, position: int, rng_by_rank: list) -> dict:
    """last.pt / epoch_NNN.pt: a model checkpoint plus all that an exact resume needs.

    rng_by_rank: every training process's random state (lib/checkpoints.rng_state), rank 0's first.
    """
    return model_checkpoint(
        run, state, kind, epoch, position=position, history=state.history, optimizer=run.optimizer.state_dict(),
        scheduler={"kind": "warmup-" + run.cfg["lr_schedule"], "decay_fraction": run.cfg["decay_fraction"], "step": state.step, "total_steps": run.total_steps,
                   "warmup_steps": run.cfg["warmup_steps"], "min_lr_ratio": run.cfg["min_lr_ratio"]},
        running_loss_sum=state.running_sum, running_loss_count=state.running_count, rng=rng_by_rank[0],
        rng_by_rank=rng_by_rank, world_size=len(rng_by_rank))
