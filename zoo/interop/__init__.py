"""Conversion to and from other libraries' checkpoints (Hugging Face GPT-NeoX)."""

from zoo.interop.hf import from_hf, hf_config_to_fields, to_hf

__all__ = ["from_hf", "to_hf", "hf_config_to_fields"]
