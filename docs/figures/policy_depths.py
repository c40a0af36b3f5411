"""Draws the depth distribution of every halting policy and cache strategy on the demo model (SVG).

Command (from the repository root, after ``make demo`` has trained ``runs/demo``)::

    python docs/figures/policy_depths.py                       # rewrites docs/figures/depth_*.svg
    python docs/figures/policy_depths.py --run <demo folder> --out /tmp --act-steps 50

Loads the demo's trained AdaPonder model (``runs/demo/adaponder``, its latest checkpoint)
and evaluates it with :func:`zoo.analysis.evaluate` on the demo's validation data (the
standard library's held-out source files, the demo's ``seq_len``) under each policy:

* ``mlp_gate``: the trained gates, as the demo runs them;
* ``none``: the same weights with ``halting="none"`` (every pass, the pondering update
  unscaled), next to :func:`zoo.analysis.full_depth_copy` (the gates forced open);
* ``fixed_prune``: the uniform ratio whose expected depth is ``mlp_gate``'s measured mean
  depth (:func:`zoo.halting.fixed_prune.ratio_for_depth`), the same compute;
* ``early_exit``: ``max_prob`` at the thresholds of ``EARLY_EXIT_THRESHOLDS``, zero-shot;
* ``act``: the demo's weights frozen and ACT's halting units, which the demo has not got,
  trained alone for ``--act-steps`` steps on the demo's training split (``zoo.train``);

and the demo model under ``kv_reuse`` (how it was trained) and ``recompute``. Writes one
histogram per policy (``depth_<policy>.svg``), one for the caches (``depth_caches.svg``)
and the numbers (``policy_depths.json``). These figures need the trained model, so they
are not part of ``make_figures.py`` (whose figures the test suite redraws on every run).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))  # make_figures.py, beside this file: its style and save()
from make_figures import ACCENT, ACTIVE, EDGE, GREEN, INK, plt, save  # noqa: E402

import zoo  # noqa: E402
from zoo.analysis import EvalReport, evaluate, full_depth_copy  # noqa: E402
from zoo.build import build_model  # noqa: E402
from zoo.data import TokenStream, eval_windows, load_corpus, load_tokenizer  # noqa: E402
from zoo.halting.fixed_prune import expected_depth, ratio_for_depth  # noqa: E402
from zoo.train import (  # noqa: E402
    RUN_INFO,
    TrainConfig,
    latest_checkpoint,
    load_trained,
    read_metrics,
    train,
)

COMMAND = "python docs/figures/policy_depths.py"
NUMBERS = "policy_depths.json"
# Each figure, the evaluations it shows and the pages that show it.
FIGURES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "depth_mlp_gate.svg": (("mlp_gate",), ("docs/halting/mlp_gate.md",)),
    "depth_none.svg": (("none", "none_gates_open"), ("docs/halting/none.md",)),
    "depth_fixed_prune.svg": (("fixed_prune",), ("docs/halting/fixed_prune.md",)),
    "depth_early_exit.svg": (("early_exit_0.5", "early_exit_0.9"), ("docs/halting/early_exit.md",)),
    "depth_act.svg": (("act_untrained", "act"), ("docs/halting/act.md",)),
    "depth_caches.svg": (
        ("mlp_gate", "recompute"),
        ("docs/caches/kv_reuse.md", "docs/caches/recompute.md"),
    ),
}
EARLY_EXIT_THRESHOLDS = (0.5, 0.9)  # max_prob; 0.9 is the policy's default
ACT_KWARGS: dict = {}  # the defaults: epsilon 0.01, tau 0.01, bias_init -3
ACT_STEPS = 200
COLORS = (ACTIVE, ACCENT, GREEN)
# The TrainConfig fields that decide ACT's training, kept in the JSON.
TRAIN_FIELDS = ("steps", "batch_size", "seq_len", "lr", "min_lr_ratio", "warmup_steps", "weight_decay",
                "betas", "grad_clip", "seed", "train_only")


# Loading -------------------------------------------------------------------------------------


def open_demo(run: Path) -> tuple[zoo.RecurrentLM, dict, int]:
    """The demo's trained AdaPonder model, its settings and the step of its checkpoint.

    Raises:
        SystemExit: ``run`` is not a demo folder with a trained AdaPonder model.
    """
    folder = run / "adaponder"
    checkpoint = latest_checkpoint(folder) if folder.is_dir() else None
    if not (run / "demo.json").is_file() or checkpoint is None:
        raise SystemExit(
            f"{run} holds no trained demo (no demo.json or no adaponder checkpoint): run `make demo` first, "
            f"or pass --run <folder> with a demo run"
        )
    info = json.loads((folder / RUN_INFO).read_text())
    settings = info["settings"]
    demo = {
        "model": "adaponder",
        "data": settings["data"],
        "tokenizer": info["tokenizer"],
        "batch_size": settings["batch_size"],
        "seq_len": settings["seq_len"],
        "lr": settings["lr"],
        "seed": info["seed"],
        "steps": settings["steps"],
    }
    step = int(json.loads((checkpoint / "trainer.json").read_text())["step"])
    model, _ = load_trained(folder)
    return model.eval(), demo, step


def with_policy(
    model: zoo.RecurrentLM, halting: str, halting_kwargs: dict, cache: str | None = None, seed: int = 0
) -> zoo.RecurrentLM:
    """The same weights under another halting policy (or cache strategy).

    The trunk (embedding, blocks, head) is copied; a policy other than the model's gets its
    own parameters (if any) freshly initialised from ``seed``, the model's gates are left out.
    """
    cache = cache or model.config.cache
    config = model.config.replace(halting=halting, halting_kwargs=halting_kwargs, cache=cache)
    torch.manual_seed(seed)
    other = build_model(config)
    weights = model.state_dict()
    if halting != model.config.halting:
        weights = {k: v for k, v in weights.items() if not k.startswith("halting.")}
    missing, unexpected = other.load_state_dict(weights, strict=False)
    fresh = [k for k in missing if not k.startswith("halting.")]
    if fresh or unexpected:
        raise ValueError(f"the trunk does not fit: missing {fresh}, unexpected {unexpected}")
    return other.eval()


# Measuring -----------------------------------------------------------------------------------


def entry(model: zoo.RecurrentLM, report: EvalReport, **extra) -> dict:
    """One evaluation as stored in the JSON: the policy, its kwargs, the cache, the numbers."""
    shares = [c / report.tokens for c in report.depth_counts]
    config = model.config
    return {
        "halting": config.halting,
        "halting_kwargs": dict(config.halting_kwargs),
        "cache": config.cache,
        **extra,
        "depth_share": shares,
        "report": report.to_dict(),
    }


def train_act(act: zoo.RecurrentLM, demo: dict, steps: int, data: TokenStream) -> dict:
    """Trains ``act``'s halting units alone (the trunk frozen) for ``steps`` steps; returns a summary."""
    config = TrainConfig(
        steps=steps,
        batch_size=demo["batch_size"],
        seq_len=demo["seq_len"],
        lr=demo["lr"],
        warmup_steps=max(1, round(0.05 * steps)),
        weight_decay=0.0,
        seed=demo["seed"],
        train_only=("halting.",),  # the trunk stays the demo's
    )
    print(f"act: training the halting units alone for {steps} steps (the demo's weights frozen)")
    with tempfile.TemporaryDirectory() as folder:
        train(act, data, config, folder)
        rows = read_metrics(folder)
    act.eval()
    return {
        "train": {k: v for k, v in config.to_dict().items() if k in TRAIN_FIELDS},
        "data": f"{demo['data']} corpus, training split",
        "first_step": {k: rows[0][k] for k in ("loss", "aux_loss", "depth")},
        "last_step": {k: rows[-1][k] for k in ("loss", "aux_loss", "depth")},
    }


