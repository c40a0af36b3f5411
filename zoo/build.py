"""The one place that reads the registries: configs in, models out."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from zoo.blocks.norms import make_norm
from zoo.blocks.rotary import Rotary
from zoo.config import ModelConfig, check_model_size, preset
from zoo.model import RecurrentLM
from zoo.registry import BLOCKS, CACHES, HALTING, RECURRENCES

__all__ = ["build", "build_model"]


def build_model(
    config: ModelConfig, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> RecurrentLM:
    """Constructs the model ``config`` describes, with fresh (PonderLM-style) weights.

    Under one ``torch.manual_seed`` every model of the same shape gets the same backbone
    weights (embedding, layers, norms, head) whatever its halting policy or recurrence: the
    backbone is initialised before the policy's own parameters, and building the modules
    draws nothing from the global generator. Comparisons between variants are thus paired.
    (The output projections are scaled by ``1 / sqrt(2 * layers * passes)``, so models with
    different ``passes`` share the draws, not the scale.)

    Args:
        config: the model config.
        device: where to allocate; ``"meta"`` builds without memory (weights are not
            initialised), e.g. to count parameters of a 2.8B model.
        dtype: parameter dtype (default: torch's default, fp32).
    """
    check_model_size(config, dtype, device)  # before anything is allocated
    block = BLOCKS.get(config.block)
    policy_cls = HALTING.get(config.halting)
    try:
        halting = None
        # Construction draws nothing from the global generator (fork_rng restores it), so the
        # weights come from reset_parameters alone, backbone first: under one seed every
        # variant of a shape gets the same backbone draws, whatever its policy or recurrence.
        with (
            torch.random.fork_rng(devices=_cuda_devices(device)),
            torch.device(device) if device is not None else nullcontext(),
        ):
            layers = nn.ModuleList(block(config) for _ in range(config.num_layers))
            halting = policy_cls(config, **config.halting_kwargs)
            model = RecurrentLM(
                config,
                layers=layers,
                final_norm=make_norm(block.norm, config.dim, config.norm_eps),
                rotary=Rotary(config.rotary_dims, config.rotary_base),
                recurrence=RECURRENCES.get(config.recurrence)(config),
                halting=halting,
                cache=CACHES.get(config.cache)(),
            )
    except TypeError as err:
        if halting is None and "unexpected keyword" in str(err):
            raise ValueError(
                f"halting_kwargs {sorted(config.halting_kwargs)} do not fit halting={config.halting!r}: "
                f"{err}. See the policy's docstring: help(zoo.registry.HALTING.get({config.halting!r}))"
            ) from None
        raise
    if str(device) != "meta":
        model.reset_parameters()
    if dtype is not None:
        model.to(dtype)
    return model


def _cuda_devices(device: torch.device | str | None) -> list[int]:
    """The CUDA device whose generator building on ``device`` would draw from (none on CPU)."""
    if device is None or torch.device(device).type != "cuda":
        return []
    index = torch.device(device).index
    return [torch.cuda.current_device() if index is None else index]


def build(
    name: str, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None, **overrides: Any
) -> RecurrentLM:
    """Builds the registered preset ``name`` with ``overrides`` applied to its config.

    Args:
        name: a name from ``zoo.available("model")``, e.g. ``"adaponder-pythia-70m"``.
        device: where to allocate (``"meta"`` for shape-only models).
        dtype: parameter dtype.
        **overrides: :class:`~zoo.config.ModelConfig` fields, e.g. ``halting="act"``,
            ``cache="kv_reuse"``, ``passes=4``, ``halting_kwargs={...}``.

    Example:
        >>> import zoo
        >>> model = zoo.build("adaponder-pythia-tiny", halting="fixed_prune", halting_kwargs={"ratio": 0.5})
        >>> model.config.cache
        'kv_reuse'
    """
    return build_model(preset(name, **overrides), device=device, dtype=dtype)

