"""Every recipe runs a few steps of a tiny model on CPU: outputs written, numbers consistent.

Recipes are called in-process through their ``main(argv)``; ``torchrun`` and SIGTERM runs
use subprocesses.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

import zoo
from zoo.analysis import token_stats
from zoo.data import ByteTokenizer, eval_windows, load_corpus
from zoo.train import latest_checkpoint, load_trained, read_metrics

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ["pretrain", "continue", "evaluate", "iso_flops", "generate", "demo"]
SMALL = ["--batch-size", "4", "--micro-batch-size", "2", "--seq-len", "32", "--no-progress"]
PNG = b"\x89PNG\r\n\x1a\n"


def recipe(name: str):
    """Imports ``recipes/<name>.py`` as a module (``continue`` is a keyword, so not by import)."""
    key = f"recipe_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, ROOT / "recipes" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module  # dataclasses look their module up while the file executes
        spec.loader.exec_module(module)
    return sys.modules[key]


def losses(folder) -> list[float]:
    return [row["loss"] for row in read_metrics(folder)]


def subprocess_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@contextlib.contextmanager
def spawned(command: list[str]) -> Iterator[subprocess.Popen]:
    """``command`` running in its own process group, which is killed if it outlives the block."""
    process = subprocess.Popen(
        command,
        env=subprocess_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        yield process
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def run_to_end(command: list[str], timeout: float) -> tuple[int, str]:
    """Runs ``command`` in its own process group; on timeout the whole group is killed."""
    with spawned(command) as process:
        _, err = process.communicate(timeout=timeout)
    return process.returncode, err


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A 16-step tiny AdaPonder run, shared by the tests that read a trained model."""
    out = tmp_path_factory.mktemp("pretrain") / "run"
    assert (
        recipe("pretrain").main(
            ["--steps", "16", "--out", str(out), "--lr", "1e-2", "--eval-windows", "4", *SMALL]
        )
        == 0
    )
    return out


@pytest.mark.parametrize("name", RECIPES)
def test_help_lists_the_options(name, capsys):
    with pytest.raises(SystemExit) as stop:
        recipe(name).main(["--help"])
    assert stop.value.code == 0
    text = capsys.readouterr().out
    assert "--out" in text or name == "generate"
    assert recipe(name).__doc__.split("\n\n")[0] in " ".join(text.split())


# pretrain ------------------------------------------------------------------------------------


def test_pretrain_trains_and_writes_its_files(pretrained):
    rows = read_metrics(pretrained)
    assert [r["step"] for r in rows] == list(range(1, 17))
    assert np.mean(losses(pretrained)[-3:]) < np.mean(losses(pretrained)[:3]) - 1.0
    assert latest_checkpoint(pretrained).name == "step-000016"
    info = json.loads((pretrained / "run.json").read_text())
    assert info["tokenizer"] == "byte" and info["setting"]["lr"] == 3e-3 and info["train"]["lr"] == 1e-2
    # AdaPonder two-stage schedule: 30% of the steps cross-entropy only, then the bottom-k loss.
    assert info["model_config"]["halting_kwargs"] == {"warmup_steps": 4, "ramp_steps": 4}
    assert all(r["aux_loss"] == 0 for r in rows[:4]) and all(r["aux_loss"] > 0 for r in rows[5:])
    # eval.json is the perplexity of the final checkpoint over the first validation windows.
    report = json.loads((pretrained / "eval.json").read_text())
    model, _ = load_trained(pretrained)
    _, val = load_corpus("embedded", ByteTokenizer())
    nll, depth = token_stats(model, eval_windows(val, 32, 4), execution="dense")
    assert report["perplexity"] == pytest.approx(math.exp(float(nll.double().mean())), rel=1e-5)
    assert report["mean_depth"] == pytest.approx(float(depth.double().mean()))
    assert report["tokens"] == 4 * 32


