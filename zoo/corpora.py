"""The Python standard library's source as a corpus, with a BPE tokenizer trained on it.

Every Python installation carries about 30 MB of ``.py`` source in its standard library
(tests included), enough text to train small models for thousands of steps without
repeating a window, on any machine and without a download. This module turns it into
training data:

* :func:`stdlib_documents`: one document per source file, split by a hash of the file's
  path relative to the library root (CRC-32 modulo 10 equal to 0 goes to validation,
  about 10%), so the split is the same wherever the same Python version runs and the
  validation files are held out whole. Validation files come in hash order, so the first
  windows of the validation stream are drawn from many files. Files that are not valid
  UTF-8 (a handful of encoding tests) are left out.
* :func:`stdlib_tokenizer`: a byte-level BPE (GPT-2 style, the ``tokenizers`` library)
  with ``vocab_size`` entries, ``<|endoftext|>`` among them, trained on the training split
  and cached.
* :func:`stdlib_streams`: the training and validation token streams, tokenized once and
  cached as ``uint16`` ``.bin`` files read through ``numpy.memmap``.

The cache lives in ``$PONDER_ZOO_CACHE``, else ``$XDG_CACHE_HOME/ponder-zoo``, else
``~/.cache/ponder-zoo``, under a key made of the Python version and a fingerprint of the
files, so another Python (another corpus) never reads a stale cache. Every file is written
to a temporary name and renamed into place, so concurrent first uses are safe.

Recipes select the corpus with ``--data stdlib`` and the tokenizer with
``--tokenizer stdlib-bpe-2048`` (any size after the prefix).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np

from zoo.data import HFTokenizer, Tokenizer, TokenStream, load_bin

__all__ = [
    "STDLIB",
    "BPE_PREFIX",
    "stdlib_root",
    "stdlib_files",
    "stdlib_documents",
    "stdlib_tokenizer",
    "stdlib_streams",
    "cache_root",
    "StdlibBPE",
]

STDLIB = "stdlib"
"""The name that selects the standard-library corpus wherever a data path is expected."""

BPE_PREFIX = "stdlib-bpe-"
"""Tokenizer names ``stdlib-bpe-<vocab_size>`` select a BPE trained on the corpus."""

_EOS = "<|endoftext|>"
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def stdlib_root() -> Path:
    """The folder of the running interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def cache_root() -> Path:
    """Where corpora and tokenizers are cached (see the module docstring)."""
    if os.environ.get("PONDER_ZOO_CACHE"):
        return Path(os.environ["PONDER_ZOO_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ponder-zoo"


def _split_of(relative: str) -> str:
    return "validation" if zlib.crc32(relative.encode()) % 10 == 0 else "train"


@lru_cache(maxsize=1)
def _read_all() -> tuple[tuple[str, str], ...]:
    """(relative path, text) of every UTF-8 ``.py`` file of the standard library, by path."""
    root = stdlib_root()
    out = []
    for file in sorted(root.rglob("*.py")):
        relative = file.relative_to(root)
        if _SKIP_DIRS & set(relative.parts):
            continue
        try:
            text = file.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # a few encoding tests are deliberately not UTF-8
        out.append((relative.as_posix(), text))
    if not out:
        raise ValueError(
            f"no Python source found under {root}; this interpreter ships without its standard "
            f"library source, so the 'stdlib' corpus is unavailable here (use 'embedded' or your own data)"
        )
    return tuple(out)


def stdlib_files(split: str) -> list[str]:
    """Relative paths of the split's files: training files by path, validation files by hash.

    Args:
        split: ``"train"`` or ``"validation"``.
    """
    if split not in ("train", "validation"):
        raise ValueError(f"split must be 'train' or 'validation', got {split!r}")
    names = [name for name, _ in _read_all() if _split_of(name) == split]
    if split == "validation":
        names.sort(key=lambda name: zlib.crc32(name.encode()))
    return names


def stdlib_documents(split: str) -> list[str]:
    """The source text of the split's files, in :func:`stdlib_files` order.

    Example:
        >>> docs = stdlib_documents("validation")
        >>> len(stdlib_documents("train")) > 5 * len(docs) > 0
        True
    """
    texts = dict(_read_all())
    return [texts[name] for name in stdlib_files(split)]


@lru_cache(maxsize=1)
def _fingerprint() -> str:
    """Python version and a hash of every file's path and content: the cache key."""
    digest = hashlib.sha256()
    for name, text in _read_all():
        digest.update(name.encode())
        digest.update(zlib.crc32(text.encode()).to_bytes(4, "little"))
    version = "py{}.{}.{}".format(*sys.version_info[:3])
    return f"{version}-{digest.hexdigest()[:12]}"


def _corpus_dir() -> Path:
    return cache_root() / STDLIB / _fingerprint()


def _write_atomically(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class StdlibBPE(HFTokenizer):
    """The byte-level BPE trained on the standard library's training split.

    Its :attr:`name` is ``stdlib-bpe-<vocab_size>``, so a run records a name that rebuilds the
    same tokenizer on any machine with the same Python, not a path into a cache.
    """

    def __init__(self, path: Path, vocab_size: int) -> None:
        super().__init__(path, eos_token=_EOS)
        self.path = Path(path)
        self.name = f"{BPE_PREFIX}{vocab_size}"


def stdlib_tokenizer(vocab_size: int = 2048) -> StdlibBPE:
    """The byte-level BPE of ``vocab_size`` entries trained on the corpus (cached).

    Training takes about ten seconds the first time; later calls read ``tokenizer.json``
    from the cache. The result is deterministic for a given corpus and size.

    Args:
        vocab_size: entries, ``<|endoftext|>`` and the 256 byte symbols included
            (at least 512, at most 65536 so that ids fit ``uint16``).

    Raises:
        ValueError: ``vocab_size`` out of range.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or not 512 <= vocab_size <= 1 << 16:
        raise ValueError(f"stdlib tokenizer vocab_size must be an int in [512, 65536], got {vocab_size!r}")
    path = _corpus_dir() / f"bpe-{vocab_size}" / "tokenizer.json"
    if not path.is_file():
        from tokenizers import Tokenizer as _Tokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        tok = _Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[_EOS],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(stdlib_documents("train"), trainer)
        _write_atomically(path, lambda tmp: tmp.write_text(tok.to_str()))
    return StdlibBPE(path, vocab_size)


def _tokenize(docs: list[str], tokenizer: Tokenizer) -> np.ndarray:
    """The documents' ids, each followed by the end-of-text id, as one ``uint16`` array
    (built document by document: no Python list of every id)."""
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    parts = [np.asarray(tokenizer.encode(doc) + eos, dtype=np.uint16) for doc in docs]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint16)


def stdlib_streams(tokenizer: Tokenizer) -> tuple[TokenStream, TokenStream]:
    """(train, validation) token streams of the corpus under ``tokenizer``, memory-mapped.

    Tokenized once per tokenizer and cached beside it as ``train.bin`` / ``validation.bin``
    (``uint16``, each document followed by the end-of-text id), with ``meta.json``
    recording the token counts.

    Args:
        tokenizer: any tokenizer with at most 65536 ids (the ``byte`` tokenizer too).
    """
    if tokenizer.vocab_size > 1 << 16:
        raise ValueError(
            f"the stdlib corpus caches uint16 ids; tokenizer {tokenizer.name!r} has "
            f"{tokenizer.vocab_size} ids, more than 65536"
        )
    key = hashlib.sha256(tokenizer.name.encode())
    if isinstance(tokenizer, HFTokenizer):  # the content decides, not only the name
        key.update(Path(getattr(tokenizer, "path", tokenizer.name)).read_bytes())
    folder = _corpus_dir() / f"tokens-{key.hexdigest()[:12]}"
    streams = []
    for split in ("train", "validation"):
        file = folder / f"{split}.bin"
        if not file.is_file():
            tokens = _tokenize(stdlib_documents(split), tokenizer)
            _write_atomically(file, lambda tmp: tokens.tofile(tmp))
            meta = {"tokenizer": tokenizer.name, "split": split, "tokens": int(tokens.size)}
            _write_atomically(folder / f"{split}.json", lambda tmp: tmp.write_text(json.dumps(meta)))
        stream = load_bin(file, "uint16")
        streams.append(TokenStream(stream.tokens, f"stdlib corpus ({split}, {tokenizer.name})"))
    return streams[0], streams[1]
