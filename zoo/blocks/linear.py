"""``nn.Linear`` whose float32 CPU inference products run on oneDNN.

A dense forward spends nearly all its time in the products of linear layers (the QKV and
output projections, the MLP, the head). On the AMD EPYC CPUs of the project's machines,
MKL's float32 GEMM (what ``F.linear`` runs) is slower than oneDNN's on these shapes, by
5-15% per product at 1024 rows (Pythia-70M widths); ``benchmarks/dense_forward.py``
measures the whole forward against transformers. Both are the same product summed in
another order: float32 rounding apart, the results are equal.

oneDNN's kernel (``torch.ops.mkldnn._linear_pointwise``, the one ``torch.compile``'s CPU
backend calls) has no autograd formula, so it is taken only without autograd, outside
``torch.compile``, on CPU, in float32, for at least :data:`MIN_ROWS` rows (decode steps
keep MKL). Everything else is ``F.linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Linear", "linear", "MIN_ROWS"]

MIN_ROWS = 64
_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)``, on oneDNN for float32 CPU inference of many rows."""
    if (
        _ONEDNN
        and x.device.type == "cpu"
        and x.dtype == weight.dtype == torch.float32
        and x.numel() >= MIN_ROWS * x.shape[-1] > 0
        and not (
            torch.is_grad_enabled()
            and (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))
        )
        and not torch.compiler.is_compiling()
    ):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """``nn.Linear`` computed by :func:`linear` (the same parameters and state dict)."""

    def forward(self, x: Tensor) -> Tensor:
        return linear(x, self.weight, self.bias)
