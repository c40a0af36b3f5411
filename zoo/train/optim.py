"""Optimizer and schedules: AdamW groups, the cosine learning rate, the gates' stages, the loss."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.train.config import TrainConfig

__all__ = ["lr_at", "gate_schedule", "two_stage", "make_optimizer", "lm_loss"]


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based).

    Linear warm-up to ``lr`` over ``warmup_steps`` (step ``i`` gets ``lr * (i + 1) /
    warmup_steps``), then a cosine from ``lr`` down to ``min_lr_ratio * lr`` at the last step.

    Example:
        >>> cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=10)
        >>> [round(lr_at(s, cfg), 3) for s in (0, 9, 10, 99)]
        [0.1, 1.0, 1.0, 0.1]
    """
    peak, floor = config.lr, config.lr * config.min_lr_ratio
    if step < config.warmup_steps:
        return peak * (step + 1) / config.warmup_steps
    span = max(config.steps - 1 - config.warmup_steps, 1)
    progress = min((step - config.warmup_steps) / span, 1.0)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def gate_schedule(steps: int, stage1: float, ramp: float) -> dict[str, int]:
    """The AdaPonder two-stage schedule of the gates' loss, as ``mlp_gate`` keyword arguments.

    Cross-entropy alone for the first ``stage1`` share of ``steps`` (``warmup_steps``), then
    the bottom-k halting loss, its fraction rising to ``k_max`` over the next ``ramp``
    share (``ramp_steps``). Merge it into ``halting_kwargs``.

    Example:
        >>> gate_schedule(500, 0.3, 0.3)
        {'warmup_steps': 150, 'ramp_steps': 150}
    """
    return {"warmup_steps": round(stage1 * steps), "ramp_steps": round(ramp * steps)}


def two_stage(stage: int, gate_steps: int) -> dict[str, Any]:
    """The :class:`TrainConfig` fields of stage 1 (the gates alone) or 2 (everything) of a staged run.

    Stage 1 trains the halting policy's parameters (``halting.*``) with the backbone frozen;
    stage 2 trains every parameter, and the model's schedules (the gates' warm-up and ramp)
    run on from where stage 1's ``gate_steps`` left them (``step_offset``).

    Example:
        >>> two_stage(1, 50), two_stage(2, 50)
        ({'train_only': ('halting.',), 'step_offset': 0}, {'train_only': (), 'step_offset': 50})
    """
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 (the gates alone) or 2 (everything), got {stage!r}")
    return {"train_only": ("halting.",) if stage == 1 else (), "step_offset": 0 if stage == 1 else gate_steps}


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, weight decay on matrices (2-D and up) only.

    The halting policy's parameters (``halting.*``) get groups of their own, with
    ``halting_lr_scale`` (stored as each group's ``lr_scale``, which :func:`train` applies
    to the scheduled rate) and ``halting_weight_decay``.

    Raises:
        ValueError: ``train_only`` matches no parameter.
    """
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups.setdefault((name.startswith("halting."), param.dim() >= 2), []).append(param)
    if not groups:
        raise ValueError(f"no trainable parameters (train_only={config.train_only!r} matches none)")
    halting_decay = config.weight_decay if config.halting_weight_decay is None else config.halting_weight_decay
    param_groups = []
    for (halting, matrix), params in sorted(groups.items(), key=lambda kv: (kv[0][0], not kv[0][1])):
        decay = (halting_decay if halting else config.weight_decay) if matrix else 0.0
        scale = config.halting_lr_scale if halting else 1.0
        param_groups.append({"params": params, "weight_decay": decay, "lr_scale": scale})
    return torch.optim.AdamW(param_groups, lr=config.lr, betas=config.betas, eps=config.eps)


def lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean next-token cross-entropy (computed in fp32) of ``logits`` (B, T, V) against ``targets`` (B, T)."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def _freeze(model: nn.Module, train_only: tuple[str, ...]) -> None:
    if not train_only:
        return
    names = [n for n, _ in model.named_parameters()]
    if not any(n.startswith(train_only) for n in names):
        raise ValueError(f"train_only={train_only!r} matches no parameter; names start with e.g. {names[:3]}")
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith(train_only))


def _clip(model: nn.Module, max_norm: float) -> float:
    params = [p for p in model.parameters() if p.grad is not None]
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    from torch.distributed.tensor import DTensor

    if isinstance(norm, DTensor):  # parameters sharded by FSDP: the norm is sharded too
        norm = norm.full_tensor()
    return float(norm)
