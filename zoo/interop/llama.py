"""Hugging Face Llama checkpoints: config keys and tensors.

The zoo ``llama`` block fuses what Llama keeps apart, so two tensors change layout on the
way in and are split again on the way out; every other name maps one to one::

    model.embed_tokens                       embed
    model.layers.N.input_layernorm           layers.N.attn_norm
    model.layers.N.post_attention_layernorm  layers.N.mlp_norm
    model.layers.N.self_attn.q_proj  ┐
    model.layers.N.self_attn.k_proj  ├─────── layers.N.attn.qkv   per key/value head g: its
    model.layers.N.self_attn.v_proj  ┘                             query heads, k_g, v_g
    model.layers.N.self_attn.o_proj          layers.N.attn.proj
    model.layers.N.mlp.gate_proj     ┐
    model.layers.N.mlp.up_proj       ┴─────── layers.N.mlp.fc_in  [gate; up]
    model.layers.N.mlp.down_proj             layers.N.mlp.fc_out
    model.norm                               final_norm
    lm_head                                  head

Query head ``h`` attends with key/value head ``h // (num_heads / num_kv_heads)`` in both
libraries, so grouping the query rows by their key/value head keeps every head's role.
Rotary is the "rotate half" convention over the whole head, as in the ``llama`` block
with ``rotary_fraction=1``.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Any

import torch
from einops import rearrange
from safetensors import safe_open
from torch import Tensor

from zoo.checkpoint import StoredTensor, misfit, model_tensors
from zoo.config import ModelConfig
from zoo.interop import plain
from zoo.model import RecurrentLM

__all__ = ["MODEL_TYPE", "NAME", "config_fields", "hf_config", "refusals", "hf_tensors", "load"]

MODEL_TYPE = "llama"
NAME = "Llama"

_SILU = ("silu", "swish")
# Llama tensor name parts -> (zoo name part, part of the fused zoo tensor; "" for a whole one).
_LAYER_PARTS = {
    "input_layernorm": ("attn_norm", ""),
    "post_attention_layernorm": ("mlp_norm", ""),
    "self_attn.q_proj": ("attn.qkv", "q"),
    "self_attn.k_proj": ("attn.qkv", "k"),
    "self_attn.v_proj": ("attn.qkv", "v"),
    "self_attn.o_proj": ("attn.proj", ""),
    "mlp.gate_proj": ("mlp.fc_in", "gate"),
    "mlp.up_proj": ("mlp.fc_in", "up"),
    "mlp.down_proj": ("mlp.fc_out", ""),
}
_TOP_LEVEL = {
    "model.embed_tokens.weight": "embed.weight",
    "model.norm.weight": "final_norm.weight",
    "lm_head.weight": "head.weight",
}
_LAYER_PARTS_TO_HF = {value: key for key, value in _LAYER_PARTS.items()}
_TOP_LEVEL_TO_HF = {value: key for key, value in _TOP_LEVEL.items()}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")
_ZOO_LAYER = re.compile(r"^layers\.(\d+)\.(.+)\.(weight|bias)$")


def hf_to_zoo_name(name: str) -> tuple[str, str] | None:
    """(zoo name, part) of a Llama tensor name; ``None`` if it is not a known weight."""
    if name in _TOP_LEVEL:
        return _TOP_LEVEL[name], ""
    match = _LAYER.match(name)
    if match and match.group(2) in _LAYER_PARTS:
        index, hf_part, kind = match.groups()
        zoo_part, part = _LAYER_PARTS[hf_part]
        return f"layers.{index}.{zoo_part}.{kind}", part
    return None


def zoo_to_hf_name(name: str, part: str = "") -> str:
    """The Llama tensor name of ``part`` of the zoo ``llama`` parameter ``name``."""
    if name in _TOP_LEVEL_TO_HF and not part:
        return _TOP_LEVEL_TO_HF[name]
    match = _ZOO_LAYER.match(name)
    if match and (match.group(2), part) in _LAYER_PARTS_TO_HF:
        index, zoo_part, kind = match.groups()
        return f"model.layers.{index}.{_LAYER_PARTS_TO_HF[zoo_part, part]}.{kind}"
    raise ValueError(f"parameter {name!r} (part {part!r}) has no Llama counterpart")


# Config ----------------------------------------------------------------------------------


def config_fields(hf: dict[str, Any]) -> dict[str, Any]:
    """:class:`~zoo.config.ModelConfig` fields of a Llama ``config.json`` dict.

    Reads what transformers 4.x wrote (``rope_theta``, ``rope_scaling``) and what 5.x
    writes (``rope_parameters``); absent optional keys take ``LlamaConfig``'s defaults.
    Token ids, dropout, ``pretraining_tp`` and the stored dtype do not change the
    function computed and are ignored.

    Raises:
        ValueError: a required key missing, or what the ``llama`` block does not implement
            (scaled rotary, partial rotary, another activation than SiLU, a ``head_dim``
            other than ``hidden_size / num_attention_heads``, biases on attention but not
            on the MLP or the reverse).
    """
    plain.check_required(hf, NAME)
    dim, heads = int(hf["hidden_size"]), int(hf["num_attention_heads"])

    rope = dict(hf.get("rope_parameters") or {})
    scaling = hf.get("rope_scaling") or {}
    # 5.x keeps the type in rope_parameters, 4.x in rope_scaling: neither may scale.
    types = (rope.get("rope_type", "default"), scaling.get("rope_type", scaling.get("type", "default")))
    scaled = [rope_type for rope_type in types if rope_type != "default"]
    if scaled:
        raise ValueError(
            f"config.json uses rope_type {scaled[0]!r}; the 'llama' block implements plain rotary "
            f"only (rope_type 'default', no rope scaling)"
        )
    partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise ValueError(f"config.json sets partial_rotary_factor={partial}; Llama rotates whole heads (1.0)")
    head_dim = hf.get("head_dim")
    if head_dim is not None and int(head_dim) * heads != dim:
        raise ValueError(
            f"config.json sets head_dim={head_dim}, but the 'llama' block's heads are "
            f"hidden_size / num_attention_heads = {dim // heads} wide"
        )
    act = hf.get("hidden_act", "silu")
    if act not in _SILU:
        raise ValueError(f"config.json has hidden_act {act!r}; the 'llama' block's SwiGLU uses silu")
    attention_bias, mlp_bias = bool(hf.get("attention_bias", False)), bool(hf.get("mlp_bias", False))
    if attention_bias != mlp_bias:
        raise ValueError(
            f"config.json sets attention_bias={attention_bias} and mlp_bias={mlp_bias}; the zoo "
            f"'llama' block has one bias switch for all linears and cannot express that mix"
        )
    kv_heads = int(hf.get("num_key_value_heads") or heads)
    mlp_dim = int(hf["intermediate_size"])
    return dict(
        vocab_size=int(hf["vocab_size"]),
        dim=dim,
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=None if kv_heads == heads else kv_heads,
        mlp_dim=None if mlp_dim == 4 * dim else mlp_dim,
        rotary_fraction=1.0,
        rotary_base=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tied_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bias=attention_bias,
        max_seq_len=int(hf.get("max_position_embeddings", 2048)),
        block="llama",
    )


def hf_config(config: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
    """The ``config.json`` dict of a Llama folder for ``config`` (5.x and 4.x rotary keys)."""
    dtype_name = str(dtype).removeprefix("torch.")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": MODEL_TYPE,
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim,
        "intermediate_size": config.hidden_dim,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.kv_heads,
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rotary_base},
        "rope_theta": config.rotary_base,
        "attention_bias": config.bias,
        "mlp_bias": config.bias,
        "tie_word_embeddings": config.tied_embeddings,
        "attention_dropout": 0.0,
        "dtype": dtype_name,
        "torch_dtype": dtype_name,
    }


def refusals(config: ModelConfig) -> list[str]:
    """Why ``config`` is not a plain Llama model (empty when it is one)."""
    reasons = plain.refusals(config, NAME, "llama")
    if config.rotary_fraction != 1.0:
        reasons.append(f"rotary_fraction={config.rotary_fraction} (Llama rotates whole heads: 1.0)")
    return reasons


# Tensors ----------------------------------------------------------------------------------


def _split(name: str, tensor: Tensor, config: ModelConfig) -> dict[str, Tensor]:
    """The Llama parts of the zoo tensor ``name`` (views); ``{"": tensor}`` for an unfused one."""
    if ".attn.qkv." in name:
        groups = rearrange(tensor, "(g j d) ... -> g j d ...", g=config.kv_heads, d=config.head_dim)
        return {
            "q": rearrange(groups[:, :-2], "g j d ... -> (g j d) ..."),
            "k": rearrange(groups[:, -2], "g d ... -> (g d) ..."),
            "v": rearrange(groups[:, -1], "g d ... -> (g d) ..."),
        }
    if ".mlp.fc_in." in name:
        gate, up = tensor.chunk(2, dim=0)
        return {"gate": gate, "up": up}
    return {"": tensor}


def _join(name: str, parts: dict[str, Tensor], config: ModelConfig) -> Tensor:
    """Inverse of :func:`_split`: the zoo tensor ``name`` from its Llama parts."""
    if ".attn.qkv." in name:
        g, d = config.kv_heads, config.head_dim
        q = rearrange(parts["q"], "(g j d) ... -> g j d ...", g=g, d=d)
        k = rearrange(parts["k"], "(g d) ... -> g 1 d ...", g=g)
        v = rearrange(parts["v"], "(g d) ... -> g 1 d ...", g=g)
        return rearrange(torch.cat((q, k, v), dim=1), "g j d ... -> (g j d) ...")
    if ".mlp.fc_in." in name:
        return torch.cat((parts["gate"], parts["up"]), dim=0)
    return parts[""]


def hf_tensors(tensors: dict[str, Tensor], config: ModelConfig) -> dict[str, Tensor]:
    """The zoo model's ``tensors`` as Llama tensors (fused ones split, all contiguous)."""
    out = {}
    for name, tensor in tensors.items():
        for part, value in _split(name, tensor, config).items():
            out[zoo_to_hf_name(name, part)] = value.contiguous()
    return out


