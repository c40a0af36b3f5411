"""The iso-FLOPs experiment: adaptive depth against fixed depth and fixed pruning, paired seeds.

AdaPonderLM claims that learned gates save compute at equal perplexity. The honest test
is the **fixed-depth frontier**: PonderLM run at 1, 2, 3 and 4 passes traces perplexity
against compute, and an adaptive model is worth its gates only if it lies below that line
(a lower perplexity than fixed depth at the same compute), and below fixed pruning (the
same compute spent on tokens chosen blind to content). Every variant of one seed starts
from the same backbone weights (:func:`zoo.build_model` pairs them) and sees the same
batches, so differences between variants are paired; several seeds give the spread.

Variants (:data:`VARIANTS`):

* ``single``: one pass, the compute floor: PonderLM's recipe (its embedding scale
  ``sqrt(d)`` and initialisation) without pondering, so that the frontier's points differ
  in the number of passes alone;
* ``ponder_2``, ``ponder_3``: PonderLM at 2 and 3 passes, the fixed-depth frontier;
* ``ponder``: PonderLM at 4 passes, the reference (compute 1.0);
* ``loop``: LoopTransformer at 4 passes;
* ``adaponder``: PonderLM + ``mlp_gate`` + ``kv_reuse``, gates trained in two stages;
* ``fixed_uniform``, ``fixed_geometric``: ``fixed_prune`` with a uniform or geometric
  schedule, at the mean depth the same seed's AdaPonder reached.

Each run is evaluated on the first ``eval_windows`` validation windows: perplexity, mean
and effective depth, and ``compute``, the executed multiply-accumulates (:mod:`zoo.flops`,
gates counted, halted tokens not: sparse execution) relative to 4-pass PonderLM of the
same shape. For ``adaponder`` the rank correlation of each token's depth with its NLL under
the same seed's 4-pass PonderLM (``depth_nll_spearman``) says whether the gates spend
their passes on the tokens that are hard.

:func:`run_variant` trains and evaluates one run (a process of its own in the recipe),
:func:`summarize` turns the rows into the frontier comparison and the targets, and
:func:`plot_perplexity_vs_compute` / :func:`plot_depth_vs_nll` draw the figures.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from zoo import flops
from zoo.analysis import evaluate_tokens, spearman
from zoo.build import build_model
from zoo.checkpoint import latest_checkpoint, load_trained
from zoo.config import ModelConfig, preset
from zoo.data import load_corpus, load_tokenizer
from zoo.halting.fixed_prune import ratio_for_depth
from zoo.registry import import_plugins

__all__ = [
    "VARIANTS",
    "FRONTIER",
    "IsoSettings",
    "GATE",
    "variant_config",
    "run_variant",
    "read_row",
    "summarize",
    "frontier_at",
    "plot_perplexity_vs_compute",
    "plot_depth_vs_nll",
]

VARIANTS = (
    "single",
    "ponder_2",
    "ponder_3",
    "ponder",
    "loop",
    "adaponder",
    "fixed_uniform",
    "fixed_geometric",
)
FRONTIER = {"single": 1, "ponder_2": 2, "ponder_3": 3, "ponder": 4}
"""The fixed-depth variants and their passes."""

GATE: dict[str, Any] = dict(hidden_mult=1, k_max=0.15, lam=0.1)
"""The ``adaponder`` variant's gates: ``mlp_gate``'s training defaults, 15% of the tokens that
reach a gate halting there, and hidden width ``d`` instead of the paper's ``4 d``: at width 64 a
``4 d`` gate costs about 11% of a pass, against 1.5% at Pythia-70M's width; a ``d`` gate costs
about 3%."""


@dataclass(frozen=True)
class IsoSettings:
    """Everything shared by the runs of one experiment.

    Attributes:
        data: corpus (``"stdlib"``, ``"embedded"``, a path; see :func:`zoo.data.load_corpus`).
        tokenizer: ``"byte"``, ``"stdlib-bpe-<V>"`` or a ``tokenizer.json``.
        num_layers: layers of the block stack.
        dim: model width.
        num_heads: attention heads.
        vocab_size: embedding rows; ``None``: the tokenizer's size rounded up to 64.
        steps: optimizer steps of every run.
        batch_size: sequences per step.
        seq_len: tokens per sequence.
        lr: peak learning rate (cosine to 0.1x, AdamW 0.9/0.95).
        weight_decay: on matrices.
        warmup: share of the steps warming the learning rate up.
        stage1: AdaPonder: share of the steps before the halting loss starts.
        ramp: AdaPonder: share of the steps over which ``k`` rises to ``k_max``.
        gate: ``mlp_gate`` keyword arguments of the ``adaponder`` variant (the stages are
            added from ``stage1`` and ``ramp``).
        halting_lr_scale: the gates' learning rate as a multiple of ``lr``.
        eval_windows: validation windows every run is evaluated on.
        eval_spread: lay them evenly over the whole validation split (every held-out file
            contributes) rather than taking the first ones.
        overrides: :class:`~zoo.config.ModelConfig` fields applied to every variant; its
            ``halting_kwargs`` are merged into ``gate`` (they concern the gates alone).
    """

    data: str = "stdlib"
    tokenizer: str = "byte"
    num_layers: int = 2
    dim: int = 64
    num_heads: int = 4
    vocab_size: int | None = None
    steps: int = 500
    batch_size: int = 32
    seq_len: int = 128
    lr: float = 5e-3
    weight_decay: float = 0.1
    warmup: float = 0.02
    stage1: float = 0.3
    ramp: float = 0.3
    gate: dict[str, Any] = field(default_factory=lambda: dict(GATE))
    halting_lr_scale: float = 1.0
    eval_windows: int = 1024
    eval_spread: bool = True
    overrides: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        return dataclasses.asdict(self)


def variant_config(variant: str, settings: IsoSettings, vocab_size: int, depth: float | None = None) -> ModelConfig:
    """The model config of ``variant``; fixed pruning gets the ratio whose expected depth is ``depth``.

    Raises:
        ValueError: an unknown variant, or a fixed-pruning variant without ``depth``.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    overrides = dict(settings.overrides)
    gate_overrides = overrides.pop("halting_kwargs", {})
    shape = dict(
        num_layers=settings.num_layers,
        dim=settings.dim,
        num_heads=settings.num_heads,
        vocab_size=settings.vocab_size or vocab_size,
        max_seq_len=max(settings.seq_len, 256),
    )
    shape.update(overrides)
    if variant == "single":  # PonderLM's recipe (embedding scale, initialisation) run for one pass
        return preset("ponder-pythia-tiny", recurrence="none", passes=1, **shape)
    if variant in FRONTIER:
        return preset("ponder-pythia-tiny", passes=FRONTIER[variant], **shape)
    if variant == "loop":
        return preset("loop-pythia-tiny", **shape)
    from zoo.train import gate_schedule  # the trainer's schedule, imported only to build a variant

    stages = gate_schedule(settings.steps, settings.stage1, settings.ramp)
    if variant == "adaponder":
        return preset("adaponder-pythia-tiny", halting_kwargs={**settings.gate, **stages, **gate_overrides}, **shape)
    if depth is None:
        raise ValueError(f"{variant} needs the AdaPonder depth it is matched to")
    schedule = variant.removeprefix("fixed_")
    ratio = ratio_for_depth(min(max(depth, 1.0), 4.0), 4, schedule)
    return preset(
        "adaponder-pythia-tiny", halting="fixed_prune", halting_kwargs={"ratio": ratio, "schedule": schedule}, **shape
    )


