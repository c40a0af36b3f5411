"""Invariants of the pondering core, over random inputs, seeds and policy settings.

Every policy is run with settings that make tokens really halt (the plain test
``test_settings_halt_some_tokens`` keeps that true), so the properties are not vacuous:

* masks are monotone, ``depth == 1 + active pondering passes``, ``1 <= depth <= P``;
* decisions are causal: later tokens change nothing at earlier positions;
* a batch gives each row's numbers;
* with ``kv_reuse`` a halted token's logits are those of its halting pass;
* ``kv_reuse`` equals ``recompute`` when nothing halts;
* a policy decides per token, whatever layout its tokens come in;
* ACT's weights sum to one; the bottom-k loss equals a sorted reference; fixed pruning
  halts its scheduled fraction;
* one pass with embedding scale 1 is GPT-NeoX (transformers), and PonderLM equals a loop
  written out here from the model's own modules.
"""

from __future__ import annotations

import math
from functools import lru_cache

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import zoo
from zoo.halting.mlp_gate import PAPER
from zoo.halting.base import PassContext
from zoo.halting.fixed_prune import SCHEDULES, halt_fractions
from zoo.registry import HALTING

VOCAB = 512
# Model-level properties run per policy (pytest parameter), so each policy gets its own search.
PROPERTY = settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
UNIT = settings(max_examples=25, deadline=None)

