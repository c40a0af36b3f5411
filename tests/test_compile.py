"""torch.compile: no graph breaks in the dense loop, no recompiles across decode steps."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.testing import CompileCounter

import zoo

PARTIAL = {
    "none": {},
    "mlp_gate": {"threshold": 0.5, "bias_init": 0.0},
    "fixed_prune": {"ratio": 0.4},
    "act": {"bias_init": 0.0},
    "early_exit": {"measure": "margin", "threshold": 0.001, "aux_weight": 0.5},
}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def make(policy: str, cache: str = "kv_reuse"):
    torch.manual_seed(0)
    return zoo.build("ponder-pythia-tiny", halting=policy, halting_kwargs=PARTIAL[policy], cache=cache)


@pytest.mark.parametrize("policy", sorted(PARTIAL))
def test_dense_forward_has_no_graph_breaks(policy):
    model = make(policy)
    ids = torch.randint(0, 512, (2, 24))
    explanation = torch._dynamo.explain(model.dense_forward)(ids, torch.tensor(5))
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_compiled_equals_eager_forward_and_backward():
    eager = make("mlp_gate")
    compiled = zoo.compile(make("mlp_gate"))
    ids = torch.randint(0, 512, (2, 32))
    losses = []
    for model in (eager, compiled):
        out = model(ids, execution="dense", step=3)
        loss = out.logits.float().logsumexp(-1).mean() + out.aux_loss
        loss.backward()
        losses.append((out, loss))
    (a, _), (b, _) = losses
    torch.testing.assert_close(b.logits, a.logits, atol=1e-5, rtol=1e-5)
    assert torch.equal(a.depth, b.depth)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_compiled_decoding_equals_eager():
    eager = make("mlp_gate").eval()
    compiled = zoo.compile(make("mlp_gate")).eval()
    prompt = torch.randint(0, 512, (3, 10))
    a = eager.generate(prompt, 12)
    b = compiled.generate(prompt, 12)
    assert torch.equal(a.tokens, b.tokens)
    assert torch.equal(a.depth, b.depth)
    torch.testing.assert_close(b.logits, a.logits, atol=2e-5, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(
            compiled(prompt, execution="sparse").logits, eager(prompt, execution="sparse").logits, atol=2e-5, rtol=0
        )


def test_decode_step_compiles_once():
    """Prefill compiles two frames (the fresh first pass, later passes); all decode steps share one."""
    counts = {}
    for steps in (2, 21):
        torch._dynamo.reset()
        counter = CompileCounter()
        model = zoo.compile(make("mlp_gate"), backend=counter).eval()
        prompt = torch.randint(0, 512, (3, 10))
        model.generate(prompt, steps)
        counts[steps] = counter.frame_count
    assert counts[2] == counts[21] == 3, counts


def test_sparse_prefill_recompiles_bounded_by_buckets():
    counter = CompileCounter()
    model = zoo.compile(make("fixed_prune"), backend=counter).eval()
    with torch.no_grad():
        for T in (70, 90, 100, 120):  # slot counts fall into two 64-buckets
            model(torch.randint(0, 512, (2, T)))
    # first pass (fresh, one shape per T until dynamic) + later passes (per bucket)
    assert counter.frame_count <= 6, counter.frame_count
