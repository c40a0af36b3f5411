"""Sparse execution: each pass computes only the tokens that run it.

Shape legend: B batch, n tokens in the chunk, B' selected rows, N slots per selected row,
H_kv key/value heads, D head dim, S cache length, d width, V vocabulary, P passes.

A pass gathers the running tokens of the whole batch into a (B', N) layout (rows that run
nothing are dropped; shorter rows are padded with slots marked invalid), runs the block
stack on them, and scatters the results back. Attention reads a per-layer key/value
buffer that holds, for every token, the keys and values of its last pass that ran: the
running tokens write theirs in place, halted tokens' entries are simply left as they are
(KV reuse without a copy). Active queries attend over that buffer with a position mask.

The same loop serves three callers:

* ``model(ids, execution="sparse")``: one chunk (the whole sequence) and one buffer per
  layer (:class:`WorkingStore`), shared by all passes;
* prefill and every decode step of :meth:`~zoo.model.RecurrentLM.generate`: chunks of the
  prompt and of one new token per row, with a preallocated cache per pass
  (:class:`~zoo.caches.decode.DecodeCache`), into which a halted token's keys and values are
  carried forward at the start of each pass.

With a cache strategy that does not freeze halted tokens (``recompute``) every token runs
every pass, so decoding works for it too; only the skipping is specific to ``kv_reuse``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from zoo.blocks.attention import KVView
from zoo.halting.base import PassContext
from zoo.recurrence import PassTrace, run_stack

__all__ = ["Selection", "select", "BufferView", "WorkingStore", "run_passes", "run_sparse", "pass_compute"]

KV = tuple[Tensor, Tensor]


@dataclass
class Selection:
    """Which tokens of a (B, n) chunk a pass computes, laid out as (B', N).

    Attributes:
        rows: (B',) batch rows holding at least one running token.
        index: (B', N) chunk-local index of each slot, ascending; padding slots point at
            tokens that do not run (so no index repeats within a row).
        valid: (B', N) bool, False for padding slots.
        full: every token of the chunk runs (rows are all rows, index is ``arange(n)``).
        all_rows: ``rows`` is every batch row (true when ``full``, and always for the static
            layout compiled passes use).
        padded: some slots are padding (rows run different numbers of tokens).
    """

    rows: Tensor
    index: Tensor
    valid: Tensor
    full: bool
    all_rows: bool
    padded: bool

    def slot_rows(self) -> Tensor:
        """(B', N) the batch row of each slot."""
        return self.rows[:, None].expand_as(self.index)

    def gather(self, full: Tensor) -> Tensor:
        """``full`` (B, n, ...) -> (B', N, ...)."""
        if self.full:
            return full
        return full[self.rows[:, None], self.index]

    def scatter_(self, full: Tensor, values: Tensor) -> None:
        """Writes ``values`` (B', N, ...) into ``full`` (B, n, ...) at the valid slots, in place."""
        if self.full:
            full.copy_(values)
            return
        rows = self.rows[:, None]
        if not self.padded:
            full[rows, self.index] = values
            return
        valid = self.valid.reshape(*self.valid.shape, *([1] * (values.dim() - 2)))
        full[rows, self.index] = torch.where(valid, values, full[rows, self.index])


def select(runs: Tensor, bucket: int | None = None) -> Selection:
    """Gathers the running tokens of ``runs`` (B, n) bool into a :class:`Selection`.

    Args:
        runs: tokens that run this pass.
        bucket: static layout for compiled passes: keep every row (a row with nothing to run
            is all padding) and round the slot count up to a multiple of ``bucket``, so the
            number of distinct shapes is bounded. ``None``: drop idle rows, no rounding.
    """
    B, n = runs.shape
    counts = runs.sum(1)  # (B,)
    all_rows = torch.arange(B, device=runs.device)
    if bool((counts == n).all()):
        index = torch.arange(n, device=runs.device).repeat(B, 1)  # contiguous: compiled guards see strides
        return Selection(all_rows, index, runs, True, True, bool(bucket))
    rows = all_rows if bucket else counts.nonzero().squeeze(1)  # (B',)
    slots = int(counts.max())
    if bucket:
        slots = min(n, math.ceil(slots / bucket) * bucket)
    # Running tokens first, each group in position order: a stable sort on "does not run".
    order = torch.sort((~runs[rows]).to(torch.int8), dim=1, stable=True).indices  # (B', n)
    index = order[:, :slots]
    valid = torch.arange(slots, device=runs.device) < counts[rows, None]
    # Compiled passes always take the padded path: one graph whatever the row counts.
    return Selection(rows, index, valid, False, bool(bucket), bool(bucket) or not bool(valid.all()))


class BufferView(KVView):
    """One layer's view onto a key/value buffer for a pass over a :class:`Selection`.

    The selected tokens' new keys and values are written into the buffer (B, H_kv, S, D)
    at their positions (padding slots write back what was there); queries then attend over
    the buffer's first ``kv_len`` positions, each up to its own position.

    Three layouts, from cheapest to most general:

    * a whole chunk starting at position 0 (prefill's first pass): plain causal attention
      over the new keys, which are also written to the buffer;
    * a whole chunk at a later position, eager (every decode step's first pass, and later
      passes while every row runs): the chunk is written as one slice; a single-token chunk
      attends over the buffer's prefix with no mask at all;
    * any selection (or any compiled pass): per-slot writes and a position mask.

    Args:
        buffers: the layer's (k, v) buffers for this pass.
        selection: the tokens being computed.
        positions: (B', N) absolute positions of the slots.
        start: position of the chunk's first token.
        kv_len: keys to attend over (every slot's position is below it); ``None`` for the
            whole buffer (a constant shape, for compiled passes).
    """

    def __init__(
        self, buffers: KV, selection: Selection, positions: Tensor, start: int, kv_len: int | None
    ) -> None:
        self.buffers = buffers
        self.positions = positions
        self.start = start
        self.kv_len = kv_len
        self.fresh = selection.full and start == 0
        self.contiguous = selection.full and kv_len is not None
        self.all_rows = selection.all_rows
        self.rows = selection.rows
        self.row_of_slot = selection.slot_rows().contiguous()  # (B', N)
        self.valid = selection.valid.contiguous()
        self.padded = selection.padded

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor, Tensor | None, bool]:
        n = k.shape[2]
        if self.fresh:
            for buf, new in zip(self.buffers, (k, v)):
                buf[:, :, :n].copy_(new)
            return k, v, None, True
        if self.contiguous:
            out = []
            for buf, new in zip(self.buffers, (k, v)):
                buf[:, :, self.start : self.start + n].copy_(new)
                out.append(buf[:, :, : self.kv_len])  # (B, H_kv, kv_len, D)
            if n == 1:  # one query per row sees every key written so far
                return out[0], out[1], None, False
            return out[0], out[1], self._mask(self.kv_len), False
        rows, valid = self.row_of_slot, self.valid[..., None, None]  # (B', N), (B', N, 1, 1)
        out = []
        for buf, new in zip(self.buffers, (k, v)):
            new = new.transpose(1, 2)  # (B', N, H_kv, D)
            if self.padded:  # padding slots write back what is there
                new = torch.where(valid, new, buf[rows, :, self.positions])
            buf[rows, :, self.positions] = new
            rowbuf = buf if self.all_rows else buf[self.rows]
            out.append(rowbuf if self.kv_len is None else rowbuf[:, :, : self.kv_len])  # (B', H_kv, S, D)
        return out[0], out[1], self._mask(out[0].shape[2]), False

    def _mask(self, length: int) -> Tensor:
        key_pos = torch.arange(length, device=self.positions.device)
        return (key_pos <= self.positions[..., None])[:, None]  # (B', 1, N, length)


class WorkingStore:
    """Key/value buffers for one sparse forward: one (k, v) per layer, shared by all passes.

    A pass overwrites the running tokens' entries; a halted token's entries stay those of
    its last pass, which is exactly KV reuse. Memory: one dense KV cache.
    """

    def __init__(self, num_layers: int, batch: int, kv_heads: int, length: int, head_dim: int, like: Tensor) -> None:
        shape = (batch, kv_heads, length, head_dim)
        self.layers = [
            (like.new_empty(shape), like.new_empty(shape)) for _ in range(num_layers)
        ]

    def begin_pass(self, index: int, start: int, end: int) -> list[KV]:
        """The buffers pass ``index`` reads and writes for positions ``[start, end)``."""
        return self.layers


def pass_compute(model, x: Tensor, rope: tuple[Tensor, Tensor], views: list[KVView]) -> tuple[Tensor, Tensor]:
    """One pass of the block stack on gathered tokens: (stack output, final-norm hidden)."""
    h, _ = run_stack(model.layers, x, rope, views)
    return h, model.final_norm(h)


def run_passes(
    model,
    chunk_ids: Tensor,
    start: int,
    store,
    step: Tensor | None = None,
    alive: Tensor | None = None,
    compute: Callable | None = None,
    bucket: int | None = None,
    last_logits_only: bool = False,
) -> PassTrace:
    """Runs every pass over a chunk of tokens at positions ``[start, start + n)``.

    Tokens before the chunk must already be in ``store`` (prefill, earlier decode steps).

    Args:
        model: a :class:`~zoo.model.RecurrentLM`.
        chunk_ids: (B, n) token ids.
        start: position of the chunk's first token.
        store: the key/value buffers (:class:`WorkingStore` or a decode cache).
        step: training step for the policy's schedules (``None`` in inference).
        alive: (B,) bool rows to compute at all (decoding skips rows that finished).
        compute: the pass function (:func:`pass_compute` or a compiled twin).
        bucket: slot-count rounding for compiled passes (see :func:`select`).
        last_logits_only: return logits for the chunk's last position only, (B, 1, V), as
            generation needs: a token stopping at an earlier pass keeps that pass's logits
            (the head is not run again for it), and the last pass's head runs for that
            position alone.

    Returns:
        the chunk's :class:`~zoo.recurrence.PassTrace` (logits of every chunk token).
    """
    compute = compute or pass_compute
    B, n = chunk_ids.shape
    P = model.config.passes
    policy, recurrence = model.halting, model.recurrence
    device = chunk_ids.device
    positions = torch.arange(start, start + n, device=device).expand(B, n)  # (B, n)

    x = recurrence.initial(model.embed(chunk_ids))  # E^0, (B, n, d)
    live = torch.ones(B, n, dtype=torch.bool, device=device)
    if alive is not None:
        live = live & alive[:, None]
    mask = live  # m^0
    # Cloned: passes scatter into the state in place.
    state = {key: value.clone() for key, value in policy.init_state(mask).items()}
    hidden_out = x.new_zeros(B, n, x.shape[-1])
    gates = x.new_ones(max(P - 1, 0), B, n)
    masks = [mask]
    aux = x.new_zeros(())
    mixed = x.new_zeros(B, n, x.shape[-1]) if policy.mixes_outputs else None
    freezes = model.cache.freezes
    # A token's output logits are those of the last pass it ran, written once, when it stops
    # (or at the last pass): a halted token's head never runs again. Without per-pass logits
    # (Loop, no logit-reading policy) or with ACT's mix, the head runs once at the end.
    # With last_logits_only only the chunk's last position is kept (column 0 of the output).
    per_pass_logits = recurrence.uses_logits or policy.uses_logits
    keep_logits = per_pass_logits and not policy.mixes_outputs
    out_start = n - 1 if last_logits_only else 0  # chunk index of the output's column 0
    logits_out = None

    for i in range(P):
        last = i == P - 1
        runs = mask if freezes else live
        if not bool(runs.any()):
            for later in range(i, P):  # still carry the chunk's entries into the later passes' caches
                store.begin_pass(later, start, start + n)
            break
        sel = select(runs, bucket)
        pos = sel.gather(positions).contiguous()  # (B', N)
        x_sel = sel.gather(x)
        buffers = store.begin_pass(i, start, start + n)
        kv_len = None if bucket else start + n
        views = [BufferView(kv, sel, pos, start, kv_len) for kv in buffers]
        h_sel, hidden_sel = compute(model, x_sel, model.rotary(pos), views)
        sel.scatter_(hidden_out, hidden_sel)
        if last:
            if keep_logits:
                wanted = sel.valid & (sel.index >= out_start)  # the last pass's head runs for these alone
                logits_out = _write_logits(
                    logits_out, sel, hidden_sel, wanted, (B, n - out_start), out_start, model.head
                )
            break
        logits_sel = model.head(hidden_sel) if per_pass_logits else None
        mask_sel = sel.gather(mask) & sel.valid
        # No ids: per-pass auxiliary cross-entropy is a training (dense) quantity.
        ctx = PassContext(positions=pos, input_ids=None, step=step, passes=P)
        decision = policy.step(i, hidden_sel, logits_sel, mask_sel, _gather_state(sel, state), ctx)
        next_sel = decision.mask & mask_sel
        if decision.state is not None:
            for key, value in decision.state.items():
                sel.scatter_(state[key], value)
        aux = aux + decision.aux_loss
        if mixed is not None:
            sel.scatter_(mixed, sel.gather(mixed) + decision.weight[..., None].to(x.dtype) * hidden_sel)
        if keep_logits and freezes:
            stops = sel.valid & ~next_sel & (sel.index >= out_start)
            logits_out = _write_logits(logits_out, sel, logits_sel, stops, (B, n - out_start), out_start)
        # E^{i+1} = E^i + m^{i+1} s^i delta^i, the update computed only for tokens that go on.
        delta = _update_direction(recurrence, x_sel, h_sel, logits_sel, next_sel, model.embed.weight)
        sel.scatter_(x, x_sel + (next_sel.to(x.dtype) * decision.gate)[..., None] * delta)
        sel.scatter_(gates[i], decision.gate.to(gates.dtype))
        mask = mask.clone()
        sel.scatter_(mask, next_sel)
        masks.append(mask)

    while len(masks) < P:  # passes nobody ran (every token halted earlier)
        masks.append(torch.zeros_like(live))
    mask_stack = torch.stack(masks)
    final_weight, final_aux = policy.finish(gates, mask_stack, state, PassContext(positions, None, step, P))
    aux = aux + final_aux
    hidden = hidden_out if mixed is None else mixed + final_weight[..., None].to(x.dtype) * hidden_out
    if keep_logits:
        logits = logits_out
        if logits is None:  # no row ran at all
            logits = x.new_zeros(B, n - out_start, model.config.vocab_size)
    else:
        logits = model.head(hidden[:, -1:] if last_logits_only else hidden)
    return PassTrace(logits, hidden, mask_stack, gates, aux)


def _write_logits(
    out: Tensor | None,
    sel: Selection,
    values: Tensor,
    which: Tensor,
    shape: tuple[int, int],
    out_start: int = 0,
    head: Callable | None = None,
) -> Tensor:
    """Writes the selected slots' logits where ``which`` into ``out`` (B, n_out, V).

    Args:
        out: the output so far, or ``None`` before the first write.
        sel: the pass's selection.
        values: (B', N, V) logits, or (B', N, d) hidden states when ``head`` is given: the
            head then runs for the ``which`` slots alone.
        which: (B', N) slots to write.
        shape: (B, n_out) of the output.
        out_start: chunk index of the output's first column (``n - 1`` keeps the last position).

    A whole-chunk pass's logits become the output buffer itself (no copy): the entries of
    tokens that go on are overwritten when they stop, since every token stops exactly once.
    """
    if sel.full and out_start == 0:  # every slot has a column: a whole chunk, or one token
        logits = values if head is None else head(values)
        if out is None:
            return logits
        picked = logits[which]
    else:
        picked = values[which] if head is None else head(values[which])  # (k, V)
        if out is None:
            out = picked.new_zeros(*shape, picked.shape[-1])
    out[sel.slot_rows()[which], sel.index[which] - out_start] = picked
    return out


def _update_direction(recurrence, x: Tensor, h: Tensor, logits: Tensor | None, goes_on: Tensor, embed: Tensor) -> Tensor:
    """The recurrence's update direction (B', N, d) for the slots that run the next pass.

    PonderLM's direction is a V x d product per token: it is computed for the tokens that go
    on only (zeros elsewhere, where the update's weight is zero anyway).
    """
    if not recurrence.uses_logits or bool(goes_on.all()):
        return recurrence.delta(x, h, logits, embed)
    delta = torch.zeros_like(x)
    if bool(goes_on.any()):
        delta[goes_on] = recurrence.delta(x[goes_on], h[goes_on], logits[goes_on], embed)
    return delta


def _gather_state(sel: Selection, state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {key: sel.gather(value) for key, value in state.items()}


def run_sparse(model, input_ids: Tensor, step: Tensor | None = None) -> PassTrace:
    """``model(ids, execution="sparse")``: the whole sequence as one chunk, one buffer per layer."""
    B, T = input_ids.shape
    cfg = model.config
    store = WorkingStore(cfg.num_layers, B, cfg.kv_heads, T, cfg.head_dim, model.embed.weight)
    compiled = getattr(model, "_compiled_pass", None)
    return run_passes(
        model, input_ids, 0, store, step, compute=compiled, bucket=64 if compiled is not None else None
    )
