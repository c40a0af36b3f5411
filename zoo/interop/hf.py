"""Hugging Face checkpoints in and out: GPT-NeoX, Llama, and adaptive models with remote code.

:func:`from_hf` reads a folder as transformers writes it (``config.json`` plus
``model.safetensors`` or a sharded ``model.safetensors.index.json``), a local one or a
Hub id through huggingface_hub's cache (:mod:`zoo.interop.hub`). ``config.json``'s
``model_type`` says how to read it:

| ``model_type`` | written by | becomes |
|---|---|---|
| ``gpt_neox`` | transformers (Pythia) | a ``neox`` model (:mod:`zoo.interop.neox`) |
| ``llama`` | transformers | a ``llama`` model (:mod:`zoo.interop.llama`) |
| ``ponder_zoo`` | :func:`to_hf` | the zoo model it was (:mod:`zoo.interop.remote`) |

:func:`to_hf` writes the reverse: a one-pass ``neox`` or ``llama`` model that transformers
can express stays a plain ``GPTNeoXForCausalLM`` / ``LlamaForCausalLM`` folder; any other
model gets remote code that ``AutoModelForCausalLM.from_pretrained(folder,
trust_remote_code=True)`` runs.

Pickle weight files (``pytorch_model.bin``, ``*.pt``, ``*.pth``) are refused: unpickling
runs arbitrary code.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file

from zoo.build import build_model
from zoo.checkpoint import (
    StoredTensor,
    index_safetensors,
    is_hf_checkpoint,
    materialize,
    model_tensors,
    write_folder,
)
from zoo.config import ModelConfig, parse_hf_config
from zoo.interop import hub, llama, neox, remote
from zoo.interop.neox import hf_to_zoo_name, zoo_to_hf_name
from zoo.model import RecurrentLM

__all__ = ["from_hf", "to_hf", "hf_config_to_fields", "hf_to_zoo_name", "zoo_to_hf_name"]

logger = logging.getLogger("zoo.interop")

SAFETENSORS_FILE = hub.SAFETENSORS_FILE
SAFETENSORS_INDEX = hub.SAFETENSORS_INDEX

Loader = Callable[[RecurrentLM, dict[str, StoredTensor], Path, list[str]], list[str]]
# model_type -> (config.json dict -> ModelConfig fields, tensor loader)
_READERS: dict[str, tuple[Callable[[dict[str, Any]], dict[str, Any]], Loader]] = {
    neox.MODEL_TYPE: (neox.config_fields, neox.load),
    llama.MODEL_TYPE: (llama.config_fields, llama.load),
    remote.MODEL_TYPE: (remote.config_fields, remote.load),
}
# block -> the module that writes it as a plain transformers folder
_PLAIN = {"neox": neox, "llama": llama}


# Config ----------------------------------------------------------------------------------


def hf_config_to_fields(hf: dict[str, Any]) -> dict[str, Any]:
    """:class:`~zoo.config.ModelConfig` fields of a transformers ``config.json`` dict.

    ``model_type`` ``gpt_neox`` reads both what transformers 4.x wrote (``rotary_pct``,
    ``rotary_emb_base``) and what 5.x writes (``rope_parameters``); ``llama`` likewise
    (``rope_theta`` or ``rope_parameters``); ``ponder_zoo`` (written by :func:`to_hf`)
    holds the fields themselves. Absent optional keys take transformers' defaults; the
    stored dtype, dropout rates and token ids do not affect the architecture and are
    ignored.

    Raises:
        ValueError: another ``model_type``, a required key missing, or a feature this
            library does not implement (the message names it).
    """
    model_type = hf.get("model_type")
    if model_type not in _READERS:
        raise ValueError(
            f"config.json has model_type {model_type!r}; zoo.from_hf reads {', '.join(map(repr, _READERS))} "
            f"(GPT-NeoX/Pythia, Llama, and adaptive models written by zoo.to_hf)"
        )
    return _READERS[model_type][0](hf)


# Loading ----------------------------------------------------------------------------------


def _no_safetensors(source: str, pickles: list[str]) -> str:
    held = "has no safetensors weights"
    if pickles:
        held = f"holds only pickle weight files ({', '.join(pickles)})"
    return (
        f"{source} {held}. Loading a pickle file can execute arbitrary code, so zoo.from_hf reads "
        f"safetensors only ({SAFETENSORS_FILE} or a sharded {SAFETENSORS_INDEX}). Convert it where "
        f"you trust the file: load it with transformers (AutoModelForCausalLM.from_pretrained) and "
        f"write it back with model.save_pretrained(folder, safe_serialization=True)"
    )


def _weight_files(folder: Path, source: str) -> list[Path]:
    index = folder / SAFETENSORS_INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{index} is not a valid safetensors index (no weight_map: {err})") from None
        return [folder / name for name in sorted(set(weight_map.values()))]
    single = folder / SAFETENSORS_FILE
    if single.is_file():
        return [single]
    pickles = sorted({p.name for pattern in hub.PICKLE_PATTERNS for p in folder.glob(pattern)})
    if pickles:
        raise ValueError(_no_safetensors(source, pickles))
    raise FileNotFoundError(_no_safetensors(source, []))


def _read_hf_config(folder: Path) -> dict[str, Any]:
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder} has no config.json; a Hugging Face checkpoint folder needs one")
    try:
        data = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_file} is not valid JSON: {err}") from None
    if isinstance(data, dict) and data.get("format") == "ponder-zoo":
        raise ValueError(
            f"{folder} is a ponder-zoo checkpoint, not a Hugging Face one: load it with zoo.load"
        )
    if not isinstance(data, dict):
        raise ValueError(f"{config_file} must hold a JSON object")
    return parse_hf_config(data, config_file)


def _resolve(
    path_or_id: str | os.PathLike, revision: str | None, cache_dir: str | os.PathLike | None
) -> tuple[Path, str]:
    """The local folder to read and how to name it in messages."""
    local = Path(path_or_id).expanduser()
    if isinstance(path_or_id, str) and not local.exists() and hub.is_hub_id(path_or_id):
        folder = hub.snapshot(path_or_id, revision=revision, cache_dir=cache_dir)
        return folder, f"the Hub repository {path_or_id!r} (revision {revision or 'main'!r})"
    if local.is_file():
        raise ValueError(f"{local} is a file; a Hugging Face checkpoint is a folder (config.json + weights)")
    if not local.is_dir():
        raise FileNotFoundError(f"Hugging Face checkpoint folder {local} does not exist")
    if revision is not None or cache_dir is not None:
        raise ValueError(
            f"revision and cache_dir choose a version of a Hub id; {local} is a local folder, "
            f"which has one version: drop them"
        )
    return local, str(local)


def from_hf(
    path_or_id: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    **overrides: Any,
) -> RecurrentLM:
    """Loads a Hugging Face checkpoint: a local folder or a Hub id, GPT-NeoX, Llama or ponder-zoo.

    A string that is not an existing folder and is spelled like a Hub id (``org/name``) is
    resolved with huggingface_hub: its cache (``HF_HOME``, ``HF_HUB_CACHE``), its offline
    switch (``HF_HUB_OFFLINE=1`` reads only the cache), its login for private repositories.
    Only ``config.json`` and the safetensors weights are fetched.

    Without overrides the result is exactly the checkpoint's model: a Pythia or Llama
    folder gives that model (``recurrence="none"``, one pass, ``embed_scale=1``), a folder
    written by :func:`to_hf` the zoo model it was. Overrides such as
    ``recurrence="ponder", passes=4, halting="mlp_gate", cache="kv_reuse"`` give a
    recurrent model initialised from the checkpoint, the start of continued pretraining;
    ``embed_scale`` stays as stored (1 for Pythia and Llama) unless overridden. Parameters
    the checkpoint does not hold (a halting policy's gates) keep their fresh
    initialisation and are named in one INFO line of the ``zoo.interop`` logger.

    Args:
        path_or_id: a folder with ``config.json`` and ``model.safetensors`` (or a sharded
            ``model.safetensors.index.json``), or a Hub id such as ``"EleutherAI/pythia-70m"``.
        revision: for a Hub id, the branch, tag or commit hash (default ``main``).
        cache_dir: for a Hub id, the cache folder (default: huggingface_hub's).
        device: where to put the model (default CPU).
        dtype: parameter dtype (default fp32); fp16/bf16 files are converted.
        **overrides: :class:`~zoo.config.ModelConfig` fields applied over the checkpoint's.

    Raises:
        FileNotFoundError: the folder, its ``config.json`` or its weights are missing; a Hub
            id that is not cached while the Hub cannot be asked (``HF_HUB_OFFLINE``), or
            that does not exist.
        ValueError: pickle-only weights (refused), an unsupported config, unknown override
            fields, ``revision``/``cache_dir`` with a local folder, or tensors that are
            missing, unexpected or mis-shaped (listed).

    Example:
        >>> import tempfile, zoo
        >>> folder = zoo.to_hf(zoo.build("pythia-tiny"), tempfile.mkdtemp() + "/pythia-tiny-hf")
        >>> ada = zoo.from_hf(folder, recurrence="ponder", passes=4, halting="mlp_gate", cache="kv_reuse")
        >>> ada.config.embed_scale, ada.config.passes
        (1.0, 4)
    """
    folder, source = _resolve(path_or_id, revision, cache_dir)
    hf = _read_hf_config(folder)
    base = ModelConfig(**hf_config_to_fields(hf))
    config = base.replace(**overrides)
    index = index_safetensors(_weight_files(folder, source))
    if hf["model_type"] == remote.MODEL_TYPE and config.halting != base.halting:
        index = remote.without_halting(index)  # the stored gates belong to another policy

    model = materialize(build_model(config, device="meta", dtype=dtype or torch.float32), device)
    # Only a halting policy's parameters may be absent: any other gap is a mismatch.
    policy = [name for name in model_tensors(model) if name.startswith("halting.")]
    fresh = _READERS[hf["model_type"]][1](model, index, folder, policy)
    if fresh:
        model.halting.reset_parameters()
        logger.info("from_hf(%s): initialised fresh, not in the checkpoint: %s", path_or_id, ", ".join(fresh))
    return model


# Writing ----------------------------------------------------------------------------------


def to_hf(
    model: RecurrentLM,
    path: str | os.PathLike,
    *,
    remote_code: bool | None = None,
    allow_other_files: bool = False,
) -> Path:
    """Writes ``model`` as a Hugging Face folder that transformers loads with the same logits.

    A one-pass model that transformers expresses natively stays plain: a ``neox`` model
    becomes a ``GPTNeoXForCausalLM`` folder, a ``llama`` model (``rotary_fraction=1``) a
    ``LlamaForCausalLM`` one. Any other model (ponder or loop recurrence, a halting
    policy, a cache strategy other than ``recompute``, scaled embeddings, ...) gets remote
    code: ``config.json`` with an ``auto_map``, ``configuration_ponder_zoo.py`` and
    ``modeling_ponder_zoo.py``, which rebuild it with the installed ponder-zoo library, and
    a ``README.md`` model card that says so, with the ponder-zoo version. Load it with
    ``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)``, or back in this
    library with :func:`from_hf`.

    Weights are ``model.safetensors`` in the model's dtype; the folder is written
    atomically.

    Args:
        model: any zoo model whose parts ponder-zoo registers itself.
        path: the output folder.
        remote_code: ``None`` (default) writes remote code only when needed; ``False``
            refuses a model that needs it; ``True`` writes remote code even for a plain model.
        allow_other_files: write beside files this export does not write (a
            ``tokenizer.json``, a ``generation_config.json``); they are kept. Without it such
            a folder is refused, listed.

    Raises:
        ValueError: not a zoo model; ``remote_code=False`` and the model is not plain
            GPT-NeoX or Llama (the message says why); a part registered by a plugin module,
            which the folder's code could not rebuild; the folder holds files this write may
            not replace or write beside (:func:`zoo.checkpoint.write_folder`), such as a
            ``README.md`` that is not a ponder-zoo model card.

    Example:
        >>> import json, pathlib, tempfile, zoo
        >>> folder = zoo.to_hf(zoo.build("adaponder-pythia-tiny"), tempfile.mkdtemp() + "/ada")
        >>> json.loads((folder / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"]
        'modeling_ponder_zoo.PonderZooForCausalLM'
    """
    if not isinstance(model, RecurrentLM):
        raise ValueError(f"zoo.to_hf expects a zoo RecurrentLM, got {type(model).__name__}")
    config = model.config
    native = _PLAIN.get(config.block)
    name = native.NAME if native else "GPT-NeoX or Llama"
    reasons = native.refusals(config) if native else [f"block={config.block!r} (no transformers counterpart)"]
    if remote_code is False and reasons:
        raise ValueError(
            f"this model cannot be expressed as {name}: " + "; ".join(reasons)
            + ". Leave remote_code unset to write it with remote code"
        )
    if remote_code:
        reasons = reasons or ["remote_code=True was asked for"]
    if reasons:
        remote.check_built_in(config)

    tensors = {n: t.detach().to("cpu") for n, t in model_tensors(model).items()}
    dtype = model.embed.weight.dtype
    if reasons:
        why = f"It is not a {name} model"
        texts, tensors = remote.files(model, tensors, Path(path).name, why, reasons)
        owns = lambda folder: is_hf_checkpoint(folder) and remote.is_card(folder)  # noqa: E731
    else:
        tensors = native.hf_tensors(tensors, config)
        texts = {"config.json": json.dumps(native.hf_config(config, dtype), indent=2) + "\n"}
        owns = is_hf_checkpoint
    tensors = {key: t.contiguous() for key, t in tensors.items()}
    files = {name: (lambda f, text=text: f.write_text(text)) for name, text in texts.items()}
    files[SAFETENSORS_FILE] = lambda f: save_file(tensors, f, metadata={"format": "pt"})
    write_folder(
        path,
        files,
        writer="zoo.to_hf",
        owns=owns,
        allow_other_files=allow_other_files,
        conflicts=(SAFETENSORS_INDEX, "model-*-of-*.safetensors"),
    )
    return Path(path)
