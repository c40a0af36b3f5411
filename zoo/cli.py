"""The ``ponder-zoo`` console script: one command per recipe.

::

    ponder-zoo --help
    ponder-zoo train --model adaponder-pythia-tiny --steps 200 --out runs/tiny
    ponder-zoo evaluate --model runs/tiny
    ponder-zoo generate --model runs/tiny --prompt "def " --max-new-tokens 64
    ponder-zoo convert runs/tiny hf/tiny

Each command is a recipe of :mod:`zoo.recipes` with the same options as its script in
``recipes/``; ``ponder-zoo <command> --help`` lists them with their defaults.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from zoo.recipes.common import HelpFormatter

__all__ = ["COMMANDS", "build_parser", "main"]

COMMANDS = {
    "train": "zoo.recipes.pretrain",
    "continue": "zoo.recipes.continued",
    "evaluate": "zoo.recipes.evaluate",
    "generate": "zoo.recipes.generate",
    "iso-flops": "zoo.recipes.iso_flops",
    "demo": "zoo.recipes.demo",
    "convert": "zoo.recipes.convert",
}
"""Command name -> the recipe module it runs."""


def build_parser() -> argparse.ArgumentParser:
    """The ``ponder-zoo`` parser: one sub-command per entry of :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(
        prog="ponder-zoo", description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        summary = (module.__doc__ or name).strip().split("\n")[0]
        sub = commands.add_parser(
            name, help=summary, description=module.__doc__, formatter_class=HelpFormatter
        )
        module.build_parser(sub)
        sub.set_defaults(run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs ``ponder-zoo`` with ``argv`` (default: the command line); returns the exit status."""
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
