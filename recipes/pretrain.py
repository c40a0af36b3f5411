"""Pretraining from scratch: AdaPonderLM, PonderLM, Loop or plain Pythia, one or many processes.

On a CPU, the tiny setting on the embedded corpus (a minute or two)::

    python recipes/pretrain.py --model adaponder-pythia-tiny --steps 200 --out runs/pretrain-tiny

On GPUs, a Pythia size with the PonderLM hyperparameters (the global batch of 1024 x 2048
tokens is the same for any number of processes; FSDP2 is used from 1B parameters up)::

    torchrun --nproc_per_node 8 recipes/pretrain.py --model adaponder-pythia-70m --steps 12500 \\
        --data /data/pile_train.bin --val-data /data/pile_val.bin --tokenizer pythia/tokenizer.json \\
        --out runs/adaponder-70m

Stop and continue exactly: ``--stop-after K`` stops after step K (with a checkpoint),
``--resume`` continues from the latest checkpoint of ``--out``; SIGTERM also checkpoints.
A resume must repeat the run's settings; ``--allow-change lr,grad_clip`` names those that
may differ (e.g. a lower ``--lr`` after the loss diverged). One run per ``--out`` at a time.

Prints a progress bar (loss, learning rate, mean depth, tokens/s), then the validation
perplexity, mean depth, halting per pass and compute of the final model. Writes
``<out>/metrics.jsonl`` (one JSON object per step), ``<out>/checkpoints/step-N/``,
``<out>/run.json`` (the settings) and ``<out>/eval.json`` (the final evaluation).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

import zoo
from zoo.analysis import evaluate, format_report
from zoo.checkpoint import atomic_write
from zoo.config import parse_overrides
from zoo.data import load_corpus, resolve_tokenizer
from zoo.train import NonFiniteLossError, TrainConfig, init_distributed, load_trained, seed_everything, train
from zoo.registry import add_plugin_option, import_plugins


@dataclass(frozen=True)
class Setting:
    """Hyperparameters of one model size (PonderLM's recipes, see docs/recipes/pretrain.md).

    Attributes:
        lr: peak learning rate.
        weight_decay: AdamW weight decay on matrices.
        seq_len: context length.
        batch_size: sequences per optimizer step (1024 x 2048 = about 2.1M tokens).
        micro_batch_size: sequences per forward on one process (accumulation makes up the rest).
        warmup: share of the steps spent warming up the learning rate.
        stage1: AdaPonder only: share of the steps trained on cross-entropy alone.
        ramp: AdaPonder only: share of the steps over which the bottom-k fraction rises to k_max.
    """

    lr: float
    weight_decay: float
    seq_len: int = 2048
    batch_size: int = 1024
    micro_batch_size: int = 8
    warmup: float = 0.01
    stage1: float = 0.1
    ramp: float = 0.1


SETTINGS = {
    "tiny": Setting(
        lr=3e-3,
        weight_decay=0.1,
        seq_len=128,
        batch_size=16,
        micro_batch_size=16,
        warmup=0.02,
        stage1=0.3,
        ramp=0.3,
    ),
    "70m": Setting(lr=1e-3, weight_decay=0.01, micro_batch_size=16),
    "160m": Setting(lr=6e-4, weight_decay=0.01, micro_batch_size=8),
    "410m": Setting(lr=3e-4, weight_decay=0.1, micro_batch_size=4),
    "1b": Setting(lr=2.5e-4, weight_decay=0.01, micro_batch_size=2),
    "1.4b": Setting(lr=2e-4, weight_decay=0.01, micro_batch_size=2),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line; ``--help`` lists every option."""
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="adaponder-pythia-tiny", help="a preset; its size picks the setting")
    p.add_argument("--steps", type=int, required=True, help="optimizer steps (the schedule's length)")
    p.add_argument("--out", required=True, help="run folder (metrics, checkpoints, run.json, eval.json)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--stop-after", type=int, default=None, help="stop (with a checkpoint) after this step")
    p.add_argument("--seed", type=int, default=0, help="seeds the initialisation and the data order")
    p.add_argument("--data", default="embedded", help="'embedded', a pre-tokenized .bin, or text/jsonl files")
    p.add_argument("--val-data", default=None, help="validation source; default: held out from --data")
    p.add_argument(
        "--tokenizer",
        default=None,
        help="'byte' or a tokenizer.json path; default 'byte' for text data, required for a .bin",
    )
    p.add_argument("--bin-dtype", default=None, help=".bin token dtype (default: from the .idx, else uint16)")
    p.add_argument("--seq-len", type=int, default=None, help="override the setting's context length")
    p.add_argument("--batch-size", type=int, default=None, help="override the setting's sequences per step")
    p.add_argument("--micro-batch-size", type=int, default=None, help="override sequences per forward")
    p.add_argument("--lr", type=float, default=None, help="override the setting's peak learning rate")
    p.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="a ModelConfig field, plain or JSON: dim=128, halting=act, "
        "'halting_kwargs={\"threshold\": 0.01}'",
    )
    p.add_argument(
        "--allow-change",
        default="",
        metavar="KEYS",
        help="with --resume: comma-separated settings that may differ from the run's, e.g. lr,grad_clip",
    )
    p.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints (0: at end)")
    p.add_argument("--eval-every", type=int, default=0, help="steps between logged val losses (0: never)")
    p.add_argument("--eval-windows", type=int, default=64, help="validation windows for the final evaluation")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to train")
    p.add_argument("--compile", action="store_true", help="compile the dense forward (zoo.compile)")
    p.add_argument(
        "--fsdp",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="FSDP2 instead of DDP (default: on CUDA from 1B parameters)",
    )
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_plugin_option(p)
    return p.parse_args(argv)