@torch.no_grad()
def running_gate_medians(
    model: zoo.RecurrentLM, val: TokenStream, seq_len: int, windows: int | None
) -> list[float | None]:
    """Per pondering pass ``i``, the median gate ``s^i`` of the tokens that run pass ``i + 1``.

    The gate scales those tokens' pondering update; other policies scale it by 1.
    """
    ids = torch.as_tensor(eval_windows(val, seq_len, windows, spread=True))[:, :-1]  # (N, T)
    gates, running = [], []
    for first in range(0, ids.shape[0], 8):
        out = model(ids[first : first + 8], execution="dense")
        gates.append(out.gates)  # (P - 1, B, T)
        running.append(out.masks[1:])  # (P - 1, B, T): ran the next pass
    g, m = torch.cat(gates, 1), torch.cat(running, 1)
    return [float(g[i][m[i]].median()) if m[i].any() else None for i in range(g.shape[0])]


def measure(model: zoo.RecurrentLM, demo: dict, act_steps: int, eval_windows: int | None) -> dict[str, dict]:
    """Every evaluation the figures show, by name."""
    data, val = load_corpus(demo["data"], load_tokenizer(demo["tokenizer"]))
    seq_len, passes = demo["seq_len"], model.config.passes

    def run(name: str, m: zoo.RecurrentLM, **extra) -> dict:
        report = evaluate(m, val, seq_len, max_windows=eval_windows, spread=True)
        print(f"{name}: mean depth {report.mean_depth:.3f}, perplexity {report.perplexity:.3f}, "
              f"compute saved {_percent(report.compute_saved)}")
        return entry(m, report, **extra)

    out = {"mlp_gate": run("mlp_gate", model, weights="the demo's, gates included")}
    out["mlp_gate"]["gate_median_running"] = running_gate_medians(model, val, seq_len, eval_windows)
    out["none"] = run("none", with_policy(model, "none", {}), weights="the demo's trunk, gates left out")
    out["none_gates_open"] = run(
        "none_gates_open", full_depth_copy(model), weights="the demo's, gates forced open (threshold 0)"
    )
    target = out["mlp_gate"]["report"]["mean_depth"]
    ratio = ratio_for_depth(target, passes)
    out["fixed_prune"] = run(
        "fixed_prune",
        with_policy(model, "fixed_prune", {"ratio": ratio, "schedule": "uniform", "seed": 0}),
        weights="the demo's trunk, gates left out",
        target_mean_depth=target,
        expected_depth=expected_depth(ratio, passes),
    )
    for threshold in EARLY_EXIT_THRESHOLDS:
        out[f"early_exit_{threshold}"] = run(
            f"early_exit_{threshold}",
            with_policy(model, "early_exit", {"measure": "max_prob", "threshold": threshold}),
            weights="the demo's trunk, gates left out",
        )
    act = with_policy(model, "act", ACT_KWARGS, seed=demo["seed"])
    out["act_untrained"] = run("act_untrained", act, weights="the demo's trunk, ACT units as initialised")
    training = train_act(act, demo, act_steps, data)
    out["act"] = run(
        "act", act, weights="the demo's trunk (frozen), ACT units trained alone", training=training
    )
    out["recompute"] = run(
        "recompute", with_policy(model, model.config.halting, dict(model.config.halting_kwargs), "recompute"),
        weights="the demo's, gates included",
    )
    return out


