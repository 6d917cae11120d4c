"""Stage 5: train the TinyTransformer -> artifacts/checkpoints/ (best_model.pt, final_model.pt, history.json, ...).

    make train                                   # defaults from config/defaults.yaml
    make train LR=0.001 EPOCHS=10                # retrains; the tokenizer is not touched
    python stages/train.py --learning-rate 0.001 --epochs 10 --batch-size 32 --max-seq-length 128
    python stages/train.py --restart             # start over; the old run is moved aside, not deleted

Reads data/encoded/{train,val}.npy memory-mapped (checked against the tokenizer).
An epoch is one pass over every training token in non-overlapping windows of
max_seq_length, in an order shuffled per epoch by a seeded generator. AdamW,
linear warmup then cosine decay (FR-015), gradient clipping (FR-014). After every
epoch: validation over the whole validation split, the eval-mode loss on a fixed
training slice of the same size (the overfitting gap is measured against that),
one summary line, history.json and metrics.jsonl. Checkpoints: last.pt every epoch,
epoch_NNN.pt every --checkpoint-every epochs, best_model.pt, final_model.pt (FR-003,
FR-005). train_done.json is written last: it is what make waits for.

Resume (FR-006): an unfinished run with identical data, tokenizer, code and config
is resumed exactly (optimizer, schedule, RNG, position in the epoch). Ctrl+C or
SIGTERM stops at the next step, saves last.pt and exits 130 / 143.
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import functools
import hashlib
import json
import math
import os
import random
import resource
import shutil
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from checkpointing import load_checkpoint, save_checkpoint
from common import (EXIT_SIGINT, EXIT_SIGTERM, REPO_ROOT, PipelineError, human_bytes, log, log_config, public,
                    read_json, resolve_config, run_stage, sha256_file, stage_parser, stage_paths, write_json_atomic)
from language import corpus_prompts
from model import ModelConfig, TinyTransformer

SAMPLE_PROMPTS = {"en": "In the beginning", "es": "En el principio"}
# dropout "auto": 0.1 (the sweep's pick on the default corpus, ~667K training tokens) down to this many
# training tokens, then in proportion to how much less text there is, at most AUTO_DROPOUT_MAX.
AUTO_DROPOUT, AUTO_DROPOUT_TOKENS, AUTO_DROPOUT_MAX = 0.1, 650_000, 0.3
# Keys that do not change what is learned: a run that differs only in these is the same run.
NOT_IN_FINGERPRINT = {"resume", "threads", "max_memory_gb", "device", "checkpoint_every", "sample_every",
                      "sample_tokens", "data_dir", "artifacts_dir", "loss_chunk_tokens"}


def build_parser():
    p = stage_parser("train", __doc__)
    a = p.add_argument
    a("--n-layers", type=int, default=None)
    a("--d-model", type=int, default=None)
    a("--n-heads", type=int, default=None)
    a("--mlp-ratio", type=int, default=None)
    a("--dropout", type=dropout_setting, default=None,
      help="on embeddings and residual branches; 'auto' = 0.1, more for a training split under 650K tokens")
    a("--input-noise", type=float, default=None,
      help="share of input tokens replaced by random tokens of the training text (targets stay clean)")
    a("--max-seq-length", type=int, default=None, help="tokens per window; the model's context")
    a("--learning-rate", type=float, default=None, help="peak learning rate after warmup")
    a("--min-lr-ratio", type=float, default=None, help="cosine floor as a fraction of the peak")
    a("--warmup-steps", type=int, default=None)
    a("--weight-decay", type=float, default=None)
    a("--beta1", type=float, default=None)
    a("--beta2", type=float, default=None)
    a("--grad-clip", type=float, default=None, help="max global gradient norm; 0 disables clipping")
    a("--batch-size", type=int, default=None)
    a("--epochs", type=int, default=None)
    a("--seed", type=int, default=None)
    a("--checkpoint-every", type=int, default=None, help="write epoch_NNN.pt every N epochs")
    a("--sample-every", type=int, default=None, help="log sample generations every N epochs")
    a("--sample-tokens", type=int, default=None)
    a("--resume", type=str, default=None, choices=["auto", "yes", "no"],
      help="auto: resume a matching unfinished run (asks on a terminal); yes: must resume; no: start over")
    a("--restart", dest="resume", action="store_const", const="no", help="same as --resume no")
    a("--device", type=str, default=None, choices=["cpu", "cuda", "mps"])
    a("--dtype", type=str, default=None, choices=["auto", "float32", "bfloat16"],
      help="auto: bf16 autocast where the CPU has native bf16, else float32")
    a("--compile", action=argparse.BooleanOptionalAction, default=None, help="torch.compile the training step")
    a("--loss-chunk-tokens", type=int, default=None,
      help="compute logits + loss N tokens at a time (never the whole B x T x vocab tensor); 0 = all at once")
    a("--threads", type=int, default=None, help="torch threads; 0 = one per core")
    a("--max-memory-gb", type=float, default=None, help="memory budget for the estimate; 0 = available RAM")
    return p


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
    smaller corpus overfit (the Debian Reference manual, 265K tokens: gap 0.59 at 0.1, 0.47 at
    0.2; docs/configuration.md#smaller-corpora-dropout-auto). 'auto' keeps 0.1 down to
    650K training tokens and scales it by 650K / tokens below that, up to 0.3.
    """
    if setting != "auto":
        return float(setting), "as configured"
    rate = min(AUTO_DROPOUT_MAX, AUTO_DROPOUT * max(1.0, AUTO_DROPOUT_TOKENS / max(train_tokens, 1)))
    return round(rate, 3), (f"auto: {train_tokens:,} training tokens; {AUTO_DROPOUT} from {AUTO_DROPOUT_TOKENS:,} up, "
                            f"{AUTO_DROPOUT} x {AUTO_DROPOUT_TOKENS:,} / tokens below, at most {AUTO_DROPOUT_MAX}")


