"""Continued pretraining: an AdaPonder model from a local Pythia (or PonderLM) checkpoint folder.

AdaPonderLM's continued-pretraining recipe in two stages (:func:`zoo.train.two_stage`):

1. the gates alone, backbone frozen (``--gate-steps``), while the bottom-k loss ramps in;
2. every parameter (``--steps``), the bottom-k loss at full strength.

The start is ``zoo.from_hf(folder, recurrence="ponder", passes=4, halting="mlp_gate",
cache="kv_reuse")``: the Pythia weights with fresh, open gates. On a CPU, with a small
Hugging Face folder::

    ponder-zoo continue --hf checkpoints/pythia-14m --gate-steps 50 --steps 100 --out runs/continue-14m
    python recipes/continue.py --hf checkpoints/pythia-14m --gate-steps 50 --steps 100 --out runs/continue-14m

Prints each stage's progress bar and, at the end, the validation perplexity, mean depth and
compute of the result. Writes ``<out>/stage1/`` and ``<out>/stage2/`` (run folders as
``pretrain.py`` writes them: metrics.jsonl, checkpoints/, run.json) and ``<out>/eval.json``.
``--resume`` continues whichever stage was interrupted (``--allow-change KEYS`` names the
settings that may differ from the interrupted run's). The tokenizer is ``--tokenizer`` or
the folder's ``tokenizer.json``; without either the run is refused.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import zoo
from zoo.checkpoint import latest_checkpoint, load_trained
from zoo.data import load_corpus, resolve_tokenizer
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
    two_stage,
)


@dataclass(frozen=True)
class Setting:
    """Continued-pretraining hyperparameters (library choices where the paper is silent).

    Attributes:
        gate_lr: peak learning rate of stage 1 (fresh gates, small MLPs).
        lr: peak learning rate of stage 2 (converged weights: a tenth of Pythia's 2e-4 for 1.4B).
        weight_decay: AdamW weight decay on matrices (Pythia: 0.1).
        seq_len: context length.
        batch_size: sequences per optimizer step.
        micro_batch_size: at most this many sequences per forward on one process (the
            largest that divides each process's share of batch_size).
        warmup: share of each stage's steps warming up the learning rate (Pythia: 1%).
        ramp: share of stage 1 over which the bottom-k fraction rises from 0 to k_max.
        passes: backbone passes P (the papers: 4).
    """

    gate_lr: float = 1e-3
    lr: float = 2e-5
    weight_decay: float = 0.1
    seq_len: int = 2048
    batch_size: int = 1024
    micro_batch_size: int = 4
    warmup: float = 0.01
    ramp: float = 0.5
    passes: int = 4


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The options of ``ponder-zoo continue`` and ``recipes/continue.py``, with their defaults."""
    p = parser or argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument(
        "--hf", required=True, help="a local Hugging Face GPT-NeoX folder (config.json + *.safetensors)"
    )
    p.add_argument("--out", required=True, help="run folder: stage1/, stage2/, run.json, eval.json")
    p.add_argument(
        "--gate-steps", type=int, required=True, help="stage 1 steps: gates alone, backbone frozen"
    )
    p.add_argument("--steps", type=int, required=True, help="stage 2 steps: every parameter")
    add_resume_options(p, "whichever stage of --out was interrupted")
    p.add_argument("--seed", type=int, default=0, help="seeds the gates' initialisation and the data order")
    add_data_options(p, "the folder's tokenizer.json (required without one)")
    add_settings(p.add_argument_group("hyperparameters"), Setting())
    add_override_option(p, "embed_scale=45.25 for a PonderLM start")
    p.add_argument(
        "--checkpoint-every", type=int, default=100, help="steps between checkpoints (0: at the end)"
    )
    p.add_argument("--eval-windows", type=int, default=64, help="validation windows for the final evaluation")
    add_trainer_options(p)
    add_plugin_option(p)
    return p


# Build ---------------------------------------------------------------------------------------


def start_model(args: argparse.Namespace, setting: Setting) -> zoo.RecurrentLM:
    """The Pythia weights as an AdaPonder model with fresh, open gates."""
    overrides = overrides_from(args)
    # The bottom-k loss starts at once (no cross-entropy-only stage: the backbone is trained)
    # and ramps in over the first `ramp` share of stage 1.
    stages = gate_schedule(args.gate_steps, 0.0, setting.ramp)
    stages["ramp_steps"] = max(1, stages["ramp_steps"])
    seed_everything(args.seed)  # the gates are the only fresh parameters
    return zoo.from_hf(
        args.hf,
        recurrence="ponder",
        passes=setting.passes,
        halting="mlp_gate",
        cache="kv_reuse",
        halting_kwargs=stages,
        **overrides,
    )


def stage_config(args: argparse.Namespace, setting: Setting, stage: int, world_size: int) -> TrainConfig:
    """The training settings of stage 1 (gates alone) or stage 2 (everything)."""
    steps = args.gate_steps if stage == 1 else args.steps
    return TrainConfig(
        steps=steps,
        batch_size=setting.batch_size,
        micro_batch_size=per_process_micro_batch(
            setting.batch_size, world_size, None, limit=setting.micro_batch_size
        ),
        seq_len=setting.seq_len,
        lr=setting.gate_lr if stage == 1 else setting.lr,
        warmup_steps=max(1, round(setting.warmup * steps)),
        weight_decay=setting.weight_decay,
        seed=args.seed + stage,
        checkpoint_every=args.checkpoint_every,
        **two_stage(stage, args.gate_steps),
        **trainer_options(args),
    )


# Train ---------------------------------------------------------------------------------------


def run_stage(args, setting: Setting, stage: int, model, data, val, tokenizer, info: dict, ctx) -> str | None:
    """Trains one stage into ``<out>/stage<k>``; returns how it stopped (``None``: finished)."""
    folder = Path(args.out) / f"stage{stage}"
    cfg = stage_config(args, setting, stage, ctx.world_size)
    done = latest_checkpoint(folder)
    if (
        args.resume
        and done is not None
        and json.loads((done / "trainer.json").read_text())["step"] >= cfg.steps
    ):
        return None  # finished before a later stage was interrupted
    if ctx.is_main:
        what = "gates alone, backbone frozen" if stage == 1 else "every parameter"
        print(f"stage {stage}: {cfg.steps} steps, {what}, peak lr {cfg.lr:g}")
    return train(
        model,
        data,
        cfg,
        folder,
        resume=args.resume and done is not None,
        allow_change=allowed_changes(args),
        val_data=val,
        tokenizer=tokenizer.name,
        run_info={**info, "stage": stage, "train": cfg.to_dict()},
        ctx=ctx,
    ).stopped


# Main ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Runs both stages and evaluates; returns the exit status."""
    return run(build_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Runs both stages with parsed options and evaluates; returns the exit status."""
    import_plugins(args.plugin)  # parts defined outside the library register now
    setting = settings_from(args, Setting())
    with training_processes(args.device) as ctx:
        model = start_model(args, setting)
        beside = Path(args.hf) / "tokenizer.json"
        named = str(beside) if beside.is_file() else None
        tokenizer = resolve_tokenizer(args.tokenizer, named, model.config.vocab_size, args.hf)
        data, val = load_corpus(args.data, tokenizer, val_data=args.val_data, dtype=args.bin_dtype)
        info = dict(
            recipe="continue",
            hf=args.hf,
            tokenizer=tokenizer.name,
            data=args.data,
            setting=asdict(setting),
            model_config=model.config.to_dict(),
        )
        if ctx.is_main:
            print(
                f"from {args.hf}: {model.num_parameters():,} parameters "
                f"({sum(p.numel() for p in model.halting.parameters()):,} in the fresh gates)"
            )
        try:
            for stage in (1, 2):
                if stage == 2:
                    model, _ = load_trained(Path(args.out) / "stage1")  # stage 1's final weights
                if run_stage(args, setting, stage, model, data, val, tokenizer, info, ctx) == "sigterm":
                    return 143
        except NonFiniteLossError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        if ctx.is_main:
            out = Path(args.out)
            final = out / "stage2"
            final_evaluation(final, val, setting.seq_len, args.eval_windows, "continued", out / "eval.json")
        return 0


if __name__ == "__main__":
    sys.exit(main())
