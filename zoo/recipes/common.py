"""The pieces every recipe shares: settings as command-line options, overrides, help text.

A recipe's settings are one frozen dataclass whose ``Attributes:`` docstring says what each
field means. :func:`add_settings` turns its fields into options (``lr`` becomes ``--lr``,
``micro_batch_size`` ``--micro-batch-size``) with the field's default and docstring as
help, and :func:`settings_from` reads the parsed options back into the dataclass, so a
setting is declared, documented and defaulted once::

    parser = argparse.ArgumentParser(formatter_class=HelpFormatter)
    add_settings(parser, Sampling())
    args = parser.parse_args(["--temperature", "0.8"])
    settings_from(args, Sampling())          # Sampling(temperature=0.8, ...)
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import types
import typing
from collections.abc import Collection, Iterator
from typing import Any

from zoo.config import parse_overrides
from zoo.registry import add_plugin_option

__all__ = [
    "HelpFormatter",
    "add_settings",
    "settings_from",
    "add_override_option",
    "overrides_from",
    "add_resume_options",
    "allowed_changes",
    "add_trainer_options",
    "add_data_options",
    "training_processes",
    "final_evaluation",
    "trainer_options",
    "attribute_help",
    "add_plugin_option",
    "positive_int",
]


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """``--help`` with every option's default, the description kept as written.

    A required option and one whose help already says its default show none.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.required or "default:" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def attribute_help(cls: type) -> dict[str, str]:
    """``{field: text}`` from the ``Attributes:`` section of ``cls``'s Google-style docstring."""
    doc = typing.cast(str, cls.__doc__ or "")
    section = doc.split("Attributes:", 1)[1] if "Attributes:" in doc else ""
    base = _indent(section)
    helps: dict[str, str] = {}
    name = None
    for line in section.splitlines():
        depth = len(line) - len(line.lstrip())
        match = re.match(r"^\s*(\w+)(?: \([^)]*\))?: (.*)$", line)
        if match and depth == base:
            name = match.group(1)
            helps[name] = match.group(2).strip()
        elif name is not None and line.strip() and depth > base:
            helps[name] += " " + line.strip()
        elif line.strip():
            name = None  # the section ended
    return {k: re.sub(r":\w+:`~?([^`]+)`", r"\1", v).replace("``", "").rstrip(".") for k, v in helps.items()}


def _indent(section: str) -> int:
    for line in section.splitlines():
        if line.strip():
            return len(line) - len(line.lstrip())
    return 0


def _scalar_type(hint: Any) -> tuple[type | None, bool]:
    """(int, float, str or bool; whether ``None`` is allowed), or (None, _) for other types."""
    optional = False
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional = len(args) < len(typing.get_args(hint))
        hint = args[0] if len(args) == 1 else None
    return (hint if hint in (int, float, str, bool) else None), optional


def add_settings(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    defaults: Any,
    *,
    only: Collection[str] | None = None,
    skip: Collection[str] = (),
    unset: str | None = None,
) -> list[str]:
    """Adds one option per scalar field of a settings dataclass, defaults and help from it.

    Args:
        parser: the parser (or argument group) to add to.
        defaults: an instance of the dataclass (its values are the defaults), or the class
            itself (its fields' defaults; ``None`` where a field has none). With ``unset``
            every option defaults to ``None``, meaning "from elsewhere", which ``unset``
            describes in the help (e.g. "the size's setting").
        only: the fields to add (default: every int, float, str or bool field).
        skip: fields not to add.
        unset: see ``defaults``.

    Returns:
        the fields added, in order.

    Raises:
        TypeError: a field named in ``only`` is not an int, float, str or bool field.
    """
    cls = defaults if isinstance(defaults, type) else type(defaults)
    every_unset = isinstance(defaults, type) and unset is not None
    hints = typing.get_type_hints(cls)
    helps = attribute_help(cls)
    added = []
    for f in dataclasses.fields(cls):
        if f.name in skip or (only is not None and f.name not in only):
            continue
        kind, optional = _scalar_type(hints[f.name])
        if kind is None:
            if only is not None:
                raise TypeError(f"{cls.__name__}.{f.name} is not an int, float, str or bool setting")
            continue
        if every_unset:
            default = None
        elif isinstance(defaults, type):
            default = None if f.default is dataclasses.MISSING else f.default
        else:
            default = getattr(defaults, f.name)
        text = helps.get(f.name, f.name.replace("_", " ")).replace("%", "%%")  # argparse formats help
        if every_unset:
            text += f" (default: {unset})"
        flag = "--" + f.name.replace("_", "-")
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=text)
        else:
            metavar = {int: "N", float: "X", str: "TEXT"}[kind]
            kind_parser = _parser(kind, optional)
            parser.add_argument(flag, type=kind_parser, default=default, metavar=metavar, help=text)
        added.append(f.name)
    return added


def _parser(kind: type, optional: bool):
    def parse(text: str) -> Any:
        if optional and text.lower() in ("none", "null"):
            return None
        return kind(text)

    parse.__name__ = kind.__name__  # argparse names the type in its error: "invalid int value"
    return parse


