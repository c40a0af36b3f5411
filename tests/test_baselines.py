"""Unbiased baselines: one seed gives every variant of a shape the same backbone weights, and
fixed pruning's decisions are uniform for every (seed, position, pass)."""

from __future__ import annotations

import math

import pytest
import torch

import zoo
from zoo.halting.fixed_prune import uniform_hash

BACKBONE = ("embed.", "layers.", "final_norm.", "head.")

VARIANTS = [
    dict(name="ponder-pythia-tiny"),
    dict(name="loop-pythia-tiny"),
    dict(name="adaponder-pythia-tiny"),
    dict(name="adaponder-pythia-tiny", halting="fixed_prune", halting_kwargs={"ratio": 0.3}),
    dict(name="ponder-pythia-tiny", halting="act", cache="kv_reuse"),
    dict(name="ponder-pythia-tiny", halting="early_exit", halting_kwargs={"threshold": 0.5}),
    dict(name="adaponder-pythia-tiny", halting_kwargs={"hidden_mult": 2, "bias_init": 1.0}),
]


def backbone(model: zoo.RecurrentLM) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if k.startswith(BACKBONE)}


def built(seed: int, name: str, **overrides) -> zoo.RecurrentLM:
    torch.manual_seed(seed)
    return zoo.build(name, **overrides)


@pytest.mark.parametrize("variant", VARIANTS[1:], ids=lambda v: f"{v['name']}-{v.get('halting', '')}")
def test_same_seed_same_backbone_whatever_the_policy(variant):
    reference = backbone(built(3, "ponder-pythia-tiny"))
    kwargs = dict(variant)
    other = backbone(built(3, kwargs.pop("name"), **kwargs))
    assert reference.keys() == other.keys()
    for key in reference:
        assert torch.equal(reference[key], other[key]), key


def test_another_seed_another_backbone():
    a, b = backbone(built(0, "adaponder-pythia-tiny")), backbone(built(1, "adaponder-pythia-tiny"))
    assert not torch.equal(a["layers.0.attn.qkv.weight"], b["layers.0.attn.qkv.weight"])


def test_building_leaves_the_generator_where_initialisation_left_it():
    """The policy's modules draw nothing at construction: what follows the build is paired too."""
    torch.manual_seed(5)
    zoo.build("ponder-pythia-tiny")
    after_ponder = torch.rand(4)
    torch.manual_seed(5)
    zoo.build("ponder-pythia-tiny", halting="fixed_prune")  # no parameters of its own
    assert torch.equal(after_ponder, torch.rand(4))


@pytest.mark.parametrize("passes", [2, 3])
def test_pass_counts_share_the_draws(passes):
    """Only the output projections' scale 1/sqrt(2 L P) depends on the number of passes."""
    four = backbone(built(2, "ponder-pythia-tiny"))
    fewer = backbone(built(2, "ponder-pythia-tiny", passes=passes))
    for key, value in four.items():
        if key.endswith(("attn.proj.weight", "mlp.fc_out.weight")):
            torch.testing.assert_close(fewer[key], value * math.sqrt(4 / passes), rtol=1e-6, atol=0)
        else:
            assert torch.equal(fewer[key], value), key
    single = backbone(built(2, "pythia-tiny"))
    assert torch.equal(single["embed.weight"], four["embed.weight"])


# fixed_prune's draws -------------------------------------------------------------------------


def ks_uniform(u: torch.Tensor) -> float:
    """Kolmogorov-Smirnov distance of the sample ``u`` from the uniform distribution on (0, 1)."""
    x = u.double().flatten().sort().values
    n = x.numel()
    above = torch.arange(1, n + 1, dtype=torch.float64) / n - x
    below = x - torch.arange(0, n, dtype=torch.float64) / n
    return float(torch.maximum(above, below).max())


def test_no_draw_is_zero_or_one():
    for seed in (0, 1, -1, 2**40):
        for index in range(4):
            u = uniform_hash(seed, torch.arange(4096), index)
            assert bool((u > 0).all()) and bool((u < 1).all())


def test_a_vanishing_ratio_halts_nothing():
    """Seed 0, position 0, pass 0 used to hash to exactly 0: that token halted for any ratio > 0."""
    ids = torch.zeros(2, 256, dtype=torch.long)
    for seed in range(4):
        model = zoo.build(
            "adaponder-pythia-tiny", halting="fixed_prune", halting_kwargs={"ratio": 1e-9, "seed": seed}
        )
        assert bool((model(ids, execution="dense").depth == 4).all()), seed


# One sample of 1000 draws, fixed per axis; the 1% critical KS distance for n = 1000 is 0.0515.
@pytest.mark.parametrize(
    "axis",
    ["seed", "position", "pass"],
)
def test_draws_are_uniform_along_every_axis(axis):
    """The draw at a fixed cell is uniform over the other coordinate: no seed, position or pass
    (in particular none of them at 0) is special."""
    n = 1000
    if axis == "seed":  # position 0 and pass 0 over 1000 seeds
        u = torch.cat([uniform_hash(seed, torch.zeros(1, dtype=torch.long), 0) for seed in range(n)])
    elif axis == "position":  # seed 0 and pass 0 over 1000 positions
        u = uniform_hash(0, torch.arange(n), 0)
    else:  # seed 0 and position 0 over 1000 passes
        u = torch.cat([uniform_hash(0, torch.zeros(1, dtype=torch.long), i) for i in range(n)])
    assert ks_uniform(u) < 0.0515
    assert float(u.min()) > 1e-6, "the smallest draw sits on an edge"
