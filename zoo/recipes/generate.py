"""Text generation with each token's depth shown.

::

    ponder-zoo generate --model runs/demo --prompt "The try statement" --max-new-tokens 200
    python recipes/generate.py --model runs/demo --prompt "The try statement" --max-new-tokens 200
    python recipes/generate.py --model runs/demo --prompt "for" --temperature 0.8 --top-k 40 --seed 0

``--model`` is a training run folder, a checkpoint, a ``zoo.save`` folder or a Hugging Face
folder. Decoding is incremental (one preallocated cache per pass, halted tokens cost
nothing) and reproduces the full forward. Prints the prompt, then the continuation with the
number of passes run for each new token (on a terminal a background colour per depth;
otherwise a digit under each token's first character, or ``--style superscript`` after
it), and the mean depth; ``--json PATH`` also writes the tokens, texts and depths.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass

import torch

from zoo.analysis import format_depth_text
from zoo.checkpoint import load_trained
from zoo.data import resolve_tokenizer
from zoo.recipes.common import HelpFormatter, add_plugin_option, add_settings
from zoo.registry import import_plugins


@dataclass(frozen=True)
class Sampling:
    """Generation defaults.

    Attributes:
        max_new_tokens: tokens to generate.
        temperature: 0 is greedy decoding.
        top_k: sample among the k most likely tokens (None: all).
        top_p: nucleus mass (None: off).
    """

    max_new_tokens: int = 200
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The options of ``ponder-zoo generate`` and ``recipes/generate.py``, with their defaults."""
    p = parser or argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument(
        "--model", required=True, help="run folder, checkpoint, zoo.save folder or Hugging Face folder"
    )
    p.add_argument("--prompt", default="The ", help="the text to continue")
    add_settings(p, Sampling())
    p.add_argument(
        "--seed", type=int, default=None, help="seed of the sampler (reproducible sampling; default: none)"
    )
    p.add_argument("--stop-at-eos", action="store_true", help="stop at the end-of-text token")
    p.add_argument(
        "--tokenizer",
        default=None,
        help="'byte' or a tokenizer.json; default: the one the run or folder names (required otherwise)",
    )
    p.add_argument(
        "--style",
        default=None,
        choices=["aligned", "superscript", "color"],
        help="how depths are shown: a digit under each token, a superscript after it, or a colour "
        "(default: color on a terminal, else aligned)",
    )
    p.add_argument("--json", default=None, help="also write tokens, texts and depths to this JSON file")
    p.add_argument("--device", default="cpu", help="where to run (cpu, cuda)")
    add_plugin_option(p)
    return p


# Build / generate ----------------------------------------------------------------------------


def generate(args: argparse.Namespace) -> dict:
    """Generates after ``--prompt``; returns the new tokens, their texts and depths."""
    model, named = load_trained(args.model, device=args.device)
    tokenizer = resolve_tokenizer(args.tokenizer, named, model.config.vocab_size, args.model)
    ids = tokenizer.encode(args.prompt)
    if not ids:
        raise ValueError("--prompt is empty after tokenization; give at least one character")
    room = model.config.max_seq_len - len(ids)
    if room < 1:
        raise ValueError(
            f"the prompt has {len(ids)} tokens, no room left in max_seq_len={model.config.max_seq_len}"
        )
    gen = model.eval().generate(
        torch.tensor([ids], device=args.device),
        max_new_tokens=min(args.max_new_tokens, room),
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        eos_token_id=tokenizer.eos_token_id if args.stop_at_eos else None,
        seed=args.seed,
    )
    new = gen.tokens[0, len(ids) :].tolist()
    depth = gen.depth[0].tolist()
    if args.stop_at_eos and tokenizer.eos_token_id in new:
        end = new.index(tokenizer.eos_token_id)
        new, depth = new[:end], depth[:end]
    return {
        "prompt": args.prompt,
        "tokens": new,
        "pieces": [tokenizer.decode([t]) for t in new],
        "depth": depth,
        "text": tokenizer.decode(new),
        "passes": model.config.passes,
    }


# Main ----------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Generates and prints; returns the exit status."""
    return run(build_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Generates with parsed options and prints; returns the exit status."""
    import_plugins(args.plugin)  # parts defined outside the library register now
    result = generate(args)
    style = args.style or ("color" if sys.stdout.isatty() else "aligned")
    print(result["prompt"] + "|")
    print(format_depth_text(result["pieces"], result["depth"], style))
    if style == "color":
        legend = " ".join(format_depth_text([f" {d} "], [d], style) for d in range(1, result["passes"] + 1))
    else:
        legend = "the digit under (aligned) or after (superscript) each token"
    mean = sum(result["depth"]) / max(len(result["depth"]), 1)
    print(
        f"\n[depth per new token: {legend}; mean {mean:.2f} of {result['passes']} passes "
        f"over {len(result['depth'])} tokens]"
    )
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
