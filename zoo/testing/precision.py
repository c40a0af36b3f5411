"""How closely dense, sparse and incremental execution agree, in any dtype and on any device.

Shape legend: B batch, T time, V vocabulary, M new tokens.

In float32 the three executions agree to rounding: the same depths, logits within a few
1e-6 of the largest logit. In bfloat16 every product rounds to 8 bits of mantissa, and
sparse execution and decoding multiply other shapes than the dense forward, so their
roundings differ. Two things follow, and :data:`TOLERANCES` bounds both:

* a halting decision whose score lies within rounding of the threshold may go the other
  way, so a few tokens may take another depth (value-dependent policies only);
* the logits of tokens of the same depth differ by a few units in the last place of the
  largest logit.

:func:`compare_executions` measures both on one batch; the tests hold every part to
:data:`TOLERANCES` on every device they run on, and ``benchmarks/gpu_checks.py`` reports
the figures on a GPU at Pythia-160M shape.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from zoo.model import RecurrentLM

__all__ = ["Agreement", "Tolerance", "TOLERANCES", "agreement", "compare_executions"]


@dataclass(frozen=True)
class Agreement:
    """How far two runs of the same tokens agree.

    Attributes:
        same_depth: share of tokens that take the same depth in both.
        max_diff: largest absolute logit difference over the tokens of the same depth,
            divided by the largest absolute logit of the reference (0 when none share it).
    """

    same_depth: float
    max_diff: float

    def within(self, tolerance: Tolerance) -> bool:
        """Whether this agreement is as close as ``tolerance`` asks."""
        return self.same_depth >= tolerance.same_depth and self.max_diff <= tolerance.max_diff

    def as_dict(self) -> dict[str, float]:
        """``{"same_depth": ..., "max_diff": ...}``, for JSON."""
        return asdict(self)


@dataclass(frozen=True)
class Tolerance:
    """The least agreement a dtype allows (see :class:`Agreement` for the two figures)."""

    same_depth: float
    max_diff: float


TOLERANCES = {
    torch.float32: Tolerance(same_depth=1.0, max_diff=1e-5),
    torch.bfloat16: Tolerance(same_depth=0.95, max_diff=0.05),
}
"""Per dtype: float32 asks for the same depths and logits to 1e-5 of the largest; bfloat16
lets up to 5% of tokens flip a decision at the threshold and the rest differ by up to 5% of
the largest logit (bfloat16 keeps 8 significant bits, so one rounding moves a value by up
to 2^-8, and the passes and layers add roundings up)."""


def agreement(
    logits: torch.Tensor, depth: torch.Tensor, reference_logits: torch.Tensor, reference_depth: torch.Tensor
) -> Agreement:
    """Compares ``logits`` (..., V) and ``depth`` (...) with a reference of the same shapes."""
    if logits.shape != reference_logits.shape or depth.shape != reference_depth.shape:
        raise ValueError(
            f"shapes differ: logits {tuple(logits.shape)} against {tuple(reference_logits.shape)}, "
            f"depth {tuple(depth.shape)} against {tuple(reference_depth.shape)}"
        )
    same = depth == reference_depth
    scale = float(reference_logits.float().abs().max().clamp_min(1e-30))
    diff = (logits.float() - reference_logits.float()).abs()[same]
    return Agreement(float(same.float().mean()), float(diff.max()) / scale if diff.numel() else 0.0)


@torch.no_grad()
def compare_executions(model: RecurrentLM, input_ids: torch.Tensor, prompt: int | None = None) -> dict[str, Agreement]:
    """Sparse execution and greedy decoding of ``model``, each against its dense forward.

    Args:
        model: a model whose cache strategy freezes halted tokens (sparse execution needs
            it), in the dtype and on the device to measure; it is put in eval mode.
        input_ids: (B, T) token ids on the model's device.
        prompt: decoding starts after this many tokens (default ``T // 2``) and generates
            the rest greedily; the reference is the dense forward of the generated tokens.

    Returns:
        ``{"sparse": ..., "decode": ...}``, each an :class:`Agreement` with the dense forward.
    """
    model.eval()
    T = input_ids.shape[1]
    prompt = T // 2 if prompt is None else prompt
    if not 1 <= prompt < T:
        raise ValueError(f"prompt must lie in 1..{T - 1} for {T} tokens, got {prompt}")
    dense = model(input_ids, execution="dense")
    sparse = model(input_ids, execution="sparse")
    new = T - prompt
    gen = model.generate(input_ids[:, :prompt], new, progress=False)
    full = model(gen.tokens, execution="dense")
    window = slice(prompt - 1, prompt - 1 + new)
    return {
        "sparse": agreement(sparse.logits, sparse.depth, dense.logits, dense.depth),
        "decode": agreement(gen.logits, gen.depth, full.logits[:, window], full.depth[:, window]),
    }
