"""Invariants of the pondering core, through the public kit (``zoo.testing``) and by hand.

* every registered halting policy and cache strategy passes ``check_policy`` /
  ``check_cache`` (deterministic, monotone masks, depth bounds, causal, row-independent,
  dense == sparse == decoding, finite gradients), under settings where tokens really halt;
* the kit fails a policy or a cache that breaks a property, naming the property;
* the driver makes any policy's masks monotone and keeps the state of tokens that did not run;
* with ``kv_reuse`` a halted token's logits are those of its halting pass, and ``kv_reuse``
  and ``recursion_wise`` equal ``recompute`` when nothing halts;
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
from zoo.caches.base import Fresh, KVView
from zoo.caches.buffers import PassBuffers
from zoo.caches.kv_reuse import KVReuse
from zoo.halting.base import HaltingPolicy, HaltStep, PassContext
from zoo.halting.mlp_gate import PAPER
from zoo.halting.fixed_prune import SCHEDULES, halt_fractions
from zoo.registry import CACHES, HALTING, REGISTRIES
from zoo.testing import (
    PROPERTIES,
    check_cache,
    check_policy,
    configs,
    halting_kwargs,
    monotone_masks,
    run_policy,
    token_batches,
)

VOCAB = 512
PROPERTY = settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
UNIT = settings(max_examples=25, deadline=None)
BUILT_IN_POLICIES = ["none", "mlp_gate", "fixed_prune", "act", "early_exit"]
BUILT_IN_CACHES = ["kv_reuse", "kv_share", "recompute", "recursion_wise"]


def random_ids(seed: int, B: int, T: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed))


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to float32 rounding (logits of the sharpened head reach about 50)."""
    return torch.allclose(a, b, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def run(model, ids):
    return model(ids, execution="dense")


@pytest.mark.parametrize("halting", BUILT_IN_POLICIES[1:])
def test_settings_halt_some_tokens(halting, tiny_model, halting_settings):
    out = run(tiny_model(halting, halting_settings[halting]), random_ids(0, 4, 32))
    mean = out.depth.float().mean().item()
    assert 1.2 < mean < 3.8, f"{halting} gives mean depth {mean}: the properties would be vacuous"


# The kit on every registered part ------------------------------------------------------------


@pytest.mark.parametrize("halting", BUILT_IN_POLICIES)
def test_every_policy_passes_the_kit(halting, device):
    report = check_policy(halting, examples=12, device=device)
    assert report.cases == 12
    if halting != "none":  # the drawn settings halt tokens: the properties are not vacuous
        assert report.halted_share > 0.05, report


@pytest.mark.parametrize("cache", BUILT_IN_CACHES)
def test_every_cache_passes_the_kit(cache, device):
    report = check_cache(cache, examples=12, device=device)
    assert report.cases == 12 and report.halted_share > 0.05, report


def test_the_kit_covers_every_registered_part():
    assert set(zoo.available("halting")) >= set(BUILT_IN_POLICIES)
    assert set(zoo.available("cache")) == set(BUILT_IN_CACHES)  # a new cache gets the kit here


def test_the_kit_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown halting 'mlp-gate'"):
        check_policy("mlp-gate")
    with pytest.raises(ValueError, match="unknown cache 'kv-reuse'"):
        check_cache("kv-reuse")
    with pytest.raises(ValueError, match="no built-in settings"):
        halting_kwargs("kl_divergence")


# The kit catches what is broken ---------------------------------------------------------------


class _TopHalf(HaltingPolicy):
    """Looks at the whole sequence: a token halts when it is below its row's median."""

    def step(self, index, hidden, logits, mask, state, ctx):
        score = hidden[..., 0]
        return HaltStep(mask=score >= score.median(dim=-1, keepdim=True).values)


class _BatchMean(HaltingPolicy):
    """Looks at the other rows: a token halts below the batch mean at its position."""

    def step(self, index, hidden, logits, mask, state, ctx):
        score = hidden[..., 0]
        return HaltStep(mask=score >= score.mean(0, keepdim=True))


class _Coin(HaltingPolicy):
    """Halts at random (no seed)."""

    def step(self, index, hidden, logits, mask, state, ctx):
        return HaltStep(mask=torch.rand(mask.shape) < 0.5)


class _FirstHalf(HaltingPolicy):
    """Reads the layout's width as if it were the sequence length."""

    def step(self, index, hidden, logits, mask, state, ctx):
        return HaltStep(mask=ctx.positions < ctx.positions.shape[1] // 2)


class _Infinite(HaltingPolicy):
    """A gate that overflows."""

    def step(self, index, hidden, logits, mask, state, ctx):
        return HaltStep(mask=torch.ones_like(mask), gate=torch.full(mask.shape, float("inf")))


class _Flicker(HaltingPolicy):
    """Turns halted tokens back on (every other pass, every other position)."""

    def step(self, index, hidden, logits, mask, state, ctx):
        return HaltStep(mask=(ctx.positions + index) % 2 == 0)


@pytest.fixture
def registered():
    """Registers test parts for one test and removes them after it."""
    saved = {kind: dict(reg._entries) for kind, reg in REGISTRIES.items()}
    yield
    for kind, reg in REGISTRIES.items():
        reg._entries.clear()
        reg._entries.update(saved[kind])


def test_a_policy_that_resumes_tokens_is_made_monotone(registered):
    """The driver ANDs the incoming mask: dense, sparse and decoding agree."""
    HALTING.add("flicker", _Flicker)
    report = check_policy("flicker", examples=8)
    assert report.halted_share > 0.2


class _NoCarry(KVReuse):
    """kv_reuse whose decode store forgets to carry halted tokens' keys forward."""

    def store(self, execution, config, batch, length, like):
        if execution == "decode":
            return PassBuffers(config, batch, length, like, carry=False)
        return super().store(execution, config, batch, length, like)


class _Unmerged(KVReuse):
    """kv_reuse whose dense store recomputes halted tokens' keys (as recompute does)."""

    def store(self, execution, config, batch, length, like):
        if execution == "dense":
            return Fresh(config.num_layers)
        return super().store(execution, config, batch, length, like)


class _Greedy(KVReuse):
    """A decode store that allocates more than the strategy declares."""

    def decode_bytes(self, config, batch, length, dtype=torch.float32):
        return 1


class _ByColumn(HaltingPolicy):
    """Halts by the token's column in the batch instead of its position: padding shifts it."""

    def step(self, index, hidden, logits, mask, state, ctx):
        return HaltStep(mask=torch.arange(hidden.shape[1]) % 2 == 0)


def test_the_kit_catches_a_policy_that_left_padding_changes(registered):
    REGISTRIES["halting"].add("broken", _ByColumn)
    with pytest.raises(AssertionError, match="property 'left padding == alone' fails for halting 'broken'"):
        check_policy("broken", caches=["recompute"], examples=10)  # dense only: padding is the first to break


@pytest.mark.parametrize(
    "kind, part, prop",
    [
        ("halting", _TopHalf, "causal|decoding == full forward"),  # a row-wide decision breaks both
        ("halting", _BatchMean, "row-independent"),
        ("halting", _Coin, "deterministic"),
        ("halting", _FirstHalf, "decoding == full forward|dense == sparse|left padding == alone"),
        ("halting", _Infinite, "gradients finite"),
        ("cache", _NoCarry, "decoding == full forward"),
        ("cache", _Unmerged, "dense == sparse"),
        ("cache", _Greedy, "decode memory within decode_bytes"),
    ],
)
def test_the_kit_names_the_property_a_part_breaks(kind, part, prop, registered):
    REGISTRIES[kind].add("broken", part)
    check = check_policy if kind == "halting" else check_cache
    with pytest.raises(AssertionError, match=rf"property '({prop})' fails for {kind} 'broken'"):
        check("broken", examples=10)
    assert all(name in PROPERTIES for name in prop.split("|"))


# The strategies ------------------------------------------------------------------------------


@settings(max_examples=20, deadline=None)
@given(masks=st.integers(1, 5).flatmap(lambda p: monotone_masks(p, 2, 7)))
def test_monotone_masks_are_monotone(masks):
    assert masks.shape[1:] == (2, 7) and bool(masks[0].all())
    assert not bool((masks[1:] & ~masks[:-1]).any())


@settings(max_examples=10, deadline=None)
@given(config=configs(), ids=token_batches(batch=(1, 2), length=(3, 9)))
def test_drawn_configs_build_and_run(config, ids):
    model = zoo.build_model(config)
    out = run(model, ids)
    assert out.logits.shape == (*ids.shape, VOCAB)
    assert bool(((out.depth >= 1) & (out.depth <= config.passes)).all())


# The driver's bookkeeping ---------------------------------------------------------------------


@UNIT
@given(seed=st.integers(0, 2**16), passes=st.integers(2, 5))
def test_driver_ands_masks_and_keeps_the_state_of_tokens_that_did_not_run(seed, passes):
    """A policy that flips its mask and overwrites its state for every token."""

    class Wild(HaltingPolicy):
        def init_state(self, mask):
            return {"seen": torch.zeros(mask.shape)}

        def step(self, index, hidden, logits, mask, state, ctx):
            g = torch.Generator().manual_seed(seed + index)
            return HaltStep(mask=torch.rand(mask.shape, generator=g) < 0.6, state={"seen": state["seen"] + 1})

    policy = Wild(zoo.preset("ponder-pythia-tiny", passes=passes))
    hidden = [torch.zeros(2, 9, 64)] * (passes - 1)
    result = run_policy(policy, hidden)
    masks = result.masks
    assert bool(masks[0].all()) and not bool((masks[1:] & ~masks[:-1]).any())
    # a token's counter counts the pondering passes it ran: frozen once it halted
    assert torch.equal(result.state["seen"], masks[:-1].sum(0).float())
    assert bool((result.gates == 1).all())  # no gate given: ones


# KV reuse ------------------------------------------------------------------------------------


@pytest.mark.parametrize("halting", ["none", "mlp_gate", "fixed_prune", "early_exit"])
@PROPERTY
@given(data=st.data(), seed=st.integers(0, 2**16))
def test_kv_reuse_freezes_a_halted_tokens_logits_at_its_halting_pass(halting, data, seed, tiny_model):
    kwargs = data.draw(halting_kwargs(halting), label="kwargs")
    P = 4
    model = tiny_model(halting, kwargs, cache="kv_reuse", passes=P, seed=seed)
    ids = random_ids(seed, 2, 16)
    full = run(model, ids)
    state = model.state_dict()
    for j in range(1, P + 1):
        # The same model stopped after pass j - 1: its output is every token's pass-(j-1) logits.
        truncated = tiny_model(halting, kwargs, cache="kv_reuse", passes=j)
        gates = {f"halting.gates.{i}." for i in range(j - 1, P - 1)}
        truncated.load_state_dict({k: v for k, v in state.items() if not any(k.startswith(g) for g in gates)})
        out = run(truncated, ids)
        assert torch.equal(out.depth, full.depth.clamp(max=j))  # the same decisions up to pass j - 1
        halted_here = full.depth == j
        assert close(out.logits[halted_here], full.logits[halted_here])


NEVER = {
    "none": {},
    "mlp_gate": {"threshold": 0.0},  # s >= 0 always holds
    "fixed_prune": {"ratio": 0.0},
    "act": {"bias_init": -30.0},  # cumulative probability stays ~1e-13
    "early_exit": {"measure": "max_prob", "threshold": 1.0},  # an unsharpened head is never sure
}


@pytest.mark.parametrize("cache", ["kv_reuse", "recursion_wise"])
@pytest.mark.parametrize("halting", BUILT_IN_POLICIES)
@PROPERTY
@given(recurrence=st.sampled_from(["ponder", "loop"]), seed=st.integers(0, 2**16))
def test_freezing_caches_equal_recompute_when_nothing_halts(cache, halting, recurrence, seed, tiny_model):
    ids = random_ids(seed, 2, 12)
    same = dict(recurrence=recurrence, seed=seed, sharpen=1.0)
    frozen = run(tiny_model(halting, NEVER[halting], cache=cache, **same), ids)
    recompute = run(tiny_model(halting, NEVER[halting], cache="recompute", **same), ids)
    assert bool((frozen.depth == 4).all()) and bool((recompute.depth == 4).all())
    assert close(frozen.logits, recompute.logits)


# Per-token decisions in any layout --------------------------------------------------------


@pytest.mark.parametrize("halting", ["mlp_gate", "fixed_prune", "act", "early_exit"])
@UNIT
@given(data=st.data(), seed=st.integers(0, 2**16))
def test_policy_decides_per_token_in_any_layout(halting, data, seed):
    """Sparse execution and decoding call ``step`` on gathered tokens laid out (B', N)."""
    kwargs = data.draw(halting_kwargs(halting), label="kwargs")
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
    for name in ("gate", "weight"):
        a, b = getattr(part, name), getattr(whole, name)
        assert (a is None) == (b is None) and (a is None or torch.allclose(a, pick(b), atol=1e-6))
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
    hidden = [torch.randn(B, T, config.dim, generator=g) * scale for _ in range(passes - 1)]
    result = run_policy(pol, hidden)
    weights, masks = result.weights, result.masks
    assert bool((weights[:-1][~masks[:-1]] == 0).all())  # a token takes no weight at passes it did not run
    total = weights.sum(0)
    assert torch.allclose(total, torch.ones_like(total), atol=1e-5)
    assert bool((weights >= 0).all())
    last = masks[-1]
    assert bool((weights[-1][~last] == 0).all()) and bool((weights[-1][last] > epsilon - 1e-6).all())
    depth = masks.sum(0).float()
    assert result.aux_loss.item() >= pol.tau * depth.mean().item() - 1e-6


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
        result = run_policy(policy, [torch.zeros(1, 40_000, 1)] * (passes - 1), positions=wide)
        first, second = result.masks[1], result.masks[2]
        active = first.sum().item()
        if active >= 5_000:
            halted = (first & ~second).sum().item() / active
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


@pytest.mark.parametrize("halting", BUILT_IN_POLICIES)
@PROPERTY
@given(
    data=st.data(),
    recurrence=st.sampled_from(["none", "ponder", "loop"]),
    cache=st.sampled_from(BUILT_IN_CACHES),
    seed=st.integers(0, 2**16),
)
def test_one_pass_with_unit_embedding_scale_is_gpt_neox(halting, data, recurrence, cache, seed):
    kwargs = data.draw(halting_kwargs(halting), label="kwargs")
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
    cache=st.sampled_from(BUILT_IN_CACHES),
    embed_scale=st.floats(0.5, 8.0),
    initial_mult=st.floats(1.0, 3.0),
    seed=st.integers(0, 2**16),
)
def test_ponder_without_halting_is_the_pondering_loop(
    passes, block, cache, embed_scale, initial_mult, seed, tiny_model
):
    model = tiny_model(
        cache=cache,
        passes=passes,
        block=block,
        seed=seed,
        sharpen=1.0,
        embed_scale=embed_scale,
        initial_embed_mult=initial_mult,
    )
    ids = random_ids(seed, 2, 12)
    with torch.no_grad():
        # PonderLM by hand: E^0 = c m Embed(x); E^{i+1} = E^i + softmax(Z^i) @ (c Embed.weight);
        # under kv_share every later pass attends to each layer's keys and values of pass 0.
        rope = model.rotary(torch.arange(ids.shape[1]))
        x = model.embed(ids) * embed_scale * initial_mult
        first_pass = []
        for i in range(passes):
            h = x
            for index, layer in enumerate(model.layers):
                if cache == "kv_share" and i > 0:
                    h, _ = layer(h, rope, Given(first_pass[index]))
                else:
                    h, kv = layer(h, rope)
                    first_pass.append(kv)
            logits = model.head(model.final_norm(h))
            if i < passes - 1:
                x = x + F.softmax(logits, dim=-1) @ (embed_scale * model.embed.weight)
        out = run(model, ids)
    assert bool((out.depth == passes).all())
    assert close(out.logits, logits)


class Given(KVView):
    """Hands a layer the keys and values it is given; the layer projects queries only."""

    projects_kv = False

    def __init__(self, kv):
        self.kv = kv

    def update(self, k, v):
        return self.kv[0], self.kv[1], None, True
