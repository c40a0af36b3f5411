"""Hypothesis strategies and a tiny-model factory for testing halting policies and caches.

Shape legend: B batch, T time, P passes.

Everything here builds on ``ponder-pythia-tiny`` (2 layers, width 64, 512 tokens), whose
head :func:`tiny_model` scales up so that next-token distributions range from flat to
peaked: confidence-based policies then halt some tokens and not others.
"""

from __future__ import annotations

from typing import Any

import torch
from hypothesis import strategies as st
from torch import Tensor

import zoo
from zoo.config import ModelConfig
from zoo.halting.fixed_prune import SCHEDULES
from zoo.model import RecurrentLM
from zoo.registry import HALTING

__all__ = [
    "VOCAB",
    "BLOCK_OVERRIDES",
    "HALTING_EXAMPLES",
    "tiny_model",
    "halting_kwargs",
    "configs",
    "token_batches",
    "monotone_masks",
]

VOCAB = 512
"""The tiny presets' vocabulary."""

BLOCK_OVERRIDES: dict[str, dict[str, Any]] = {
    "neox": {},
    "llama": {"rotary_fraction": 1.0, "num_kv_heads": 2},
}
"""Config overrides that make a tiny model of each built-in block (llama: grouped-query attention)."""

HALTING_EXAMPLES: dict[str, dict[str, Any]] = {
    "none": {},
    "mlp_gate": {"threshold": 0.5, "bias_init": 0.0},
    "fixed_prune": {"ratio": 0.4},
    "act": {"bias_init": -0.5},
    "early_exit": {"measure": "max_prob", "threshold": 0.9},
}
"""One setting per built-in policy under which it halts a good share of :func:`tiny_model`'s tokens."""

_HALTING_KWARGS = {
    "none": st.just({}),
    "mlp_gate": st.fixed_dictionaries(
        {
            "threshold": st.floats(0.35, 0.65),
            "bias_init": st.floats(-0.5, 0.5),
            "hidden_mult": st.sampled_from([1, 4]),
        }
    ),
    "fixed_prune": st.fixed_dictionaries(
        {"ratio": st.floats(0.1, 0.6), "schedule": st.sampled_from(SCHEDULES), "seed": st.integers(0, 2**40)}
    ),
    "act": st.fixed_dictionaries({"bias_init": st.floats(-1.5, 0.0), "epsilon": st.floats(0.001, 0.2)}),
    "early_exit": st.one_of(
        st.fixed_dictionaries({"measure": st.just("max_prob"), "threshold": st.floats(0.6, 0.99)}),
        st.fixed_dictionaries({"measure": st.just("margin"), "threshold": st.floats(0.4, 0.95)}),
        st.fixed_dictionaries({"measure": st.just("entropy"), "threshold": st.floats(0.05, 1.0)}),
    ),
}


def tiny_model(
    halting: str = "none",
    halting_kwargs: dict[str, Any] | None = None,
    *,
    cache: str = "kv_reuse",
    recurrence: str = "ponder",
    passes: int = 4,
    block: str = "neox",
    seed: int = 0,
    sharpen: float = 20.0,
    **overrides: Any,
) -> RecurrentLM:
    """A ``ponder-pythia-tiny`` model with the given parts, its head scaled by ``sharpen``.

    Args:
        halting: a registered halting policy.
        halting_kwargs: its keyword arguments.
        cache: a registered cache strategy.
        recurrence: ``"ponder"``, ``"loop"`` or ``"none"`` (then ``passes`` must be 1).
        passes: passes ``P``.
        block: ``"neox"`` or ``"llama"`` (with :data:`BLOCK_OVERRIDES`), or another block.
        seed: seeds the initialisation.
        sharpen: factor on the head's weights, so that next-token distributions range from
            flat to peaked (1 leaves the model as initialised).
        **overrides: further :class:`~zoo.config.ModelConfig` fields.

    Example:
        >>> from zoo.testing import tiny_model, HALTING_EXAMPLES
        >>> model = tiny_model("fixed_prune", HALTING_EXAMPLES["fixed_prune"])
        >>> model.config.passes, model.config.cache
        (4, 'kv_reuse')
    """
    torch.manual_seed(seed)
    model = zoo.build(
        "ponder-pythia-tiny",
        block=block,
        recurrence=recurrence,
        passes=passes,
        halting=halting,
        halting_kwargs=dict(halting_kwargs or {}),
        cache=cache,
        **{**BLOCK_OVERRIDES.get(block, {}), **overrides},
    )
    if sharpen != 1.0:
        with torch.no_grad():
            model.head.weight.mul_(sharpen)
    return model


