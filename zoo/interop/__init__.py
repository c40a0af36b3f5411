"""Hugging Face checkpoints in and out: GPT-NeoX, Llama, adaptive models with remote code, Hub ids."""

from zoo.interop.hf import from_hf, hf_config_to_fields, to_hf

__all__ = ["from_hf", "to_hf", "hf_config_to_fields"]
