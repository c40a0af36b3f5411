"""Preallocated key/value buffers and the view a selection of tokens has onto them.

Shape legend: B batch, B' selected rows, N slots per selected row, H_kv key/value heads,
D head dim, S buffer length, P passes.

Sparse execution and decoding compute a :class:`~zoo.layout.Selection` of tokens per pass.
Their keys and values live in buffers indexed by column (a token's place in the buffer),
written in place, never grown. The strategies combine these pieces:

* :class:`LayerBuffers`: one buffer per layer, shared by every pass (``kv_reuse``'s sparse
  forward; ``kv_share``'s sparse forward and decoding, where only pass 0 writes);
* :class:`PassBuffers`: one buffer per pass and layer (``kv_reuse`` and ``recompute``
  decoding), optionally carrying a chunk's entries from each pass into the next.
"""

from __future__ import annotations

import torch
from torch import Tensor

from zoo.caches.base import KV, KVStore, KVView, _rounded, padding_columns
from zoo.config import ModelConfig
from zoo.layout import Selection

__all__ = ["BufferView", "LayerBuffers", "PassBuffers", "column_padding"]


class BufferView(KVView):
    """One layer's view onto a key/value buffer for a pass over a :class:`~zoo.layout.Selection`.

    The selected tokens' new keys and values are written into the buffer (B, H_kv, S, D)
    at their columns (padding slots write back what was there); queries then attend over
    the buffer's first ``kv_len`` columns, each up to its own column.

    Layouts, from cheapest to most general:

    * a whole chunk starting at column 0 (prefill's first pass): plain causal attention over
      the new keys, which are also written to the buffer (or, read-only, over the buffer's
      first columns);
    * a whole chunk at a later column, eager (every decode step's first pass, and later
      passes while every row runs): the chunk is written as one slice; a single-token chunk
      attends over the buffer's prefix with no mask at all;
    * any selection (or any compiled pass): per-slot writes and a column mask.

    Args:
        buffers: the layer's (k, v) buffers.
        part: the tokens being computed.
        columns: (B', N) the column of each slot: where it writes, and up to where it reads.
        kv_len: columns to attend over (every slot's column is below it); ``None`` for the
            whole buffer (a constant shape, for compiled passes).
        writes: the slots write their keys and values. ``False``: the buffer already holds
            them (the layer projects queries only).
        slice_start: the column of slot 0 when the part is a whole chunk whose columns are
            ``slice_start + arange(N)`` in every row, else ``None``.
    """

    def __init__(
        self,
        buffers: KV,
        part: Selection,
        columns: Tensor,
        kv_len: int | None,
        writes: bool = True,
        slice_start: int | None = None,
    ) -> None:
        self.buffers = buffers
        self.columns = columns
        self.kv_len = kv_len
        self.projects_kv = writes
        self.slice_start = slice_start if part.full else None
        self.from_zero = self.slice_start == 0
        self.contiguous = self.slice_start is not None and kv_len is not None
        self.all_rows = part.all_rows
        self.rows = part.rows
        self.row_of_slot = part.slot_rows().contiguous()  # (B', N)
        self.valid = part.valid.contiguous()
        self.padded = part.padded

    def update(self, k: Tensor | None, v: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None, bool]:
        n = self.columns.shape[1]
        if self.from_zero:
            if not self.projects_kv:  # query t reads the keys of columns 0..t
                return self.buffers[0][:, :, :n], self.buffers[1][:, :, :n], None, True
            for buf, new in zip(self.buffers, (k, v)):
                buf[:, :, :n].copy_(new)
            return k, v, None, True
        if self.contiguous:
            out = []
            for buf, new in zip(self.buffers, (k, v)):
                if new is not None:
                    buf[:, :, self.slice_start : self.slice_start + n].copy_(new)
                out.append(buf[:, :, : self.kv_len])  # (B, H_kv, kv_len, D)
            if n == 1:  # one query per row sees every key written so far
                return out[0], out[1], None, False
            return out[0], out[1], self._mask(self.kv_len), False
        rows, valid = self.row_of_slot, self.valid[..., None, None]  # (B', N), (B', N, 1, 1)
        out = []
        for buf, new in zip(self.buffers, (k, v)):
            if new is not None:
                new = new.transpose(1, 2)  # (B', N, H_kv, D)
                if self.padded:  # padding slots write back what is there
                    new = torch.where(valid, new, buf[rows, :, self.columns])
                buf[rows, :, self.columns] = new
            rowbuf = buf if self.all_rows else buf[self.rows]
            out.append(rowbuf if self.kv_len is None else rowbuf[:, :, : self.kv_len])  # (B', H_kv, S, D)
        return out[0], out[1], self._mask(out[0].shape[2]), False

    def _mask(self, length: int) -> Tensor:
        key = torch.arange(length, device=self.columns.device)
        return (key <= self.columns[..., None])[:, None]  # (B', 1, N, length)