def test_pretrain_settings_follow_the_references():
    pretrain = recipe("pretrain")
    s = pretrain.SETTINGS
    assert (s["70m"].lr, s["160m"].lr, s["410m"].lr) == (1e-3, 6e-4, 3e-4)
    assert (s["70m"].weight_decay, s["160m"].weight_decay, s["410m"].weight_decay) == (0.01, 0.01, 0.1)
    for size in ("70m", "160m", "410m"):
        assert s[size].seq_len == 2048 and s[size].warmup == 0.01
        assert 2.0e6 < s[size].batch_size * s[size].seq_len < 2.2e6  # about 2M tokens per step
    cfg = pretrain.train_config(
        pretrain.parse_args(["--model", "adaponder-pythia-70m", "--steps", "1000", "--out", "x"]), s["70m"]
    )
    assert (cfg.min_lr_ratio, cfg.betas, cfg.warmup_steps) == (0.1, (0.9, 0.95), 10)
    assert cfg.batch_size // cfg.micro_batch_size == 64  # accumulation makes up the global batch
    with pytest.raises(ValueError, match="settings for sizes"):
        pretrain.size_of("adaponder-pythia-14m")


def test_pretrain_stop_and_resume_equals_a_straight_run(tmp_path):
    pretrain = recipe("pretrain")
    common = ["--steps", "12", "--checkpoint-every", "4", "--eval-windows", "2", *SMALL]
    assert pretrain.main([*common, "--out", str(tmp_path / "straight")]) == 0
    assert pretrain.main([*common, "--out", str(tmp_path / "split"), "--stop-after", "6"]) == 0
    assert losses(tmp_path / "split") == losses(tmp_path / "straight")[:6]
    assert not (tmp_path / "split" / "eval.json").exists()
    assert pretrain.main([*common, "--out", str(tmp_path / "split"), "--resume"]) == 0
    assert losses(tmp_path / "split") == losses(tmp_path / "straight")  # bit-exact on CPU
    assert len(losses(tmp_path / "split")) == 12


def test_pretrain_non_finite_loss_exits_with_the_step(tmp_path, monkeypatch, capsys):
    import zoo.train

    real, calls = zoo.train.lm_loss, {"n": 0}

    def failing(logits, targets):  # the loss of step 5's first micro-batch turns NaN
        calls["n"] += 1
        return real(logits, targets) * (float("nan") if calls["n"] == 9 else 1.0)

    monkeypatch.setattr(zoo.train, "lm_loss", failing)
    out = tmp_path / "run"
    code = recipe("pretrain").main(["--steps", "8", "--checkpoint-every", "2", "--out", str(out), *SMALL])
    assert code == 1
    assert "loss is nan at step 5" in capsys.readouterr().err
    assert latest_checkpoint(out).name == "step-000004"
    assert all(torch.isfinite(p).all() for p in load_trained(out)[0].parameters())


@pytest.mark.slow
def test_torchrun_two_processes_match_one(tmp_path):
    args = [
        "--steps",
        "4",
        "--batch-size",
        "8",
        "--micro-batch-size",
        "2",
        "--seq-len",
        "32",
        "--no-progress",
        "--eval-windows",
        "2",
    ]
    assert recipe("pretrain").main([*args, "--out", str(tmp_path / "one")]) == 0
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(ROOT / "recipes" / "pretrain.py"),
        *args,
        "--out",
        str(tmp_path / "two"),
    ]
    code, err = run_to_end(command, timeout=300)
    assert code == 0, err[-3000:]
    assert json.loads((tmp_path / "two" / "run.json").read_text())["world_size"] == 2
    np.testing.assert_allclose(losses(tmp_path / "two"), losses(tmp_path / "one"), rtol=0, atol=1e-4)
    assert len(losses(tmp_path / "two")) == 4


