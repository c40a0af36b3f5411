"""Checkpoints: a folder holding ``config.json`` and ``model.safetensors``, never pickle.

::

    zoo.save(model, "runs/ckpt")          # runs/ckpt/config.json, runs/ckpt/model.safetensors
    model = zoo.load("runs/ckpt")         # rebuilt from the config, loaded strictly

``config.json`` holds a format marker, its version and the :class:`~zoo.config.ModelConfig`
(``ModelConfig.to_json`` form), so a checkpoint is rebuilt with
:func:`zoo.build_model` and needs no code object. Tied weights are stored once.

Writers own only what they write (:func:`write_folder`): each file is written into a
temporary sibling, flushed and renamed onto its name, so an interrupted save leaves every
file either old and complete or new and complete; nothing else in the folder is touched,
and a folder holding files the writer does not own is refused (listed) unless the caller
allows them. Writers of one folder take turns under a lock (:func:`folder_lock`);
readers wait for a writer to finish. ``config.json`` and the weights carry the same write
id, so a pair torn by a crash between the two renames is reported, never loaded. The same
rename-into-place serves any other file that must never be seen half-written
(:func:`atomic_write`: trainer state, logs of record).

Loading builds the model on the meta device, checks its size
(:func:`zoo.config.check_memory`) and allocates it with ``to_empty`` before the stored
tensors are copied in, so a large model is never initialised only to be overwritten and an
absurd one is refused before any memory is taken. The helpers that do this
(:func:`index_safetensors`, :func:`load_into`, :func:`materialize`) are shared with
:mod:`zoo.interop`.
"""

from __future__ import annotations

import contextlib
import errno
import fnmatch
import json
import math
import os
import re
import shutil
import threading
import uuid
import warnings
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from zoo.build import build_model
from zoo.config import ModelConfig, check_memory
from zoo.model import RecurrentLM
from zoo.registry import plugin_parts, require_parts

__all__ = [
    "save",
    "load",
    "read_config",
    "atomic_write",
    "write_folder",
    "folder_lock",
    "FolderBusyError",
    "is_zoo_checkpoint",
    "is_hf_checkpoint",
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
    "latest_checkpoint",
    "checkpoint_problem",
    "load_trained",
]

FORMAT = "ponder-zoo"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CHECKPOINTS = "checkpoints"
RUN_INFO = "run.json"

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


# Locks ---------------------------------------------------------------------------------------


class FolderBusyError(ValueError):
    """Another process (or thread) holds the folder's lock and ``wait=False`` was asked."""


_held = threading.local()  # the folders this thread has locked: nested locks re-enter


@contextlib.contextmanager
def folder_lock(
    path: str | os.PathLike, *, shared: bool = False, wait: bool = True, purpose: str = "writing"
) -> Iterator[Path]:
    """Holds an advisory lock on the folder ``path`` (created if missing) for the block.

    The lock is ``flock`` on the folder itself, so no lock file is left behind and a lock
    dies with its process. Exclusive locks (writers) exclude each other and shared ones
    (readers); shared locks coexist. A thread that already holds the folder's lock enters
    again freely. Where the filesystem has no ``flock`` the block runs unlocked, with a
    warning.

    Args:
        path: the folder.
        shared: take a shared (reader's) lock instead of an exclusive one.
        wait: wait for the lock; ``False`` raises :class:`FolderBusyError` at once.
        purpose: what the holder does, for messages ("training").

    Yields:
        The folder, symlinks resolved.

    Raises:
        FolderBusyError: ``wait=False`` and another holder has the lock.
    """
    folder = _resolve_folder(path)
    key = (str(folder), shared)
    held = _held.__dict__.setdefault("folders", {})
    if held.get(key) or held.get((str(folder), False)):
        held[key] = held.get(key, 0) + 1
        try:
            yield folder
        finally:
            held[key] -= 1
        return
    fd = _lock_fd(folder, shared, wait, purpose)
    held[key] = 1
    try:
        yield folder
    finally:
        held.pop(key, None)
        if fd is not None:
            os.close(fd)  # closing the descriptor releases the lock


