"""The prepared GPU run (``benchmarks/gpu.sh``, ``gpu_checks.py``, ``gpu_summary.py``) works
end to end on the CPU at tiny sizes, its checks can fail, and its summary reads targets right."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from test_benchmarks import load

ROOT = Path(__file__).resolve().parents[1]


def test_host_reads_counts_every_read_of_a_tensor_value():
    checks = load("gpu_checks")
    with checks.HostReads() as reads:
        x = torch.arange(4)
        x.sum().item()
        bool(x.any())
        int(x.max())
        x + 1  # no read
    assert reads.count == 3


def test_smoke_checks_measure_precision_and_host_reads(tmp_path):
    out = tmp_path / "checks.json"
    result = load("gpu_checks").main(["--device", "cpu", "--smoke", "--only", "precision,host_syncs", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["precision"]["ok"] and len(result["precision"]["rows"]) == 4
    assert all(row["mean_depth"] < 4 for row in result["precision"]["rows"])  # tokens halt: not vacuous
    syncs = result["host_syncs"]
    assert syncs["per_decode_step"] > 0 and any(site.startswith("zoo/layout.py") for site in syncs["sites"])


def test_a_failing_check_is_recorded_and_the_others_still_run(tmp_path, monkeypatch):
    checks = load("gpu_checks")

    def broken(args):
        raise RuntimeError("planted")

    monkeypatch.setitem(checks.RUNNERS, "precision", broken)
    result = checks.main(["--device", "cpu", "--smoke", "--only", "precision,host_syncs", "--out", str(tmp_path / "c.json")])
    assert result["precision"] == {"ok": False, "error": "RuntimeError: planted", "seconds": result["precision"]["seconds"]}
    assert result["host_syncs"]["ok"]


def test_checks_refuse_a_missing_device_and_unknown_checks(capsys):
    checks = load("gpu_checks")
    with pytest.raises(SystemExit):
        checks.main(["--only", "precision,speed", "--out", "x.json"])
    assert "unknown check 'speed'" in capsys.readouterr().err
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            checks.main(["--device", "cuda", "--out", "x.json"])
        assert "torch sees no CUDA device" in capsys.readouterr().err


def parts(tmp_path: Path, **files: dict) -> Path:
    work = tmp_path / "work"
    work.mkdir()
    for name, content in files.items():
        (work / f"{name.replace('_', '-')}.json").write_text(json.dumps(content))
    return work


def test_summary_marks_each_target_from_the_steps_results(tmp_path):
    train_rows = [
        {"model": "pythia-160m", "mfu": 0.45, "step_seconds": 1.0},
        {"model": "ponder-pythia-160m", "mfu": 0.38, "step_seconds": 4.0},
        {"model": "adaponder-pythia-160m", "mfu": 0.35, "step_seconds": 4.2},
    ]
    work = parts(
        tmp_path,
        checks={"precision": {"ok": True}, "compile_dense": {"ok": False}, "host_syncs": {"per_pass": 2.5}},
        dense_160m={"ratio_zoo_over_transformers": 0.85},
        prefill={"prefill": [{"B": 8, "halted": 0.0, "efficiency": 1.0}, {"B": 8, "halted": 0.5, "efficiency": 0.93}]},
        decode={"decode": [{"B": 8, "halted": 0.5, "efficiency": 0.7}]},
        train_160m={"results": train_rows},
    )
    junit = tmp_path / "tests.xml"
    junit.write_text(
        '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="0">'
        '<testcase classname="tests.test_x" name="test_a[cuda]"/>'
        '<testcase classname="tests.test_x" name="test_b[cuda]"><failure message="no"/></testcase>'
        '<testcase classname="tests.test_x" name="test_c[cuda]"/></testsuite></testsuites>'
    )
    summary = load("gpu_summary").main([str(work), "--junit", str(junit), "--out", str(tmp_path / "gpu.json")])
    holds = {t["target"]: t["holds"] for t in summary["targets"]}
    assert holds["device tests pass"] is False
    assert summary["parts"]["tests"]["failed"] == ["tests.test_x::test_b[cuda]"]
    assert holds["check precision"] is True and holds["check compile_dense"] is False
    assert holds["check decode_recompiles"] is None  # not run
    assert holds["host reads per decode pass"] is False
    assert holds["dense forward 160m, zoo / transformers time"] is True
    assert holds["dense forward 410m, zoo / transformers time"] is None
    assert holds["prefill efficiency at 50% halting, B=8"] is True
    assert holds["decode efficiency at 50% halting, B=8"] is False
    assert holds["greedy generate, zoo / transformers throughput, B=-"] is None
    assert holds["training MFU pythia-160m"] is True and holds["training MFU ponder-pythia-160m"] is False
    ratio = next(t for t in summary["targets"] if t["target"] == "AdaPonder / PonderLM training step time, 160m")
    assert ratio["value"] == pytest.approx(1.05) and ratio["holds"] is True
    assert json.loads((tmp_path / "gpu.json").read_text())["targets"] == summary["targets"]


def test_gpu_script_refuses_unknown_steps():
    run = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu.sh"), "/tmp/unused", "speed"], capture_output=True, text=True)
    assert run.returncode == 2 and "unknown step 'speed'" in run.stderr


@pytest.mark.slow
def test_gpu_script_runs_every_step_at_tiny_size_on_the_cpu(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    env = {"ZOO_GPU_WORK": str(work), "PYTHON": sys.executable, "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    run = subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu.sh"), str(out), "--smoke"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["gpu.json", "log.txt", "tests.xml"]
    summary = json.loads((out / "gpu.json").read_text())
    steps = ["env", "tests", "checks", "dense-tiny", "prefill", "decode", "generate", "train-tiny"]
    rcs = {step: summary["parts"][f"rc-{step}"]["rc"] for step in steps}
    assert rcs == dict.fromkeys(steps, 0), rcs
    assert summary["parts"]["tests"]["tests"] > 0 and summary["parts"]["tests"]["failures"] == 0
    for name in ("checks", "dense-tiny", "prefill", "decode", "generate", "train-tiny", "env"):
        assert name in summary["parts"], name
