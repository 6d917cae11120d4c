"""How the weights are updated: AdamW and its parameter groups, the learning-rate schedule, one step."""

from __future__ import annotations

import math

import torch


def lr_at(step: int, cfg: dict, total_steps: int) -> float:
    """Linear warmup to the peak, then cosine decay to peak * min_lr_ratio at the last step."""
    peak, floor = cfg["learning_rate"], cfg["learning_rate"] * cfg["min_lr_ratio"]
    warmup = min(cfg["warmup_steps"], max(0, total_steps - 1))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup - 1)
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * min(1.0, progress)))


def make_optimizer(model, cfg: dict, device: torch.device) -> torch.optim.AdamW:
    """AdamW; weight decay on the matrices (embeddings included), not on biases and LayerNorm gains."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg["learning_rate"], betas=(cfg["beta1"], cfg["beta2"]), fused=device.type in ("cpu", "cuda"))


class LossModule(torch.nn.Module):
    """The model with the training loss as its forward: what DistributedDataParallel wraps (train.py)."""

    def __init__(self, model, chunk_tokens: int):
        super().__init__()
        self.model, self.chunk_tokens = model, chunk_tokens

    def forward(self, x, y):
        return self.model.loss(x, y, chunk_tokens=self.chunk_tokens)


def train_step(model, optimizer, x, y, autocast, loss_fn, grad_clip: float,
               loss_weight: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step: forward and loss, backward, clip the global gradient norm, AdamW update.

    Returns the loss and the gradient norm before clipping (grad_clip <= 0: no clipping).
    loss_weight scales the gradient (a rank's share of a batch, lib/distributed.py).
    """
    with autocast():
        loss = loss_fn(x, y)
    (loss if loss_weight == 1.0 else loss * loss_weight).backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, norm
