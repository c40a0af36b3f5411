"""The iso-FLOPs comparison of record: variants, the frontier, the targets (synthetic rows)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from zoo.iso_flops import FRONTIER, IsoSettings, frontier_at, summarize, variant_config


def rows_for(seed: int, ada_ppl: float, ada_compute: float, ppl4: float = 7.0) -> list[dict]:
    base = {"single": (0.22, 8.0), "ponder_2": (0.48, 7.5), "ponder_3": (0.74, 7.2), "ponder": (1.0, ppl4)}
    rows = [
        {"variant": v, "seed": seed, "compute": c, "perplexity": p, "mean_depth": FRONTIER[v], "effective_depth": FRONTIER[v]}
        for v, (c, p) in base.items()
    ]
    rows.append({"variant": "adaponder", "seed": seed, "compute": ada_compute, "perplexity": ada_ppl,
                 "mean_depth": 3.2, "effective_depth": 3.0})
    for fixed, ppl in (("fixed_uniform", 7.3), ("fixed_geometric", 7.25)):
        rows.append({"variant": fixed, "seed": seed, "compute": ada_compute, "perplexity": ppl,
                     "mean_depth": 3.2, "effective_depth": 3.2})
    return rows


def test_frontier_reads_between_pass_counts_and_never_above_a_cheaper_point():
    points = [(0.25, 10.0), (0.5, 8.0), (0.75, 7.5), (1.0, 7.0)]
    assert frontier_at(points, 0.875) == pytest.approx(7.25)
    assert frontier_at(points, 0.5) == pytest.approx(8.0)
    assert frontier_at(points, 1.2) is None and frontier_at(points, 0.1) is None
    worse_with_more = [(0.25, 10.0), (0.5, 7.0), (0.75, 7.5), (1.0, 7.4)]
    assert frontier_at(worse_with_more, 0.9) == pytest.approx(7.0)


def test_summary_reads_the_frontier_seed_by_seed_and_checks_the_targets():
    rows = rows_for(0, ada_ppl=7.05, ada_compute=0.87) + rows_for(1, ada_ppl=7.12, ada_compute=0.87, ppl4=7.1)
    summary = summarize(rows)
    f0, f1 = summary["frontier"]
    assert f0["frontier"] == pytest.approx(7.2 + (7.0 - 7.2) * (0.87 - 0.74) / 0.26)
    assert f0["ratio"] == pytest.approx(7.05 / f0["frontier"])
    assert summary["variants"]["ponder"]["perplexity"]["mean"] == pytest.approx(7.05)
    assert summary["variants"]["ponder"]["perplexity"]["min"] == 7.0
    margins = summary["margin_4_vs_3"]
    assert margins["n"] == 2 and margins["mean"] == pytest.approx(((7.2 / 7.0 - 1) + (7.2 / 7.1 - 1)) / 2)
    targets = {t["target"]: t for t in summary["targets"]}
    four = next(t for k, t in targets.items() if k.startswith("4 passes"))
    assert four["holds"]  # 2.9% and 1.4%
    below = next(t for k, t in targets.items() if k.startswith("AdaPonder below the fixed-depth"))
    assert below["holds"] and below["value"] < 1
    near = next(t for k, t in targets.items() if "1.01x" in k)
    assert near["holds"] and near["value"]["compute"] == pytest.approx(0.87)
    assert all(t["holds"] for k, t in targets.items() if "fixed_" in k)
    rho = next(t for k, t in targets.items() if "Spearman" in k)
    assert rho["value"] is None and not rho["holds"]  # no token files given


def test_targets_fail_when_they_should():
    rows = rows_for(0, ada_ppl=7.3, ada_compute=0.95, ppl4=7.19)  # 3 passes ~ 4, gates above the line
    targets = {t["target"]: t for t in summarize(rows)["targets"]}
    assert not next(t for k, t in targets.items() if k.startswith("4 passes"))["holds"]
    assert not next(t for k, t in targets.items() if k.startswith("AdaPonder below the fixed-depth"))["holds"]
    assert not next(t for k, t in targets.items() if "1.01x" in k)["holds"]


def test_spearman_is_read_against_the_same_seeds_ponderlm(tmp_path):
    rows = rows_for(0, 7.05, 0.87)
    ada, ponder = tmp_path / "ada", tmp_path / "ponder"
    ada.mkdir()
    ponder.mkdir()
    nll = torch.rand(4, 32)
    depth = 1 + (nll * 3.999).floor().to(torch.uint8)  # depth rises with the NLL: rank correlation near 1
    save_file({"nll": torch.rand(4, 32), "depth": depth}, ada / "tokens.safetensors")
    save_file({"nll": nll, "depth": torch.full((4, 32), 4, dtype=torch.uint8)}, ponder / "tokens.safetensors")
    summary = summarize(rows, {("adaponder", 0): ada, ("ponder", 0): ponder})
    ada_row = next(r for r in rows if r["variant"] == "adaponder")
    assert ada_row["depth_nll_spearman"] > 0.9
    assert next(t for t in summary["targets"] if "Spearman" in t["target"])["holds"]


def test_variants_share_the_shape_and_fixed_pruning_needs_a_depth():
    s = IsoSettings(overrides={"dim": 32, "halting_kwargs": {"k_max": 0.3}})
    configs = {v: variant_config(v, s, 320, depth=3.0) for v in ("single", "ponder_3", "loop", "adaponder", "fixed_uniform")}
    assert {c.dim for c in configs.values()} == {32} and {c.vocab_size for c in configs.values()} == {320}
    assert configs["single"].passes == 1 and configs["ponder_3"].passes == 3 and configs["loop"].recurrence == "loop"
    assert configs["adaponder"].halting_kwargs["k_max"] == 0.3  # gate overrides reach the gates alone
    assert configs["adaponder"].halting_kwargs["warmup_steps"] == round(s.stage1 * s.steps)
    assert "k_max" not in configs["fixed_uniform"].halting_kwargs
    with pytest.raises(ValueError, match="needs the AdaPonder depth"):
        variant_config("fixed_geometric", s, 320)
    with pytest.raises(ValueError, match="unknown variant"):
        variant_config("ponder_5", s, 320)


def test_resume_refuses_a_folder_trained_otherwise(tmp_path):
    from zoo.iso_flops import run_variant

    s = IsoSettings(data="embedded", steps=2, batch_size=2, seq_len=16, eval_windows=2)
    run_variant("single", 0, s, tmp_path / "single")
    other = IsoSettings(data="embedded", steps=2, batch_size=2, seq_len=16, eval_windows=2, lr=1e-3)
    with pytest.raises(ValueError, match=r"trained otherwise \(settings.lr: 0.005 -> 0.001\)"):
        run_variant("single", 0, other, tmp_path / "single", resume=True)


# The recorded experiment and the pages that quote it ---------------------------------------------

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]


def test_results_page_quotes_the_recorded_experiment():
    """Every mean, spread and target verdict on the results page is the recorded JSON's."""
    import json

    record = json.loads((ROOT / "docs/figures/iso_flops.json").read_text())
    page = (ROOT / "docs/results.md").read_text()
    assert record["command"] in page
    summary = record["summary"]
    for variant, stats in summary["variants"].items():
        p = stats["perplexity"]
        assert f"{p['mean']:.3f} ({p['min']:.3f}-{p['max']:.3f})" in page, variant
        assert f"{100 * stats['compute']['mean']:.1f}%" in page, variant
    for entry in summary["frontier"]:
        assert f"| {entry['seed']} | {100 * entry['compute']:.1f}% | {entry['adaponder']:.3f} |" in page
        assert f"{entry['ratio']:.3f}" in page
    # each target's measured value stands in a row of the targets table with its verdict
    rows = [line for line in page.splitlines() if line.endswith(("| yes |", "| **no** |"))]
    targets = summary["targets"]
    measured = [
        f"{100 * targets[0]['value']:+.1f}%",
        f"ratio {targets[1]['value']:.3f}",
        f"ratio {targets[2]['value']:.3f} / {targets[3]['value']:.3f}",
        f"ratio {targets[2]['value']:.3f} / {targets[3]['value']:.3f}",
        f"{targets[4]['value']['perplexity_ratio']:.3f}x at {100 * targets[4]['value']['compute']:.1f}%",
        f"{targets[5]['value']:+.2f}",
    ]
    assert len(targets) == len(measured)
    for target, value in zip(targets, measured):
        (row,) = [row for row in rows if f"| {value}" in row]
        assert row.endswith("| yes |" if target["holds"] else "| **no** |"), (target["target"], row)
    rebuilt = summarize(record["rows"])  # the summary follows from the rows
    assert [t["holds"] for t in rebuilt["targets"][:5]] == [t["holds"] for t in summary["targets"][:5]]
    for name in ("iso_flops_perplexity.png", "iso_flops_depth_nll.png"):
        assert (ROOT / "docs/figures" / name).read_bytes().startswith(b"\x89PNG")
        assert f"figures/{name}" in page


def test_mlp_gate_page_quotes_the_recorded_ablation():
    import json

    record = json.loads((ROOT / "docs/figures/gate_ablation.json").read_text())
    page = (ROOT / "docs/halting/mlp_gate.md").read_text()
    for row in record["rows"]:
        shares = ", ".join(f"{round(100 * a)}" for a in row["active_fraction"]) + "%"
        line = (
            f"| {row['perplexity']:.3f} | {row['mean_depth']:.2f} | {row['effective_depth']:.2f} | "
            f"{100 * row['compute']:.1f}% | {shares} | {row['own_spearman']:+.2f} |"
        )
        assert line in page, (row["change"], line)
