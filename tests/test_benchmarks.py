"""The benchmark scripts run end to end at the tiny size (their figures come from real runs)."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

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
