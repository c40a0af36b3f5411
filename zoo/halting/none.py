"""``none``: every token runs every pass."""

from __future__ import annotations

from torch import Tensor

from zoo.halting.base import HaltingPolicy, HaltStep, PassContext
from zoo.registry import HALTING

__all__ = ["NoHalting"]


@HALTING.register("none")
class NoHalting(HaltingPolicy):
    """No halting: ``m^i = 1`` and ``s^i = 1`` for every token and pass (PonderLM, Loop).

    Example:
        >>> import zoo, torch
        >>> model = zoo.build("ponder-pythia-tiny")
        >>> model(torch.zeros(1, 8, dtype=torch.long)).depth.unique().tolist()
        [4]
    """

    def step(
        self,
        index: int,
        hidden: Tensor,
        logits: Tensor | None,
        mask: Tensor,
        state: dict[str, Tensor],
        ctx: PassContext,
    ) -> HaltStep:
        return HaltStep(mask=mask)
