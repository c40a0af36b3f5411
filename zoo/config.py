"""The model configuration and the table of named presets.

A model is described entirely by one frozen :class:`ModelConfig`. Strategy choices
(block, recurrence, halting policy, cache strategy) are stored as registry names, so a
config round-trips through JSON (:meth:`ModelConfig.to_json` / :meth:`ModelConfig.from_json`).
Presets are registered in the ``model`` registry; :func:`preset` returns one with
overrides applied (litgpt's ``Config.from_name`` shape).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from zoo.registry import BLOCKS, CACHES, HALTING, MODELS, RECURRENCES

__all__ = [
    "ModelConfig",
    "preset",
    "parse_overrides",
    "parse_hf_config",
    "count_parameters",
    "check_memory",
    "check_model_size",
    "LIMITS",
    "MAX_BYTES_ENV",
    "PYTHIA_SHAPES",
]

LIMITS: dict[str, tuple[int, int]] = {
    "vocab_size": (1, 1 << 24),
    "dim": (1, 1 << 17),
    "num_layers": (1, 1024),
    "num_heads": (1, 1 << 12),
    "num_kv_heads": (1, 1 << 12),
    "mlp_dim": (1, 1 << 20),
    "max_seq_len": (1, 1 << 24),
    "passes": (1, 1024),
}
"""Inclusive bounds of every integer field of :class:`ModelConfig`.

