"""Normalisation layers: LayerNorm (GPT-NeoX) and RMSNorm (llama), both from ``torch.nn``."""

from __future__ import annotations

from torch import nn

__all__ = ["make_norm"]


def make_norm(kind: str, dim: int, eps: float, bias: bool = True) -> nn.Module:
    """``"layernorm"`` -> ``nn.LayerNorm`` (with bias when ``bias``), ``"rmsnorm"`` -> ``nn.RMSNorm``."""
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps, bias=bias)
    if kind == "rmsnorm":
        return nn.RMSNorm(dim, eps=eps)
    raise ValueError(f"unknown norm {kind!r}; valid norms: layernorm, rmsnorm")
