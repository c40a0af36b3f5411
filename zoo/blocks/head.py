"""Products with the vocabulary matrices: the output head and the expected embedding.

Decoding multiplies a few rows (one per sequence) by the largest matrices of the model,
the V x d head and, in PonderLM, the input embedding (the expected embedding under the
token's own prediction). On CPU, MKL runs such skinny products well below the memory
bandwidth in their plain form; another form of the same product runs 1.2-2.6x faster for
a few rows (``python benchmarks/inference.py --only head``). Both fast forms are taken
only on CPU, in float32, without autograd, outside ``torch.compile``, for at most
:data:`FAST_ROWS` rows of a matrix of at least :data:`FAST_MIN_NUMEL` entries (smaller
ones sit in cache, where they gain nothing). They are the same products summed in
another order: float32 rounding apart, the results are equal.
"""

from __future__ import annotations

import torch
from torch import Tensor

from zoo.blocks.linear import Linear

__all__ = ["VocabHead", "expected_embedding", "FAST_ROWS", "FAST_MIN_NUMEL"]

FAST_ROWS = 32
FAST_MIN_NUMEL = 1 << 20
EMBED_CHUNKS = 8  # vocabulary slices the expected embedding is summed over


def takes_fast_path(rows: int, x: Tensor, weight: Tensor, min_rows: int = 1) -> bool:
    """Whether ``rows`` rows of ``x`` times the vocabulary matrix ``weight`` take the fast form."""
    return (
        min_rows <= rows <= FAST_ROWS
        and weight.numel() >= FAST_MIN_NUMEL
        and x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and not (torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad))
        and not torch.compiler.is_compiling()
    )


class VocabHead(Linear):
    """``logits = h W^T``, W (V, d): an ``nn.Linear`` without bias, with a decoding fast path.

    For 2 to :data:`FAST_ROWS` rows (see the module) the product is computed as
    ``(W h^T)^T``, which MKL serves with a kernel 1.4-2.6x faster than that of ``h W^T``
    with W row-major, and returned contiguous. A single row gains nothing (the
    matrix-vector kernel is the same either way), and from about 64 rows the plain form
    is as fast. Every other call is :class:`~zoo.blocks.linear.Linear`'s.
    """

    def __init__(self, dim: int, vocab_size: int) -> None:
        super().__init__(dim, vocab_size, bias=False)

    def forward(self, h: Tensor) -> Tensor:
        rows = h.numel() // max(h.shape[-1], 1)
        if not takes_fast_path(rows, h, self.weight, min_rows=2):
            return super().forward(h)
        logits = torch.mm(self.weight, h.reshape(rows, h.shape[-1]).T).T.contiguous()  # (rows, V)
        return logits.view(*h.shape[:-1], self.weight.shape[0])


def expected_embedding(probs: Tensor, weight: Tensor) -> Tensor:
    """``probs @ weight``: (..., V) probabilities times the (V, d) embedding matrix.

    For up to :data:`FAST_ROWS` rows (see the module) the vocabulary is cut into
    :data:`EMBED_CHUNKS` slices, multiplied as one batched product and summed, which runs
    1.2-1.8x faster than the single product on 2 CPU cores: MKL spreads a skinny product
    over the cores poorly and a batched one well (on one thread the two take the same
    time). Otherwise, or when the slices would not be equal, it is the plain product.
    """
    V, d = weight.shape
    rows = probs.numel() // max(V, 1)
    if V % EMBED_CHUNKS or not weight.is_contiguous() or not takes_fast_path(rows, probs, weight):
        return probs @ weight
    size = V // EMBED_CHUNKS
    sliced = probs.reshape(rows, EMBED_CHUNKS, size).transpose(0, 1)  # (chunks, rows, V / chunks)
    mixed = torch.bmm(sliced, weight.view(EMBED_CHUNKS, size, d)).sum(0)  # (rows, d)
    return mixed.view(*probs.shape[:-1], d)