They lie far above any published model (Llama 3.1 405B: 126 layers, width 16384, 128k
vocabulary) and far below what would take minutes or all memory to build before a check
could run. A config outside them is refused when it is created.
"""

MAX_BYTES_ENV = "PONDER_ZOO_MAX_MODEL_BYTES"
"""Environment variable that sets the ceiling of :func:`check_memory` in bytes (e.g. ``8e9``)."""

_INT_BOUNDS = LIMITS
_OPTIONAL = ("num_kv_heads", "mlp_dim")
_BOOLS = ("parallel_residual", "tied_embeddings", "bias")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_json_value(value: Any, where: str) -> None:
    """``value`` survives a JSON round trip unchanged: str keys, numbers, plain containers.

    Infinite numbers pass (Python's JSON writes and reads them back; a policy may take an
    infinite threshold and checks its own ranges); NaN, which equals nothing, does not.
    """
    if value is None or isinstance(value, (str, bool, int)):
        return
    if isinstance(value, float):
        if math.isnan(value):
            raise ValueError(f"{where} is NaN; use a number")
        return
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_json_value(item, f"{where}[{index}]")
        return
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ValueError(f"{where} has the key {key!r}; keys must be strings")
            _check_json_value(item, f"{where}[{key!r}]")
        return
    raise ValueError(
        f"{where} holds {value!r} of type {type(value).__name__}; use JSON values "
        f"(str, int, float, bool, None, lists and dicts of them)"
    )


@dataclass(frozen=True)
class ModelConfig:
    """Everything that defines a model's architecture and its adaptive-depth parts.

    Shapes (defaults are Pythia-70M):

    Attributes:
        vocab_size: rows of the embedding and the output head (Pythia pads 50277 to 50304).
        dim: model width ``d``.
        num_layers: layers in the block stack (one pass runs them all).
        num_heads: query heads.
        num_kv_heads: key/value heads (grouped-query attention); ``None`` means ``num_heads``.
        mlp_dim: hidden width of the MLP; ``None`` means ``4 * dim``.
        rotary_fraction: share of each head dimension that gets rotary embeddings (Pythia 0.25).
        rotary_base: rotary frequency base (Pythia 10000).
        norm_eps: epsilon of every normalisation layer.
        parallel_residual: ``neox`` wiring ``x + attn(ln1(x)) + mlp(ln2(x))``; ``False`` is sequential.
        tied_embeddings: the output head shares the input embedding matrix.
        bias: linear layers carry biases (Pythia yes, llama no).
        gelu_approximate: ``"none"`` (exact GELU, what the published configs and transformers use)
            or ``"tanh"`` (what Pythia was trained with).
        max_seq_len: longest sequence a forward accepts.
        block: name in the ``block`` registry (``"neox"``, ``"llama"``).

    Adaptive depth:

    Attributes:
        recurrence: name in the ``recurrence`` registry (``"none"``, ``"ponder"``, ``"loop"``).
        passes: backbone passes ``P`` (every pass counts, the final one too; PonderLM uses 4).
        halting: name in the ``halting`` registry.
        halting_kwargs: keyword arguments of the halting policy (see its docstring).
        cache: name in the ``cache`` registry (``"recompute"`` or ``"kv_reuse"``).
        embed_scale: ``c`` in ``E^0 = c * Embed(x)`` and in the pondering embedding
            ``softmax(Z) @ (c * Embed.weight)``; ``sqrt(d)`` for PonderLM trained from scratch,
            ``sqrt(2.5 d)`` for LoopTransformer, 1 for a model starting from Pythia weights.
        initial_embed_mult: extra factor on ``E^0`` only (PonderLM uses 3 for 410M, 1B, 1.4B).
        init_std: standard deviation of the truncated-normal initialisation; ``None`` means
            PonderLM's ``sqrt(2 / (5 d))``.
    """

    vocab_size: int = 50304
    dim: int = 512
    num_layers: int = 6
    num_heads: int = 8
    num_kv_heads: int | None = None
    mlp_dim: int | None = None
    rotary_fraction: float = 0.25
    rotary_base: float = 10000.0
    norm_eps: float = 1e-5
    parallel_residual: bool = True
    tied_embeddings: bool = False
    bias: bool = True
    gelu_approximate: str = "none"
    max_seq_len: int = 2048
    block: str = "neox"
    recurrence: str = "none"
    passes: int = 1
    halting: str = "none"
    halting_kwargs: dict[str, Any] = field(default_factory=dict)
    cache: str = "recompute"
    embed_scale: float = 1.0
    initial_embed_mult: float = 1.0
    init_std: float | None = None

    def __post_init__(self) -> None:
        for name, (low, high) in _INT_BOUNDS.items():
            value = getattr(self, name)
            if name in _OPTIONAL and value is None:
                continue
            if not _is_int(value) or not low <= value <= high:
                none = " or None" if name in _OPTIONAL else ""
                raise ValueError(
                    f"ModelConfig.{name} must be an int in [{low}, {high:,}]{none}, got {value!r}"
                )
        for name in _BOOLS:
            value = getattr(self, name)
            if not isinstance(value, bool):
                raise ValueError(f"ModelConfig.{name} must be true or false (a bool), got {value!r}")
        for name in ("rotary_base", "norm_eps", "embed_scale", "initial_embed_mult", "init_std"):
            value = getattr(self, name)
            if name == "init_std" and value is None:
                continue
            if not _is_real(value) or not math.isfinite(value) or not value > 0:
                none = " or None" if name == "init_std" else ""
                raise ValueError(f"ModelConfig.{name} must be a finite positive number{none}, got {value!r}")
        if not _is_real(self.rotary_fraction) or not 0.0 <= self.rotary_fraction <= 1.0:
            raise ValueError(f"ModelConfig.rotary_fraction must lie in [0, 1], got {self.rotary_fraction!r}")
        if self.dim % self.num_heads:
            raise ValueError(
                f"ModelConfig.dim ({self.dim}) must be divisible by num_heads ({self.num_heads})"
            )
        if self.num_heads % self.kv_heads:
            raise ValueError(
                f"ModelConfig.num_heads ({self.num_heads}) must be divisible by "
                f"num_kv_heads ({self.kv_heads})"
            )
        if self.rotary_dims % 2:
            raise ValueError(
                f"ModelConfig.rotary_fraction {self.rotary_fraction} gives {self.rotary_dims} rotary "
                f"dims of a head of {self.head_dim}; it must be even"
            )
        if self.gelu_approximate not in ("none", "tanh"):
            raise ValueError(
                f"ModelConfig.gelu_approximate must be 'none' or 'tanh', got {self.gelu_approximate!r}"
            )
        for name, registry in (
            ("block", BLOCKS),
            ("recurrence", RECURRENCES),
            ("halting", HALTING),
            ("cache", CACHES),
        ):
            value = getattr(self, name)
            if not isinstance(value, str) or value not in registry:
                raise ValueError(f"ModelConfig.{name}: {registry.unknown_message(value)}")
        if not isinstance(self.halting_kwargs, dict):
            raise ValueError(f"ModelConfig.halting_kwargs must be a dict, got {type(self.halting_kwargs).__name__}")
        _check_json_value(self.halting_kwargs, "ModelConfig.halting_kwargs")
        if self.recurrence == "none" and self.passes != 1:
            raise ValueError(
                f"ModelConfig.passes is {self.passes} but recurrence='none' runs exactly one pass; "
                f"set passes=1 or choose recurrence 'ponder' or 'loop'"
            )

    # Derived shapes -------------------------------------------------------------------

    @property
    def head_dim(self) -> int:
        """Width of one attention head, ``dim // num_heads``."""
        return self.dim // self.num_heads

    @property
    def kv_heads(self) -> int:
        """Key/value heads, ``num_kv_heads`` or ``num_heads``."""
        return self.num_kv_heads or self.num_heads

    @property
    def hidden_dim(self) -> int:
        """MLP hidden width, ``mlp_dim`` or ``4 * dim``."""
        return self.mlp_dim or 4 * self.dim

    @property
    def rotary_dims(self) -> int:
        """Leading dims of each head that are rotated (``int(head_dim * rotary_fraction)``, as GPT-NeoX)."""
        return int(self.head_dim * self.rotary_fraction)

    @property
    def std(self) -> float:
        """Initialisation standard deviation (PonderLM: ``sqrt(2 / (5 d))``)."""
        return self.init_std if self.init_std is not None else math.sqrt(2.0 / (5.0 * self.dim))

    # Serialisation ---------------------------------------------------------------------

    def replace(self, **overrides: Any) -> "ModelConfig":
        """A copy with ``overrides`` applied; unknown field names raise ``ValueError``."""
        _check_fields(overrides)
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict of every field."""
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        """The config as an indented JSON string."""
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ModelConfig":
        """Inverse of :meth:`to_dict`; unknown keys or values of the wrong type raise ``ValueError``."""
        if not isinstance(data, dict):
            raise ValueError(f"a ModelConfig is read from a JSON object, got {type(data).__name__}")
        _check_fields(data)
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        """Inverse of :meth:`to_json`."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"a ModelConfig must be JSON: {err}") from None
        return cls.from_dict(data)


