"""The trainer: schedule, optimizer groups, exact resume, checkpoints, non-finite loss, SIGTERM."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import threading

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import zoo
from test_checkpoint import snapshot
from zoo.checkpoint import FolderBusyError, folder_lock, load
from zoo.data import ByteTokenizer, TokenStream, load_corpus
from zoo.train import (
    Distributed,
    NonFiniteLossError,
    TrainConfig,
    gate_schedule,
    latest_checkpoint,
    lr_at,
    make_optimizer,
    per_process_micro_batch,
    read_metrics,
    train,
    two_stage,
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
    with pytest.raises(ValueError, match=r"stop_after must be an int in \[1, steps=5\]"):
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
    with pytest.raises(ValueError, match=r"differs .* in lr \(lr: 0.003 -> 0.001\).*--allow-change lr"):
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
    assert compiled == [model] and model.dense_fn is not zoo.recurrence.run_dense
    np.testing.assert_allclose(result.losses, reference.losses, rtol=0, atol=1e-5)


# Run folders: one run each, every check before the first write -----------------------------


@contextlib.contextmanager
def held_by_another_run(folder):
    """The folder's run lock, held by another thread (as another process would hold it)."""
    taken, release = threading.Event(), threading.Event()

    def hold():
        with folder_lock(folder, wait=False, purpose="training"):
            taken.set()
            release.wait(30)

    thread = threading.Thread(target=hold)
    thread.start()
    taken.wait(30)
    try:
        yield
    finally:
        release.set()
        thread.join()


def test_a_second_run_on_a_held_folder_is_refused_before_it_writes(corpus, tmp_path):
    info = {"tokenizer": "byte", "recipe": "first"}
    train(tiny(), corpus[0], config(steps=2), tmp_path / "run", run_info=info, tokenizer="byte")
    before = snapshot(tmp_path / "run")
    with held_by_another_run(tmp_path / "run"):
        for resume in (False, True):
            with pytest.raises(FolderBusyError, match="locked by another process that is training"):
                train(tiny(), corpus[0], config(steps=4), tmp_path / "run", resume=resume, run_info={"x": 1})
        with pytest.raises(FolderBusyError):  # a fresh folder too: the lock is taken before anything else
            with held_by_another_run(tmp_path / "other"):
                train(tiny(), corpus[0], config(steps=2), tmp_path / "other")
    assert snapshot(tmp_path / "run") == before  # run.json, metrics and checkpoints untouched
    assert json.loads((tmp_path / "run" / "run.json").read_text())["recipe"] == "first"


def test_refused_runs_leave_run_json_as_it_was(corpus, tmp_path):
    train(tiny(), corpus[0], config(steps=2), tmp_path, run_info={"tokenizer": "byte"}, tokenizer="byte")
    before = snapshot(tmp_path)
    with pytest.raises(ValueError, match="already holds a run"):
        train(tiny(), corpus[0], config(steps=2), tmp_path, run_info={"tokenizer": "other.json"})
    with pytest.raises(ValueError, match="differs"):
        train(tiny(), corpus[0], config(steps=4), tmp_path, resume=True, run_info={"tokenizer": "other.json"})
    assert snapshot(tmp_path) == before


PONDER = {"halting": "none", "cache": "recompute", "halting_kwargs": {}}  # passes change no shape


