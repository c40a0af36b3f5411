"""``kv_reuse``: halted tokens are frozen and their keys and values carried forward."""

from __future__ import annotations

import torch
from torch import Tensor

from zoo.caches.base import CacheStrategy, KVStore, KVView, PerLayer
from zoo.caches.buffers import LayerBuffers, PassBuffers
from zoo.config import ModelConfig
from zoo.registry import CACHES

__all__ = ["KVReuse", "CarriedKV", "Carried"]


@CACHES.register("kv_reuse")
class KVReuse(CacheStrategy):
    """KV reuse ("KV alignment", AdaPonderLM, arXiv 2603.01914).

    At every layer of pass ``i`` the keys and values of halted tokens are those of their last
    active pass, ``K~^i = where(m^i, K^i, K~^{i-1})``. This library also freezes the halted
    token's final hidden state (and so its logits), so that a halted token contributes
    nothing new: dense training and sparse inference then compute the same numbers, and
    sparse execution can skip halted tokens entirely.

    Storage, by execution:

    * dense: the previous pass's keys and values of every layer, merged with ``where``
      (:class:`Carried`);
    * sparse: one buffer per layer shared by the passes, where running tokens overwrite
      their entries (:class:`~zoo.caches.buffers.LayerBuffers`): one dense cache;
    * decode: one buffer per pass, a halted token's entries carried into the later passes'
      buffers once (:class:`~zoo.caches.buffers.PassBuffers`):
      ``passes * layers * 2 * B * S * H_kv * D`` elements.
    """

    freezes = True

    def store(self, execution: str, config: ModelConfig, batch: int, length: int, like: Tensor) -> KVStore:
        if execution == "dense":
            return Carried(config.num_layers)
        if execution == "sparse":
            return LayerBuffers(config, batch, length, like)
        return PassBuffers(config, batch, length, like, carry=True)


class Carried(PerLayer):
    """Dense storage: per layer, the (k, v) the previous pass attended over.

    Args:
        num_layers: layers of the block stack.
    """

    def view(self, index: int, layer: int, active: Tensor) -> KVView:
        return CarriedKV(self, layer, active)


class CarriedKV(KVView):
    """Dense view for one layer: ``K~^i = where(m^i, K^i, K~^{i-1})`` (same for V).

    Args:
        store: the :class:`Carried` keys and values (the previous pass's, or none yet).
        layer: the layer's index in the store.
        active: ``m^i`` (B, T) bool.
    """

    def __init__(self, store: Carried, layer: int, active: Tensor) -> None:
        self.store = store
        self.layer = layer
        self.keep = active[:, None, :, None]  # (B, 1, T, 1)
        # Read when the pass starts, so that running the pass again (activation
        # checkpointing recomputes it in backward) merges with the same keys.
        self.previous = store.kv[layer]

    def update(self, k: Tensor | None, v: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None, bool]:
        previous = self.previous
        if previous is not None:
            k, v = torch.where(self.keep, k, previous[0]), torch.where(self.keep, v, previous[1])
        self.store.kv[self.layer] = (k, v)
        return k, v, None, True
