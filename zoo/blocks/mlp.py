"""Feed-forward layers: the GPT-NeoX GELU MLP and the llama SwiGLU."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from zoo.blocks.linear import Linear

__all__ = ["GeluMLP", "SwiGLU"]


class GeluMLP(nn.Module):
    """``fc_out(gelu(fc_in(x)))``, GPT-NeoX's MLP.

    Args:
        dim: model width.
        hidden_dim: hidden width (Pythia ``4 * dim``).
        bias: linears carry biases.
        approximate: ``"none"`` for exact GELU (transformers' Pythia configs), ``"tanh"`` for
            the approximation Pythia was trained with.
    """

    def __init__(self, dim: int, hidden_dim: int, bias: bool = True, approximate: str = "none") -> None:
        super().__init__()
        self.fc_in = Linear(dim, hidden_dim, bias=bias)
        self.fc_out = Linear(hidden_dim, dim, bias=bias)
        self.approximate = approximate

    def forward(self, x: Tensor) -> Tensor:
        return self.fc_out(F.gelu(self.fc_in(x), approximate=self.approximate))


class SwiGLU(nn.Module):
    """``fc_out(silu(gate(x)) * up(x))``, llama's MLP; gate and up share one fused matrix.

    Args:
        dim: model width.
        hidden_dim: hidden width of each branch.
        bias: linears carry biases.
    """

    def __init__(self, dim: int, hidden_dim: int, bias: bool = False) -> None:
        super().__init__()
        self.fc_in = Linear(dim, 2 * hidden_dim, bias=bias)  # [gate; up]
        self.fc_out = Linear(hidden_dim, dim, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.fc_in(x).chunk(2, dim=-1)
        return self.fc_out(F.silu(gate) * up)
