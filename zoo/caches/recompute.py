"""``recompute``: halted tokens keep their frozen input but are run again every pass."""

from __future__ import annotations

from torch import Tensor

from zoo.caches.base import CacheStrategy, KVStore, KVView
from zoo.caches.buffers import LayerBuffers, PassBuffers
from zoo.config import ModelConfig
from zoo.layout import Layout
from zoo.registry import CACHES

__all__ = ["Recompute", "Fresh"]


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


class Fresh(KVStore):
    """Plain causal attention over each pass's own keys and values; nothing is kept.

    Args:
        num_layers: layers of the block stack.
    """

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers

    def views(self, index: int, part: Layout, active: Tensor) -> list[KVView | None]:
        return [None] * self.num_layers
