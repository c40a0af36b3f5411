"""Causal self-attention with a fused, per-head QKV projection.

The fused weight is laid out as GPT-NeoX checkpoints store it: for each key/value head,
its query heads, then its key, then its value, ``[kv_heads, q_per_kv + 2, head_dim]``.
With ``kv_heads == num_heads`` this is GPT-NeoX's ``[heads, 3, head_dim]`` (not all Q,
then all K, then all V). Attention itself is ``F.scaled_dot_product_attention``.

What keys and values a query sees is decided by a :class:`KVView` that the cache strategy
hands in: fresh causal attention, keys of halted tokens carried from an earlier pass, or
a preallocated cache written at the new tokens' positions.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from zoo.blocks.rotary import apply_rotary

__all__ = ["Attention", "KVView"]


class KVView(ABC):
    """One layer's view of the keys and values for one pass (built by a cache strategy).

    ``update`` receives the keys and values just computed for the queries of this call and
    returns what to attend over: keys, values (B, H_kv, S, D), an optional boolean mask
    (True = attend) broadcastable to (B, H, T, S), and whether plain causal masking applies.
    """

    @abstractmethod
    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor | None, bool]:
        """Merges new keys/values (B, H_kv, T, D) into this view; returns (k, v, mask, is_causal)."""


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
        self.qkv = nn.Linear(dim, (num_heads + 2 * kv_heads) * self.head_dim, bias=bias)
        self.proj = nn.Linear(num_heads * self.head_dim, dim, bias=bias)

    def forward(
        self, x: Tensor, rope: tuple[Tensor, Tensor], kv: KVView | None = None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Attends ``x`` (B, T, dim) causally; returns the output and the (k, v) attended over."""
        qkv = rearrange(
            self.qkv(x), "b t (g j d) -> b g j t d", j=self.q_per_kv + 2, d=self.head_dim
        )  # (B, H_kv, q_per_kv + 2, T, D)
        q = rearrange(qkv[:, :, : self.q_per_kv], "b g j t d -> b (g j) t d")  # (B, H, T, D)
        k, v = qkv[:, :, -2], qkv[:, :, -1]  # (B, H_kv, T, D)
        cos, sin = rope
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if kv is None:
            mask, causal = None, True
        else:
            k, v, mask, causal = kv.update(k, v)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=self.q_per_kv > 1
        )  # (B, H, T, D)
        return self.proj(rearrange(y, "b h t d -> b t (h d)")), (k, v)
