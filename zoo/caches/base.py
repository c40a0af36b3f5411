"""The cache-strategy interface: where keys and values live, in every execution.

Shape legend: B batch, T time, B' rows of a selection, N slots per row, H heads, H_kv
key/value heads, D head dim, S buffer length, P passes.

A cache strategy decides what a halted token contributes to later passes, and owns the
storage that makes it so. For each execution it hands the driver a :class:`KVStore` (the
keys and values of one forward, dense or sparse, or of one decode), and the store hands
each pass one :class:`KVView` per layer: what that layer's attention reads and writes.
The attention layer only ever talks to a view.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor

from zoo.config import ModelConfig

if TYPE_CHECKING:
    from zoo.layout import Layout

__all__ = [
    "KVView",
    "KVStore",
    "PaddedView",
    "Fresh",
    "PerLayer",
    "CacheStrategy",
    "PassWork",
    "STORES",
    "causal_positions",
    "padding_columns",
    "kv_bytes",
]

KV = tuple[Tensor, Tensor]

STORES = ("dense", "sparse", "decode")


class KVView(ABC):
    """One layer's view of the keys and values for one pass (made by a :class:`KVStore`).

    ``update`` receives the keys and values just computed for the queries of this call and
    returns what to attend over: keys, values (B, H_kv, S, D), an optional boolean mask
    (True = attend) broadcastable to (B, H, T, S), and whether plain causal masking applies.

    Attributes:
        projects_kv: the layer computes keys and values for its queries. ``False``: the
            view supplies them all (the layer projects queries only, and ``update`` gets
            ``None`` for ``k`` and ``v``).
    """

    projects_kv: bool = True

    @abstractmethod
    def update(self, k: Tensor | None, v: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None, bool]:
        """Merges new keys/values (B, H_kv, T, D) into this view; returns (k, v, mask, is_causal)."""


class KVStore(ABC):
    """The keys and values of one forward (dense or sparse) or of one decode.

    The driver asks it, at every pass, for the views the pass's layers read and write.
    """

    @abstractmethod
    def views(self, index: int, part: Layout, active: Tensor) -> list[KVView | None]:
        """The per-layer views of pass ``index`` (``None``: plain causal attention).

        Args:
            index: the pass about to run.
            part: the tokens it computes (a :class:`~zoo.layout.Grid` in dense execution,
                a :class:`~zoo.layout.Selection` otherwise).
            active: (B', N) bool on ``part``, the tokens that run the pass (``m^index``);
                with the identity layout the others are computed too, and discarded.
        """

    def skip(self, index: int, start: int, end: int) -> None:
        """Pass ``index`` runs no token of the chunk at columns ``[start, end)``."""

    def key_padding(self, part: Layout, padding: Tensor) -> Tensor | None:
        """Which keys of the views of a pass over ``part`` are padding tokens (left-padded batches).

        Args:
            part: the tokens the pass computes.
            padding: (B, S) bool, True at the columns of padding tokens; ``S`` covers at
                least the columns up to ``part.end`` (later columns are not padding).

        Returns:
            (B', K) bool on ``part``'s rows, True where key ``k`` is a padding token, for
            the ``K`` keys (or more: the views slice) a view may return; ``None`` when no key
            a view returns can be padding. The default: the keys are the layout's own
            tokens, key ``k`` the layout's slot ``k`` (dense stores, and stores that keep
            nothing).
        """
        return part.gather(padding_columns(padding, part.start, part.end))

    def nbytes(self) -> int:
        """Bytes of key/value storage the store holds now."""
        return 0


class PaddedView(KVView):
    """Wraps a view (or plain causal attention) so that no real token attends to a padding token.

    Padding keys are masked out of every query of a real token and zeroed (a buffer's
    padding columns may hold anything, and a masked score must stay finite). A padding
    token's query may attend to any key its view allows, so no row of the mask is empty;
    its results are discarded.

    Args:
        inner: the strategy's view, or ``None`` for plain causal attention.
        key_padding: (B', K) bool, True at padding keys (:meth:`KVStore.key_padding`);
            sliced to the keys the view returns.
        query_padding: (B', N) bool, True at the layout's padding tokens.
    """

    def __init__(self, inner: KVView | None, key_padding: Tensor, query_padding: Tensor) -> None:
        self.inner = inner
        self.projects_kv = True if inner is None else inner.projects_kv
        self.key_padding = key_padding
        self.query_padding = query_padding

    def update(self, k: Tensor | None, v: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None, bool]:
        if self.inner is None:
            mask, causal = None, True
        else:
            k, v, mask, causal = self.inner.update(k, v)
        S, N = k.shape[2], self.query_padding.shape[1]
        pad = self.key_padding[:, :S]  # (B', S)
        k = k.masked_fill(pad[:, None, :, None], 0.0)  # (B', H_kv, S, D)
        v = v.masked_fill(pad[:, None, :, None], 0.0)
        allowed = ~pad[:, None, None, :] | self.query_padding[:, None, :, None]  # (B', 1, N, S)
        if mask is not None:
            allowed = allowed & mask
        elif causal:  # SDPA's is_causal: query i sees keys 0..i
            allowed = allowed & torch.ones(N, S, dtype=torch.bool, device=k.device).tril()
        return k, v, allowed, False


class Fresh(KVStore):
    """Plain causal attention over each pass's own keys and values; nothing is kept.

    Args:
        num_layers: layers of the block stack.
    """

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers

    def views(self, index: int, part: Layout, active: Tensor) -> list[KVView | None]:
        return [None] * self.num_layers


class PerLayer(KVStore):
    """Dense storage of one (k, v) per layer, which each pass's view reads and may replace.

    Args:
        num_layers: layers of the block stack.
    """

    def __init__(self, num_layers: int) -> None:
        self.kv: list[KV | None] = [None] * num_layers

    def views(self, index: int, part: Layout, active: Tensor) -> list[KVView | None]:
        return [self.view(index, layer, active) for layer in range(len(self.kv))]

    @abstractmethod
    def view(self, index: int, layer: int, active: Tensor) -> KVView:
        """The view of ``layer`` at pass ``index``; ``active`` is ``m^index`` (B, T)."""


@dataclass(frozen=True)
class PassWork:
    """What one pass computes, in tokens and query-key pairs (for :mod:`zoo.flops`).

    Attributes:
        queries: tokens the pass computes (each: query projection, attention output
            projection, MLP).
        kv_tokens: tokens whose keys and values the pass projects.
        keys: query-key pairs attended, summed over the queries.
    """

    queries: int
    kv_tokens: int
    keys: int


class CacheStrategy(ABC):
    """Decides what halted tokens contribute to later passes, and keeps the keys and values.

    Strategies hold no parameters; they are registered with ``@CACHES.register(name)``.

    Class attributes:
        freezes: a halted token is frozen entirely (its keys and values as the strategy
            says, its hidden state and logits those of its last active pass), so execution
            may skip it: sparse execution and decoding compute only the tokens that run a
            pass. Otherwise every token is computed at every pass.
    """

    freezes: ClassVar[bool] = False

    @abstractmethod
    def store(self, execution: str, config: ModelConfig, batch: int, length: int, like: Tensor) -> KVStore:
        """The storage of one forward or decode.

        Args:
            execution: ``"dense"`` (the identity layout, every token every pass),
                ``"sparse"`` (one forward over selections) or ``"decode"`` (prefill and the
                decode steps, chunk after chunk).
            config: the model config (layers, heads, passes).
            batch: rows B.
            length: positions S the store must hold.
            like: a tensor giving device and dtype.
        """

    def decode_bytes(
        self, config: ModelConfig, batch: int, length: int, dtype: torch.dtype = torch.float32
    ) -> int:
        """Bytes the decode store of ``batch`` rows and ``length`` positions holds at most."""
        return config.passes * kv_bytes(config, batch, _rounded(length), dtype)

    def work(self, depth: Tensor, index: int) -> PassWork:
        """What pass ``index`` computes when the tokens ran ``depth`` (B, T) passes.

        The default: the tokens that run the pass (``depth > index``) compute it, project
        their keys and values, and each attends to the ``t + 1`` keys up to its position
        ``t`` (halted tokens' keys included).
        """
        runs = depth > index
        return PassWork(int(runs.sum()), int(runs.sum()), int((runs * causal_positions(depth)).sum()))


def padding_columns(padding: Tensor, start: int, end: int) -> Tensor:
    """``padding`` (B, S) at columns ``[start, end)``; columns at or past ``S`` are not padding."""
    have = padding[:, start:end]
    if have.shape[1] == end - start:
        return have
    return torch.nn.functional.pad(have, (0, end - start - have.shape[1]), value=False)


def causal_positions(depth: Tensor) -> Tensor:
    """(T,) int64 ``t + 1``: the keys a query at position ``t`` sees under causal masking."""
    return torch.arange(1, depth.shape[-1] + 1, dtype=torch.int64, device=depth.device)


def kv_bytes(config: ModelConfig, batch: int, length: int, dtype: torch.dtype) -> int:
    """Bytes of one key/value cache over every layer: ``layers * 2 * B * S * H_kv * D * itemsize``."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return config.num_layers * 2 * batch * length * config.kv_heads * config.head_dim * itemsize


def _rounded(length: int) -> int:
    """Decode buffers hold a multiple of 8 positions."""
    return -(-length // 8) * 8
