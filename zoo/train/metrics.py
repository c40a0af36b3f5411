"""The metrics log: ``metrics.jsonl`` (one row per step), read back, trimmed on resume, and TensorBoard."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from zoo.checkpoint import atomic_write
from zoo.config import _is_int

__all__ = ["read_metrics", "tensorboard_writer", "log_row"]


METRICS = "metrics.jsonl"


def read_metrics(out_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of ``<out_dir>/metrics.jsonl``, in order (empty if there is no file).

    A last line without its newline that does not parse is being written (or was cut by a
    kill) and is left out; any other line that does not parse is an error.

    Raises:
        ValueError: a damaged line, named by file and line number.
    """
    return _metric_rows(Path(out_dir) / METRICS)[0]


def _metric_rows(path: Path) -> tuple[list[dict[str, Any]], bool]:
    """(rows, whether a torn last line was left out)."""
    if not path.is_file():
        return [], False
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            if number == len(lines):  # the last line, with no newline after it: torn
                return rows, True
            raise ValueError(
                f"{path}:{number} is not valid JSON ({err.msg}); the metrics log is damaged"
            ) from None
        if not isinstance(row, dict) or not _is_int(row.get("step")):
            raise ValueError(f"{path}:{number} is not a metrics row (an object with an integer step)")
        rows.append(row)
    return rows, False


def _rewrite_metrics(path: Path, upto: int, say: Callable[[str], None]) -> None:
    """Keeps the metrics rows of steps ``<= upto`` (those the resumed checkpoint includes)."""
    if not path.is_file():
        return
    rows, torn = _metric_rows(path)
    if torn:
        say(f"{path}: dropped a torn last line (the run was killed while writing it)")
    with atomic_write(path) as tmp:
        tmp.write_text("".join(json.dumps(row) + "\n" for row in rows if row["step"] <= upto))


def tensorboard_writer(out_dir: str | os.PathLike | None):
    """A TensorBoard ``SummaryWriter`` logging under ``<out_dir>/tensorboard`` (``None``: only check).

    Raises:
        ValueError: the ``tensorboard`` package is not installed (it is optional).
    """
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # torch.utils.tensorboard imports the tensorboard package
        raise ValueError(
            "tensorboard=True (--tensorboard) needs the tensorboard package, which is not installed: "
            "pip install tensorboard, or train without it (metrics.jsonl holds the same rows)"
        ) from None
    return None if out_dir is None else SummaryWriter(str(Path(out_dir) / "tensorboard"))


def log_row(writer: Any, row: dict[str, Any]) -> None:
    """Logs a metrics row to TensorBoard: one scalar per entry, ``train/<name>`` at its step."""
    for name, value in row.items():
        if name != "step":
            writer.add_scalar(f"train/{name}", value, row["step"])
    writer.flush()
