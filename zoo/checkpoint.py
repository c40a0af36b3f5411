"""Checkpoints: a folder holding ``config.json`` and ``model.safetensors``, never pickle.

::

    zoo.save(model, "runs/ckpt")          # runs/ckpt/config.json, runs/ckpt/model.safetensors
    model = zoo.load("runs/ckpt")         # rebuilt from the config, loaded strictly

``config.json`` holds a format marker, its version and the :class:`~zoo.config.ModelConfig`
(``ModelConfig.to_json`` form), so a checkpoint is rebuilt with
:func:`zoo.build_model` and needs no code object. Tied weights are stored once.

Every write goes through :func:`atomic_write`: files are written into a temporary sibling
and moved into place with ``os.replace``, so an interrupted save leaves the previous
checkpoint where it stood. The same helper serves any other file that must never be seen
half-written (trainer state, logs of record).

Loading builds the model on the meta device and allocates it with ``to_empty`` before the
stored tensors are copied in, so a large model is never initialised only to be overwritten.
The helpers that do this (:func:`index_safetensors`, :func:`load_into`,
:func:`materialize`) are shared with :mod:`zoo.interop`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from zoo.build import build_model
from zoo.config import ModelConfig
from zoo.model import RecurrentLM

__all__ = [
    "save",
    "load",
    "atomic_write",
    "StoredTensor",
    "index_safetensors",
    "load_into",
    "misfit",
    "materialize",
    "model_tensors",
    "FORMAT",
    "FORMAT_VERSION",
    "CONFIG_FILE",
    "WEIGHTS_FILE",
]

FORMAT = "ponder-zoo"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"

# safetensors' dtype names -> torch dtypes (the ones a model's weights can have).
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


# Atomic writes ---------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, *, directory: bool = False) -> Iterator[Path]:
    """Yields a temporary sibling of ``path`` to write; moves it into place only on success.

    On a clean exit the temporary file (or folder) is flushed to disk and renamed onto
    ``path`` with ``os.replace``. If the block raises, the temporary is removed and ``path``
    is untouched, so readers see either the old complete content or the new one.

    Replacing an existing *folder* takes two renames (old folder aside, new folder in);
    only a crash of the process between those two leaves ``path`` missing, and then the
    previous folder is still complete at ``.<name>.old-*`` beside it.

    Args:
        path: the file or folder to (re)write.
        directory: the target is a folder; the yielded temporary folder already exists.

    Raises:
        ValueError: ``path`` exists as a file where a folder is asked for, or vice versa.

    Example:
        >>> import json, tempfile, pathlib
        >>> target = pathlib.Path(tempfile.mkdtemp()) / "state.json"
        >>> with atomic_write(target) as tmp:
        ...     _ = tmp.write_text(json.dumps({"step": 10}))
        >>> json.loads(target.read_text())
        {'step': 10}
    """
    path = Path(path)
    if directory and path.exists() and not path.is_dir():
        raise ValueError(f"{path} exists and is not a folder; remove it or choose another path")
    if not directory and path.is_dir():
        raise ValueError(f"{path} is a folder; atomic_write(directory=False) writes a file")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    if directory:
        tmp.mkdir()
    try:
        yield tmp
        if not tmp.exists():
            raise ValueError(f"nothing was written to the temporary {tmp} for {path}")
        _fsync_tree(tmp)
        _move_into_place(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    _fsync_dir(path.parent)


def _move_into_place(tmp: Path, path: Path) -> None:
    if not (tmp.is_dir() and path.is_dir()):
        os.replace(tmp, path)  # atomic for files, and for a folder onto a missing path
        return
    # os.replace cannot overwrite a non-empty folder: move the old one aside first.
    aside = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(path, aside)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.replace(aside, path)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _fsync_tree(path: Path) -> None:
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
    for file in files:
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())
    if path.is_dir():
        _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    # Makes the renames durable; some filesystems refuse to open folders, which is harmless.
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# Reading safetensors ----------------------------------------------------------------------


@dataclass(frozen=True)
class StoredTensor:
    """Where a tensor lives in a safetensors file, read from the header only.

    Attributes:
        file: the ``.safetensors`` file.
        key: the tensor's name inside the file.
        shape: its shape.
        dtype: its torch dtype.
    """

    file: Path
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype


def index_safetensors(files: Iterable[str | os.PathLike]) -> dict[str, StoredTensor]:
    """Reads the headers of ``files`` (no tensor data) into ``{key: StoredTensor}``.

    Raises:
        FileNotFoundError: a file does not exist.
        ValueError: a file is truncated or not a safetensors file (the message names it),
            or two files hold the same key.
    """
    index: dict[str, StoredTensor] = {}
    for file in files:
        file = Path(file)
        if not file.is_file():
            raise FileNotFoundError(f"weight file {file} does not exist")
        with _open_safetensors(file) as handle:
            for key in handle.keys():
                if key in index:
                    raise ValueError(f"tensor {key!r} is stored twice: in {index[key].file} and in {file}")
                view = handle.get_slice(key)
                dtype = _SAFETENSORS_DTYPES.get(view.get_dtype())
                if dtype is None:
                    raise ValueError(f"{file}: tensor {key!r} has unsupported dtype {view.get_dtype()}")
                index[key] = StoredTensor(file, key, tuple(view.get_shape()), dtype)
    return index


@contextlib.contextmanager
def _open_safetensors(file: Path) -> Iterator:
    try:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            yield handle
    except SafetensorError as err:
        raise ValueError(
            f"{file} is not a readable safetensors file ({err}); it is truncated or corrupted: "
            f"write it again"
        ) from None


def materialize(model: RecurrentLM, device: torch.device | str | None) -> RecurrentLM:
    """Allocates a meta-device model on ``device`` (uninitialised) and restores weight tying.

    Raises:
        ValueError: the model has non-persistent buffers, which no file can restore.
    """
    stored = set(model.state_dict())
    transient = [name for name, _ in model.named_buffers() if name not in stored]
    if transient:
        raise ValueError(
            f"buffers {transient} are not saved with the weights, so a loaded model could not "
            f"restore them; register them as persistent buffers or compute them in forward"
        )
    model.to_empty(device=device if device is not None else "cpu")
    if model.config.tied_embeddings:
        model.head.weight = model.embed.weight  # to_empty allocates tied tensors separately
    return model


def model_tensors(model: RecurrentLM) -> dict[str, Tensor]:
    """The model's parameters and persistent buffers by name, each shared tensor once."""
    persistent = set(model.state_dict())
    named = dict(model.named_parameters())  # drops the tied head.weight
    named.update((n, b) for n, b in model.named_buffers() if n in persistent)
    return named


