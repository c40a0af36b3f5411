"""The four halting policies against hand computations, one behaviour at a time.

Policies are driven on hand-made tensors (``zoo.testing.run_policy``: their ``step`` and
``finish`` with the driver's bookkeeping) where a rule is checked, and through a tiny model
where the wiring is. The invariants shared by every policy (``zoo.testing.check_policy``)
live in ``test_properties.py``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import zoo
from zoo.halting.act import ACT
from zoo.halting.base import PassContext, next_token_targets
from zoo.halting.early_exit import EarlyExit, confidence
from zoo.halting.fixed_prune import (
    expected_depth,
    halt_fractions,
    ratio_for_depth,
    uniform_hash,
)
from zoo.halting.mlp_gate import PAPER, MLPGate, bottom_k_mean
from zoo.recurrence import run_dense
from zoo.testing import run_policy

VOCAB = 512  # the tiny presets' vocabulary


@pytest.fixture
def tiny(tiny_model):
    """Factory: ``tiny(halting, passes, cache, **halting_kwargs)``, a tiny model as initialised."""

    def build(halting: str = "none", passes: int = 4, cache: str = "kv_reuse", **kwargs) -> zoo.RecurrentLM:
        return tiny_model(halting, kwargs, passes=passes, cache=cache, sharpen=1.0)

    return build


def ids(B: int = 2, T: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def ctx_for(B: int, T: int, step=None, input_ids=None, passes: int = 4) -> PassContext:
    positions = torch.arange(T).expand(B, T)
    targets = None if input_ids is None else next_token_targets(input_ids)
    return PassContext(positions=positions, input_ids=input_ids, step=step, passes=passes, targets=targets)


def config(passes: int = 4, dim: int = 8):
    return zoo.preset("ponder-pythia-tiny", dim=dim, num_heads=2, passes=passes, rotary_fraction=0.5)


def test_all_policies_registered():
    assert zoo.available("halting") == ["act", "early_exit", "fixed_prune", "mlp_gate", "none"]


# mlp_gate ---------------------------------------------------------------------------------


def test_mlp_gate_has_one_unshared_gate_per_pondering_pass(tiny):
    model = tiny("mlp_gate", passes=4, hidden_mult=3)
    gates = model.halting.gates
    assert isinstance(gates, torch.nn.ModuleList) and len(gates) == 3
    for gate in gates:
        first, act, last = gate
        assert (first.in_features, first.out_features) == (64, 192)
        assert isinstance(act, torch.nn.GELU)
        assert (last.in_features, last.out_features) == (192, 1)
    pointers = {p.data_ptr() for gate in gates for p in gate.parameters()}
    assert len(pointers) == 3 * 4  # nothing shared between passes
    assert not torch.equal(gates[0][0].weight, gates[1][0].weight)


def test_mlp_gate_init_is_truncated_normal_with_open_bias(tiny):
    model = tiny("mlp_gate", passes=3)
    std = model.config.std
    for gate in model.halting.gates:
        for layer in (gate[0], gate[2]):
            assert layer.weight.abs().max() <= 2 * std + 1e-6
        assert abs(gate[0].weight.std().item() - 0.88 * std) < 0.1 * std  # trunc(2 sigma) shrinks std by 0.88
        assert torch.all(gate[0].bias == 0)
        assert gate[2].bias.item() == 4.0
    with torch.no_grad():  # the model's reset hands the gates back to the policy
        model.halting.gates[0][2].bias.fill_(-7.0)
    model.reset_parameters()
    assert model.halting.gates[0][2].bias.item() == 4.0
    out = model(ids(), execution="dense")
    assert bool((out.gates > 0.9).all()) and bool((out.depth == 3).all())  # gates start open


def test_mlp_gate_step_matches_hand_rule():
    policy = MLPGate(config(passes=3), threshold=0.5)
    policy.reset_parameters()
    hidden = [torch.randn(2, 5, 8) * 3 for _ in range(2)]
    mask = torch.tensor([[1, 1, 0, 1, 1], [1, 0, 1, 1, 1]], dtype=torch.bool)
    score = [torch.sigmoid(gate[2](F.gelu(gate[0](h)))).squeeze(-1) for gate, h in zip(policy.gates, hidden)]
    decision = policy.step(1, hidden[1], None, mask, {}, ctx_for(2, 5, passes=3))
    assert torch.allclose(decision.gate, score[1], atol=1e-6) and torch.equal(decision.mask, score[1] >= 0.5)
    assert decision.aux_loss is None
    # Through the driver: m^{i+1} = m^i & (s^i >= tau), and gate 1 where the token did not run.
    result = run_policy(policy, hidden, mask=mask)
    m1 = mask & (score[0] >= 0.5)
    assert torch.equal(result.masks[1], m1) and torch.equal(result.masks[2], m1 & (score[1] >= 0.5))
    for i, m in enumerate(result.masks[:-1]):
        assert torch.allclose(result.gates[i], torch.where(m, score[i], torch.ones_like(score[i])), atol=1e-6)


def test_mlp_gate_schedule():
    policy = MLPGate(config(), k_max=0.2, warmup_steps=100, ramp_steps=50)
    values = {s: float(policy.k_fraction(s)) for s in (0, 99, 100, 110, 125, 150, 10_000)}
    assert values == pytest.approx({0: 0.0, 99: 0.0, 100: 0.0, 110: 0.04, 125: 0.1, 150: 0.2, 10_000: 0.2})
    assert float(policy.k_fraction(None)) == 0.2
    assert float(policy.k_fraction(torch.tensor(125))) == 0.1
    jump = MLPGate(config(), k_max=0.3, warmup_steps=10, ramp_steps=0)
    assert [float(jump.k_fraction(s)) for s in (9, 10, 11)] == [0.0, 0.3, 0.3]


def test_bottom_k_hand_example():
    gates = torch.tensor([[[0.9, 0.2, 0.5, 0.05]], [[0.3, 0.01, 0.7, 0.6]]])  # (P-1=2, B=1, T=4)
    masks = torch.tensor([[[1, 1, 1, 1]], [[1, 0, 1, 1]], [[1, 0, 0, 1]]], dtype=torch.bool)
    # Pool: pass 0 all four, pass 1 where masks[1]: 0.3, 0.7, 0.6 (0.01 is not active) -> 7 values.
    # fraction 0.3: k = floor(2.1) = 2 -> mean(0.05, 0.2) = 0.125
    assert bottom_k_mean(gates, masks[:-1], torch.tensor(0.3)).item() == pytest.approx(0.125)
    # fraction 0.1: k = floor(0.7) = 0 -> 0
    assert bottom_k_mean(gates, masks[:-1], torch.tensor(0.1)).item() == 0.0
    # k = floor(0.5 * 7) = 3 -> mean(0.05, 0.2, 0.3)
    assert bottom_k_mean(gates, masks[:-1], torch.tensor(0.5)).item() == pytest.approx(0.55 / 3)
    policy = MLPGate(config(passes=3), lam=0.5, k_max=0.3, **PAPER)
    _, aux = policy.finish(gates, masks, {}, ctx_for(1, 4, passes=3))
    assert aux.item() == pytest.approx(0.5 * 0.125)


def test_bottom_k_floor_is_exact_for_round_products():
    values = torch.arange(30, dtype=torch.float32)[None, None] / 30  # (1, 1, 30)
    active = torch.ones_like(values, dtype=torch.bool)
    # 0.1 * 30 is 3.0000000000000004 in float64 and 3 in exact arithmetic: k = 3 either way.
    assert bottom_k_mean(values, active, torch.tensor(0.1)).item() == pytest.approx((0 + 1 + 2) / 90)


def test_mlp_gate_aux_loss_in_model_follows_schedule_and_trains_gates(tiny):
    model = tiny("mlp_gate", passes=3, warmup_steps=5, ramp_steps=10, lam=0.1, k_max=0.1, **PAPER)
    x = ids(B=2, T=32)
    assert model(x, execution="dense", step=3).aux_loss.item() == 0.0  # warm-up
    out = model(x, execution="dense", step=15)  # end of the ramp: k_s = k_max
    pool = out.gates[out.masks[:-1]]
    k = math.floor(0.1 * pool.numel())
    expected = 0.1 * pool.sort().values[:k].mean()
    assert out.aux_loss.item() == pytest.approx(expected.item(), rel=1e-5)
    out.aux_loss.backward()
    assert all(g[2].bias.grad is not None and g[2].bias.grad.abs().item() > 0 for g in model.halting.gates)
    assert model.layers[0].attn.qkv.weight.grad is not None  # the pool's gates read the backbone


@pytest.mark.parametrize(
    "kwargs, word",
    [
        (dict(threshold=1.5), "threshold"),
        (dict(threshold=-0.1), "threshold"),
        (dict(hidden_mult=0), "hidden_mult"),
        (dict(hidden_mult=2.5), "hidden_mult"),
        (dict(bias_init=float("nan")), "bias_init"),
        (dict(k_max=1.2), "k_max"),
        (dict(lam=-1.0), "lam"),
        (dict(warmup_steps=-1), "warmup_steps"),
        (dict(ramp_steps=1.5), "ramp_steps"),
    ],
)
def test_mlp_gate_rejects_bad_kwargs(kwargs, word, tiny):
    with pytest.raises(ValueError, match=word):
        tiny("mlp_gate", passes=2, **kwargs)


def test_unknown_kwarg_names_the_policy(tiny):
    with pytest.raises(ValueError, match="halting_kwargs"):
        tiny("mlp_gate", passes=2, tau=0.1)


# fixed_prune ------------------------------------------------------------------------------


def test_fixed_prune_schedules():
    assert halt_fractions(0.3, 4, "uniform") == [0.3, 0.3, 0.3]
    assert halt_fractions(0.4, 4, "geometric") == [0.4, 0.2, 0.1]
    assert halt_fractions(0.4, 1, "geometric") == []
    assert expected_depth(0.5, 3, "uniform") == 1 + 0.5 + 0.25
    assert expected_depth(0.4, 4, "geometric") == pytest.approx(1 + 0.6 + 0.6 * 0.8 + 0.6 * 0.8 * 0.9)
    assert expected_depth(0.0, 4) == 4.0 and expected_depth(1.0, 4) == 1.0


@pytest.mark.parametrize("schedule", ["uniform", "geometric"])
@pytest.mark.parametrize("passes", [2, 4, 6])
def test_ratio_for_depth_inverts_expected_depth(schedule, passes):
    for target in (1.0, 1.3, 0.5 * (1 + passes), passes - 0.2, float(passes)):
        ratio = ratio_for_depth(target, passes, schedule)
        assert 0.0 <= ratio <= 1.0
        assert expected_depth(ratio, passes, schedule) == pytest.approx(target, abs=1e-9)
    assert ratio_for_depth(float(passes), passes, schedule) == pytest.approx(0.0, abs=1e-12)
    assert ratio_for_depth(1.0, passes, schedule) == pytest.approx(1.0, abs=1e-12)


def test_ratio_for_depth_rejects_unreachable_targets():
    with pytest.raises(ValueError, match="target_mean_depth"):
        ratio_for_depth(4.5, 4)
    with pytest.raises(ValueError, match="target_mean_depth"):
        ratio_for_depth(0.5, 4)
    with pytest.raises(ValueError, match="schedule"):
        ratio_for_depth(2.0, 4, "cosine")


def test_fixed_prune_decisions_are_a_function_of_seed_position_pass():
    positions = torch.arange(4096)
    u = uniform_hash(7, positions, 0)
    assert u.dtype == torch.float32 and bool((u >= 0).all()) and bool((u < 1).all())
    assert torch.equal(u, uniform_hash(7, positions, 0))  # reproducible
    assert torch.equal(u[1000:2000], uniform_hash(7, positions[1000:2000], 0))  # per position
    assert torch.equal(u.view(64, 64), uniform_hash(7, positions.view(64, 64), 0))  # any layout
    for other in (uniform_hash(8, positions, 0), uniform_hash(7, positions, 1)):
        assert (u == other).float().mean() < 0.01  # seed and pass both change the draw
    counts = torch.histc(u, bins=10, min=0, max=1)
    assert bool(((counts / 4096 - 0.1).abs() < 0.03).all())  # uniform on [0, 1)
    # independent across passes: correlation of the draws of successive passes is near 0
    v = uniform_hash(7, positions, 1)
    assert abs(torch.corrcoef(torch.stack([u, v]))[0, 1].item()) < 0.05


def test_fixed_prune_in_model_is_identical_across_rows_and_content(tiny):
    model = tiny("fixed_prune", passes=4, ratio=0.4, seed=3)
    a = model(ids(B=3, T=64, seed=1), execution="dense")
    b = model(ids(B=1, T=64, seed=2), execution="dense")
    assert bool((a.depth == b.depth[0]).all())
    assert bool((a.gates == 1).all()) and a.aux_loss.item() == 0.0
    expected = torch.ones(64, dtype=torch.long)
    for i in range(3):
        u = uniform_hash(3, torch.arange(64), i)
        expected += (expected == i + 1) & (u >= 0.4)
    assert torch.equal(b.depth[0], expected)


@pytest.mark.parametrize(
    "kwargs, word",
    [
        (dict(ratio=1.5), "ratio"),
        (dict(ratio=-0.1), "ratio"),
        (dict(schedule="linear"), "schedule"),
        (dict(seed=1.5), "seed"),
    ],
)
def test_fixed_prune_rejects_bad_kwargs(kwargs, word, tiny):
    with pytest.raises(ValueError, match=word):
        tiny("fixed_prune", passes=2, **kwargs)


# act --------------------------------------------------------------------------------------


def act_with_probabilities(probabilities: list[list[float]], epsilon: float = 0.01, tau: float = 0.1) -> ACT:
    """An ACT policy whose unit at pass i gives token j (one-hot hidden j) probability p[i][j]."""
    passes = len(probabilities) + 1
    policy = ACT(config(passes=passes), epsilon=epsilon, tau=tau)
    with torch.no_grad():
        for unit, row in zip(policy.units, probabilities):
            unit.weight.zero_()
            unit.bias.zero_()
            unit.weight[0, : len(row)] = torch.logit(torch.tensor(row, dtype=torch.float64)).float()
    return policy


def test_act_matches_hand_computation():
    # token 0: 0.3, 0.5, 0.4 -> cumulative 0.3, 0.8, 1.2 >= 0.99 at pass 2: weights .3 .5 .2, depth 3
    # token 1: 0.995 -> halts at pass 0 with R = 1, depth 1
    # token 2: 0.1 each -> never reaches 0.99; the last pass takes the remainder 0.7, depth 4
    # token 3: 0.5, 0.49 -> 0.99 reaches 1 - epsilon exactly at pass 1: weights .5 .5, depth 2
    probabilities = [[0.3, 0.995, 0.1, 0.5], [0.5, 0.2, 0.1, 0.49], [0.4, 0.2, 0.1, 0.3]]
    policy = act_with_probabilities(probabilities, epsilon=0.01, tau=0.1)
    hidden = torch.eye(8)[:4][None]  # (1, 4, 8): token j is one-hot j
    result = run_policy(policy, [hidden] * 3)
    masks, aux = result.masks, result.aux_loss
    w = result.weights[:, 0]  # (P, T)
    expected = torch.tensor(
        [[0.3, 1.0, 0.1, 0.5], [0.5, 0.0, 0.1, 0.5], [0.2, 0.0, 0.1, 0.0], [0.0, 0.0, 0.7, 0.0]]
    )
    assert torch.allclose(w, expected, atol=1e-5)
    assert masks.sum(0)[0].tolist() == [3, 1, 4, 2]
    remainders = torch.tensor([0.2, 1.0, 0.7, 0.5])
    depth = torch.tensor([3.0, 1.0, 4.0, 2.0])
    assert aux.item() == pytest.approx(0.1 * (depth + remainders).mean().item(), rel=1e-5)


def test_act_gradient_reaches_units_through_remainder_and_mix(tiny):
    model = tiny("act", passes=3, tau=0.5, bias_init=0.0)
    out = model(ids(), execution="dense")
    assert bool(((out.depth >= 1) & (out.depth <= 3)).all()) and bool((out.gates == 1).all())
    (out.logits.square().mean() + out.aux_loss).backward()
    for unit in model.halting.units:
        assert unit.weight.grad is not None and unit.weight.grad.abs().sum() > 0


def test_act_that_halts_at_once_is_the_first_pass(tiny):
    model = tiny("act", passes=3, tau=0.25, bias_init=20.0)
    single = zoo.build("ponder-pythia-tiny", passes=1, cache="kv_reuse")
    single.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("halting")})
    x = ids()
    out = model(x, execution="dense")
    assert bool((out.depth == 1).all())
    assert torch.allclose(out.logits, single(x, execution="dense").logits, atol=1e-5)
    assert out.aux_loss.item() == pytest.approx(0.25 * (1 + 1))  # tau * (N + R), R = 1


def test_act_that_never_halts_is_the_last_pass(tiny):
    # h ~ 2e-9 at every pass: the last pass carries all the weight, as in plain PonderLM
    model = tiny("act", passes=3, bias_init=-20.0)
    plain = tiny("none", passes=3)
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("halting")})
    x = ids()
    out = model(x, execution="dense")
    assert bool((out.depth == 3).all())
    assert torch.allclose(out.logits, plain(x, execution="dense").logits, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs, word",
    [
        (dict(epsilon=0.0), "epsilon"),
        (dict(epsilon=1.0), "epsilon"),
        (dict(tau=-0.1), "tau"),
        (dict(bias_init="1"), "bias_init"),
    ],
)
def test_act_rejects_bad_kwargs(kwargs, word, tiny):
    with pytest.raises(ValueError, match=word):
        tiny("act", passes=2, **kwargs)


# early_exit -------------------------------------------------------------------------------


def test_confidence_measures_by_hand():
    logits = torch.tensor([[math.log(0.7), math.log(0.2), math.log(0.1)], [0.0, 0.0, 0.0]])
    assert confidence(logits, "max_prob").tolist() == pytest.approx([0.7, 1 / 3])
    assert confidence(logits, "margin").tolist() == pytest.approx([0.5, 0.0], abs=1e-6)
    h = -(0.7 * math.log(0.7) + 0.2 * math.log(0.2) + 0.1 * math.log(0.1))
    assert confidence(logits, "entropy").tolist() == pytest.approx([h, math.log(3)])


@pytest.mark.parametrize(
    "measure, threshold, sure_exits",
    [
        ("max_prob", 0.65, True),
        ("max_prob", 0.75, False),
        ("margin", 0.45, True),
        ("margin", 0.55, False),
        ("entropy", 0.85, True),  # the sure token's entropy is 0.80 nats
        ("entropy", 0.75, False),
    ],
)
def test_early_exit_decision_rule(measure, threshold, sure_exits):
    # token 0 is fairly sure (0.7 / 0.2 / 0.1); token 1 is uniform; token 2 halted earlier
    logits = torch.tensor([[[math.log(0.7), math.log(0.2), math.log(0.1)], [0.0, 0.0, 0.0], [9.0, 0.0, 0.0]]])
    policy = EarlyExit(
        zoo.preset("ponder-pythia-tiny", vocab_size=3, passes=3), threshold=threshold, measure=measure
    )
    mask = torch.tensor([[True, True, False]])
    d = policy.step(0, torch.zeros(1, 3, 4), logits, mask, {}, ctx_for(1, 3, passes=3))
    assert d.mask[0].tolist()[:2] == [not sure_exits, True]
    assert d.gate is None and d.aux_loss is None
    result = run_policy(policy, [torch.zeros(1, 3, 4)] * 2, [logits] * 2, mask=mask)
    assert result.masks[1, 0].tolist() == [not sure_exits, True, False]  # a halted token never resumes
    assert bool((result.gates == 1).all()) and result.aux_loss.item() == 0.0


def test_early_exit_aux_cross_entropy_matches_reference():
    P, B, T, V = 3, 2, 6, 11
    policy = EarlyExit(
        zoo.preset("ponder-pythia-tiny", vocab_size=V, passes=P), threshold=0.99, aux_weight=0.4
    )
    g = torch.Generator().manual_seed(0)
    logits = [torch.randn(B, T, V, generator=g) * 2 for _ in range(P - 1)]
    input_ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 2:] = False  # this row's later tokens halted before: they do not count
    total = torch.zeros(())
    for i in range(P - 1):
        d = policy.step(
            i, torch.zeros(B, T, 4), logits[i], mask, {}, ctx_for(B, T, input_ids=input_ids, passes=P)
        )
        total = total + d.aux_loss
    reference = 0.0
    for i in range(P - 1):
        terms = [
            F.cross_entropy(logits[i][b, t][None], input_ids[b, t + 1][None]).item()
            for b in range(B)
            for t in range(T - 1)
            if mask[b, t]
        ]
        reference += sum(terms) / len(terms)
    assert total.item() == pytest.approx(0.4 * reference / (P - 1), rel=1e-5)
    # without targets there is no term
    d = policy.step(0, torch.zeros(B, T, 4), logits[0], mask, {}, ctx_for(B, T, passes=P))
    assert d.aux_loss is None


@pytest.mark.parametrize("cache", ["kv_reuse", "kv_share", "recursion_wise"])
def test_early_exit_aux_loss_is_the_same_in_sparse_execution(tiny, cache):
    model = tiny("early_exit", passes=3, cache=cache, measure="margin", threshold=0.001, aux_weight=0.5).eval()
    x = ids(B=3, T=24)
    with torch.no_grad():
        dense, sparse = model(x, execution="dense"), model(x, execution="sparse")
    assert dense.depth.min() < dense.depth.max() and torch.equal(dense.depth, sparse.depth)  # some exit
    assert dense.aux_loss.item() > 0
    torch.testing.assert_close(sparse.aux_loss, dense.aux_loss, atol=1e-6, rtol=1e-5)


def test_early_exit_aux_loss_trains_intermediate_passes(tiny):
    model = tiny("early_exit", passes=3, threshold=1.0, aux_weight=1.0)  # threshold 1: nobody exits
    x = ids()
    out = model(x, execution="dense")
    assert bool((out.depth == 3).all()) and out.aux_loss.item() > 0
    out.aux_loss.backward()
    assert model.head.weight.grad.abs().sum() > 0 and model.layers[0].mlp.fc_in.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "kwargs, word",
    [
        (dict(measure="kl"), "measure"),
        (dict(threshold=1.5), "threshold"),
        (dict(measure="entropy", threshold=-1.0), "threshold"),
        (dict(aux_weight=-1.0), "aux_weight"),
    ],
)
def test_early_exit_rejects_bad_kwargs(kwargs, word, tiny):
    with pytest.raises(ValueError, match=word):
        tiny("early_exit", passes=2, **kwargs)


def test_early_exit_without_logits_raises():
    policy = EarlyExit(config(passes=2))
    with pytest.raises(ValueError, match="logits"):
        policy.step(
            0, torch.zeros(1, 2, 8), None, torch.ones(1, 2, dtype=torch.bool), {}, ctx_for(1, 2, passes=2)
        )


# compile-friendliness ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("mlp_gate", dict(threshold=0.5, bias_init=0.0, warmup_steps=2, ramp_steps=4)),
        ("fixed_prune", dict(ratio=0.3, schedule="geometric")),
        ("act", dict(bias_init=0.0)),
        ("early_exit", dict(threshold=0.002)),
    ],
)
def test_policy_compiles_without_breaks_or_recompiles_across_steps(name, kwargs):
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    policy = zoo.registry.HALTING.get(name)(config(passes=3), **kwargs)
    policy.reset_parameters()
    B, T, V = 2, 8, 16
    hidden = [torch.randn(B, T, 8) for _ in range(2)]
    logits = [torch.randn(B, T, V) for _ in range(2)]

    def run(step):
        result = run_policy(policy, hidden, logits, step=step)
        return result.masks, result.aux_loss

    counter = CompileCounter()
    compiled = torch.compile(run, backend=counter, fullgraph=True)  # fullgraph: a break raises
    for step in (0, 3, 100):
        masks, aux = compiled(torch.tensor(step))
        eager_masks, eager_aux = run(torch.tensor(step))
        assert torch.equal(masks, eager_masks) and torch.allclose(aux, eager_aux)
    assert counter.frame_count == 1  # the step is data, not a constant: no recompiles


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("mlp_gate", dict(threshold=0.5, bias_init=0.0, warmup_steps=2, ramp_steps=4)),
        ("fixed_prune", dict(ratio=0.3)),
        ("act", dict(bias_init=-0.5)),
        ("early_exit", dict(threshold=0.002, aux_weight=0.1)),
    ],
)
def test_dense_model_with_policy_compiles_once_across_steps(name, kwargs, tiny):
    from torch._dynamo.testing import CompileCounter

    torch._dynamo.reset()
    model = tiny(name, passes=2, **kwargs)  # one decision: the smallest graph that has them all
    counter = CompileCounter()
    compiled = torch.compile(run_dense, backend=counter, fullgraph=True)
    x = ids()
    for step in (0, 3, 100):
        traced, eager = compiled(model, x, torch.tensor(step)), run_dense(model, x, torch.tensor(step))
        assert torch.allclose(traced.logits, eager.logits, atol=1e-5)
        assert torch.equal(traced.masks, eager.masks) and torch.allclose(traced.aux_loss, eager.aux_loss)
    assert counter.frame_count == 1


@pytest.mark.parametrize(
    "module",
    [
        "zoo.halting.base",
        "zoo.halting.mlp_gate",
        "zoo.halting.fixed_prune",
        "zoo.halting.act",
        "zoo.halting.early_exit",
        "zoo.flops",
        "zoo.registry",
        "zoo.testing.strategies",
        "zoo.testing.drive",
        "zoo.testing.checks",
    ],
)
def test_docstring_examples_run(module):
    import doctest
    import importlib

    torch.manual_seed(0)
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0
