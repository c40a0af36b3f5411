"""Run folders: the run configuration a resume must share, the folder's lock, ``run.json``."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from zoo.checkpoint import RUN_INFO, FolderBusyError, _read_json, atomic_write, folder_lock, read_config
from zoo.config import ModelConfig
from zoo.data import TokenStream
from zoo.model import RecurrentLM
from zoo.train.config import TrainConfig
from zoo.train.distributed import Distributed, _any_rank

__all__ = ["run_configuration", "write_run_info", "seed_everything"]


# Settings that decide how a run runs but not what it computes: a resume may change them.
_OPERATIONAL = (
    "stop_after",
    "progress",
    "checkpoint_every",
    "keep_checkpoints",
    "eval_every",
    "eval_windows",
    "compile",
    "fsdp",
    "activation_checkpointing",
    "tensorboard",
)


def run_configuration(
    model: RecurrentLM,
    config: TrainConfig,
    data: TokenStream,
    val_data: TokenStream | None,
    tokenizer: str | None,
) -> dict[str, Any]:
    """Everything a resumed run must share with the run it continues, by key.

    Keys are the :class:`TrainConfig` fields (except those that change how a run runs but
    not what it computes: ``stop_after``, ``progress``, ``checkpoint_every``,
    ``keep_checkpoints``, ``eval_every``, ``eval_windows``, ``compile``, ``fsdp``,
    ``activation_checkpointing``, ``tensorboard``), the
    :class:`~zoo.config.ModelConfig` fields, ``data`` and ``val_data`` (the streams'
    :meth:`~zoo.data.TokenStream.fingerprint`) and ``tokenizer``. Values are JSON-ready.
    """
    train_fields = {k: v for k, v in config.to_dict().items() if k not in _OPERATIONAL}
    fields = {
        **train_fields,
        **model.config.to_dict(),
        "data": data.fingerprint(),
        "val_data": val_data.fingerprint() if val_data is not None else None,
        "tokenizer": tokenizer,
    }
    return json.loads(json.dumps(fields))  # tuples as lists, as they come back from the file


def _run_changes(saved: dict[str, Any], current: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{key: (saved, current)} for the keys whose values differ (identity of streams by content)."""
    changes = {}
    for key, now in current.items():
        if key not in saved:
            continue  # not recorded by the version that wrote the checkpoint
        then = saved[key]
        if key in ("data", "val_data") and isinstance(then, dict) and isinstance(now, dict):
            same = (then.get("tokens"), then.get("digest")) == (now.get("tokens"), now.get("digest"))
        else:
            same = then == now
        if not same:
            changes[key] = (then, now)
    return changes


def _describe(key: str, value: Any) -> str:
    if key in ("data", "val_data") and isinstance(value, dict):
        tokens = value.get("tokens")
        count = f"{tokens:,}" if isinstance(tokens, int) else str(tokens)
        return f"{value.get('name')} ({count} tokens, digest {str(value.get('digest'))[:12]})"
    return repr(value)


def _check_resume(
    folder: Path, current: dict[str, Any], allow_change: Collection[str], say: Callable[[str], None]
) -> list[str]:
    """Refuses differences from the resumed run not in ``allow_change``; returns those allowed."""
    trainer = _read_json(folder / "trainer.json")
    saved = dict(trainer.get("run") or {})
    recorded = trainer.get("run") is not None
    if not recorded:  # written by an earlier version: the train and model configs are still known
        saved = {k: v for k, v in trainer["config"].items() if k not in _OPERATIONAL}
        saved.update(read_config(folder / "model").to_dict())
        saved = json.loads(json.dumps(saved))
    changes = _run_changes(saved, current)
    refused = {k: v for k, v in changes.items() if k not in allow_change}
    if refused:
        listed = "; ".join(f"{k}: {_describe(k, a)} -> {_describe(k, b)}" for k, (a, b) in refused.items())
        keys = ", ".join(map(repr, refused))
        raise ValueError(
            f"cannot resume {folder}: this run differs from the one it would continue in "
            f"{', '.join(refused)} ({listed}). Resume with the same settings, start a new run in "
            f"another folder, or name the keys that may change: allow_change=[{keys}] "
            f"(recipes: --allow-change {','.join(refused)})"
        )
    for key, (then, now) in changes.items():
        say(f"resuming with {key} changed: {_describe(key, then)} -> {_describe(key, now)}")
    if not recorded:
        say(f"{folder} does not record its data or tokenizer (an earlier version wrote it); not compared")
    return list(changes)


_CHANGEABLE = (
    *(f.name for f in dataclasses.fields(TrainConfig) if f.name not in _OPERATIONAL),
    *(f.name for f in dataclasses.fields(ModelConfig)),
    "data",
    "val_data",
    "tokenizer",
)


@contextlib.contextmanager
def _run_lock(out_dir: Path, ctx: Distributed) -> Iterator[None]:
    """The run folder's lock, taken by rank 0 for every process; refused on all if it is held."""
    created = not out_dir.exists()
    with contextlib.ExitStack() as stack:
        refusal: FolderBusyError | None = None
        if ctx.is_main:
            try:
                stack.enter_context(folder_lock(out_dir, wait=False, purpose="training"))
            except FolderBusyError as err:
                refusal = err
        if _any_rank(refusal is not None, ctx):
            raise refusal or FolderBusyError(f"{out_dir} is locked by another run")
        try:
            yield
        except BaseException:
            if created and ctx.is_main:
                with contextlib.suppress(OSError):
                    out_dir.rmdir()  # refused before writing anything: leave no empty folder
            raise


def write_run_info(out_dir: str | os.PathLike, **info: Any) -> Path:
    """Writes ``<out_dir>/run.json`` (atomically): what a recipe ran, e.g. its tokenizer and settings.

    :func:`load_trained` reads the ``tokenizer`` entry back.
    """
    path = Path(out_dir) / RUN_INFO
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(info, indent=2, sort_keys=True, default=str) + "\n")
    return path


def seed_everything(seed: int) -> None:
    """Seeds torch (CPU and CUDA) and numpy's global generator, for model initialisation."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
