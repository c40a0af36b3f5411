"""The cache-strategy interface: what halted tokens contribute to later passes."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

from torch import Tensor

from zoo.blocks.attention import KVView

__all__ = ["CacheStrategy"]

KV = tuple[Tensor, Tensor]


class CacheStrategy(ABC):
    """Decides which keys/values later passes see for halted tokens, and their outputs.

    Strategies hold no parameters; they turn the previous pass's keys/values and the
    current mask into one :class:`~zoo.blocks.attention.KVView` per layer.

    Class attributes:
        freezes: a halted token is frozen entirely (its K/V, hidden state and logits are
            those of its last active pass). Only such strategies allow sparse execution,
            where halted tokens are not computed at all.
    """

    freezes: ClassVar[bool] = False

    @abstractmethod
    def dense_views(self, index: int, previous: list[KV] | None, mask: Tensor) -> list[KVView | None]:
        """The per-layer views for dense pass ``index``.

        Args:
            index: the pass about to run.
            previous: per layer, the (k, v) the previous pass attended over (``None`` at pass 0).
            mask: ``m^index`` (B, T) bool, tokens active at this pass.
        """

    @abstractmethod
    def merge_hidden(self, hidden: Tensor, previous: Tensor | None, mask: Tensor) -> Tensor:
        """The pass's final-norm hidden states (B, T, d) as the strategy defines them."""
