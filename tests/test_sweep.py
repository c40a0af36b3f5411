"""Registry sweep: every block x recurrence x halting policy x cache trains.

Each combination is built from the registry names, run forward (dense) and backward on a
tiny model, and checked for finite values, depths within ``1..passes`` and a gradient on
every parameter, the halting policy's gates and units included. Policies run twice: with
their defaults (gates open, as at the start of training) and with settings under which
tokens really halt, so the backward also passes through halted tokens.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

import zoo

PASSES = {"none": 1, "ponder": 3, "loop": 4}

# Settings under which a good share of tokens halts, with every auxiliary loss on (the head
# is sharpened below so that confidence-based exits happen at all in a random model).
HALTING_KWARGS = {
    "none": {},
    "mlp_gate": {"threshold": 0.5, "bias_init": 0.0, "k_max": 0.5},
    "fixed_prune": {"ratio": 0.4, "schedule": "geometric", "seed": 5},
    "act": {"bias_init": -0.5, "tau": 0.1},
    "early_exit": {"measure": "max_prob", "threshold": 0.9, "aux_weight": 0.5},
}

CASES = [
    pytest.param(
        block, recurrence, halting, cache, setting, id=f"{block}-{recurrence}-{halting}-{cache}-{setting}"
    )
    for block, recurrence, halting, cache in itertools.product(
        zoo.available("block"), zoo.available("recurrence"), zoo.available("halting"), zoo.available("cache")
    )
    for setting in (["default", "halting"] if halting != "none" else ["default"])
]


def test_sweep_covers_every_registered_part():
    assert set(zoo.available("block")) >= {"neox", "llama"}
    assert set(zoo.available("recurrence")) >= {"none", "ponder", "loop"}
    assert set(zoo.available("halting")) >= {"none", "mlp_gate", "fixed_prune", "act", "early_exit"}
    assert set(zoo.available("cache")) >= {"recompute", "kv_reuse", "kv_share", "recursion_wise"}
    caches = len(zoo.available("cache"))
    assert len(CASES) == 2 * 3 * caches * (1 + 2 * (len(zoo.available("halting")) - 1))


@pytest.mark.parametrize("block, recurrence, halting, cache, setting", CASES)
def test_combination_trains(block, recurrence, halting, cache, setting, tiny_model):
    # The "halting" setting sharpens the head so that confidence-based exits happen at all.
    model = tiny_model(
        halting,
        HALTING_KWARGS[halting] if setting == "halting" else {},
        cache=cache,
        recurrence=recurrence,
        passes=PASSES[recurrence],
        block=block,
        sharpen=20.0 if setting == "halting" else 1.0,
    )
    P = model.config.passes
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    out = model(ids, execution="dense", step=10)

    assert out.logits.shape == (2, 24, model.config.vocab_size)
    assert out.masks.shape == (P, 2, 24) and out.gates.shape == (P - 1, 2, 24)
    assert bool(torch.isfinite(out.logits).all()) and bool(torch.isfinite(out.aux_loss))
    assert out.depth.dtype == torch.int64
    assert bool(((out.depth >= 1) & (out.depth <= P)).all())
    if recurrence == "none":
        assert bool((out.depth == 1).all())
    elif setting == "halting":
        assert out.depth.float().mean() < P  # tokens really halt in this setting

    loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()) + out.aux_loss
    loss.backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, f"{name} gets no gradient"
        assert bool(torch.isfinite(param.grad).all()), f"{name} has a non-finite gradient"
        assert param.grad.abs().sum() > 0, f"{name} gets a zero gradient"

    # The policy's own parameters learn: every gate of mlp_gate, every unit of act.
    if halting == "mlp_gate":
        assert len(model.halting.gates) == P - 1
        for gate in model.halting.gates:
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in gate.parameters())
    if halting == "act":
        assert len(model.halting.units) == P - 1
        for unit in model.halting.units:
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in unit.parameters())