def _lock_fd(folder: Path, shared: bool, wait: bool, purpose: str) -> int | None:
    try:
        import fcntl
    except ImportError:  # not POSIX
        warnings.warn(f"no flock on this platform: {folder} is {purpose} unlocked", stacklevel=4)
        return None
    mode = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB)
    while True:
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder, os.O_RDONLY)
        try:
            fcntl.flock(fd, mode)
        except OSError as err:
            os.close(fd)
            if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise FolderBusyError(
                    f"{folder} is locked by another process that is {purpose} it; wait for it to "
                    f"finish or use another folder"
                ) from None
            warnings.warn(f"cannot lock {folder} ({err}); {purpose} it unlocked", stacklevel=4)
            return None
        # The folder may have been removed (and recreated) while we waited: lock the live one.
        with contextlib.suppress(FileNotFoundError):
            if os.stat(folder).st_ino == os.fstat(fd).st_ino:
                return fd
        os.close(fd)


def _resolve_folder(path: str | os.PathLike) -> Path:
    """``path`` with symlinks followed; a dangling symlink or a file is refused."""
    given = Path(path)
    if given.is_symlink() and not given.exists():
        raise ValueError(
            f"{given} is a symlink to {os.readlink(given)}, which does not exist; create the "
            f"folder it points to or choose another path"
        )
    folder = Path(os.path.realpath(given))
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{given} is a file; a checkpoint is a folder: choose another path")
    return folder


# Writing ------------------------------------------------------------------------------------


def is_zoo_checkpoint(folder: str | os.PathLike) -> bool:
    """``folder/config.json`` is a ponder-zoo checkpoint config (its format marker is there)."""
    header = _json_or_none(Path(folder) / CONFIG_FILE)
    return isinstance(header, dict) and header.get("format") == FORMAT


def is_hf_checkpoint(folder: str | os.PathLike) -> bool:
    """``folder/config.json`` is a Hugging Face model config (it has a ``model_type``)."""
    header = _json_or_none(Path(folder) / CONFIG_FILE)
    return isinstance(header, dict) and "model_type" in header and header.get("format") != FORMAT


def _json_or_none(file: Path) -> object:
    try:
        return json.loads(file.read_text())
    except (OSError, ValueError):
        return None


def write_folder(
    path: str | os.PathLike,
    files: Mapping[str, Callable[[Path], None]],
    *,
    writer: str,
    owns: Callable[[Path], bool],
    allow_other_files: bool = False,
    conflicts: Collection[str] = (),
) -> Path:
    """Writes ``files`` into the folder ``path``, each replaced by rename; nothing else is touched.

    Under the folder's exclusive lock (:func:`folder_lock`; concurrent writers take turns),
    the folder is checked first and nothing is written if a check fails:

    * a file of ``files`` that already exists is replaced only if ``owns(folder)`` says the
      folder holds an earlier write of the same kind (e.g. its ``config.json`` carries the
      writer's format); a file of that name the writer does not own is refused, always;
    * a file of ``files`` that is a symlink is refused (replacing it would cut the link, and
      writing through it would change a file other folders may share);
    * entries matching ``conflicts`` (file name patterns that readers would take instead of
      the new files, such as a sharded index beside a single weight file) are refused, always;
    * any other entry is refused, listed, unless ``allow_other_files``; then it stays as it is.

    Then each file is written to a temporary sibling by its callable, flushed to disk, and
    all are renamed onto their names in the order of ``files``. If a callable raises, the
    temporaries are removed and the folder is as it was (a folder this call created is
    removed again if still empty). A symlinked ``path`` is followed; a dangling one refused.

    Args:
        path: the folder (created if missing).
        files: file name -> function writing that file's content to the path it is given.
        writer: who writes, for messages (``"zoo.save"``).
        owns: whether an existing folder holds an earlier write of this kind.
        allow_other_files: write beside entries that are not ``files`` (they are kept).
        conflicts: ``fnmatch`` patterns of entries that must not be present.

    Returns:
        The folder, symlinks resolved.

    Raises:
        ValueError: the folder holds files the writer does not own, symlinks or conflicting
            entries (each listed, with what to do).

    Example:
        >>> import tempfile, pathlib
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> (folder / "notes.txt").write_text("mine")
        4
        >>> _ = write_folder(folder, {"a.json": lambda f: f.write_text("{}")}, writer="demo",
        ...                  owns=lambda f: True, allow_other_files=True)
        >>> sorted(p.name for p in folder.iterdir())
        ['a.json', 'notes.txt']
    """
    created = not os.path.lexists(path)
    with folder_lock(path, purpose=f"{writer} writing") as folder:
        try:
            _check_folder(folder, files, writer, owns, allow_other_files, conflicts)
            temporaries: dict[str, Path] = {}
            try:
                for name, write in files.items():
                    tmp = folder / f".{name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
                    temporaries[name] = tmp
                    write(tmp)
                    if not tmp.is_file():
                        raise ValueError(f"{writer} wrote nothing to the temporary {tmp} for {name}")
                    _fsync_file(tmp)
                for name, tmp in temporaries.items():
                    os.replace(tmp, folder / name)
            except BaseException:
                for tmp in temporaries.values():
                    _remove(tmp)
                raise
            _fsync_dir(folder)
        except BaseException:
            if created:
                with contextlib.suppress(OSError):
                    folder.rmdir()  # only if still empty: it was made for this write
            raise
    return folder


