"""``zoo.compile``: torch.compile for the dense forward and for each sparse/decode pass."""

from __future__ import annotations

from typing import Any

import torch

from zoo.model import RecurrentLM
from zoo.recurrence import run_dense, stack_pass

__all__ = ["compile", "uncompile", "BUCKET"]

BUCKET = 64
"""Compiled passes round a selection's slot count up to a multiple of this (see :func:`zoo.layout.select`)."""


def compile(model: RecurrentLM, *, dynamic: bool | None = None, **options: Any) -> RecurrentLM:
    """Compiles ``model`` in place and returns it.

    Two functions are compiled, swapped into the model's explicit attributes
    (:attr:`~zoo.model.RecurrentLM.dense_fn`, :attr:`~zoo.model.RecurrentLM.pass_fn`); the
    eager ones come back with :func:`uncompile`:

    * the dense forward (training and ``execution="dense"``), with ``fullgraph=True``:
      static shapes, no host synchronisation, so no graph breaks;
    * one pass of the block stack over gathered tokens, used by sparse execution, prefill and
      every decode step. Compiled passes use a static layout: every batch row is kept (rows
      with nothing to run are padding) and the number of token slots is rounded up to a
      multiple of :data:`BUCKET` (``model.slot_bucket``), so the graphs are bounded by the
      number of buckets, and a decode step (one token per row) compiles once and is reused
      for every pass and every step.

    Args:
        model: the model to compile.
        dynamic: passed to ``torch.compile``.
        **options: further ``torch.compile`` arguments (``mode="max-autotune"``,
            ``backend=...``).
    """
    model.dense_fn = torch.compile(run_dense, fullgraph=True, dynamic=dynamic, **options)
    model.pass_fn = torch.compile(stack_pass, fullgraph=True, dynamic=dynamic, **options)
    model.slot_bucket = BUCKET
    return model


def uncompile(model: RecurrentLM) -> RecurrentLM:
    """Puts the eager functions back (:func:`compile` undone); the model runs eagerly again."""
    model.dense_fn, model.pass_fn, model.slot_bucket = run_dense, stack_pass, None
    return model