@pytest.mark.parametrize(
    "key, before, after, train_kw",
    [
        ("passes", PONDER, {**PONDER, "passes": 3}, {}),
        ("halting_kwargs", {}, {"halting_kwargs": {**GATES, "threshold": 0.5}}, {}),
        ("cache", {}, {"cache": "recompute"}, {}),
        ("warmup_steps", {}, {}, {"warmup_steps": 1}),
        ("min_lr_ratio", {}, {}, {"min_lr_ratio": 0.5}),
        ("weight_decay", {}, {}, {"weight_decay": 0.0}),
        ("grad_clip", {}, {}, {"grad_clip": 0.5}),
        ("steps", {}, {}, {"steps": 6}),
    ],
)
def test_resume_refuses_any_change_of_the_run_unless_allowed(corpus, tmp_path, key, before, after, train_kw):
    train(tiny(**before), corpus[0], config(steps=4, stop_after=2), tmp_path)
    changed = config(**{"steps": 4, **train_kw})
    with pytest.raises(ValueError) as err:
        train(tiny(**after), corpus[0], changed, tmp_path, resume=True)
    assert f"differs from the one it would continue in {key} (" in str(err.value)
    assert f"--allow-change {key}" in str(err.value)
    said = []
    result = train(
        tiny(**after), corpus[0], changed, tmp_path, resume=True, allow_change=[key], log=said.append
    )
    assert result.step == changed.steps
    assert any(line.startswith(f"resuming with {key} changed") for line in said)


def test_an_allowed_change_that_changes_shapes_is_a_clear_error(corpus, tmp_path):
    train(tiny(), corpus[0], config(steps=4, stop_after=2), tmp_path)
    with pytest.raises(ValueError, match=r"step-000002 do not fit the model.*passes"):
        train(tiny(passes=3), corpus[0], config(steps=4), tmp_path, resume=True, allow_change=["passes"])


def test_resume_refuses_another_corpus_or_tokenizer(corpus, tmp_path):
    train(tiny(), corpus[0], config(steps=4, stop_after=2), tmp_path, tokenizer="byte")
    other = TokenStream(np.asarray(corpus[0].tokens)[::-1].copy(), "reversed corpus")
    with pytest.raises(ValueError, match=r"in data \(data: embedded corpus \(train\) \(423,353 tokens"):
        train(tiny(), other, config(steps=4), tmp_path, resume=True, tokenizer="byte")
    with pytest.raises(ValueError, match=r"in tokenizer \(tokenizer: 'byte' -> 'tok.json'\)"):
        train(tiny(), corpus[0], config(steps=4), tmp_path, resume=True, tokenizer="tok.json")
    moved = TokenStream(np.asarray(corpus[0].tokens).copy(), "the same tokens, read from elsewhere")
    assert train(tiny(), moved, config(steps=4), tmp_path, resume=True, tokenizer="byte").step == 4


def test_allow_change_names_only_run_settings(corpus, tmp_path):
    with pytest.raises(ValueError, match="allow_change names learning_rate, which are not run settings"):
        train(tiny(), corpus[0], config(steps=2), tmp_path / "run", allow_change=["learning_rate"])
    assert not (tmp_path / "run").exists()


def test_non_finite_loss_advice_works_resume_with_a_lower_learning_rate(corpus, tmp_path):
    model = tiny()
    _on_forward(model, 17, lambda out: out * float("nan"))  # step 3
    with pytest.raises(NonFiniteLossError) as err:
        train(model, corpus[0], config(steps=6, checkpoint_every=2), tmp_path)
    assert "allow_change=['lr']" in str(err.value) and "--allow-change lr" in str(err.value)
    resumed = train(tiny(), corpus[0], config(steps=6, lr=1e-3), tmp_path, resume=True, allow_change=["lr"])
    assert resumed.step == 6 and [r["lr"] for r in read_metrics(tmp_path)][2] == pytest.approx(1e-3)


