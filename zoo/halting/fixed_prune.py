"""``fixed_prune``: a fixed, position-hashed pruning schedule (the iso-FLOPs baseline)."""

from __future__ import annotations

import torch
from torch import Tensor

from zoo.config import ModelConfig
from zoo.halting.base import HaltingPolicy, HaltStep, PassContext
from zoo.registry import HALTING

__all__ = [
    "FixedPrune",
    "SCHEDULES",
    "pass_fraction",
    "halt_fractions",
    "expected_depth",
    "ratio_for_depth",
    "uniform_hash",
]

SCHEDULES = ("uniform", "geometric")

_MASK32 = 0xFFFFFFFF
_GOLDEN32 = 0x9E3779B9  # 2^32 / golden ratio: spreads consecutive pass indices apart
_SEED_OFFSET = 0x5BD1E995  # any odd constant: moves seed 0 off the mix's fixed point at 0


@HALTING.register("fixed_prune")
class FixedPrune(HaltingPolicy):
    """Fixed pruning: a scheduled fraction of the still-active tokens halts after each pass.

    The baseline AdaPonderLM (arXiv 2603.01914) compares learned gates with at equal FLOPs.
    After pondering pass ``i``, with ``u`` a stateless hash of ``(seed, position, i)``
    mapped to ``(0, 1)`` (:func:`uniform_hash`), uniform for every triple::

        m^{i+1} = m^i & (u(seed, position, i) >= r_i)        s^i = 1

    so a fraction ``r_i`` of the tokens active at pass ``i`` halts, in expectation. Schedules
    (:func:`halt_fractions`):

    * ``uniform``: ``r_i = ratio`` at every pass;
    * ``geometric``: ``r_i = ratio * 2^-i``, the fraction halted halves at every pass
      (most pruning after the first pass).

    Neither depends on ``passes``, so the decisions of the first passes are the same in a
    model with more passes. Which tokens halt depends only on the seed, the token's position
    and the pass: causal, reproducible, identical across the rows of a batch, and blind to
    content (that is the point of the baseline). :func:`ratio_for_depth` finds the ``ratio``
    whose expected mean depth matches a learned policy's.

    Args:
        config: the model config.
        ratio: fraction of still-active tokens halted per pass (the first pass's under
            ``geometric``), in ``[0, 1]``.
        schedule: ``"uniform"`` or ``"geometric"``.
        seed: selects which positions halt (any int).

    Raises:
        ValueError: ``ratio`` outside ``[0, 1]``, an unknown schedule or a non-int seed.

    Example:
        >>> import zoo, torch
        >>> from zoo.halting.fixed_prune import ratio_for_depth
        >>> ratio = ratio_for_depth(3.8, passes=4, schedule="uniform")
        >>> round(ratio, 4)
        0.0341
        >>> model = zoo.build("adaponder-pythia-tiny", halting="fixed_prune", halting_kwargs={"ratio": 0.5})
        >>> depth = model(torch.zeros(3, 64, dtype=torch.long), execution="dense").depth
        >>> bool((depth == depth[0]).all())  # the same positions halt in every row
        True
    """

    def __init__(
        self, config: ModelConfig, ratio: float = 0.1, schedule: str = "uniform", seed: int = 0
    ) -> None:
        super().__init__(config)
        _check_ratio(ratio)
        _check_schedule(schedule)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"fixed_prune: seed must be an int, got {seed!r}")
        self.ratio = float(ratio)
        self.schedule = schedule
        self.seed = seed

    def step(
        self,
        index: int,
        hidden: Tensor,
        logits: Tensor | None,
        mask: Tensor,
        state: dict[str, Tensor],
        ctx: PassContext,
    ) -> HaltStep:
        fraction = pass_fraction(self.ratio, index, self.schedule)
        u = uniform_hash(self.seed, ctx.positions, index)  # (B, T) in [0, 1)
        return HaltStep(mask=u >= fraction)