class LayerBuffers(KVStore):
    """One (k, v) buffer per layer, shared by every pass.

    A pass that writes overwrites its tokens' entries, so a halted token's entries stay
    those of its last pass (KV reuse without a copy); passes from ``writing_passes`` on
    only read. Memory: one dense key/value cache, ``layers * 2 * B * S * H_kv * D``
    elements.

    Args:
        config: the model config.
        batch: rows B.
        length: columns S.
        like: a tensor giving device and dtype.
        writing_passes: passes ``0 .. writing_passes - 1`` write (``None``: every pass).
        zeros: start from zeros (decoding reads columns no token wrote yet, under a mask);
            a single forward writes every column at its first pass, so it starts empty.
    """

    def __init__(
        self,
        config: ModelConfig,
        batch: int,
        length: int,
        like: Tensor,
        writing_passes: int | None = None,
        zeros: bool = False,
    ) -> None:
        shape = (batch, config.kv_heads, length, config.head_dim)
        make = like.new_zeros if zeros else like.new_empty
        self.layers: list[KV] = [(make(shape), make(shape)) for _ in range(config.num_layers)]
        self.writing_passes = writing_passes

    def views(self, index: int, part: Selection, active: Tensor) -> list[KVView | None]:
        writes = self.writing_passes is None or index < self.writing_passes
        kv_len = None if part.bucket else part.end
        columns = part.columns()
        return [BufferView(kv, part, columns, kv_len, writes, part.start) for kv in self.layers]

    def key_padding(self, part: Selection, padding: Tensor) -> Tensor:
        return column_padding(padding, part, self.layers[0][0].shape[2])

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for kv in self.layers for t in kv)


class PassBuffers(KVStore):
    """One preallocated key/value buffer per pass and layer, (B, H_kv, S, D) each.

    Pass ``i`` of a query at column ``t`` attends to every earlier token's keys and values
    *at pass i*. With ``carry``, a token that halted at pass ``j < i`` is seen with its
    pass-``j`` keys and values: at the start of pass ``i`` the chunk's entries of pass
    ``i - 1`` are copied into pass ``i``'s buffer, and the tokens that run pass ``i`` then
    overwrite theirs. A halted token's entries are so written to the later passes' buffers
    once, when it is decoded, and every later query reads them with no indirection.
    Memory: ``passes * layers * 2 * B * S * H_kv * D`` elements, ``S`` rounded up to a
    multiple of 8.

    Args:
        config: the model config (passes, layers, heads).
        batch: rows B.
        length: columns S; rounded up to a multiple of 8.
        like: a tensor giving device and dtype.
        carry: carry halted tokens' entries forward.
    """

    def __init__(self, config: ModelConfig, batch: int, length: int, like: Tensor, carry: bool) -> None:
        self.length = _rounded(length)
        shape = (batch, config.kv_heads, self.length, config.head_dim)
        self.carry = carry
        self.passes: list[list[KV]] = [
            [(like.new_zeros(shape), like.new_zeros(shape)) for _ in range(config.num_layers)]
            for _ in range(config.passes)
        ]

    def views(self, index: int, part: Selection, active: Tensor) -> list[KVView | None]:
        self.skip(index, part.start, part.end)
        kv_len = None if part.bucket else part.end
        columns = part.columns()
        return [BufferView(kv, part, columns, kv_len, True, part.start) for kv in self.passes[index]]

    def skip(self, index: int, start: int, end: int) -> None:
        if index > 0 and self.carry:
            for (k, v), (k_prev, v_prev) in zip(self.passes[index], self.passes[index - 1]):
                k[:, :, start:end].copy_(k_prev[:, :, start:end])
                v[:, :, start:end].copy_(v_prev[:, :, start:end])

    def key_padding(self, part: Selection, padding: Tensor) -> Tensor:
        return column_padding(padding, part, self.length)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layers in self.passes for kv in layers for t in kv)


def column_padding(padding: Tensor, part: Selection, length: int) -> Tensor:
    """(B', length) the padding flags of a buffer's columns, for the rows of ``part``."""
    return padding_columns(padding, 0, length)[part.rows]
