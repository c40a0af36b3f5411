"""Conversion: a zoo checkpoint to a Hugging Face folder, or a Hugging Face folder to a zoo checkpoint.

::

    ponder-zoo convert runs/demo/adaponder hf/adaponder-tiny        # to transformers (remote code)
    ponder-zoo convert hf/pythia-14m zoo/pythia-14m                 # to a zoo.save folder
    ponder-zoo convert hf/pythia-14m zoo/ponder-14m --override recurrence=ponder --override passes=4

The direction follows from the source: a run folder, a trainer checkpoint or a
:func:`zoo.save` folder is written with :func:`zoo.to_hf` (a one-pass Pythia or Llama model
as plain transformers weights, anything else with remote code for
``AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)``); a Hugging Face folder
or Hub id is read with :func:`zoo.from_hf` (``--override`` fields applied, e.g. a recurrence
on top) and written with :func:`zoo.save`. ``--to`` names the direction explicitly. A
``tokenizer.json`` the source names is copied beside the weights. Prints what it wrote.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from zoo.checkpoint import is_hf_checkpoint, load_trained, save
from zoo.interop import from_hf, to_hf
from zoo.recipes.common import HelpFormatter, add_override_option, add_plugin_option, overrides_from
from zoo.registry import import_plugins


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The command line (``ponder-zoo convert``); ``--help`` lists every option."""
    p = parser or argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("source", help="a run folder, checkpoint, zoo.save folder, Hugging Face folder or Hub id")
    p.add_argument("out", help="the folder to write (refused if it holds files the writer does not own)")
    p.add_argument(
        "--to",
        default="auto",
        choices=["auto", "hf", "zoo"],
        help="hf: write a Hugging Face folder; zoo: a zoo.save folder; auto: the other kind than the source",
    )
    p.add_argument("--revision", default=None, help="for a Hub id: the branch, tag or commit")
    add_override_option(p, "recurrence=ponder, passes=4 (Hugging Face source only)")
    p.add_argument(
        "--remote-code",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="to hf: force (or refuse) remote code; default: only where transformers lacks the model",
    )
    add_plugin_option(p)
    return p


def direction(args: argparse.Namespace) -> str:
    """``"hf"`` or ``"zoo"``: the kind of folder to write."""
    if args.to != "auto":
        return args.to
    return "zoo" if is_hf_checkpoint(args.source) or not Path(args.source).exists() else "hf"


def run(args: argparse.Namespace) -> int:
    """Converts with parsed options; returns the exit status."""
    import_plugins(args.plugin)
    overrides = overrides_from(args)
    to = direction(args)
    if to == "hf":
        if overrides or args.revision:
            raise SystemExit("error: --override and --revision apply to a Hugging Face source; pass --to zoo")
        model, tokenizer = load_trained(args.source)
        out = to_hf(model, args.out, remote_code=args.remote_code)
    else:
        if args.remote_code is not None:
            raise SystemExit("error: --remote-code applies to --to hf")
        model = from_hf(args.source, revision=args.revision, **overrides)
        out = save(model, args.out)
        beside = Path(args.source) / "tokenizer.json"
        tokenizer = str(beside) if beside.is_file() else None
    beside_out = Path(out) / "tokenizer.json"
    if tokenizer and Path(tokenizer).is_file() and Path(tokenizer).resolve() != beside_out.resolve():
        shutil.copyfile(tokenizer, beside_out)
    cfg = model.config
    kind = "Hugging Face" if to == "hf" else "zoo.save"
    print(
        f"wrote {out} ({kind} folder): {cfg.block} x {cfg.num_layers} layers, {cfg.recurrence} x "
        f"{cfg.passes} passes, halting {cfg.halting}, {model.num_parameters():,} parameters"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Converts; returns the exit status."""
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
