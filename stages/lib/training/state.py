"""A training run's state: what is fixed for the run (Run), what changes as it trains (Progress),
where it starts, and how a saved run is restored for an exact resume.

train.py builds a Run in setup() and a Progress in start_or_resume(); what a checkpoint holds is
built and documented in lib/training/checkpoints.py.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lib.data.batches import TrainingData
from lib.runtime.config import public, stage_log
from lib.runtime.errors import PipelineError
from lib.runtime.files import write_json_atomic
from lib.runtime.stage import append_log_to, log
from lib.training.checkpoints import restore_rng_state
from lib.training.distributed import World
from lib.training.runs import choose_start
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
    step_loss: object  # (x, y) -> the training loss: model.loss, through DistributedDataParallel with several processes
    resume: str  # the command that continues this run (lib/training/runs.resume_command)
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


def start_or_resume(run: Run) -> Progress | None:
    """Where training starts (lib/training/runs.choose_start): afresh, or at a save of this same run; None when
    it already finished. The run folder gets the run's own log (kept across resumes), run.json and config.json."""
    cfg, world = run.cfg, run.world
    mode, ckpt = world.broadcast(choose_start(cfg, run.paths, run.identity) if world.is_main else None)
    if mode in ("finished", "restored"):
        if mode == "finished":
            log(f"this run ({run.dir}) already finished with these settings; nothing to do "
                f"(RESUME=no / --restart trains again, moving it aside)")
        if world.is_main:
            (run.dir / "train_done.json").touch()  # up to date for make, whose parameter file may be newer
        return None
    if world.is_main:
        run.dir.mkdir(parents=True, exist_ok=True)
        append_log_to(stage_log(cfg, "train"))
    state = restore(run, ckpt)
    if world.is_main:
        write_json_atomic(run.dir / "run.json", {"fingerprint": run.fingerprint, "identity": run.identity,
                                                 "config": public(cfg)})
        write_json_atomic(run.dir / "config.json", {**public(cfg), "overridden": cfg["_overridden"]})
    return state


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
                    running_count=ckpt["running_loss_count"])


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
