"""Iso-FLOPs: AdaPonder against the fixed-depth frontier and fixed pruning, on paired seeds.

The experiment of record for adaptive depth (:mod:`zoo.iso_flops`). For every seed it
trains, from the same backbone weights and on the same batches: one pass (``single``),
PonderLM at 2, 3 and 4 passes (``ponder_2``, ``ponder_3``, ``ponder``), LoopTransformer
(``loop``), AdaPonder (``adaponder``) and fixed pruning with a uniform and a geometric
schedule at that seed's AdaPonder depth (``fixed_uniform``, ``fixed_geometric``). The
runs go to ``--workers`` processes in parallel. Then it reads the fixed-depth frontier at
AdaPonder's compute, checks the targets and draws the figures::

    ponder-zoo iso-flops --steps 500 --seeds 2 --out runs/iso_flops
    python recipes/iso_flops.py --steps 500 --seeds 2 --out runs/iso_flops

Writes ``<out>/iso_flops.json`` (``rows``: one record per variant and seed with
``perplexity``, ``mean_depth``, ``effective_depth``, ``compute`` relative to 4-pass
PonderLM, and ``depth_nll_spearman`` for AdaPonder; ``summary``: means, spread, the
frontier and the targets), ``<out>/iso_flops.md`` (the tables),
``<out>/perplexity_vs_compute.png`` and ``<out>/depth_vs_nll.png``. Each run's folder is
``<out>/<variant>-seed<N>/``; ``--resume`` reuses finished runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import fields, replace
from multiprocessing import get_context
from pathlib import Path

from tqdm.auto import tqdm

from zoo.corpora import STDLIB
from zoo.data import load_corpus, load_tokenizer
from zoo.iso_flops import (
    VARIANTS,
    IsoSettings,
    plot_depth_vs_nll,
    plot_perplexity_vs_compute,
    run_variant,
    summarize,
)
from zoo.recipes.common import (
    HelpFormatter,
    add_override_option,
    add_plugin_option,
    add_settings,
    overrides_from,
    positive_int,
    settings_from,
)
from zoo.registry import import_plugins


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The options of ``ponder-zoo iso-flops`` and ``recipes/iso_flops.py``, with their defaults."""
    p = parser or argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--out", required=True, help="folder of the runs, the tables and the figures")
    p.add_argument("--seeds", type=positive_int, default=2, help="seeds 0..N-1, each with every variant")
    p.add_argument(
        "--variants", type=variant_list, default=",".join(VARIANTS), help="comma-separated subset of the variants"
    )
    p.add_argument(
        "--workers", type=positive_int, default=2, help="runs trained in parallel, one process and thread each"
    )
    add_settings(p.add_argument_group("settings of every run"), IsoSettings())
    add_override_option(
        p,
        "a field for every variant (e.g. dim=96, num_layers=1; halting_kwargs={...} is merged into "
        "AdaPonder's gate settings)",
    )
    p.add_argument("--resume", action="store_true", help="reuse finished runs in --out, continue interrupted ones")
    add_plugin_option(p)
    return p


def variant_list(text: str) -> str:
    """An argparse ``type``: comma-separated names of :data:`zoo.iso_flops.VARIANTS`."""
    unknown = sorted(set(text.split(",")) - set(VARIANTS))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown variant(s) {', '.join(unknown)}; choose from {', '.join(VARIANTS)}")
    return text


def iso_settings(args: argparse.Namespace) -> IsoSettings:
    """The settings the parsed options describe."""
    overrides = overrides_from(args)
    shape = {f.name for f in fields(IsoSettings)} & set(overrides)  # shape fields are settings of their own
    return replace(
        settings_from(args, IsoSettings()),
        overrides={k: v for k, v in overrides.items() if k not in shape},
        **{k: overrides[k] for k in shape},
    )


# Run ------------------------------------------------------------------------------------------