def _check_fields(names: dict[str, Any]) -> None:
    valid = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(names) - valid)
    if unknown:
        import difflib

        hints = []
        for name in unknown:
            close = difflib.get_close_matches(name, sorted(valid), n=1)
            hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ValueError(
            f"unknown ModelConfig field(s): {', '.join(hints)}; valid fields: {', '.join(sorted(valid))}"
        )


# Presets ------------------------------------------------------------------------------

# Pythia shapes (EleutherAI/pythia models/*.yml): layers, dim, heads.
PYTHIA_SHAPES: dict[str, tuple[int, int, int]] = {
    "14m": (6, 128, 4),
    "31m": (6, 256, 8),
    "70m": (6, 512, 8),
    "160m": (12, 768, 12),
    "410m": (24, 1024, 16),
    "1b": (16, 2048, 8),
    "1.4b": (24, 2048, 16),
    "2.8b": (32, 2560, 32),
}

# A CPU-sized model for tests and the demo: the Pythia wiring at a toy width.
TINY_SHAPE = dict(vocab_size=512, num_layers=2, dim=64, num_heads=4, max_seq_len=256)

# PonderLM multiplies the initial embedding by the number of pondering steps at these sizes.
_PONDER_INITIAL_MULT = {"410m": 3.0, "1b": 3.0, "1.4b": 3.0}


def _pythia(size: str) -> dict[str, Any]:
    if size == "tiny":
        return dict(TINY_SHAPE)
    layers, dim, heads = PYTHIA_SHAPES[size]
    return dict(vocab_size=50304, num_layers=layers, dim=dim, num_heads=heads, max_seq_len=2048)


def _register_presets() -> None:
    for size in [*PYTHIA_SHAPES, "tiny"]:
        base = _pythia(size)
        dim = base["dim"]
        ponder = dict(
            recurrence="ponder",
            passes=4,
            embed_scale=math.sqrt(dim),
            initial_embed_mult=_PONDER_INITIAL_MULT.get(size, 1.0),
        )
        MODELS.add(f"pythia-{size}", dict(base))
        MODELS.add(f"ponder-pythia-{size}", dict(base, **ponder))
        MODELS.add(
            f"loop-pythia-{size}",
            dict(base, recurrence="loop", passes=4, embed_scale=math.sqrt(2.5 * dim)),
        )
        MODELS.add(
            f"adaponder-pythia-{size}",
            dict(base, **ponder, halting="mlp_gate", cache="kv_reuse"),
        )


