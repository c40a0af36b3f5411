"""Where the tokens a pass computes sit, and how its results go back to the chunk.

Shape legend: B batch, n tokens in the chunk, B' rows of a selection, N slots per row,
d width, V vocabulary.

The driver (:func:`zoo.recurrence.run_passes`) runs every pass over a *layout* of the
chunk's (B, n) tokens and commits the pass's results (hidden states, policy state, next
inputs, masks) back into (B, n) tensors. Two layouts serve every execution:

* :class:`Grid`, the identity: every token of the chunk is computed in place and a commit
  is a ``where`` (static shapes, no host synchronisation, autograd as usual). Dense
  execution and the compiled dense forward use it.
* :class:`Selection`: the tokens that run the pass are gathered from the whole batch into a
  (B', N) layout (rows that run nothing are dropped, shorter rows padded with slots marked
  invalid), and a commit scatters into the chunk's tensors in place. Sparse execution,
  prefill and every decode step use it (:func:`select` builds one).

Besides the slots a layout carries the *columns* of its tokens, where they sit in a
key/value buffer, and their *positions*, what rotary embeddings and policies read; here
both are ``start + t`` for the chunk's token ``t``, except that in a left-padded batch a
position counts the row's real tokens only (``start + t`` less the row's padding).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
from torch import Tensor

__all__ = ["Layout", "Grid", "Selection", "select"]


class Layout(ABC):
    """The tokens of a (B, n) chunk that one pass computes, and how results go back.

    Attributes:
        start: column of the chunk's first token in the key/value buffers.
        end: one past the chunk's last column.
        valid: (B', N) bool, False for padding slots (``None``: every slot is a token).
        computes_all: every token of the chunk is computed, whichever run the pass (the
            identity); otherwise only the tokens the layout was built from.
    """

    computes_all: ClassVar[bool] = False
    start: int
    end: int
    valid: Tensor | None

    @abstractmethod
    def gather(self, full: Tensor) -> Tensor:
        """``full`` (B, n, ...) -> the layout's (B', N, ...)."""

    @abstractmethod
    def commit(self, full: Tensor | None, values: Tensor, which: Tensor | None = None) -> Tensor:
        """``full`` with the layout's ``values`` (B', N, ...) written where ``which`` (B', N).

        ``which=None`` writes every token of the layout; ``full=None`` makes the (B, n, ...)
        tensor from ``values`` (where nothing was written before, zeros). Returns the result
        (a new tensor for :class:`Grid`, ``full`` itself, written in place, for
        :class:`Selection`).
        """

    def active(self, mask: Tensor) -> Tensor:
        """``mask`` (B, n) on the layout, padding slots False."""
        active = self.gather(mask)
        return active if self.valid is None else active & self.valid

    def direction(
        self, delta: Callable[..., Tensor], x: Tensor, h: Tensor, logits: Tensor | None, goes_on: Tensor
    ) -> Tensor:
        """``delta(x, h, logits)``, the recurrence's update direction (B', N, d).

        Only the tokens that go on (``goes_on``) use it; the identity computes it for all.
        """
        return delta(x, h, logits)


class Grid(Layout):
    """The identity layout: every token of a (B, n) chunk at position ``start + t``.

    Commits are ``torch.where``: static shapes, no host synchronisation and no in-place
    writes, so the dense forward compiles with ``fullgraph=True`` and trains.

    Args:
        start: the chunk's first column (0 for a whole sequence).
        n: tokens per row.
    """

    computes_all: ClassVar[bool] = True

    def __init__(self, start: int, n: int) -> None:
        self.start, self.end = start, start + n
        self.valid = None

    def gather(self, full: Tensor) -> Tensor:
        return full

    def commit(self, full: Tensor | None, values: Tensor, which: Tensor | None = None) -> Tensor:
        if full is None or which is None:
            return values
        return torch.where(_trailing(which, values), values, full)


@dataclass
class Selection(Layout):
    """Which tokens of a (B, n) chunk a pass computes, laid out as (B', N).

    Attributes:
        rows: (B',) batch rows holding at least one running token, in batch order (every
            row, for the static layout compiled passes use).
        index: (B', N) chunk-local index of each slot, ascending; padding slots point at
            tokens that do not run (so no index repeats within a row).
        valid: (B', N) bool, False for padding slots.
        full: every token of the chunk runs (rows are all rows, index is ``arange(n)``).
        all_rows: ``rows`` is every batch row, in batch order (true when ``full``, for the
            static layout of compiled passes, and whenever every row runs a token).
        padded: some slots are padding (rows run different numbers of tokens).
        batch: rows B of the chunk.
        start: column of the chunk's first token.
        end: one past the chunk's last column.
        bucket: the slot rounding of compiled passes' static layout (see :func:`select`).
    """

    computes_all: ClassVar[bool] = False
    rows: Tensor
    index: Tensor
    valid: Tensor
    full: bool
    all_rows: bool
    padded: bool
    batch: int
    start: int = 0
    end: int = 0
    bucket: int | None = None

    def slot_rows(self) -> Tensor:
        """(B', N) the batch row of each slot."""
        return self.rows[:, None].expand_as(self.index)

    def columns(self) -> Tensor:
        """(B', N) the buffer column of each slot, ``start + index``."""
        return self.index + self.start

    def gather(self, full: Tensor) -> Tensor:
        if self.full:
            return full
        return full[self.rows[:, None], self.index]

    def commit(self, full: Tensor | None, values: Tensor, which: Tensor | None = None) -> Tensor:
        if full is None:
            if self.full and which is None:
                return values  # the layout is the chunk: no copy
            full = values.new_zeros(self.batch, self.end - self.start, *values.shape[2:])
        if which is None:
            if self.full:
                return full.copy_(values)
            if not self.padded:
                full[self.rows[:, None], self.index] = values
                return full
            which = self.valid
        rows = self.rows[:, None]
        full[rows, self.index] = torch.where(_trailing(which, values), values, full[rows, self.index])
        return full

    def direction(
        self, delta: Callable[..., Tensor], x: Tensor, h: Tensor, logits: Tensor | None, goes_on: Tensor
    ) -> Tensor:
        # PonderLM's direction is a V x d product per token: computed for the tokens that go
        # on only (zeros elsewhere, where the update's weight is zero anyway). One host read,
        # the count: the tokens' flat indices come from a sort, not a boolean index (which
        # would read the count again).
        if logits is None:
            return delta(x, h, logits)
        flat = goes_on.reshape(-1)
        k = int(flat.sum())
        if k == flat.numel():
            return delta(x, h, logits)
        out = torch.zeros_like(x, memory_format=torch.contiguous_format)  # (B', N, d)
        if k:
            which = torch.sort((~flat).to(torch.int8), stable=True).indices[:k]
            out.view(-1, x.shape[-1])[which] = delta(*(t.flatten(0, 1)[which] for t in (x, h, logits)))
        return out

    def write_logits(
        self,
        out: Tensor | None,
        values: Tensor,
        which: Tensor,
        columns: int,
        first: int = 0,
        head: Callable[[Tensor], Tensor] | None = None,
    ) -> Tensor:
        """Writes the logits of the slots ``which`` into ``out`` (B, columns, V).

        Args:
            out: the output so far, or ``None`` before the first write.
            values: (B', N, V) logits, or (B', N, d) hidden states when ``head`` is given:
                the head then runs for the ``which`` slots alone (for every slot of a
                decode step).
            which: (B', N) slots to write.
            columns: the output's width (``n``, or 1 for the chunk's last token alone).
            first: chunk index of the output's column 0 (``n - 1`` keeps the last token).
            head: the output head, when ``values`` are hidden states.

        A whole-chunk pass's logits become the output buffer itself (no copy): the entries
        of tokens that go on are overwritten when they stop, since every token stops once.

        A decode step (one slot per row) writes with a ``where`` over its slots, with no
        host read, the head running for every slot; longer chunks pick the ``which`` slots
        out first, so that neither the head nor the copy runs for the others.
        """
        if first == 0 and self.index.shape[1] == 1:  # a decode step: a where, no host read
            logits = values if head is None else head(values)
            if self.full:  # the slots are the chunk's tokens
                return logits if out is None else torch.where(which[..., None], logits, out, out=out)
            if out is None:
                out = logits.new_zeros(self.batch, columns, logits.shape[-1])
            rows, slots = self.slot_rows(), self.index
            out[rows, slots] = torch.where(which[..., None], logits, out[rows, slots])
            return out
        if self.full and first == 0:  # every slot has a column: a whole chunk, or one token
            logits = values if head is None else head(values)
            if out is None:
                return logits
            picked = logits[which]
        else:
            picked = values[which] if head is None else head(values[which])  # (k, V)
            if out is None:
                out = picked.new_zeros(self.batch, columns, picked.shape[-1])
        out[self.slot_rows()[which], self.index[which] - first] = picked
        return out


def select(runs: Tensor, start: int = 0, bucket: int | None = None) -> Selection | None:
    """Gathers the running tokens of ``runs`` (B, n) bool into a :class:`Selection`.

    Args:
        runs: tokens that run this pass.
        start: column of the chunk's first token.
        bucket: static layout for compiled passes: keep every row (a row with nothing to run
            is all padding) and round the slot count up to a multiple of ``bucket``, so the
            number of distinct shapes is bounded. ``None``: drop idle rows, no rounding.

    Returns:
        the selection, or ``None`` when no token runs.
    """
    B, n = runs.shape
    counts = runs.sum(1)  # (B,)
    # The one host read of the selection: the most and fewest tokens a row runs, the fewest
    # of the rows that run any, and how many rows run any.
    stats = torch.stack([counts.max(), counts.min(), counts.masked_fill(counts == 0, n).min(), (counts > 0).sum()])
    most, least, least_running, running_rows = stats.tolist()
    if most == 0:
        return None
    all_rows = torch.arange(B, device=runs.device)
    end = start + n
    if least == n:
        index = torch.arange(n, device=runs.device).repeat(B, 1)  # contiguous: compiled guards see strides
        return Selection(all_rows, index, runs, True, True, bool(bucket), B, start, end, bucket)
    kept = B if bucket else running_rows
    if kept == B:
        rows = all_rows
    else:  # the rows that run a token, in batch order (a stable sort on "runs none")
        rows = torch.sort((counts == 0).to(torch.int8), stable=True).indices[:kept]  # (B',)
    slots = most
    if bucket:
        slots = min(n, math.ceil(slots / bucket) * bucket)
    # Running tokens first, each group in position order: a stable sort on "does not run".
    order = torch.sort((~runs[rows]).to(torch.int8), dim=1, stable=True).indices  # (B', n)
    index = order[:, :slots]
    valid = torch.arange(slots, device=runs.device) < counts[rows, None]
    # Compiled passes always take the padded path: one graph whatever the row counts.
    padded = bool(bucket) or least_running < most
    return Selection(rows, index, valid, False, kept == B, padded, B, start, end, bucket)


def _trailing(which: Tensor, values: Tensor) -> Tensor:
    """``which`` (B', N) with singleton dimensions to broadcast against ``values`` (B', N, ...)."""
    return which.reshape(*which.shape, *([1] * (values.dim() - which.dim())))
