"""The model configuration and the table of named presets.

A model is described entirely by one frozen :class:`ModelConfig`. Strategy choices
(block, recurrence, halting policy, cache strategy) are stored as registry names, so a
config round-trips through JSON (:meth:`ModelConfig.to_json` / :meth:`ModelConfig.from_json`).
Presets are registered in the ``model`` registry; :func:`preset` returns one with
overrides applied (litgpt's ``Config.from_name`` shape).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from typing import Any

from zoo.registry import BLOCKS, CACHES, HALTING, MODELS, RECURRENCES

__all__ = ["ModelConfig", "preset", "PYTHIA_SHAPES"]


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
        for name in ("vocab_size", "dim", "num_layers", "num_heads", "max_seq_len", "passes"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        for name in ("num_kv_heads", "mlp_dim"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"ModelConfig.{name} must be a positive int or None, got {value!r}")
        if self.dim % self.num_heads:
            raise ValueError(
                f"ModelConfig.dim ({self.dim}) must be divisible by num_heads ({self.num_heads})"
            )
        if self.num_heads % self.kv_heads:
            raise ValueError(
                f"ModelConfig.num_heads ({self.num_heads}) must be divisible by "
                f"num_kv_heads ({self.kv_heads})"
            )
        if not 0.0 <= self.rotary_fraction <= 1.0:
            raise ValueError(f"ModelConfig.rotary_fraction must lie in [0, 1], got {self.rotary_fraction!r}")
        if self.rotary_dims % 2:
            raise ValueError(
                f"ModelConfig.rotary_fraction {self.rotary_fraction} gives {self.rotary_dims} rotary "
                f"dims of a head of {self.head_dim}; it must be even"
            )
        for name in ("rotary_base", "norm_eps", "embed_scale", "initial_embed_mult"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"ModelConfig.{name} must be a positive number, got {value!r}")
        if self.init_std is not None and not self.init_std > 0:
            raise ValueError(f"ModelConfig.init_std must be positive or None, got {self.init_std!r}")
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
            if value not in registry:
                raise ValueError(f"ModelConfig.{name}: {registry.unknown_message(value)}")
        if not isinstance(self.halting_kwargs, dict):
            raise ValueError(f"ModelConfig.halting_kwargs must be a dict, got {type(self.halting_kwargs).__name__}")
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
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError``."""
        _check_fields(data)
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> "ModelConfig":
        """Inverse of :meth:`to_json`."""
        return cls.from_dict(json.loads(text))


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


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["dim=128", "halting=act", 'halting_kwargs={"ratio": 0.3}']`` as a dict of fields.

    Values are JSON when they parse as JSON, plain strings otherwise.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not FIELD=VALUE")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out
