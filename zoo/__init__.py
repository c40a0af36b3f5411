"""ponder-zoo: recurrent language models with token-wise adaptive depth.

The public contract::

    zoo.available(kind)             # sorted registered names
    zoo.build(name, **overrides)    # a preset, with ModelConfig overrides
    zoo.from_hf(path, **overrides)  # a local GPT-NeoX checkpoint folder
    zoo.save(model, path); zoo.load(path)
    out = model(input_ids)          # .logits .depth .aux_loss
    gen = model.generate(input_ids, max_new_tokens)
"""

from zoo import blocks, caches, halting  # noqa: F401  (registers the parts)
from zoo import recurrence as _recurrence  # noqa: F401
from zoo.build import build, build_model
from zoo import flops  # noqa: F401  (zoo.flops.count, relative_to_full, relative_to_single_pass)
from zoo.checkpoint import load, save
from zoo.compile import compile, uncompile
from zoo.config import ModelConfig, preset
from zoo.interop import from_hf, to_hf
from zoo.model import ModelOutput, RecurrentLM
from zoo.registry import available

__version__ = "0.1.0"

__all__ = ["available", "build", "build_model", "from_hf", "to_hf", "save", "load", "compile", "uncompile", "ModelConfig", "preset", "ModelOutput", "RecurrentLM"]
