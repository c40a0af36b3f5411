"""What the plain transformers formats (GPT-NeoX, Llama) share."""

from __future__ import annotations

import re
from typing import Any

from zoo.config import ModelConfig

__all__ = ["LEGACY_BUFFERS", "REQUIRED_KEYS", "check_required", "refusals"]

# Buffers that old checkpoints carry: GPT-NeoX's causal mask and its fill value, rotary
# frequencies. None is a weight; all are recomputed.
LEGACY_BUFFERS = re.compile(r"(^|\.)attention\.(bias|masked_bias)$|(^|\.)inv_freq$")
REQUIRED_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")


def check_required(hf: dict[str, Any], name: str) -> None:
    """Raises ``ValueError`` naming the shape keys a ``config.json`` dict lacks."""
    absent = [key for key in REQUIRED_KEYS if key not in hf]
    if absent:
        raise ValueError(f"config.json lacks required {name} key(s) {absent}")


def refusals(config: ModelConfig, name: str, block: str) -> list[str]:
    """Why ``config`` is not a plain one-pass ``name`` model built from ``block`` (empty if it is)."""
    reasons = []
    if config.block != block:
        reasons.append(f"block={config.block!r} ({name} is the {block!r} block)")
    if config.recurrence != "none" or config.passes != 1:
        reasons.append(
            f"recurrence={config.recurrence!r} with passes={config.passes} ({name} runs its stack once)"
        )
    if config.halting != "none":
        reasons.append(f"halting={config.halting!r} ({name} has no halting policy or gate parameters)")
    if config.cache != "recompute":
        reasons.append(f"cache={config.cache!r} (a {name} folder has no cache strategy to record)")
    if config.embed_scale != 1.0 or config.initial_embed_mult != 1.0:
        reasons.append(
            f"embed_scale={config.embed_scale} and initial_embed_mult={config.initial_embed_mult} "
            f"({name} does not scale its input embeddings; both must be 1)"
        )
    return reasons
