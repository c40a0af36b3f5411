"""Normalisation layers: LayerNorm (GPT-NeoX) and RMSNorm (llama), both from ``torch.nn``."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["make_norm", "RMSNorm"]


class RMSNorm(nn.RMSNorm):
    """``nn.RMSNorm`` with Llama's rounding: normalise in fp32, cast, then scale.

    ``weight * (x / rms(x))`` where the normalisation runs in fp32 and its result is cast
    back to the input dtype before the weight multiplies it, as transformers'
    ``LlamaRMSNorm`` computes. In fp32 this is ``nn.RMSNorm``; in bf16 or fp16 the one
    extra rounding makes a Llama checkpoint's logits equal to transformers' rather than
    one rounding step apart.
    """

    def forward(self, x: Tensor) -> Tensor:
        return self.weight * F.rms_norm(x.float(), self.normalized_shape, eps=self.eps).to(x.dtype)


def make_norm(kind: str, dim: int, eps: float, bias: bool = True) -> nn.Module:
    """``"layernorm"`` -> ``nn.LayerNorm`` (with bias when ``bias``), ``"rmsnorm"`` -> :class:`RMSNorm`."""
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps, bias=bias)
    if kind == "rmsnorm":
        return RMSNorm(dim, eps=eps)
    raise ValueError(f"unknown norm {kind!r}; valid norms: layernorm, rmsnorm")
