"""The halting-policy interface.

A policy is a pure step function over one pass (flax's sampler keeps a ``done`` mask the
same way): given the pass index, the pass's final-norm hidden states and logits, the
current mask and the policy's own per-token state, it returns the gate values, the next
mask and an auxiliary loss. The driver (:mod:`zoo.recurrence`) owns the loop.

Shapes: B batch, T time (or, in sparse execution, any selection of tokens laid out as
(B', N)), d width, V vocabulary.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from zoo.config import ModelConfig

__all__ = ["HaltingPolicy", "HaltStep", "PassContext"]


@dataclass
class PassContext:
    """What a policy may read besides the pass's tensors.

    Attributes:
        positions: (B, T) integer positions of the tokens in their sequences.
        input_ids: (B, T) token ids, whose shift gives next-token targets; ``None`` in decoding.
        step: training step as a 0-d tensor (schedules read it without recompiling), or
            ``None`` outside training: schedules then sit at their final value.
        passes: total passes ``P``.
    """

    positions: Tensor
    input_ids: Tensor | None
    step: Tensor | None
    passes: int


@dataclass
class HaltStep:
    """A policy's decision at pondering pass ``i``.

    Attributes:
        gate: ``s^i`` (B, T), scales the pondering update ``E += m * s * e`` (ones where the
            policy has no gate value).
        mask: ``m^{i+1}`` (B, T) bool, True for tokens that run pass ``i + 1``. Must imply
            the incoming mask (monotone).
        aux_loss: scalar added to the training loss (zero for most policies).
        weight: ACT only: (B, T) weight of pass ``i``'s output in the final mix.
        state: the policy's per-token state for the next call (dict of (B, T) tensors).
    """

    gate: Tensor
    mask: Tensor
    aux_loss: Tensor
    weight: Tensor | None = None
    state: dict[str, Tensor] | None = None


class HaltingPolicy(nn.Module, ABC):
    """Base of every halting policy; subclasses register with ``@HALTING.register(name)``.

    Class attributes:
        mixes_outputs: the model output is the ``weight``-weighted mix of the passes' outputs
            (ACT) rather than each token's last active pass.
        uses_logits: :meth:`step` reads the logits (so the head runs at every pass even when
            the recurrence would not need it).

    Args:
        config: the model config (``passes`` tells how many decisions there are).
    """

    mixes_outputs: ClassVar[bool] = False
    uses_logits: ClassVar[bool] = False

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.passes = config.passes

    def init_state(self, mask: Tensor) -> dict[str, Tensor]:
        """Per-token state before pass 0; ``mask`` is the all-True (B, T) mask. Default: none."""
        return {}

    @abstractmethod
    def step(
        self,
        index: int,
        hidden: Tensor,
        logits: Tensor | None,
        mask: Tensor,
        state: dict[str, Tensor],
        ctx: PassContext,
    ) -> HaltStep:
        """Decides after pass ``index`` (< P - 1) which tokens run pass ``index + 1``.

        Args:
            index: the pass just run, ``0 <= index < P - 1``.
            hidden: (B, T, d) final-norm hidden states of that pass.
            logits: (B, T, V) logits of that pass (``None`` unless the recurrence or
                ``uses_logits`` needs them).
            mask: ``m^index`` (B, T) bool, tokens that ran this pass.
            state: this policy's per-token state.
            ctx: positions, ids, training step.
        """

    def finish(
        self, gates: Tensor, masks: Tensor, state: dict[str, Tensor], ctx: PassContext
    ) -> tuple[Tensor | None, Tensor]:
        """After the last pass: the last pass's output weight (ACT) and a pooled auxiliary loss.

        Args:
            gates: (P - 1, B, T) gate values of every pondering pass.
            masks: (P, B, T) bool, ``m^0 .. m^{P-1}``.
            state: the policy's final state.
            ctx: as in :meth:`step`.
        """
        return None, gates.new_zeros(())

    def reset_parameters(self) -> None:
        """Initialises the policy's own parameters (gates); the default has none."""


def zero(like: Tensor) -> Tensor:
    """A 0-d zero on ``like``'s device and dtype."""
    return torch.zeros((), device=like.device, dtype=like.dtype)
