"""Draw the docs' figures from the snapshot of the default run and the real code -> docs/images/*.png.

    make docs                     # snapshot (stages/docs_snapshot.py), these figures, then cog
    python stages/figures.py [--out docs/images]

lr_schedule.png   the learning rate of every step of the default run (lr_at, the function training uses)
window_grid.png   how an epoch cuts the token file into windows, x and y shifted by one (epoch_windows)
loss_curves.png   the default run's per-epoch training, eval-mode training and validation loss, and the gap
first_steps.png   the loss of every step of epoch 1 (from ln(vocab) down), and every step's gradient norm
                  against the clipping threshold
overfitting.png   the default run against the same model without dropout and input noise (its run, kept by
                  `make train DROPOUT=0 INPUT_NOISE=0`, is in the snapshot's runs.json)
attention.png     what each head of the first block attends to, on a real sentence, with the trained model;
                  docs/data/attention.json: each head's share of weight on itself, the previous token and <s>
rotary.png        one pair of a query's dimensions turned by position, fast and slow pairs
sampling.png      one next-token distribution of the trained model, as temperature, top-k and top-p reshape it

Reads docs/data/ (the snapshot) and the trained model of the same run in artifacts/checkpoints/.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from lib.data.batches import epoch_windows
from lib.training.checkpoints import load_model
from lib.runtime.config import REPO_ROOT, resolve_config, stage_parser, stage_paths
from lib.runtime.errors import PipelineError
from lib.runtime.stage import log, run_stage
from lib.runtime.files import atomic_path, read_json, write_json_atomic
from lib.training.optim import lr_at
from model.tiny_transformer import next_token_probabilities, rotary_tables


def build_parser():
    p = stage_parser("figures", __doc__)
    p.add_argument("--out", type=str, default=None, help="folder for the PNG files (relative: to the repository)")
    p.add_argument("--sentence", type=str, default=None, help="the sentence whose attention is drawn")
    p.add_argument("--snapshot", type=str, default="docs/data", help="the snapshot of the default run (make docs)")
    p.add_argument("--sampling-prompt", type=str, default="En el principio crió Dios los",
                   help="the prompt whose next-token distribution sampling.png shows")
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
    """Two epochs' windows over the first tokens of a toy file with T = 8 (the run's own T is far longer)."""
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
    axes[-1].set_xlabel(f"position in the token file (T = 8 here; training uses {train_cfg['max_seq_length']})")
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
    rows = weights[:, 1:]  # queries after <s> (the first can only look at itself)
    positions = torch.arange(1, T)
    return {"sentence": sentence, "pieces": pieces, "heads": [
        {"self": float(rows[h, torch.arange(T - 1), positions].mean()),
         "previous": float(rows[h, torch.arange(T - 1), positions - 1].mean()),
         "bos": float(rows[h, :, 0].mean())} for h in range(H)]}


def first_steps(plt, history: list, grad_clip: float, vocab: int, out: Path) -> None:
    """Epoch 1's step losses from ln(vocab) down, and every step's gradient norm against the clipping threshold."""
    fig, (loss_ax, norm_ax) = plt.subplots(1, 2, figsize=(10, 3.6))
    losses = history[0]["step_losses"]
    loss_ax.plot(range(1, len(losses) + 1), losses, ms=2, marker="o")
    loss_ax.axhline(math.log(vocab), color="grey", ls=":", label=f"ln {vocab} = {math.log(vocab):.2f} (uniform guess)")
    loss_ax.axhline(history[0]["train_loss"], color="tab:orange", ls="--",
                    label=f"epoch 1's mean, the logged 'train' {history[0]['train_loss']:.2f}")
    loss_ax.set_xlabel("step of epoch 1")
    loss_ax.set_ylabel("training loss of the step (nats/token)")
    loss_ax.legend(fontsize=8)
    norms = [n for e in history for n in e["step_grad_norms"]]
    steps_per_epoch = len(history[0]["step_grad_norms"])
    norm_ax.plot(np.arange(len(norms)) / steps_per_epoch, norms, lw=0.7)
    norm_ax.axhline(grad_clip, color="tab:red", ls=":", label=f"GRAD_CLIP = {grad_clip:g}: longer gradients are scaled down to it")
    norm_ax.set_yscale("log")
    norm_ax.set_xlabel("epoch")
    norm_ax.set_ylabel("gradient norm before clipping")
    norm_ax.legend(fontsize=8)
    for a in (loss_ax, norm_ax):
        a.grid(alpha=0.3)
    whole_epochs(norm_ax)
    fig.tight_layout()
    save(fig, out / "first_steps.png")


def overfitting(plt, runs: list, history: list, out: Path) -> bool:
    bare = next((r for r in runs if r["config"]["dropout"] == 0 and r["config"]["input_noise"] == 0), None)
    if bare is None:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, epochs, style in (("defaults (dropout + input noise)", history, "-"),
                                 ("DROPOUT=0 INPUT_NOISE=0", bare["epochs"], "--")):
        e = [h["epoch"] for h in epochs]
        ax.plot(e, [h["val_loss"] for h in epochs], style, color="tab:green", marker="o", ms=3, label=f"validation, {label}")
        ax.plot(e, [h["train_loss_eval"] for h in epochs], style, color="tab:blue", marker="o", ms=3,
                label=f"train (eval mode), {label}")
    best = min(bare["epochs"], key=lambda h: h["val_loss"])
    ax.annotate(f"lowest validation loss: epoch {best['epoch']}", (best["epoch"], best["val_loss"]),
                xytext=(best["epoch"] + 1, best["val_loss"] - 0.45), arrowprops={"arrowstyle": "->"}, fontsize=8)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    whole_epochs(ax)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save(fig, out / "overfitting.png")
    return True


def rotary(plt, train_cfg: dict, out: Path) -> None:
    """A query's first pair of dimensions (fast) and its last pair (slow), turned by position, from rotary_tables."""
    head_dim = train_cfg["d_model"] // train_cfg["n_heads"]
    dims = head_dim  # rotary_fraction 1.0: every pair turns
    positions = torch.arange(0, 9)
    cos, sin = rotary_tables(positions, head_dim, dims, train_cfg["rotary_base"])
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.2))
    half = dims // 2
    for ax, pair, what in ((axes[0], 0, "pair i = 0 (fast)"), (axes[1], half - 1, f"pair i = {half - 1} (slow)")):
        x = torch.zeros(head_dim)
        x[pair], x[pair + half] = 1.0, 0.0  # a unit vector along the pair's first dimension
        for p in positions.tolist():
            turned = x * cos[p] + torch.cat([x[half:dims], x[:half]]) * sin[p]
            a, b = float(turned[pair]), float(turned[pair + half])
            ax.annotate("", (a, b), (0, 0), arrowprops={"arrowstyle": "->", "color": plt.cm.viridis(p / 8)})
            ax.text(a * 1.12, b * 1.12, str(p), fontsize=8, ha="center", va="center")
        angle = 1.0 / train_cfg["rotary_base"] ** (2 * pair / dims)
        ax.set_title(f"{what}: {math.degrees(angle):.3g}° per position", fontsize=9)
        ax.set_xlim(-1.3, 1.3)
        ax.set_ylim(-1.3, 1.3)
        ax.set_aspect("equal")
        ax.grid(alpha=0.3)
        ax.set_xlabel(f"dimension {pair} of the head (from 0)")
        ax.set_ylabel(f"dimension {pair + half}")
    fig.suptitle("one query vector's pair of dimensions at positions 0-8 (numbers): same length, turned by the "
                 "position's angle", fontsize=9)
    fig.tight_layout()
    save(fig, out / "rotary.png")


