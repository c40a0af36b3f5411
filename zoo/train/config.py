"""The trainer's settings (:class:`TrainConfig`), its result and its error."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zoo.config import _is_int, _is_real

__all__ = ["TrainConfig", "TrainResult", "NonFiniteLossError"]


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run besides the model and the data.

    Attributes:
        steps: optimizer steps of the whole run (the schedule's length).
        batch_size: sequences per optimizer step, over all processes together.
        micro_batch_size: sequences per forward pass on one process; ``None`` means
            ``batch_size / processes`` (no accumulation; :func:`per_process_micro_batch`).
        seq_len: tokens per sequence.
        lr: peak learning rate.
        min_lr_ratio: the cosine ends at ``min_lr_ratio * lr`` (Pythia/PonderLM: 0.1).
        warmup_steps: linear warm-up steps (Pythia/PonderLM: 1% of ``steps``).
        weight_decay: AdamW decoupled weight decay, applied to matrices only (2-D and up:
            linear weights and embeddings; not biases or norms).
        betas: AdamW betas (Pythia/PonderLM: 0.9, 0.95).
        eps: AdamW epsilon (Pythia: 1e-8).
        grad_clip: maximum global gradient norm; 0 disables clipping.
        seed: the data seed (batches are a function of it and the step).
        checkpoint_every: steps between checkpoints; 0 writes one only at the end.
        keep_checkpoints: how many checkpoints to keep (older ones are deleted).
        stop_after: stop (with a checkpoint) once this many steps are done, although the
            schedule is that of ``steps``; ``--resume`` continues the run.
        eval_every: steps between validation losses logged as ``val_loss``; 0 never.
        eval_windows: validation windows per evaluation.
        train_only: name prefixes of the parameters to train (e.g. ``("halting.",)`` for
            the gates alone); empty trains everything.
        halting_lr_scale: the halting policy's parameters (names ``halting.*``: gates, ACT
            units) follow the same schedule at this multiple of ``lr``.
        halting_weight_decay: their weight decay (matrices only); ``None`` means ``weight_decay``.
        step_offset: added to the step the model's schedules see (``model(ids, step=...)``),
            for a run that continues an earlier stage.
        compile: compile the dense forward with :func:`zoo.compile`.
        precision: ``"auto"`` (bf16 autocast on CUDA, fp32 elsewhere), ``"bf16"`` or ``"fp32"``.
        fsdp: shard parameters with FSDP2 (``fully_shard``) instead of replicating them with
            DDP when several processes run; ``None`` chooses FSDP on CUDA for models of 1B
            parameters and more.
        progress: show a tqdm progress bar (rank 0 only): loss, learning rate, mean depth
            and tokens/s.
        activation_checkpointing: recompute activations in the backward pass instead of
            keeping them (``model.gradient_checkpointing_enable()``): P passes keep P times
            the activations of one, this keeps about one pass's worth at the cost of
            another forward.
        tensorboard: also log every metrics row to TensorBoard under ``<out>/tensorboard``
            (rank 0; needs the ``tensorboard`` package).
    """

    steps: int
    batch_size: int = 8
    micro_batch_size: int | None = None
    seq_len: int = 128
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 0
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0
    seed: int = 0
    checkpoint_every: int = 0
    keep_checkpoints: int = 2
    stop_after: int | None = None
    eval_every: int = 0
    eval_windows: int = 16
    train_only: tuple[str, ...] = ()
    halting_lr_scale: float = 1.0
    halting_weight_decay: float | None = None
    step_offset: int = 0
    compile: bool = False
    precision: str = "auto"
    fsdp: bool | None = None
    progress: bool = True
    activation_checkpointing: bool = False
    tensorboard: bool = False

    def __post_init__(self) -> None:
        def fail(name: str, what: str) -> None:
            raise ValueError(f"TrainConfig.{name} must be {what}, got {getattr(self, name)!r}")

        for name in ("steps", "batch_size", "seq_len", "keep_checkpoints", "eval_windows"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                fail(name, "a positive int")
        for name in ("warmup_steps", "checkpoint_every", "eval_every", "step_offset", "seed"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 0:
                fail(name, "an int >= 0")
        micro, stop = self.micro_batch_size, self.stop_after
        if micro is not None and (not _is_int(micro) or micro < 1):
            fail("micro_batch_size", "a positive int or None")
        if stop is not None and (not _is_int(stop) or not 1 <= stop <= self.steps):
            fail("stop_after", f"an int in [1, steps={self.steps}] or None")
        for name, positive in (("lr", True), ("eps", True), ("weight_decay", False), ("grad_clip", False)):
            value = getattr(self, name)
            if not _is_real(value) or not math.isfinite(value) or value < 0 or (positive and value == 0):
                fail(name, "a finite number > 0" if positive else "a finite number >= 0")
        if not _is_real(self.min_lr_ratio) or not 0.0 <= self.min_lr_ratio <= 1.0:
            fail("min_lr_ratio", "a number in [0, 1]")
        if (
            not isinstance(self.betas, tuple)
            or len(self.betas) != 2
            or not all(_is_real(b) and 0.0 <= b < 1.0 for b in self.betas)
        ):
            fail("betas", "a tuple of two numbers in [0, 1), e.g. (0.9, 0.95)")
        prefixes = self.train_only
        if not isinstance(prefixes, tuple) or not all(isinstance(p, str) and p for p in prefixes):
            fail("train_only", "a tuple of parameter-name prefixes, e.g. ('halting.',)")
        for name in ("compile", "progress", "activation_checkpointing", "tensorboard"):
            if not isinstance(getattr(self, name), bool):
                fail(name, "true or false (a bool)")
        if self.fsdp is not None and not isinstance(self.fsdp, bool):
            fail("fsdp", "true, false or None")
        if not _is_real(self.halting_lr_scale) or not math.isfinite(self.halting_lr_scale) or self.halting_lr_scale < 0:
            fail("halting_lr_scale", "a finite number >= 0")
        decay = self.halting_weight_decay
        if decay is not None and (not _is_real(decay) or not math.isfinite(decay) or decay < 0):
            fail("halting_weight_decay", "a finite number >= 0 or None")
        if self.precision not in ("auto", "bf16", "fp32"):
            fail("precision", "'auto', 'bf16' or 'fp32'")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        return dataclasses.asdict(self)


@dataclass
class TrainResult:
    """What :func:`train` did.

    Attributes:
        step: optimizer steps done in total (including those before a resume).
        losses: the cross-entropy of each step this call ran, in order.
        checkpoint: the last checkpoint written or resumed from (``None`` if none).
        stopped: ``None`` if the run reached ``steps``, else ``"stop_after"`` or ``"sigterm"``.
    """

    step: int
    losses: list[float]
    checkpoint: Path | None
    stopped: str | None


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient norm became NaN or infinite; the run stopped before the update."""