_register_presets()


def preset(name: str, **overrides: Any) -> ModelConfig:
    """The config of the preset called ``name`` (exact names only) with ``overrides`` applied.

    Example:
        >>> preset("adaponder-pythia-70m").passes
        4
    """
    fields = dict(MODELS.get(name))
    _check_fields(overrides)
    fields.update(overrides)
    return ModelConfig(**fields)


# Command-line overrides -----------------------------------------------------------------


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """``ModelConfig`` overrides from ``FIELD=VALUE`` strings, as recipes take them on the command line.

    A value is plain text or JSON: ``dim=128``, ``halting=act`` (a string field takes the
    text as it is), ``norm_eps=1e-6``, ``bias=false``, ``num_kv_heads=null``,
    ``halting_kwargs={"threshold": 0.01}``. Each value must have its field's type: an
    integer field refuses ``1.5`` and ``abc``, a number must be finite, a boolean is ``true``
    or ``false``, ``halting_kwargs`` a JSON object. Ranges and the fields' relations are
    checked when the config is built (:class:`ModelConfig`).

    Args:
        items: ``FIELD=VALUE`` strings.

    Returns:
        ``{field: value}``, ready for :func:`preset` or :meth:`ModelConfig.replace`.

    Raises:
        ValueError: not ``FIELD=VALUE``, an unknown or repeated field, or a value of the wrong
            type; the message names the item and shows a valid one.

    Example:
        >>> parse_overrides(["dim=128", "halting=act", 'halting_kwargs={"threshold": 0.01}'])
        {'dim': 128, 'halting': 'act', 'halting_kwargs': {'threshold': 0.01}}
    """
    hints = typing.get_type_hints(ModelConfig)
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)}
    out: dict[str, Any] = {}
    for item in items:
        name, sep, text = str(item).partition("=")
        name, text = name.strip(), text.strip()
        if not sep or not name:
            raise ValueError(f"override {item!r} is not FIELD=VALUE; write e.g. dim=128 or halting=act")
        _check_fields({name: None})
        if name in out:
            raise ValueError(f"override {item!r}: {name} is given twice; give each field once")
        out[name] = _parse_value(name, text, hints[name], defaults[name], item)
    return out


def _parse_value(name: str, text: str, hint: Any, default: Any, item: str) -> Any:
    args = typing.get_args(hint)
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), hint) if args and optional else hint
    base = typing.get_origin(base) or base
    if optional and text in ("null", "None", "none"):
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        value, problem = _NOT_JSON, f"{err.msg} at column {err.colno}"
    example = json.dumps(default) if default not in (None, dataclasses.MISSING) and base is not dict else None
    if base is str:
        return value if isinstance(value, str) else text
    if base is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"override {item!r}: {name} takes true or false (lower case), not {text!r}")
    if base is int:
        if _is_int(value):
            return value
        null = " or null" if optional else ""
        raise ValueError(
            f"override {item!r}: {name} takes an integer{null} (e.g. {name}={example or 128}), not {text!r}"
        )
    if base is float:
        if value is _NOT_JSON:
            with contextlib.suppress(ValueError):
                value = float(text)  # forms JSON lacks, such as .5 or 1.
        if _is_real(value) and math.isfinite(value):
            return float(value)
        null = " or null" if optional else ""
        raise ValueError(
            f"override {item!r}: {name} takes a finite number{null} (e.g. {name}={example or 1.0}), "
            f"not {text!r}"
        )
    if base is dict:
        if isinstance(value, dict):
            return value
        why = f" ({problem})" if value is _NOT_JSON else f" (it reads as {type(value).__name__})"
        raise ValueError(
            f"override {item!r}: {name} takes a JSON object{why}; write it with double-quoted keys "
            f"and quote it for the shell, e.g. '{name}={{\"threshold\": 0.01}}'"
        )
    raise TypeError(f"ModelConfig.{name} has a type ({hint}) that overrides cannot parse")


_NOT_JSON = object()


# Hugging Face config.json ---------------------------------------------------------------

