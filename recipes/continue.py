"""Continued pretraining: an AdaPonder model from a local Pythia (or PonderLM) checkpoint folder.

AdaPonderLM's continued-pretraining recipe in two stages (REFERENCES.md):

1. the gates alone, backbone frozen (``--gate-steps``), while the bottom-k loss ramps in;
2. every parameter (``--steps``), the bottom-k loss at full strength.

The start is ``zoo.from_hf(folder, recurrence="ponder", passes=4, halting="mlp_gate",
cache="kv_reuse")``: the Pythia weights with fresh, open gates. On a CPU, with a small
Hugging Face folder::

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

import torch.distributed as dist

import zoo
from zoo.analysis import evaluate, format_report
from zoo.checkpoint import atomic_write
from zoo.config import parse_overrides
from zoo.data import load_corpus, resolve_tokenizer
from zoo.train import (
    NonFiniteLossError,
    TrainConfig,
    init_distributed,
    latest_checkpoint,
    load_trained,
    seed_everything,
    train,
)
from zoo.registry import add_plugin_option, import_plugins


@dataclass(frozen=True)
class Setting:
    """Continued-pretraining hyperparameters (library choices where the paper is silent).

    Attributes:
        gate_lr: peak learning rate of stage 1 (fresh gates, small MLPs).
        lr: peak learning rate of stage 2 (converged weights: a tenth of Pythia's 2e-4 for 1.4B).
        weight_decay: AdamW weight decay on matrices (Pythia: 0.1, REFERENCES.md).
        seq_len: context length.
        batch_size: sequences per optimizer step.
        micro_batch_size: sequences per forward on one process.
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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line; ``--help`` lists every option."""
    d = Setting()
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--hf", required=True, help="a local Hugging Face GPT-NeoX folder (config.json + *.safetensors)"
    )
    p.add_argument("--out", required=True, help="run folder: stage1/, stage2/, run.json, eval.json")
    p.add_argument(
        "--gate-steps", type=int, required=True, help="stage 1 steps: gates alone, backbone frozen"
    )
    p.add_argument("--steps", type=int, required=True, help="stage 2 steps: every parameter")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--seed", type=int, default=0, help="seeds the gates' initialisation and the data order")
    p.add_argument("--data", default="embedded", help="'embedded', a pre-tokenized .bin, or text/jsonl files")
    p.add_argument("--val-data", default=None, help="validation source; default: held out from --data")
    p.add_argument(
        "--tokenizer",
        default=None,
        help="'byte' or a tokenizer.json; default: the folder's tokenizer.json (required without one)",
    )
    p.add_argument(
        "--bin-dtype", default=None, help="token dtype of .bin files; default from the .idx or uint16"
    )
    p.add_argument("--passes", type=int, default=d.passes, help="backbone passes P")
    p.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="a ModelConfig override, plain or JSON, e.g. embed_scale=45.25 for a PonderLM start",
    )
    p.add_argument(
        "--allow-change",
        default="",
        metavar="KEYS",
        help="with --resume: comma-separated settings that may differ from the run's, e.g. lr,grad_clip",
    )
    p.add_argument("--gate-lr", type=float, default=d.gate_lr, help="stage 1 peak learning rate")
    p.add_argument("--lr", type=float, default=d.lr, help="stage 2 peak learning rate")
    p.add_argument("--seq-len", type=int, default=d.seq_len, help="context length")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences per step")
    p.add_argument("--micro-batch-size", type=int, default=d.micro_batch_size, help="sequences per forward")
    p.add_argument(
        "--checkpoint-every", type=int, default=100, help="steps between checkpoints (0: at the end)"
    )
    p.add_argument("--eval-windows", type=int, default=64, help="validation windows for the final evaluation")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to train")
    p.add_argument("--compile", action="store_true", help="compile the dense forward (zoo.compile)")
    p.add_argument(
        "--fsdp",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="FSDP2 instead of DDP (default: on CUDA from 1B parameters)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_plugin_option(p)
    return p.parse_args(argv)


# Build ---------------------------------------------------------------------------------------


def start_model(args: argparse.Namespace) -> zoo.RecurrentLM:
    """The Pythia weights as a 4-pass AdaPonder model with fresh, open gates."""
    overrides = parse_overrides(args.override)
    ramp = max(1, round(Setting.ramp * args.gate_steps))
    seed_everything(args.seed)  # the gates are the only fresh parameters
    return zoo.from_hf(
        args.hf,
        recurrence="ponder",
        passes=args.passes,
        halting="mlp_gate",
        cache="kv_reuse",
        halting_kwargs={"warmup_steps": 0, "ramp_steps": ramp},
        **overrides,
    )


def stage_config(args: argparse.Namespace, stage: int) -> TrainConfig:
    """The training settings of stage 1 (gates alone) or stage 2 (everything)."""
    steps = args.gate_steps if stage == 1 else args.steps
    return TrainConfig(
        steps=steps,
        batch_size=args.batch_size,
        micro_batch_size=min(args.micro_batch_size, args.batch_size),
        seq_len=args.seq_len,
        lr=args.gate_lr if stage == 1 else args.lr,
        warmup_steps=max(1, round(Setting.warmup * steps)),
        weight_decay=Setting.weight_decay,
        seed=args.seed + stage,
        checkpoint_every=args.checkpoint_every,
        train_only=("halting.",) if stage == 1 else (),
        step_offset=0 if stage == 1 else args.gate_steps,  # the gates' schedule runs on across stages
        compile=args.compile,
        fsdp=args.fsdp,
        progress=not args.no_progress,
    )


# Train ---------------------------------------------------------------------------------------


def run_stage(args, stage: int, model, data, val, tokenizer, info: dict, ctx) -> str | None:
    """Trains one stage into ``<out>/stage<k>``; returns how it stopped (``None``: finished)."""
    folder = Path(args.out) / f"stage{stage}"
    cfg = stage_config(args, stage)
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
        allow_change=[key for key in args.allow_change.split(",") if key],
        val_data=val,
        tokenizer=tokenizer.name,
        run_info={**info, "stage": stage, "train": cfg.to_dict()},
        ctx=ctx,
    ).stopped


# Main ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Runs both stages and evaluates; returns the exit status."""
    args = parse_args(argv)
    import_plugins(args.plugin)  # parts defined outside the library register now
    ctx = init_distributed(args.device)
    try:
        model = start_model(args)
        beside = Path(args.hf) / "tokenizer.json"
        named = str(beside) if beside.is_file() else None
        tokenizer = resolve_tokenizer(args.tokenizer, named, model.config.vocab_size, args.hf)
        data, val = load_corpus(args.data, tokenizer, val_data=args.val_data, dtype=args.bin_dtype)
        info = dict(
            recipe="continue",
            hf=args.hf,
            tokenizer=tokenizer.name,
            data=args.data,
            setting=asdict(Setting()),
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
                if run_stage(args, stage, model, data, val, tokenizer, info, ctx) == "sigterm":
                    return 143
        except NonFiniteLossError as err:
            print(f"error: {err}", file=sys.stderr)
            return 1
        if ctx.is_main:
            final, _ = load_trained(Path(args.out) / "stage2", device=ctx.device)
            report = evaluate(final, val, args.seq_len, max_windows=args.eval_windows)
            print(format_report("continued", report))
            with atomic_write(Path(args.out) / "eval.json") as tmp:
                tmp.write_text(json.dumps(report.to_dict(), indent=2))
        return 0
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
