"""Every recipe runs a few steps of a tiny model on CPU: outputs written, numbers consistent.

Recipes are called in-process through their ``main(argv)``; ``torchrun`` and SIGTERM runs
use subprocesses.
"""

from __future__ import annotations

import contextlib
import importlib
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
    """The recipe ``recipes/<name>.py`` runs: its module in :mod:`zoo.recipes`."""
    return importlib.import_module(f"zoo.recipes.{'continued' if name == 'continue' else name}")


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
    # The recorded setting is the one trained with: the size's, with the command line's --lr.
    assert info["tokenizer"] == "byte" and info["setting"]["lr"] == 1e-2 and info["train"]["lr"] == 1e-2
    # AdaPonder two-stage schedule: 30% of the steps (round(4.8)) cross-entropy only, then the bottom-k loss.
    assert info["model_config"]["halting_kwargs"] == {"warmup_steps": 5, "ramp_steps": 5}
    assert all(r["aux_loss"] == 0 for r in rows[:5]) and all(r["aux_loss"] > 0 for r in rows[6:])
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
    args = pretrain.build_parser().parse_args(["--model", "adaponder-pythia-70m", "--steps", "1000", "--out", "x"])
    cfg = pretrain.train_config(args, s["70m"], world_size=1)
    assert (cfg.min_lr_ratio, cfg.betas, cfg.warmup_steps) == (0.1, (0.9, 0.95), 10)
    assert cfg.batch_size // cfg.micro_batch_size == 64  # accumulation makes up the global batch
    # Under torchrun the micro-batch follows from the world size: 8 processes x 16 x 8 micro-steps.
    assert pretrain.train_config(args, s["70m"], world_size=8).micro_batch_size == 16
    tiny = pretrain.build_parser().parse_args(["--steps", "10", "--out", "x"])
    assert [pretrain.train_config(tiny, s["tiny"], n).micro_batch_size for n in (1, 2, 4, 16)] == [16, 8, 4, 1]
    with pytest.raises(ValueError, match="batch_size 16 does not split over 3 processes"):
        pretrain.train_config(tiny, s["tiny"], world_size=3)
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
    import zoo.train.loop

    real, calls = zoo.train.loop.lm_loss, {"n": 0}

    def failing(logits, targets):  # the loss of step 5's first micro-batch turns NaN
        calls["n"] += 1
        return real(logits, targets) * (float("nan") if calls["n"] == 9 else 1.0)

    monkeypatch.setattr(zoo.train.loop, "lm_loss", failing)
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
        "--seq-len",
        "32",
        "--no-progress",
        "--eval-windows",
        "2",
    ]
    # No --micro-batch-size: each process's follows from the batch and the world size (8, then 4).
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
    info = json.loads((tmp_path / "two" / "run.json").read_text())
    assert info["world_size"] == 2 and info["train"]["micro_batch_size"] == 4
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


ISO = ["--steps", "4", "--batch-size", "4", "--seq-len", "32", "--eval-windows", "3", "--data", "embedded"]