# Build -------------------------------------------------------------------------------------


def size_of(name: str) -> str:
    """The setting name of preset ``name`` (its size suffix); ``ValueError`` if there is none."""
    size = name.rsplit("-", 1)[-1]
    if name not in zoo.available("model") or size not in SETTINGS:
        raise ValueError(
            f"--model {name!r}: pretrain.py has settings for sizes {', '.join(SETTINGS)}; choose a preset "
            f"ending in one of them (e.g. adaponder-pythia-70m)"
        )
    return size


def model_config(args: argparse.Namespace, setting: Setting) -> zoo.ModelConfig:
    """The preset with ``--override`` applied and, for AdaPonder, the two-stage gate schedule."""
    config = zoo.preset(args.model, **parse_overrides(args.override))
    if config.halting == "mlp_gate":
        # The AdaPonder two-stage schedule: cross-entropy alone, then the bottom-k loss ramped in.
        stages = {
            "warmup_steps": int(setting.stage1 * args.steps),
            "ramp_steps": int(setting.ramp * args.steps),
        }
        config = config.replace(halting_kwargs={**stages, **config.halting_kwargs})
    return config


# Train ---------------------------------------------------------------------------------------


def train_config(args: argparse.Namespace, setting: Setting) -> TrainConfig:
    """The trainer's settings: the size's setting with the command line's overrides."""
    return TrainConfig(
        steps=args.steps,
        batch_size=args.batch_size or setting.batch_size,
        micro_batch_size=args.micro_batch_size
        or min(setting.micro_batch_size, args.batch_size or setting.batch_size),
        seq_len=args.seq_len or setting.seq_len,
        lr=args.lr or setting.lr,
        min_lr_ratio=0.1,
        warmup_steps=max(1, round(setting.warmup * args.steps)),
        weight_decay=setting.weight_decay,
        betas=(0.9, 0.95),
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        stop_after=args.stop_after,
        eval_every=args.eval_every,
        compile=args.compile,
        fsdp=args.fsdp,
        progress=not args.no_progress,
    )


# Evaluate ------------------------------------------------------------------------------------


def final_evaluation(args: argparse.Namespace, cfg: TrainConfig, val, device) -> dict:
    """Evaluates the final checkpoint on the validation stream; prints and writes ``eval.json``."""
    model, _ = load_trained(args.out, device=device)
    report = evaluate(model, val, cfg.seq_len, max_windows=args.eval_windows)
    print(format_report(args.model, report))
    with atomic_write(Path(args.out) / "eval.json") as tmp:
        tmp.write_text(json.dumps(report.to_dict(), indent=2))
    return report.to_dict()


def training_tokenizer(args: argparse.Namespace, vocab_size: int):
    """``--tokenizer``; for text data ``byte`` by default, for pre-tokenized ``.bin`` data required
    (its ids come from some tokenizer the run must record, or evaluation would guess)."""
    spec = args.tokenizer
    if spec is None:
        if any(str(d).endswith(".bin") for d in (args.data, args.val_data) if d):
            raise ValueError(
                "--data is pre-tokenized (.bin): pass --tokenizer with the tokenizer.json that made "
                "it (or --tokenizer byte if its ids are UTF-8 bytes), so the run records how to read it"
            )
        spec = "byte"
    return resolve_tokenizer(spec, None, vocab_size, args.model)


# Main ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Trains (one process or one of many); returns the exit status."""
    args = parse_args(argv)
    import_plugins(args.plugin)  # parts defined outside the library register now
    setting = SETTINGS[size_of(args.model)]
    if args.threads:
        torch.set_num_threads(args.threads)
    ctx = init_distributed(args.device)
    try:
        config = model_config(args, setting)
        tokenizer = training_tokenizer(args, config.vocab_size)
        train_data, val_data = load_corpus(args.data, tokenizer, val_data=args.val_data, dtype=args.bin_dtype)
        cfg = train_config(args, setting)
        seed_everything(args.seed)
        model = zoo.build_model(config)
        info = dict(
            recipe="pretrain",
            model=args.model,
            tokenizer=tokenizer.name,
            data=args.data,
            setting=dataclasses.asdict(setting),
            train=cfg.to_dict(),
            model_config=model.config.to_dict(),
            world_size=ctx.world_size,
        )
        if ctx.is_main:
            print(
                f"{args.model}: {model.num_parameters():,} parameters, {len(train_data):,} training tokens, "
                f"{cfg.batch_size * cfg.seq_len:,} tokens per step, {ctx.world_size} process(es)"
            )
        try:
            result = train(
                model,
                train_data,
                cfg,
                args.out,
                resume=args.resume,
                allow_change=[key for key in args.allow_change.split(",") if key],
                val_data=val_data,
                tokenizer=tokenizer.name,
                run_info=info,
                ctx=ctx,
            )
        except NonFiniteLossError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        if result.stopped == "sigterm":
            return 143
        if ctx.is_main and result.stopped is None:
            final_evaluation(args, cfg, val_data, ctx.device)
        return 0
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
