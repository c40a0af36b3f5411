"""Hugging Face Hub ids, resolved through ``huggingface_hub`` and its cache.

``zoo.from_hf("org/name", revision=...)`` asks :func:`huggingface_hub.hf_hub_download`
for ``config.json`` and the safetensors weights (``model.safetensors``, or the shards
a ``model.safetensors.index.json`` lists) and reads them where the cache keeps them,
``<cache>/models--org--name/snapshots/<commit>/``. Everything huggingface_hub honours
applies: ``HF_HOME`` and ``HF_HUB_CACHE`` (where the cache is), ``HF_HUB_OFFLINE=1``
(never ask the Hub; read only what is cached), ``HF_TOKEN`` or ``hf auth login``
(private and gated repositories), ``HF_ENDPOINT`` (a mirror). Pickle weights
(``pytorch_model.bin``) are never downloaded.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["is_hub_id", "snapshot", "PICKLE_PATTERNS"]

CONFIG = "config.json"
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
# Weight files that are pickles: never downloaded, never read.
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl", "pytorch_model.bin.index.json")


def is_hub_id(text: str) -> bool:
    """Whether ``text`` is spelled like a Hub model id (``name`` or ``org/name``)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return True


def snapshot(
    repo_id: str, *, revision: str | None = None, cache_dir: str | os.PathLike | None = None
) -> Path:
    """The cached snapshot folder of ``repo_id`` holding its config and safetensors weights.

    Files not cached yet are downloaded (unless ``HF_HUB_OFFLINE`` is set); the folder
    then holds ``config.json`` and the weights, as a local checkpoint folder does. A
    repository without safetensors weights gives a folder without them (pickle weights are
    never fetched): reading it raises the error that says how to convert them.

    Args:
        repo_id: ``org/name`` (or ``name``) on the Hub.
        revision: a branch, tag or commit hash (default: ``main``).
        cache_dir: the cache folder (default: huggingface_hub's, from ``HF_HOME`` /
            ``HF_HUB_CACHE``).

    Raises:
        FileNotFoundError: not cached and the Hub cannot be asked (offline, or no
            connection), no such repository (or no access), or no ``config.json`` in it.
        ValueError: no such revision.
    """
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{repo_id!r} at revision {revision or constants.DEFAULT_REVISION!r}"
    cache = Path(cache_dir or constants.HF_HUB_CACHE)
    if constants.HF_HUB_OFFLINE:
        why = "HF_HUB_OFFLINE is set, so the Hub is not asked"
        fix = "unset HF_HUB_OFFLINE once to download it"
    else:
        why = "the Hub could not be reached"
        fix = "check the connection"
    fix += (
        f" (or `hf download {repo_id}`), point HF_HOME at a cache that holds it, or pass the "
        f"path of a local folder"
    )

    def fetch(filename: str, rev: str | None) -> Path:
        return Path(hf_hub_download(repo_id, filename, revision=rev, cache_dir=cache_dir))

    try:
        config = fetch(CONFIG, revision)
    except LocalEntryNotFoundError:
        raise FileNotFoundError(
            f"{repo_id!r} is not a local folder, and the Hugging Face cache ({cache}) does not hold "
            f"{where}; {why}. To load it, {fix}"
        ) from None
    except RevisionNotFoundError:
        raise ValueError(f"the Hub repository {repo_id!r} has no revision {revision!r}") from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(
            f"{repo_id!r} is not a local folder, and the Hub has no model repository of that name "
            f"that you can read (a private or gated one needs `hf auth login` or HF_TOKEN)"
        ) from None
    except EntryNotFoundError:
        raise FileNotFoundError(
            f"the Hub repository {where} has no {CONFIG}: it is not a transformers model"
        ) from None
    folder = config.parent  # snapshots/<commit>: later files come from the same commit
    commit = folder.name

    offline_gap = False
    for name in (SAFETENSORS_INDEX, SAFETENSORS_FILE):
        try:
            path = fetch(name, commit)
        except LocalEntryNotFoundError:
            offline_gap = True  # not cached, and the Hub could not say whether it exists
            continue
        except EntryNotFoundError:
            continue
        if name == SAFETENSORS_INDEX:
            try:
                shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as err:
                raise ValueError(f"{path} is not a valid safetensors index (no weight_map: {err})") from None
            try:
                for shard in shards:
                    fetch(shard, commit)
            except LocalEntryNotFoundError:
                raise FileNotFoundError(
                    f"the Hugging Face cache ({cache}) holds {where} only in part (shard {shard!r} "
                    f"is missing); {why}. To load it, {fix}"
                ) from None
        return folder

    if offline_gap and not any(p.match(pattern) for pattern in PICKLE_PATTERNS for p in folder.iterdir()):
        raise FileNotFoundError(
            f"the Hugging Face cache ({cache}) holds the {CONFIG} of {where} but not its "
            f"safetensors weights; {why}. To load it, {fix}"
        )
    return folder  # without safetensors weights: the caller says so (and names pickle files)
