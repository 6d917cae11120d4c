"""Draw the docs' figures from the real code and the current run -> docs/images/*.png.

    make figures
    python stages/figures.py [--out docs/images]

lr_schedule.png   the learning rate of every step of a default run (lr_at, the function training uses)
window_grid.png   how an epoch cuts the token file into windows, x and y shifted by one (epoch_windows)
loss_curves.png   the current run's per-epoch training, eval-mode training and validation loss, and the gap
attention.png     what each head of the first block attends to, on a real sentence, with the trained model

Rerun it after the defaults change (a new default run), so the docs show what the code does.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from lib.batches import epoch_windows
from lib.checkpoints import load_model
from lib.config import REPO_ROOT, resolve_config, stage_parser, stage_paths
from lib.errors import PipelineError, log, run_stage
from lib.files import atomic_path, read_json
from lib.optim import lr_at


def build_parser():
    p = stage_parser("figures", __doc__)
    p.add_argument("--out", type=str, default=None, help="folder for the PNG files (relative: to the repository)")
    p.add_argument("--sentence", type=str, default=None, help="the sentence whose attention is drawn")
    return p


def save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)


def whole_epochs(ax) -> None:
    from matplotlib.ticker import MaxNLocator
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def lr_schedule(plt, train_cfg: dict, steps_per_epoch: int, out: Path) -> None:
    total = train_cfg["epochs"] * steps_per_epoch
    steps = np.arange(total)
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.plot(steps / steps_per_epoch, [lr_at(int(s), train_cfg, total) for s in steps])
    ax.axvline(train_cfg["warmup_steps"] / steps_per_epoch, color="grey", ls=":", label=f"end of warmup (step {train_cfg['warmup_steps']})")
    ax.set_xlabel("epoch")
    ax.set_ylabel("learning rate")
    ax.set_title(f"warmup, then cosine to {train_cfg['min_lr_ratio']:g} x peak ({total} steps)")
    whole_epochs(ax)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save(fig, out / "lr_schedule.png")


def window_grid(plt, train_cfg: dict, out: Path) -> None:
    """Two epochs' windows over the first tokens of a toy file with T = 8 (the real T is 128)."""
    T, n_tokens, seed = 8, 48, train_cfg["seed"]
    fig, axes = plt.subplots(2, 1, figsize=(9, 3.6), sharex=True)
    for epoch, ax in enumerate(axes):
        starts = np.sort(epoch_windows(n_tokens, T, seed, epoch))
        ax.set_ylim(-1.2, 1.6)
        ax.set_yticks([])
        for s in starts:
            ax.add_patch(plt.Rectangle((s - 0.45, 0.15), T - 0.1, 0.8, color="tab:blue", alpha=0.35))   # x: inputs
            ax.add_patch(plt.Rectangle((s + 0.55, -0.95), T - 0.1, 0.8, color="tab:orange", alpha=0.35))  # y: targets
        ax.scatter(np.arange(n_tokens), np.full(n_tokens, 0.05), s=6, color="black")
        ax.set_title(f"epoch {epoch + 1}: grid offset {starts[0]} (random each epoch), {len(starts)} windows "
                     f"(order shuffled)", fontsize=9)
        ax.text(n_tokens - 0.5, 1.2, "x = tokens[s : s+T]", color="tab:blue", ha="right", fontsize=8)
        ax.text(n_tokens - 0.5, -1.15, "y = tokens[s+1 : s+T+1]", color="tab:orange", ha="right", fontsize=8)
    axes[-1].set_xlabel("position in the token file (T = 8 here; training uses 128)")
    fig.tight_layout()
    save(fig, out / "window_grid.png")


def loss_curves(plt, history: list, out: Path) -> None:
    epochs = [h["epoch"] for h in history]
    fig, (ax, gap_ax) = plt.subplots(1, 2, figsize=(10, 3.6))
    for label, key in (("train (running, dropout + noise on)", "train_loss"), ("train (eval mode)", "train_loss_eval"),
                       ("validation", "val_loss")):
        ax.plot(epochs, [h[key] for h in history], marker="o", ms=3, label=label)
    ax.set_ylabel("loss (nats/token)")
    gap_ax.plot(epochs, [h["gap"] for h in history], marker="o", ms=3, color="tab:red")
    gap_ax.axhline(0.5, color="grey", ls=":", label="report's limit 0.5")
    gap_ax.set_ylabel("gap = validation - train (eval mode)")
    gap_ax.legend()
    for a in (ax, gap_ax):
        a.set_xlabel("epoch")
        a.grid(alpha=0.3)
        whole_epochs(a)
    ax.legend()
    fig.tight_layout()
    save(fig, out / "loss_curves.png")


@torch.no_grad()
def attention(plt, model, sp, sentence: str, out: Path) -> None:
    """Softmax(q k^T / sqrt(d) + causal mask) of every head of block 0, as the model computes it."""
    keep = model.cfg.max_seq_length  # a sentence longer than the context is cut
    ids = ([sp.bos_id()] + sp.encode(sentence))[:keep]
    pieces = (["<s>"] + sp.encode(sentence, out_type=str))[:keep]
    x, rotary = model.embed(torch.tensor([ids]))
    T, C, H = len(ids), model.cfg.d_model, model.cfg.n_heads
    block = model.h[0]
    q, k, _ = block.attn.queries_keys_values(block.ln_1(x), rotary)
    scores = q @ k.transpose(-1, -2) / math.sqrt(C // H)
    weights = torch.softmax(scores.masked_fill(torch.ones(T, T).triu(1).bool(), float("-inf")), dim=-1)[0]
    fig, axes = plt.subplots(1, H, figsize=(3.2 * H, 3.6))
    for head, ax in enumerate(axes):
        ax.imshow(weights[head].numpy(), cmap="viridis", vmin=0, vmax=1)
        ax.set_title(f"block 1, head {head + 1}", fontsize=9)
        ax.set_xticks(range(T), pieces, rotation=90, fontsize=6)
        ax.set_yticks(range(T), pieces if head == 0 else [""] * T, fontsize=6)
    axes[0].set_ylabel("query (the token predicting the next)")
    fig.supxlabel("key (earlier token attended to)", fontsize=9)
    fig.tight_layout()
    fig.subplots_adjust(top=0.92)  # room for the heads' titles
    save(fig, out / "attention.png")


def main(cfg):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import sentencepiece as spm

    paths = stage_paths(cfg)
    history_file = paths["checkpoints"] / "history.json"
    history = read_json(history_file, "training history", "train the default run first: `make train`")
    train_cfg = history["config"]
    if not history["epochs"]:
        raise PipelineError(f"{history_file} has no finished epoch", "train first: `make train`")
    out = REPO_ROOT / cfg["out"]  # an absolute path stays as it is
    out.mkdir(parents=True, exist_ok=True)
    lr_schedule(plt, train_cfg, history["epochs"][0]["step"], out)
    window_grid(plt, train_cfg, out)
    loss_curves(plt, history["epochs"], out)
    model, _ = load_model(paths["checkpoints"] / "best_model.pt")
    sp = spm.SentencePieceProcessor(model_file=str(paths["tokenizer"] / "spm.model"))
    attention(plt, model.float().eval(), sp, cfg["sentence"], out)
    plt.close("all")
    log(f"wrote lr_schedule.png, window_grid.png, loss_curves.png, attention.png to {out}")


if __name__ == "__main__":
    run_stage(main, resolve_config(build_parser(), "figures"))