@torch.no_grad()
def load_into(
    model: RecurrentLM,
    stored: Mapping[str, StoredTensor],
    *,
    source: str,
    optional: Collection[str] = (),
) -> list[str]:
    """Checks ``stored`` against the model's tensors, then copies every stored tensor in.

    Names, then shapes, are checked before anything is read, and every problem is reported
    in one error. Stored tensors are converted to the model's dtype and device.

    Args:
        model: the (materialised) model to fill.
        stored: model tensor name -> where its value is stored.
        source: what is being loaded, for messages (a path).
        optional: model tensor names that may be absent from ``stored``.

    Returns:
        The model tensor names that were not in ``stored`` (a subset of ``optional``).

    Raises:
        ValueError: missing, unexpected or mis-shaped tensors, listed.
    """
    targets = model_tensors(model)
    missing = sorted(n for n in targets if n not in stored and n not in optional)
    unexpected = sorted(n for n in stored if n not in targets)
    misshaped = [
        f"{n}: stored {list(s.shape)}, model {list(targets[n].shape)}"
        for n, s in sorted(stored.items())
        if n in targets and tuple(targets[n].shape) != s.shape
    ]
    if missing or unexpected or misshaped:
        raise misfit(model, source, missing, unexpected, misshaped)
    by_file: dict[Path, list[tuple[str, StoredTensor]]] = {}
    for name, where in stored.items():
        by_file.setdefault(where.file, []).append((name, where))
    for file, entries in by_file.items():
        with _open_safetensors(file) as handle:
            for name, where in entries:
                try:
                    value = handle.get_tensor(where.key)
                except SafetensorError as err:
                    raise ValueError(
                        f"{file}: cannot read tensor {where.key!r} ({err}); the file is corrupted"
                    ) from None
                targets[name].copy_(value)
    return sorted(n for n in targets if n not in stored)


def misfit(
    model: RecurrentLM, source: str, missing: list[str], unexpected: list[str], misshaped: list[str]
) -> ValueError:
    """The error for stored tensors that do not fit ``model``: every problem, listed."""
    problems = []
    if missing:
        problems.append(f"missing tensors: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(unexpected)}")
    if misshaped:
        problems.append(f"tensors with the wrong shape: {'; '.join(misshaped)}")
    return ValueError(
        f"{source} does not fit the model ({model.config.block}, {model.config.num_layers} layers, "
        f"dim {model.config.dim}): " + " | ".join(problems)
    )