def validate(cfg):
    errors = []
    positive = ["n_layers", "d_model", "n_heads", "mlp_ratio", "max_seq_length", "learning_rate", "batch_size",
                "epochs", "checkpoint_every", "sample_every", "sample_tokens"]
    for key in positive:
        if not cfg[key] > 0:
            errors.append(f"{key} (--{key.replace('_', '-')}) must be > 0, got {cfg[key]}")
    for key in ("warmup_steps", "weight_decay", "grad_clip", "threads", "max_memory_gb", "loss_chunk_tokens"):
        if cfg[key] < 0:
            errors.append(f"{key} (--{key.replace('_', '-')}) must be >= 0, got {cfg[key]}")
    if cfg["d_model"] > 0 and cfg["n_heads"] > 0 and cfg["d_model"] % cfg["n_heads"]:
        errors.append(f"d_model ({cfg['d_model']}) must be divisible by n_heads ({cfg['n_heads']})")
    if cfg["dropout"] != "auto" and not 0 <= cfg["dropout"] < 1:
        errors.append(f"dropout (--dropout) must be 'auto' or within [0, 1), got {cfg['dropout']}")
    if not 0 <= cfg["input_noise"] < 1:
        errors.append(f"input_noise (--input-noise) must be within [0, 1), got {cfg['input_noise']}")
    if not 0 <= cfg["min_lr_ratio"] <= 1:
        errors.append(f"min_lr_ratio (--min-lr-ratio) must be within [0, 1], got {cfg['min_lr_ratio']}")
    for key in ("beta1", "beta2"):
        if not 0 <= cfg[key] < 1:
            errors.append(f"{key} (--{key}) must be within [0, 1), got {cfg[key]}")
    if cfg["max_seq_length"] > 8192:
        errors.append(f"max_seq_length (--max-seq-length / SEQ_LEN) must be <= 8192, got {cfg['max_seq_length']}")
    return errors


# ----------------------------------------------------------------------------- data


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
    rows = tokens[starts[:, None] + np.arange(seq_len + 1)].astype(np.int64)
    batch = torch.from_numpy(rows).to(device)
    return batch[:, :-1], batch[:, 1:]


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
        lr=cfg["learning_rate"], betas=(cfg["beta1"], cfg["beta2"]), fused=device.type == "cpu")