def _vocab(tokenizer) -> int:
    return 64 * math.ceil(tokenizer.vocab_size / 64)


EVAL_FIELDS = ("eval_windows", "eval_spread")
"""The settings that change only the evaluation: a finished run is re-evaluated, not retrained."""


def run_variant(
    variant: str,
    seed: int,
    settings: IsoSettings,
    folder: str | Path,
    depth: float | None = None,
    resume: bool = False,
    plugins: tuple[str, ...] = (),
    threads: int = 1,
) -> dict[str, Any]:
    """Trains one (variant, seed) into ``folder`` and evaluates it; returns its row.

    Writes ``run.json``, ``metrics.jsonl``, the final checkpoint, ``eval.json`` (the row)
    and ``tokens.safetensors`` (every validation token's NLL and depth, for the rank
    correlations). With ``resume``, a folder whose run was trained with the same settings
    is not trained again: its row is read back if it was evaluated the same way, else its
    final checkpoint is evaluated again (:data:`EVAL_FIELDS` changed); an interrupted run
    continues from its checkpoint.

    Args:
        variant: one of :data:`VARIANTS`.
        seed: initialisation and data seed.
        settings: the experiment's settings.
        folder: this run's folder.
        depth: fixed pruning only: the mean depth to match.
        resume: reuse a finished run, continue an interrupted one.
        plugins: modules to import first (parts registered outside the library).
        threads: torch CPU threads of this process.
    """
    from zoo.train import TrainConfig, seed_everything, train

    import_plugins(plugins)  # each worker process registers the parts it builds
    torch.set_num_threads(threads)
    folder = Path(folder)
    tokenizer = load_tokenizer(settings.tokenizer)
    config = variant_config(variant, settings, _vocab(tokenizer), depth)
    trained_as = _training_identity(variant, seed, settings, config)
    evaluated_as = {k: getattr(settings, k) for k in EVAL_FIELDS}
    start = time.perf_counter()
    data, val = load_corpus(settings.data, tokenizer)
    earlier = _trained_as(folder)
    if resume and earlier is not None and earlier != trained_as:
        raise ValueError(
            f"{folder} holds a {variant} run trained otherwise ({', '.join(_differences(earlier, trained_as))}); "
            f"resume with the settings it was trained with, write to another --out, or move that folder away"
        )
    finished = resume and earlier == trained_as and _final_step(folder) == settings.steps
    if finished and (folder / "eval.json").is_file() and read_row(folder).get("evaluated_as") == evaluated_as:
        return read_row(folder)
    if finished:
        model, _ = load_trained(folder)
    else:
        seed_everything(seed)
        model = build_model(config)
        cfg = TrainConfig(
            steps=settings.steps,
            batch_size=settings.batch_size,
            seq_len=settings.seq_len,
            lr=settings.lr,
            weight_decay=settings.weight_decay,
            warmup_steps=max(1, round(settings.warmup * settings.steps)),
            halting_lr_scale=settings.halting_lr_scale,
            seed=seed,
            checkpoint_every=max(1, settings.steps // 4),
            keep_checkpoints=1,
            progress=False,
        )
        info = dict(recipe="iso_flops", tokenizer=tokenizer.name, train=cfg.to_dict(), **trained_as)
        train(
            model,
            data,
            cfg,
            folder,
            resume=resume and latest_checkpoint(folder) is not None,
            val_data=val,
            tokenizer=tokenizer.name,
            run_info=info,
        )
    stats, report = evaluate_tokens(
        model, val, settings.seq_len, max_windows=settings.eval_windows, spread=settings.eval_spread
    )
    reference = build_model(variant_config("ponder", settings, _vocab(tokenizer)), device="meta")
    full = flops.count(reference, torch.full_like(stats.depth, 4), execution="dense").total
    used = flops.count(model.eval(), stats.depth).total
    row = {
        "variant": variant,
        "seed": seed,
        "perplexity": report.perplexity,
        "nll": report.nll,
        "mean_depth": report.mean_depth,
        "effective_depth": report.effective_depth,
        "compute": used / full,
        "compute_vs_single": report.compute_vs_single,
        "active_fraction": report.active_fraction,
        "nll_by_depth": report.nll_by_depth,
        "own_spearman": report.depth_nll_spearman,
        "halting_kwargs": config.halting_kwargs,
        "tokens": report.tokens,
        "evaluated_as": evaluated_as,
        "seconds": time.perf_counter() - start,
    }
    save_file(
        {"nll": stats.nll.float().contiguous(), "depth": stats.depth.to(torch.uint8).contiguous()},
        folder / "tokens.safetensors",
    )
    (folder / "eval.json").write_text(json.dumps(row, indent=2))
    return row


def _training_identity(variant: str, seed: int, settings: IsoSettings, config: ModelConfig) -> dict[str, Any]:
    trained = {k: v for k, v in settings.to_dict().items() if k not in EVAL_FIELDS}
    identity = {"variant": variant, "seed": seed, "settings": trained, "model_config": config.to_dict()}
    return json.loads(json.dumps(identity))  # as it reads back from run.json


def _trained_as(folder: Path) -> dict[str, Any] | None:
    """The training identity ``folder/run.json`` records (``None`` without one)."""
    if not (folder / "run.json").is_file():
        return None
    info = json.loads((folder / "run.json").read_text())
    settings = {k: v for k, v in (info.get("settings") or {}).items() if k not in EVAL_FIELDS}
    return {"variant": info.get("variant"), "seed": info.get("seed"), "settings": settings,
            "model_config": info.get("model_config")}


def _differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two nested dicts, each as ``key: old -> new``."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return out


def _final_step(folder: Path) -> int | None:
    checkpoint = latest_checkpoint(folder) if (folder / "checkpoints").is_dir() else None
    if checkpoint is None:
        return None
    return int(json.loads((checkpoint / "trainer.json").read_text())["step"])


def read_row(folder: str | Path) -> dict[str, Any]:
    """The row a finished run wrote (``eval.json``)."""
    return json.loads((Path(folder) / "eval.json").read_text())


def _tokens(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "tokens.safetensors")


def frontier_at(points: list[tuple[float, float]], compute: float) -> float | None:
    """Perplexity of the fixed-depth frontier at ``compute``.

    The frontier is the best perplexity fixed depth reaches with at most that compute: the
    line through the points, linear between neighbours, lowered to the best point at or
    below ``compute`` where more passes did worse (a model that spends more compute than
    a better fixed-depth model is not on the frontier).

    Args:
        points: (compute, perplexity) of the fixed-depth runs.
        compute: where to read the frontier.

    Returns:
        the frontier's perplexity, or ``None`` outside the points' compute range.

    Example:
        >>> frontier_at([(0.25, 10.0), (0.5, 8.0), (1.0, 7.0)], 0.75)
        7.5
        >>> frontier_at([(0.25, 10.0), (0.5, 8.0), (1.0, 9.0)], 0.75)  # 2 passes beat 4
        8.0
    """
    points = sorted(points)
    for (c0, p0), (c1, p1) in zip(points, points[1:]):
        if c0 <= compute <= c1:
            line = p0 if c1 == c0 else p0 + (p1 - p0) * (compute - c0) / (c1 - c0)
            return min([line] + [p for c, p in points if c <= compute])
    return None


def _mean_spread(values: list[float]) -> dict[str, float]:
    array = np.asarray(values, dtype=np.float64)
    return {
        "mean": float(array.mean()),
        "std": float(array.std(ddof=1)) if array.size > 1 else 0.0,
        "min": float(array.min()),
        "max": float(array.max()),
        "n": int(array.size),
    }


def summarize(rows: list[dict[str, Any]], folders: dict[tuple[str, int], Path] | None = None) -> dict[str, Any]:
    """The comparison of record from every run's row.

    Adds ``depth_nll_spearman`` to the ``adaponder`` rows (when ``folders`` locate the runs'
    token files and the same seed's ``ponder`` run exists), then computes per variant the
    mean and spread over seeds, the fixed-depth frontier read at AdaPonder's compute (per
    seed, paired), the 4-versus-3-passes margin and the targets.

    Args:
        rows: the rows of :func:`run_variant`.
        folders: (variant, seed) -> run folder.

    Returns:
        ``{"variants": ..., "frontier": ..., "margin_4_vs_3": ..., "targets": ...}``.
    """
    by = {(r["variant"], r["seed"]): r for r in rows}
    seeds = sorted({r["seed"] for r in rows})
    if folders:
        for seed in seeds:
            ada, ponder = folders.get(("adaponder", seed)), folders.get(("ponder", seed))
            if ("adaponder", seed) in by and ada is not None and ponder is not None:
                depth = _tokens(ada)["depth"].float()
                by[("adaponder", seed)]["depth_nll_spearman"] = spearman(depth, _tokens(ponder)["nll"])
    variants = {}
    for variant in VARIANTS:
        mine = [by[(variant, s)] for s in seeds if (variant, s) in by]
        if mine:
            variants[variant] = {
                key: _mean_spread([r[key] for r in mine])
                for key in ("perplexity", "compute", "mean_depth", "effective_depth")
            }
    summary: dict[str, Any] = {"seeds": seeds, "variants": variants}

    # The fixed-depth frontier at AdaPonder's compute, seed by seed.
    per_seed = []
    for seed in seeds:
        points = [(by[(v, seed)]["compute"], by[(v, seed)]["perplexity"]) for v in FRONTIER if (v, seed) in by]
        ada = by.get(("adaponder", seed))
        if ada is None or len(points) < 2:
            continue
        at = frontier_at(points, ada["compute"])
        entry = {"seed": seed, "compute": ada["compute"], "adaponder": ada["perplexity"], "frontier": at}
        entry["ratio"] = None if at is None else ada["perplexity"] / at
        for fixed in ("fixed_uniform", "fixed_geometric"):
            if (fixed, seed) in by:
                entry[fixed] = by[(fixed, seed)]["perplexity"]
                entry[f"{fixed}_compute"] = by[(fixed, seed)]["compute"]
        if ("ponder", seed) in by:
            entry["ponder"] = by[("ponder", seed)]["perplexity"]
        per_seed.append(entry)
    summary["frontier"] = per_seed
    margins = [
        by[("ponder_3", s)]["perplexity"] / by[("ponder", s)]["perplexity"] - 1
        for s in seeds
        if ("ponder_3", s) in by and ("ponder", s) in by
    ]
    summary["margin_4_vs_3"] = _mean_spread(margins) if margins else None
    summary["targets"] = _targets(per_seed, by, seeds, margins)
    return summary


def _targets(per_seed: list[dict], by: dict, seeds: list[int], margins: list[float]) -> list[dict[str, Any]]:
    """Each target: what it asks, the measured value (mean over seeds) and whether it holds."""

    def mean(values):
        values = [v for v in values if v is not None]
        return float(np.mean(values)) if values else None

    ada = [by[("adaponder", s)] for s in seeds if ("adaponder", s) in by]
    ratio = mean([e["ratio"] for e in per_seed])
    rows = [
        {
            "target": "4 passes clearly beat 3 (perplexity of ponder_3 / ponder - 1 >= 1% on every seed)",
            "value": mean(margins),
            "holds": bool(margins) and min(margins) >= 0.01,
        },
        {
            "target": "AdaPonder below the fixed-depth frontier at its compute (ratio < 1)",
            "value": ratio,
            "holds": ratio is not None and ratio < 1.0,
        },
    ]
    for fixed in ("fixed_uniform", "fixed_geometric"):
        gaps = [e["adaponder"] / e[fixed] for e in per_seed if fixed in e]
        rows.append(
            {
                "target": f"AdaPonder below {fixed} at the same depth (perplexity ratio < 1)",
                "value": mean(gaps),
                "holds": bool(gaps) and mean(gaps) < 1.0,
            }
        )
    to_ponder = mean([e["adaponder"] / e["ponder"] for e in per_seed if "ponder" in e])
    compute = mean([r["compute"] for r in ada])
    rows.append(
        {
            "target": "AdaPonder <= 1.01x 4-pass PonderLM's perplexity at <= 90% of its compute",
            "value": None if to_ponder is None else {"perplexity_ratio": to_ponder, "compute": compute},
            "holds": to_ponder is not None and to_ponder <= 1.01 and compute <= 0.90,
        }
    )
    rho = mean([r.get("depth_nll_spearman") for r in ada])
    rows.append(
        {
            "target": "depth ~ NLL (same-seed PonderLM) Spearman >= 0.2",
            "value": rho,
            "holds": rho is not None and rho >= 0.2,
        }
    )
    return rows


def plot_perplexity_vs_compute(rows: list[dict[str, Any]], path: str | Path, title: str = "") -> Path:
    """Perplexity against compute: every run as a point, the fixed-depth frontier through the
    seed means, writes a PNG."""
    from zoo.analysis import _save_png

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    markers = dict(zip(VARIANTS, "o^vsP*DX"))
    colors = plt.get_cmap("tab10")
    for k, variant in enumerate(VARIANTS):
        mine = [r for r in rows if r["variant"] == variant]
        if mine:
            ax.scatter(
                [r["compute"] for r in mine],
                [r["perplexity"] for r in mine],
                marker=markers[variant],
                s=70 if variant == "adaponder" else 36,
                color=colors(k),
                label=variant,
                zorder=3,
            )
    means = []
    for variant in FRONTIER:
        mine = [r for r in rows if r["variant"] == variant]
        if mine:
            means.append((np.mean([r["compute"] for r in mine]), np.mean([r["perplexity"] for r in mine])))
    if len(means) > 1:
        means.sort()
        ax.plot(*zip(*means), color="grey", linestyle="--", zorder=2, label="fixed-depth frontier (seed means)")
    ax.set_xlabel("compute (executed FLOPs / 4-pass PonderLM)")
    ax.set_ylabel("validation perplexity")
    ax.set_title(title or "perplexity against compute, every variant and seed")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save_png(fig, path)


def plot_depth_vs_nll(folders: dict[tuple[str, int], Path], path: str | Path, passes: int = 4) -> Path:
    """Mean NLL under the same seed's 4-pass PonderLM of the tokens AdaPonder ran at each depth,
    one line per seed; writes a PNG."""
    from zoo.analysis import _save_png

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    seeds = sorted(s for v, s in folders if v == "adaponder" and ("ponder", s) in folders)
    shares: dict[int, list[float]] = {}
    tops: dict[int, float] = {}
    for seed in seeds:
        depth = _tokens(folders[("adaponder", seed)])["depth"].long().flatten()
        nll = _tokens(folders[("ponder", seed)])["nll"].double().flatten()
        xs, ys = [], []
        for d in range(1, passes + 1):
            chosen = depth == d
            if bool(chosen.any()):
                xs.append(d)
                ys.append(float(nll[chosen].mean()))
                shares.setdefault(d, []).append(float(chosen.double().mean()))
                tops[d] = max(tops.get(d, -math.inf), ys[-1])
        ax.plot(xs, ys, marker="o", label=f"seed {seed}")
    for d, values in shares.items():  # one label per depth: the share of tokens, mean over seeds
        ax.annotate(f"{100 * np.mean(values):.0f}% of tokens", (d, tops[d]), textcoords="offset points",
                    xytext=(0, 7), ha="center", fontsize=7)
    ax.set_xticks(range(1, passes + 1))
    ax.set_xlim(0.6, passes + 0.4)
    ax.margins(y=0.15)
    ax.set_xlabel("passes AdaPonder ran (depth)")
    ax.set_ylabel("mean NLL under 4-pass PonderLM (nats)")
    ax.set_title("are the tokens that run longer the hard ones?")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save_png(fig, path)
