"""Hugging Face GPT-NeoX (Pythia) checkpoints: config keys and tensor names.

Parameter names map one to one; no tensor changes layout, because the fused QKV weight of
:class:`~zoo.blocks.attention.Attention` is laid out per head exactly as GPT-NeoX stores
it (``[heads, 3, head_dim]``)::

    gpt_neox.embed_in                           embed
    gpt_neox.layers.N.input_layernorm           layers.N.attn_norm
    gpt_neox.layers.N.post_attention_layernorm  layers.N.mlp_norm
    gpt_neox.layers.N.attention.query_key_value layers.N.attn.qkv
    gpt_neox.layers.N.attention.dense           layers.N.attn.proj
    gpt_neox.layers.N.mlp.dense_h_to_4h         layers.N.mlp.fc_in
    gpt_neox.layers.N.mlp.dense_4h_to_h         layers.N.mlp.fc_out
    gpt_neox.final_layer_norm                   final_norm
    embed_out (older name; lm_head in memory)   head
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from zoo.checkpoint import StoredTensor, load_into
from zoo.config import ModelConfig
from zoo.interop import plain
from zoo.model import RecurrentLM

__all__ = [
    "MODEL_TYPE",
    "NAME",
    "config_fields",
    "hf_config",
    "refusals",
    "hf_tensors",
    "load",
    "hf_to_zoo_name",
    "zoo_to_hf_name",
]

MODEL_TYPE = "gpt_neox"
NAME = "GPT-NeoX"

# transformers' ``hidden_act`` names -> ``ModelConfig.gelu_approximate``.
_GELU = {
    "gelu": "none",
    "gelu_python": "none",
    "gelu_new": "tanh",
    "gelu_fast": "tanh",
    "gelu_pytorch_tanh": "tanh",
    "gelu_python_tanh": "tanh",
    "gelu_accurate": "tanh",
}
# What to_hf writes: transformers' activation that is exactly torch's GELU of that flavour.
_HIDDEN_ACT = {"none": "gelu", "tanh": "gelu_pytorch_tanh"}

_LAYER_PARTS = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "mlp_norm",
    "attention.query_key_value": "attn.qkv",
    "attention.dense": "attn.proj",
    "mlp.dense_h_to_4h": "mlp.fc_in",
    "mlp.dense_4h_to_h": "mlp.fc_out",
}
_TOP_LEVEL = {
    "gpt_neox.embed_in.weight": "embed.weight",
    "gpt_neox.final_layer_norm.weight": "final_norm.weight",
    "gpt_neox.final_layer_norm.bias": "final_norm.bias",
    "embed_out.weight": "head.weight",
    "lm_head.weight": "head.weight",  # the in-memory name, written by some converters
}
# The inverse maps; the head is written under the name published checkpoints use.
_LAYER_PARTS_TO_HF = {v: k for k, v in _LAYER_PARTS.items()}
_TOP_LEVEL_TO_HF = {v: k for k, v in _TOP_LEVEL.items() if k != "lm_head.weight"}
_LAYER = re.compile(r"^gpt_neox\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_ZOO_LAYER = re.compile(r"^layers\.(\d+)\.(.+)\.(weight|bias)$")


def hf_to_zoo_name(name: str) -> str | None:
    """The zoo parameter name of a GPT-NeoX tensor name; ``None`` if it is not a known weight."""
    if name in _TOP_LEVEL:
        return _TOP_LEVEL[name]
    match = _LAYER.match(name)
    if match and match.group(2) in _LAYER_PARTS:
        index, part, kind = match.groups()
        return f"layers.{index}.{_LAYER_PARTS[part]}.{kind}"
    return None


def zoo_to_hf_name(name: str) -> str:
    """The GPT-NeoX tensor name of a zoo ``neox`` parameter (``head`` -> ``embed_out``)."""
    if name in _TOP_LEVEL_TO_HF:
        return _TOP_LEVEL_TO_HF[name]
    match = _ZOO_LAYER.match(name)
    if match and match.group(2) in _LAYER_PARTS_TO_HF:
        index, part, kind = match.groups()
        return f"gpt_neox.layers.{index}.{_LAYER_PARTS_TO_HF[part]}.{kind}"
    raise ValueError(f"parameter {name!r} has no GPT-NeoX counterpart")


# Config ----------------------------------------------------------------------------------


def config_fields(hf: dict[str, Any]) -> dict[str, Any]:
    """:class:`~zoo.config.ModelConfig` fields of a GPT-NeoX ``config.json`` dict.

    Reads both what transformers 4.x wrote (``rotary_pct``, ``rotary_emb_base``) and what
    5.x writes (``rope_parameters: {rope_theta, partial_rotary_factor}``); absent optional
    keys take ``GPTNeoXConfig``'s defaults. The stored dtype (``torch_dtype``/``dtype``),
    dropout rates and token ids do not affect the architecture and are ignored.

    Raises:
        ValueError: a required key missing, or a feature this library does not implement
            (scaled rotary, non-GELU activation, no biases).
    """
    plain.check_required(hf, NAME)

    rope = hf.get("rope_parameters") or {}
    if hf.get("rope_scaling"):
        raise ValueError(
            f"config.json sets rope_scaling={hf['rope_scaling']!r}; only plain rotary is supported"
        )
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"config.json uses rope_type {rope_type!r}; only 'default' rotary is supported")
    rotary_fraction = rope.get("partial_rotary_factor", hf.get("rotary_pct", 0.25))
    rotary_base = rope.get("rope_theta", hf.get("rotary_emb_base", 10000.0))

    act = hf.get("hidden_act", "gelu")
    if act not in _GELU:
        raise ValueError(f"config.json has hidden_act {act!r}; supported: {', '.join(sorted(_GELU))}")
    if not hf.get("attention_bias", True):
        raise ValueError(
            "config.json sets attention_bias=false, but GPT-NeoX's MLP keeps its biases; the zoo "
            "'neox' block has one bias switch for all linears and cannot express that mix"
        )
    dim = int(hf["hidden_size"])
    mlp_dim = int(hf["intermediate_size"])
    return dict(
        vocab_size=int(hf["vocab_size"]),
        dim=dim,
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=int(hf["num_attention_heads"]),
        mlp_dim=None if mlp_dim == 4 * dim else mlp_dim,
        rotary_fraction=float(rotary_fraction),
        rotary_base=float(rotary_base),
        norm_eps=float(hf.get("layer_norm_eps", 1e-5)),
        parallel_residual=bool(hf.get("use_parallel_residual", True)),
        tied_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bias=True,
        gelu_approximate=_GELU[act],
        max_seq_len=int(hf.get("max_position_embeddings", 2048)),
        block="neox",
    )


def hf_config(config: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
    """The ``config.json`` dict of a GPT-NeoX folder for ``config`` (both 4.x and 5.x rotary keys)."""
    dtype_name = str(dtype).removeprefix("torch.")
    return {
        "architectures": ["GPTNeoXForCausalLM"],
        "model_type": MODEL_TYPE,
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "intermediate_size": config.hidden_dim,
        "hidden_act": _HIDDEN_ACT[config.gelu_approximate],
        # Both spellings: transformers 5.x reads rope_parameters, 4.x reads rotary_pct/base.
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": config.rotary_base,
            "partial_rotary_factor": config.rotary_fraction,
        },
        "rotary_pct": config.rotary_fraction,
        "rotary_emb_base": config.rotary_base,
        "layer_norm_eps": config.norm_eps,
        "use_parallel_residual": config.parallel_residual,
        "tie_word_embeddings": config.tied_embeddings,
        "max_position_embeddings": config.max_seq_len,
        "attention_bias": True,
        "attention_dropout": 0.0,
        "hidden_dropout": 0.0,
        "dtype": dtype_name,
        "torch_dtype": dtype_name,
    }


def refusals(config: ModelConfig) -> list[str]:
    """Why ``config`` is not a plain GPT-NeoX model (empty when it is one)."""
    reasons = plain.refusals(config, NAME, "neox")
    if not config.bias:
        reasons.append("bias=False (GPT-NeoX linears carry biases)")
    if config.kv_heads != config.num_heads:
        reasons.append(
            f"num_kv_heads={config.kv_heads} != num_heads={config.num_heads} (GPT-NeoX has no GQA)"
        )
    return reasons


# Tensors ----------------------------------------------------------------------------------


def hf_tensors(tensors: dict[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    """The zoo model's ``tensors`` under their GPT-NeoX names (no tensor changes)."""
    return {zoo_to_hf_name(name): t for name, t in tensors.items()}


def load(model: RecurrentLM, index: dict[str, StoredTensor], folder: Path, optional: list[str]) -> list[str]:
    """Loads the GPT-NeoX tensors of ``index`` into ``model``; returns the absent ``optional`` names.

    Raises:
        ValueError: tensors that are not GPT-NeoX weights, stored twice, missing, unexpected
            or mis-shaped (listed).
    """
    stored: dict[str, StoredTensor] = {}
    unknown = []
    for key, where in index.items():
        if plain.LEGACY_BUFFERS.search(key):
            continue
        name = hf_to_zoo_name(key)
        if name is None:
            unknown.append(key)
            continue
        if name == "head.weight" and model.config.tied_embeddings:
            # transformers ties the head to embed_in and ignores a stored copy; so do we.
            continue
        if name in stored:
            raise ValueError(f"{folder} stores {name!r} twice: as {stored[name].key!r} and as {key!r}")
        stored[name] = where
    if unknown:
        raise ValueError(
            f"{folder} holds tensors that are not GPT-NeoX weights: {', '.join(sorted(unknown))}"
        )
    return load_into(model, stored, source=str(folder), optional=optional)
