"""Causal self-attention with a fused, per-head QKV projection.

The fused weight is laid out as GPT-NeoX checkpoints store it: for each key/value head,
its query heads, then its key, then its value, ``[kv_heads, q_per_kv + 2, head_dim]``.
With ``kv_heads == num_heads`` this is GPT-NeoX's ``[heads, 3, head_dim]`` (not all Q,
then all K, then all V). Attention itself is ``F.scaled_dot_product_attention``.

What keys and values a query sees is decided by a :class:`~zoo.caches.base.KVView` that
the cache strategy hands in: fresh causal attention, keys of halted tokens carried from an
earlier pass, a preallocated cache written at the new tokens' columns, or the keys and
values of an earlier pass (the layer then projects queries only).
"""

from __future__ import annotations

import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from zoo.blocks.linear import Linear, linear
from zoo.blocks.rotary import apply_rotary
from zoo.caches.base import KVView

__all__ = ["Attention"]


class Attention(nn.Module):
    """Multi-head (or grouped-query) causal self-attention.

    Args:
        dim: model width.
        num_heads: query heads.
        kv_heads: key/value heads (divides ``num_heads``).
        rotary_dims: rotated dims per head.
        bias: projections carry biases.
    """

    def __init__(self, dim: int, num_heads: int, kv_heads: int, rotary_dims: int, bias: bool = True) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.kv_heads = kv_heads
        self.head_dim = dim // num_heads
        self.q_per_kv = num_heads // kv_heads
        self.rotary_dims = rotary_dims
        self.qkv = Linear(dim, (num_heads + 2 * kv_heads) * self.head_dim, bias=bias)
        self.proj = Linear(num_heads * self.head_dim, dim, bias=bias)

    def forward(
        self, x: Tensor, rope: tuple[Tensor, Tensor], kv: KVView | None = None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Attends ``x`` (B, T, dim) causally; returns the output and the (k, v) attended over."""
        cos, sin = rope
        if kv is not None and not kv.projects_kv:  # the view holds every key and value
            q = rearrange(self.project_queries(x), "b t (h d) -> b h t d", d=self.head_dim)  # (B, H, T, D)
            k, v, mask, causal = kv.update(None, None)
            q = apply_rotary(q, cos, sin)
        else:
            qkv = rearrange(
                self.qkv(x), "b t (g j d) -> b g j t d", j=self.q_per_kv + 2, d=self.head_dim
            )  # (B, H_kv, q_per_kv + 2, T, D)
            q = rearrange(qkv[:, :, : self.q_per_kv], "b g j t d -> b (g j) t d")  # (B, H, T, D)
            k, v = qkv[:, :, -2], qkv[:, :, -1]  # (B, H_kv, T, D)
            q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
            if kv is None:
                mask, causal = None, True
            else:
                k, v, mask, causal = kv.update(k, v)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=self.q_per_kv > 1
        )  # (B, H, T, D)
        return self.proj(rearrange(y, "b h t d -> b t (h d)")), (k, v)

    def project_queries(self, x: Tensor) -> Tensor:
        """The query part of the fused projection alone: (B, T, dim) -> (B, T, H * D)."""
        rows = rearrange(self.qkv.weight, "(g j d) i -> g j d i", j=self.q_per_kv + 2, d=self.head_dim)
        weight = rearrange(rows[:, : self.q_per_kv], "g j d i -> (g j d) i")  # (H * D, dim)
        bias = None
        if self.qkv.bias is not None:
            bias = rearrange(self.qkv.bias, "(g j d) -> g j d", j=self.q_per_kv + 2, d=self.head_dim)
            bias = rearrange(bias[:, : self.q_per_kv], "g j d -> (g j d)")
        return linear(x, weight, bias)
