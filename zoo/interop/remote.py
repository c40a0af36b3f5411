"""Adaptive models as transformers folders with remote code (``model_type`` ``ponder_zoo``).

A model that is not a plain GPT-NeoX or Llama model (several passes, a halting policy,
scaled embeddings, ...) is written as::

    config.json                    model_type "ponder_zoo", auto_map, zoo_config, zoo_version
    configuration_ponder_zoo.py    the transformers config class
    modeling_ponder_zoo.py         the transformers model: builds the zoo model and calls it
    model.safetensors              the zoo model's tensors under "model."
    README.md                      the model card: how to load it, what it needs installed

so that ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)`` computes
the zoo model's logits, and :func:`zoo.from_hf` reads it back. The code in the folder
imports the installed ponder-zoo library and uses only its public contract
(``zoo.ModelConfig.from_dict``, ``zoo.build_model``, ``model(input_ids, attention_mask=...,
labels=...)``), so it
can rebuild only parts that ponder-zoo itself registers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import Tensor

from zoo.checkpoint import StoredTensor, load_into
from zoo.config import ModelConfig
from zoo.model import RecurrentLM
from zoo.registry import REGISTRIES

__all__ = [
    "MODEL_TYPE",
    "CODE_FILES",
    "config_fields",
    "check_built_in",
    "files",
    "is_card",
    "model_card",
    "without_halting",
    "load",
]

MODEL_TYPE = "ponder_zoo"
PREFIX = "model."  # the zoo model is the ``model`` attribute of the transformers model
CODE_DIR = Path(__file__).parent / "remote_code"
CODE_FILES = ("configuration_ponder_zoo.py", "modeling_ponder_zoo.py")
CARD = "README.md"
AUTO_MAP = {
    "AutoConfig": "configuration_ponder_zoo.PonderZooConfig",
    "AutoModelForCausalLM": "modeling_ponder_zoo.PonderZooForCausalLM",
}
_PARTS = ("block", "recurrence", "halting", "cache")


def config_fields(hf: dict[str, Any]) -> dict[str, Any]:
    """:class:`~zoo.config.ModelConfig` fields of a ``ponder_zoo`` ``config.json`` dict.

    Raises:
        ValueError: no ``zoo_config`` object, or fields :class:`~zoo.config.ModelConfig`
            does not know.
    """
    fields = hf.get("zoo_config")
    if not isinstance(fields, dict):
        raise ValueError("config.json has model_type 'ponder_zoo' but no zoo_config object")
    return ModelConfig.from_dict(fields).to_dict()


def check_built_in(config: ModelConfig) -> None:
    """Raises ``ValueError`` if a part of ``config`` is registered outside ponder-zoo.

    The code written into the folder imports only ponder-zoo, so a part that a plugin
    module registers could not be rebuilt where the folder is loaded.
    """
    for kind in _PARTS:
        name = getattr(config, kind)
        module = getattr(REGISTRIES[kind].get(name), "__module__", "")
        if module.split(".")[0] != "zoo":
            raise ValueError(
                f"{kind} {name!r} is registered by the module {module!r}, not by ponder-zoo; the code "
                f"of a transformers folder imports only ponder-zoo, so it could not rebuild this "
                f"model. Share it with zoo.save together with that module, or contribute the "
                f"{kind} to ponder-zoo"
            )


def files(
    model: RecurrentLM, tensors: dict[str, Tensor], title: str, why: str, reasons: list[str]
) -> tuple[dict[str, str], dict[str, Tensor]]:
    """The code, ``config.json`` and model card of ``model``'s folder, and the tensors to store.

    Call :func:`check_built_in` first: the code written can rebuild only built-in parts.
    The model card is headed ``title``; ``why`` and ``reasons`` say why the model needs
    remote code.

    Returns:
        (file name -> text, the tensors under the ``model.`` prefix).
    """
    from zoo import __version__

    config = model.config
    texts = {name: (CODE_DIR / name).read_text() for name in CODE_FILES}
    dtype_name = str(model.embed.weight.dtype).removeprefix("torch.")
    hf = {
        "architectures": ["PonderZooForCausalLM"],
        "model_type": MODEL_TYPE,
        "auto_map": AUTO_MAP,
        "zoo_config": config.to_dict(),
        "zoo_version": __version__,
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "max_position_embeddings": config.max_seq_len,
        "tie_word_embeddings": config.tied_embeddings,
        "dtype": dtype_name,
        "torch_dtype": dtype_name,
    }
    texts["config.json"] = json.dumps(hf, indent=2) + "\n"
    texts[CARD] = model_card(config, title, why, reasons, __version__)
    return texts, {PREFIX + name: t for name, t in tensors.items()}


def is_card(folder: Path) -> bool:
    """``folder`` holds no ``README.md``, or one a ponder-zoo export wrote (its tag)."""
    card = folder / CARD
    try:
        return not card.exists() or "\n- ponder-zoo\n" in card.read_text(errors="replace")
    except OSError:
        return False


def model_card(config: ModelConfig, title: str, why: str, reasons: list[str], version: str) -> str:
    """The README.md of a ``ponder_zoo`` folder: what the model is, how to load it, what it needs."""
    listed = "".join(f"\n- {reason}" for reason in reasons)
    return f"""---
library_name: transformers
tags:
- ponder-zoo
- adaptive-depth
- custom_code
---

# {title}

A ponder-zoo language model with token-wise adaptive depth.

| part | |
|---|---|
| block | `{config.block}`: {config.num_layers} layers, width {config.dim}, vocabulary {config.vocab_size} |
| recurrence | `{config.recurrence}`, {config.passes} passes |
| halting policy | `{config.halting}` |
| cache strategy | `{config.cache}` |

## Loading it with transformers

```python
from transformers import AutoModelForCausalLM

model = AutoModelForCausalLM.from_pretrained("<this folder or Hub id>", trust_remote_code=True)
out = model(input_ids)          # out.logits, out.depth (passes each token ran)
```

The code in this folder (`modeling_ponder_zoo.py`, `configuration_ponder_zoo.py`) imports
the **ponder-zoo** library, which must be installed. This folder was written by ponder-zoo
{version}: `pip install ponder-zoo=={version}`.

## Loading it with ponder-zoo

```python
import zoo

model = zoo.from_hf("<this folder or Hub id>")
```

## Why remote code

{why}:{listed}
"""


def without_halting(index: dict[str, StoredTensor]) -> dict[str, StoredTensor]:
    """``index`` without the halting policy's tensors (for a model given another policy)."""
    return {key: where for key, where in index.items() if not key.startswith(PREFIX + "halting.")}


def load(model: RecurrentLM, index: dict[str, StoredTensor], folder: Path, optional: list[str]) -> list[str]:
    """Loads the ``model.``-prefixed tensors of ``index``; returns the absent ``optional`` names.

    Raises:
        ValueError: tensors without the prefix, or missing, unexpected or mis-shaped ones.
    """
    foreign = sorted(key for key in index if not key.startswith(PREFIX))
    if foreign:
        raise ValueError(f"{folder} holds tensors that are not ponder-zoo weights: {', '.join(foreign)}")
    stored = {key[len(PREFIX) :]: where for key, where in index.items()}
    return load_into(model, stored, source=str(folder), optional=optional)
