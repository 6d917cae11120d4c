"""How the weights are updated: the optimizer (AdamW, or Muon + AdamW) and its parameter groups,
the learning-rate schedule (warmup, then cosine or warmup-stable-decay). train.py's loop takes the
step itself; train_step below is the same step for bench.py, which times its parts."""

from __future__ import annotations

import contextlib
import math

import torch


def lr_at(step: int, cfg: dict, total_steps: int) -> float:
    """Linear warmup to the peak, then down to peak * min_lr_ratio at the last step.

    cosine: a half cosine over every step after the warmup. wsd (warmup-stable-decay,
    Hu et al. 2024, MiniCPM): the peak held, then a linear decay over the last
    decay_fraction of the steps.
    """
    peak, floor = cfg["learning_rate"], cfg["learning_rate"] * cfg["min_lr_ratio"]
    warmup = min(cfg["warmup_steps"], max(0, total_steps - 1))
    if step < warmup:
        return peak * (step + 1) / warmup
    if cfg.get("lr_schedule", "cosine") == "wsd":
        decay_steps = max(1, round((total_steps - warmup) * cfg["decay_fraction"]))
        into_decay = step - (total_steps - decay_steps)
        if into_decay < 0:
            return peak
        return peak - (peak - floor) * min(1.0, (into_decay + 1) / decay_steps)
    progress = (step - warmup) / max(1, total_steps - warmup - 1)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * min(1.0, progress)))


def set_learning_rate(optimizer, lr: float) -> None:
    """The scheduled rate into every parameter group, times the group's lr_scale (Muon's own multiple)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def hidden_matrices(model) -> list[str]:
    """Names of the blocks' weight matrices (attention and MLP): what Muon updates.

    The token embedding (also the output layer, tied) stays with AdamW: Muon is for
    hidden layers, whose inputs and outputs are both activations (Jordan et al. 2024).
    """
    return [name for name, p in model.named_parameters() if p.dim() == 2 and name.startswith("h.")]


def make_optimizer(model, cfg: dict, device: torch.device):
    """AdamW; weight decay on the matrices (embeddings included), not on biases and LayerNorm gains.

    optimizer muon: the hidden matrices move by Muon instead (an orthogonalised momentum
    update, scaled to AdamW's update size by adjust_lr_fn="match_rms_adamw", at
    muon_lr_scale times the scheduled rate); AdamW keeps the rest.
    """
    muon_names = set(hidden_matrices(model)) if cfg.get("optimizer", "adamw") == "muon" else set()
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and n not in muon_names]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    adamw = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg["learning_rate"], betas=(cfg["beta1"], cfg["beta2"]), fused=device.type in ("cpu", "cuda"))
    if not muon_names:
        return adamw
    muon = torch.optim.Muon([p for n, p in model.named_parameters() if n in muon_names],
                            lr=cfg["learning_rate"] * cfg["muon_lr_scale"], momentum=cfg["muon_momentum"],
                            weight_decay=cfg["muon_weight_decay"], adjust_lr_fn="match_rms_adamw")
    muon.param_groups[0]["lr_scale"] = cfg["muon_lr_scale"]
    return MuonAdamW(muon, adamw)


class MuonAdamW:
    """Muon and AdamW stepped together, seen by the training loop as one optimizer.

    Its state_dict holds both ({"muon": ..., "adamw": ...}), so a resume restores
    Muon's momentum as exactly as AdamW's moments.
    """

    def __init__(self, muon: torch.optim.Optimizer, adamw: torch.optim.Optimizer):
        self.muon, self.adamw = muon, adamw

    @property
    def param_groups(self) -> list[dict]:
        return self.muon.param_groups + self.adamw.param_groups

    def step(self) -> None:
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adamw.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])


class LossModule(torch.nn.Module):
    """The model with the training loss as its forward: what DistributedDataParallel wraps (train.py)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, y):
        return self.model.loss(x, y)


def _unlabelled(name: str) -> contextlib.nullcontext:
    return contextlib.nullcontext()


def train_step(model, optimizer, x, y, autocast, loss_fn, grad_clip: float,
               loss_weight: float = 1.0, phase=_unlabelled) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step as train.py's loop takes it: forward and loss, backward, clip the global
    gradient norm, optimizer update.

    Returns the loss and the gradient norm before clipping (grad_clip <= 0: no clipping).
    loss_weight scales the gradient (a rank's share of a batch, lib/training/distributed.py).
    phase, if given, is a context manager factory wrapped around the "forward", "backward" and
    "optimizer" parts (bench.py --profile passes StepProfile.phase).
    """
    with phase("forward"), autocast():
        loss = loss_fn(x, y)
    with phase("backward"):
        (loss if loss_weight == 1.0 else loss * loss_weight).backward()
    with phase("optimizer"):
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return loss, norm
