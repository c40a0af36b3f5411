"""Trainer checkpoints: model, optimizer, RNG and data position written atomically, and read back.

Opening a trained model without the trainer is :func:`zoo.checkpoint.load_trained`."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Collection
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from zoo.checkpoint import CHECKPOINTS, _read_json, atomic_write, load, materialize, save
from zoo.data import BatchSampler
from zoo.model import RecurrentLM
from zoo.train.config import TrainConfig
from zoo.train.distributed import Distributed, _barrier

__all__: list[str] = []  # the trainer's own; train() uses them


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


def _prune(folder: Path, keep_count: int, keep: str) -> None:
    steps = sorted(p for p in folder.iterdir() if p.is_dir() and re.fullmatch(r"step-\d{6,}", p.name))
    for old in steps[:-keep_count]:
        if old.name != keep:
            shutil.rmtree(old, ignore_errors=True)
