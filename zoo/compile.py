"""``zoo.compile``: torch.compile for the dense forward and for each sparse/decode pass."""

from __future__ import annotations

from typing import Any

import torch

from zoo.model import RecurrentLM
from zoo.sparse import pass_compute

__all__ = ["compile", "uncompile"]


def compile(model: RecurrentLM, *, dynamic: bool | None = None, **options: Any) -> RecurrentLM:
    """Compiles ``model`` in place and returns it.

    Two functions are compiled, and the eager ones stay available (:func:`uncompile`):

    * the dense pass loop (training and ``execution="dense"``), with ``fullgraph=True``:
      static shapes, no host synchronisation, so no graph breaks;
    * one pass of the block stack over gathered tokens, used by sparse execution, prefill and
      every decode step. Compiled passes use a static layout: every batch row is kept (rows
      with nothing to run are padding) and the number of token slots is rounded up to a
      multiple of 64, so the graphs are bounded by the number of buckets, and a decode step
      (one token per row) compiles once and is reused for every pass and every step.

    Args:
        model: the model to compile.
        dynamic: passed to ``torch.compile``.
        **options: further ``torch.compile`` arguments (``mode="max-autotune"``,
            ``backend=...``).
    """
    model._compiled_dense = torch.compile(model.dense_forward, fullgraph=True, dynamic=dynamic, **options)
    model._compiled_pass = torch.compile(pass_compute, fullgraph=True, dynamic=dynamic, **options)
    return model


def uncompile(model: RecurrentLM) -> RecurrentLM:
    """Removes what :func:`compile` attached; the model runs eagerly again."""
    for name in ("_compiled_dense", "_compiled_pass"):
        model.__dict__.pop(name, None)
    return model