# Save / load -------------------------------------------------------------------------------


def save(model: RecurrentLM, path: str | os.PathLike) -> Path:
    """Writes ``model`` to the folder ``path`` (``config.json`` + ``model.safetensors``), atomically.

    An existing checkpoint at ``path`` is replaced only once the new one is complete.

    Args:
        model: a model built by :func:`zoo.build`, :func:`zoo.from_hf` or :func:`zoo.load`.
        path: the checkpoint folder.

    Returns:
        The folder, as a ``Path``.

    Example:
        >>> import tempfile, zoo
        >>> folder = zoo.save(zoo.build("pythia-tiny"), tempfile.mkdtemp() + "/ckpt")
        >>> sorted(p.name for p in folder.iterdir())
        ['config.json', 'model.safetensors']
    """
    if not isinstance(model, RecurrentLM):
        raise ValueError(f"zoo.save expects a zoo RecurrentLM, got {type(model).__name__}")
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in model_tensors(model).items()}
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": model.config.to_dict(),
    }
    with atomic_write(path, directory=True) as tmp:
        save_file(tensors, tmp / WEIGHTS_FILE, metadata={"format": "pt", "producer": FORMAT})
        (tmp / CONFIG_FILE).write_text(json.dumps(header, indent=2, sort_keys=True) + "\n")
    return Path(path)


def read_config(path: str | os.PathLike) -> ModelConfig:
    """The :class:`~zoo.config.ModelConfig` of the checkpoint folder ``path``.

    Raises:
        FileNotFoundError: the folder or its ``config.json`` is missing.
        ValueError: ``config.json`` is not a ponder-zoo checkpoint config of a known version.
    """
    folder = _existing_folder(path)
    config_file = folder / CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder} has no {CONFIG_FILE}; it is not a checkpoint written by zoo.save")
    try:
        header = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_file} is not valid JSON ({err}); the checkpoint is corrupted") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        hint = (
            " It looks like a Hugging Face checkpoint: load it with zoo.from_hf."
            if isinstance(header, dict) and "model_type" in header
            else ""
        )
        raise ValueError(
            f"{config_file} has no format marker {FORMAT!r}; it was not written by zoo.save.{hint}"
        )
    version = header.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"{config_file} has format_version {version!r}; this ponder-zoo reads versions up to "
            f"{FORMAT_VERSION}. Upgrade ponder-zoo"
        )
    return ModelConfig.from_dict(header["config"])


def load(
    path: str | os.PathLike, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> RecurrentLM:
    """Rebuilds the model saved at ``path`` by :func:`save` and loads its weights strictly.

    Args:
        path: the checkpoint folder.
        device: where to put the model (default CPU).
        dtype: parameter dtype; ``None`` keeps the dtype the weights were saved in.

    Raises:
        FileNotFoundError: the folder, ``config.json`` or ``model.safetensors`` is missing.
        ValueError: a corrupted or truncated file (named), or tensors that do not fit the config.

    Example:
        >>> import tempfile, torch, zoo
        >>> model = zoo.build("pythia-tiny")
        >>> folder = zoo.save(model, tempfile.mkdtemp() + "/ckpt")
        >>> torch.equal(zoo.load(folder).embed.weight, model.embed.weight)
        True
    """
    config = read_config(path)
    folder = Path(path)
    stored = index_safetensors([folder / WEIGHTS_FILE])
    if dtype is None:
        dtype = stored["embed.weight"].dtype if "embed.weight" in stored else torch.float32
    model = materialize(build_model(config, device="meta", dtype=dtype), device)
    load_into(model, stored, source=str(folder / WEIGHTS_FILE))
    return model


def _existing_folder(path: str | os.PathLike) -> Path:
    folder = Path(path)
    if folder.is_dir():
        return folder
    if folder.exists():
        raise ValueError(f"{folder} is a file; a checkpoint is a folder")
    aside = sorted(folder.parent.glob(f".{folder.name}.old-*")) if folder.parent.is_dir() else []
    hint = ""
    if aside:
        hint = f"; an interrupted save left the previous checkpoint at {aside[-1]}: rename it to {folder}"
    raise FileNotFoundError(f"checkpoint folder {folder} does not exist{hint}")
