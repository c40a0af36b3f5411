"""Sparse execution against dense, and incremental decoding against the full forward,
for every cache strategy; the decode stores' memory formulas."""

from __future__ import annotations

import pytest
import torch

import zoo
from zoo.caches.base import kv_bytes
from zoo.layout import select
from zoo.recurrence import run_passes, stack_pass

POLICIES = ["act", "early_exit", "fixed_prune", "mlp_gate", "none"]
FREEZING = ["kv_reuse", "kv_share", "recursion_wise"]  # the strategies that allow sparse execution
BLOCKS = {"neox": {}, "llama": {"block": "llama", "rotary_fraction": 1.0, "num_kv_heads": 2, "bias": False}}


@pytest.fixture
def make(tiny_model, plain_halting_settings):
    """Factory: a tiny model in eval() mode, its policy set to halt some tokens and not others.

    The head is left as initialised, so that logits stay near 1 and the comparisons below
    can ask for float32 rounding in absolute terms.
    """

    def build(policy: str, recurrence: str = "ponder", cache: str = "kv_reuse", block: str = "neox", seed: int = 0):
        kwargs = plain_halting_settings[policy]
        return tiny_model(
            policy, kwargs, cache=cache, recurrence=recurrence, block=block, seed=seed, sharpen=1.0
        ).eval()

    return build


def ids(B: int = 3, T: int = 40, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 512, (B, T), generator=torch.Generator().manual_seed(seed))


def assert_partial(depth: torch.Tensor, passes: int = 4) -> None:
    """Real partial halting: mixed depths, and rows that do not halt alike."""
    assert depth.min() < depth.max(), depth
    assert not all(torch.equal(depth[0], row) for row in depth[1:]), "rows halt identically"


