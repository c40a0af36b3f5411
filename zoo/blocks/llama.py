"""The llama layer: pre-norm RMSNorm, grouped-query attention, SwiGLU."""

from __future__ import annotations

from torch import Tensor, nn

from zoo.blocks.attention import Attention, KVView
from zoo.blocks.mlp import SwiGLU
from zoo.blocks.norms import make_norm
from zoo.config import ModelConfig
from zoo.registry import BLOCKS

__all__ = ["LlamaLayer"]


@BLOCKS.register("llama")
class LlamaLayer(nn.Module):
    """Llama layer (sequential pre-norm residual)::

        x ── (+ attn(rmsnorm(x))) ── h ── (+ swiglu(rmsnorm(h))) ── out

    Uses ``num_kv_heads`` for grouped-query attention and ``rotary_fraction`` as configured
    (llama rotates whole heads: set ``rotary_fraction=1.0``). ``mlp_dim`` is the width of each
    SwiGLU branch. ``parallel_residual`` does not apply.

    Args:
        config: the model config.
    """

    norm = "rmsnorm"  # the kind of the model's final norm when built from this layer

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = make_norm("rmsnorm", config.dim, config.norm_eps)
        self.mlp_norm = make_norm("rmsnorm", config.dim, config.norm_eps)
        self.attn = Attention(config.dim, config.num_heads, config.kv_heads, config.rotary_dims, config.bias)
        self.mlp = SwiGLU(config.dim, config.hidden_dim, config.bias)

    def forward(
        self, x: Tensor, rope: tuple[Tensor, Tensor], kv: KVView | None = None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """``x`` (B, T, dim) -> (B, T, dim) and the (k, v) this layer attended over."""
        a, kv_out = self.attn(self.attn_norm(x), rope, kv)
        h = x + a
        return h + self.mlp(self.mlp_norm(h)), kv_out