@torch.no_grad()
def sampling(plt, model, sp, prompt: str, gen_cfg: dict, out: Path) -> dict:
    ids = [sp.bos_id()] + sp.encode(prompt)
    logits = model(torch.tensor([ids]))[0][0, -1].float()
    # each title is the setting as typed after `make generate`, which draws from exactly this distribution
    settings = [("TEMPERATURE=0 (greedy):\nalways the top token", None),
                ("TEMPERATURE=1 TOP_K=0:\nthe model's own distribution", (1.0, 0, 1.0)),
                ("TEMPERATURE=0.5 TOP_K=0:\nsharper", (0.5, 0, 1.0)),
                (f"the defaults:\nTEMPERATURE={gen_cfg['temperature']:g} TOP_K={gen_cfg['top_k']}",
                 (gen_cfg["temperature"], gen_cfg["top_k"], 1.0)),
                ("TEMPERATURE=1 TOP_K=0 TOP_P=0.9", (1.0, 0, 0.9))]
    base = torch.softmax(logits, -1)
    order = torch.argsort(base, descending=True)[:15]
    labels = [sp.id_to_piece(int(i)) for i in order]
    fig, axes = plt.subplots(1, len(settings), figsize=(3.1 * len(settings), 3.8), sharey=True)
    stats = []
    for ax, (title, setting) in zip(axes, settings):
        probs = torch.zeros_like(base)
        if setting is None:
            probs[int(base.argmax())] = 1.0
        else:
            probs = next_token_probabilities(logits, *setting)
        kept = int((probs > 0).sum())
        ax.barh(range(len(order)), probs[order].numpy(), color="tab:blue")
        ax.set_yticks(range(len(order)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_title(f"{title}\n{kept} of {len(base)} tokens possible", fontsize=8)
        ax.set_xlim(0, 1)
        ax.set_xlabel("probability", fontsize=8)
        stats.append({"setting": title, "tokens_possible": kept, "top_token_probability": float(probs.max())})
    fig.suptitle(f"next token after {prompt!r}: the 15 most likely of the trained model", fontsize=9)
    fig.tight_layout()
    save(fig, out / "sampling.png")
    return {"prompt": prompt, "top_piece": labels[0], "settings": stats}


def main(cfg):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import sentencepiece as spm

    paths = stage_paths(cfg)
    snapshot = REPO_ROOT / cfg["snapshot"]
    fix = "take the snapshot of the default run first: `make docs`"
    history = read_json(snapshot / "history.json", "the snapshot's training history", fix)
    runs = read_json(snapshot / "runs.json", "the snapshot's runs", fix)["runs"]
    train_cfg, epochs = history["config"], history["epochs"]
    current = read_json(paths["checkpoints"] / "history.json", "training history", "train the default run: `make all`")
    if current.get("fingerprint") != history.get("fingerprint"):
        raise PipelineError(f"the model in {paths['checkpoints']} is not the run of the snapshot {snapshot}",
                            "make both from the default run: `make all && make docs`")
    out = REPO_ROOT / cfg["out"]  # an absolute path stays as it is
    out.mkdir(parents=True, exist_ok=True)
    lr_schedule(plt, train_cfg, epochs[0]["step"], out)
    window_grid(plt, train_cfg, out)
    loss_curves(plt, epochs, out)
    vocab = read_json(snapshot / "tokenizer.json", "the snapshot's tokenizer sidecar", fix)["vocab_size"]
    first_steps(plt, epochs, train_cfg["grad_clip"], vocab, out)
    drawn = ["lr_schedule", "window_grid", "loss_curves", "first_steps", "rotary", "attention", "sampling"]
    if overfitting(plt, runs, epochs, out):
        drawn.append("overfitting")
    rotary(plt, train_cfg, out)
    model, _ = load_model(paths["checkpoints"] / "best_model.pt")
    model = model.float().eval()
    sp = spm.SentencePieceProcessor(model_file=str(paths["tokenizer"] / "spm.model"))
    write_json_atomic(snapshot / "attention.json", attention(plt, model, sp, cfg["sentence"], out))
    gen_cfg = read_json(snapshot / "snapshot.json", "the snapshot", fix)["params"]["evaluate"]
    write_json_atomic(snapshot / "sampling.json", sampling(plt, model, sp, cfg["sampling_prompt"], gen_cfg, out))
    plt.close("all")
    log(f"wrote {', '.join(name + '.png' for name in drawn)} to {out}")


if __name__ == "__main__":
    run_stage(main, resolve_config(build_parser(), "figures"), report_time=False)