# Settings under which each policy halts a good share of tokens of the model built by
# ``make`` (its head is scaled up so that next-token distributions range from flat to peaked).
KWARGS = {
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
MIDDLE = {
    "mlp_gate": {"threshold": 0.5, "bias_init": 0.0},
    "fixed_prune": {"ratio": 0.3},
    "act": {"bias_init": -0.5},
    "early_exit": {"measure": "max_prob", "threshold": 0.9},
}
NON_MIXING = ["none", "mlp_gate", "fixed_prune", "early_exit"]


ALL = list(KWARGS)


def make(
    halting: str,
    kwargs: dict,
    cache: str = "kv_reuse",
    recurrence: str = "ponder",
    passes: int = 4,
    seed: int = 0,
    block: str = "neox",
    sharpen: float = 20.0,
) -> zoo.RecurrentLM:
    torch.manual_seed(seed)
    extra = dict(block="llama", rotary_fraction=1.0, num_kv_heads=2) if block == "llama" else {}
    model = zoo.build(
        "ponder-pythia-tiny",
        recurrence=recurrence,
        passes=passes,
        halting=halting,
        halting_kwargs=kwargs,
        cache=cache,
        **extra,
    )
    with torch.no_grad():
        model.head.weight.mul_(sharpen)
    return model


def random_ids(seed: int, B: int, T: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to float32 rounding (logits of the sharpened head reach about 50)."""
    return torch.allclose(a, b, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def run(model, ids):
    return model(ids, execution="dense")


@pytest.mark.parametrize("halting", list(MIDDLE))
def test_settings_halt_some_tokens(halting):
    out = run(make(halting, MIDDLE[halting]), random_ids(0, 4, 32))
    mean = out.depth.float().mean().item()
    assert 1.2 < mean < 3.8, f"{halting} gives mean depth {mean}: the properties would be vacuous"


# Masks and depth --------------------------------------------------------------------------


@pytest.mark.parametrize("halting", ALL)
@PROPERTY
@given(
    data=st.data(),
    cache=st.sampled_from(["kv_reuse", "recompute"]),
    recurrence=st.sampled_from(["ponder", "loop"]),
    passes=st.integers(2, 5),
    seed=st.integers(0, 2**16),
)
def test_masks_are_monotone_and_depth_counts_passes(halting, data, cache, recurrence, passes, seed):
    kwargs = data.draw(KWARGS[halting], label="kwargs")
    out = run(make(halting, kwargs, cache, recurrence, passes, seed), random_ids(seed, 2, 12))
    masks = out.masks
    assert masks.shape == (passes, 2, 12) and out.gates.shape == (passes - 1, 2, 12)
    assert bool(masks[0].all())
    assert not bool((masks[1:] & ~masks[:-1]).any())  # never halted -> active
    assert torch.equal(out.depth, masks.sum(0))
    assert torch.equal(out.depth, 1 + masks[1:].sum(0))
    assert bool(((out.depth >= 1) & (out.depth <= passes)).all())
    assert bool(torch.isfinite(out.logits).all()) and bool(torch.isfinite(out.aux_loss))


# Causality and batching -------------------------------------------------------------------


@pytest.mark.parametrize("halting", ALL)
@PROPERTY
@given(
    data=st.data(),
    cache=st.sampled_from(["kv_reuse", "recompute"]),
    cut=st.integers(0, 14),
    seed=st.integers(0, 2**16),
)
def test_later_tokens_change_nothing_before(halting, data, cache, cut, seed):
    kwargs = data.draw(KWARGS[halting], label="kwargs")
    model = make(halting, kwargs, cache, seed=seed)
    ids = random_ids(seed, 2, 16)
    changed = ids.clone()
    changed[:, cut + 1 :] = random_ids(seed + 1, 2, 16)[:, cut + 1 :]
    a, b = run(model, ids), run(model, changed)
    keep = slice(0, cut + 1)
    assert torch.equal(a.depth[:, keep], b.depth[:, keep])
    assert close(a.logits[:, keep], b.logits[:, keep])


@pytest.mark.parametrize("halting", ALL)
@PROPERTY
@given(data=st.data(), cache=st.sampled_from(["kv_reuse", "recompute"]), seed=st.integers(0, 2**16))
def test_a_batch_gives_each_rows_numbers(halting, data, cache, seed):
    kwargs = data.draw(KWARGS[halting], label="kwargs")
    model = make(halting, kwargs, cache, seed=seed)
    ids = random_ids(seed, 3, 12)
    batch = run(model, ids)
    for b in range(3):
        row = run(model, ids[b : b + 1])
        assert torch.equal(row.depth[0], batch.depth[b])
        assert close(row.logits[0], batch.logits[b])


# KV reuse ----------------------------------------------------------------------------------


@pytest.mark.parametrize("halting", NON_MIXING)
@PROPERTY
@given(data=st.data(), seed=st.integers(0, 2**16))
def test_kv_reuse_freezes_a_halted_tokens_logits_at_its_halting_pass(halting, data, seed):
    kwargs = data.draw(KWARGS[halting], label="kwargs")
    P = 4
    model = make(halting, kwargs, "kv_reuse", passes=P, seed=seed)
    ids = random_ids(seed, 2, 16)
    full = run(model, ids)
    state = model.state_dict()
    for j in range(1, P + 1):
        # The same model stopped after pass j - 1: its output is every token's pass-(j-1) logits.
        truncated = make(halting, kwargs, "kv_reuse", passes=j)
        gates = {f"halting.gates.{i}." for i in range(j - 1, P - 1)}
        truncated.load_state_dict({k: v for k, v in state.items() if not any(k.startswith(g) for g in gates)})
        out = run(truncated, ids)
        assert torch.equal(out.depth, full.depth.clamp(max=j))  # the same decisions up to pass j - 1
        halted_here = full.depth == j
        assert close(out.logits[halted_here], full.logits[halted_here])


@pytest.mark.parametrize("halting", ALL)
@PROPERTY
@given(
    bias=st.floats(-1.0, 1.0),
    recurrence=st.sampled_from(["ponder", "loop"]),
    seed=st.integers(0, 2**16),
)
def test_kv_reuse_equals_recompute_when_nothing_halts(halting, bias, recurrence, seed):
    never = {
        "none": {},
        "mlp_gate": {"threshold": 0.0, "bias_init": bias},  # s >= 0 always holds
        "fixed_prune": {"ratio": 0.0},
        "act": {"bias_init": -30.0 + bias},  # cumulative probability stays ~1e-13
        "early_exit": {"measure": "max_prob", "threshold": 1.0},  # an unsharpened head is never sure
    }[halting]
    ids = random_ids(seed, 2, 12)
    reuse = run(make(halting, never, "kv_reuse", recurrence, seed=seed, sharpen=1.0), ids)
    recompute = run(make(halting, never, "recompute", recurrence, seed=seed, sharpen=1.0), ids)
    assert bool((reuse.depth == 4).all()) and bool((recompute.depth == 4).all())
    assert close(reuse.logits, recompute.logits)


# Per-token decisions in any layout --------------------------------------------------------


@pytest.mark.parametrize("halting", ["mlp_gate", "fixed_prune", "act", "early_exit"])
@UNIT
@given(data=st.data(), seed=st.integers(0, 2**16))
def test_policy_decides_per_token_in_any_layout(halting, data, seed):
    """Sparse execution and decoding call ``step`` on gathered tokens laid out (B', N)."""
    kwargs = data.draw(KWARGS[halting], label="kwargs")
    config = zoo.preset("ponder-pythia-tiny", passes=4)
    torch.manual_seed(seed)
    pol = HALTING.get(halting)(config, **kwargs)
    pol.reset_parameters()
    g = torch.Generator().manual_seed(seed)
    B, T, d = 3, 10, config.dim
    hidden = torch.randn(B, T, d, generator=g)
    logits = torch.randn(B, T, VOCAB, generator=g) * 8
    mask = torch.rand(B, T, generator=g) < 0.8
    state = {k: torch.rand(v.shape, generator=g) * 0.9 for k, v in pol.init_state(mask).items()}
    positions = torch.arange(T).expand(B, T)
    index = 1
    whole = pol.step(index, hidden, logits, mask, state, PassContext(positions, None, None, 4))

    perm = torch.randperm(B * T, generator=g)[: 2 * 7]  # a subset of the tokens, shuffled, as (2, 7)

    def pick(x):
        return x.flatten(0, 1)[perm].unflatten(0, (2, 7))

    part = pol.step(
        index,
        pick(hidden),
        pick(logits),
        pick(mask),
        {k: pick(v) for k, v in state.items()},
        PassContext(pick(positions), None, None, 4),
    )
    assert torch.equal(part.mask, pick(whole.mask))
    assert torch.allclose(part.gate, pick(whole.gate), atol=1e-6)
    if whole.weight is not None:
        assert torch.allclose(part.weight, pick(whole.weight), atol=1e-6)
    for key, value in (whole.state or {}).items():
        assert torch.allclose(part.state[key], pick(value), atol=1e-6)


# ACT, bottom-k, fixed pruning ---------------------------------------------------------------


@UNIT
@given(
    passes=st.integers(1, 6),
    bias=st.floats(-3.0, 3.0),
    epsilon=st.floats(0.001, 0.5),
    scale=st.floats(0.0, 5.0),
    seed=st.integers(0, 2**16),
)
def test_act_weights_sum_to_one(passes, bias, epsilon, scale, seed):
    config = zoo.preset("ponder-pythia-tiny", passes=passes)
    torch.manual_seed(seed)
    pol = HALTING.get("act")(config, epsilon=epsilon, bias_init=bias)
    pol.reset_parameters()
    g = torch.Generator().manual_seed(seed)
    B, T = 2, 9
    mask = torch.ones(B, T, dtype=torch.bool)
    ctx = PassContext(torch.arange(T).expand(B, T), None, None, passes)
    state, masks, gates, weights = pol.init_state(mask), [mask], [], []
    for i in range(passes - 1):
        d = pol.step(i, torch.randn(B, T, config.dim, generator=g) * scale, None, mask, state, ctx)
        assert bool((d.weight[~mask] == 0).all())  # a halted token takes no more weight
        state, mask = d.state, d.mask
        masks.append(mask)
        gates.append(d.gate)
        weights.append(d.weight)
    gate_stack = torch.stack(gates) if gates else torch.zeros(0, B, T)
    final, aux = pol.finish(gate_stack, torch.stack(masks), state, ctx)
    weights.append(final)
    total = torch.stack(weights).sum(0)
    assert torch.allclose(total, torch.ones_like(total), atol=1e-5)
    assert bool((torch.stack(weights) >= 0).all())
    assert bool((final[~mask] == 0).all()) and bool((final[mask] > epsilon - 1e-6).all())
    depth = torch.stack(masks).sum(0).float()
    assert aux.item() >= pol.tau * depth.mean().item() - 1e-6


@UNIT
@given(
    depth_list=st.lists(st.integers(1, 4), min_size=1, max_size=24),
    fraction=st.floats(0.0, 1.0),
    lam=st.floats(0.01, 2.0),
    seed=st.integers(0, 2**16),
)
def test_bottom_k_loss_equals_sorted_reference(depth_list, fraction, lam, seed):
    P = 4
    policy = HALTING.get("mlp_gate")(
        zoo.preset("ponder-pythia-tiny", passes=P), k_max=fraction, lam=lam, **PAPER
    )
    depth = torch.tensor(depth_list)[None]  # (1, T)
    masks = torch.stack([depth > i for i in range(P)])  # (P, 1, T), monotone
    gates = torch.rand(
        P - 1, 1, len(depth_list), generator=torch.Generator().manual_seed(seed)
    ).requires_grad_()
    _, aux = policy.finish(gates, masks, {}, PassContext(torch.arange(len(depth_list))[None], None, None, P))

    pool = sorted(
        (gates[i, 0, t].item(), (i, t))
        for i in range(P - 1)
        for t in range(len(depth_list))
        if masks[i, 0, t]
    )
    k = math.floor(fraction * len(pool))
    expected = lam * sum(v for v, _ in pool[:k]) / k if k else 0.0
    assert aux.item() == pytest.approx(expected, rel=1e-5, abs=1e-7)
    if k:  # the gradient is lam / k on the k chosen gates and zero elsewhere
        aux.backward()
        chosen = torch.zeros_like(gates)
        for _, (i, t) in pool[:k]:
            chosen[i, 0, t] = lam / k
        assert torch.allclose(gates.grad, chosen, atol=1e-6)


@settings(max_examples=15, deadline=None)
@given(
    ratio=st.floats(0.05, 0.95),
    schedule=st.sampled_from(SCHEDULES),
    passes=st.integers(2, 5),
    seed=st.integers(0, 2**62),
    rows=st.sampled_from([1, 10, 100]),
)
def test_fixed_prune_halts_its_scheduled_fraction(ratio, schedule, passes, seed, rows):
    config = zoo.preset("ponder-pythia-tiny", passes=passes)
    policy = HALTING.get("fixed_prune")(config, ratio=ratio, schedule=schedule, seed=seed)
    n = 10_000
    positions = torch.arange(n).view(rows, n // rows)  # any layout of 10,000 distinct positions
    all_active = torch.ones_like(positions, dtype=torch.bool)
    ctx = PassContext(positions, None, None, passes)
    hidden = torch.zeros(*positions.shape, 1)
    for i, fraction in enumerate(halt_fractions(ratio, passes, schedule)):
        # each pass, over 10,000 tokens active at it: the scheduled fraction halts
        decision = policy.step(i, hidden, None, all_active, {}, ctx)
        halted = (~decision.mask).float().mean().item()
        assert abs(halted - fraction) <= 0.03, (i, halted, fraction)
    # and successive passes draw independently: among the first pass's survivors of 40,000
    # tokens, the second pass still halts its own fraction
    if passes >= 3:
        wide = torch.arange(40_000)[None]
        wide_ctx = PassContext(wide, None, None, passes)
        survivors = policy.step(
            0, torch.zeros(1, 40_000, 1), None, torch.ones_like(wide, dtype=torch.bool), {}, wide_ctx
        )
        second = policy.step(1, torch.zeros(1, 40_000, 1), None, survivors.mask, {}, wide_ctx)
        active = survivors.mask.sum().item()
        if active >= 5_000:
            halted = (survivors.mask & ~second.mask).sum().item() / active
            assert abs(halted - halt_fractions(ratio, passes, schedule)[1]) <= 0.03


# References ----------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def reference_neox():
    """A random transformers GPT-NeoX with the tiny presets' shape, every weight random."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    hf = GPTNeoXForCausalLM(
        GPTNeoXConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=256,
            max_position_embeddings=256,
            rotary_pct=0.25,
            use_parallel_residual=True,
            tie_word_embeddings=False,
        )
    ).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in hf.named_parameters():
            noise = torch.randn(param.shape, generator=g) * 0.2
            param.copy_(noise + 1.0 if "layernorm" in name and name.endswith("weight") else noise)
    return hf


def neox_to_zoo(name: str) -> str:
    """GPT-NeoX parameter names -> this library's (written out here, independently of zoo.interop)."""
    table = {
        "gpt_neox.embed_in.": "embed.",
        "gpt_neox.final_layer_norm.": "final_norm.",
        "embed_out.": "head.",  # transformers 4.x
        "lm_head.": "head.",  # transformers 5.x
        "input_layernorm.": "attn_norm.",
        "post_attention_layernorm.": "mlp_norm.",
        "attention.query_key_value.": "attn.qkv.",
        "attention.dense.": "attn.proj.",
        "mlp.dense_h_to_4h.": "mlp.fc_in.",
        "mlp.dense_4h_to_h.": "mlp.fc_out.",
        "gpt_neox.layers.": "layers.",
    }
    for old, new in table.items():
        name = name.replace(old, new)
    return name


@pytest.mark.parametrize("halting", ALL)
@PROPERTY
@given(
    data=st.data(),
    recurrence=st.sampled_from(["none", "ponder", "loop"]),
    cache=st.sampled_from(["kv_reuse", "recompute"]),
    seed=st.integers(0, 2**16),
)
def test_one_pass_with_unit_embedding_scale_is_gpt_neox(halting, data, recurrence, cache, seed):
    kwargs = data.draw(KWARGS[halting], label="kwargs")
    hf = reference_neox()
    model = zoo.build(
        "pythia-tiny",
        recurrence=recurrence,
        passes=1,
        embed_scale=1.0,
        halting=halting,
        halting_kwargs=kwargs,
        cache=cache,
    )
    weights = {
        neox_to_zoo(k): v for k, v in hf.state_dict().items() if "rotary" not in k and "masked_bias" not in k
    }
    missing, unexpected = model.load_state_dict(weights, strict=False)
    assert not unexpected and not missing
    ids = random_ids(seed, 2, 20)
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
    out = run(model, ids)
    assert expected.abs().max() > 1.0  # a non-trivial model, so a wiring error shows
    assert bool((out.depth == 1).all())
    assert close(out.logits, expected)


@settings(max_examples=12, deadline=None)
@given(
    passes=st.integers(1, 4),
    block=st.sampled_from(["neox", "llama"]),
    cache=st.sampled_from(["kv_reuse", "recompute"]),
    embed_scale=st.floats(0.5, 8.0),
    initial_mult=st.floats(1.0, 3.0),
    seed=st.integers(0, 2**16),
)
def test_ponder_without_halting_is_the_pondering_loop(passes, block, cache, embed_scale, initial_mult, seed):
    torch.manual_seed(seed)
    extra = dict(block="llama", rotary_fraction=1.0, num_kv_heads=2) if block == "llama" else {}
    model = zoo.build(
        "ponder-pythia-tiny",
        passes=passes,
        cache=cache,
        embed_scale=embed_scale,
        initial_embed_mult=initial_mult,
        **extra,
    )
    ids = random_ids(seed, 2, 12)
    with torch.no_grad():
        # PonderLM by hand: E^0 = c m Embed(x); E^{i+1} = E^i + softmax(Z^i) @ (c Embed.weight)
        positions = torch.arange(ids.shape[1])
        rope = model.rotary(positions)
        x = model.embed(ids) * embed_scale * initial_mult
        for i in range(passes):
            h = x
            for layer in model.layers:
                h, _ = layer(h, rope)
            logits = model.head(model.final_norm(h))
            if i < passes - 1:
                x = x + F.softmax(logits, dim=-1) @ (embed_scale * model.embed.weight)
        out = run(model, ids)
    assert bool((out.depth == passes).all())
    assert close(out.logits, logits)
