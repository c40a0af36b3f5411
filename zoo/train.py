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
from collections.abc import Callable, Collection, Iterator, Mapping
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

from zoo.checkpoint import (
    FolderBusyError,
    atomic_write,
    folder_lock,
    index_safetensors,
    load,
    materialize,
    read_config,
    save,
)
from zoo.config import ModelConfig, _is_int, _is_real
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
    "checkpoint_problem",
    "run_configuration",
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
        for name in ("compile", "progress"):
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
    """The checkpoint ``<out_dir>/checkpoints/latest`` points at, or ``None`` if there is none.

    Raises:
        ValueError: the pointer names a folder that does not exist; the message names the
            newest intact earlier checkpoint, if any.
    """
    pointer = Path(out_dir) / CHECKPOINTS / "latest"
    if not pointer.is_file():
        return None
    name = pointer.read_text(encoding="utf-8", errors="replace").strip()
    folder = pointer.parent / name
    if not (re.fullmatch(r"step-\d{6,}", name) and folder.is_dir()):
        raise ValueError(
            f"{pointer} names {name!r}, which is not a checkpoint folder; the run folder is damaged. "
            + _fallback_advice(pointer.parent, None)
        )
    return folder


def checkpoint_problem(folder: str | os.PathLike) -> str | None:
    """What is wrong with the trainer checkpoint ``folder``, or ``None`` if every file reads.

    Reads each file's header or JSON (not the tensor data): ``trainer.json``, the model
    (``model/config.json`` and ``model/model.safetensors``), ``optimizer.safetensors``,
    ``optimizer.json`` and ``rng.safetensors``. The answer names the damaged file.
    """
    folder = Path(folder)
    try:
        trainer = _read_json(folder / "trainer.json")
        if not isinstance(trainer, dict) or not {"step", "data", "config"} <= set(trainer):
            return f"{folder / 'trainer.json'} lacks step, data or config"
        read_config(folder / "model")
        _read_json(folder / "optimizer.json")
        files = ("model/model.safetensors", "optimizer.safetensors", "rng.safetensors")
        index_safetensors([folder / name for name in files])
    except (OSError, ValueError) as err:
        return str(err)
    return None


def _read_json(file: Path) -> Any:
    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing")
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file} is not valid JSON ({err}); it is truncated or corrupted") from None


def _fallback_advice(checkpoints: Path, damaged: Path | None) -> str:
    """Names the newest intact checkpoint older than ``damaged`` and how to resume from it."""
    below = _step_number(damaged) if damaged is not None else math.inf
    candidates = sorted(
        (p for p in checkpoints.glob("step-*") if p.is_dir() and _step_number(p) < below),
        key=_step_number,
        reverse=True,
    )
    for earlier in candidates:
        if checkpoint_problem(earlier) is None:
            pointer = checkpoints / "latest"
            return (
                f"The earlier checkpoint {earlier} (step {_step_number(earlier)}) is intact: to resume "
                f"from it, write its name into {pointer} (echo {earlier.name} > {pointer}) and resume again"
            )
    return "No earlier checkpoint is intact; start a new run in another folder"


def _step_number(folder: Path) -> int:
    match = re.fullmatch(r"step-(\d+)", folder.name)
    return int(match.group(1)) if match else -1


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
    run: dict[str, Any],
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
        if folder.is_dir():  # left by an earlier attempt of this run that never made it the latest
            shutil.rmtree(folder)
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
                "run": run,
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
    ctx: Distributed,
    changed: Collection[str],
) -> int:
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    trainer = _read_json(folder / "trainer.json")
    weights = load(folder / "model").state_dict()
    try:
        set_model_state_dict(model, weights, options=_state_options())
    except RuntimeError as err:  # an allowed change of the model's shape
        raise ValueError(
            f"the weights of {folder} do not fit the model ({' '.join(str(err).split()).rstrip('. ')}); "
            f"a change of {', '.join(changed)} "
            f"changes the model's tensors; resume without it or start a new run"
        ) from None
    optim = _unflatten_optimizer(
        load_file(folder / "optimizer.safetensors"), _read_json(folder / "optimizer.json")
    )
    set_optimizer_state_dict(model, optimizer, optim_state_dict=optim, options=_state_options())
    _restore_rng(load_file(folder / "rng.safetensors"), ctx)
    sampler.position = int(trainer["data"]["position"])  # seed and window shape: compared before
    return int(trainer["step"])


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
    ``keep_checkpoints``, ``eval_every``, ``eval_windows``, ``compile``, ``fsdp``), the
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


def _prune(folder: Path, keep_count: int, keep: str) -> None:
    steps = sorted(p for p in folder.iterdir() if p.is_dir() and re.fullmatch(r"step-\d{6,}", p.name))
    for old in steps[:-keep_count]:
        if old.name != keep:
            shutil.rmtree(old, ignore_errors=True)


def _barrier(ctx: Distributed) -> None:
    if ctx.world_size > 1:
        dist.barrier()


def _rewrite_metrics(path: Path, upto: int, say: Callable[[str], None]) -> None:
    """Keeps the metrics rows of steps ``<= upto`` (those the resumed checkpoint includes)."""
    if not path.is_file():
        return
    rows, torn = _metric_rows(path)
    if torn:
        say(f"{path}: dropped a torn last line (the run was killed while writing it)")
    with atomic_write(path) as tmp:
        tmp.write_text("".join(json.dumps(row) + "\n" for row in rows if row["step"] <= upto))


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
            info = _read_json(parent / RUN_INFO)
            tokenizer = info.get("tokenizer") if isinstance(info, dict) else None
            if tokenizer is not None and not isinstance(tokenizer, str):
                raise ValueError(f"{parent / RUN_INFO}: tokenizer must be a name or path, got {tokenizer!r}")
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
    header = _read_json(config_file)
    if isinstance(header, dict) and "model_type" in header:
        from zoo.interop import from_hf

        if (folder / "tokenizer.json").is_file():
            tokenizer = str(folder / "tokenizer.json")
        return from_hf(folder, device=device), tokenizer
    return load(folder, device=device), tokenizer