def halting_kwargs(name: str) -> st.SearchStrategy[dict[str, Any]]:
    """Keyword arguments under which the built-in policy ``name`` halts some of :func:`tiny_model`'s tokens.

    Raises:
        ValueError: ``name`` is not a built-in policy (give a plugin's settings yourself).

    Example:
        >>> from hypothesis import given, settings
        >>> from zoo.testing import halting_kwargs, tiny_model
        >>> @settings(max_examples=3, deadline=None)
        ... @given(kwargs=halting_kwargs("fixed_prune"))
        ... def test_ratio(kwargs):
        ...     assert 0.1 <= tiny_model("fixed_prune", kwargs).halting.ratio <= 0.6
        >>> test_ratio()
    """
    if name not in _HALTING_KWARGS:
        raise ValueError(
            f"no built-in settings for halting {name!r} (built-in: {', '.join(sorted(_HALTING_KWARGS))}); "
            f"pass its halting_kwargs yourself"
        )
    return _HALTING_KWARGS[name]


@st.composite
def configs(
    draw,
    halting: str | None = None,
    cache: str | None = None,
    recurrence: str | None = None,
    block: str | None = None,
    passes: st.SearchStrategy[int] = st.integers(2, 4),
) -> ModelConfig:
    """Tiny model configs; any part left ``None`` is drawn from the registry.

    A drawn built-in policy comes with its :func:`halting_kwargs`; a drawn plugin policy
    with none.

    Example:
        >>> from hypothesis import given, settings
        >>> from zoo.testing import configs
        >>> @settings(max_examples=3, deadline=None)
        ... @given(config=configs(halting="mlp_gate", recurrence="loop"))
        ... def test_config(config):
        ...     assert config.halting == "mlp_gate" and 2 <= config.passes <= 4
        >>> test_config()
    """
    halting = halting or draw(st.sampled_from(zoo.available("halting")), label="halting")
    cache = cache or draw(st.sampled_from(zoo.available("cache")), label="cache")
    recurrence = recurrence or draw(st.sampled_from(["ponder", "loop"]), label="recurrence")
    block = block or draw(st.sampled_from(sorted(BLOCK_OVERRIDES)), label="block")
    kwargs = draw(_HALTING_KWARGS[halting], label="halting_kwargs") if halting in _HALTING_KWARGS else {}
    return zoo.preset(
        "ponder-pythia-tiny",
        block=block,
        recurrence=recurrence,
        passes=1 if recurrence == "none" else draw(passes, label="passes"),
        halting=halting,
        halting_kwargs=kwargs,
        cache=cache,
        **BLOCK_OVERRIDES.get(block, {}),
    )


@st.composite
def token_batches(
    draw, vocab_size: int = VOCAB, batch: tuple[int, int] = (1, 3), length: tuple[int, int] = (2, 16)
) -> Tensor:
    """(B, T) int64 token ids with B in ``batch`` and T in ``length`` (inclusive ranges).

    Example:
        >>> import torch
        >>> from hypothesis import given, settings
        >>> from zoo.testing import token_batches
        >>> @settings(max_examples=3)
        ... @given(ids=token_batches(batch=(2, 2), length=(5, 5)))
        ... def test_ids(ids):
        ...     assert ids.shape == (2, 5) and ids.dtype == torch.int64
        >>> test_ids()
    """
    B = draw(st.integers(*batch), label="batch")
    T = draw(st.integers(*length), label="length")
    seed = draw(st.integers(0, 2**32 - 1), label="ids seed")
    return torch.randint(0, vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


@st.composite
def monotone_masks(draw, passes: int, batch: int, length: int) -> Tensor:
    """(P, B, T) bool halting masks: every token runs pass 0 and never resumes once halted.

    Example:
        >>> from hypothesis import given, settings
        >>> from zoo.testing import monotone_masks
        >>> @settings(max_examples=5)
        ... @given(masks=monotone_masks(4, 2, 8))
        ... def test_masks(masks):
        ...     assert masks[0].all() and (masks[1:] <= masks[:-1]).all()
        >>> test_masks()
    """
    depth = draw(
        st.lists(st.integers(1, passes), min_size=batch * length, max_size=batch * length), label="depth"
    )
    depth = torch.tensor(depth).view(batch, length)
    return torch.stack([depth > i for i in range(passes)])