def train_step(model, optimizer, x, y, autocast, loss_fn, grad_clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step: forward and loss, backward, clip the global gradient norm, AdamW update.

    Returns the loss and the gradient norm before clipping (grad_clip <= 0: no clipping).
    """
    with autocast():
        loss = loss_fn(x, y)
    loss.backward()
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else float("inf"))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss, norm


@torch.no_grad()
def mean_loss(model, tokens, starts, seq_len, batch_size, device, autocast, chunk_tokens=512) -> float:
    """Mean cross-entropy (nats/token) over the given windows, in eval mode (no dropout)."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(starts), batch_size):
        x, y = get_batch(tokens, starts[i:i + batch_size], seq_len, device)
        with autocast():
            loss = model.loss(x, y, chunk_tokens)
        total += float(loss) * y.numel()
        count += y.numel()
    model.train(was_training)
    return total / max(1, count)


# ----------------------------------------------------------------------------- speed settings


def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(cfg) -> torch.dtype:
    if cfg["dtype"] == "float32":
        return torch.float32
    if cfg["dtype"] == "bfloat16" or cfg["device"] != "cpu":
        return torch.bfloat16 if cfg["dtype"] == "bfloat16" else torch.float32
    return torch.bfloat16 if cpu_has_native_bf16() else torch.float32


def keep_freed_memory() -> None:
    """Ask glibc to keep freed blocks up to 32 MB instead of returning them to the OS.

    Each step allocates and frees the same large tensors; returning them makes the
    kernel zero fresh pages every step (measured: a third of a step in system time).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD
        libc.mallopt(-1, 1 << 30)   # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass  # not glibc: only slower


def resolve_device(name: str) -> torch.device:
    available = {"cpu": True, "cuda": torch.cuda.is_available(),
                 "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()}
    if not available[name]:
        raise PipelineError(f"device '{name}' is not available on this machine", "use DEVICE=cpu (the default)")
    return torch.device(name)


# ----------------------------------------------------------------------------- memory estimate


def estimate_memory_bytes(cfg: dict, n_params: int, vocab: int) -> int:
    """Rough peak of one training step: weights, grads and AdamW moments, activations, logits."""
    B, T, d, L, H = cfg["batch_size"], cfg["max_seq_length"], cfg["d_model"], cfg["n_layers"], cfg["n_heads"]
    state = n_params * 4 * 4
    per_layer = B * T * d * (10 + 3 * cfg["mlp_ratio"]) * 4 + B * H * T * T * 4 * 2
    chunk = cfg["loss_chunk_tokens"] if 0 < cfg["loss_chunk_tokens"] < B * T else B * T
    logits = chunk * vocab * 4 * 3  # logits, softmax, their gradient
    return state + L * per_layer + logits + 200 * 2 ** 20  # + torch's own working set


def memory_limit_bytes(cfg: dict) -> tuple[int, str]:
    if cfg["max_memory_gb"] > 0:
        return int(cfg["max_memory_gb"] * 1e9), "MAX_MEMORY_GB"
    limit, what = None, "available RAM"
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                limit = int(line.split()[1]) * 1024
    except OSError:
        pass
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        used = int(Path("/proc/self/statm").read_text().split()[0]) * os.sysconf("SC_PAGE_SIZE")
        if limit is None or soft - used < limit:
            limit, what = soft - used, "the address-space limit (ulimit -v)"
    return (limit if limit is not None else 1 << 62), what


def smaller_batch_hint(cfg: dict) -> str:
    smaller = max(1, cfg["batch_size"] // 2)
    return f"try BATCH_SIZE={smaller} (or SEQ_LEN={max(8, cfg['max_seq_length'] // 2)})"


def check_memory(cfg, n_params, vocab):
    need = estimate_memory_bytes(cfg, n_params, vocab)
    limit, what = memory_limit_bytes(cfg)
    log(f"memory estimate {human_bytes(need)} per step (limit: {what}, {human_bytes(limit)})")
    if need > limit:
        raise PipelineError(
            f"Out of memory: training needs about {human_bytes(need)} at BATCH_SIZE={cfg['batch_size']}, "
            f"SEQ_LEN={cfg['max_seq_length']}, but {what} is {human_bytes(limit)}",
            smaller_batch_hint(cfg), "out-of-memory")


# ----------------------------------------------------------------------------- runs, resume, lock


def code_sha256() -> str:
    digest = hashlib.sha256()
    for path in sorted((REPO_ROOT / "model").glob("*.py")) + [Path(__file__).resolve()]:
        digest.update(path.read_bytes())
    return digest.hexdigest()


def run_identity(cfg, train_meta, val_meta, tokenizer) -> dict:
    return {
        "config": {k: v for k, v in public(cfg).items() if k not in NOT_IN_FINGERPRINT},
        "train_tokens_sha256": train_meta["file_sha256"],
        "val_tokens_sha256": val_meta["file_sha256"],
        "tokenizer_sha256": tokenizer["model_sha256"],
        "code_sha256": code_sha256(),
    }


def fingerprint(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def describe_difference(old: dict, new: dict) -> str:
    diffs = []
    for key in sorted(set(old.get("config", {})) | set(new["config"])):
        a, b = old.get("config", {}).get(key), new["config"].get(key)
        if a != b:
            diffs.append(f"{key} {a} -> {b}")
    for key in ("train_tokens_sha256", "val_tokens_sha256", "tokenizer_sha256", "code_sha256"):
        if old.get(key) != new[key]:
            diffs.append(key.replace("_sha256", "").replace("_", " ") + " changed")
    return ", ".join(diffs) or "unknown"


def acquire_lock(artifacts: Path):
    artifacts.mkdir(parents=True, exist_ok=True)
    handle = open(artifacts / ".train.lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        raise PipelineError(
            f"another training run (pid {holder}) is already using {artifacts}; this one did not touch it",
            "wait for it to finish, or stop it (Ctrl+C resumes later); to train in parallel use another ARTIFACTS_DIR",
            "interrupted-runs-and-resume") from None
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def archive_run(paths, reason: str) -> None:
    run_dir = paths["checkpoints"]
    if not run_dir.exists() or not any(run_dir.iterdir()):
        return
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest = paths["archive"] / stamp
    n = 1
    while dest.exists():
        dest, n = paths["archive"] / f"{stamp}-{n}", n + 1
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(run_dir), str(dest))
    log(f"previous run moved aside to {dest} ({reason}); nothing was deleted")


def newest_good_checkpoint(run_dir: Path):
    """last.pt, or when it is unreadable the newest epoch_NNN.pt that loads."""
    candidates = [run_dir / "last.pt"] + sorted(run_dir.glob("epoch_*.pt"), reverse=True)
    for path in candidates:
        if not path.exists():
            continue
        try:
            return path, load_checkpoint(path)
        except PipelineError as exc:
            log(f"WARNING: {exc.message}; trying an older checkpoint")
    return None, None


def ask_resume(epoch: int, position: int) -> bool:
    where = f"epoch {epoch + 1}" + (f", batch {position}" if position else "")
    while True:
        try:
            answer = input(f"An unfinished run with the same settings exists. Resume from {where}? [R]esume / [s]tart over: ")
        except EOFError:
            return True
        answer = answer.strip().lower()
        if answer in ("", "r", "resume", "y", "yes"):
            return True
        if answer in ("s", "start", "restart", "n", "no"):
            return False
        print("please answer r (resume) or s (start over)")


def choose_start(cfg, paths, identity: dict):
    """Decide between a fresh run and resuming; returns the checkpoint to resume from or None."""
    run_dir, fp = paths["checkpoints"], fingerprint(identity)
    run_file = run_dir / "run.json"
    old = json.loads(run_file.read_text()) if run_file.exists() else None
    if old and old.get("fingerprint") == fp:
        if (run_dir / "train_done.json").exists() and cfg["resume"] != "no":
            return "finished", None
        if cfg["resume"] == "no":
            archive_run(paths, "RESUME=no / --restart")
            return "fresh", None
        path, ckpt = newest_good_checkpoint(run_dir)
        if ckpt is None:
            if cfg["resume"] == "yes":
                raise PipelineError(f"RESUME=yes but {run_dir} holds no readable checkpoint of this run",
                                    "drop RESUME=yes to start over", "interrupted-runs-and-resume")
            archive_run(paths, "it had no readable checkpoint")
            return "fresh", None
        if cfg["resume"] == "auto" and sys.stdin.isatty() and not ask_resume(ckpt["epoch"], ckpt["position"]):
            archive_run(paths, "you chose to start over")
            return "fresh", None
        log(f"resuming {path} from epoch {ckpt['epoch'] + 1}, batch {ckpt['position']} (step {ckpt['step']})")
        return "resume", ckpt
    if cfg["resume"] == "yes":
        why = f"the existing run differs: {describe_difference(old['identity'], identity)}" if old else f"{run_dir} holds no run"
        raise PipelineError(f"RESUME=yes but there is nothing to resume: {why}",
                            "drop RESUME=yes to start a new run (the old one is moved aside, not deleted)",
                            "interrupted-runs-and-resume")
    if old:
        archive_run(paths, f"new settings: {describe_difference(old.get('identity', {}), identity)}")
    return "fresh", None


# ----------------------------------------------------------------------------- signals and fault hooks


class StopRequest:
    """First Ctrl+C / SIGTERM: finish the current step, save, exit. Second Ctrl+C: abort at once."""

    def __init__(self):
        self.signum = None

    def __call__(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: stopping after this step and saving (Ctrl+C again aborts at once)",
              file=sys.stderr, flush=True)


def inject_fault(step: int) -> None:
    """Deterministic fault hook for tests: FAULT_AT_STEP='N:sigint|sigterm|sigkill|oom|error|pause=FILE'."""
    spec = os.environ.get("FAULT_AT_STEP")
    if not spec:
        return
    at, action = spec.split(":", 1)
    if int(at) != step:
        return
    if action.startswith("pause="):
        # Create the marker file, then wait until the test deletes it (no sleeps in tests).
        marker = Path(action.split("=", 1)[1])
        marker.write_text(str(os.getpid()))
        while marker.exists():
            time.sleep(0.05)
    elif action in ("sigint", "sigterm", "sigkill"):
        os.kill(os.getpid(), {"sigint": signal.SIGINT, "sigterm": signal.SIGTERM, "sigkill": signal.SIGKILL}[action])
    elif action == "oom":
        raise torch.OutOfMemoryError("injected: DefaultCPUAllocator: can't allocate memory")
    elif action == "error":
        raise RuntimeError("injected fault")


# ----------------------------------------------------------------------------- samples


def sample_prompts(paths) -> dict[str, str]:
    """One English and one Spanish prompt for the progress samples.

    The Bible's opening words for the default corpus; for your own corpus the opening
    words of a validation sentence per language, as evaluate.py picks them, so a manual
    is not asked to continue "In the beginning". A language the corpus lacks keeps
    the Bible prompt, and so does a data folder that holds only the token files
    (samples only show progress; they are no reason to refuse to train).
    """
    sidecar, val_text = paths["raw"] / "corpus.json", paths["prepared"] / "val.txt"
    if not (sidecar.exists() and val_text.exists()):
        return dict(SAMPLE_PROMPTS)
    corpus = read_json(sidecar, "corpus sidecar", "run `make download`")
    if corpus["source"]["kind"] == "wheel":
        return dict(SAMPLE_PROMPTS)
    found = corpus_prompts(val_text.read_text(encoding="utf-8"), per_language=1)
    return {lang: (found[lang] or [fallback])[0] for lang, fallback in SAMPLE_PROMPTS.items()}


def generate_samples(model, sp, cfg, device, epoch: int, prompts: dict[str, str]) -> dict:
    """Continue one English and one Spanish prompt (FR-011); seeded, so runs compare."""
    samples = {}
    for lang, prompt in prompts.items():
        prompt_ids = sp.encode(prompt)
        gen = torch.Generator(device="cpu").manual_seed(cfg["seed"] + epoch)
        new = model.generate([sp.bos_id()] + prompt_ids, cfg["sample_tokens"], temperature=0.8, top_k=50,
                             generator=gen, eos_id=sp.eos_id())
        samples[lang] = sp.decode(prompt_ids + [t for t in new if t != sp.eos_id()])
    return samples


# ----------------------------------------------------------------------------- main


def main(cfg):
    import sentencepiece as spm

    log_config(cfg)
    paths = stage_paths(cfg)
    torch.set_num_threads(cfg["threads"] or os.cpu_count() or 1)
    keep_freed_memory()
    device = resolve_device(cfg["device"])
    amp_dtype = resolve_dtype(cfg)

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
    prompts = sample_prompts(paths)
    cfg["dropout"], why = resolve_dropout(cfg["dropout"], train_tokens.size)
    log(f"dropout {cfg['dropout']} ({why})")
    # The eval-mode training loss uses as many training windows as validation has, spread evenly.
    train_eval_starts = train_starts[np.linspace(0, len(train_starts) - 1, min(len(val_starts), len(train_starts))).astype(int)]

    mcfg = ModelConfig(vocab_size=tokenizer["vocab_size"], n_layers=cfg["n_layers"], d_model=cfg["d_model"],
                       n_heads=cfg["n_heads"], mlp_ratio=cfg["mlp_ratio"], dropout=cfg["dropout"], max_seq_length=T)
    torch.manual_seed(cfg["seed"])
    random.seed(cfg["seed"])
    np.random.seed(cfg["seed"] % 2 ** 32)
    model = TinyTransformer(mcfg).to(device)
    n_params = model.num_parameters()
    log(f"model: {n_params:,} parameters ({mcfg.n_layers} layers, d_model {mcfg.d_model}, {mcfg.n_heads} heads, "
        f"vocab {mcfg.vocab_size}, context {T}); device {device}, "
        f"{'bf16 autocast' if amp_dtype == torch.bfloat16 else 'float32'}, compile {'on' if cfg['compile'] else 'off'}")
    check_memory(cfg, n_params, mcfg.vocab_size)

    optimizer = make_optimizer(model, cfg, device)

    # Every epoch's windows, drawn once: the schedule needs their counts, the loop their order.
    windows_by_epoch = [epoch_windows(train_tokens.size, T, cfg["seed"], e) for e in range(cfg["epochs"])]
    steps_per_epoch = math.ceil(len(train_starts) / cfg["batch_size"])
    total_steps = sum(math.ceil(len(w) / cfg["batch_size"]) for w in windows_by_epoch)
    identity = run_identity(cfg, train_meta, val_meta, tokenizer)
    fp = fingerprint(identity)
    run_dir = paths["checkpoints"]

    lock = acquire_lock(Path(cfg["artifacts_dir"]))
    mode, ckpt = choose_start(cfg, paths, identity)
    if mode == "finished":
        log(f"this run ({run_dir}) already finished with these settings; nothing to do "
            f"(RESUME=no / --restart trains again, moving it aside)")
        lock.close()
        return
    run_dir.mkdir(parents=True, exist_ok=True)

    history: list[dict] = []
    start_epoch, position, step, best_val = 0, 0, 0, float("inf")
    running_sum, running_count = 0.0, 0
    if ckpt is not None:
        if ckpt["model_config"] != mcfg.to_dict():
            raise PipelineError(f"the checkpoint's model shape {ckpt['model_config']} differs from {mcfg.to_dict()}",
                                "use RESUME=no to start over", "checkpoint-and-tokenizer-mismatch")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        start_epoch, position, step = ckpt["epoch"], ckpt["position"], ckpt["step"]
        best_val, history = ckpt["best_val_loss"], list(ckpt["history"])
        running_sum, running_count = ckpt["running_loss_sum"], ckpt["running_loss_count"]
        random.setstate((ckpt["rng"]["python"][0], tuple(ckpt["rng"]["python"][1]), ckpt["rng"]["python"][2]))
        np_state = ckpt["rng"]["numpy"]
        np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
        torch.set_rng_state(ckpt["rng"]["torch"])
    else:
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    write_json_atomic(run_dir / "run.json", {"fingerprint": fp, "identity": identity, "config": public(cfg)})
    write_json_atomic(run_dir / "config.json", {**public(cfg), "overridden": cfg["_overridden"]})

    autocast = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype != torch.float32 else nullcontext
    loss_fn = functools.partial(model.loss, chunk_tokens=cfg["loss_chunk_tokens"])
    if cfg["compile"]:
        model.enable_compile()  # compiles lazily, at the first step (see the fallback there)

    def payload(kind: str, epoch: int, pos: int) -> dict:
        py_state = random.getstate()
        np_state = np.random.get_state()
        return {
            "kind": kind, "model": model.state_dict(), "model_config": mcfg.to_dict(), "config": public(cfg),
            "tokenizer_sha256": tokenizer["model_sha256"], "fingerprint": fp, "epoch": epoch, "step": step,
            "position": pos, "best_val_loss": best_val, "history": history,
            "optimizer": optimizer.state_dict(),
            "scheduler": {"kind": "warmup-cosine", "step": step, "total_steps": total_steps,
                          "warmup_steps": cfg["warmup_steps"], "min_lr_ratio": cfg["min_lr_ratio"]},
            "running_loss_sum": running_sum, "running_loss_count": running_count,
            "rng": {"python": [py_state[0], list(py_state[1]), py_state[2]],
                    "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
                    "torch": torch.get_rng_state()},
        }

    def model_only(kind: str, epoch: int, extra: dict) -> dict:
        return {"kind": kind, "model": model.state_dict(), "model_config": mcfg.to_dict(), "config": public(cfg),
                "tokenizer_sha256": tokenizer["model_sha256"], "fingerprint": fp, "epoch": epoch, "step": step,
                "best_val_loss": best_val, **extra}

    def resume_command() -> str:
        return "make train" if os.environ.get("MAKELEVEL") else "python " + " ".join(
            [sys.argv[0]] + [a for a in sys.argv[1:] if a not in ("--restart",)])

    stop = StopRequest()
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    log(f"training {cfg['epochs']} epochs x ~{steps_per_epoch} steps of {cfg['batch_size']} x {T} tokens "
        f"({len(train_starts) * T:,} tokens/epoch); validation {len(val_starts) * T:,} tokens")
    t_run = time.perf_counter() - (history[-1]["elapsed_s"] if history else 0.0)
    model.train()
    start_step = step
    for epoch in range(start_epoch, cfg["epochs"]):
        windows = windows_by_epoch[epoch]
        batches = [windows[i:i + cfg["batch_size"]] for i in range(0, len(windows), cfg["batch_size"])]
        t_epoch, grad_norms, trained_tokens = time.perf_counter(), [], 0
        bar = tqdm(total=len(batches), initial=position, desc=f"epoch {epoch + 1}/{cfg['epochs']}", leave=False,
                   disable=None, file=sys.stderr, dynamic_ncols=True)
        for b in range(position, len(batches)):
            if stop.signum is not None:
                bar.close()
                save_checkpoint(run_dir / "last.pt", payload("last", epoch, b))
                code = EXIT_SIGINT if stop.signum == signal.SIGINT else EXIT_SIGTERM
                print(f"saved {run_dir / 'last.pt'} at epoch {epoch + 1}, batch {b}; resume with: {resume_command()}",
                      file=sys.stderr, flush=True)
                sys.exit(code)
            lr = lr_at(step, cfg, total_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            x, y = get_batch(train_tokens, batches[b], T, device)
            x = noise_inputs(x, train_tokens, cfg["input_noise"])
            try:
                inject_fault(step)
                try:
                    loss, norm = train_step(model, optimizer, x, y, autocast, loss_fn, cfg["grad_clip"])
                except Exception as exc:
                    if not cfg["compile"] or step > start_step or isinstance(exc, torch.OutOfMemoryError):
                        raise
                    # torch.compile is an optimisation, never a reason to fail: fall back to eager.
                    log(f"torch.compile failed ({type(exc).__name__}: {str(exc).splitlines()[0][:160]}); "
                        f"continuing in eager mode")
                    model.disable_compile()
                    optimizer.zero_grad(set_to_none=True)
                    loss, norm = train_step(model, optimizer, x, y, autocast, loss_fn, cfg["grad_clip"])
            except (torch.OutOfMemoryError, RuntimeError) as exc:
                if "memory" not in str(exc).lower():
                    raise
                optimizer.zero_grad(set_to_none=True)
                bar.close()
                save_checkpoint(run_dir / "last.pt", payload("last", epoch, b))
                raise PipelineError(
                    f"Out of memory at BATCH_SIZE={cfg['batch_size']}, SEQ_LEN={T} (epoch {epoch + 1}, step {step}); "
                    f"progress saved in {run_dir / 'last.pt'}", smaller_batch_hint(cfg) + " and rerun", "out-of-memory")
            loss_value = loss.item()
            if not math.isfinite(loss_value):
                raise PipelineError(f"loss became {loss_value} at epoch {epoch + 1}, step {step} (lr {lr:.2e})",
                                    "lower LR (e.g. LR=0.0001) or GRAD_CLIP, then RESUME=no", "diverging-or-nan-loss")
            step += 1
            running_sum += loss_value
            running_count += 1
            trained_tokens += y.numel()
            grad_norms.append(float(norm))
            bar.update(1)
            bar.set_postfix(loss=f"{running_sum / running_count:.3f}", lr=f"{lr:.1e}",
                            tok_s=f"{trained_tokens / (time.perf_counter() - t_epoch):.0f}", refresh=False)
        bar.close()
        train_seconds = time.perf_counter() - t_epoch
        position = 0

        val_loss = mean_loss(model, val_tokens, val_starts, T, 64, device, autocast)
        train_eval = mean_loss(model, train_tokens, train_eval_starts, T, 64, device, autocast)
        # bits per byte: nats/token -> bits/token -> bits per byte of the UTF-8 text those tokens encode
        val_bpb = val_loss / math.log(2) * val_meta["tokens"] / val_meta["source_bytes"]
        entry = {
            "epoch": epoch + 1, "step": step, "train_loss": running_sum / max(1, running_count),
            "train_loss_eval": train_eval, "val_loss": val_loss, "val_bpb": val_bpb, "gap": val_loss - train_eval,
            "lr": lr_at(step - 1, cfg, total_steps), "grad_norm_mean": float(np.mean(grad_norms)) if grad_norms else None,
            "grad_norm_max": float(np.max(grad_norms)) if grad_norms else None,
            "tokens_per_s": trained_tokens / train_seconds if train_seconds > 0 else None,
            "seconds": time.perf_counter() - t_epoch, "elapsed_s": time.perf_counter() - t_run,
        }
        if (epoch + 1) % cfg["sample_every"] == 0 or epoch + 1 == cfg["epochs"]:
            entry["samples"] = generate_samples(model, sp, cfg, device, epoch + 1, prompts)
        history.append(entry)
        running_sum, running_count = 0.0, 0
        tps = entry["tokens_per_s"] or 0
        log(f"epoch {epoch + 1:>2}/{cfg['epochs']} | train {entry['train_loss']:.3f} (eval {train_eval:.3f}) | "
            f"val {val_loss:.3f} | bpb {val_bpb:.3f} | gap {entry['gap']:+.3f} | lr {entry['lr']:.2e} | "
            f"{tps / 1000:.1f}K tok/s | {entry['seconds']:.1f}s | elapsed {entry['elapsed_s']:.0f}s")
        for lang, text in entry.get("samples", {}).items():
            log(f"  sample [{lang}] {text!r}")

        with open(run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(entry, ensure_ascii=False) + "\n")
        if val_loss < best_val:
            best_val = val_loss
            save_checkpoint(run_dir / "best_model.pt", model_only("best", epoch + 1, {"val_loss": val_loss}))
        write_json_atomic(run_dir / "history.json", {"config": public(cfg), "fingerprint": fp, "epochs": history})
        if (epoch + 1) % cfg["checkpoint_every"] == 0:
            save_checkpoint(run_dir / f"epoch_{epoch + 1:03d}.pt", payload("epoch", epoch + 1, 0))
        save_checkpoint(run_dir / "last.pt", payload("last", epoch + 1, 0))

    final = history[-1]
    save_checkpoint(run_dir / "final_model.pt", model_only("final", cfg["epochs"], {"val_loss": final["val_loss"]}))
    summary = {"fingerprint": fp, "epochs": cfg["epochs"], "final_val_loss": final["val_loss"],
               "final_val_bpb": final["val_bpb"], "best_val_loss": best_val, "final_gap": final["gap"],
               "wall_s": final["elapsed_s"], "parameters": n_params}
    write_json_atomic(run_dir / "train_done.json", summary)  # last: make's target for this stage
    log(f"finished: val {final['val_loss']:.3f} (best {best_val:.3f}), bpb {final['val_bpb']:.3f}, "
        f"{final['elapsed_s']:.0f}s; models in {run_dir}")
    lock.close()


if __name__ == "__main__":
    config = resolve_config(build_parser(), "train", validate=validate)
    run_stage(main, config)
