"""Checkpoint files: plain dicts of tensors and JSON-able values, built from a training run, written
atomically (with the check, before each epoch, that its saves will fit), loaded back safely.

A checkpoint never holds a custom class, so `torch.load(path, weights_only=True)`
loads it, and a crafted pickle that would run code is refused instead of run.
Keys of every checkpoint:

    format          "tiny-transformer-checkpoint/1"
    kind            "epoch" | "last" | "best" | "final"
    model           model.state_dict()
    model_config    ModelConfig as a dict (vocab_size, n_layers, d_model, ...)
    config          the resolved training configuration
    tokenizer_sha256, fingerprint, epoch, step, best_val_loss
training checkpoints ("epoch", "last") add what exact resume needs:
    optimizer, scheduler, position (batches done in the current epoch),
    running_loss_sum, running_loss_count, rng {python, numpy, torch[, cuda]}, history,
    rng_by_rank (every training process's rng, rank 0's first), world_size

`run` and `state` below are train.py's Run and Progress (lib/training/state.py).
"""

from __future__ import annotations

import io
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from lib.runtime.config import checkpoint_path, public, stage_paths
from lib.runtime.errors import PipelineError
from lib.runtime.files import human_bytes, write_bytes_atomic

FORMAT = "tiny-transformer-checkpoint/1"


def checkpoint_bytes(payload: dict) -> bytes:
    """The file's bytes, serialised in memory: their size is known before the disk is touched."""
    buffer = io.BytesIO()
    torch.save({"format": FORMAT, **payload}, buffer)
    return buffer.getvalue()


def save_checkpoint(path: Path, payload: dict) -> None:
    """Write atomically. A full disk is an OSError here, never torch's 'unexpected pos' RuntimeError,
    so it becomes the clear disk-full message of lib/runtime/files.py."""
    write_bytes_atomic(path, checkpoint_bytes(payload))


def model_checkpoint(run, state, kind: str, epoch: int, **extra) -> dict:
    """best_model.pt / final_model.pt: the weights and what they are."""
    return {"kind": kind, "model": run.model.state_dict(), "model_config": run.model_config.to_dict(),
            "config": public(run.cfg), "tokenizer_sha256": run.data.tokenizer["model_sha256"], "fingerprint": run.fingerprint,
            "epoch": epoch, "step": state.step, "best_val_loss": state.best_val, **extra}


def training_checkpoint(run, state, kind: str, epoch: int, position: int, rng_by_rank: list) -> dict:
    """last.pt / epoch_NNN.pt: a model checkpoint plus all that an exact resume needs.

    rng_by_rank: every training process's random state (rng_state()), rank 0's first.
    """
    cfg = run.cfg
    return model_checkpoint(
        run, state, kind, epoch, position=position, history=state.history, optimizer=run.optimizer.state_dict(),
        scheduler={"kind": "warmup-" + cfg["lr_schedule"], "decay_fraction": cfg["decay_fraction"], "step": state.step,
                   "total_steps": run.total_steps, "warmup_steps": cfg["warmup_steps"], "min_lr_ratio": cfg["min_lr_ratio"]},
        running_loss_sum=state.running_sum, running_loss_count=state.running_count, rng=rng_by_rank[0],
        rng_by_rank=rng_by_rank, world_size=len(rng_by_rank))


def save_resumable(run, state, path: Path, kind: str, epoch: int, position: int) -> None:
    """last.pt / epoch_NNN.pt with every rank's random state (all ranks call this; rank 0 writes)."""
    rng_by_rank = run.world.gather(rng_state())
    if run.world.is_main:
        save_checkpoint(path, training_checkpoint(run, state, kind, epoch, position, rng_by_rank))


def check_room_for_saves(run, state, epoch: int) -> None:
    """Before an epoch starts: the saves at its end must fit, or training stops now, losing nothing.

    Sizes are those of this run's checkpoints, serialised in memory; a file being replaced needs room
    for its new copy beside the old one until the rename.
    """
    if not run.world.is_main:
        return
    if run.save_sizes is None:
        run.save_sizes = (len(checkpoint_bytes(model_checkpoint(run, state, "best", epoch))),
                          len(checkpoint_bytes(training_checkpoint(run, state, "last", epoch, 0, [rng_state()]))))
    model_bytes, training_bytes = run.save_sizes
    due = (epoch + 1) % run.cfg["checkpoint_every"] == 0
    needed = model_bytes + training_bytes * (2 if due else 1) + (1 << 20)  # + history files
    free = shutil.disk_usage(run.dir).free
    if free >= needed:
        return
    sizes = f"a training checkpoint is {human_bytes(training_bytes)}, a model {human_bytes(model_bytes)}"
    if not state.history:
        raise PipelineError(
            f"{run.dir} cannot hold this run's checkpoints: {human_bytes(free)} free, the first epoch's saves need "
            f"about {human_bytes(needed)} ({sizes}); nothing was trained",
            "free some disk space or point ARTIFACTS_DIR at a larger disk, then rerun the same command", "disk-full")
    raise PipelineError(
        f"{run.dir} has {human_bytes(free)} free, and the saves at the end of epoch {epoch + 1} need about "
        f"{human_bytes(needed)} ({sizes}); stopped before training it, so nothing is lost: epochs 1-{epoch} are saved "
        f"in {run.dir / 'last.pt'}", f"free some disk space, then rerun the same command to resume ({run.resume})",
        "disk-full")


