"""Training the AdaPonder gates: the halting losses, the stage-1 options, the trainer's gate
parameter group, and the statistics that judge the result (effective depth, Spearman)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import zoo
from zoo.analysis import evaluate, spearman, token_table
from zoo.data import TokenStream
from zoo.halting.mlp_gate import PAPER, hinge_loss
from zoo.train import TrainConfig, make_optimizer, train

HALT_LOGIT = math.log(1e-4 / (1 - 1e-4))


def ids(B: int = 2, T: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 512, (B, T), generator=torch.Generator().manual_seed(seed))


def gated(seed: int = 0, **kwargs) -> zoo.RecurrentLM:
    torch.manual_seed(seed)
    return zoo.build("adaponder-pythia-tiny", halting_kwargs=kwargs)


# The hinge ----------------------------------------------------------------------------------


@pytest.mark.parametrize("per_gate", [True, False])
@pytest.mark.parametrize("fraction", [0.1, 0.25, 0.5])
def test_minimising_the_hinge_halts_exactly_the_fraction(per_gate, fraction):
    """Whatever the starting logits, the loss's minimum halts floor(fraction * n) tokens per gate
    (or of the pool) and leaves the rest open."""
    torch.manual_seed(0)
    logits = torch.nn.Parameter(torch.randn(3, 4, 40) * 3 + 2)
    active = torch.rand(3, 4, 40) < 0.8
    opt = torch.optim.Adam([logits], lr=0.2)
    for _ in range(400):
        opt.zero_grad()
        loss = hinge_loss(logits, logits.detach(), active, torch.tensor(fraction), HALT_LOGIT, per_gate)
        loss.backward()
        opt.step()
    assert float(loss.detach()) == 0.0
    halted = (logits < HALT_LOGIT) & active
    if per_gate:
        for g in range(3):
            assert int(halted[g].sum()) == math.floor(fraction * int(active[g].sum()))
    else:
        assert int(halted.sum()) == math.floor(fraction * int(active.sum()))
    assert bool((logits[active & ~halted] >= 0).all())


def test_the_hinge_chooses_by_score_and_ignores_inactive_entries():
    logits = torch.full((1, 1, 10), -0.5, requires_grad=True)  # between the two targets
    scores = torch.arange(10.0).view(1, 1, 10)
    active = torch.ones(1, 1, 10, dtype=torch.bool)
    active[..., 0] = False  # the lowest score is not in the pool
    hinge_loss(logits, scores, active, torch.tensor(0.25), HALT_LOGIT).backward()
    grad = logits.grad.view(-1)
    assert grad[0] == 0  # inactive
    assert bool((grad[1:3] > 0).all())  # floor(0.25 * 9) = 2 lowest active scores: pushed down
    assert bool((grad[3:] < 0).all())  # the rest: pushed up towards logit 0


def test_the_hinge_gradient_does_not_vanish_where_the_paper_loss_does():
    """The paper's bottom-k mean of sigmoid values has gradient s(1 - s): almost nothing for a
    gate at 1e-3 that must cross 1e-4. The hinge's gradient is the same wherever its target is unmet."""
    from zoo.halting.mlp_gate import bottom_k_mean

    z = torch.tensor([math.log(1e-3 / (1 - 1e-3)), 3.0], requires_grad=True).view(1, 1, 2)
    active = torch.ones(1, 1, 2, dtype=torch.bool)
    half = torch.tensor(0.5)
    (g_paper,) = torch.autograd.grad(bottom_k_mean(torch.sigmoid(z), active, half), z)
    (g_hinge,) = torch.autograd.grad(hinge_loss(z, z.detach(), active, half, HALT_LOGIT), z)
    assert 0 < g_paper.view(-1)[0] < 1e-3
    assert g_hinge.view(-1)[0] == pytest.approx(0.5)  # 1 / (active tokens)


def test_no_halting_loss_during_warmup():
    model = gated(loss="hinge", warmup_steps=10, ramp_steps=10)
    out = model(ids(), execution="dense", step=5)
    assert out.aux_loss.item() == 0.0
    assert model(ids(), execution="dense", step=30).aux_loss.item() > 0


# Options of the policy ----------------------------------------------------------------------


