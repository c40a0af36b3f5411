"""The trainer: schedule, optimizer groups, exact resume, checkpoints, non-finite loss, SIGTERM."""

from __future__ import annotations

import json
import math
import os
import signal

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import zoo
from zoo.checkpoint import load
from zoo.data import ByteTokenizer, TokenStream, load_corpus
from zoo.train import (
    NonFiniteLossError,
    TrainConfig,
    latest_checkpoint,
    lr_at,
    make_optimizer,
    read_metrics,
    train,
)

GATES = {"warmup_steps": 3, "ramp_steps": 3}


@pytest.fixture(scope="module")
def corpus() -> tuple[TokenStream, TokenStream]:
    return load_corpus("embedded", ByteTokenizer())


def tiny(seed: int = 0, **overrides) -> zoo.RecurrentLM:
    torch.manual_seed(seed)
    overrides.setdefault("halting_kwargs", GATES)
    return zoo.build("adaponder-pythia-tiny", **overrides)


def config(**kw) -> TrainConfig:
    base = dict(
        steps=8, batch_size=4, micro_batch_size=2, seq_len=32, lr=3e-3, warmup_steps=2, progress=False
    )
    return TrainConfig(**{**base, **kw})


# Schedule and optimizer ---------------------------------------------------------------------


def test_cosine_schedule_with_warmup_and_floor():
    cfg = TrainConfig(steps=1001, lr=6e-4, warmup_steps=10)
    lrs = [lr_at(s, cfg) for s in range(1001)]
    assert lrs[0] == pytest.approx(6e-5) and lrs[9] == pytest.approx(6e-4)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:10]))  # warm-up rises
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))  # cosine falls
    assert lrs[-1] == pytest.approx(6e-5)  # floor: 0.1 x peak
    assert min(lrs[10:]) >= 6e-5 - 1e-15
    midpoint = 10 + (1001 - 1 - 10) // 2  # half-way through the cosine
    assert lr_at(midpoint, cfg) == pytest.approx(6e-5 + 0.5 * 5.4e-4, rel=1e-12)


def test_weight_decay_on_matrices_only_and_frozen_parameters_left_out():
    model = tiny()
    opt = make_optimizer(model, TrainConfig(steps=1, weight_decay=0.1))
    decay = [p for g in opt.param_groups if g["weight_decay"] == 0.1 for p in g["params"]]
    no_decay = [p for g in opt.param_groups if g["weight_decay"] == 0.0 for p in g["params"]]
    assert len(decay) + len(no_decay) == sum(len(g["params"]) for g in opt.param_groups)
    assert all(p.dim() >= 2 for p in decay) and all(p.dim() < 2 for p in no_decay)
    n_params = len({id(p) for p in model.parameters()})
    assert len(decay) + len(no_decay) == n_params
    assert opt.defaults["betas"] == (0.9, 0.95)
    for name, p in model.named_parameters():
        p.requires_grad_(name.startswith("halting."))
    gates_only = make_optimizer(model, TrainConfig(steps=1))
    assert sum(len(g["params"]) for g in gates_only.param_groups) == len(list(model.halting.parameters()))


def test_bad_settings_are_value_errors(corpus, tmp_path):
    with pytest.raises(ValueError, match="stop_after must lie in"):
        TrainConfig(steps=5, stop_after=9)
    with pytest.raises(ValueError, match="multiple of processes x micro_batch_size"):
        train(tiny(), corpus[0], config(batch_size=5, micro_batch_size=2), tmp_path)
    with pytest.raises(ValueError, match="exceeds the model's max_seq_len"):
        train(tiny(), corpus[0], config(seq_len=4096), tmp_path)
    with pytest.raises(ValueError, match="matches no parameter"):
        train(tiny(), corpus[0], config(train_only=("nothing.",)), tmp_path)


# Running, resuming, checkpoints ---------------------------------------------------------------


def test_loss_falls_and_metrics_are_written(corpus, tmp_path):
    result = train(tiny(), corpus[0], config(steps=20, lr=1e-2), tmp_path, val_data=corpus[1])
    rows = read_metrics(tmp_path)
    assert [r["step"] for r in rows] == list(range(1, 21))
    for key in ("loss", "aux_loss", "lr", "depth", "grad_norm", "tokens", "tokens_per_s"):
        assert all(math.isfinite(r[key]) for r in rows), key
    assert [r["loss"] for r in rows] == result.losses
    assert np.mean(result.losses[-4:]) < np.mean(result.losses[:4]) - 0.5
    assert rows[-1]["tokens"] == 20 * 4 * 32
    assert all(1.0 <= r["depth"] <= 4.0 for r in rows)
    # The mlp_gate schedule reads the step: no bottom-k loss during its warm-up stage.
    assert all(r["aux_loss"] == 0.0 for r in rows[:3]) and all(r["aux_loss"] > 0.0 for r in rows[4:])
    assert result.stopped is None and result.checkpoint == latest_checkpoint(tmp_path)