def uniform_hash(seed: int, positions: Tensor, index: int) -> Tensor:
    """A stateless hash of ``(seed, position, index)`` mapped to ``(0, 1)``, float32.

    Chris Wellons' ``lowbias32`` integer mix, applied to the position and then to the
    position's mix xor a key derived from the seed and the pass index. The mix maps 0 to 0,
    so the seed is offset by a constant before it is mixed: otherwise seed 0, position 0,
    pass 0 would hash to exactly 0 and that token would halt for any ratio above 0. The top
    24 bits give the centre of one of 2^24 equal cells, so the value is never 0 or 1 and is
    uniform for every ``(seed, position, index)``. 32-bit arithmetic is emulated exactly in
    int64 (no overflow, no data-dependent shapes), so the result is the same on every device
    and under ``torch.compile``.

    Args:
        seed: any int.
        positions: integer tensor of token positions, any shape.
        index: the pass index.
    """
    key = _mix32(_mix32((seed + _SEED_OFFSET) & _MASK32) ^ ((index * _GOLDEN32) & _MASK32))  # a Python int
    h = _mix32(_mix32(positions.to(torch.int64) & _MASK32) ^ key)
    return ((h >> 8).to(torch.float32) + 0.5) * 2.0**-24  # 24 bits and a half: exact in float32


def pass_fraction(ratio: float, index: int, schedule: str) -> float:
    """``r_index``: the fraction of active tokens halted after pass ``index``."""
    return ratio if schedule == "uniform" else ratio * 0.5**index


def halt_fractions(ratio: float, passes: int, schedule: str = "uniform") -> list[float]:
    """The per-pass halting fractions ``[r_0, ..., r_{P-2}]`` of a schedule.

    Example:
        >>> halt_fractions(0.4, 4, "geometric")
        [0.4, 0.2, 0.1]
    """
    _check_ratio(ratio)
    _check_schedule(schedule)
    return [pass_fraction(float(ratio), i, schedule) for i in range(passes - 1)]


def expected_depth(ratio: float, passes: int, schedule: str = "uniform") -> float:
    """Expected passes per token: ``sum_{j=0}^{P-1} prod_{i<j} (1 - r_i)``.

    Example:
        >>> expected_depth(0.5, 3)  # 1 + 0.5 + 0.25
        1.75
    """
    _check_passes(passes)
    depth, alive = 0.0, 1.0
    for fraction in [*halt_fractions(ratio, passes, schedule), None]:
        depth += alive
        if fraction is not None:
            alive *= 1.0 - fraction
    return depth


def ratio_for_depth(target_mean_depth: float, passes: int, schedule: str = "uniform") -> float:
    """The ``ratio`` whose expected mean depth is ``target_mean_depth`` (bisection).

    Use it to run fixed pruning at the same average depth, hence the same FLOPs, as a
    learned policy: ``ratio_for_depth(float(out.depth.float().mean()), passes)``.
    :func:`expected_depth` decreases strictly in ``ratio`` on ``[0, 1]``, from ``passes``
    to 1, so the answer is unique; it is accurate to about 1e-12.

    Args:
        target_mean_depth: in ``[1, passes]``.
        passes: ``P``.
        schedule: ``"uniform"`` or ``"geometric"``.

    Raises:
        ValueError: the target lies outside ``[1, passes]``.
    """
    _check_passes(passes)
    _check_schedule(schedule)
    if isinstance(target_mean_depth, bool) or not 1.0 <= target_mean_depth <= passes:
        raise ValueError(
            f"target_mean_depth must lie in [1, passes={passes}] (a token runs 1..passes passes), "
            f"got {target_mean_depth!r}"
        )
    low, high = 0.0, 1.0  # expected_depth(low) >= target >= expected_depth(high)
    for _ in range(60):
        mid = 0.5 * (low + high)
        if expected_depth(mid, passes, schedule) > target_mean_depth:
            low = mid
        else:
            high = mid
    return 0.5 * (low + high)


def _mul32(x, c: int):
    """``x * c mod 2^32`` for ``0 <= x < 2^32`` (tensor or int) without exceeding 2^63."""
    lo = (x & 0xFFFF) * c
    hi = ((x >> 16) * c) & 0xFFFF
    return (lo + (hi << 16)) & _MASK32


def _mix32(x):
    """Wellons' lowbias32 finaliser on 32-bit values held in int64 (tensor or int)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _check_ratio(ratio: object) -> None:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio <= 1.0:
        raise ValueError(f"fixed_prune: ratio must be a number in [0, 1], got {ratio!r}")


def _check_schedule(schedule: object) -> None:
    if schedule not in SCHEDULES:
        raise ValueError(f"fixed_prune: schedule must be one of {SCHEDULES}, got {schedule!r}")


def _check_passes(passes: object) -> None:
    if isinstance(passes, bool) or not isinstance(passes, int) or passes < 1:
        raise ValueError(f"passes must be a positive int, got {passes!r}")