def test_detached_gates_send_no_halting_gradient_into_the_backbone():
    for detach in (False, True):
        model = gated(loss="hinge", detach=detach)
        model.halting.gates[0][2].bias.data.fill_(-2.0)  # some gates below the keep target
        out = model(ids(), execution="dense", step=None)
        out.aux_loss.backward()
        backbone = model.layers[0].attn.qkv.weight.grad
        gate = model.halting.gates[0][0].weight.grad
        assert gate is not None and float(gate.abs().sum()) > 0
        if detach:
            assert backbone is None or float(backbone.abs().sum()) == 0
        else:
            assert float(backbone.abs().sum()) > 0


def test_open_warmup_holds_every_gate_open_and_untrained():
    model = gated(open_warmup=True, warmup_steps=100, bias_init=-20.0)  # gates would close all
    x = ids()
    early = model(x, execution="dense", step=50)
    assert bool((early.depth == 4).all()) and bool((early.gates == 1).all())
    early.logits.square().mean().backward()
    assert all(p.grad is None or float(p.grad.abs().sum()) == 0 for p in model.halting.parameters())
    late = model(x, execution="dense", step=100)
    assert bool((late.depth == 1).all())  # held no longer: the closed gates halt every token
    # Outside training (step=None) the gates act as they are.
    assert bool((model(x, execution="dense").depth == 1).all())


def test_nll_selection_pushes_down_the_best_predicted_tokens():
    """select='nll': the quarter of pass 0's tokens that pass 0 already predicts best is taught
    to halt, the others to go on; the last position has no target and stays out of the pool."""
    model = gated(loss="hinge", select="nll", pool="per_gate", k_max=0.25)
    for gate in model.halting.gates:
        gate[2].bias.data.fill_(-1.0)  # between the two targets: every token gets a gradient
    x = ids(B=2, T=24)
    heads, gate_logits = [], []
    model.head.register_forward_hook(lambda m, i, o: heads.append(o.detach()))
    model.halting.gates[0].register_forward_hook(lambda m, i, o: gate_logits.append(o))
    out = model(x, execution="dense", step=None)
    gate_logits[0].retain_grad()
    out.aux_loss.backward()
    grad = gate_logits[0].grad.squeeze(-1)  # (B, T)
    nll = torch.nn.functional.cross_entropy(heads[0][:, :-1].flatten(0, 1), x[:, 1:].flatten(), reduction="none")
    k = math.floor(0.25 * nll.numel())
    chosen = torch.zeros(2, 24, dtype=torch.bool)
    chosen[:, :-1] = (nll <= nll.sort().values[k - 1]).view(2, 23)
    assert bool((grad[:, -1] == 0).all())
    assert torch.equal(grad > 0, chosen)
    assert bool((grad[:, :-1][~chosen[:, :-1]] < 0).all())


def test_options_are_checked():
    for kwargs, word in [
        (dict(loss="l2"), "loss"),
        (dict(pool="rows"), "pool"),
        (dict(select="entropy"), "select"),
        (dict(loss="bottom_k", select="nll"), "select='nll'"),
        (dict(detach=1), "detach"),
        (dict(open_warmup="yes"), "open_warmup"),
        (dict(open_logit=float("inf")), "open_logit"),
    ]:
        with pytest.raises(ValueError, match=word):
            gated(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(PAPER),
        dict(loss="hinge", pool="per_gate", select="gate", detach=True, open_warmup=True),
        dict(loss="hinge", pool="all", select="nll"),
    ],
    ids=["paper", "hinge-gate", "hinge-nll"],
)
def test_every_form_is_exact_in_sparse_execution_and_decoding(kwargs):
    model = gated(threshold=0.5, bias_init=0.0, **kwargs).eval()
    x = ids(B=3, T=20)
    with torch.no_grad():
        dense, sparse = model(x, execution="dense"), model(x, execution="sparse")
    assert dense.depth.min() < dense.depth.max()
    assert torch.equal(dense.depth, sparse.depth)
    torch.testing.assert_close(sparse.logits, dense.logits, atol=1e-5, rtol=0)
    gen = model.generate(x[:, :8], max_new_tokens=6)
    full = model(gen.tokens, execution="dense")
    torch.testing.assert_close(gen.logits, full.logits[:, 7:-1], atol=1e-4, rtol=0)
    assert torch.equal(gen.depth, full.depth[:, 7:-1])


# The trainer's gate group ---------------------------------------------------------------------


