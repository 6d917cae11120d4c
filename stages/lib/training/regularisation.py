"""Regularisers chosen by the training settings: dropout 'auto' and unigram input noise.

Both fight memorisation of the training text (the overfitting gap); see
docs/training.md and docs/configuration.md for their measured effects.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

# dropout "auto": 0.2 (the sweep's pick on the default corpus, ~667K training tokens) down to this many
# training tokens, then in proportion to how much less text there is, at most AUTO_DROPOUT_MAX.
AUTO_DROPOUT, AUTO_DROPOUT_TOKENS, AUTO_DROPOUT_MAX = 0.2, 650_000, 0.4


def dropout_setting(text):
    """A dropout rate, or 'auto' (see resolve_dropout)."""
    if str(text).strip().lower() == "auto":
        return "auto"
    try:
        return float(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1) or 'auto', got {text!r}") from None


def resolve_dropout(setting, train_tokens: int) -> tuple[float, str]:
    """The dropout rate to train with, and why.

    Less text is memorised sooner, so a fixed rate tuned on the default corpus lets a
    smaller corpus overfit (the Debian Reference manual, 265K tokens: gap 0.51 at 0.3, 0.42 at
    0.4; docs/experiments.md#a-smaller-corpus-dropout-auto). 'auto' keeps 0.2 down to
    650K training tokens and scales it by 650K / tokens below that, up to 0.4.
    """
    if setting != "auto":
        return float(setting), f"as configured; {train_tokens:,} training tokens"  # the count the advice reads
    rate = min(AUTO_DROPOUT_MAX, AUTO_DROPOUT * max(1.0, AUTO_DROPOUT_TOKENS / max(train_tokens, 1)))
    return round(rate, 3), (f"auto: {train_tokens:,} training tokens; {AUTO_DROPOUT} from {AUTO_DROPOUT_TOKENS:,} up, "
                            f"{AUTO_DROPOUT} x {AUTO_DROPOUT_TOKENS:,} / tokens below, at most {AUTO_DROPOUT_MAX}")


def noise_inputs(x: torch.Tensor, tokens: np.ndarray, rate: float) -> torch.Tensor:
    """Unigram input noising (Xie et al., 2017, "Data noising as smoothing in neural network
    language models"): each input token is replaced, with probability `rate`, by the token
    at a random position of the training text, i.e. a draw from its unigram distribution.
    The targets stay clean, so the model must predict from a context it cannot fully
    trust: a regulariser against memorising exact token sequences. Uses torch's global
    generator, which checkpoints save and restore.
    """
    if rate <= 0:
        return x
    replace = torch.rand(x.shape) < rate
    positions = torch.randint(tokens.size, (int(replace.sum()),)).numpy()
    noisy = x.clone()
    noisy[replace] = torch.from_numpy(tokens[positions].astype(np.int64)).to(x.device)
    return noisy
