"""``recompute``: halted tokens keep their frozen input but are run again every pass."""

from __future__ import annotations

from torch import Tensor

from zoo.caches.base import CacheStrategy, Fresh, KVStore
from zoo.caches.buffers import LayerBuffers, PassBuffers
from zoo.config import ModelConfig
from zoo.registry import CACHES

__all__ = ["Recompute"]


@CACHES.register("recompute")
class Recompute(CacheStrategy):
    """Full recompute: every token runs every pass.

    A halted token's input embedding stops changing (its pondering update is masked), but
    the whole sequence is recomputed each pass, so its keys and values follow the other
    tokens' new states and its output is the last pass's. Halting saves nothing here; it
    is the reference that :class:`~zoo.caches.kv_reuse.KVReuse` is compared with.

    Storage: nothing between the passes of a forward (each pass attends over its own fresh
    keys and values); in decoding one buffer per pass (:class:`~zoo.caches.buffers.PassBuffers`
    without carrying), since a new token at pass ``i`` attends to every earlier token's
    pass-``i`` keys and values. Memory: ``passes * layers * 2 * B * S * H_kv * D``.
    """

    freezes = False

    def store(self, execution: str, config: ModelConfig, batch: int, length: int, like: Tensor) -> KVStore:
        if execution == "dense":
            return Fresh(config.num_layers)
        if execution == "sparse":  # every token runs: one buffer, rewritten by every pass
            return LayerBuffers(config, batch, length, like)
        return PassBuffers(config, batch, length, like, carry=False)