def test_a_torn_last_metrics_line_is_dropped_on_resume(corpus, tmp_path):
    cfg = config(steps=6)
    straight = train(tiny(), corpus[0], cfg, tmp_path / "a")
    train(tiny(), corpus[0], config(steps=6, stop_after=3), tmp_path / "b")
    with open(tmp_path / "b" / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 4, "loss": 2.71')  # killed mid-write
    assert [r["step"] for r in read_metrics(tmp_path / "b")] == [1, 2, 3]  # readers skip it too
    said = []
    train(tiny(), corpus[0], cfg, tmp_path / "b", resume=True, log=said.append)
    assert [r["loss"] for r in read_metrics(tmp_path / "b")] == straight.losses
    assert any("dropped a torn last line" in line for line in said)
    # A damaged line that is not the last is an error naming the file and the line.
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    (tmp_path / "b" / "metrics.jsonl").write_text("\n".join([lines[0], "{oops", *lines[1:]]) + "\n")
    with pytest.raises(ValueError, match=r"metrics.jsonl:2 is not valid JSON"):
        read_metrics(tmp_path / "b")


def test_every_split_is_checked_before_the_first_step(corpus, tmp_path):
    short = TokenStream(np.arange(20, dtype=np.uint16), "tiny validation file")
    with pytest.raises(ValueError, match="split tiny validation file has 20 tokens, fewer than one"):
        train(tiny(), corpus[0], config(steps=2), tmp_path / "run", val_data=short)
    beyond = TokenStream(np.full(100, 600, dtype=np.uint16), "validation with foreign ids")
    with pytest.raises(ValueError, match="holds token id 600"):
        train(tiny(), corpus[0], config(steps=2), tmp_path / "run", val_data=beyond)
    with pytest.raises(ValueError, match="eval_every=1 needs val_data"):
        train(tiny(), corpus[0], config(steps=2, eval_every=1), tmp_path / "run")
    assert not (tmp_path / "run").exists()  # nothing written, not even the folder


@pytest.mark.parametrize(
    "damaged", ["optimizer.safetensors", "trainer.json", "model/model.safetensors", "rng.safetensors"]
)
def test_a_damaged_checkpoint_names_the_file_and_the_intact_earlier_one(corpus, tmp_path, damaged):
    cfg = config(steps=6, checkpoint_every=2)
    straight = train(tiny(), corpus[0], cfg, tmp_path / "a")
    train(tiny(), corpus[0], config(steps=6, checkpoint_every=2, stop_after=4), tmp_path / "b")
    file = tmp_path / "b" / "checkpoints" / "step-000004" / damaged
    file.write_bytes(file.read_bytes()[: len(file.read_bytes()) // 2])  # truncated
    with pytest.raises(ValueError) as err:
        train(tiny(), corpus[0], cfg, tmp_path / "b", resume=True)
    message = str(err.value)
    assert file.name in message and "step-000002 (step 2) is intact" in message
    pointer = tmp_path / "b" / "checkpoints" / "latest"
    assert f"echo step-000002 > {pointer}" in message
    pointer.write_text("step-000002\n")  # the advice, followed
    train(tiny(), corpus[0], cfg, tmp_path / "b", resume=True)
    assert [r["loss"] for r in read_metrics(tmp_path / "b")] == straight.losses


def test_a_pointer_to_a_missing_checkpoint_names_the_intact_one(corpus, tmp_path):
    train(tiny(), corpus[0], config(steps=4, checkpoint_every=2), tmp_path)
    shutil.rmtree(tmp_path / "checkpoints" / "step-000004")
    with pytest.raises(ValueError, match=r"names 'step-000004'.*step-000002 \(step 2\) is intact"):
        latest_checkpoint(tmp_path)


@pytest.mark.parametrize(
    "field, value",
    [
        ("lr", float("inf")),
        ("lr", "3e-3"),
        ("grad_clip", float("nan")),
        ("compile", "false"),
        ("betas", [0.9, 0.95]),
        ("seed", 1.5),
        ("train_only", "halting."),
        ("progress", 1),
    ],
)
def test_train_config_is_strict(field, value):
    with pytest.raises(ValueError) as err:
        TrainConfig(steps=4, **{field: value})
    assert f"TrainConfig.{field}" in str(err.value) and repr(value) in str(err.value)


# Many processes, precision, memory, logging ---------------------------------------------------


def test_the_micro_batch_follows_from_the_batch_and_the_processes():
    assert [per_process_micro_batch(16, n) for n in (1, 2, 4, 8, 16)] == [16, 8, 4, 2, 1]
    assert per_process_micro_batch(1024, 8, limit=16) == 16  # 128 rows per process, 8 micro-steps
    assert per_process_micro_batch(24, 2, limit=5) == 4  # the largest divisor of 12 within the bound
    assert per_process_micro_batch(16, 2, 4) == 4  # given: kept
    with pytest.raises(ValueError, match="batch_size 16 does not split over 3 processes"):
        per_process_micro_batch(16, 3)
    with pytest.raises(ValueError, match=r"multiple of processes x micro_batch_size = 2 x 3"):
        per_process_micro_batch(16, 2, 3)


def test_a_batch_that_does_not_split_over_the_processes_is_refused_before_writing(corpus, tmp_path):
    ctx = Distributed(rank=0, world_size=3)  # the arithmetic is checked before any collective
    with pytest.raises(ValueError, match="batch_size 4 does not split over 3 processes"):
        train(tiny(), corpus[0], config(micro_batch_size=None), tmp_path / "run", ctx=ctx)
    assert not (tmp_path / "run").exists()


def test_gate_schedule_and_two_stages():
    assert gate_schedule(16, 0.3, 0.3) == {"warmup_steps": 5, "ramp_steps": 5}
    assert two_stage(1, 7) == {"train_only": ("halting.",), "step_offset": 0}
    assert two_stage(2, 7) == {"train_only": (), "step_offset": 7}
    with pytest.raises(ValueError, match="stage must be 1"):
        two_stage(3, 7)


def test_bf16_autocast_on_the_cpu_trains_close_to_fp32(corpus, tmp_path):
    runs = {}
    for precision in ("fp32", "bf16"):
        runs[precision] = train(tiny(), corpus[0], config(steps=3, precision=precision), tmp_path / precision).losses
    assert all(math.isfinite(x) for x in runs["bf16"])
    assert runs["bf16"] != runs["fp32"]  # autocast did run: bf16 rounding moves the loss
    np.testing.assert_allclose(runs["bf16"], runs["fp32"], rtol=0.02)


def test_activation_checkpointing_calls_the_model_and_trains_the_same(corpus, tmp_path):
    model = tiny()
    if not hasattr(model, "gradient_checkpointing_enable"):
        pytest.skip("this RecurrentLM has no gradient_checkpointing_enable: nothing for the option to call")
    plain = train(tiny(), corpus[0], config(steps=3), tmp_path / "plain").losses
    saved = train(model, corpus[0], config(steps=3, activation_checkpointing=True), tmp_path / "ckpt").losses
    np.testing.assert_allclose(saved, plain, rtol=1e-5)


def test_tensorboard_logs_every_row_or_names_the_missing_package(corpus, tmp_path, monkeypatch):
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match="needs the tensorboard package.*pip install tensorboard"):
            train(tiny(), corpus[0], config(steps=2, tensorboard=True), tmp_path / "run")
        assert not (tmp_path / "run").exists()  # refused before anything is written
        return
    train(tiny(), corpus[0], config(steps=2, tensorboard=True), tmp_path / "run")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    losses = [e.value for e in events.Scalars("train/loss")]
    assert losses == pytest.approx([r["loss"] for r in read_metrics(tmp_path / "run")])


def test_a_missing_tensorboard_is_named(corpus, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # as if not installed
    with pytest.raises(ValueError, match="needs the tensorboard package"):
        train(tiny(), corpus[0], config(steps=2, tensorboard=True), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_the_progress_bar_shows_tokens_per_second_and_the_mean_depth(corpus, tmp_path, capsys):
    train(tiny(), corpus[0], config(steps=2, progress=True), tmp_path / "run")
    bar = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]  # its last render
    assert "2/2" in bar and "depth=" in bar and "tok_s=" in bar and "loss=" in bar, bar
