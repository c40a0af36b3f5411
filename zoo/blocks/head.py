"""The output projection to the vocabulary."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["VocabHead"]


class VocabHead(nn.Linear):
    """``logits = h W^T``, W (V, d): an ``nn.Linear`` without bias, with a decoding fast path.

    Decoding multiplies a few rows (one per sequence) by the largest matrix of the model.
    On CPU, MKL's kernel for ``h W^T`` with W row-major runs such skinny products well
    below the memory bandwidth; the same product written as ``(W h^T)^T`` takes another
    kernel, 1.3-2.5x faster for 2 to 8 rows on the Pythia heads (V = 50304, d = 512 to
    2048; ``python benchmarks/inference.py --only head``). A single row gains nothing
    (the matrix-vector kernel is the same either way) and from about 64 rows the plain
    form is as fast. So :meth:`forward` takes the transposed form on CPU, in float32,
    without autograd, for ``2 <= rows <=`` :attr:`fast_rows` and a weight of at least
    :attr:`fast_min_numel` entries (smaller ones sit in cache, where it gains nothing).
    The result is the same product summed in another order (float32 rounding apart),
    returned contiguous. Every other call is ``F.linear``.
    """

    fast_rows: int = 32
    fast_min_numel: int = 1 << 20

    def __init__(self, dim: int, vocab_size: int) -> None:
        super().__init__(dim, vocab_size, bias=False)

    def forward(self, h: Tensor) -> Tensor:
        weight = self.weight
        rows = h.numel() // max(h.shape[-1], 1)
        if not (
            2 <= rows <= self.fast_rows
            and weight.numel() >= self.fast_min_numel
            and h.device.type == "cpu"
            and h.dtype == weight.dtype == torch.float32
            and not (torch.is_grad_enabled() and (weight.requires_grad or h.requires_grad))
            and not torch.compiler.is_compiling()
        ):
            return F.linear(h, weight)
        flat = h.reshape(rows, h.shape[-1])
        logits = torch.mm(weight, flat.T).T.contiguous()  # (rows, V)
        return logits.view(*h.shape[:-1], weight.shape[0])