def positive_int(text: str) -> int:
    """An argparse ``type``: an integer of at least 1 (argparse names the option if not)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def settings_from(args: argparse.Namespace, base: Any, *, unset: bool = False) -> Any:
    """``base`` with every field the parsed ``args`` holds replaced by its value.

    With ``unset`` (options added by :func:`add_settings` with ``unset``), ``None`` means
    "not given" and keeps ``base``'s value.
    """
    values = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(base)
        if hasattr(args, f.name) and not (unset and getattr(args, f.name) is None)
    }
    return dataclasses.replace(base, **values)


def add_override_option(parser: argparse.ArgumentParser, example: str = "dim=128, halting=act") -> None:
    """The repeatable ``--override FIELD=VALUE`` option (read it with :func:`overrides_from`)."""
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help=f"a ModelConfig field, plain or JSON, repeatable: {example}, "
        "'halting_kwargs={\"threshold\": 0.01}'",
    )


def overrides_from(args: argparse.Namespace) -> dict[str, Any]:
    """``--override`` as ``{field: value}`` (:func:`zoo.config.parse_overrides`: errors name the item)."""
    return parse_overrides(args.override)


def add_resume_options(parser: argparse.ArgumentParser, what: str = "the latest checkpoint in --out") -> None:
    """``--resume`` and ``--allow-change KEYS``, as every training recipe takes them."""
    parser.add_argument("--resume", action="store_true", help=f"continue from {what}")
    parser.add_argument(
        "--allow-change",
        default="",
        metavar="KEYS",
        help="with --resume: comma-separated settings that may differ from the run's, e.g. lr,grad_clip",
    )


def allowed_changes(args: argparse.Namespace) -> list[str]:
    """``--allow-change`` as a list of keys."""
    return [key for key in args.allow_change.split(",") if key]


def add_data_options(parser: argparse.ArgumentParser, tokenizer_default: str) -> None:
    """``--data``, ``--val-data``, ``--tokenizer`` and ``--bin-dtype``, as the training recipes take them.

    Args:
        parser: the parser to add to.
        tokenizer_default: what the recipe uses without ``--tokenizer``, for the help.
    """
    parser.add_argument(
        "--data", default="embedded", help="'embedded', a pre-tokenized .bin, or text/jsonl files"
    )
    parser.add_argument("--val-data", default=None, help="validation source; default: held out from --data")
    parser.add_argument(
        "--tokenizer", default=None, help=f"'byte' or a tokenizer.json path; default: {tokenizer_default}"
    )
    parser.add_argument(
        "--bin-dtype", default=None, help="token dtype of .bin files; default: from the .idx, else uint16"
    )


def add_trainer_options(parser: argparse.ArgumentParser) -> None:
    """How a training recipe runs: device, compile, FSDP, precision, checkpointing, logging, progress.

    Read them with :func:`trainer_options`; the help of each is :class:`zoo.train.TrainConfig`'s.
    """
    from zoo.train import TrainConfig

    helps = attribute_help(TrainConfig)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where to train")
    parser.add_argument("--compile", action="store_true", help=helps["compile"])
    parser.add_argument("--fsdp", action=argparse.BooleanOptionalAction, default=None, help=helps["fsdp"])
    parser.add_argument(
        "--precision", default="auto", choices=["auto", "bf16", "fp32"], help=helps["precision"]
    )
    parser.add_argument(
        "--activation-checkpointing", action="store_true", help=helps["activation_checkpointing"]
    )
    parser.add_argument("--tensorboard", action="store_true", help=helps["tensorboard"])
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


@contextlib.contextmanager
def training_processes(device: str) -> Iterator[Any]:
    """This process's place in a training run; the process group is left at the end, whatever happened.

    Yields the :class:`zoo.train.Distributed` of :func:`zoo.train.init_distributed`
    (``torchrun``'s process group joined, if any).
    """
    import torch.distributed as dist

    from zoo.train import init_distributed

    try:
        yield init_distributed(device)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def final_evaluation(
    run_folder: str | os.PathLike,
    val: Any,
    seq_len: int,
    windows: int,
    name: str,
    out_file: str | os.PathLike,
    device: Any = None,
) -> dict[str, Any]:
    """Evaluates a run's final checkpoint on ``val``, prints the report and writes it to ``out_file``.

    Args:
        run_folder: the run folder whose latest checkpoint is evaluated.
        val: the validation stream.
        seq_len: tokens per window.
        windows: validation windows.
        name: the model's name in the report.
        out_file: the JSON file to write (atomically).
        device: where to evaluate.

    Returns:
        the report as a dict (:meth:`zoo.analysis.EvalReport.to_dict`).
    """
    from zoo.analysis import evaluate, format_report
    from zoo.checkpoint import atomic_write, load_trained

    model, _ = load_trained(run_folder, device=device)
    report = evaluate(model, val, seq_len, max_windows=windows)
    print(format_report(name, report))
    with atomic_write(out_file) as tmp:
        tmp.write_text(json.dumps(report.to_dict(), indent=2))
    return report.to_dict()


def trainer_options(args: argparse.Namespace) -> dict[str, Any]:
    """The :class:`zoo.train.TrainConfig` fields that :func:`add_trainer_options` sets."""
    return dict(
        compile=args.compile,
        fsdp=args.fsdp,
        precision=args.precision,
        activation_checkpointing=args.activation_checkpointing,
        tensorboard=args.tensorboard,
        progress=not args.no_progress,
    )
