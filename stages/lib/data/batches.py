"""Training data as the model sees it: token files, the windows an epoch walks, batches.

A token file (data/encoded/SPLIT.npy) is memory-mapped after its JSON sidecar is
checked against the file and the tokenizer. A window is max_seq_length + 1
consecutive tokens: inputs x are the first max_seq_length, targets y the same
shifted by one. `mean_loss` measures a model over a set of windows (validation,
and the eval-mode training loss).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from lib.runtime.errors import PipelineError
from lib.runtime.files import read_json, sha256_file


def load_split(paths, split: str, tokenizer: dict) -> tuple[np.ndarray, dict]:
    """Memory-map a token file after checking its sidecar against the file and the tokenizer."""
    npy, sidecar_path = paths["encoded"] / f"{split}.npy", paths["encoded"] / f"{split}.json"
    meta = read_json(sidecar_path, "token file sidecar", "run `make encode`")
    if meta.get("tokenizer_sha256") != tokenizer["model_sha256"] or meta.get("vocab_size") != tokenizer["vocab_size"]:
        raise PipelineError(
            f"{npy} was encoded with another tokenizer than {paths['tokenizer'] / 'spm.model'}",
            "re-encode: `make encode` (make all does this by itself)", "checkpoint-and-tokenizer-mismatch")
    try:
        tokens = np.load(npy, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise PipelineError(f"{npy} is not a readable token file ({exc})", "re-encode: `make encode`",
                            "checkpoint-and-tokenizer-mismatch") from None
    if tokens.ndim != 1 or tokens.size != meta["tokens"] or tokens.dtype.name != meta["dtype"]:
        raise PipelineError(f"{npy} holds {tokens.size} {tokens.dtype} tokens, its sidecar says {meta['tokens']} {meta['dtype']}",
                            "re-encode: `make encode`", "checkpoint-and-tokenizer-mismatch")
    return tokens, meta


def window_starts(n_tokens: int, seq_len: int, offset: int = 0) -> np.ndarray:
    """Starts of non-overlapping windows of seq_len inputs (+1 shifted target each), from `offset`."""
    count = max(0, (n_tokens - 1 - offset) // seq_len)
    return np.arange(offset, offset + count * seq_len, seq_len, dtype=np.int64)


def epoch_windows(n_tokens: int, seq_len: int, seed: int, epoch: int) -> np.ndarray:
    """This epoch's training windows, in this epoch's order.

    The window grid starts at a random offset in [0, seq_len) each epoch: still one
    pass over the tokens in non-overlapping windows, but a verse is not always cut at
    the same place nor seen at the same position, so the model cannot memorise
    (window, position) pairs as easily. Seeded by (seed, epoch): a resumed run gets
    exactly the same windows.
    """
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    offset = int(torch.randint(seq_len, (1,), generator=generator))
    starts = window_starts(n_tokens, seq_len, offset)
    return starts[torch.randperm(len(starts), generator=generator).numpy()]


def get_batch(tokens: np.ndarray, starts: np.ndarray, seq_len: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.from_numpy(tokens[starts[:, None] + np.arange(seq_len + 1)].astype(np.int64))
    if torch.device(device).type == "cuda":  # pinned memory: the copy to the GPU overlaps the work queued before it
        batch = rows.pin_memory().to(device, non_blocking=True)
    else:
        batch = rows.to(device)
    return batch[:, :-1], batch[:, 1:]


def mean_loss(model, tokens, starts, seq_len, batch_size, device, autocast) -> float:
    """Mean cross-entropy (nats/token) over the given windows, in eval mode (no dropout)."""
    total, count = loss_sum(model, tokens, starts, seq_len, batch_size, device, autocast)
    return total / max(1, count)


@torch.no_grad()
def loss_sum(model, tokens, starts, seq_len, batch_size, device, autocast) -> tuple[float, int]:
    """Summed cross-entropy (nats) over the given windows and their token count, in eval mode (no dropout).

    model.loss is the model's own: on the reference model it holds batch_size x seq_len x
    vocab logits in memory at once, on a fast-path model one chunk of them (model/fast_cpu.py).
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(starts), batch_size):
        x, y = get_batch(tokens, starts[i:i + batch_size], seq_len, device)
        with autocast():
            loss = model.loss(x, y)
        total += float(loss) * y.numel()
        count += y.numel()
    model.train(was_training)
    return total, count


@dataclass
class TrainingData:
    sp: object  # sentencepiece.SentencePieceProcessor
    tokenizer: dict  # artifacts/tokenizer/tokenizer.json
    train_tokens: np.ndarray
    train_meta: dict  # the token file's sidecar: tokens, dtype, source_bytes, sha256s
    val_tokens: np.ndarray
    val_meta: dict
    train_starts: np.ndarray  # window starts at offset 0 (sizes; each epoch draws its own grid)
    val_starts: np.ndarray
    train_eval_starts: np.ndarray  # the fixed training slice the eval-mode training loss is measured on


def load_training_data(cfg: dict, paths: dict) -> TrainingData:
    """The tokenizer and both token files, checked against each other, and their windows (train.py)."""
    import sentencepiece as spm

    tokenizer = read_json(paths["tokenizer"] / "tokenizer.json", "tokenizer sidecar", "run `make tokenizer`")
    if sha256_file(paths["tokenizer"] / "spm.model") != tokenizer["model_sha256"]:
        raise PipelineError(f"{paths['tokenizer'] / 'spm.model'} does not match its sidecar tokenizer.json", "rerun `make tokenizer`",
                            "checkpoint-and-tokenizer-mismatch")
    sp = spm.SentencePieceProcessor(model_file=str(paths["tokenizer"] / "spm.model"))
    train_tokens, train_meta = load_split(paths, "train", tokenizer)
    val_tokens, val_meta = load_split(paths, "val", tokenizer)
    T = cfg["max_seq_length"]
    train_starts, val_starts = window_starts(train_tokens.size, T), window_starts(val_tokens.size, T)
    for name, starts, meta in (("training", train_starts, train_meta), ("validation", val_starts, val_meta)):
        if len(starts) == 0:
            raise PipelineError(
                f"the {name} split has {meta['tokens']} tokens, fewer than one window of max_seq_length + 1 = {T + 1}",
                "use a larger corpus, a smaller SEQ_LEN" + (", or a larger VAL_FRACTION" if name == "validation" else ""),
                "empty-or-corrupted-corpus")
    # The eval-mode training loss uses as many training windows as validation has, spread evenly.
    spread = np.linspace(0, len(train_starts) - 1, min(len(val_starts), len(train_starts))).astype(int)
    return TrainingData(sp=sp, tokenizer=tokenizer, train_tokens=train_tokens, train_meta=train_meta, val_tokens=val_tokens,
                        val_meta=val_meta, train_starts=train_starts, val_starts=val_starts,
                        train_eval_starts=train_starts[spread])
