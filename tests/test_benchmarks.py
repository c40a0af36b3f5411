"""The benchmark scripts run end to end at the tiny size (their figures come from real runs)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(spec.name, None)
    return module


@pytest.mark.slow
def test_inference_benchmark_runs_every_part(tmp_path) -> None:
    out = tmp_path / "inference.json"
    args = ["--sizes", "tiny", "--batch", "2", "--seq-len", "64", "--prompt-len", "8", "--new-tokens", "16"]
    result = load("inference").main([*args, "--repeats", "1", "--threads", "1", "--out", str(out)])
    assert json.loads(out.read_text())["head"] == result["head"]
    prefill = {row["halted"]: row for row in result["prefill"]}
    assert prefill[0.0]["measured"] == 1.0 and prefill[0.0]["ideal"] == 1.0
    assert prefill[0.0]["mean depth"] == 4.0 > prefill[0.5]["mean depth"] > prefill[0.75]["mean depth"]
    assert all(0 < prefill[s]["ideal"] < 1 for s in (0.25, 0.5, 0.75))
    assert math.isnan(prefill["dense 0.5"]["ideal"])
    decode = {row["halted"]: row for row in result["decode"]}
    assert 0 < decode[0.5]["ideal"] < 1 == decode[0.0]["ideal"]
    assert [row["same tokens"] for row in result["generate"]] == [1.0]  # zoo and transformers agree
    assert [(row["product"], row["rows"]) for row in result["head"][:2]] == [("head", 1), ("embedding", 1)]


def test_inference_benchmark_rejects_an_unknown_part() -> None:
    with pytest.raises(SystemExit, match="unknown part 'decoding'"):
        load("inference").main(["--only", "decoding"])


@pytest.mark.slow
def test_dense_forward_benchmark_runs(tmp_path) -> None:
    out = tmp_path / "dense.json"
    result = load("dense_forward").main(
        ["--preset", "pythia-tiny", "--batch", "2", "--seq-len", "32", "--repeats", "2", "--warmup", "1"]
        + ["--out", str(out)]
    )
    assert result["max_abs_logit_diff"] < 1e-4
    assert json.loads(out.read_text())["preset"] == "pythia-tiny"


@pytest.mark.slow
def test_dense_forward_benchmark_runs_in_bfloat16(tmp_path) -> None:
    out = tmp_path / "dense.json"
    result = load("dense_forward").main(
        ["--preset", "pythia-tiny", "--batch", "2", "--seq-len", "32", "--repeats", "2", "--warmup", "1"]
        + ["--dtype", "bfloat16", "--out", str(out)]
    )
    written = json.loads(out.read_text())
    assert (written["dtype"], written["device"], written["compile"]) == ("bfloat16", "cpu", False)
    # bf16 keeps 8 bits of mantissa: the two libraries round differently, by a few units of it
    assert math.isfinite(result["max_abs_logit_diff"])
    assert result["max_abs_logit_diff"] < 2**-5 * result["max_abs_logit"]


@pytest.mark.slow
@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_inference_generate_matches_transformers_with_a_static_cache(tmp_path, compile) -> None:
    out = tmp_path / "inference.json"
    args = ["--only", "generate", "--sizes", "tiny", "--batch", "2", "--prompt-len", "8", "--new-tokens"]
    args += ["16", "--hf-cache", "static", "--repeats", "1", "--threads", "1", "--out", str(out)]
    result = load("inference").main(args + ["--compile"] * compile)
    assert [row["same tokens"] for row in result["generate"]] == [1.0]
    written = json.loads(out.read_text())
    assert (written["hf_cache"], written["compile"]) == ("static", compile)
    assert ("reduce-overhead" in written["hf_compile"]) == compile


@pytest.mark.slow
def test_train_throughput_reports_the_adaponder_over_ponder_step_ratio(tmp_path, capsys) -> None:
    out = tmp_path / "train.json"
    result = load("train_throughput").main(
        ["--batch", "2", "--seq-len", "16", "--steps", "2", "--warmup", "1", "--threads", "1", "--bf16"]
        + ["--out", str(out)]
    )
    step = {row["model"]: row["step_seconds"] for row in json.loads(out.read_text())["results"]}
    ratio = step["adaponder-pythia-tiny"] / step["ponder-pythia-tiny"]
    assert json.loads(out.read_text())["adaponder_over_ponder_step"] == result["adaponder_over_ponder_step"]
    assert result["adaponder_over_ponder_step"] == pytest.approx(ratio, rel=1e-12)
    assert f"step time AdaPonder / PonderLM: {ratio:.3f}" in capsys.readouterr().out


@pytest.mark.parametrize("script", ["dense_forward", "inference", "train_throughput"])
def test_benchmarks_refuse_cuda_without_cuda(script, monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit, match="--device cuda: CUDA is not available .* use --device cpu"):
        load(script).main(["--device", "cuda"])


def test_inference_compile_mode_reaches_zoo_compile(monkeypatch) -> None:
    import argparse

    bench = load("inference")
    seen = []
    monkeypatch.setattr(bench.zoo, "compile", lambda model, **options: seen.append(options) or model)
    for mode in ("default", "reduce-overhead"):
        bench.compiled(object(), argparse.Namespace(compile=True, compile_mode=mode))
    bench.compiled(object(), argparse.Namespace(compile=False, compile_mode="max-autotune"))
    assert seen == [{}, {"mode": "reduce-overhead"}]
    assert bench.parse_args(["--compile", "--compile-mode", "reduce-overhead"]).compile_mode == "reduce-overhead"
