"""``kv_reuse``: halted tokens are frozen and their keys and values carried forward."""

from __future__ import annotations

import torch
from torch import Tensor

from zoo.blocks.attention import KVView
from zoo.caches.base import KV, CacheStrategy
from zoo.registry import CACHES

__all__ = ["KVReuse", "CarriedKV"]


class CarriedKV(KVView):
    """Dense view for one layer: ``K~^i = where(m^i, K^i, K~^{i-1})`` (same for V).

    Args:
        previous: (k, v) the layer attended over at the previous pass, (B, H_kv, T, D).
        mask: ``m^i`` (B, T) bool.
    """

    def __init__(self, previous: KV, mask: Tensor) -> None:
        self.previous = previous
        self.keep = mask[:, None, :, None]  # (B, 1, T, 1)

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor | None, bool]:
        k_prev, v_prev = self.previous
        return torch.where(self.keep, k, k_prev), torch.where(self.keep, v, v_prev), None, True


@CACHES.register("kv_reuse")
class KVReuse(CacheStrategy):
    """KV reuse ("KV alignment", AdaPonderLM, arXiv 2603.01914).

    At every layer of pass ``i`` the keys and values of halted tokens are those of their last
    active pass, ``K~^i = where(m^i, K^i, K~^{i-1})``. This library also freezes the halted
    token's final hidden state (and so its logits), so that a halted token contributes
    nothing new: dense training and sparse inference then compute the same numbers, and
    sparse execution can skip halted tokens entirely.
    """

    freezes = True

    def dense_views(self, index: int, previous: list[KV] | None, mask: Tensor) -> list[KVView | None]:
        if previous is None:
            return []
        return [CarriedKV(kv, mask) for kv in previous]

    def merge_hidden(self, hidden: Tensor, previous: Tensor | None, mask: Tensor) -> Tensor:
        if previous is None:
            return hidden
        return torch.where(mask[..., None], hidden, previous)