def test_gate_parameters_get_their_own_rate_and_decay(tmp_path):
    model = gated()
    cfg = TrainConfig(steps=2, lr=1e-3, weight_decay=0.1, halting_lr_scale=3.0, halting_weight_decay=0.0)
    opt = make_optimizer(model, cfg)
    gate_ids = {id(p) for p in model.halting.parameters()}
    for group in opt.param_groups:
        ids_ = {id(p) for p in group["params"]}
        assert ids_ <= gate_ids or not ids_ & gate_ids  # no group mixes gates and backbone
        if ids_ <= gate_ids:
            assert group["lr_scale"] == 3.0 and group["weight_decay"] == 0.0
        else:
            assert group["lr_scale"] == 1.0
    stream = TokenStream(np.arange(4000, dtype=np.uint16) % 500, "toy")
    train(model, stream, TrainConfig(steps=2, batch_size=2, seq_len=16, lr=1e-3, halting_lr_scale=3.0,
                                     progress=False), tmp_path / "run")
    low, high = json_rates(tmp_path / "run")  # the rates of the last step, gates at 3x
    assert high == pytest.approx(3 * low) and low == pytest.approx(1e-4)


def json_rates(run) -> list[float]:
    import json

    folder = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    groups = json.loads((folder / "optimizer.json").read_text())["param_groups"]
    return sorted({g["lr"] for g in groups})


# Statistics -----------------------------------------------------------------------------------


def test_spearman_against_hand_computed_values():
    # ranks of x: 1, 2.5, 2.5, 4; of y: 1, 3, 2, 4 -> Pearson of the ranks
    rx, ry = np.array([1, 2.5, 2.5, 4]), np.array([1, 3, 2, 4])
    rx, ry = rx - rx.mean(), ry - ry.mean()
    expected = (rx * ry).sum() / math.sqrt((rx * rx).sum() * (ry * ry).sum())
    assert spearman([1, 2, 2, 3], [0.1, 0.5, 0.4, 0.9]) == pytest.approx(expected)
    assert spearman(np.arange(50), np.arange(50) ** 3) == pytest.approx(1.0)
    assert spearman(np.arange(50), -np.arange(50.0)) == pytest.approx(-1.0)
    assert spearman([2, 2, 2], [1, 2, 3]) is None


def test_effective_depth_weights_each_pass_by_its_gate():
    model = gated(threshold=1e-4)
    s = 0.3
    for gate in model.halting.gates:
        gate[2].weight.data.zero_()
        gate[2].bias.data.fill_(math.log(s / (1 - s)))  # every gate reads s everywhere
    stats = token_table(model, ids(B=2, T=17))
    assert bool((stats.depth == 4).all())
    torch.testing.assert_close(stats.effective_depth, torch.full((2, 16), 1 + 3 * s), atol=1e-5, rtol=0)
    stream = TokenStream(ids(B=1, T=200)[0].numpy().astype(np.uint16), "toy")
    report = evaluate(model, stream, seq_len=32)
    assert report.effective_depth == pytest.approx(1 + 3 * s, abs=1e-5)
    assert report.depth_nll_spearman is None  # every token ran every pass


@pytest.mark.slow
@pytest.mark.parametrize("select", ["gate", "nll"])
def test_the_hinge_forms_compile_without_graph_breaks_or_recompiles(select):
    from torch._dynamo.testing import CompileCounter

    from zoo.recurrence import run_dense

    torch._dynamo.reset()
    model = gated(loss="hinge", select=select, detach=True, open_warmup=True, warmup_steps=2, ramp_steps=2)
    counter = CompileCounter()
    compiled = torch.compile(run_dense, backend=counter, fullgraph=True)
    x = ids()
    for step in (0, 3, 100):
        traced, eager = compiled(model, x, torch.tensor(step)), run_dense(model, x, torch.tensor(step))
        torch.testing.assert_close(traced.logits, eager.logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(traced.aux_loss, eager.aux_loss, atol=1e-6, rtol=1e-5)
    assert counter.frame_count == 1


@pytest.mark.parametrize("module", ["zoo.iso_flops", "zoo.analysis"])
def test_docstring_examples_run(module):
    import doctest
    import importlib

    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


def test_training_logs_the_effective_depth_for_any_pass_count(tmp_path):
    from zoo.train import read_metrics

    stream = TokenStream(np.arange(4000, dtype=np.uint16) % 500, "toy")
    cfg = TrainConfig(steps=1, batch_size=2, seq_len=16, progress=False)
    for name in ("pythia-tiny", "adaponder-pythia-tiny"):
        torch.manual_seed(0)
        train(zoo.build(name), stream, cfg, tmp_path / name)
        row = read_metrics(tmp_path / name)[0]
        assert 1.0 <= row["effective_depth"] <= row["depth"]
    assert read_metrics(tmp_path / "pythia-tiny")[0]["effective_depth"] == 1.0
