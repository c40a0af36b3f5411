"""The per-pass key/value cache of incremental decoding."""

from __future__ import annotations

import torch
from torch import Tensor

from zoo.config import ModelConfig

__all__ = ["DecodeCache", "decode_cache_bytes"]

KV = tuple[Tensor, Tensor]


def decode_cache_bytes(config: ModelConfig, batch: int, length: int, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of a :class:`DecodeCache`: ``passes * layers * 2 * batch * length * kv_heads * head_dim * itemsize``."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return config.passes * config.num_layers * 2 * batch * length * config.kv_heads * config.head_dim * itemsize


class DecodeCache:
    """One preallocated key/value cache per pass and layer, (B, H_kv, S, D) each.

    Pass ``i`` of a query at position ``t`` attends to every earlier token's keys and values
    *at pass i*, which for a token that halted at pass ``j < i`` are those of pass ``j``.
    :meth:`begin_pass` therefore first carries the chunk's entries of pass ``i - 1`` into
    pass ``i``'s cache; the tokens that run pass ``i`` then overwrite theirs. A halted
    token's keys and values are so written to the later passes' caches once, when it is
    decoded, and every later query reads them with no indirection.

    Args:
        config: the model config (passes, layers, heads).
        batch: rows B.
        length: positions S; rounded up to a multiple of 8.
        like: a tensor giving device and dtype (the embedding weight).
        carry: carry halted tokens' entries forward (the cache strategy freezes them).
    """

    def __init__(self, config: ModelConfig, batch: int, length: int, like: Tensor, carry: bool = True) -> None:
        self.length = -(-length // 8) * 8
        shape = (batch, config.kv_heads, self.length, config.head_dim)
        self.carry = carry
        self.passes: list[list[KV]] = [
            [(like.new_zeros(shape), like.new_zeros(shape)) for _ in range(config.num_layers)]
            for _ in range(config.passes)
        ]

    def begin_pass(self, index: int, start: int, end: int) -> list[KV]:
        """The per-layer buffers of pass ``index``, with positions ``[start, end)`` carried in."""
        if index > 0 and self.carry:
            for (k, v), (k_prev, v_prev) in zip(self.passes[index], self.passes[index - 1]):
                k[:, :, start:end].copy_(k_prev[:, :, start:end])
                v[:, :, start:end].copy_(v_prev[:, :, start:end])
        return self.passes[index]

    def nbytes(self) -> int:
        """Bytes held by the cache."""
        return sum(t.numel() * t.element_size() for layers in self.passes for kv in layers for t in kv)
