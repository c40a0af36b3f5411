"""``recursion_wise``: at pass i, attention reads only the tokens that run pass i (Mixture-of-Recursions)."""

from __future__ import annotations

import torch
from torch import Tensor

from zoo.caches.base import KV, CacheStrategy, Fresh, KVStore, KVView, PassWork, _rounded
from zoo.caches.buffers import BufferView
from zoo.config import ModelConfig
from zoo.layout import Layout, Selection
from zoo.registry import CACHES

__all__ = ["RecursionWise", "ActiveKeys", "PackedBuffers"]


@CACHES.register("recursion_wise")
class RecursionWise(CacheStrategy):
    """Recursion-wise caching (Mixture-of-Recursions, Bae et al., arXiv 2507.10524).

    At pass ``i`` a query attends only to the keys and values of the tokens that run pass
    ``i``, computed at pass ``i``; a halted token is no longer seen at all::

        attention^i(t) = softmax over { j <= t : m^i_j = 1 } of q^i_t . k^i_j

    A halted token is frozen (its hidden state and logits those of its last active pass),
    so sparse execution and decoding skip it. Storage, by execution:

    * dense: an attention mask per pass, causal and restricted to the running keys
      (:class:`ActiveKeys`);
    * sparse: nothing at all (:class:`~zoo.caches.base.Fresh`): a
      :class:`~zoo.layout.Selection` lists each row's running tokens first, in position
      order, and padding after them, so plain causal attention over the gathered slots is
      attention over the running tokens up to each query: pass ``i`` costs attention over
      its own tokens only;
    * decode: per pass, the keys and values of the tokens that ran it, packed per row in
      position order (:class:`PackedBuffers`). Pass ``i``'s buffer holds
      ``C_i = max_b n_i(b) + M`` entries per row, ``n_i(b)`` the prompt tokens of row
      ``b`` that ran pass ``i`` and ``M`` the positions left for new tokens.

    With nothing halted it is ``recompute`` (every token runs every pass); with halting,
    attention at later passes costs less, which :mod:`zoo.flops` counts.
    """

    freezes = True

    def store(self, execution: str, config: ModelConfig, batch: int, length: int, like: Tensor) -> KVStore:
        if execution == "dense":
            return ActiveKeysStore(config.num_layers)
        if execution == "sparse":  # the gathered tokens attend causally among themselves
            return Fresh(config.num_layers)
        return PackedBuffers(config, batch, length, like)

    def work(self, depth: Tensor, index: int) -> PassWork:
        """A running query at position ``t`` attends to the running keys at ``0..t``."""
        runs = depth > index  # (..., T)
        keys = runs * runs.cumsum(-1)  # running keys up to and including each running query
        queries = int(runs.sum())
        return PassWork(queries, queries, int(keys.sum()))


class ActiveKeysStore(Fresh):
    """Dense storage: no keys are kept, only the mask of the running ones per pass.

    Args:
        num_layers: layers of the block stack.
    """

    def views(self, index: int, part: Layout, active: Tensor) -> list[KVView | None]:
        if index == 0:  # every token runs pass 0: plain causal attention
            return super().views(index, part, active)
        return [ActiveKeys(active)] * self.num_layers


class ActiveKeys(KVView):
    """Dense view: each query attends to the running keys up to its position.

    Tokens that do not run the pass are still computed in dense execution (and their
    results discarded); they attend to their own key too, so that no row of the mask is
    empty.

    Args:
        active: ``m^i`` (B, T) bool.
    """

    def __init__(self, active: Tensor) -> None:
        T = active.shape[1]
        position = torch.arange(T, device=active.device)
        causal = position[None, :] <= position[:, None]  # (T, T) key <= query
        own = position[None, :] == position[:, None]
        self.mask = (causal & (active[:, None, :] | own))[:, None]  # (B, 1, T, T)

    def update(self, k: Tensor | None, v: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None, bool]:
        return k, v, self.mask, False


class PackedBuffers(KVStore):
    """Per pass and layer, the keys and values of the tokens that ran the pass, packed.

    Row ``b``'s entries of pass ``i`` sit at columns ``0 .. filled[i, b] - 1`` in position
    order; a chunk's running tokens are appended after them, and a query reads the
    entries up to its own column. A pass's buffers are allocated when a chunk first runs
    it, with room for that chunk's running tokens (the most of any row) and one entry per
    position still to come, so a prompt whose tokens halt early takes less memory.

    Args:
        config: the model config.
        batch: rows B.
        length: positions S of the whole decode (prompt and new tokens).
        like: a tensor giving device and dtype.
    """

    def __init__(self, config: ModelConfig, batch: int, length: int, like: Tensor) -> None:
        self.config = config
        self.length = length
        self.like = like
        self.passes: list[list[KV] | None] = [None] * config.passes
        self.filled = torch.zeros(config.passes, batch, dtype=torch.int64, device=like.device)

    def views(self, index: int, part: Selection, active: Tensor) -> list[KVView | None]:
        slots = part.index.shape[1]
        if self.passes[index] is None:
            capacity = _rounded(slots + self.length - part.end)
            shape = (part.batch, self.config.kv_heads, capacity, self.config.head_dim)
            like = self.like
            self.passes[index] = [(like.new_zeros(shape), like.new_zeros(shape)) for _ in range(self.config.num_layers)]
        filled = self.filled[index, part.rows]  # (B',)
        counts = part.valid.sum(1)
        columns = filled[:, None] + torch.arange(slots, device=filled.device)  # (B', N)
        kv_len = None if part.bucket else int((filled + counts).max())
        slice_start = None
        if part.full and bool((filled == filled[0]).all()):
            slice_start = int(filled[0])
        self.filled[index, part.rows] = filled + counts
        return [BufferView(kv, part, columns, kv_len, True, slice_start) for kv in self.passes[index]]

    def key_padding(self, part: Selection, padding: Tensor) -> None:
        """Padding tokens run no pass, so they are never among a pass's packed keys."""
        return None

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layers in self.passes if layers for kv in layers for t in kv)