def run_all(args: argparse.Namespace, settings: IsoSettings) -> tuple[list[dict], dict]:
    """Every (variant, seed), in parallel processes; fixed pruning once its seed's AdaPonder is done."""
    out = Path(args.out)
    wanted = args.variants.split(",")
    folders = {(v, s): out / f"{v}-seed{s}" for v in wanted for s in range(args.seeds)}
    fixed = [v for v in wanted if v.startswith("fixed_")]
    if fixed and "adaponder" not in wanted:
        raise SystemExit("fixed pruning is matched to AdaPonder's depth: keep 'adaponder' in --variants")
    first = [(v, s) for (v, s) in folders if not v.startswith("fixed_")]
    first.sort(key=lambda key: key[0] != "adaponder")  # AdaPonder first: fixed pruning waits for it
    rows: list[dict] = []
    plugins = tuple(args.plugin)
    with (
        ProcessPoolExecutor(args.workers, mp_context=get_context("spawn")) as pool,
        tqdm(total=len(folders), desc="runs", unit="run") as bar,
    ):

        def submit(variant: str, seed: int, depth: float | None = None):
            return pool.submit(
                run_variant, variant, seed, settings, folders[(variant, seed)], depth, args.resume, plugins
            )

        pending = {submit(v, s): (v, s) for v, s in first}
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                variant, seed = pending.pop(future)
                row = future.result()
                rows.append(row)
                bar.update(1)
                bar.write(
                    f"{variant} seed {seed}: perplexity {row['perplexity']:.3f}, depth {row['mean_depth']:.2f}, "
                    f"compute {100 * row['compute']:.1f}% ({row['seconds']:.0f} s)"
                )
                if variant == "adaponder":
                    for other in fixed:
                        pending[submit(other, seed, row["mean_depth"])] = (other, seed)
    return rows, folders


# Report -----------------------------------------------------------------------------------------


def tables(rows: list[dict], summary: dict) -> str:
    """The markdown tables: every run, the means with spread, the frontier, the targets."""
    lines = ["| variant | seed | perplexity | mean depth | effective depth | compute |", "|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (VARIANTS.index(r["variant"]), r["seed"])):
        lines.append(
            f"| {r['variant']} | {r['seed']} | {r['perplexity']:.3f} | {r['mean_depth']:.3f} | "
            f"{r['effective_depth']:.3f} | {100 * r['compute']:.1f}% |"
        )
    lines += ["", "| variant | perplexity, mean (min-max) | compute, mean |", "|---|---|---|"]
    for name, v in summary["variants"].items():
        p = v["perplexity"]
        lines.append(f"| {name} | {p['mean']:.3f} ({p['min']:.3f}-{p['max']:.3f}) | {100 * v['compute']['mean']:.1f}% |")
    if summary["frontier"]:
        lines += ["", "| seed | AdaPonder compute | AdaPonder ppl | frontier ppl there | ratio |", "|---|---|---|---|---|"]
        for e in summary["frontier"]:
            front = "-" if e["frontier"] is None else f"{e['frontier']:.3f}"
            ratio = "-" if e["ratio"] is None else f"{e['ratio']:.4f}"
            lines.append(f"| {e['seed']} | {100 * e['compute']:.1f}% | {e['adaponder']:.3f} | {front} | {ratio} |")
    lines += ["", "| target | measured (mean over seeds) | holds |", "|---|---|---|"]
    for t in summary["targets"]:
        lines.append(f"| {t['target']} | {json.dumps(t['value'])} | {'yes' if t['holds'] else 'no'} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Runs the experiment; returns the exit status."""
    return run(build_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Runs the experiment with parsed options; returns the exit status."""
    settings = iso_settings(args)
    import_plugins(args.plugin)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(settings.tokenizer)  # trains and caches a BPE before the workers start
    if settings.data == STDLIB:
        load_corpus(settings.data, tokenizer)  # tokenizes and caches the corpus once
    rows, folders = run_all(args, settings)
    done = {key: folder for key, folder in folders.items() if (folder / "eval.json").is_file()}
    summary = summarize(rows, done)
    text = tables(rows, summary)
    print(text)
    (out / "iso_flops.md").write_text(text + "\n")
    record = {"settings": settings.to_dict(), "seeds": args.seeds, "rows": rows, "summary": summary}
    (out / "iso_flops.json").write_text(json.dumps(record, indent=2))
    plot_perplexity_vs_compute(rows, out / "perplexity_vs_compute.png")
    if any(v == "adaponder" for v, _ in done) and any(v == "ponder" for v, _ in done):
        plot_depth_vs_nll(done, out / "depth_vs_nll.png")
    print(f"wrote {out / 'iso_flops.json'}, {out / 'iso_flops.md'} and the figures")
    return 0


if __name__ == "__main__":
    sys.exit(main())