@torch.no_grad()
def load(model: RecurrentLM, index: dict[str, StoredTensor], folder: Path, optional: list[str]) -> list[str]:
    """Loads the Llama tensors of ``index`` into ``model``; returns the absent ``optional`` names.

    Names and shapes are checked before any tensor is read, and every problem is reported
    in one error, under the checkpoint's own tensor names.

    Raises:
        ValueError: tensors that are not Llama weights, or missing, unexpected or
            mis-shaped ones (listed).
    """
    config = model.config
    targets = model_tensors(model)
    stored: dict[str, dict[str, StoredTensor]] = {}
    unknown = []
    for key, where in index.items():
        if plain.LEGACY_BUFFERS.search(key):
            continue
        mapped = hf_to_zoo_name(key)
        if mapped is None:
            unknown.append(key)
        elif not (mapped[0] == "head.weight" and config.tied_embeddings):  # transformers ignores it too
            stored.setdefault(mapped[0], {})[mapped[1]] = where
    if unknown:
        raise ValueError(f"{folder} holds tensors that are not Llama weights: {', '.join(sorted(unknown))}")

    missing, misshaped = [], []
    for name, target in targets.items():
        have = stored.get(name, {})
        if not have and name in optional:
            continue
        for part, view in _split(name, torch.empty(target.shape, device="meta"), config).items():
            if part not in have:
                missing.append(zoo_to_hf_name(name, part))
            elif have[part].shape != tuple(view.shape):
                misshaped.append(
                    f"{have[part].key}: stored {list(have[part].shape)}, model {list(view.shape)}"
                )
    unexpected = [w.key for name, parts in stored.items() if name not in targets for w in parts.values()]
    if missing or unexpected or misshaped:
        raise misfit(model, str(folder), sorted(missing), sorted(unexpected), sorted(misshaped))

    with contextlib.ExitStack() as stack:
        handles = {}
        for name, parts in stored.items():
            values = {}
            for part, where in parts.items():
                if where.file not in handles:
                    handles[where.file] = stack.enter_context(safe_open(str(where.file), framework="pt"))
                values[part] = handles[where.file].get_tensor(where.key)
            targets[name].copy_(_join(name, values, config))
    return sorted(name for name in targets if name not in stored)
