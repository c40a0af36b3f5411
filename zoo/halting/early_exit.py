"""``early_exit``: CALM-style confidence-based exit from the passes."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from zoo.config import ModelConfig
from zoo.halting.base import IGNORE, HaltingPolicy, HaltStep, PassContext, token_nll
from zoo.registry import HALTING

__all__ = ["EarlyExit", "MEASURES", "confidence"]

MEASURES = ("max_prob", "margin", "entropy")

# The default threshold of each measure (probabilities for the first two, nats for entropy).
_DEFAULT_THRESHOLD = {"max_prob": 0.9, "margin": 0.5, "entropy": 0.5}


@HALTING.register("early_exit")
class EarlyExit(HaltingPolicy):
    """Confident early exit (CALM, Schuster et al., arXiv 2207.07061) over the passes.

    After pondering pass ``i``, with ``p = softmax(Z^i)`` the token's next-token
    distribution at that pass, a token halts when it is confident enough::

        max_prob:  max_v p_v              >= threshold
        margin:    p_(1) - p_(2)          >= threshold    (top-1 minus top-2 probability)
        entropy:   -sum_v p_v log p_v     <= threshold    (nats)
        m^{i+1} = m^i & ~confident,   s^i = 1

    The decision reads only the token's own logits (causal, per token). It has no
    parameters and no gradient; to make intermediate passes worth exiting at, set
    ``aux_weight`` for CALM's per-pass training signal: the cross-entropy of each pondering
    pass's logits against the next-token targets (``ctx.targets``: the next id of each
    token, on the pass's layout; a chunk's last token has none), averaged over the tokens
    that ran the pass, then over the ``P - 1`` pondering passes::

        aux = aux_weight * mean_i CE(Z^i, targets | tokens that ran pass i and have a target)

    The targets follow the layout, so dense and sparse execution give the same term.

    Args:
        config: the model config.
        threshold: the exit threshold; ``None`` uses the measure's default (0.9 for
            ``max_prob``, 0.5 for ``margin``, 0.5 nats for ``entropy``).
        measure: ``"max_prob"``, ``"margin"`` or ``"entropy"``.
        aux_weight: weight of the per-pass auxiliary cross-entropy (0 turns it off).

    Raises:
        ValueError: unknown measure, a threshold outside the measure's range, or a negative
            ``aux_weight``.

    Example:
        >>> import zoo, torch
        >>> model = zoo.build("ponder-pythia-tiny", halting="early_exit", cache="kv_reuse",
        ...                   halting_kwargs={"measure": "entropy", "threshold": 7.0})
        >>> model(torch.zeros(1, 8, dtype=torch.long), execution="dense").depth.tolist()
        [[1, 1, 1, 1, 1, 1, 1, 1]]
    """

    uses_logits = True

    def __init__(
        self,
        config: ModelConfig,
        threshold: float | None = None,
        measure: str = "max_prob",
        aux_weight: float = 0.0,
    ) -> None:
        super().__init__(config)
        if measure not in MEASURES:
            raise ValueError(f"early_exit: measure must be one of {MEASURES}, got {measure!r}")
        if measure == "margin" and config.vocab_size < 2:
            raise ValueError("early_exit: the margin measure needs a vocabulary of at least 2 tokens")
        if threshold is None:
            threshold = _DEFAULT_THRESHOLD[measure]
        if (
            isinstance(threshold, bool)
            or not isinstance(threshold, (int, float))
            or not math.isfinite(threshold)
        ):
            raise ValueError(f"early_exit: threshold must be a finite number, got {threshold!r}")
        if measure == "entropy" and threshold < 0:
            raise ValueError(
                f"early_exit: an entropy threshold is in nats and must be >= 0, got {threshold!r}"
            )
        if measure != "entropy" and not 0.0 <= threshold <= 1.0:
            raise ValueError(
                f"early_exit: a {measure} threshold is a probability in [0, 1], got {threshold!r}"
            )
        if (
            isinstance(aux_weight, bool)
            or not isinstance(aux_weight, (int, float))
            or not 0 <= aux_weight < math.inf
        ):
            raise ValueError(f"early_exit: aux_weight must be a finite number >= 0, got {aux_weight!r}")
        self.threshold = float(threshold)
        self.measure = measure
        self.aux_weight = float(aux_weight)

    def step(
        self,
        index: int,
        hidden: Tensor,
        logits: Tensor | None,
        mask: Tensor,
        state: dict[str, Tensor],
        ctx: PassContext,
    ) -> HaltStep:
        if logits is None:
            raise ValueError("early_exit reads the pass's logits, but the driver passed none")
        score = confidence(logits.detach(), self.measure)  # (B, T)
        confident = score <= self.threshold if self.measure == "entropy" else score >= self.threshold
        aux = None
        if self.aux_weight > 0 and ctx.targets is not None:
            aux = self.aux_weight * _next_token_ce(logits, ctx.targets, mask) / max(self.passes - 1, 1)
        return HaltStep(mask=~confident, aux_loss=aux)


def confidence(logits: Tensor, measure: str) -> Tensor:
    """The confidence ``measure`` of each token's distribution ``softmax(logits)``, float32.

    Args:
        logits: (..., V).
        measure: ``"max_prob"``, ``"margin"`` or ``"entropy"`` (nats).

    Returns:
        (...) one value per token.
    """
    logp = torch.log_softmax(logits.float(), dim=-1)
    if measure == "max_prob":
        return logp.max(dim=-1).values.exp()
    if measure == "margin":
        top = logp.topk(2, dim=-1).values.exp()  # (..., 2)
        return top[..., 0] - top[..., 1]
    if measure == "entropy":
        return -(logp.exp() * logp).sum(-1)
    raise ValueError(f"unknown confidence measure {measure!r}; valid measures: {', '.join(MEASURES)}")


def _next_token_ce(logits: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """Mean next-token cross-entropy over the tokens in ``mask`` that have a target."""
    keep = (mask & (targets != IGNORE)).to(torch.float32)
    return (token_nll(logits, targets) * keep).sum() / keep.sum().clamp(min=1.0)
