"""Several processes training one model: PyTorch's DistributedDataParallel, launched by torchrun.

    make train NPROC=2                       # torchrun --standalone --nproc_per_node=2 stages/train.py ...
    make train NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 NPROC=4   # on each machine

train.py started with --nproc/--nnodes above 1 runs torchrun (lib/training/launch.py), which
starts one train.py per process with RANK, WORLD_SIZE, ... in its environment; those join
one process group here (gloo on the CPU, nccl on CUDA).
Every rank walks the same shuffled windows and takes its own slice of each global
batch; DDP averages the gradients, so a step equals the one-process step on the whole
batch. Figures (losses, validation) are summed over the ranks; rank 0 alone writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist


@dataclass
class World:
    """This process's place among the training processes (one process: rank 0 of 1)."""
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1
    backend: str = "none"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def sum(self, values: list[float], device) -> list[float]:
        """Each value summed over all ranks (float64; one all-reduce)."""
        if not self.distributed:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def gather(self, obj) -> list:
        """obj from every rank, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        gathered = [None] * self.size
        dist.all_gather_object(gathered, obj)
        return gathered

    def broadcast(self, obj):
        """Rank 0's obj on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def share(self, windows: np.ndarray) -> tuple[np.ndarray, float]:
        """This rank's contiguous slice of a global batch, and its loss weight.

        DDP averages the ranks' gradients, each the gradient of a mean over its slice; a
        weight of (slice size x ranks / batch size) turns that average into the gradient
        of the mean over the whole batch, also when the last batch of an epoch does not
        divide evenly. A rank left without a window computes one with weight 0: every
        rank must take part in each gradient exchange.
        """
        if not self.distributed:
            return windows, 1.0
        mine = np.array_split(windows, self.size)[self.rank]
        if len(mine) == 0:
            return windows[:1], 0.0
        return mine, len(mine) * self.size / len(windows)

    def close(self) -> None:
        """Leave the process group together: a rank that tears its connections down while
        another still uses them makes that one abort."""
        if self.distributed and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def data_parallel(loss_module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel around a module whose forward is the training loss (the model's own forward
    returns logits). It starts by broadcasting rank 0's weights, which a resume has already loaded."""
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(loss_module, device_ids=[device.index] if device.type == "cuda" else None,
                                   broadcast_buffers=False, gradient_as_bucket_view=True)


def lost_peer(exc: BaseException) -> bool:
    """Whether a collective failed because another rank went away (died, or stopped on its own error)."""
    text = str(exc)
    return isinstance(exc, dist.DistError) or any(mark in text for mark in (
        "Connection closed by peer", "Connection reset by peer", "Broken pipe", "gloo", "NCCL", "Socket Timeout"))


def join(device_name: str) -> World:
    """Join the process group torchrun set up (nothing to join for one process)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if device_name == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    # A rank that dies makes the others fail at their next exchange; the timeout only
    # matters for a rank that hangs without dying.
    dist.init_process_group(backend, timeout=timedelta(minutes=10))
    return World(rank=rank, size=size, local_rank=local_rank,
                 local_size=int(os.environ.get("LOCAL_WORLD_SIZE", "1")), backend=backend)
