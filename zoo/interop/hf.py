"""Hugging Face GPT-NeoX (Pythia) checkpoints in and out.

:func:`from_hf` reads a local folder as transformers writes it (``config.json`` plus
``model.safetensors`` or a sharded ``model.safetensors.index.json``); :func:`to_hf` writes
a single-pass model back so that ``GPTNeoXForCausalLM.from_pretrained`` reproduces it.

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

Pickle weight files (``pytorch_model.bin``, ``*.pt``, ``*.pth``) are refused: unpickling
runs arbitrary code.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from zoo.build import build_model
from zoo.checkpoint import (
    StoredTensor,
    index_safetensors,
    is_hf_checkpoint,
    load_into,
    materialize,
    model_tensors,
    write_folder,
)
from zoo.config import ModelConfig, parse_hf_config
from zoo.model import RecurrentLM

__all__ = ["from_hf", "to_hf", "hf_config_to_fields", "hf_to_zoo_name", "zoo_to_hf_name"]

logger = logging.getLogger("zoo.interop")

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "pytorch_model.bin.index.json")

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
# Buffers that old GPT-NeoX checkpoints carry: a causal mask, its fill value, rotary
# frequencies. None is a weight; all are recomputed.
_LEGACY = re.compile(r"(^|\.)attention\.(bias|masked_bias)$|(^|\.)inv_freq$")


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


def hf_config_to_fields(hf: dict[str, Any]) -> dict[str, Any]:
    """:class:`~zoo.config.ModelConfig` fields of a GPT-NeoX ``config.json`` dict.

    Reads both what transformers 4.x wrote (``rotary_pct``, ``rotary_emb_base``) and what
    5.x writes (``rope_parameters: {rope_theta, partial_rotary_factor}``); absent optional
    keys take ``GPTNeoXConfig``'s defaults. The stored dtype (``torch_dtype``/``dtype``),
    dropout rates and token ids do not affect the architecture and are ignored.

    Raises:
        ValueError: not a GPT-NeoX config, a required key missing, or a feature this
            library does not implement (scaled rotary, non-GELU activation, no biases).
    """
    model_type = hf.get("model_type")
    if model_type != "gpt_neox":
        raise ValueError(
            f"config.json has model_type {model_type!r}; zoo.from_hf reads GPT-NeoX (Pythia) "
            f"checkpoints, model_type 'gpt_neox'"
        )
    required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    absent = [key for key in required if key not in hf]
    if absent:
        raise ValueError(f"config.json lacks required GPT-NeoX key(s) {absent}")

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


def _hf_config(config: ModelConfig, dtype: torch.dtype) -> dict[str, Any]:
    dtype_name = str(dtype).removeprefix("torch.")
    return {
        "architectures": ["GPTNeoXForCausalLM"],
        "model_type": "gpt_neox",
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


# Loading ----------------------------------------------------------------------------------


def _weight_files(folder: Path) -> list[Path]:
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{index} is not a valid safetensors index (no weight_map: {err})") from None
        return [folder / name for name in sorted(set(weight_map.values()))]
    single = folder / SAFETENSORS_FILE
    if single.is_file():
        return [single]
    pickles = sorted({p.name for pattern in PICKLE_PATTERNS for p in folder.glob(pattern)})
    if pickles:
        raise ValueError(
            f"{folder} holds only pickle weight files ({', '.join(pickles)}). Loading a pickle file "
            f"can execute arbitrary code, so zoo.from_hf reads safetensors only. Convert it where "
            f"you trust the file: load it with transformers "
            f"(GPTNeoXForCausalLM.from_pretrained(folder)) and write it back with "
            f"model.save_pretrained(folder, safe_serialization=True)"
        )
    raise FileNotFoundError(f"{folder} has neither {SAFETENSORS_FILE} nor {SAFETENSORS_INDEX}")


def _read_hf_config(folder: Path) -> dict[str, Any]:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder} has no config.json; a Hugging Face checkpoint folder needs one")
    try:
        data = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_file} is not valid JSON: {err}") from None
    if isinstance(data, dict) and data.get("format") == "ponder-zoo":
        raise ValueError(
            f"{folder} is a ponder-zoo checkpoint, not a Hugging Face one: load it with zoo.load"
        )
    if not isinstance(data, dict):
        raise ValueError(f"{config_file} must hold a JSON object")
    return parse_hf_config(data, config_file)


def from_hf(
    path: str | os.PathLike,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    **overrides: Any,
) -> RecurrentLM:
    """Loads a local Hugging Face GPT-NeoX (Pythia) checkpoint folder.

    Without overrides the result is exactly that model (``recurrence="none"``, one pass,
    ``embed_scale=1``). Overrides such as ``recurrence="ponder", passes=4,
    halting="mlp_gate", cache="kv_reuse"`` give a recurrent model initialised from the
    checkpoint, the start of continued pretraining; ``embed_scale`` stays 1 unless
    overridden (DESIGN.md section 2, decision 5). Parameters the checkpoint does not hold
    (a halting policy's gates) keep their fresh initialisation and are named in one INFO
    line of the ``zoo.interop`` logger.

    Args:
        path: a folder with ``config.json`` and ``model.safetensors`` (or a sharded
            ``model.safetensors.index.json``).
        device: where to put the model (default CPU).
        dtype: parameter dtype (default fp32); fp16/bf16 files are converted.
        **overrides: :class:`~zoo.config.ModelConfig` fields applied over the checkpoint's.

    Raises:
        FileNotFoundError: the folder, its ``config.json`` or its weights are missing.
        ValueError: pickle-only weights (refused), an unsupported config, unknown override
            fields, or tensors that are missing, unexpected or mis-shaped (listed).

    Example:
        >>> import tempfile, zoo
        >>> folder = zoo.to_hf(zoo.build("pythia-tiny"), tempfile.mkdtemp() + "/pythia-tiny-hf")
        >>> ada = zoo.from_hf(folder, recurrence="ponder", passes=4, halting="mlp_gate", cache="kv_reuse")
        >>> ada.config.embed_scale, ada.config.passes
        (1.0, 4)
    """
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"Hugging Face checkpoint folder {folder} does not exist")
    base = ModelConfig(**hf_config_to_fields(_read_hf_config(folder)))
    config = base.replace(**overrides)
    files = _weight_files(folder)
    stored = _map_names(index_safetensors(files), folder, config)

    model = materialize(build_model(config, device="meta", dtype=dtype or torch.float32), device)
    # Only a halting policy's parameters may be absent: any other gap is a mismatch.
    policy = [name for name in model_tensors(model) if name.startswith("halting.")]
    fresh = load_into(model, stored, source=str(folder), optional=policy)
    if fresh:
        model.halting.reset_parameters()
        logger.info("from_hf(%s): initialised fresh, not in the checkpoint: %s", folder, ", ".join(fresh))
    return model


def _map_names(index: dict[str, StoredTensor], folder: Path, config: ModelConfig) -> dict[str, StoredTensor]:
    stored: dict[str, StoredTensor] = {}
    unknown = []
    for key, where in index.items():
        if _LEGACY.search(key):
            continue
        name = hf_to_zoo_name(key)
        if name is None:
            unknown.append(key)
            continue
        if name == "head.weight" and config.tied_embeddings:
            # transformers ties the head to embed_in and ignores a stored copy; so do we.
            continue
        if name in stored:
            raise ValueError(f"{folder} stores {name!r} twice: as {stored[name].key!r} and as {key!r}")
        stored[name] = where
    if unknown:
        raise ValueError(
            f"{folder} holds tensors that are not GPT-NeoX weights: {', '.join(sorted(unknown))}"
        )
    return stored


# Writing ----------------------------------------------------------------------------------


def to_hf(model: RecurrentLM, path: str | os.PathLike, *, allow_other_files: bool = False) -> Path:
    """Writes a dense single-pass ``neox`` model as a Hugging Face GPT-NeoX folder.

    ``GPTNeoXForCausalLM.from_pretrained(path)`` then computes the same logits. The
    folder holds ``config.json`` (both the 4.x and 5.x rotary keys) and ``model.safetensors``
    in the model's dtype, written atomically.

    Args:
        model: a model with ``block="neox"``, ``recurrence="none"``, ``passes=1``,
            ``halting="none"``, ``embed_scale=1``, ``initial_embed_mult=1``, biases, and as
            many key/value heads as query heads.
        path: the output folder.
        allow_other_files: write beside files that are not these two (a ``tokenizer.json``,
            a ``README.md``); they are kept. Without it such a folder is refused, listed.

    Raises:
        ValueError: the model cannot be expressed as GPT-NeoX (the message says why), or the
            folder holds files this write may not replace or write beside
            (:func:`zoo.checkpoint.write_folder`).
    """
    if not isinstance(model, RecurrentLM):
        raise ValueError(f"zoo.to_hf expects a zoo RecurrentLM, got {type(model).__name__}")
    config = model.config
    reasons = []
    if config.block != "neox":
        reasons.append(f"block={config.block!r} (GPT-NeoX is the 'neox' block)")
    if config.recurrence != "none" or config.passes != 1:
        reasons.append(
            f"recurrence={config.recurrence!r} with passes={config.passes} (GPT-NeoX runs its stack once)"
        )
    if config.halting != "none":
        reasons.append(f"halting={config.halting!r} (GPT-NeoX has no halting policy or gate parameters)")
    if config.embed_scale != 1.0 or config.initial_embed_mult != 1.0:
        reasons.append(
            f"embed_scale={config.embed_scale} and initial_embed_mult={config.initial_embed_mult} "
            f"(GPT-NeoX does not scale its input embeddings; both must be 1)"
        )
    if not config.bias:
        reasons.append("bias=False (GPT-NeoX linears carry biases)")
    if config.kv_heads != config.num_heads:
        reasons.append(
            f"num_kv_heads={config.kv_heads} != num_heads={config.num_heads} (GPT-NeoX has no GQA)"
        )
    if reasons:
        raise ValueError("this model cannot be expressed as GPT-NeoX: " + "; ".join(reasons))

    tensors = {zoo_to_hf_name(n): t.detach().to("cpu").contiguous() for n, t in model_tensors(model).items()}
    dtype = model.embed.weight.dtype
    write_folder(
        path,
        {
            "config.json": lambda f: f.write_text(json.dumps(_hf_config(config, dtype), indent=2) + "\n"),
            SAFETENSORS_FILE: lambda f: save_file(tensors, f, metadata={"format": "pt"}),
        },
        writer="zoo.to_hf",
        owns=is_hf_checkpoint,
        allow_other_files=allow_other_files,
        conflicts=(SAFETENSORS_INDEX, "model-*-of-*.safetensors"),
    )
    return Path(path)
