"""Training across processes and machines with the standard launcher (`torchrun`), without DDP's wrapper.

CoRSA needs the SFT and DPO gradients of the *whole* batch, separately, before PCGrad and before the SAM
perturbation; DDP's wrapper would all-reduce one summed gradient inside backward. So each process computes its
shard of the batch with the full batch's normalisers (the sums are then exactly the full-batch means) and the two
gradients are all-reduced by hand: N processes with the same global batch give the same adapter as one.

Every process holds the whole model, draws the same seeded batches, and computes what is cheap to repeat
(old-answer mining, reference log-probs) itself; only training steps are split. Process 0 writes the outputs.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


def launched() -> bool:
    """Started by torchrun (or any launcher that sets the standard variables) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup() -> None:
    """Join the process group torchrun describes: NCCL on GPUs, gloo on CPUs. Does nothing in one process."""
    if not launched() or dist.is_initialized():
        return
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def shard(items: list[Any]) -> list[Any]:
    """This process's share of a batch (strided, so shards differ in size by at most one)."""
    return items[rank()::world_size()]


def all_reduce_sum(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Sum the tensors over all processes, in one flat all-reduce; a no-op in one process."""
    if not active() or not tensors:
        return tensors
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    return [x.view_as(t) for x, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


def all_reduce_stats(stats: dict[str, float], device: torch.device) -> dict[str, float]:
    if not active():
        return stats
    keys = sorted(stats)
    (values,) = all_reduce_sum([torch.tensor([stats[k] for k in keys], dtype=torch.float64, device=device)])
    return dict(zip(keys, values.tolist()))


def merge_dicts(local: dict[Any, Any]) -> dict[Any, Any]:
    """The union of every process's dict (each holds the entries of its shard)."""
    if not active():
        return local
    parts: list[Any] = [None] * world_size()
    dist.all_gather_object(parts, local)
    return {k: v for part in parts for k, v in part.items()}


def barrier() -> None:
    if active():
        dist.barrier()