# Hugging Face keys checked by parse_hf_config: the integer ones take ModelConfig's bounds.
_HF_INTS = {
    "vocab_size": "vocab_size",
    "hidden_size": "dim",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads",
    "num_key_value_heads": "num_kv_heads",
    "intermediate_size": "mlp_dim",
    "max_position_embeddings": "max_seq_len",
    "head_dim": "dim",
}
_HF_NULLABLE = ("num_key_value_heads", "head_dim", "rope_scaling")
_HF_POSITIVE = ("layer_norm_eps", "rms_norm_eps", "rotary_emb_base", "rope_theta")
_HF_FRACTIONS = ("rotary_pct", "partial_rotary_factor")
_HF_BOOLS = ("use_parallel_residual", "tie_word_embeddings", "attention_bias", "mlp_bias")
_HF_STRINGS = ("model_type", "hidden_act", "rope_type", "type")
_HF_DICTS = ("rope_parameters", "rope_scaling")


def parse_hf_config(data: dict[str, Any], source: str | os.PathLike) -> dict[str, Any]:
    """Checks the architecture keys of a Hugging Face ``config.json`` dict, strictly, before use.

    Integer keys (``hidden_size``, ``num_hidden_layers``, ``vocab_size``, ...) must be
    integers within :data:`LIMITS`; epsilons and rotary bases finite positive numbers;
    rotary fractions in [0, 1]; switches (``tie_word_embeddings``, ``use_parallel_residual``,
    ...) JSON booleans, so ``"false"`` is refused instead of reading as true; names
    strings; ``rope_parameters`` is checked inside. Absent keys and keys that do not shape
    the model (token ids, dropout, dtype) are left alone.

    Args:
        data: the parsed ``config.json``.
        source: the file, named in every error.

    Returns:
        ``data``, unchanged.

    Raises:
        ValueError: a value of the wrong type or outside its bounds; the message names the
            file, the key and the value.

    Example:
        >>> parse_hf_config({"hidden_size": 64, "tie_word_embeddings": False}, "config.json")["hidden_size"]
        64
        >>> parse_hf_config({"tie_word_embeddings": "false"}, "config.json")
        Traceback (most recent call last):
        ...
        ValueError: config.json: tie_word_embeddings must be true or false (a JSON boolean), got 'false'
    """
    if not isinstance(data, dict):
        raise ValueError(f"{source} must hold a JSON object, got {type(data).__name__}")
    for key, value in data.items():
        _check_hf_value(key, value, source)
        if key in _HF_DICTS and isinstance(value, dict):
            for inner, item in value.items():
                _check_hf_value(inner, item, source, f"{key}.")
    return data


def _check_hf_value(key: str, value: Any, source: Any, prefix: str = "") -> None:
    where = f"{source}: {prefix}{key}"
    if value is None and key in _HF_NULLABLE:
        return
    if key in _HF_INTS:
        low, high = LIMITS[_HF_INTS[key]]
        if not _is_int(value) or not low <= value <= high:
            raise ValueError(f"{where} must be an integer in [{low}, {high:,}], got {value!r}")
    elif key in _HF_POSITIVE:
        if not _is_real(value) or not math.isfinite(value) or not value > 0:
            raise ValueError(f"{where} must be a finite positive number, got {value!r}")
    elif key in _HF_FRACTIONS:
        if not _is_real(value) or not 0 <= value <= 1:
            raise ValueError(f"{where} must be a number in [0, 1], got {value!r}")
    elif key in _HF_BOOLS:
        if not isinstance(value, bool):
            raise ValueError(f"{where} must be true or false (a JSON boolean), got {value!r}")
    elif key in _HF_STRINGS:
        if not isinstance(value, str):
            raise ValueError(f"{where} must be a string, got {value!r}")
    elif key in _HF_DICTS and not isinstance(value, dict):
        raise ValueError(f"{where} must be a JSON object, got {value!r}")


# Size before memory ---------------------------------------------------------------------


def count_parameters(config: ModelConfig) -> int:
    """Exact number of values the model of ``config`` stores (parameters and persistent
    buffers, tied tensors once), found without allocating it.

    One layer is built on the meta device and counted ``num_layers`` times, so even a
    config far too large for the machine is counted in milliseconds.

    Example:
        >>> count_parameters(preset("pythia-70m"))
        70426624
    """
    from zoo.build import build_model  # the builder imports this module

    one = build_model(config.replace(num_layers=1), device="meta")
    return _stored_numel(one) + (config.num_layers - 1) * _stored_numel(one.layers[0])


