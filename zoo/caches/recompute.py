"""``recompute``: halted tokens keep their frozen input but are run again every pass."""

from __future__ import annotations

from torch import Tensor

from zoo.blocks.attention import KVView
from zoo.caches.base import KV, CacheStrategy
from zoo.registry import CACHES

__all__ = ["Recompute"]


@CACHES.register("recompute")
class Recompute(CacheStrategy):
    """Full recompute: every token runs every pass.

    A halted token's input embedding stops changing (its pondering update is masked), but
    the whole sequence is recomputed each pass, so its keys and values follow the other
    tokens' new states and its output is the last pass's. Halting saves nothing here; it
    is the reference that :class:`~zoo.caches.kv_reuse.KVReuse` is compared with.
    """

    freezes = False

    def dense_views(self, index: int, previous: list[KV] | None, mask: Tensor) -> list[KVView | None]:
        return [None] * (len(previous) if previous is not None else 0)

    def merge_hidden(self, hidden: Tensor, previous: Tensor | None, mask: Tensor) -> Tensor:
        return hidden
