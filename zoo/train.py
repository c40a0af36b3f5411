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
* ``trainer.json``: the step, the data position and the training config.

It is written into a temporary folder and renamed into place, then ``<out>/checkpoints/latest``
is replaced atomically, so a crash at any moment leaves the last complete checkpoint.
Resuming restores all of it: on CPU the losses of a stopped-and-resumed run equal those of
an uninterrupted one bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from zoo.checkpoint import atomic_write, load, materialize, save
from zoo.data import BatchSampler, TokenStream, eval_windows
from zoo.model import RecurrentLM

__all__ = [
    "TrainConfig",
    "Distributed",
    "TrainResult",
    "NonFiniteLossError",
    "train",
    "lr_at",
    "make_optimizer",
    "lm_loss",
    "latest_checkpoint",
    "read_metrics",
    "init_distributed",
    "write_run_info",
    "load_trained",
    "seed_everything",
]

CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
RUN_INFO = "run.json"


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run besides the model and the data.

    Attributes:
        steps: optimizer steps of the whole run (the schedule's length).
        batch_size: sequences per optimizer step, over all processes together.
        micro_batch_size: sequences per forward pass on one process; ``None`` means
            ``batch_size / processes`` (no accumulation).
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
        progress: show a tqdm progress bar (rank 0 only).
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

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "keep_checkpoints", "eval_windows"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainConfig.{name} must be a positive int, got {value!r}")
        for name in ("warmup_steps", "checkpoint_every", "eval_every", "step_offset"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"TrainConfig.{name} must be an int >= 0, got {value!r}")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ValueError(
                f"TrainConfig.micro_batch_size must be positive or None, got {self.micro_batch_size}"
            )
        if self.stop_after is not None and not 1 <= self.stop_after <= self.steps:
            raise ValueError(
                f"TrainConfig.stop_after must lie in [1, steps={self.steps}], got {self.stop_after}"
            )
        if not self.lr > 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(
                f"TrainConfig: lr must be > 0 and min_lr_ratio in [0, 1], got {self.lr}, {self.min_lr_ratio}"
            )
        if not (isinstance(self.halting_lr_scale, (int, float)) and 0 <= self.halting_lr_scale < math.inf):
            raise ValueError(f"TrainConfig.halting_lr_scale must be a finite number >= 0, got {self.halting_lr_scale!r}")
        if self.halting_weight_decay is not None and not 0 <= self.halting_weight_decay < math.inf:
            raise ValueError(
                f"TrainConfig.halting_weight_decay must be a finite number >= 0 or None, got {self.halting_weight_decay!r}"
            )
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ValueError(
                f"TrainConfig.precision must be 'auto', 'bf16' or 'fp32', got {self.precision!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Distributed:
    """This process's place in a (possibly single-process) run.

    Attributes:
        rank: global rank.
        world_size: processes in the run.
        local_rank: rank on this machine (picks the GPU).
        device: where this process computes.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        """Rank 0, the process that writes files and prints."""
        return self.rank == 0


def init_distributed(device: str = "auto") -> Distributed:
    """Joins the process group when launched by ``torchrun`` (``WORLD_SIZE`` > 1).

    NCCL on CUDA, gloo on CPU. A single process gets a :class:`Distributed` of world size 1
    and no process group.

    Args:
        device: ``"auto"`` (CUDA if available), ``"cpu"`` or ``"cuda"``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but no CUDA device is visible; use device='cpu'")
    dev = torch.device("cuda", local) if device == "cuda" else torch.device("cpu")
    if device == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device == "cuda" else "gloo")
    return Distributed(rank, world, local, dev)


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


# Schedule, optimizer, loss -----------------------------------------------------------------


def lr_at(step: int, config: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based).

    Linear warm-up to ``lr`` over ``warmup_steps`` (step ``i`` gets ``lr * (i + 1) /
    warmup_steps``), then a cosine from ``lr`` down to ``min_lr_ratio * lr`` at the last step.

    Example:
        >>> cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=10)
        >>> [round(lr_at(s, cfg), 3) for s in (0, 9, 10, 99)]
        [0.1, 1.0, 1.0, 0.1]
    """
    peak, floor = config.lr, config.lr * config.min_lr_ratio
    if step < config.warmup_steps:
        return peak * (step + 1) / config.warmup_steps
    span = max(config.steps - 1 - config.warmup_steps, 1)
    progress = min((step - config.warmup_steps) / span, 1.0)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, weight decay on matrices (2-D and up) only.

    The halting policy's parameters (``halting.*``) get groups of their own, with
    ``halting_lr_scale`` (stored as each group's ``lr_scale``, which :func:`train` applies
    to the scheduled rate) and ``halting_weight_decay``.

    Raises:
        ValueError: ``train_only`` matches no parameter.
    """
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            groups.setdefault((name.startswith("halting."), param.dim() >= 2), []).append(param)
    if not groups:
        raise ValueError(f"no trainable parameters (train_only={config.train_only!r} matches none)")
    halting_decay = config.weight_decay if config.halting_weight_decay is None else config.halting_weight_decay
    param_groups = []
    for (halting, matrix), params in sorted(groups.items(), key=lambda kv: (kv[0][0], not kv[0][1])):
        decay = (halting_decay if halting else config.weight_decay) if matrix else 0.0
        scale = config.halting_lr_scale if halting else 1.0
        param_groups.append({"params": params, "weight_decay": decay, "lr_scale": scale})
    return torch.optim.AdamW(param_groups, lr=config.lr, betas=config.betas, eps=config.eps)


def lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Mean next-token cross-entropy (computed in fp32) of ``logits`` (B, T, V) against ``targets`` (B, T)."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def _freeze(model: nn.Module, train_only: tuple[str, ...]) -> None:
    if not train_only:
        return
    names = [n for n, _ in model.named_parameters()]
    if not any(n.startswith(train_only) for n in names):
        raise ValueError(f"train_only={train_only!r} matches no parameter; names start with e.g. {names[:3]}")
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith(train_only))


# Checkpoints --------------------------------------------------------------------------------


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The checkpoint ``<out_dir>/checkpoints/latest`` points at, or ``None`` if there is none."""
    pointer = Path(out_dir) / CHECKPOINTS / "latest"
    if not pointer.is_file():
        return None
    folder = pointer.parent / pointer.read_text().strip()
    if not folder.is_dir():
        raise ValueError(f"{pointer} names {folder.name}, which does not exist; the run folder is damaged")
    return folder


def read_metrics(out_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of ``<out_dir>/metrics.jsonl``, in order (empty if there is no file)."""
    path = Path(out_dir) / METRICS
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _state_options():
    """Whole (unsharded) state dicts on the CPU, the same for one process, DDP and FSDP."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=True)


def _save_checkpoint(
    out_dir: Path,
    step: int,
    model: nn.Module,
    raw: RecurrentLM,
    optimizer: torch.optim.Optimizer,
    sampler: BatchSampler,
    config: TrainConfig,
    ctx: Distributed,
    sharded: bool,
) -> Path:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    # Collectives first (every process takes part), files by rank 0 only.
    optim_state = get_optimizer_state_dict(model, optimizer, options=_state_options())
    model_state = get_model_state_dict(model, options=_state_options()) if sharded else None
    rng = _gather_rng(ctx)
    folder = Path(out_dir) / CHECKPOINTS / f"step-{step:06d}"
    if ctx.is_main:
        with atomic_write(folder, directory=True) as tmp:
            save(_savable(raw, model_state), tmp / "model")
            tensors, meta = _flatten_optimizer(optim_state)
            save_file(tensors, tmp / "optimizer.safetensors")
            (tmp / "optimizer.json").write_text(json.dumps(meta, indent=1))
            save_file(rng, tmp / "rng.safetensors")
            trainer = {
                "step": step,
                "data": sampler.state_dict(),
                "world_size": ctx.world_size,
                "config": config.to_dict(),
            }
            (tmp / "trainer.json").write_text(json.dumps(trainer, indent=2))
        with atomic_write(folder.parent / "latest") as tmp:
            tmp.write_text(folder.name + "\n")
        _prune(folder.parent, config.keep_checkpoints, keep=folder.name)
    _barrier(ctx)
    return folder


def _savable(raw: RecurrentLM, full_state: dict[str, Tensor] | None) -> RecurrentLM:
    if full_state is None:
        return raw
    from zoo.build import build_model

    # Sharded parameters are DTensors: rebuild a plain CPU model to hold the gathered weights.
    model = materialize(build_model(raw.config, device="meta"), "cpu")
    model.load_state_dict(full_state)
    return model


def _flatten_optimizer(state: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for name, entries in state["state"].items():
        for key, value in entries.items():
            if isinstance(value, Tensor):
                tensors[f"{name}::{key}"] = value.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(name, {})[key] = value
    groups = [
        {k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in state["param_groups"]
    ]
    return tensors, {"param_groups": groups, "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[str, dict[str, Any]] = {}
    for key, value in tensors.items():
        name, _, entry = key.rpartition("::")
        state.setdefault(name, {})[entry] = value
    for name, entries in meta["scalars"].items():
        state.setdefault(name, {}).update(entries)
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def _gather_rng(ctx: Distributed) -> dict[str, Tensor]:
    mine = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and ctx.device.type == "cuda":
        mine["cuda"] = torch.cuda.get_rng_state(ctx.device)
    everyone = [mine]
    if ctx.world_size > 1:
        everyone = [None] * ctx.world_size
        dist.all_gather_object(everyone, mine)
    return {f"{kind}.{rank}": state for rank, states in enumerate(everyone) for kind, state in states.items()}


def _restore_rng(rng: dict[str, Tensor], ctx: Distributed) -> None:
    # Same world size: every process gets its own state back; otherwise rank 0's.
    rank = ctx.rank if f"cpu.{ctx.rank}" in rng else 0
    torch.set_rng_state(rng[f"cpu.{rank}"])
    if ctx.device.type == "cuda" and f"cuda.{rank}" in rng:
        torch.cuda.set_rng_state(rng[f"cuda.{rank}"], ctx.device)


def _load_checkpoint(
    folder: Path,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    sampler: BatchSampler,
    config: TrainConfig,
    ctx: Distributed,
) -> int:
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    trainer = json.loads((folder / "trainer.json").read_text())
    saved = trainer["config"]
    for key in ("steps", "batch_size", "seq_len", "lr", "seed", "train_only", "step_offset"):
        mine = config.to_dict()[key]
        theirs = tuple(saved[key]) if isinstance(saved[key], list) else saved[key]
        if theirs != mine:
            raise ValueError(
                f"cannot resume {folder}: it was trained with {key}={theirs!r}, this run asks for "
                f"{mine!r}; resume with the same settings or start a new run in another folder"
            )
    weights = load(folder / "model").state_dict()
    set_model_state_dict(model, weights, options=_state_options())
    optim = _unflatten_optimizer(
        load_file(folder / "optimizer.safetensors"), json.loads((folder / "optimizer.json").read_text())
    )
    set_optimizer_state_dict(model, optimizer, optim_state_dict=optim, options=_state_options())
    _restore_rng(load_file(folder / "rng.safetensors"), ctx)
    sampler.load_state_dict(trainer["data"])
    return int(trainer["step"])


def _prune(folder: Path, keep_count: int, keep: str) -> None:
    steps = sorted(p for p in folder.iterdir() if p.is_dir() and re.fullmatch(r"step-\d{6,}", p.name))
    for old in steps[:-keep_count]:
        if old.name != keep:
            shutil.rmtree(old, ignore_errors=True)


def _barrier(ctx: Distributed) -> None:
    if ctx.world_size > 1:
        dist.barrier()


def _rewrite_metrics(path: Path, upto: int) -> None:
    """Keeps the metrics rows of steps ``<= upto`` (those the resumed checkpoint includes)."""
    if not path.is_file():
        return
    rows = [
        line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["step"] <= upto
    ]
    with atomic_write(path) as tmp:
        tmp.write_text("".join(row + "\n" for row in rows))


# The loop -----------------------------------------------------------------------------------


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


def _wrap(model: RecurrentLM, ctx: Distributed, config: TrainConfig) -> tuple[nn.Module, bool]:
    """DDP or FSDP2 around ``model`` when several processes run; returns (module, sharded)."""
    if ctx.world_size == 1:
        return model, False
    fsdp = config.fsdp
    if fsdp is None:
        fsdp = ctx.device.type == "cuda" and model.num_parameters() >= 1_000_000_000
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in model.layers:
            fully_shard(layer)
        fully_shard(model)
        return model, True
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids), False


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
    val_data: TokenStream | None = None,
    ctx: Distributed | None = None,
    log: Callable[[str], None] | None = None,
) -> TrainResult:
    """Trains ``model`` on ``data`` (dense execution, ``model.train()``), writing into ``out_dir``.

    Writes ``<out_dir>/metrics.jsonl`` (one JSON object per step: ``step`` (1-based count of
    updates done), ``loss`` (cross-entropy), ``aux_loss``, ``lr``, ``depth`` (mean passes per
    token), ``effective_depth`` (gate-weighted passes, as in :class:`zoo.analysis.EvalReport`),
    ``grad_norm``, ``tokens``, ``tokens_per_s``, and ``val_loss`` at evaluation steps)
    and checkpoints under ``<out_dir>/checkpoints``.

    Args:
        model: the model; moved to the process's device and trained in place.
        data: the training stream.
        config: the run's settings.
        out_dir: the run folder.
        resume: continue from ``<out_dir>``'s latest checkpoint (required if it has one).
        val_data: validation stream for ``eval_every``.
        ctx: this process's place in a multi-process run (default: from ``torchrun``'s
            environment, see :func:`init_distributed`).
        log: where messages go (default: the progress bar's ``write`` on rank 0).

    Returns:
        a :class:`TrainResult`.

    Raises:
        ValueError: inconsistent batch sizes, a resume that does not fit, or a fresh run in a
            folder that already holds one.
        NonFiniteLossError: the loss or gradient norm became non-finite; the message names
            the step and the last good checkpoint, which is left intact.
    """
    ctx = ctx or init_distributed("cuda" if next(model.parameters()).is_cuda else "cpu")
    out_dir = Path(out_dir)
    world = ctx.world_size
    micro = config.micro_batch_size or config.batch_size // world
    if micro < 1 or config.batch_size % (world * micro):
        raise ValueError(
            f"batch_size {config.batch_size} must be a multiple of processes x micro_batch_size = "
            f"{world} x {micro}; change batch_size or micro_batch_size"
        )
    accum = config.batch_size // (world * micro)
    if config.seq_len > model.config.max_seq_len:
        raise ValueError(
            f"seq_len {config.seq_len} exceeds the model's max_seq_len {model.config.max_seq_len}; "
            f"lower seq_len"
        )

    model.to(ctx.device)
    model.train()
    _freeze(model, config.train_only)
    if config.compile:
        from zoo.compile import compile as compile_model

        compile_model(model)
    wrapped, sharded = _wrap(model, ctx, config)
    optimizer = make_optimizer(model, config)
    sampler = BatchSampler(data, config.seq_len, config.batch_size, config.seed, model.config.vocab_size)

    checkpoint = latest_checkpoint(out_dir)
    start = 0
    if resume:
        if checkpoint is None:
            raise ValueError(f"--resume: {out_dir} holds no checkpoint; run without --resume to start")
        start = _load_checkpoint(checkpoint, wrapped, optimizer, sampler, config, ctx)
    elif checkpoint is not None:
        raise ValueError(
            f"{out_dir} already holds a run (checkpoint {checkpoint.name}); pass --resume to continue "
            f"it or choose another output folder"
        )
    metrics_path = out_dir / METRICS
    if ctx.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        if resume:
            _rewrite_metrics(metrics_path, start)
        elif metrics_path.exists():
            metrics_path.unlink()
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
    say = log or (bar.write if ctx.is_main else (lambda _: None))
    if start:
        say(f"resumed from {checkpoint} at step {start}")
    tokens_per_step = config.batch_size * config.seq_len
    losses: list[float] = []
    stopped: str | None = None
    with (
        _SigtermFlag() as sigterm,
        bar,
        open(metrics_path, "a") if ctx.is_main else contextlib.nullcontext() as metrics,
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
                        f"The last good checkpoint is {kept} (step {_step_of(kept)}); "
                        if kept
                        else "No checkpoint was written yet; "
                    )
                    + "lower the learning rate or check the data, then resume from it or restart"
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
                    out_dir, done, wrapped, model, optimizer, sampler, config, ctx, sharded
                )
            if term:
                stopped = "sigterm"
                say(f"SIGTERM at step {done}: checkpoint written to {checkpoint}; continue with --resume")
                break
    if stopped is None and stop < config.steps:
        stopped = "stop_after"
    return TrainResult(step=start + len(losses), losses=losses, checkpoint=checkpoint, stopped=stopped)


def _micro_rows(rank: int, accum: int, micro: int) -> Iterator[slice]:
    """The rows of the global batch this process runs, one slice per micro-step."""
    for j in range(accum):
        first = (rank * accum + j) * micro
        yield slice(first, first + micro)


def _clip(model: nn.Module, max_norm: float) -> float:
    params = [p for p in model.parameters() if p.grad is not None]
    if max_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    from torch.distributed.tensor import DTensor

    if isinstance(norm, DTensor):  # parameters sharded by FSDP: the norm is sharded too
        norm = norm.full_tensor()
    return float(norm)


def _any_rank(flag: bool, ctx: Distributed) -> bool:
    if ctx.world_size == 1:
        return flag
    value = torch.tensor([float(flag)], device=ctx.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def _step_of(folder: Path | None) -> int | None:
    return None if folder is None else int(json.loads((folder / "trainer.json").read_text())["step"])


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


def seed_everything(seed: int) -> None:
    """Seeds torch (CPU and CUDA) and numpy's global generator, for model initialisation."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)


def write_run_info(out_dir: str | os.PathLike, **info: Any) -> Path:
    """Writes ``<out_dir>/run.json`` (atomically): what a recipe ran, e.g. its tokenizer and settings.

    :func:`load_trained` reads the ``tokenizer`` entry back.
    """
    path = Path(out_dir) / RUN_INFO
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(info, indent=2, sort_keys=True, default=str) + "\n")
    return path


