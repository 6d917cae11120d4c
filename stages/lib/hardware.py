"""Where and how fast training runs: the device, bf16 autocast where the CPU has it, the allocator."""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from lib.errors import PipelineError


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