def _check_folder(
    folder: Path,
    files: Mapping[str, Callable[[Path], None]],
    writer: str,
    owns: Callable[[Path], bool],
    allow_other_files: bool,
    conflicts: Collection[str],
) -> None:
    stale = [p for p in folder.iterdir() if any(p.name.startswith(f".{n}.tmp-") for n in files)]
    for leftover in stale:  # temporaries of an earlier write of ours that was killed
        _remove(leftover)
    entries = sorted(p.name for p in folder.iterdir())
    present = [n for n in files if n in entries]
    problems = []
    linked = [n for n in present if (folder / n).is_symlink()]
    if linked:
        targets = ", ".join(os.readlink(folder / n) for n in linked)
        problems.append(
            f"{', '.join(linked)} in {folder} are symlinks ({targets}); {writer} neither replaces a "
            f"link nor writes through it: write to another folder"
        )
    kinds = [n for n in present if n not in linked and not (folder / n).is_file()]
    if kinds:
        problems.append(f"{', '.join(kinds)} in {folder} are not files; remove them or write elsewhere")
    if present and not owns(folder) and not linked and not kinds:
        problems.append(
            f"{folder} already holds {', '.join(present)}, which {writer} did not write; it replaces "
            f"only its own files: move them away or write to another folder"
        )
    clashing = [e for e in entries if any(fnmatch.fnmatch(e, c) for c in conflicts)]
    if clashing:
        problems.append(
            f"{folder} holds {', '.join(clashing)}, which readers would take instead of what "
            f"{writer} writes; move them away or write to another folder"
        )
    others = [e for e in entries if e not in files and e not in clashing]
    if others and not allow_other_files:
        shown = ", ".join(others[:20]) + (f" and {len(others) - 20} more" if len(others) > 20 else "")
        problems.append(
            f"{folder} holds files {writer} does not write: {shown}. It never deletes them; pass "
            f"allow_other_files=True to write {', '.join(files)} beside them, or choose an empty folder"
        )
    if problems:
        raise ValueError("; ".join(problems))


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, *, directory: bool = False) -> Iterator[Path]:
    """Yields a temporary sibling of ``path`` to write; moves it into place only on success.

    On a clean exit the temporary file (or folder) is flushed to disk and renamed onto
    ``path`` with ``os.replace``. If the block raises, the temporary is removed and ``path``
    is untouched, so readers see either the old complete content or the new one. A symlink
    at ``path`` is followed: its target is replaced, the link stays.

    A folder is only ever created whole: with ``directory=True`` the target must not exist
    yet (to update files in an existing folder use :func:`write_folder`, which never
    replaces a folder and so never deletes what it did not write).

    Args:
        path: the file or the new folder to write.
        directory: the target is a folder; the yielded temporary folder already exists.

    Raises:
        ValueError: ``path`` exists as a file where a folder is asked for, or vice versa, or
            the folder exists already.

    Example:
        >>> import json, tempfile, pathlib
        >>> target = pathlib.Path(tempfile.mkdtemp()) / "state.json"
        >>> with atomic_write(target) as tmp:
        ...     _ = tmp.write_text(json.dumps({"step": 10}))
        >>> json.loads(target.read_text())
        {'step': 10}
    """
    path = Path(path)
    if path.is_symlink():
        if not path.exists():
            raise ValueError(f"{path} is a symlink to {os.readlink(path)}, which does not exist")
        path = Path(os.path.realpath(path))
    if directory and path.exists():
        kind = "a folder" if path.is_dir() else "a file and not a folder"
        raise ValueError(
            f"{path} exists ({kind}); atomic_write creates new folders only: remove it or choose "
            f"another path"
        )
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
        if directory and path.exists():
            raise ValueError(f"{path} appeared while it was being written; nothing was replaced")
        os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise
    _fsync_dir(path.parent)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _fsync_file(file: Path) -> None:
    with open(file, "rb") as handle:
        os.fsync(handle.fileno())