# Drawing -------------------------------------------------------------------------------------


def _numbers(r: dict) -> str:
    return (
        f"mean depth {r['mean_depth']:.2f} of {r['passes']}, "
        f"validation perplexity {r['perplexity']:.3f}, compute saved {_percent(r['compute_saved'])}"
    )


def _percent(share: float) -> str:
    return f"{round(100 * share, 1) + 0.0:.1f}%"  # + 0.0: no "-0.0%" for a tiny negative


def depth_figure(heading: str, series: list[tuple[str, dict]], note: str):
    """Share of tokens by depth, one bar group per depth, one bar per evaluation.

    The title holds ``heading`` and, per evaluation, its label, mean depth, validation
    perplexity and compute saved.
    """
    passes = series[0][1]["report"]["passes"]
    depths = range(1, passes + 1)
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(8.2, 3.6 + 0.22 * len(series)))
    for k, (label, e) in enumerate(series):
        offset = (k - (len(series) - 1) / 2) * width
        shares = [100 * s for s in e["depth_share"]]
        bars = ax.bar([d + offset for d in depths], shares, width * 0.9, color=COLORS[k], label=label)
        for bar, share in zip(bars, shares):
            ax.text(bar.get_x() + bar.get_width() / 2, share + 1.5, f"{share:.1f}%", ha="center", va="bottom",
                    fontsize=8, color=INK)
    lines = [heading] + [
        (f"{label}: " if len(series) > 1 else "") + _numbers(e["report"]) for label, e in series
    ]
    ax.set_title("\n".join(lines), loc="left", fontsize=9.5, color=INK, linespacing=1.4)
    ax.set_xticks(list(depths))
    ax.set_xlabel("passes run (depth)")
    ax.set_ylabel("share of tokens (%)")
    ax.set_ylim(0, 112)
    ax.set_xlim(0.4, passes + 0.6)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    if len(series) > 1:
        ax.legend(loc="upper left", frameon=False, fontsize=8.5)
    fig.text(0.01, -0.02, note, fontsize=7.5, color=EDGE, ha="left", va="top")
    return fig


