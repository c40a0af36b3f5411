"""Pretraining from scratch: AdaPonderLM, PonderLM, Loop or plain Pythia, one or many processes.

On a CPU, the tiny setting on the embedded corpus (a minute or two)::

    ponder-zoo train --model adaponder-pythia-tiny --steps 200 --out runs/pretrain-tiny
    python recipes/pretrain.py --model adaponder-pythia-tiny --steps 200 --out runs/pretrain-tiny

On GPUs, a Pythia size with the PonderLM hyperparameters (the global batch of 1024 x 2048
tokens is the same for any number of processes, each process's micro-batch follows from
it; FSDP2 is used from 1B parameters up)::

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
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

import zoo
from zoo.data import load_corpus, resolve_tokenizer
from zoo.iso_flops import IsoSettings
from zoo.recipes.common import (
    HelpFormatter,
    add_data_options,
    add_override_option,
    add_plugin_option,
    add_resume_options,
    add_settings,
    add_trainer_options,
    allowed_changes,
    final_evaluation,
    overrides_from,
    settings_from,
    trainer_options,
    training_processes,
)
from zoo.registry import import_plugins
from zoo.train import (
    NonFiniteLossError,
    TrainConfig,
    gate_schedule,
    per_process_micro_batch,
    seed_everything,
    train,
)


@dataclass(frozen=True)
class Setting:
    """Hyperparameters of one model size (PonderLM's recipes, see docs/recipes/pretrain.md).

    Attributes:
        lr: peak learning rate.
        weight_decay: AdamW weight decay on matrices.
        seq_len: context length.
        batch_size: sequences per optimizer step (1024 x 2048 = about 2.1M tokens).
        micro_batch_size: at most this many sequences per forward on one process: the
            micro-batch is the largest that divides each process's share of batch_size
            (accumulation makes up the rest); --micro-batch-size gives it exactly.
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


_TINY = IsoSettings()  # the tiny shape's schedule is the iso-FLOPs experiment's, kept in one place

SETTINGS = {
    "tiny": Setting(
        lr=3e-3,
        weight_decay=_TINY.weight_decay,
        seq_len=_TINY.seq_len,
        batch_size=16,
        micro_batch_size=16,
        warmup=_TINY.warmup,
        stage1=_TINY.stage1,
        ramp=_TINY.ramp,
    ),
    "70m": Setting(lr=1e-3, weight_decay=0.01, micro_batch_size=16),
    "160m": Setting(lr=6e-4, weight_decay=0.01, micro_batch_size=8),
    "410m": Setting(lr=3e-4, weight_decay=0.1, micro_batch_size=4),
    "1b": Setting(lr=2.5e-4, weight_decay=0.01, micro_batch_size=2),
    "1.4b": Setting(lr=2e-4, weight_decay=0.01, micro_batch_size=2),
}


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The options of ``ponder-zoo train`` and ``recipes/pretrain.py``, with their defaults."""
    p = parser or argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--model", default="adaponder-pythia-tiny", help="a preset; its size picks the setting")
    p.add_argument("--steps", type=int, required=True, help="optimizer steps (the schedule's length)")
    p.add_argument("--out", required=True, help="run folder (metrics, checkpoints, run.json, eval.json)")
    add_resume_options(p)
    p.add_argument("--stop-after", type=int, default=None, help="stop (with a checkpoint) after this step")
    p.add_argument("--seed", type=int, default=0, help="seeds the initialisation and the data order")
    add_data_options(p, "'byte' for text data, required for a .bin")
    add_settings(p.add_argument_group("hyperparameters"), Setting, unset="the model size's setting")
    add_override_option(p)
    p.add_argument("--checkpoint-every", type=int, default=100, help="steps between checkpoints (0: at end)")
    p.add_argument("--eval-every", type=int, default=0, help="steps between logged val losses (0: never)")
    p.add_argument("--eval-windows", type=int, default=64, help="validation windows for the final evaluation")
    add_trainer_options(p)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    add_plugin_option(p)
    return p


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
    config = zoo.preset(args.model, **overrides_from(args))
    if config.halting == "mlp_gate":
        # Cross-entropy alone for the first stage1 share of the steps, then the bottom-k loss ramped in.
        stages = gate_schedule(args.steps, setting.stage1, setting.ramp)
        config = config.replace(halting_kwargs={**stages, **config.halting_kwargs})
    return config


# Train ---------------------------------------------------------------------------------------


def train_config(args: argparse.Namespace, setting: Setting, world_size: int) -> TrainConfig:
    """The trainer's settings: the size's setting with the command line's overrides.

    The micro-batch follows from the batch and the processes unless ``--micro-batch-size``
    gives it: the largest that divides each process's share of the batch, at most the
    setting's (:func:`zoo.train.per_process_micro_batch`).
    """
    return TrainConfig(
        steps=args.steps,
        batch_size=setting.batch_size,
        micro_batch_size=per_process_micro_batch(
            setting.batch_size, world_size, args.micro_batch_size, limit=setting.micro_batch_size
        ),
        seq_len=setting.seq_len,
        lr=setting.lr,
        min_lr_ratio=0.1,
        warmup_steps=max(1, round(setting.warmup * args.steps)),
        weight_decay=setting.weight_decay,
        betas=(0.9, 0.95),
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        stop_after=args.stop_after,
        eval_every=args.eval_every,
        **trainer_options(args),
    )


# Evaluate ------------------------------------------------------------------------------------


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
    return run(build_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Trains with parsed options (one process or one of many); returns the exit status."""
    import_plugins(args.plugin)  # parts defined outside the library register now
    setting = settings_from(args, SETTINGS[size_of(args.model)], unset=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    with training_processes(args.device) as ctx:
        config = model_config(args, setting)
        tokenizer = training_tokenizer(args, config.vocab_size)
        train_data, val_data = load_corpus(args.data, tokenizer, val_data=args.val_data, dtype=args.bin_dtype)
        cfg = train_config(args, setting, ctx.world_size)
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
                allow_change=allowed_changes(args),
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
            out = Path(args.out)
            windows = args.eval_windows
            final_evaluation(out, val_data, cfg.seq_len, windows, args.model, out / "eval.json", ctx.device)
        return 0


if __name__ == "__main__":
    sys.exit(main())
