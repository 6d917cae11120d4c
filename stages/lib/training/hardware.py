"""Where and how fast training runs: the device, bf16 autocast where the CPU has it, the allocator;
the memory one training step needs, checked before the first step; this machine in one dict.

The memory estimate that does not fit fails at once with the batch size to try, instead of
the kernel killing the process an hour in.
"""

from __future__ import annotations

import ctypes
import math
import os
import platform
import resource
from pathlib import Path

import torch

from lib.runtime.errors import PipelineError
from lib.runtime.stage import log
from lib.training.commands import resume_command


def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(cfg) -> torch.dtype:
    if cfg["dtype"] == "float32":
        return torch.float32
    if cfg["dtype"] == "bfloat16":
        return torch.bfloat16
    if cfg["device"] == "cuda":  # every GPU since Ampere computes bf16 natively
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    if cfg["device"] != "cpu":
        return torch.float32
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


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    available = {"cpu": True, "cuda": torch.cuda.is_available(),
                 "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()}
    if not available[name]:
        raise PipelineError(f"device '{name}' is not available on this machine", "use DEVICE=cpu (the default)")
    return torch.device(name, local_rank) if name == "cuda" else torch.device(name)


# ----------------------------------------------------------------------------- memory


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
        return int(cfg["max_memory_gb"] * 1e9), f"the limit MAX_MEMORY_GB={cfg['max_memory_gb']:g}"
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


def reference_pair(cfg: dict) -> tuple[int, float]:
    """The batch and LR a new batch's LR is reckoned from: the run's own if LR was typed; if LR was left at its
    default, the defaults' own pair (a bare BATCH_SIZE=128 trained at the default batch's LR, which is the pair it
    was really at)."""
    if cfg.get("_config") and "learning_rate" not in cfg.get("_overridden", ["learning_rate"]):
        from lib.runtime.config import load_yaml

        defaults = load_yaml(Path(cfg["_config"])).get("train", {})
        return defaults.get("batch_size", cfg["batch_size"]), defaults.get("learning_rate", cfg["learning_rate"])
    return cfg["batch_size"], cfg["learning_rate"]


def lr_for_batch(cfg: dict, batch: int) -> float:
    """The LR that goes with `batch`: 1.5x per doubling, two thirds per halving (x ** 0.585) from the reference
    pair. Under Muon only upwards: a smaller batch did best at the LR it came from (measured at 16 and 64:
    docs/experiments.md)."""
    ref_batch, ref_lr = reference_pair(cfg)
    scale = (batch / ref_batch) ** 0.585
    return ref_lr * (max(1.0, scale) if cfg.get("optimizer") == "muon" else scale)


def world_size(cfg: dict) -> int:
    """The processes that share each batch: WORLD_SIZE inside torchrun's ranks (launch_ranks passes NPROC and NNODES
    to them out of band), else NPROC x NNODES."""
    return int(os.environ.get("WORLD_SIZE", 0)) or cfg.get("nproc", 1) * cfg.get("nnodes", 1)


def smaller_batch_hint(cfg: dict, batch: int = 0) -> str:
    """The command to type for a smaller batch (half the run's unless given), with every other setting the run was
    given (CORPUS_PATH=..., MAX_MEMORY_GB=...), and the LR that goes with the batch (lr_for_batch)."""
    world = world_size(cfg)
    batch = batch or max(1, cfg["batch_size"] // 2)
    batch -= batch % world  # every process takes the same share (check_launch refuses another batch)
    if batch < world or batch >= cfg["batch_size"]:
        return (f"BATCH_SIZE={cfg['batch_size']} cannot shrink and still divide among {world} processes: train with "
                f"fewer processes (NPROC) or a smaller SEQ_LEN")
    raw = lr_for_batch(cfg, batch)
    lr = cfg["learning_rate"] if math.isclose(raw, cfg["learning_rate"]) else float(f"{raw:.2g}")
    changes = {"batch_size": batch} if lr == cfg["learning_rate"] else {"batch_size": batch, "learning_rate": lr}
    ref_batch, ref_lr = reference_pair(cfg)
    how = "up 1.5x per doubling, never down" if cfg.get("optimizer") == "muon" else "two thirds per halving"
    return f"type: {resume_command(cfg, **changes)} (the LR goes with the batch from BATCH_SIZE={ref_batch} LR={ref_lr:g}: {how})"


def fitting_hint(cfg: dict, n_params: int, vocab: int, limit: int) -> str:
    """The largest batch (a power of two) whose estimate fits, however far over the request was, and the LR advice."""
    def fits(**change) -> bool:
        return estimate_memory_bytes({**cfg, **change}, n_params, vocab) <= limit

    batch = 1 << (cfg["batch_size"].bit_length() - 1)
    while batch >= 1 and not fits(batch_size=batch):
        batch //= 2
    if batch < 1:
        return ("even BATCH_SIZE=1 does not fit: use a smaller SEQ_LEN or model (D_MODEL, N_LAYERS), or set "
                "MAX_MEMORY_GB to the memory this machine really has free")
    seq = cfg["max_seq_length"] // 2
    while seq >= 8 and not fits(max_seq_length=seq):
        seq //= 2
    keep_batch = f" (or keep the batch and use SEQ_LEN={seq})" if seq >= 8 else ""
    return f"the largest batch that fits is about BATCH_SIZE={batch}{keep_batch}; " + smaller_batch_hint(cfg, batch)


def check_memory(cfg, n_params, vocab):
    need = estimate_memory_bytes(cfg, n_params, vocab)
    limit, what = memory_limit_bytes(cfg)
    log(f"memory estimate {need / 1e9:.2f} GB per step (limit: {what}, {limit / 1e9:.2f} GB)")
    if need > limit:
        raise PipelineError(  # one unit, GB, like MAX_MEMORY_GB itself
            f"Out of memory: training needs about {need / 1e9:.2f} GB at BATCH_SIZE={cfg['batch_size']}, "
            f"SEQ_LEN={cfg['max_seq_length']}, but {what} is {limit / 1e9:.2f} GB",
            fitting_hint(cfg, n_params, vocab, limit), "out-of-memory")


# ----------------------------------------------------------------------------- this machine


def machine() -> dict:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else \
        platform.processor()
    return {"cpu": model, "cores": os.cpu_count(), "native_bf16": cpu_has_native_bf16(), "torch": torch.__version__,
            "python": platform.python_version()}