@pytest.mark.slow
def test_sigterm_checkpoints_and_exits(tmp_path):
    out = tmp_path / "run"
    command = [
        sys.executable,
        str(ROOT / "recipes" / "pretrain.py"),
        "--steps",
        "100000",
        "--out",
        str(out),
        "--checkpoint-every",
        "0",
        *SMALL,
    ]
    with spawned(command) as process:
        deadline = time.time() + 120
        while len(read_metrics(out)) < 3 and time.time() < deadline:
            time.sleep(0.2)
        process.send_signal(signal.SIGTERM)
        said, err = process.communicate(timeout=120)
    assert process.returncode == 143, err[-2000:]
    steps = len(read_metrics(out))
    assert steps >= 3 and latest_checkpoint(out).name == f"step-{steps:06d}"
    assert f"SIGTERM at step {steps}: checkpoint written" in said and "continue with --resume" in said


# continue ------------------------------------------------------------------------------------


def test_continue_trains_gates_then_everything(tmp_path, hf_neox_folder):
    from test_data import make_tokenizer_json

    _, folder = hf_neox_folder(vocab_size=400, max_position_embeddings=64)
    make_tokenizer_json(folder)
    out = tmp_path / "cont"
    args = [
        "--hf",
        str(folder),
        "--out",
        str(out),
        "--gate-steps",
        "4",
        "--steps",
        "4",
        "--gate-lr",
        "1e-2",
        "--lr",
        "1e-3",
        "--eval-windows",
        "2",
        *SMALL,
    ]
    assert recipe("continue").main(args) == 0
    pythia = zoo.from_hf(folder).state_dict()
    stage1, tokenizer = load_trained(out / "stage1")
    stage2, _ = load_trained(out / "stage2")
    assert tokenizer == str(folder / "tokenizer.json")
    assert (stage1.config.passes, stage1.config.halting, stage1.config.cache) == (4, "mlp_gate", "kv_reuse")
    fresh = zoo.from_hf(folder, recurrence="ponder", passes=4, halting="mlp_gate", cache="kv_reuse")
    for name, value in stage1.state_dict().items():
        if name.startswith("halting."):
            assert not torch.equal(value, fresh.state_dict()[name]), name  # the gates trained
        else:
            assert torch.equal(value, pythia[name]), name  # the backbone stayed Pythia's
    assert not torch.equal(stage2.layers[0].attn.qkv.weight, pythia["layers.0.attn.qkv.weight"])
    # Stage 2 continues the gates' schedule: the step it sees starts after stage 1's.
    assert (
        json.loads((latest_checkpoint(out / "stage2") / "trainer.json").read_text())["config"]["step_offset"]
        == 4
    )
    assert all(r["aux_loss"] > 0 for r in read_metrics(out / "stage2"))
    assert json.loads((out / "eval.json").read_text())["tokens"] == 2 * 32


# evaluate / generate -------------------------------------------------------------------------


def test_evaluate_reports_plots_and_runs_lm_eval(pretrained, tmp_path, capsys):
    from test_lm_eval import write_task

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    write_task(tasks)
    out = tmp_path / "eval"
    code = recipe("evaluate").main(
        [
            "--model",
            str(pretrained),
            "--out",
            str(out),
            "--max-windows",
            "3",
            "--tasks",
            "zoo_tiny_mc",
            "--include-path",
            str(tasks),
        ]
    )
    assert code == 0
    text = capsys.readouterr().out
    assert "perplexity" in text and "mean NLL by depth" in text and "zoo_tiny_mc" in text
    results = json.loads((out / "eval.json").read_text())
    model, _ = load_trained(pretrained)
    _, val = load_corpus("embedded", ByteTokenizer())
    nll, _ = token_stats(model, eval_windows(val, 32, 3))  # the run's training length
    assert results["model"]["perplexity"] == pytest.approx(math.exp(float(nll.double().mean())), rel=1e-5)
    assert results["full_depth"]["mean_depth"] == 4.0
    assert sum(results["model"]["depth_counts"]) == results["model"]["tokens"] == 3 * 32
    assert 0 <= results["lm_eval"]["zoo_tiny_mc"]["acc,none"] <= 1
    for png in ("token_depth.png", "depth_nll.png"):
        assert (out / png).read_bytes().startswith(PNG)


