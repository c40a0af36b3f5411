"""The GPT-NeoX (Pythia) layer."""

from __future__ import annotations

from torch import Tensor, nn

from zoo.blocks.attention import Attention, KVView
from zoo.blocks.mlp import GeluMLP
from zoo.blocks.norms import make_norm
from zoo.config import ModelConfig
from zoo.registry import BLOCKS

__all__ = ["NeoXLayer"]


@BLOCKS.register("neox")
class NeoXLayer(nn.Module):
    """GPT-NeoX layer: two LayerNorms, partial rotary attention, GELU MLP.

    Parallel residual (Pythia)::

        x ──┬── attn_norm ── attn ──┐
            ├── mlp_norm ─── mlp ───┤
            └───────────────────── (+) ── out

    Sequential residual (``parallel_residual=False``)::

        x ── (+ attn(attn_norm(x))) ── h ── (+ mlp(mlp_norm(h))) ── out

    Args:
        config: the model config (width, heads, rotary, eps, bias, GELU flavour).
    """

    norm = "layernorm"  # the kind of the model's final norm when built from this layer

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.parallel_residual = config.parallel_residual
        self.attn_norm = make_norm("layernorm", config.dim, config.norm_eps)
        self.mlp_norm = make_norm("layernorm", config.dim, config.norm_eps)
        self.attn = Attention(config.dim, config.num_heads, config.kv_heads, config.rotary_dims, config.bias)
        self.mlp = GeluMLP(config.dim, config.hidden_dim, config.bias, config.gelu_approximate)

    def forward(
        self, x: Tensor, rope: tuple[Tensor, Tensor], kv: KVView | None = None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """``x`` (B, T, dim) -> (B, T, dim) and the (k, v) this layer attended over."""
        a, kv_out = self.attn(self.attn_norm(x), rope, kv)
        if self.parallel_residual:
            return x + a + self.mlp(self.mlp_norm(x)), kv_out
        h = x + a
        return h + self.mlp(self.mlp_norm(h)), kv_out