def check_model_size(config: ModelConfig, dtype: Any = None, device: Any = None) -> None:
    """:func:`check_memory` for the model of ``config``, before it is built.

    A generous closed-form bound on the size (every block and policy of this library stays
    below it) clears ordinary models at once; only a model whose bound comes near the
    ceiling is counted exactly (:func:`count_parameters`).

    Raises:
        ValueError: the model is larger than the memory ceiling.
    """
    import torch

    if device is not None and torch.device(device).type == "meta":
        return
    itemsize = (dtype or torch.get_default_dtype()).itemsize
    limit, _ = _memory_ceiling(torch.device(device if device is not None else "cpu"))
    if 4 * _size_bound(config) * itemsize <= limit:
        return
    check_memory(count_parameters(config), dtype, device, config=config)


def _size_bound(config: ModelConfig) -> int:
    """An upper bound of :func:`count_parameters` for this library's blocks and policies:
    embedding and head, per layer attention (<= 4 d^2), MLP (<= 3 d h), norms and biases,
    per pass a gate MLP (d -> 4d -> 1)."""
    d, h, v = config.dim, config.hidden_dim, config.vocab_size
    layer = 4 * d * d + 3 * d * h + 8 * d + 2 * h
    return 2 * v * d + config.num_layers * layer + config.passes * (4 * d * d + 9 * d + 1)


def _stored_numel(module: Any) -> int:
    persistent = set(module.state_dict())
    seen, total = set(), 0
    tensors = list(module.named_parameters()) + [(n, b) for n, b in module.named_buffers() if n in persistent]
    for _, tensor in tensors:
        if id(tensor) not in seen:
            seen.add(id(tensor))
            total += tensor.numel()
    return total


def check_memory(
    values: int, dtype: Any, device: Any, *, source: str = "the model", config: ModelConfig | None = None
) -> None:
    """Refuses to allocate ``values`` tensor values of ``dtype`` on ``device`` above the ceiling.

    The ceiling is the environment variable :data:`MAX_BYTES_ENV` (bytes, e.g. ``8e9``) if
    set, else the device's memory (physical memory for the CPU, the GPU's total memory for
    CUDA). Nothing is checked for the meta device, which allocates nothing.

    Args:
        values: tensor values to allocate (:func:`count_parameters`).
        dtype: their ``torch.dtype`` (``None``: torch's default).
        device: where they would go (``None``: the CPU).
        source: what is being built, for the message (a file or preset).
        config: the config, whose shape the message then quotes.

    Raises:
        ValueError: the size exceeds the ceiling; the message gives the size, the ceiling
            and how to raise it.
    """
    import torch

    device = torch.device(device if device is not None else "cpu")
    if device.type == "meta":
        return
    dtype = dtype or torch.get_default_dtype()
    size = values * dtype.itemsize
    limit, what = _memory_ceiling(device)
    if size <= limit:
        return
    shape = ""
    if config is not None:
        shape = (
            f" (num_layers={config.num_layers}, dim={config.dim}, vocab_size={config.vocab_size}, "
            f"mlp_dim={config.hidden_dim})"
        )
    raise ValueError(
        f"{source}{shape} has {values:,} values, {size / 2**30:,.1f} GiB in {dtype}, more than "
        f"{what} ({limit / 2**30:,.1f} GiB); check the config's sizes, load it on device='meta' to "
        f"inspect it, or set {MAX_BYTES_ENV} to a larger number of bytes"
    )


def _memory_ceiling(device: Any) -> tuple[float, str]:
    import torch

    text = os.environ.get(MAX_BYTES_ENV)
    if text:
        try:
            limit = float(text)
        except ValueError:
            limit = float("nan")
        if not (math.isfinite(limit) and limit > 0):
            raise ValueError(f"{MAX_BYTES_ENV}={text!r} must be a positive number of bytes, e.g. 8e9")
        return limit, f"the ceiling {MAX_BYTES_ENV}={text}"
    if device.type == "cuda" and torch.cuda.is_available():
        index = device.index if device.index is not None else torch.cuda.current_device()
        return float(torch.cuda.get_device_properties(index).total_memory), f"the memory of {device}"
    with contextlib.suppress(ValueError, OSError, AttributeError):
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")), "this machine's memory"
    return float("inf"), "no ceiling"
