"""Rotary position embeddings on the leading part of each head (GPT-NeoX "rotate half")."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["Rotary", "apply_rotary"]


class Rotary(nn.Module):
    """Computes ``(cos, sin)`` for given positions; holds no parameters or buffers.

    The tables are computed per call from the positions (a few thousand flops), so the
    module is the same on the meta device, after ``to_empty`` and under ``torch.compile``.
    Frequencies follow GPT-NeoX: ``inv_freq = base ** -(arange(0, r, 2) / r)`` over the
    ``r`` rotary dims, duplicated as ``cat(freqs, freqs)``.

    Args:
        rotary_dims: rotated dims per head (even; 0 disables rotary).
        base: frequency base.
    """

    def __init__(self, rotary_dims: int, base: float) -> None:
        super().__init__()
        self.rotary_dims = rotary_dims
        self.base = base

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """``positions`` (T,) or (B, T) integer -> cos, sin of shape (1 or B, 1, T, r), fp32."""
        r = self.rotary_dims
        exponent = torch.arange(0, r, 2, device=positions.device, dtype=torch.int64).float() / r
        inv_freq = 1.0 / (self.base**exponent)  # (r/2,)
        freqs = positions.float()[..., None] * inv_freq  # (..., T, r/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (..., T, r)
        if emb.dim() == 2:
            emb = emb[None]
        emb = emb[:, None]  # (B, 1, T, r)
        return emb.cos(), emb.sin()


def _rotate_half(x: Tensor) -> Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotates the first ``cos.shape[-1]`` dims of ``x`` (B, H, T, D); the rest pass through."""
    r = cos.shape[-1]
    if r == 0:
        return x
    rot, rest = x[..., :r], x[..., r:]
    rot = rot * cos.to(x.dtype) + _rotate_half(rot) * sin.to(x.dtype)
    return torch.cat((rot, rest), dim=-1)
