"""The halting-policy interface.

A policy is a pure step function over one pass (flax's sampler keeps a ``done`` mask the
same way): given the pass index, the pass's final-norm hidden states and logits, the
current mask and the policy's own per-token state, it says which tokens go on, and
optionally a gate value, an auxiliary loss, an output weight and its new state. The
driver (:func:`zoo.recurrence.run_passes`) owns the loop and the bookkeeping:

* it ANDs the returned mask with the incoming one, ``m^{i+1} = m^i & mask``, so masks are
  monotone whatever a policy returns (a halted token never resumes);
* it keeps the state of tokens that did not run the pass, and gives them gate 1 and
  output weight 0, whatever a policy returns for them;
* it fills what a policy leaves out: no gate is a gate of ones, no auxiliary loss is zero.

So ``HaltStep(mask=keep)`` is a complete answer.

Shapes: B batch, T time (or, in sparse execution and decoding, any selection of tokens
laid out as (B', N)), d width, V vocabulary.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from zoo.config import ModelConfig

__all__ = ["HaltingPolicy", "HaltStep", "PassContext", "IGNORE", "next_token_targets", "token_nll"]

IGNORE = -100  # a target that is not there (cross-entropy's ignore_index)


def next_token_targets(input_ids: Tensor) -> Tensor:
    """(B, T) the next token of each token of ``input_ids`` (B, T), :data:`IGNORE` for the last."""
    return torch.nn.functional.pad(input_ids[:, 1:], (0, 1), value=IGNORE)


def token_nll(logits: Tensor, targets: Tensor) -> Tensor:
    """(B, T) float32 cross-entropy of each token's logits (B, T, V) against its target (B, T);
    0 where the target is :data:`IGNORE` (the per-token losses policies train or rank by)."""
    nll = torch.nn.functional.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="none"
    )
    return nll.view(targets.shape)


@dataclass
class PassContext:
    """What a policy may read besides the pass's tensors.

    Attributes:
        positions: (B, T) integer positions of the tokens in their sequences.
        input_ids: (B, T) token ids, whose shift gives next-token targets; ``None`` in decoding.
        step: training step as a 0-d tensor (schedules read it without recompiling), or
            ``None`` outside training: schedules then sit at their final value.
        passes: total passes ``P``.
        targets: (B, T) the next token of each of the pass's tokens, on the pass's layout
            like ``positions`` (so also in sparse execution), ``IGNORE`` (-100) where it is
            not in the input (the last token of a chunk); ``None`` where the driver has no
            ids. Per-token losses that need targets (``mlp_gate``'s NLL-ranked halting) read
            these.
    """

    positions: Tensor
    input_ids: Tensor | None
    step: Tensor | None
    passes: int
    targets: Tensor | None = None


@dataclass
class HaltStep:
    """A policy's decision after pondering pass ``i``; only ``mask`` is required.

    Attributes:
        mask: (B, T) bool, True for tokens that may run pass ``i + 1``. The driver ANDs it
            with the incoming mask: ``m^{i+1} = m^i & mask``.
        gate: ``s^i`` (B, T), scales the pondering update ``E += m * s * e``. ``None`` (the
            default) is a gate of ones; tokens that did not run the pass get 1 either way.
        aux_loss: scalar added to the training loss; ``None`` (the default) is zero.
        weight: for policies that mix the passes' outputs (ACT): (B, T) weight of pass
            ``i``'s output in the final mix (0 for tokens that did not run the pass).
        state: the policy's per-token state for the next call (dict of tensors whose first
            dimensions are the tokens'); ``None`` keeps the state as it was. The driver
            keeps the entries of tokens that did not run the pass.

    Example:
        >>> import torch
        >>> from zoo.halting.base import HaltStep
        >>> step = HaltStep(mask=torch.tensor([[True, False]]))
        >>> step.gate is None and step.aux_loss is None   # ones and zero, filled by the driver
        True
    """

    mask: Tensor
    gate: Tensor | None = None
    aux_loss: Tensor | None = None
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

        It is called on every token the driver computed (in dense execution, halted tokens
        too); the driver only takes the answer of the tokens in ``mask``.

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
            gates: (P - 1, B, T) gate values of every pondering pass (1 where the token did
                not run the pass).
            masks: (P, B, T) bool, ``m^0 .. m^{P-1}``.
            state: the policy's final state.
            ctx: as in :meth:`step`.

        Returns:
            (weight, aux_loss): the last pass's output weight (the driver zeroes it for
            tokens that did not run the last pass), ``None`` unless the policy mixes
            outputs; the auxiliary loss, ``None`` for zero. The default returns both ``None``.
        """
        return None, None

    def reset_parameters(self) -> None:
        """Initialises the policy's own parameters (gates); the default has none."""
