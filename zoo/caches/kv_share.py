"""``kv_share``: every pass attends to the keys and values of pass 0 (Mixture-of-Recursions)."""

from __future__ import annotations

import torch
from torch import Tensor

from zoo.caches.base import CacheStrategy, KVStore, KVView, PassWork, PerLayer, _rounded, causal_positions, kv_bytes
from zoo.caches.buffers import LayerBuffers
from zoo.config import ModelConfig
from zoo.registry import CACHES

__all__ = ["KVShare", "SharedKV", "FirstPass"]


@CACHES.register("kv_share")
class KVShare(CacheStrategy):
    """Recursion-wise KV sharing (Mixture-of-Recursions, Bae et al., arXiv 2507.10524).

    Every token runs pass 0, which projects and stores the keys and values of every layer;
    later passes reuse them and project queries only::

        pass 0:   K^0, V^0 = proj(H)          attention(Q^0, K^0, V^0)
        pass i:   attention(Q^i, K^0, V^0)     i >= 1, the same layer's pass-0 keys and values

    Since no key or value changes after pass 0, a halted token contributes the same keys
    and values as a running one; it is frozen like under ``kv_reuse`` (its hidden state and
    logits those of its last active pass), so sparse execution and decoding skip it.

    Cost against ``kv_reuse``: later passes skip the key/value projections
    (``2 * d * H_kv * D`` multiply-accumulates per token and layer) and decoding keeps one
    key/value cache instead of one per pass: ``layers * 2 * B * S * H_kv * D`` elements,
    ``1 / passes`` of ``kv_reuse``'s. The keys of pass 0 never see the pondering, so the
    model is a different one: train it with this strategy.
    """

    freezes = True

    def store(self, execution: str, config: ModelConfig, batch: int, length: int, like: Tensor) -> KVStore:
        if execution == "dense":
            return FirstPass(config.num_layers)
        if execution == "sparse":
            return LayerBuffers(config, batch, length, like, writing_passes=1)
        return LayerBuffers(config, batch, _rounded(length), like, writing_passes=1, zeros=True)

    def decode_bytes(
        self, config: ModelConfig, batch: int, length: int, dtype: torch.dtype = torch.float32
    ) -> int:
        """One key/value cache, whatever the passes: ``layers * 2 * B * S * H_kv * D * itemsize``."""
        return kv_bytes(config, batch, _rounded(length), dtype)

    def work(self, depth: Tensor, index: int) -> PassWork:
        """Passes after the first project no keys or values."""
        runs = depth > index
        queries = int(runs.sum())
        return PassWork(queries, queries if index == 0 else 0, int((runs * causal_positions(depth)).sum()))


class FirstPass(PerLayer):
    """Dense storage: per layer, the (k, v) of pass 0.

    Args:
        num_layers: layers of the block stack.
    """

    def view(self, index: int, layer: int, active: Tensor) -> KVView:
        return SharedKV(self, layer, index == 0)


class SharedKV(KVView):
    """Dense view for one layer: pass 0 keeps its keys and values, later passes read them.

    Args:
        store: the :class:`FirstPass` keys and values.
        layer: the layer's index in the store.
        first: this is pass 0 (it projects and keeps keys and values).
    """

    def __init__(self, store: FirstPass, layer: int, first: bool) -> None:
        self.store = store
        self.layer = layer
        self.projects_kv = first
        # Read when the pass starts (pass 0 has run), so that a pass run again (activation
        # checkpointing recomputes it in backward) reads the same keys.
        self.first_kv = None if first else store.kv[layer]

    def update(self, k: Tensor | None, v: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None, bool]:
        if self.projects_kv:
            self.store.kv[self.layer] = (k, v)
            return k, v, None, True
        k, v = self.first_kv
        return k, v, None, True
