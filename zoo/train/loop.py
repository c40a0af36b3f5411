"""The training loop: :func:`train`."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from tqdm.auto import tqdm

from zoo.checkpoint import _fallback_advice, _step_number, checkpoint_problem, latest_checkpoint
from zoo.data import BatchSampler, TokenStream, eval_windows
from zoo.model import RecurrentLM
from zoo.train.checkpointing import _load_checkpoint, _save_checkpoint
from zoo.train.config import NonFiniteLossError, TrainConfig, TrainResult
from zoo.train.distributed import (
    Distributed,
    _any_rank,
    _barrier,
    _micro_rows,
    _wrap,
    init_distributed,
    per_process_micro_batch,
)
from zoo.train.metrics import METRICS, _rewrite_metrics, log_row, tensorboard_writer
from zoo.train.optim import _clip, _freeze, lm_loss, lr_at, make_optimizer
from zoo.train.runs import _CHANGEABLE, _check_resume, _run_lock, run_configuration, write_run_info

__all__ = ["train", "validation_loss"]


class _SigtermFlag:
    """Turns SIGTERM into a flag checked after each step (only the main thread can install it)."""

    def __init__(self) -> None:
        self.raised = False
        self._previous: Any = None

    def __enter__(self) -> _SigtermFlag:
        with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.raised = True

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _autocast(config: TrainConfig, device: torch.device):
    bf16 = config.precision == "bf16" or (config.precision == "auto" and device.type == "cuda")
    if not bf16:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def train(
    model: RecurrentLM,
    data: TokenStream,
    config: TrainConfig,
    out_dir: str | os.PathLike,
    *,
    resume: bool = False,
    allow_change: Collection[str] = (),
    val_data: TokenStream | None = None,
    tokenizer: str | None = None,
    run_info: Mapping[str, Any] | None = None,
    ctx: Distributed | None = None,
    log: Callable[[str], None] | None = None,
) -> TrainResult:
    """Trains ``model`` on ``data`` (dense execution, ``model.train()``), writing into ``out_dir``.

    Writes ``<out_dir>/metrics.jsonl`` (one JSON object per step: ``step`` (1-based count of
    updates done), ``loss`` (cross-entropy), ``aux_loss``, ``lr``, ``depth`` (mean passes per
    token), ``effective_depth`` (gate-weighted passes, as in :class:`zoo.analysis.EvalReport`),
    ``grad_norm``, ``tokens``, ``tokens_per_s``, and ``val_loss`` at evaluation steps)
    and checkpoints under ``<out_dir>/checkpoints``.

    One run per folder: the folder is locked (:func:`zoo.checkpoint.folder_lock`) for the
    whole call, and a second run on it is refused before it writes anything. Every check
    runs before the first file is written: batch shapes, every split (training and
    validation hold at least one window, in-memory ones only ids the model has), the lock,
    and, on resume, the checkpoint's files and the whole run configuration
    (:func:`run_configuration`: train and model config, the data's identity, the tokenizer),
    whose differences are refused, listed, unless named in ``allow_change``. Then
    ``run.json`` is written (if ``run_info``), and on resume the metrics rows after the
    checkpoint (and a last line torn by a kill) are dropped.

    Args:
        model: the model; moved to the process's device and trained in place.
        data: the training stream.
        config: the run's settings.
        out_dir: the run folder.
        resume: continue from ``<out_dir>``'s latest checkpoint (required if it has one).
        allow_change: keys of :func:`run_configuration` that may differ from the resumed
            run's, e.g. ``["lr"]`` to resume with a lower learning rate after a divergence.
        val_data: validation stream for ``eval_every``.
        tokenizer: the name of the tokenizer the data was made with (``"byte"``, a
            ``tokenizer.json`` path), part of the run configuration a resume must share.
        run_info: written to ``<out_dir>/run.json`` (:func:`write_run_info`) once every
            check has passed; :func:`load_trained` reads its ``tokenizer`` entry back.
        ctx: this process's place in a multi-process run (default: from ``torchrun``'s
            environment, see :func:`init_distributed`).
        log: where messages go (default: the progress bar's ``write`` on rank 0).

    Returns:
        a :class:`TrainResult`.

    Raises:
        ValueError: inconsistent batch sizes, a split too short or holding ids beyond the
            vocabulary, a folder another run holds, a fresh run in a folder that already holds
            one, a resume without a checkpoint, from a damaged one (the damaged file and the
            newest intact earlier checkpoint are named) or with a different run
            configuration (the keys are listed).
        NonFiniteLossError: the loss or gradient norm became non-finite; the message names
            the step and the last good checkpoint, which is left intact.
    """
    ctx = ctx or init_distributed("cuda" if next(model.parameters()).is_cuda else "cpu")
    out_dir = Path(out_dir)
    say = log or (tqdm.write if ctx.is_main else (lambda _: None))
    world = ctx.world_size
    micro = per_process_micro_batch(config.batch_size, world, config.micro_batch_size)
    accum = config.batch_size // (world * micro)
    if config.seq_len > model.config.max_seq_len:
        raise ValueError(
            f"seq_len {config.seq_len} exceeds the model's max_seq_len {model.config.max_seq_len}; "
            f"lower seq_len"
        )
    if config.eval_every and val_data is None:
        raise ValueError(f"eval_every={config.eval_every} needs val_data; pass a validation stream or set 0")
    for stream, split in ((data, "training"), (val_data, "validation")):
        if stream is None:
            continue
        if len(stream) < config.seq_len + 1:
            raise ValueError(
                f"the {split} split {stream.name} has {len(stream)} tokens, fewer than one window of "
                f"seq_len + 1 = {config.seq_len + 1}; lower seq_len or give it more data"
            )
        if split == "validation" and stream.in_memory:  # the sampler checks the training split
            stream.check_vocab(model.config.vocab_size)
    if config.tensorboard and ctx.is_main:
        tensorboard_writer(None)  # installed? (checked before anything is written)
    unknown = sorted(set(allow_change) - set(_CHANGEABLE))
    if unknown:
        raise ValueError(
            f"allow_change names {', '.join(unknown)}, which are not run settings; valid keys: "
            f"{', '.join(sorted(_CHANGEABLE))}"
        )
    with _run_lock(out_dir, ctx):
        return _train(
            model, data, config, out_dir, resume, allow_change, val_data, tokenizer, run_info, ctx, say,
            micro, accum,
        )


def _train(
    model: RecurrentLM,
    data: TokenStream,
    config: TrainConfig,
    out_dir: Path,
    resume: bool,
    allow_change: Collection[str],
    val_data: TokenStream | None,
    tokenizer: str | None,
    run_info: Mapping[str, Any] | None,
    ctx: Distributed,
    say: Callable[[str], None],
    micro: int,
    accum: int,
) -> TrainResult:
    world = ctx.world_size
    run = run_configuration(model, config, data, val_data, tokenizer)
    checkpoint = latest_checkpoint(out_dir)
    if resume:
        if checkpoint is None:
            raise ValueError(f"--resume: {out_dir} holds no checkpoint; run without --resume to start")
        problem = checkpoint_problem(checkpoint)
        if problem is not None:
            advice = _fallback_advice(checkpoint.parent, checkpoint)
            raise ValueError(f"cannot resume from {checkpoint}: {problem}. {advice}")
        changed = _check_resume(checkpoint, run, allow_change, say)
    elif checkpoint is not None:
        raise ValueError(
            f"{out_dir} already holds a run (checkpoint {checkpoint.name}); pass --resume to continue "
            f"it or choose another output folder"
        )

    model.to(ctx.device)
    model.train()
    if config.activation_checkpointing:
        model.gradient_checkpointing_enable()
    _freeze(model, config.train_only)
    if config.compile:
        from zoo.compile import compile as compile_model

        compile_model(model)
    wrapped, sharded = _wrap(model, ctx, config)
    optimizer = make_optimizer(model, config)
    sampler = BatchSampler(data, config.seq_len, config.batch_size, config.seed, model.config.vocab_size)
    start = _load_checkpoint(checkpoint, wrapped, optimizer, sampler, ctx, changed) if resume else 0

    # Every check has passed: from here on the run writes.
    metrics_path = out_dir / METRICS
    if ctx.is_main:
        if run_info is not None:
            write_run_info(out_dir, **run_info)
        if resume:
            _rewrite_metrics(metrics_path, start, say)
        elif metrics_path.exists():
            metrics_path.unlink()  # an earlier attempt that died before its first checkpoint
    _barrier(ctx)

    stop = config.stop_after if config.stop_after is not None else config.steps
    bar = tqdm(
        total=config.steps,
        initial=start,
        disable=not (config.progress and ctx.is_main),
        dynamic_ncols=True,
        mininterval=0.5,
        desc="train",
    )
    if start:
        say(f"resumed from {checkpoint} at step {start}")
    tokens_per_step = config.batch_size * config.seq_len
    losses: list[float] = []
    stopped: str | None = None
    board = tensorboard_writer(out_dir) if config.tensorboard and ctx.is_main else None
    with (
        _SigtermFlag() as sigterm,
        bar,
        open(metrics_path, "a") if ctx.is_main else contextlib.nullcontext() as metrics,
        board if board is not None else contextlib.nullcontext(),
    ):
        for i in range(start, stop):
            t0 = time.perf_counter()
            lr = lr_at(i, config)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]
            step_t = torch.tensor(i + config.step_offset, device=ctx.device)
            stats = torch.zeros(4, dtype=torch.float64, device=ctx.device)  # ce, aux, depth, effective depth
            for j, rows in enumerate(_micro_rows(ctx.rank, accum, micro)):
                batch = torch.from_numpy(sampler.batch(i, rows)).to(ctx.device)
                inputs, targets = batch[:, :-1], batch[:, 1:]
                # DDP averages gradients over processes on the last micro-step only.
                sync = j == accum - 1 or not isinstance(wrapped, nn.parallel.DistributedDataParallel)
                with contextlib.nullcontext() if sync else wrapped.no_sync():
                    with _autocast(config, ctx.device):
                        out = wrapped(inputs, execution="dense", step=step_t)
                        ce = lm_loss(out.logits, targets)
                        loss = ce + out.aux_loss.float()
                    (loss / accum).backward()
                taken = (out.masks[1:] * out.gates.detach()).sum(0).float().mean()  # 0 for one pass
                stats += torch.stack(
                    [ce.detach(), out.aux_loss.detach().float(), out.depth.float().mean(), 1.0 + taken]
                ).double()
            stats /= accum
            if world > 1:
                dist.all_reduce(stats)
                stats /= world
            ce_value, aux_value, depth_value, effective_value = stats.tolist()
            grad_norm = _clip(model, config.grad_clip)
            if not (math.isfinite(ce_value) and math.isfinite(aux_value) and math.isfinite(grad_norm)):
                bar.close()
                what = "loss" if not math.isfinite(ce_value + aux_value) else "gradient norm"
                value = ce_value + aux_value if what == "loss" else grad_norm
                kept = latest_checkpoint(out_dir)
                raise NonFiniteLossError(
                    f"the {what} is {value} at step {i + 1}; stopped before updating the weights. "
                    + (
                        f"The last good checkpoint is {kept} (step {_step_number(kept)}); "
                        if kept
                        else "No checkpoint was written yet; "
                    )
                    + "lower the learning rate or check the data, then resume with the new rate: "
                    + "train(..., resume=True, allow_change=['lr']) (recipes: --resume --lr NEW "
                    + "--allow-change lr), or restart"
                )
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            done = i + 1
            losses.append(ce_value)
            elapsed = time.perf_counter() - t0
            row = {
                "step": done,
                "loss": ce_value,
                "aux_loss": aux_value,
                "lr": lr,
                "depth": depth_value,
                "effective_depth": effective_value,
                "grad_norm": grad_norm,
                "tokens": done * tokens_per_step,
                "tokens_per_s": tokens_per_step / elapsed,
            }
            if (
                val_data is not None
                and config.eval_every
                and (done % config.eval_every == 0 or done == config.steps)
            ):
                row["val_loss"] = validation_loss(wrapped, val_data, config, micro, ctx)
            if ctx.is_main:
                metrics.write(json.dumps(row) + "\n")
                metrics.flush()
                if board is not None:
                    log_row(board, row)
            bar.update(1)
            bar.set_postfix(
                loss=f"{ce_value:.4f}",
                lr=f"{lr:.2e}",
                depth=f"{depth_value:.2f}",
                tok_s=f"{row['tokens_per_s']:.0f}",
            )
            term = _any_rank(sigterm.raised, ctx)
            due = config.checkpoint_every and done % config.checkpoint_every == 0
            if due or done == stop or term:
                sampler.position = done
                checkpoint = _save_checkpoint(
                    out_dir, done, wrapped, model, optimizer, sampler, config, run, ctx, sharded
                )
            if term:
                stopped = "sigterm"
                say(f"SIGTERM at step {done}: checkpoint written to {checkpoint}; continue with --resume")
                break
    if stopped is None and stop < config.steps:
        stopped = "stop_after"
    return TrainResult(step=start + len(losses), losses=losses, checkpoint=checkpoint, stopped=stopped)


@torch.no_grad()
def validation_loss(
    model: nn.Module, data: TokenStream, config: TrainConfig, batch_size: int, ctx: Distributed
) -> float:
    """Mean next-token cross-entropy over the first ``config.eval_windows`` windows of ``data``.

    Dense execution, every process computes the same windows (so sharded models work).
    """
    windows = torch.from_numpy(eval_windows(data, config.seq_len, config.eval_windows)).to(ctx.device)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for first in range(0, windows.shape[0], batch_size):
        batch = windows[first : first + batch_size]
        with _autocast(config, ctx.device):
            out = model(batch[:, :-1], execution="dense")
        total += float(lm_loss(out.logits, batch[:, 1:])) * batch.shape[0]
        count += batch.shape[0]
    model.train(was_training)
    return total / count
