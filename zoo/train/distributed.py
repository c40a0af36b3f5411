"""Many processes: joining ``torchrun``'s process group, splitting the batch, wrapping the model."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from zoo.model import RecurrentLM
from zoo.train.config import TrainConfig

__all__ = ["Distributed", "init_distributed", "per_process_micro_batch"]


@dataclass(frozen=True)
class Distributed:
    """This process's place in a (possibly single-process) run.

    Attributes:
        rank: global rank.
        world_size: processes in the run.
        local_rank: rank on this machine (picks the GPU).
        device: where this process computes.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """Rank 0, the process that writes files and prints."""
        return self.rank == 0


def init_distributed(device: str = "auto") -> Distributed:
    """Joins the process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1).

    NCCL on CUDA, gloo on CPU. A single process gets a :class:`Distributed` of world size 1
    and no process group.

    Args:
        device: ``"auto"`` (CUDA if available), ``"cpu"`` or ``"cuda"``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but no CUDA device is visible; use device='cpu'")
    dev = torch.device("cuda", local) if device == "cuda" else torch.device("cpu")
    if device == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")
    return Distributed(rank, world, local, dev)


def per_process_micro_batch(
    batch_size: int, world_size: int, micro_batch_size: int | None = None, *, limit: int | None = None
) -> int:
    """Sequences per forward pass on one process of ``world_size``.

    Given, it is checked; otherwise it follows from the batch and the processes: the largest
    divisor of ``batch_size / world_size`` that is at most ``limit`` (a memory bound, e.g. a
    model size's setting), so ``torchrun --nproc_per_node N`` runs a recipe's defaults for
    any ``N`` that divides the batch.

    Raises:
        ValueError: ``batch_size`` is not a multiple of ``world_size`` x the given micro-batch,
            or (none given) of ``world_size``; the message says what to change.

    Example:
        >>> per_process_micro_batch(16, 2, limit=16), per_process_micro_batch(1024, 8, limit=12)
        (8, 8)
    """
    if micro_batch_size is not None:
        if micro_batch_size < 1 or batch_size % (world_size * micro_batch_size):
            raise ValueError(
                f"batch_size {batch_size} must be a multiple of processes x micro_batch_size = "
                f"{world_size} x {micro_batch_size}; change batch_size or micro_batch_size, or leave "
                f"micro_batch_size unset to derive it"
            )
        return micro_batch_size
    if batch_size % world_size:
        raise ValueError(
            f"batch_size {batch_size} does not split over {world_size} processes; choose a batch size "
            f"that is a multiple of {world_size} or another number of processes"
        )
    share = batch_size // world_size
    limit = share if limit is None else max(1, min(limit, share))
    return max(d for d in range(1, limit + 1) if share % d == 0)


def _micro_rows(rank: int, accum: int, micro: int) -> Iterator[slice]:
    """The rows of the global batch this process runs, one slice per micro-step."""
    for j in range(accum):
        first = (rank * accum + j) * micro
        yield slice(first, first + micro)


def _wrap(model: RecurrentLM, ctx: Distributed, config: TrainConfig) -> tuple[nn.Module, bool]:
    """DDP or FSDP2 around ``model`` when several processes run; returns (module, sharded)."""
    if ctx.world_size == 1:
        return model, False
    fsdp = config.fsdp
    if fsdp is None:
        fsdp = ctx.device.type == "cuda" and model.num_parameters() >= 1_000_000_000
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in model.layers:
            fully_shard(layer)
        fully_shard(model)
        return model, True
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids), False


def _barrier(ctx: Distributed) -> None:
    if ctx.world_size > 1:
        dist.barrier()


def _any_rank(flag: bool, ctx: Distributed) -> bool:
    if ctx.world_size == 1:
        return flag
    value = torch.tensor([float(flag)], device=ctx.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())