def _fsync_tree(path: Path) -> None:
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
    for file in files:
        _fsync_file(file)
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


def materialize(
    model: RecurrentLM, device: torch.device | str | None, *, source: str = "the model"
) -> RecurrentLM:
    """Allocates a meta-device model on ``device`` (uninitialised) and restores weight tying.

    The size is checked first (:func:`zoo.config.check_memory`).

    Args:
        model: a model built on the meta device.
        device: where to allocate (``None``: the CPU).
        source: what is being loaded, for messages (a path).

    Raises:
        ValueError: the model has non-persistent buffers, which no file can restore, or it is
            larger than the memory ceiling.
    """
    stored = set(model.state_dict())
    transient = [name for name, _ in model.named_buffers() if name not in stored]
    if transient:
        raise ValueError(
            f"buffers {transient} are not saved with the weights, so a loaded model could not "
            f"restore them; register them as persistent buffers or compute them in forward"
        )
    tensors = model_tensors(model)
    for dtype in {t.dtype for t in tensors.values()}:  # the size, before any memory is taken
        values = sum(t.numel() for t in tensors.values() if t.dtype == dtype)
        check_memory(values, dtype, device, source=source, config=model.config)
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

    Names, shapes and kinds of dtype (floating point, integer, boolean) are checked before
    anything is read, and every problem is reported in one error. Stored tensors are
    converted to the model's dtype (within their kind: bf16 to fp32, never int to float)
    and device.

    Args:
        model: the (materialised) model to fill.
        stored: model tensor name -> where its value is stored.
        source: what is being loaded, for messages (a path).
        optional: model tensor names that may be absent from ``stored``.

    Returns:
        The model tensor names that were not in ``stored`` (a subset of ``optional``).

    Raises:
        ValueError: missing, unexpected, mis-shaped or mistyped tensors, listed.
    """
    targets = model_tensors(model)
    missing = sorted(n for n in targets if n not in stored and n not in optional)
    unexpected = sorted(n for n in stored if n not in targets)
    misshaped = [
        f"{n}: stored {list(s.shape)}, model {list(targets[n].shape)}"
        for n, s in sorted(stored.items())
        if n in targets and tuple(targets[n].shape) != s.shape
    ]
    mistyped = [
        f"{n}: stored {str(s.dtype).removeprefix('torch.')} in {s.file.name}, model "
        f"{str(targets[n].dtype).removeprefix('torch.')}"
        for n, s in sorted(stored.items())
        if n in targets and _dtype_kind(s.dtype) != _dtype_kind(targets[n].dtype)
    ]
    if missing or unexpected or misshaped or mistyped:
        raise misfit(model, source, missing, unexpected, misshaped, mistyped)
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
    model: RecurrentLM,
    source: str,
    missing: list[str],
    unexpected: list[str],
    misshaped: list[str],
    mistyped: list[str] = (),
) -> ValueError:
    """The error for stored tensors that do not fit ``model``: every problem, listed."""
    problems = []
    if missing:
        problems.append(f"missing tensors: {', '.join(missing)}")
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(unexpected)}")
    if misshaped:
        problems.append(f"tensors with the wrong shape: {'; '.join(misshaped)}")
    if mistyped:
        problems.append(
            f"tensors of the wrong kind (integer, boolean or floating point; values would be "
            f"converted, not loaded): {'; '.join(mistyped)}"
        )
    return ValueError(
        f"{source} does not fit the model ({model.config.block}, {model.config.num_layers} layers, "
        f"dim {model.config.dim}): " + " | ".join(problems)
    )


def _dtype_kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    return "float" if dtype.is_floating_point else "int"


# Save / load -------------------------------------------------------------------------------


def save(model: RecurrentLM, path: str | os.PathLike, *, allow_other_files: bool = False) -> Path:
    """Writes ``model`` to the folder ``path`` (``config.json`` + ``model.safetensors``), atomically.

    Each file is written beside its final name and renamed onto it
    (:func:`write_folder`), so an interrupted save leaves the previous checkpoint loadable
    (or, if the process died between the two renames, a pair that :func:`load` reports as
    torn). Only these two files are ever written or replaced: a folder that holds other
    files is refused (they are listed) unless ``allow_other_files=True``, and a
    ``config.json`` that is not a ponder-zoo checkpoint's is never replaced. Saving into a
    symlinked folder writes into its target; concurrent saves to one folder take turns.

    Args:
        model: a model built by :func:`zoo.build`, :func:`zoo.from_hf` or :func:`zoo.load`.
        path: the checkpoint folder (created if missing; ``"."`` works).
        allow_other_files: write beside files that are not a checkpoint's; they are kept.

    Returns:
        The folder, as a ``Path``.

    Raises:
        ValueError: not a zoo model, or the folder holds files this save may not write beside
            or replace (listed).

    Example:
        >>> import tempfile, zoo
        >>> folder = zoo.save(zoo.build("pythia-tiny"), tempfile.mkdtemp() + "/ckpt")
        >>> sorted(p.name for p in folder.iterdir())
        ['config.json', 'model.safetensors']
    """
    if not isinstance(model, RecurrentLM):
        raise ValueError(f"zoo.save expects a zoo RecurrentLM, got {type(model).__name__}")
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in model_tensors(model).items()}
    write_id = uuid.uuid4().hex
    header = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "write_id": write_id,
        "config": model.config.to_dict(),
        "plugins": plugin_parts(model.config),  # the modules of parts the library does not define
    }
    metadata = {"format": "pt", "producer": FORMAT, "write_id": write_id}
    write_folder(
        path,
        {
            CONFIG_FILE: lambda f: f.write_text(json.dumps(header, indent=2, sort_keys=True) + "\n"),
            WEIGHTS_FILE: lambda f: save_file(tensors, f, metadata=metadata),
        },
        writer="zoo.save",
        owns=is_zoo_checkpoint,
        allow_other_files=allow_other_files,
    )
    return Path(path)


def read_config(path: str | os.PathLike) -> ModelConfig:
    """The :class:`~zoo.config.ModelConfig` of the checkpoint folder ``path``.

    Raises:
        FileNotFoundError: the folder or its ``config.json`` is missing.
        ValueError: ``config.json`` is not a ponder-zoo checkpoint config of a known version,
            or a field has the wrong type or is out of bounds (the file, field and value are
            named), or names a part that is not registered (the message names the module that
            registered it; nothing is imported).
    """
    return _read_header(_existing_folder(path))[0]


def _read_header(folder: Path) -> tuple[ModelConfig, str | None]:
    config_file = folder / CONFIG_FILE
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder} has no {CONFIG_FILE}; it is not a checkpoint written by zoo.save")
    try:
        header = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
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
    if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise ValueError(
            f"{config_file} has format_version {version!r}; this ponder-zoo reads versions 1 to "
            f"{FORMAT_VERSION}. Upgrade ponder-zoo if the file is newer"
        )
    require_parts(header.get("config"), header.get("plugins"), str(config_file))
    try:
        config = ModelConfig.from_dict(header.get("config"))
    except ValueError as err:
        raise ValueError(f"{config_file}: {err}") from None
    write_id = header.get("write_id")
    return config, write_id if isinstance(write_id, str) else None


def load(
    path: str | os.PathLike, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> RecurrentLM:
    """Rebuilds the model saved at ``path`` by :func:`save` and loads its weights strictly.

    The config is parsed strictly and the model's size checked before anything is
    allocated; a save in progress on the folder is waited for.

    Args:
        path: the checkpoint folder.
        device: where to put the model (default CPU).
        dtype: parameter dtype; ``None`` keeps the dtype the weights were saved in.

    Raises:
        FileNotFoundError: the folder, ``config.json`` or ``model.safetensors`` is missing.
        ValueError: a corrupted or truncated file (named), a config field of the wrong type
            or size, files from two different saves, tensors that do not fit the config, or a
            part (a plugin's halting policy, say) that is not registered: the message names the
            module that registered it when the model was saved. Loading never imports code
            because a file names it; import the module first.

    Example:
        >>> import tempfile, torch, zoo
        >>> model = zoo.build("pythia-tiny")
        >>> folder = zoo.save(model, tempfile.mkdtemp() + "/ckpt")
        >>> torch.equal(zoo.load(folder).embed.weight, model.embed.weight)
        True
    """
    folder = _existing_folder(path)
    with folder_lock(folder, shared=True, purpose="reading"):
        config, write_id = _read_header(folder)
        weights = folder / WEIGHTS_FILE
        stored = index_safetensors([weights])
        with _open_safetensors(weights) as handle:
            stored_id = (handle.metadata() or {}).get("write_id")
        if write_id is not None and stored_id is not None and stored_id != write_id:
            raise ValueError(
                f"{folder / CONFIG_FILE} and {weights} come from two different saves (a save was "
                f"interrupted between renaming the two); the weights may not fit the config: save "
                f"the model again"
            )
        if dtype is None:
            dtype = stored["embed.weight"].dtype if "embed.weight" in stored else torch.float32
        if not dtype.is_floating_point:
            raise ValueError(
                f"{weights} stores embed.weight as {dtype}; model weights are floating point, so "
                f"the file is not a model's (or it is corrupted)"
            )
        try:
            skeleton = build_model(config, device="meta", dtype=dtype)
        except ValueError as err:  # e.g. halting_kwargs the policy does not take
            raise ValueError(f"{folder / CONFIG_FILE}: {err}") from None
        model = materialize(skeleton, device, source=str(folder))
        load_into(model, stored, source=str(weights))
    return model


def _existing_folder(path: str | os.PathLike) -> Path:
    folder = Path(path)
    if folder.is_dir():
        return folder
    if folder.exists():
        raise ValueError(f"{folder} is a file; a checkpoint is a folder")
    raise FileNotFoundError(f"checkpoint folder {folder} does not exist")


# Trained runs: opening what the trainer wrote, without the trainer -------------------------


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The checkpoint ``<out_dir>/checkpoints/latest`` points at, or ``None`` if there is none.

    Raises:
        ValueError: the pointer names a folder that does not exist; the message names the
            newest intact earlier checkpoint, if any.
    """
    pointer = Path(out_dir) / CHECKPOINTS / "latest"
    if not pointer.is_file():
        return None
    name = pointer.read_text(encoding="utf-8", errors="replace").strip()
    folder = pointer.parent / name
    if not (re.fullmatch(r"step-\d{6,}", name) and folder.is_dir()):
        raise ValueError(
            f"{pointer} names {name!r}, which is not a checkpoint folder; the run folder is damaged. "
            + _fallback_advice(pointer.parent, None)
        )
    return folder


def checkpoint_problem(folder: str | os.PathLike) -> str | None:
    """What is wrong with the trainer checkpoint ``folder``, or ``None`` if every file reads.

    Reads each file's header or JSON (not the tensor data): ``trainer.json``, the model
    (``model/config.json`` and ``model/model.safetensors``), ``optimizer.safetensors``,
    ``optimizer.json`` and ``rng.safetensors``. The answer names the damaged file.
    """
    folder = Path(folder)
    try:
        trainer = _read_json(folder / "trainer.json")
        if not isinstance(trainer, dict) or not {"step", "data", "config"} <= set(trainer):
            return f"{folder / 'trainer.json'} lacks step, data or config"
        read_config(folder / "model")
        _read_json(folder / "optimizer.json")
        files = ("model/model.safetensors", "optimizer.safetensors", "rng.safetensors")
        index_safetensors([folder / name for name in files])
    except (OSError, ValueError) as err:
        return str(err)
    return None


def _read_json(file: Path) -> Any:
    if not file.is_file():
        raise FileNotFoundError(f"{file} is missing")
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{file} is not valid JSON ({err}); it is truncated or corrupted") from None


def _fallback_advice(checkpoints: Path, damaged: Path | None) -> str:
    """Names the newest intact checkpoint older than ``damaged`` and how to resume from it."""
    below = _step_number(damaged) if damaged is not None else math.inf
    candidates = sorted(
        (p for p in checkpoints.glob("step-*") if p.is_dir() and _step_number(p) < below),
        key=_step_number,
        reverse=True,
    )
    for earlier in candidates:
        if checkpoint_problem(earlier) is None:
            pointer = checkpoints / "latest"
            return (
                f"The earlier checkpoint {earlier} (step {_step_number(earlier)}) is intact: to resume "
                f"from it, write its name into {pointer} (echo {earlier.name} > {pointer}) and resume again"
            )
    return "No earlier checkpoint is intact; start a new run in another folder"


def _step_number(folder: Path) -> int:
    match = re.fullmatch(r"step-(\d+)", folder.name)
    return int(match.group(1)) if match else -1


def load_trained(
    path: str | os.PathLike, *, device: torch.device | str | None = None
) -> tuple[RecurrentLM, str | None]:
    """Opens a model from any folder the recipes deal in, with the tokenizer it was trained with.

    Args:
        path: a training run folder (its latest checkpoint is opened), one checkpoint of it
            (``.../checkpoints/step-N``), a :func:`zoo.save` folder, or a Hugging Face
            GPT-NeoX folder (:func:`zoo.from_hf`).
        device: where to put the model.

    Returns:
        (model, tokenizer): the tokenizer's name as :func:`zoo.data.load_tokenizer` takes it,
        from the run's ``run.json`` or a ``tokenizer.json`` beside Hugging Face weights;
        ``None`` if the folder does not say.

    Raises:
        ValueError: ``path`` is none of these.
    """
    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(
            f"{folder} is not a folder; pass a run folder, a checkpoint folder or a Hugging Face folder"
        )
    tokenizer = None
    for parent in [folder, *list(folder.parents)[:3]]:
        if (parent / RUN_INFO).is_file():
            info = _read_json(parent / RUN_INFO)
            tokenizer = info.get("tokenizer") if isinstance(info, dict) else None
            if tokenizer is not None and not isinstance(tokenizer, str):
                raise ValueError(f"{parent / RUN_INFO}: tokenizer must be a name or path, got {tokenizer!r}")
            break
    latest = latest_checkpoint(folder) if (folder / CHECKPOINTS).is_dir() else None
    if latest is not None:
        folder = latest
    if (folder / "model" / "config.json").is_file():
        folder = folder / "model"
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ValueError(
            f"{folder} holds no config.json: it is not a run folder with checkpoints, a zoo.save "
            f"checkpoint or a Hugging Face folder"
        )
    header = _read_json(config_file)
    if isinstance(header, dict) and "model_type" in header:
        from zoo.interop import from_hf

        if (folder / "tokenizer.json").is_file():
            tokenizer = str(folder / "tokenizer.json")
        return from_hf(folder, device=device), tokenizer
    return load(folder, device=device), tokenizer
