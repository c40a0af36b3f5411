"""Running a halting policy on hand-made tensors, with the driver's bookkeeping and no model.

Shape legend: B batch, T time, d width, V vocabulary, P passes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from zoo.halting.base import HaltingPolicy, PassContext, next_token_targets
from zoo.layout import Grid
from zoo.recurrence import finish_policy, step_policy

__all__ = ["PolicyRun", "run_policy"]


@dataclass
class PolicyRun:
    """What :func:`run_policy` saw.

    Attributes:
        masks: (P, B, T) bool, ``m^0 .. m^{P-1}``.
        gates: (P - 1, B, T) gate values (1 where a token did not run the pass).
        weights: (P, B, T) output weights of the passes for a policy that mixes outputs
            (ACT), else ``None``.
        aux_loss: the steps' and ``finish``'s auxiliary losses, summed.
        state: the policy's final per-token state.
    """

    masks: Tensor
    gates: Tensor
    weights: Tensor | None
    aux_loss: Tensor
    state: dict[str, Tensor]


def run_policy(
    policy: HaltingPolicy,
    hidden: Sequence[Tensor],
    logits: Sequence[Tensor] | None = None,
    *,
    mask: Tensor | None = None,
    positions: Tensor | None = None,
    input_ids: Tensor | None = None,
    step: Tensor | None = None,
) -> PolicyRun:
    """Runs ``policy``'s decisions over given per-pass hidden states, as the pass loop does.

    Each pondering pass ``i < P - 1`` hands ``hidden[i]`` (and ``logits[i]``) to
    ``policy.step`` with the mask and state so far; the answer goes through the driver's
    own bookkeeping (:func:`zoo.recurrence.step_policy`): masks ANDed, state kept for
    tokens that did not run, missing gates filled. Then ``policy.finish``. Use it to check
    a decision rule against a hand computation.

    Args:
        policy: the policy (``policy.passes`` passes).
        hidden: P - 1 tensors (B, T, d), the final-norm hidden state of each pondering pass.
        logits: P - 1 tensors (B, T, V), or ``None`` for a policy that does not read them.
        mask: ``m^0`` (B, T) bool; default every token.
        positions: (B, T) token positions; default ``0..T-1`` in every row.
        input_ids: (B, T) ids for policies with a per-pass loss; default none.
        step: training step (0-d tensor) for schedules; default none (final values).

    Example:
        >>> import torch, zoo
        >>> from zoo.registry import HALTING
        >>> from zoo.testing import run_policy
        >>> policy = HALTING.get("fixed_prune")(zoo.preset("ponder-pythia-tiny", passes=3), ratio=0.5)
        >>> run = run_policy(policy, [torch.zeros(1, 6, 64)] * 2)
        >>> run.masks.shape, bool((run.masks[1:] <= run.masks[:-1]).all())
        (torch.Size([3, 1, 6]), True)
    """
    P = policy.passes
    if len(hidden) != P - 1:
        raise ValueError(f"run_policy needs one hidden state per pondering pass: {P - 1}, got {len(hidden)}")
    if logits is not None and len(logits) != P - 1:
        raise ValueError(f"run_policy needs one logits tensor per pondering pass: {P - 1}, got {len(logits)}")
    B, T = hidden[0].shape[:2] if hidden else (mask.shape if mask is not None else (1, 1))
    device = hidden[0].device if hidden else None
    mask = torch.ones(B, T, dtype=torch.bool, device=device) if mask is None else mask
    positions = torch.arange(T, device=mask.device).expand(B, T) if positions is None else positions
    targets = None if input_ids is None else next_token_targets(input_ids)
    ctx = PassContext(positions, input_ids, step, P, targets)
    dtype = hidden[0].dtype if hidden else torch.float32
    grid = Grid(0, T)
    state = {key: value.clone() for key, value in policy.init_state(mask).items()}
    masks, gates, weights, aux = [mask], [], [], torch.zeros((), device=mask.device)
    for i in range(P - 1):
        decision = step_policy(
            policy, i, hidden[i], None if logits is None else logits[i], mask, state, ctx, grid, mask, dtype
        )
        mask = decision.mask
        masks.append(mask)
        gates.append(decision.gate)
        weights.append(decision.weight)
        if decision.aux_loss is not None:
            aux = aux + decision.aux_loss
    gate_stack = torch.stack(gates) if gates else torch.zeros(0, B, T, dtype=dtype, device=mask.device)
    mask_stack = torch.stack(masks)
    final, final_aux = finish_policy(policy, gate_stack, mask_stack, state, ctx)
    if final_aux is not None:
        aux = aux + final_aux
    mixed = None
    if final is not None and all(w is not None for w in weights):
        mixed = torch.stack([*weights, final])
    return PolicyRun(mask_stack, gate_stack, mixed, aux, state)
