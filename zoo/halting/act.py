"""``act``: Adaptive Computation Time over the passes, with a halting-weighted output."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from zoo.config import ModelConfig
from zoo.halting.base import HaltingPolicy, HaltStep, PassContext
from zoo.registry import HALTING

__all__ = ["ACT"]


@HALTING.register("act")
class ACT(HaltingPolicy):
    """Adaptive Computation Time (Graves, arXiv 1603.08983) applied to the passes.

    Each pondering pass ``i < P - 1`` has its own halting unit reading the pass's
    final-norm hidden state; probabilities accumulate until they reach ``1 - epsilon``::

        h^i = sigmoid(w_i . H^i + b_i)
        N   = the first pass n with h^0 + ... + h^n >= 1 - epsilon   (N = P - 1 at the latest)
        R   = 1 - (h^0 + ... + h^{N-1})                             the remainder, > epsilon
        p^i = h^i for i < N,  p^N = R,  p^i = 0 after               so sum_i p^i = 1
        output = Head(sum_i p^i H^i)                                 (mixes_outputs)
        aux    = tau * mean over tokens of (depth + R)               the ponder cost

    A token runs passes ``0..N`` (its depth is ``N + 1``); the last pass has no unit, since
    every token still running gets the remainder there. ``step`` returns ``p^i`` as the
    ``weight`` and :meth:`finish` the last pass's. The gate is 1 (the pondering update is
    not scaled; the probabilities weight the outputs instead). ``depth`` is a step function
    with no gradient, so the ponder cost trains the units through ``R`` alone, as in ACT.

    Per-token state (dicts of (B, T) float32): ``cumulative``, the sum of the halting
    probabilities of the passes run so far (frozen once the token halts), and
    ``remainder``, ``R`` of tokens that have halted.

    Args:
        config: the model config (``dim``, ``passes``, initialisation ``std``).
        epsilon: halting slack, in ``(0, 1)`` (Graves: 0.01); it also lets a token halt
            after one pass.
        tau: weight of the ponder cost (``>= 0``).
        bias_init: initial bias of every halting unit. The default -3.0 starts the
            probabilities near ``sigmoid(-3) = 0.047``: every token runs every pass and the
            final pass carries most of the output weight, close to the PonderLM backbone
            the policy is put on; the ponder cost then teaches the units to halt earlier.

    Raises:
        ValueError: a keyword outside its valid range.

    Example:
        >>> import zoo, torch
        >>> model = zoo.build("ponder-pythia-tiny", halting="act", halting_kwargs={"tau": 0.01})
        >>> out = model(torch.randint(0, 512, (2, 8)), execution="dense")
        >>> out.depth.unique().tolist()  # at initialisation every token runs every pass
        [4]
        >>> bool(out.aux_loss > 0)  # tau * (4 + R)
        True
    """

    mixes_outputs = True

    def __init__(
        self, config: ModelConfig, epsilon: float = 0.01, tau: float = 0.01, bias_init: float = -3.0
    ) -> None:
        super().__init__(config)
        if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not 0.0 < epsilon < 1.0:
            raise ValueError(f"act: epsilon must be a number in (0, 1), got {epsilon!r}")
        if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0.0 <= tau < math.inf:
            raise ValueError(f"act: tau (the ponder cost weight) must be a finite number >= 0, got {tau!r}")
        if (
            isinstance(bias_init, bool)
            or not isinstance(bias_init, (int, float))
            or not math.isfinite(bias_init)
        ):
            raise ValueError(f"act: bias_init must be a finite number, got {bias_init!r}")
        self.epsilon = float(epsilon)
        self.tau = float(tau)
        self.bias_init = float(bias_init)
        self.std = config.std
        self.units = nn.ModuleList(nn.Linear(config.dim, 1) for _ in range(max(config.passes - 1, 0)))

    def init_state(self, mask: Tensor) -> dict[str, Tensor]:
        zeros = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
        return {"cumulative": zeros, "remainder": zeros.clone()}

    def step(
        self,
        index: int,
        hidden: Tensor,
        logits: Tensor | None,
        mask: Tensor,
        state: dict[str, Tensor],
        ctx: PassContext,
    ) -> HaltStep:
        prob = torch.sigmoid(self.units[index](hidden).squeeze(-1).float())  # h^i, (B, T)
        before = state["cumulative"]
        total = before + prob
        halts = total >= 1.0 - self.epsilon
        remainder = 1.0 - before
        state = {
            "cumulative": torch.where(halts, before, total),  # frozen once the token halts
            "remainder": torch.where(halts, remainder, state["remainder"]),
        }
        return HaltStep(mask=~halts, weight=torch.where(halts, remainder, prob), state=state)

    def finish(
        self, gates: Tensor, masks: Tensor, state: dict[str, Tensor], ctx: PassContext
    ) -> tuple[Tensor | None, Tensor]:
        rest = 1.0 - state["cumulative"]  # the last pass's weight (the driver zeroes it for halted tokens)
        remainder = torch.where(masks[-1], rest, state["remainder"])
        ran = masks[0]  # tokens computed at all (decoding leaves finished rows out)
        cost = torch.where(ran, masks.sum(0).to(remainder.dtype) + remainder, torch.zeros_like(remainder))
        return rest, self.tau * cost.sum() / ran.sum().clamp(min=1)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Truncated-normal unit weights (std ``sqrt(2 / (5 d))``), bias ``bias_init``."""
        for unit in self.units:
            nn.init.trunc_normal_(unit.weight, std=self.std, a=-2 * self.std, b=2 * self.std)
            nn.init.constant_(unit.bias, self.bias_init)
