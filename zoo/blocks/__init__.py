"""Layers of the block stack: attention, MLPs, norms, rotary, and the registered layers."""

from zoo.blocks.attention import Attention, KVView
from zoo.blocks.head import VocabHead, expected_embedding
from zoo.blocks.llama import LlamaLayer
from zoo.blocks.mlp import GeluMLP, SwiGLU
from zoo.blocks.neox import NeoXLayer
from zoo.blocks.norms import make_norm
from zoo.blocks.rotary import Rotary, apply_rotary

__all__ = [
    "Attention",
    "KVView",
    "GeluMLP",
    "SwiGLU",
    "VocabHead",
    "expected_embedding",
    "NeoXLayer",
    "LlamaLayer",
    "make_norm",
    "Rotary",
    "apply_rotary",
]