@pytest.mark.slow
def test_iso_flops_writes_paired_rows_for_every_variant_and_seed(tmp_path, capsys):
    out = tmp_path / "iso"
    args = ["--out", str(out), "--seeds", "2", *ISO, "--override", 'halting_kwargs={"k_max": 0.2}']
    assert recipe("iso_flops").main(args) == 0
    record = json.loads((out / "iso_flops.json").read_text())
    rows = {(r["variant"], r["seed"]): r for r in record["rows"]}
    variants = ["single", "ponder_2", "ponder_3", "ponder", "loop", "adaponder", "fixed_uniform", "fixed_geometric"]
    assert sorted(rows) == sorted((v, s) for v in variants for s in (0, 1))
    for row in record["rows"]:
        assert {"variant", "seed", "perplexity", "mean_depth", "compute"} <= set(row)
        assert math.isfinite(row["perplexity"])
    assert all("depth_nll_spearman" in rows[("adaponder", s)] for s in (0, 1))
    # Compute against 4-pass PonderLM: the frontier's points in order, PonderLM itself 1.
    for s in (0, 1):
        c = [rows[(v, s)]["compute"] for v in ("single", "ponder_2", "ponder_3", "ponder")]
        assert c[0] < c[1] < c[2] < c[3] == pytest.approx(1.0)
    # Paired: after 4 steps AdaPonder's gates are still held open (depth 4), so fixed pruning is
    # matched to depth 4 (ratio 0): the same backbone weights, the same batches, PonderLM exactly.
    for s in (0, 1):
        assert rows[("adaponder", s)]["mean_depth"] == 4.0
        assert rows[("fixed_uniform", s)]["perplexity"] == rows[("ponder", s)]["perplexity"]
    assert rows[("ponder", 0)]["perplexity"] != rows[("ponder", 1)]["perplexity"]  # seeds differ
    assert rows[("adaponder", 0)]["halting_kwargs"]["k_max"] == 0.2  # --override reached the gates
    summary = record["summary"]
    assert {t["target"].split(" ")[0] for t in summary["targets"]} >= {"4", "AdaPonder", "depth"}
    assert summary["margin_4_vs_3"]["n"] == 2
    for png in ("perplexity_vs_compute.png", "depth_vs_nll.png"):
        assert (out / png).read_bytes().startswith(PNG)
    text = capsys.readouterr().out
    assert (out / "iso_flops.md").read_text().strip() in text
    # --resume reads the finished runs back instead of training them again; other evaluation
    # settings evaluate the same checkpoint again.
    first = (out / "ponder-seed0" / "eval.json").read_text()
    metrics = (out / "ponder-seed0" / "metrics.jsonl").read_text()
    assert recipe("iso_flops").main([*args, "--resume", "--variants", "ponder"]) == 0
    assert (out / "ponder-seed0" / "eval.json").read_text() == first
    more = [a if a != "3" else "5" for a in args]  # --eval-windows 5
    assert recipe("iso_flops").main([*more, "--resume", "--variants", "ponder"]) == 0
    again = json.loads((out / "ponder-seed0" / "eval.json").read_text())
    assert again["tokens"] == 5 * 32 and again["evaluated_as"]["eval_windows"] == 5
    assert (out / "ponder-seed0" / "metrics.jsonl").read_text() == metrics  # not trained again


def test_iso_flops_refuses_unknown_variants_and_unpaired_fixed_pruning(tmp_path, capsys):
    with pytest.raises(SystemExit):
        recipe("iso_flops").main(["--out", str(tmp_path), "--variants", "ponder,deep"])
    assert "unknown variant(s) deep" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="keep 'adaponder'"):
        recipe("iso_flops").main(["--out", str(tmp_path), *ISO, "--variants", "ponder,fixed_uniform"])


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["--steps", "6", "--batch-size", "4", "--seq-len", "32", "--eval-windows", "3", "--new-tokens", "8"]
    assert recipe("demo").main([*args, "--out", str(out)]) == 0
    text = capsys.readouterr().out
    for expected in ("| PonderLM, 4 passes |", "| AdaPonder (gates, KV reuse) |", "of 4-pass PonderLM's compute",
                     "Fixed-depth PonderLM at the same compute", "sample: the prompt"):
        assert expected in text
    report = json.loads((out / "report.json").read_text())
    rows = report["rows"]
    assert set(rows) == {"single", "ponder_2", "ponder_3", "ponder", "adaponder"}
    assert rows["ponder"]["compute"] == pytest.approx(1.0) and rows["single"]["mean_depth"] == 1.0
    assert len({r["tokens"] for r in rows.values()}) == 1  # the same held-out tokens for every model
    assert len(report["sample"]["depth"]) == 8
    for png in ("token_depth.png", "depth_nll.png", "perplexity_vs_compute.png"):
        assert (out / png).read_bytes().startswith(PNG)
    # A rerun replaces the earlier demo; a folder that is not a demo is refused.
    assert recipe("demo").main([*args, "--out", str(out)]) == 0
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match="not an earlier demo"):
        recipe("demo").main([*args, "--out", str(tmp_path / "other")])
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