def headings(numbers: dict) -> dict[str, tuple[str, list[str]]]:
    """Per figure: the heading and the legend label of each evaluation."""
    e = numbers["evaluations"]
    fp, act = e["fixed_prune"], e["act"]
    ratio = fp["halting_kwargs"]["ratio"]
    return {
        "depth_mlp_gate.svg": ("mlp_gate: the demo model as trained, its gates and kv_reuse", [""]),
        "depth_none.svg": (
            "none on the demo's weights: every token runs every pass",
            ["halting='none' (s = 1)", "mlp_gate, gates forced open"],
        ),
        "depth_fixed_prune.svg": (
            f"fixed_prune, uniform ratio {ratio:.4f} (seed 0): expected depth {fp['expected_depth']:.3f}"
            f" = mlp_gate's mean depth",
            [""],
        ),
        "depth_early_exit.svg": (
            "early_exit (max_prob) on the demo's weights, zero-shot",
            [f"threshold {t}" for t in EARLY_EXIT_THRESHOLDS],
        ),
        "depth_act.svg": (
            "act (default kwargs) on the demo's weights, frozen; only the halting units train",
            ["units as initialised", f"units trained {act['training']['train']['steps']} steps"],
        ),
        "depth_caches.svg": (
            "the demo model (mlp_gate) under each cache strategy",
            ["kv_reuse (as trained)", "recompute"],
        ),
    }


def draw(numbers: dict, out: Path) -> list[Path]:
    """Writes every figure of :data:`FIGURES` from ``numbers``; returns the paths."""
    run, ev = numbers["run"], numbers["eval"]
    note = (
        f"{run['model_config']['passes']}-pass demo AdaPonder model (checkpoint step {run['step']}); "
        f"{ev['tokens']:,} validation bytes in windows of {ev['seq_len']}. {COMMAND}"
    )
    titles = headings(numbers)
    paths = []
    for name, (keys, _) in FIGURES.items():
        heading, labels = titles[name]
        series = [(label, numbers["evaluations"][key]) for label, key in zip(labels, keys)]
        path = out / name
        save(depth_figure(heading, series, note), path)
        paths.append(path)
    return paths


# Main ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Measures, writes the JSON and draws; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path("runs/demo"), help="the demo run folder (make demo)")
    parser.add_argument("--out", type=Path, default=HERE, help="output folder (default: docs/figures)")
    parser.add_argument("--act-steps", type=int, default=ACT_STEPS, help="steps training ACT's halting units")
    parser.add_argument("--eval-windows", type=int, default=1024, help="validation windows (the demo's 1024)")
    args = parser.parse_args(argv)
    if args.act_steps < 1 or args.eval_windows < 1:
        parser.error("--act-steps and --eval-windows must be at least 1")
    torch.set_num_threads(1)  # deterministic numbers, and a tiny model runs fastest so
    model, demo, step = open_demo(args.run)
    evaluations = measure(model, demo, args.act_steps, args.eval_windows)
    numbers = {
        "command": COMMAND,
        "run": {
            "folder": str(args.run),
            "step": step,
            "preset": demo["model"],
            "demo": demo,
            "model_config": model.config.to_dict(),
        },
        "eval": {
            "data": f"{demo['data']} corpus, validation split",
            "seq_len": demo["seq_len"],
            "windows": args.eval_windows,
            "tokens": evaluations["mlp_gate"]["report"]["tokens"],
        },
        "figures": {name: list(keys) for name, (keys, _) in FIGURES.items()},
        "evaluations": evaluations,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / NUMBERS).write_text(json.dumps(numbers, indent=2) + "\n")
    for path in [args.out / NUMBERS, *draw(numbers, args.out)]:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