def test_generate_shows_each_tokens_depth(pretrained, tmp_path, capsys):
    path = tmp_path / "gen.json"
    code = recipe("generate").main(
        [
            "--model",
            str(pretrained),
            "--prompt",
            "The try",
            "--max-new-tokens",
            "20",
            "--temperature",
            "0.8",
            "--seed",
            "1",
            "--style",
            "superscript",
            "--json",
            str(path),
        ]
    )
    assert code == 0
    result = json.loads(path.read_text())
    assert len(result["tokens"]) == len(result["depth"]) == 20
    model, _ = load_trained(pretrained)
    ids = ByteTokenizer().encode("The try") + result["tokens"]
    with torch.no_grad():
        full = model.eval()(torch.tensor([ids]))
    assert result["depth"] == full.depth[0, 6:-1].tolist()  # the depth that drew each new token
    text = capsys.readouterr().out
    assert text.startswith("The try") and "mean" in text
    assert any(ch in text for ch in "¹²³⁴")


# iso_flops / demo ----------------------------------------------------------------------------


@pytest.mark.slow
def test_iso_flops_matches_fixed_pruning_to_the_target_depth(tmp_path, capsys):
    out = tmp_path / "iso"
    args = [
        "--out",
        str(out),
        "--steps",
        "3",
        "--batch-size",
        "4",
        "--seq-len",
        "128",
        "--eval-windows",
        "4",
        "--target-depth",
        "2.5",
        "--no-progress",
    ]
    assert recipe("iso_flops").main(args) == 0
    results = json.loads((out / "iso_flops.json").read_text())["results"]
    assert list(results) == ["adaponder", "fixed_uniform", "fixed_geometric", "ponder", "loop"]
    for name in ("fixed_uniform", "fixed_geometric"):
        # Which positions halt is a hash of (seed, position, pass): 128 positions, about 2.5 on average.
        assert results[name]["mean_depth"] == pytest.approx(2.5, abs=0.3)
        assert results[name]["compute_vs_full"] < 0.8
    for name in ("ponder", "loop"):
        assert results[name]["mean_depth"] == 4.0 and results[name]["compute_vs_single"] == pytest.approx(4.0)
    assert all(math.isfinite(r["perplexity"]) for r in results.values())
    table = (out / "iso_flops.md").read_text()
    assert table.count("\n") == 7 and "| fixed_geometric |" in table and table in capsys.readouterr().out


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    args = [
        "--steps",
        "30",
        "--dim",
        "64",
        "--batch-size",
        "8",
        "--seq-len",
        "64",
        "--eval-windows",
        "8",
        "--new-tokens",
        "24",
        "--out",
        str(out),
    ]
    assert recipe("demo").main(args) == 0
    text = capsys.readouterr().out
    for expected in (
        "adaptive (AdaPonder gates): perplexity",
        "gates forced open",
        "compute of 4 passes saved",
        "mean NLL by depth",
        "sample: the prompt",
    ):
        assert expected in text
    report = json.loads((out / "report.json").read_text())
    assert report["adaptive"]["tokens"] == report["full_depth"]["tokens"] == 8 * 64
    assert report["full_depth"]["mean_depth"] == 4.0
    assert report["adaptive"]["compute_saved"] == pytest.approx(1 - report["adaptive"]["compute_vs_full"])
    assert len(report["sample"]["depth"]) == 24
    rows = read_metrics(out)
    assert np.mean([r["loss"] for r in rows[-5:]]) < np.mean([r["loss"] for r in rows[:5]]) - 1.0
    for png in ("token_depth.png", "depth_nll.png"):
        assert (out / png).read_bytes().startswith(PNG)
    # A rerun replaces the earlier demo; a folder that is not a demo is refused.
    assert recipe("demo").main(args) == 0
    (tmp_path / "other").mkdir()
    with pytest.raises(SystemExit, match="not an earlier demo"):
        recipe("demo").main([*args[:-1], str(tmp_path / "other")])
