"""Gathers what ``benchmarks/gpu.sh`` measured and marks each target as holding or not.

    python benchmarks/gpu_summary.py WORK [--junit tests.xml] --out gpu.json
    python benchmarks/gpu_summary.py --environment env.json   # the machine, for the record

``WORK`` holds one JSON file per step (``checks.json``, ``dense-160m.json``, ...,
``rc-<step>.json`` with each step's exit status and seconds). The summary keeps every file
under its name, and adds ``targets``: one entry per target of the GPU run, with the measured
value, the bound, and ``holds`` (``true``, ``false``, or ``null`` where the step did not
run or did not finish). It prints the targets as a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import xml.etree.ElementTree as ET
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from zoo.checkpoint import atomic_write

PEAK_TFLOPS = 989
"""The H200's dense bf16 peak (datasheet), against which training MFU is reported."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("work", nargs="?", type=Path, help="the folder of the steps' JSON files")
    p.add_argument("--junit", type=Path, default=None, help="the device tests' JUnit report")
    p.add_argument("--out", type=Path, default=None, help="where the summary goes")
    p.add_argument("--environment", type=Path, default=None, help="write the machine's description here and stop")
    args = p.parse_args(argv)
    if args.environment is None and (args.work is None or args.out is None):
        p.error("give WORK and --out (or --environment PATH)")
    return args


def environment() -> dict[str, Any]:
    """Versions, the device and the date: what a reader needs to place the figures."""
    import torch

    info: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "machine": platform.machine(),
    }
    for package in ("transformers", "triton"):
        try:
            info[package] = __import__(package).__version__
        except ImportError:
            info[package] = None
    try:
        info["nvidia_smi"] = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=False,
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        info["nvidia_smi"] = None
    return info


def tests_report(path: Path) -> dict[str, Any]:
    """Counts of a JUnit report, and the names of the tests that failed."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed = [
        f"{case.get('classname')}::{case.get('name')}"
        for case in root.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    return counts | {"failed": failed[:50]}


def target(name: str, value: float | None, bound: float, at_least: bool, note: str = "") -> dict[str, Any]:
    """One target: ``value >= bound`` (``at_least``) or ``value <= bound``; ``None`` if not measured."""
    holds = None if value is None else (value >= bound if at_least else value <= bound)
    return {"target": name, "value": value, "bound": f"{'>=' if at_least else '<='} {bound}", "holds": holds, "note": note}


def _rows(part: dict | None, key: str) -> list[dict]:
    return [] if part is None else list(part.get(key, []))


def targets(parts: dict[str, Any]) -> list[dict[str, Any]]:
    """Every target of the GPU run, read from the steps' results (absent ones as not measured)."""
    out = []
    tests = parts.get("tests")
    if tests is not None:
        passed = tests["failures"] == 0 and tests["errors"] == 0 and tests["tests"] > 0
        out.append(target("device tests pass", 1.0 if passed else 0.0, 1.0, True, f"{tests['tests']} tests"))
    else:
        out.append(target("device tests pass", None, 1.0, True, "not run"))
    checks = parts.get("checks", {})
    for check in ("precision", "compile_dense", "decode_recompiles"):
        ok = checks.get(check, {}).get("ok")
        out.append(target(f"check {check}", None if ok is None else float(ok), 1.0, True))
    syncs = checks.get("host_syncs", {}).get("per_pass")
    out.append(target("host reads per decode pass", syncs, 0.0, False))
    for size in ("160m", "410m"):
        dense = parts.get(f"dense-{size}")
        value = None if dense is None else dense.get("ratio_zoo_over_transformers")
        out.append(target(f"dense forward {size}, zoo / transformers time", value, 0.9, False))
    for part, key, bound in (("prefill", "prefill", 0.9), ("decode", "decode", 0.8)):
        rows = [r for r in _rows(parts.get(part), key) if r.get("halted") == 0.5]
        for row in rows or [{"B": "-"}]:
            label = f"{part} efficiency at 50% halting, B={row['B']}"
            out.append(target(label, row.get("efficiency"), bound, True))
    rows = _rows(parts.get("generate"), "generate")
    for row in rows or [{"B": "-"}]:
        out.append(target(f"greedy generate, zoo / transformers throughput, B={row['B']}", row.get("zoo / hf"), 1.5, True))
    for size in ("160m", "410m"):
        train = parts.get(f"train-{size}")
        by_family = {}
        for row in [] if train is None else train.get("results", []):
            by_family[row["model"].rsplit("-", 1)[0]] = row
        for family in ("pythia", "ponder-pythia"):
            mfu = by_family.get(family, {}).get("mfu")
            out.append(target(f"training MFU {family}-{size}", mfu, 0.40, True))
        ada, ponder = by_family.get("adaponder-pythia"), by_family.get("ponder-pythia")
        ratio = ada["step_seconds"] / ponder["step_seconds"] if ada and ponder else None
        out.append(target(f"AdaPonder / PonderLM training step time, {size}", ratio, 1.10, False))
    return out


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| target | measured | bound | holds |", "|---|---|---|---|"]
    for r in rows:
        value = "not measured" if r["value"] is None else f"{r['value']:.3g}"
        holds = {True: "yes", False: "**no**", None: "-"}[r["holds"]]
        lines.append(f"| {r['target']} | {value} | {r['bound']} | {holds} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.environment is not None:
        info = environment()
        with atomic_write(args.environment) as tmp:
            tmp.write_text(json.dumps(info, indent=2) + "\n")
        print(json.dumps(info, indent=2))
        return info
    parts: dict[str, Any] = {}
    for path in sorted(args.work.glob("*.json")):
        try:
            parts[path.stem] = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            parts[path.stem] = {"unreadable": str(err)}
    if args.junit is not None and args.junit.exists():
        parts["tests"] = tests_report(args.junit)
    summary = {"parts": parts, "targets": targets(parts)}
    with atomic_write(args.out) as tmp:
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
    print(table(summary["targets"]))
    print(f"wrote {args.out}")
    return summary


if __name__ == "__main__":
    main()
