"""The trainer: AdamW, cosine schedule, accumulation, checkpoints that resume exactly, many processes.

One function, :func:`train`, runs the loop for every recipe::

    for each optimizer step i (0-based; the model's schedules see i + step_offset):
        lr = cosine(i)                                  warm-up, then cosine to min_lr_ratio x peak
        global batch = sampler.batch(i)                 (batch_size, seq_len + 1), a function of (seed, i)
        for each micro-batch of this process:           rows split over processes, then micro-steps
            loss = CE(next token) + out.aux_loss        dense execution, bf16 autocast on CUDA
            (loss / micro_steps).backward()             DDP/FSDP average over processes
        clip gradients; AdamW step
        metrics.jsonl += {step, loss, aux_loss, lr, depth, ...}
        checkpoint every N steps (atomic: model, optimizer, schedule, RNG, data position)

The global batch does not depend on the number of processes: each of ``N`` processes runs
``batch_size / (N * micro_batch_size)`` micro-steps on its rows, so ``torchrun
--nproc_per_node N`` reproduces a one-process run up to floating-point summation order.

A checkpoint is a folder ``<out>/checkpoints/step-NNNNNN`` holding

* ``model/``: a :func:`zoo.save` checkpoint (``config.json`` + ``model.safetensors``), so
  :func:`zoo.load` opens it directly;
* ``optimizer.safetensors`` + ``optimizer.json``: the AdamW state by parameter name and
  its hyperparameters (no pickle);
* ``rng.safetensors``: every process's torch RNG states;
* ``trainer.json``: the step, the data position, the training config and the run
  configuration (:func:`run_configuration`).

It is written into a temporary folder and renamed into place, then ``<out>/checkpoints/latest``
is replaced atomically, so a crash at any moment leaves the last complete checkpoint.
Resuming restores all of it: on CPU the losses of a stopped-and-resumed run equal those of
an uninterrupted one bit for bit.

A run folder holds one run: :func:`train` locks it while it trains, checks everything
(splits, the checkpoint's files, the run configuration against the resumed one) before its
first write, and only then writes ``run.json``. A resume that would change the run is
refused with the keys that differ unless they are named in ``allow_change``; a damaged
checkpoint is named with the newest intact one before it.

The package is split by job: :mod:`zoo.train.config` (the settings), :mod:`zoo.train.optim`
(optimizer, schedules, loss), :mod:`zoo.train.distributed` (processes and micro-batches),
:mod:`zoo.train.checkpointing` (trainer checkpoints), :mod:`zoo.train.runs` (run folders
and what a resume must share), :mod:`zoo.train.metrics` (the metrics log, TensorBoard) and
:mod:`zoo.train.loop` (:func:`train`); every public name is importable from ``zoo.train``.
Opening a trained model needs none of it: :func:`zoo.checkpoint.load_trained` (re-exported
here).

"""

from __future__ import annotations

# Opening a trained model needs no trainer: these live with the checkpoints.
from zoo.checkpoint import CHECKPOINTS, RUN_INFO, checkpoint_problem, latest_checkpoint, load_trained
from zoo.train.config import NonFiniteLossError, TrainConfig, TrainResult
from zoo.train.distributed import Distributed, init_distributed, per_process_micro_batch
from zoo.train.loop import train, validation_loss
from zoo.train.metrics import METRICS, read_metrics
from zoo.train.optim import gate_schedule, lm_loss, lr_at, make_optimizer, two_stage
from zoo.train.runs import run_configuration, seed_everything, write_run_info

__all__ = [
    "TrainConfig",
    "Distributed",
    "TrainResult",
    "NonFiniteLossError",
    "train",
    "lr_at",
    "make_optimizer",
    "lm_loss",
    "gate_schedule",
    "two_stage",
    "per_process_micro_batch",
    "latest_checkpoint",
    "checkpoint_problem",
    "run_configuration",
    "read_metrics",
    "init_distributed",
    "write_run_info",
    "load_trained",
    "seed_everything",
    "validation_loss",
]
