"""torch.compile: no graph breaks in the dense loop, no recompiles across decode steps."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounter

import zoo
from zoo.compile import BUCKET
from zoo.recurrence import run_dense, stack_pass


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture
def make(tiny_model, plain_halting_settings):
    """Factory: a tiny model whose policy halts some tokens (early_exit with its per-pass loss)."""
    settings = {**plain_halting_settings}
    settings["early_exit"] = {**settings["early_exit"], "aux_weight": 0.5}

    def build(policy: str, cache: str = "kv_reuse"):
        return tiny_model(policy, settings[policy], cache=cache, sharpen=1.0)

    return build


@pytest.mark.parametrize(
    "policy, cache",
    [(policy, "kv_reuse") for policy in ("act", "early_exit", "fixed_prune", "mlp_gate", "none")]
    + [("mlp_gate", cache) for cache in ("kv_share", "recompute", "recursion_wise")],
)
def test_dense_forward_has_no_graph_breaks(policy, cache, make, device):
    model = make(policy, cache).to(device)
    ids = torch.randint(0, 512, (2, 24), device=device)
    explanation = torch._dynamo.explain(run_dense)(model, ids, torch.tensor(5, device=device))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def left_padded(B: int = 3, T: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, 512, (B, T), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    mask[-1, : T - 2] = 0
    return ids, mask


def test_padded_dense_forward_has_no_graph_breaks(make):
    model = make("mlp_gate")
    ids, mask = left_padded()
    explanation = torch._dynamo.explain(run_dense)(model, ids, torch.tensor(5), mask == 0)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_compiled_padded_batches_equal_eager(make):
    """Traced by dynamo with the static layout (bucketed slots); inductor's code generation
    is the same as unpadded, so the eager backend keeps this quick."""
    eager = make("fixed_prune").eval()
    compiled = zoo.compile(make("fixed_prune"), backend="eager").eval()
    ids, mask = left_padded()
    a, b = eager.generate(ids, 6, attention_mask=mask), compiled.generate(ids, 6, attention_mask=mask)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.depth, b.depth)
    torch.testing.assert_close(b.logits, a.logits, atol=2e-5, rtol=0)
    with torch.no_grad():
        for execution in ("dense", "sparse"):
            torch.testing.assert_close(
                compiled(ids, attention_mask=mask, execution=execution).logits,
                eager(ids, attention_mask=mask, execution=execution).logits,
                atol=2e-5,
                rtol=0,
            )


def test_compile_swaps_the_models_functions_and_uncompile_swaps_them_back(make):
    model = make("mlp_gate")
    assert (model.dense_fn, model.pass_fn, model.slot_bucket) == (run_dense, stack_pass, None)
    zoo.compile(model, backend="eager")
    assert model.dense_fn is not run_dense and model.pass_fn is not stack_pass
    assert model.slot_bucket == BUCKET == 64
    zoo.uncompile(model)
    assert (model.dense_fn, model.pass_fn, model.slot_bucket) == (run_dense, stack_pass, None)


def test_compiled_equals_eager_forward_and_backward(make, device):
    eager = make("mlp_gate").to(device)
    compiled = zoo.compile(make("mlp_gate").to(device))
    ids = torch.randint(0, 512, (2, 32), device=device)
    losses = []
    for model in (eager, compiled):
        out = model(ids, execution="dense", step=torch.tensor(3, device=device))
        loss = out.logits.float().logsumexp(-1).mean() + out.aux_loss
        loss.backward()
        losses.append((out, loss))
    (a, _), (b, _) = losses
    torch.testing.assert_close(b.logits, a.logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(a.depth, b.depth)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("cache", ["kv_reuse", "kv_share", "recursion_wise"])
def test_compiled_decoding_equals_eager(cache, make, device):
    eager = make("mlp_gate", cache).to(device).eval()
    compiled = zoo.compile(make("mlp_gate", cache).to(device)).eval()
    prompt = torch.randint(0, 512, (3, 10), device=device)
    a = eager.generate(prompt, 12)
    b = compiled.generate(prompt, 12)
    assert torch.equal(a.tokens, b.tokens)
    assert torch.equal(a.depth, b.depth)
    torch.testing.assert_close(b.logits, a.logits, atol=2e-5, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(
            compiled(prompt, execution="sparse").logits, eager(prompt, execution="sparse").logits, atol=2e-5, rtol=0
        )


def test_decode_step_compiles_once(make, randomize, device):
    """Prefill compiles two frames (the fresh first pass, later passes); every decode step
    shares one, over 200 steps whose halting differs from step to step."""
    counts, depths = {}, None
    for steps in (2, 200):
        torch._dynamo.reset()
        counter = CompileCounter()
        model = randomize(make("mlp_gate"), seed=3).to(device)  # random gates: about half the tokens halt
        model = zoo.compile(model, backend=counter).eval()
        prompt = torch.randint(0, 512, (3, 10), generator=torch.Generator().manual_seed(0)).to(device)
        depths = model.generate(prompt, steps, output_logits=False).depth
        counts[steps] = counter.frame_count
    assert counts[2] == counts[200] == 3, counts
    per_step = [tuple(row) for row in depths.T.tolist()]
    assert len(set(per_step)) > 10, "the decode steps halt alike: the test would say little"


def test_sparse_prefill_recompiles_bounded_by_buckets(make):
    counter = CompileCounter()
    model = zoo.compile(make("fixed_prune"), backend=counter).eval()
    with torch.no_grad():
        for T in (70, 90, 100, 120):  # slot counts fall into two 64-buckets
            model(torch.randint(0, 512, (2, T)))
    # first pass (fresh, one shape per T until dynamic) + later passes (per bucket)
    assert counter.frame_count <= 6, counter.frame_count