def load_trained(
    path: str | os.PathLike, *, device: torch.device | str | None = None
) -> tuple[RecurrentLM, str | None]:
    """Opens a model from any folder the recipes deal in, with the tokenizer it was trained with.

    Args:
        path: a training run folder (its latest checkpoint is opened), one checkpoint of it
            (``.../checkpoints/step-N``), a :func:`zoo.save` folder, or a Hugging Face
            GPT-NeoX folder (:func:`zoo.from_hf`).
        device: where to put the model.

    Returns:
        (model, tokenizer): the tokenizer's name as :func:`zoo.data.load_tokenizer` takes it,
        from the run's ``run.json`` or a ``tokenizer.json`` beside Hugging Face weights;
        ``None`` if the folder does not say.

    Raises:
        ValueError: ``path`` is none of these.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(
            f"{folder} is not a folder; pass a run folder, a checkpoint folder or a Hugging Face folder"
        )
    tokenizer = None
    for parent in [folder, *list(folder.parents)[:3]]:
        if (parent / RUN_INFO).is_file():
            tokenizer = json.loads((parent / RUN_INFO).read_text()).get("tokenizer")
            break
    latest = latest_checkpoint(folder) if (folder / CHECKPOINTS).is_dir() else None
    if latest is not None:
        folder = latest
    if (folder / "model" / "config.json").is_file():
        folder = folder / "model"
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ValueError(
            f"{folder} holds no config.json: it is not a run folder with checkpoints, a zoo.save "
            f"checkpoint or a Hugging Face folder"
        )
    header = json.loads(config_file.read_text())
    if isinstance(header, dict) and "model_type" in header:
        from zoo.interop import from_hf

        if (folder / "tokenizer.json").is_file():
            tokenizer = str(folder / "tokenizer.json")
        return from_hf(folder, device=device), tokenizer
    return load(folder, device=device), tokenizer