@pytest.mark.parametrize("cache", FREEZING)
@pytest.mark.parametrize("block", ["neox", "llama"])
@pytest.mark.parametrize("recurrence", ["ponder", "loop"])
@pytest.mark.parametrize("policy", POLICIES)
def test_sparse_equals_dense(policy, recurrence, block, cache, make, device):
    model = make(policy, recurrence, cache, block=block).to(device)
    x = ids().to(device)
    with torch.no_grad():
        dense = model(x, execution="dense")
        sparse = model(x, execution="sparse")
    if policy not in ("none", "fixed_prune"):
        assert_partial(dense.depth)
    assert torch.equal(dense.depth, sparse.depth)
    assert torch.equal(dense.masks, sparse.masks)
    torch.testing.assert_close(sparse.logits, dense.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(sparse.aux_loss, dense.aux_loss, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("cache", FREEZING)
def test_sparse_computes_only_active_tokens(cache, make):
    model = make("fixed_prune", cache=cache)
    shapes = []

    def spy(model, x, rope, views):
        shapes.append(tuple(x.shape[:2]))
        return stack_pass(model, x, rope, views)

    model.pass_fn = spy  # the explicit attribute zoo.compile swaps
    with torch.no_grad():
        out = model(ids())
    active = out.masks.sum((1, 2)).tolist()  # tokens that ran each pass
    assert shapes[0] == (3, 40)
    for (rows, slots), n_active in zip(shapes[1:], active[1:]):
        # fixed_prune halts the same positions in every row: no padding at all.
        assert rows * slots == n_active
    assert sum(r * s for r, s in shapes) < 4 * 3 * 40


def test_default_execution_and_recompute_refusal(make):
    model = make("mlp_gate")
    assert model.resolve_execution(None) == "sparse"
    model.train()
    assert model.resolve_execution(None) == "dense"
    recompute = make("mlp_gate", cache="recompute")
    assert recompute.resolve_execution(None) == "dense"
    with pytest.raises(ValueError, match="kv_reuse"):
        recompute(ids(), execution="sparse")
    with pytest.raises(ValueError, match="execution must be one of"):
        model(ids(), execution="fast")


@pytest.mark.parametrize("cache", [*FREEZING, "recompute"])
@pytest.mark.parametrize("policy", POLICIES)
def test_decoding_reproduces_full_forward(policy, cache, make, device):
    model = make(policy, cache=cache).to(device)
    prompt = ids(B=3, T=12).to(device)
    gen = model.generate(prompt, 16)
    assert gen.tokens.shape == (3, 28)
    assert torch.equal(gen.tokens[:, :12], prompt)
    with torch.no_grad():
        full = model(gen.tokens, execution="dense")
    T = prompt.shape[1]
    torch.testing.assert_close(gen.logits, full.logits[:, T - 1 : T - 1 + 16], atol=2e-5, rtol=0)
    assert torch.equal(gen.depth, full.depth[:, T - 1 : T - 1 + 16])
    assert torch.equal(gen.tokens[:, T:], gen.logits.argmax(-1))  # greedy
    if policy not in ("none", "fixed_prune"):
        assert_partial(gen.depth)


def test_sampling_is_reproducible_and_filtered(make):
    model = make("mlp_gate")
    prompt = ids(B=2, T=6)
    a = model.generate(prompt, 12, temperature=1.0, seed=7)
    b = model.generate(prompt, 12, temperature=1.0, seed=7)
    c = model.generate(prompt, 12, temperature=1.0, seed=8)
    assert torch.equal(a.tokens, b.tokens)
    assert not torch.equal(a.tokens, c.tokens)
    greedy = model.generate(prompt, 12)
    top1 = model.generate(prompt, 12, temperature=1.0, top_k=1, seed=3)
    assert torch.equal(greedy.tokens, top1.tokens)
    nucleus = model.generate(prompt, 12, temperature=1.0, top_p=1e-6, seed=3)
    assert torch.equal(greedy.tokens, nucleus.tokens)
    # Sampled tokens still follow the full forward.
    with torch.no_grad():
        full = model(a.tokens, execution="dense")
    torch.testing.assert_close(a.logits, full.logits[:, 5:17], atol=2e-5, rtol=0)


def test_eos_rows_stop_and_cost_nothing(make):
    model = make("fixed_prune")
    prompt = ids(B=3, T=8)
    reference = model.generate(prompt, 10)
    eos = int(reference.tokens[0, 8 + 2])  # row 0 emits this at step 2
    rows_per_step = []

    def spy(model, x, rope, views):
        rows_per_step.append(x.shape[0])
        return stack_pass(model, x, rope, views)

    model.pass_fn = spy
    gen = model.generate(prompt, 10, eos_token_id=eos)
    first = (reference.tokens[:, 8:] == eos).float().argmax(1)  # first eos step per row (0 if none)
    for row in range(3):
        hit = bool((reference.tokens[row, 8:] == eos).any())
        if hit:
            stop = int(first[row])
            assert torch.all(gen.tokens[row, 8 + stop :] == eos)
            assert torch.all(gen.depth[row, stop + 1 :] == 0)
            assert torch.all(gen.logits[row, stop + 1 :] == 0)
        else:
            assert torch.equal(gen.tokens[row], reference.tokens[row])
    # After row 0 stops, no pass computes it: pass 0 of later steps runs fewer rows.
    assert min(rows_per_step[1:]) < 3


def test_generate_rejects_bad_arguments(make):
    model = make("none")
    prompt = ids(B=1, T=250)
    with pytest.raises(ValueError, match="max_seq_len"):
        model.generate(prompt, 10)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(prompt[:, :5], 2, temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        model.generate(prompt[:, :5], 2, temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(prompt[:, :5], 0)
    with pytest.raises(ValueError, match="eos_token_id"):
        model.generate(prompt[:, :5], 2, eos_token_id=10_000)


@pytest.mark.parametrize("cache", ["kv_reuse", "recompute"])
def test_per_pass_decode_store_memory_formula(cache, make):
    model = make("mlp_gate", cache=cache)
    cfg = model.config
    store = model.cache.store("decode", cfg, 2, 21, model.embed.weight)
    assert store.length == 24  # rounded up to a multiple of 8
    assert store.nbytes() == model.cache.decode_bytes(cfg, 2, 21) == kv_bytes(cfg, 2, 24, torch.float32) * 4
    assert store.nbytes() == 4 * cfg.num_layers * 2 * 2 * 24 * cfg.kv_heads * cfg.head_dim * 4
    assert model.cache.decode_bytes(cfg, 2, 21, torch.bfloat16) == store.nbytes() // 2


def test_kv_share_decodes_with_one_cache(make):
    model = make("mlp_gate", cache="kv_share")
    cfg = model.config
    store = model.cache.store("decode", cfg, 2, 21, model.embed.weight)
    one = cfg.num_layers * 2 * 2 * 24 * cfg.kv_heads * cfg.head_dim * 4  # one cache of 24 positions
    assert store.nbytes() == model.cache.decode_bytes(cfg, 2, 21) == one
    assert one * cfg.passes == make("mlp_gate").cache.decode_bytes(cfg, 2, 21)  # kv_reuse: one per pass


def test_recursion_wise_decode_store_holds_the_tokens_that_ran_each_pass(make):
    """Pass i holds max_b n_i(b) + M entries per row (rounded up to 8): less when tokens halt."""
    model = make("fixed_prune", cache="recursion_wise")
    cfg = model.config
    prompt, new = ids(B=3, T=40), 9
    store = model.cache.store("decode", cfg, 3, 40 + new, model.embed.weight)
    with torch.no_grad():
        out = run_passes(model, prompt, store, sparse=True, last_only=True)
    reached = out.masks.sum(2).max(1).values.tolist()  # (P,) the most prompt tokens of a row at each pass
    capacity = [-(-(n + new) // 8) * 8 for n in reached]
    per_entry = cfg.num_layers * 2 * 3 * cfg.kv_heads * cfg.head_dim * 4
    assert reached[0] == 40 and reached[-1] < 40  # fixed_prune halts tokens before the last pass
    assert store.nbytes() == per_entry * sum(capacity) < model.cache.decode_bytes(cfg, 3, 40 + new)
    assert store.filled.tolist() == out.masks.sum(2).tolist()  # entries per pass and row


def test_selection_layout():
    runs = torch.tensor([[1, 0, 1, 1, 0, 0, 1, 0], [0] * 8, [1, 1, 0, 1, 1, 1, 0, 1]], dtype=torch.bool)
    sel = select(runs, start=5)
    assert sel.rows.tolist() == [0, 2] and sel.padded and not sel.full
    assert sel.index[0, :4].tolist() == [0, 2, 3, 6] and sel.index[1].tolist() == [0, 1, 3, 4, 5, 7]
    assert sel.valid.sum(1).tolist() == [4, 6]
    assert torch.equal(sel.columns(), sel.index + 5)
    values = torch.arange(3 * 8).view(3, 8).float()
    assert torch.equal(sel.gather(values)[sel.valid], values[runs])
    target = torch.zeros(3, 8)
    sel.commit(target, sel.gather(values))
    assert torch.equal(target, torch.where(runs, values, 0.0))  # padding slots write nothing
    compiled = select(runs, bucket=4)
    assert compiled.rows.tolist() == [0, 1, 2] and compiled.index.shape == (3, 8)  # static layout
    assert select(torch.zeros(2, 3, dtype=torch.bool)) is None


@pytest.mark.parametrize("rows", [1, 2, 7, 32, 33])
def test_vocab_products_fast_forms_are_the_same_products(rows, monkeypatch):
    """The decoding forms equal the plain products (float32 rounding); never taken with autograd."""
    import zoo.blocks.head as vocab

    monkeypatch.setattr(vocab, "FAST_MIN_NUMEL", 0)
    torch.manual_seed(0)
    head = vocab.VocabHead(48, 320)
    h = torch.randn(rows, 1, 48)
    probs = torch.softmax(torch.randn(rows, 1, 320), -1)
    calls = {"mm": 0, "bmm": 0}

    def counted(name):
        original = getattr(torch, name)

        def call(*args):
            calls[name] += 1
            return original(*args)

        return call

    for name in calls:
        monkeypatch.setattr(torch, name, counted(name))
    with torch.no_grad():
        logits, mixed = head(h), vocab.expected_embedding(probs, head.weight)
    assert logits.shape == (rows, 1, 320) and logits.is_contiguous() and mixed.shape == (rows, 1, 48)
    torch.testing.assert_close(logits, torch.nn.functional.linear(h, head.weight), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed, probs @ head.weight, atol=1e-6, rtol=1e-5)
    assert calls == {"mm": int(2 <= rows <= vocab.FAST_ROWS), "bmm": int(rows <= vocab.FAST_ROWS)}
    uneven_probs, uneven_weight = probs[..., :317], head.weight[:317]  # 317 does not split in 8
    with torch.no_grad():
        plain = uneven_probs @ uneven_weight
        assert torch.equal(vocab.expected_embedding(uneven_probs, uneven_weight), plain)
    assert calls["bmm"] == int(rows <= vocab.FAST_ROWS)
    head(h).sum().backward()  # training: plain F.linear, gradients as nn.Linear's
    assert calls["mm"] == int(2 <= rows <= vocab.FAST_ROWS) and head.weight.grad is not None


def test_decoding_with_the_fast_vocab_products_reproduces_full_forward(monkeypatch, make):
    import zoo.blocks.head as vocab

    monkeypatch.setattr(vocab, "FAST_MIN_NUMEL", 0)
    model = make("mlp_gate")
    prompt = ids(B=3, T=40)  # the full forward (168 rows) takes the plain products, a step (3 rows) the fast
    gen = model.generate(prompt, 16)
    with torch.no_grad():
        full = model(gen.tokens, execution="dense")
    torch.testing.assert_close(gen.logits, full.logits[:, 39:55], atol=2e-5, rtol=0)
    assert torch.equal(gen.depth, full.depth[:, 39:55])
    assert_partial(gen.depth)