def load_checkpoint(path: Path) -> dict:
    """Load with weights_only=True; any unreadable or foreign file is a clear error."""
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"checkpoint {path} does not exist", "train a model first: `make train`", "interrupted-runs-and-resume")
    if not path.is_file():
        raise PipelineError(f"{path} is not a checkpoint (not a file)", "point CHECKPOINT at a .pt file written by "
                            "stages/train.py", "checkpoint-and-tokenizer-mismatch")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unpickling garbage fails in many ways (IndexError, KeyError, ...)
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if written_by_training(path):
            raise PipelineError(
                f"{path} is not a valid checkpoint (truncated or corrupted; it was not executed): {first_line[:200]}",
                "delete it; training falls back to an older checkpoint, or retrain with `make train`",
                "checkpoint-and-tokenizer-mismatch") from None
        raise PipelineError(
            f"{path} is not a checkpoint of this pipeline (it could not be read as one; it was not executed): "
            f"{first_line[:200]}", "point CHECKPOINT at a .pt file written by stages/train.py, e.g. "
            "CHECKPOINT=best_model.pt", "checkpoint-and-tokenizer-mismatch") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise PipelineError(f"{path} is not a checkpoint of this pipeline (format {payload.get('format') if isinstance(payload, dict) else type(payload).__name__!r})",
                            "point to a file written by stages/train.py", "checkpoint-and-tokenizer-mismatch")
    return payload


def existing_checkpoint(cfg, purpose: str) -> Path:
    """checkpoint_path(cfg), which must exist; if not, the error names the checkpoints that do."""
    path = checkpoint_path(cfg)
    if path.exists():
        return path
    folder = stage_paths(cfg)["checkpoints"]
    present = sorted(p.name for p in folder.glob("*.pt")) if folder.is_dir() else []
    if present:
        raise PipelineError(f"no checkpoint {path}, so there is nothing to {purpose}; {folder} holds: {', '.join(present)}",
                            f"pick one of those, e.g. CHECKPOINT={present[0]}", "interrupted-runs-and-resume")
    raise PipelineError(f"no checkpoint {path}, so there is nothing to {purpose}: {folder} holds no trained model yet",
                        "train one first: `make train` (or `make all`); an interrupted run resumes where it stopped",
                        "interrupted-runs-and-resume")


def written_by_training(path: Path) -> bool:
    """A file name train.py writes, in a run folder: only such a file may be deleted on our advice."""
    return bool(re.fullmatch(r"last\.pt|best_model\.pt|final_model\.pt|epoch_\d+\.pt", path.name)) and (
        (path.parent / "run.json").exists() or path.parent.name == "checkpoints")


def load_model(path: Path, tokenizer_sha256: str | None = None):
    """Rebuild a TinyTransformer from a checkpoint, in eval mode; check it matches the tokenizer."""
    from model import ModelConfig, TinyTransformer

    payload = load_checkpoint(path)
    if tokenizer_sha256 and payload.get("tokenizer_sha256") != tokenizer_sha256:
        raise PipelineError(
            f"{path} was trained with another tokenizer (sha256 {str(payload.get('tokenizer_sha256'))[:12]}..., "
            f"current {tokenizer_sha256[:12]}...)",
            "retrain the model with the current tokenizer: `make train` (or restore the old tokenizer)",
            "checkpoint-and-tokenizer-mismatch")
    model = TinyTransformer(ModelConfig.from_saved(payload["model_config"]))
    model.load_state_dict(payload["model"])
    model.eval()
    return model, payload


def rng_state() -> dict:
    """Python's, numpy's and torch's global random state, as checkpoint values (lists, a byte tensor)."""
    py_state, np_state = random.getstate(), np.random.get_state()
    state = {"python": [py_state[0], list(py_state[1]), py_state[2]],
             "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]], "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # this process's GPU: dropout masks drawn there
    return state


def restore_rng_state(saved: dict) -> None:
    """The inverse of rng_state(): the next random draw is the one the saved run would have made."""
    random.setstate((saved["python"][0], tuple(saved["python"][1]), saved["python"][2]))
    np_state = saved["numpy"]
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
    torch.set_rng_state(saved["torch"])
    if "cuda" in saved and torch.cuda.is_available():
        torch.cuda.set_rng_state(saved["cuda"])
