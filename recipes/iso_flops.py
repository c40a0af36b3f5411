"""Iso-FLOPs: learned gates against fixed pruning at the same mean depth, and full-depth baselines.

AdaPonderLM's claim (REFERENCES.md): learned gates beat fixed pruning with uniform and
geometric schedules at equal FLOPs. This recipe trains, with identical data, steps and
seed, at a size a CPU affords:

1. ``adaponder``: ``mlp_gate`` gates (two-stage schedule), then measures its mean depth d
   on the validation split;
2. ``fixed_uniform`` / ``fixed_geometric``: ``fixed_prune`` with the ratio whose expected
   mean depth is d (``ratio_for_depth``), the same compute;
3. ``ponder`` and ``loop``: PonderLM and LoopTransformer at full depth (4 passes).

::

    python recipes/iso_flops.py --steps 300 --out runs/iso_flops

Prints and writes (``<out>/iso_flops.md``, ``<out>/iso_flops.json``) a table: mean depth,
compute relative to 4-pass PonderLM, "x one-pass" (layers), and validation perplexity.
Each variant's run folder is ``<out>/<variant>/``; ``--resume`` skips finished variants.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import zoo
from zoo.analysis import EvalReport, evaluate
from zoo.data import ByteTokenizer, load_corpus
from zoo.halting.fixed_prune import ratio_for_depth
from zoo.train import TrainConfig, seed_everything, train, write_run_info


@dataclass(frozen=True)
class IsoSettings:
    """The shared training settings (the pretrain.py tiny setting).

    Attributes:
        size: the preset size every variant is built at.
        steps: optimizer steps per variant.
        batch_size: sequences per step.
        seq_len: context length.
        lr: peak learning rate.
        weight_decay: AdamW weight decay on matrices.
        warmup: share of steps warming up the learning rate.
        stage1: AdaPonder: share of steps on cross-entropy alone.
        ramp: AdaPonder: share of steps over which the bottom-k fraction rises to k_max.
        eval_windows: validation windows (None: the whole validation split).
    """

    size: str = "tiny"
    steps: int = 300
    batch_size: int = 16
    seq_len: int = 128
    lr: float = 3e-3
    weight_decay: float = 0.1
    warmup: float = 0.02
    stage1: float = 0.3
    ramp: float = 0.3
    eval_windows: int | None = None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line; ``--help`` lists every option."""
    d = IsoSettings()
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--out", required=True, help="folder of the variants' runs and the table")
    p.add_argument("--steps", type=int, default=d.steps, help="optimizer steps per variant")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=d.seq_len, help="context length")
    p.add_argument(
        "--seed", type=int, default=0, help="seeds initialisation and data (the same for every variant)"
    )
    p.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="FIELD=JSON",
        help="a ModelConfig override for every variant, e.g. dim=128",
    )
    p.add_argument(
        "--target-depth",
        type=float,
        default=None,
        help="match fixed pruning to this mean depth instead of AdaPonder's",
    )
    p.add_argument(
        "--eval-windows", type=int, default=d.eval_windows, help="validation windows (default: all)"
    )
    p.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (one is fastest for models this small)"
    )
    p.add_argument("--resume", action="store_true", help="reuse the variants already finished in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    return p.parse_args(argv)


# Build ---------------------------------------------------------------------------------------


def variant_config(name: str, args: argparse.Namespace, depth: float | None) -> zoo.ModelConfig:
    """The config of one variant; fixed pruning gets the ratio whose expected mean depth is ``depth``."""
    s = IsoSettings()
    overrides = {k: json.loads(v) for k, _, v in (item.partition("=") for item in args.override)}
    if name == "adaponder":
        stages = {"warmup_steps": int(s.stage1 * args.steps), "ramp_steps": int(s.ramp * args.steps)}
        return zoo.preset(f"adaponder-pythia-{s.size}", halting_kwargs=stages, **overrides)
    if name.startswith("fixed_"):
        schedule = name.removeprefix("fixed_")
        ratio = ratio_for_depth(depth, 4, schedule)
        return zoo.preset(
            f"adaponder-pythia-{s.size}",
            halting="fixed_prune",
            halting_kwargs={"ratio": ratio, "schedule": schedule},
            **overrides,
        )
    return zoo.preset(f"{name}-pythia-{s.size}", **overrides)


# Train / evaluate ----------------------------------------------------------------------------


def run_variant(name: str, args: argparse.Namespace, depth: float | None, data, val) -> EvalReport:
    """Trains one variant into ``<out>/<name>`` and evaluates it on the validation split."""
    s = IsoSettings()
    folder = Path(args.out) / name
    if args.resume and (folder / "eval.json").is_file():
        print(f"{name}: finished earlier, reusing {folder / 'eval.json'}")
        return EvalReport(
            **{
                k: v
                for k, v in json.loads((folder / "eval.json").read_text()).items()
                if k != "compute_saved"
            }
        )
    config = variant_config(name, args, depth)
    seed_everything(args.seed)
    model = zoo.build_model(config)
    cfg = TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=s.lr,
        weight_decay=s.weight_decay,
        warmup_steps=max(1, round(s.warmup * args.steps)),
        seed=args.seed,
        progress=not args.no_progress,
    )
    write_run_info(
        folder,
        recipe="iso_flops",
        variant=name,
        tokenizer="byte",
        train=cfg.to_dict(),
        model_config=config.to_dict(),
    )
    print(f"{name}: halting {config.halting} {config.halting_kwargs}, recurrence {config.recurrence}")
    train(model, data, cfg, folder, resume=args.resume and (folder / "checkpoints").is_dir())
    report = evaluate(model, val, args.seq_len, max_windows=args.eval_windows)
    (folder / "eval.json").write_text(json.dumps(report.to_dict(), indent=2))
    return report


def table(reports: dict[str, EvalReport]) -> str:
    """The markdown table of the variants."""
    lines = [
        "| variant | mean depth | compute vs PonderLM | x one-pass (layers) | val perplexity |",
        "|---|---|---|---|---|",
    ]
    for name, r in reports.items():
        lines.append(
            f"| {name} | {r.mean_depth:.3f} | {100 * r.compute_vs_full:.1f}% | "
            f"{r.compute_vs_single:.2f}x | {r.perplexity:.3f} |"
        )
    return "\n".join(lines)


# Main ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Trains and compares every variant; returns the exit status."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    data, val = load_corpus("embedded", ByteTokenizer())
    reports = {"adaponder": run_variant("adaponder", args, None, data, val)}
    depth = args.target_depth or reports["adaponder"].mean_depth
    print(f"matching fixed pruning to mean depth {depth:.3f}")
    for name in ("fixed_uniform", "fixed_geometric", "ponder", "loop"):
        reports[name] = run_variant(name, args, depth, data, val)
    text = table(reports)
    print(text)
    (Path(args.out) / "iso_flops.md").write_text(text + "\n")
    (Path(args.out) / "iso_flops.json").write_text(
        json.dumps(
            {
                "settings": asdict(IsoSettings()),
                "args": vars(args),
                "target_depth": depth,
                "results": {k: v.to_dict() for k, v in reports.items()},
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