def test_resume_is_bit_exact_and_checkpoint_holds_everything(corpus, tmp_path):
    cfg = config(steps=10, checkpoint_every=3)
    straight = train(tiny(), corpus[0], cfg, tmp_path / "a")

    first = train(tiny(), corpus[0], config(steps=10, checkpoint_every=3, stop_after=5), tmp_path / "b")
    assert first.stopped == "stop_after" and first.checkpoint.name == "step-000005"
    torch.manual_seed(1234)  # the resumed run must not depend on the process's RNG at start
    second = train(tiny(seed=99), corpus[0], cfg, tmp_path / "b", resume=True)
    assert first.losses + second.losses == straight.losses
    assert [r["loss"] for r in read_metrics(tmp_path / "b")] == straight.losses

    folder = latest_checkpoint(tmp_path / "b")
    assert folder.name == "step-000010"
    assert sorted(p.name for p in folder.parent.iterdir()) == ["latest", "step-000009", "step-000010"]
    final = load(folder / "model")
    reference = load(latest_checkpoint(tmp_path / "a") / "model")
    for (name, a), b in zip(final.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b), name
    optim = load_file(folder / "optimizer.safetensors")
    assert {"embed.weight::exp_avg", "embed.weight::exp_avg_sq", "embed.weight::step"} <= set(optim)
    assert float(optim["embed.weight::step"]) == 10.0
    trainer = json.loads((folder / "trainer.json").read_text())
    assert trainer["step"] == 10 and trainer["data"]["position"] == 10
    assert set(load_file(folder / "rng.safetensors")) == {"cpu.0"}


def test_fresh_run_in_used_folder_and_mismatched_resume_are_refused(corpus, tmp_path):
    with pytest.raises(ValueError, match="holds no checkpoint"):
        train(tiny(), corpus[0], config(steps=2), tmp_path, resume=True)
    train(tiny(), corpus[0], config(steps=2), tmp_path)
    with pytest.raises(ValueError, match="already holds a run"):
        train(tiny(), corpus[0], config(steps=2), tmp_path)
    with pytest.raises(ValueError, match="trained with lr=0.003, this run asks for 0.001"):
        train(tiny(), corpus[0], config(steps=2, lr=1e-3), tmp_path, resume=True)


def test_accumulation_gives_the_same_step(corpus, tmp_path):
    whole = train(tiny(), corpus[0], config(steps=4, micro_batch_size=4), tmp_path / "a")
    split = train(tiny(), corpus[0], config(steps=4, micro_batch_size=1), tmp_path / "b")
    np.testing.assert_allclose(split.losses, whole.losses, rtol=0, atol=1e-5)


def test_train_only_the_gates_leaves_the_backbone_untouched(corpus, tmp_path):
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train(model, corpus[0], config(steps=3, train_only=("halting.",), step_offset=10), tmp_path)
    for name, value in model.state_dict().items():
        changed = not torch.equal(value, before[name])
        assert changed == name.startswith("halting."), name
    assert read_metrics(tmp_path)[0]["aux_loss"] > 0  # step_offset 10: past the gates' warm-up


# Failure handling ---------------------------------------------------------------------------


def _on_forward(model: zoo.RecurrentLM, call: int, action) -> None:
    """Runs ``action(output)`` at the ``call``-th forward of the final norm (one per micro-step)."""
    calls = {"n": 0}

    def hook(module, args, output):
        calls["n"] += 1
        return action(output) if calls["n"] == call else output

    model.final_norm.register_forward_hook(hook)


def test_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(corpus, tmp_path):
    cfg = config(steps=8, checkpoint_every=2)
    clean = train(tiny(), corpus[0], config(steps=8, checkpoint_every=2, stop_after=4), tmp_path / "clean")
    model = tiny()
    # Final norm runs P = 4 times per micro-step, 2 micro-steps per step: call 41 is in step 6.
    _on_forward(model, 41, lambda out: out * float("nan"))
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 6.*step-000004 \(step 4\)"):
        train(model, corpus[0], cfg, tmp_path / "run")
    assert latest_checkpoint(tmp_path / "run").name == "step-000004"
    kept = load(latest_checkpoint(tmp_path / "run") / "model")
    reference = load(clean.checkpoint / "model")
    for (name, a), b in zip(kept.state_dict().items(), reference.state_dict().values()):
        assert torch.equal(a, b) and torch.isfinite(a).all(), name
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3, 4, 5]
    # The kept checkpoint resumes and finishes the run.
    resumed = train(tiny(), corpus[0], cfg, tmp_path / "run", resume=True)
    assert resumed.step == 8 and all(math.isfinite(x) for x in resumed.losses)


def test_sigterm_checkpoints_then_resume_matches(corpus, tmp_path):
    cfg = config(steps=6)
    straight = train(tiny(), corpus[0], cfg, tmp_path / "a")
    model = tiny()
    _on_forward(model, 17, lambda out: (os.kill(os.getpid(), signal.SIGTERM), out)[1])  # during step 3
    stopped = train(model, corpus[0], cfg, tmp_path / "b")
    assert stopped.stopped == "sigterm" and stopped.step == 3
    assert latest_checkpoint(tmp_path / "b").name == "step-000003"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is removed again
    resumed = train(tiny(), corpus[0], cfg, tmp_path / "b", resume=True)
    assert stopped.losses + resumed.losses == straight.losses


@pytest.mark.slow
def test_compile_option_trains_through_the_compiled_forward(corpus, tmp_path, monkeypatch):
    import importlib

    module = importlib.import_module("zoo.compile")  # the attribute zoo.compile is the function
    real, compiled = module.compile, []

    def eager_backend(model, **options):  # dynamo traces the graph; no inductor build, so it is quick
        compiled.append(model)
        return real(model, backend="eager")

    monkeypatch.setattr(module, "compile", eager_backend)
    model = tiny(passes=2)  # two passes: half the graph to trace
    result = train(model, corpus[0], config(steps=2, compile=True), tmp_path / "compiled")
    reference = train(tiny(passes=2), corpus[0], config(steps=2), tmp_path / "eager")
    assert compiled == [model] and "_compiled_dense" in model.__dict__
    np.testing.assert_allclose(result.losses, reference.losses, rtol=0, atol=1e-5)
