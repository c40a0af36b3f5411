"""FLOPs accounting: hand counts on tiny configs, and torch's own counter on dense forwards."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import zoo
from zoo import flops
from zoo.flops import MacCount

# A config small enough to count by hand: V = 16, d = 8, one layer, H = 2 heads of D = 4,
# MLP width f = 32, P = 3 passes.
SMALL = dict(vocab_size=16, dim=8, num_layers=1, num_heads=2, rotary_fraction=0.5, passes=3)
DEPTH = torch.tensor([[3, 1, 2, 3]])  # positions 0..3


def small(name: str = "adaponder-pythia-tiny", **overrides):
    return zoo.preset(name, **{**SMALL, **overrides})


def test_mlp_gate_sparse_hand_count():
    config = small(halting="mlp_gate", halting_kwargs={"hidden_mult": 1})
    count = flops.count(config, DEPTH, execution="sparse")
    # tokens running pass 0, 1, 2: 4, 3 (depth > 1: positions 0, 2, 3), 2 (positions 0, 3): 9 in all
    # keys attended (t + 1 per query): pass 0: 1+2+3+4 = 10, pass 1: 1+3+4 = 8, pass 2: 1+4 = 5
    assert count.qkv == 9 * 8 * (2 + 2 * 2) * 4  # d * (H + 2 H_kv) * D per token: 192
    assert count.attention == (10 + 8 + 5) * 2 * 2 * 4  # scores + values: 2 H D per key: 16
    assert count.attn_out == 9 * 8 * 8
    assert count.mlp == 9 * 2 * 8 * 32
    assert count.head == 9 * 16 * 8  # PonderLM computes logits at every pass a token runs
    assert count.ponder_embed == (3 + 2) * 16 * 8  # tokens taking the update into passes 1 and 2
    assert count.gates == (4 + 3) * (8 * 8 + 8 * 1)  # gates after passes 0 and 1: d*kd + kd*1
    assert count.total == 1728 + 368 + 576 + 4608 + 1152 + 640 + 504 == 9576
    assert count.flops == 2 * 9576
    assert count.layers == 1728 + 368 + 576 + 4608


def test_recursion_wise_attends_only_running_keys():
    config = small(halting="mlp_gate", halting_kwargs={"hidden_mult": 1}, cache="recursion_wise")
    count = flops.count(config, DEPTH, execution="sparse")
    reuse = flops.count(config.replace(cache="kv_reuse"), DEPTH, execution="sparse")
    # running keys up to each running query: pass 0: 1+2+3+4 = 10; pass 1 (positions 0, 2, 3):
    # 1+2+3 = 6; pass 2 (positions 0, 3): 1+2 = 3
    assert count.attention == (10 + 6 + 3) * 16
    assert count.attention < reuse.attention == (10 + 8 + 5) * 16
    assert count.total - count.attention == reuse.total - reuse.attention
    # dense execution computes every token at every pass: causal attention over all of them
    dense = flops.count(config, DEPTH, execution="dense")
    assert dense.attention == 3 * 10 * 16


def test_kv_share_projects_keys_and_values_at_the_first_pass_only():
    config = small(halting="mlp_gate", halting_kwargs={"hidden_mult": 1}, cache="kv_share")
    count = flops.count(config, DEPTH, execution="sparse")
    # queries: d * H * D = 64 per token that runs a pass (9); keys and values:
    # d * 2 * H_kv * D = 128 per token of pass 0 (4)
    assert count.qkv == 9 * 64 + 4 * 128
    reuse = flops.count(config.replace(cache="kv_reuse"), DEPTH, execution="sparse")
    assert count.attention == reuse.attention and count.qkv < reuse.qkv == 9 * 192
    dense = flops.count(config, DEPTH, execution="dense")
    assert dense.qkv == 12 * 64 + 4 * 128


def test_dense_counts_every_token_at_every_pass():
    config = small(halting="mlp_gate", halting_kwargs={"hidden_mult": 1})
    dense = flops.count(config, DEPTH, execution="dense")
    assert dense == MacCount(
        qkv=12 * 192,
        attention=3 * 10 * 16,
        attn_out=12 * 64,
        mlp=12 * 512,
        head=12 * 128,
        ponder_embed=2 * 4 * 128,
        gates=2 * 4 * 72,
    )
    assert dense == flops.count(config, torch.full_like(DEPTH, 3), execution="sparse")
    assert dense.total == 12832


def test_relative_measures_by_hand():
    config = small(halting="mlp_gate", halting_kwargs={"hidden_mult": 1})
    # the reference is 3-pass PonderLM, the dense count without gates: 12832 - 576 = 12256
    assert flops.relative_to_full(config, DEPTH) == pytest.approx(9576 / 12256)
    # one plain pass: qkv 4*192 + attention 10*16 + out 4*64 + mlp 4*512 + head 4*128 = 3744
    assert flops.relative_to_single_pass(config, DEPTH) == pytest.approx(9576 / 3744)
    assert flops.relative_to_single_pass(config, DEPTH, layers_only=True) == pytest.approx(7280 / 3232)
    assert flops.relative_to_full(config, DEPTH, layers_only=True) == pytest.approx(
        7280 / (12 * (192 + 64 + 512) + 30 * 16)
    )
    ponder = small("ponder-pythia-tiny")
    assert flops.relative_to_single_pass(ponder, torch.full((2, 64), 3), layers_only=True) == pytest.approx(
        3.0
    )
    assert flops.relative_to_full(ponder, torch.full((2, 64), 3)) == pytest.approx(1.0)


def test_loop_act_and_early_exit_head_accounting():
    # loop + mlp_gate: no logits between passes (one head per token), no pondering embedding
    loop = flops.count(small(halting="mlp_gate", recurrence="loop", halting_kwargs={"hidden_mult": 1}), DEPTH)
    assert (loop.head, loop.ponder_embed, loop.gates) == (4 * 128, 0, 7 * 72)
    # loop + early_exit: the policy reads logits at every pass a token runs
    exit_ = flops.count(small(halting="early_exit", recurrence="loop"), DEPTH)
    assert (exit_.head, exit_.ponder_embed, exit_.gates) == (9 * 128, 0, 0)
    # ponder + act: logits at pondering passes (4 + 3), plus one head on the mixed output (4);
    # a unit is d MACs per token per pondering pass
    act = flops.count(small(halting="act"), DEPTH)
    assert (act.head, act.ponder_embed, act.gates) == ((4 + 3 + 4) * 128, 5 * 128, 7 * 8)
    # the layers do not depend on the policy
    assert loop.layers == exit_.layers == act.layers == 7280


def test_grouped_query_swiglu_hand_count():
    config = small(
        "ponder-pythia-tiny", block="llama", num_heads=4, num_kv_heads=2, rotary_fraction=1.0, mlp_dim=12
    )
    count = flops.count(config, torch.tensor([[2, 2]]), execution="dense")  # 2 tokens x 3 passes = 6
    assert count.qkv == 6 * 8 * (4 + 2 * 2) * 2  # H = 4 query heads, 2 key/value heads of D = 2
    assert count.attention == 3 * (1 + 2) * 2 * 4 * 2
    assert count.mlp == 6 * 3 * 8 * 12  # SwiGLU: gate and up (2 d f), down (f d)


def test_pythia_70m_layer_count_is_twelve_d_squared_per_token():
    count = flops.count(zoo.preset("pythia-70m"), 1, seq_len=2048)
    assert count.layers - count.attention == 2048 * 6 * 12 * 512**2
    assert count.head == 2048 * 50304 * 512
    assert count.attention == 6 * 2 * 512 * (2048 * 2049 // 2)


@pytest.mark.parametrize(
    "recurrence, halting",
    [
        ("none", "none"),
        ("ponder", "none"),
        ("ponder", "mlp_gate"),
        ("ponder", "act"),
        ("loop", "early_exit"),
        ("loop", "mlp_gate"),
        ("loop", "act"),
        ("ponder", "fixed_prune"),
    ],
)
@pytest.mark.parametrize("block", ["neox", "llama"])
@pytest.mark.parametrize("cache", ["recompute", "kv_share", "recursion_wise"])
def test_dense_count_matches_torch_flop_counter(recurrence, halting, block, cache):
    extra = dict(rotary_fraction=1.0, num_kv_heads=2) if block == "llama" else {}
    model = zoo.build(
        "ponder-pythia-tiny",
        recurrence=recurrence,
        passes=1 if recurrence == "none" else 3,
        halting=halting,
        block=block,
        cache=cache,
        **extra,
    )
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(0))
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(ids, execution="dense")
    measured = counter.get_flop_counts()["Global"]
    # torch counts every matrix product it runs; attention (SDPA) is counted by hand above,
    # since its counter ignores causality (and on CPU may not count it at all).
    attention_ops = sum(v for op, v in measured.items() if "attention" in str(op))
    count = flops.count(model, torch.ones(2, 16, dtype=torch.long), execution="dense")
    assert counter.get_total_flops() - attention_ops == 2 * (count.total - count.attention)


def test_depth_layouts_agree():
    config = small(halting="fixed_prune")
    assert flops.count(config, DEPTH[0]) == flops.count(config, DEPTH)
    assert flops.count(config, 2, seq_len=4) == flops.count(config, torch.full((1, 4), 2))
    model = zoo.build_model(config)
    assert flops.count(model, DEPTH) == flops.count(config, DEPTH)
    # the default execution follows the cache: kv_reuse -> sparse, recompute -> dense
    assert flops.count(config, DEPTH) == flops.count(config, DEPTH, execution="sparse")
    recompute = config.replace(cache="recompute")
    assert flops.count(recompute, DEPTH) == flops.count(recompute, DEPTH, execution="dense")


def test_fewer_passes_cost_less():
    config = small(halting="mlp_gate")
    full = flops.count(config, torch.full((1, 6), 3)).total
    one_less = torch.full((1, 6), 3)
    one_less[0, 4] = 2
    assert flops.count(config, one_less).total < full


@pytest.mark.parametrize(
    "kwargs, word",
    [
        (dict(depth=torch.tensor([[0, 1]])), "1..passes"),
        (dict(depth=torch.tensor([[4, 1]])), "1..passes"),
        (dict(depth=torch.tensor([[1.5, 1.0]])), "integers"),
        (dict(depth=torch.ones(1, 1, 2, dtype=torch.long)), "shape"),
        (dict(depth=2), "seq_len"),
        (dict(depth=[1, 2]), "tensor"),
        (dict(depth=torch.tensor([[1, 2]]), execution="fast"), "execution"),
    ],
)
def test_count_rejects_bad_input(kwargs, word):
    with pytest.raises(ValueError, match=word):
        flops.count(small(halting="mlp_gate"), **kwargs)


def test_sparse_count_needs_a_freezing_cache():
    with pytest.raises(ValueError, match="kv_reuse"):
        flops.count(small(halting="mlp_gate", cache="recompute"), DEPTH, execution="sparse")
    with pytest.raises(ValueError, match="RecurrentLM or a ModelConfig"):
        flops.count("adaponder-pythia-tiny", DEPTH)
