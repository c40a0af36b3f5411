"""Token streams, tokenizers and deterministic batch sampling for training and evaluation.

A corpus is a :class:`TokenStream`: one flat array of token ids, documents joined by an
end-of-text id. Three sources give one:

* the **embedded corpus**, the documentation text that ships with CPython
  (``pydoc_data.topics.topics``, about 0.47 MB), split by topic into train and validation
  (:func:`embedded_documents`), so a fresh clone can train without downloading anything;
* **local text or jsonl files** (:func:`read_documents`), tokenized with a :class:`Tokenizer`;
* **pre-tokenized ``.bin`` files** as GPT-NeoX (Megatron ``MMapIndexedDataset``, with an
  ``.idx`` beside it) and nanoGPT (raw ``uint16``) write them, read through ``numpy.memmap``
  without loading them (:func:`load_bin`).

Tokenizers: :class:`ByteTokenizer` (bytes 0..255 plus an end-of-text id 256; fits the
``*-tiny`` presets' 512-row vocabulary) and :class:`HFTokenizer` (a ``tokenizer.json`` read
with the ``tokenizers`` library, such as the GPT-NeoX tokenizer in a Pythia folder).

Batches: :class:`BatchSampler` draws the global batch of optimizer step ``position`` as a
pure function of ``(seed, position)`` (nanoGPT's random windows, seeded per step), so a run
resumed from a saved position sees exactly the batches an uninterrupted run would, and any
number of processes can split the same global batch between them.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

__all__ = [
    "Tokenizer",
    "ByteTokenizer",
    "HFTokenizer",
    "load_tokenizer",
    "resolve_tokenizer",
    "TokenStream",
    "embedded_documents",
    "read_documents",
    "tokenize_documents",
    "load_bin",
    "write_bin",
    "load_corpus",
    "BatchSampler",
    "eval_windows",
    "EMBEDDED",
]

EMBEDDED = "embedded"
"""The name that selects the embedded corpus wherever a data path is expected."""

# Megatron / GPT-NeoX MMapIndexedDataset: magic, then <Q version, then <B dtype code.
_MMAP_MAGIC = b"MMIDIDX\x00\x00"
_MMAP_DTYPES = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float64,
    8: np.uint16,
}
_TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")


# Tokenizers ---------------------------------------------------------------------------------


class Tokenizer(Protocol):
    """What the data pipeline, the recipes and the lm-eval adapter need from a tokenizer.

    Attributes:
        name: how to load it again (``"byte"`` or the path of a ``tokenizer.json``).
        vocab_size: number of ids it can produce.
        eos_token_id: the end-of-text id placed between documents (``None`` if it has none).
    """

    name: str
    vocab_size: int
    eos_token_id: int | None

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens added)."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``."""
        ...


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255, plus end-of-text id 256.

    The built-in tokenizer for the embedded corpus: no files, no training, and it fits the
    512-row vocabulary of the ``*-tiny`` presets.

    Example:
        >>> tok = ByteTokenizer()
        >>> tok.encode("hé")
        [104, 195, 169]
        >>> tok.decode([104, 195, 169, 256])
        'hé'
    """

    name = "byte"
    vocab_size = 257
    eos_token_id = 256

    def encode(self, text: str) -> list[int]:
        """The UTF-8 bytes of ``text``."""
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        """The text of the byte ids in ``ids``; the end-of-text id and anything above 255 are
        dropped, and broken UTF-8 sequences become U+FFFD."""
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A ``tokenizer.json`` read with the ``tokenizers`` library (e.g. Pythia's GPT-NeoX BPE).

    Args:
        path: the ``tokenizer.json`` file, or a folder holding one.
        eos_token: the end-of-text token's text; GPT-NeoX uses ``<|endoftext|>``.

    Raises:
        ValueError: no ``tokenizer.json`` at ``path``, or one the library cannot read.
    """

    def __init__(self, path: str | os.PathLike, eos_token: str = "<|endoftext|>") -> None:
        from tokenizers import Tokenizer as _Tokenizer

        file = Path(path)
        if file.is_dir():
            file = file / "tokenizer.json"
        if not file.is_file():
            raise ValueError(
                f"no tokenizer.json at {str(path)!r}; pass the tokenizer.json file or the folder that "
                f"holds it (a Hugging Face Pythia folder has one), or use the built-in 'byte' tokenizer"
            )
        self.name = str(file)
        try:
            self._tok = _Tokenizer.from_file(str(file))
        except Exception as err:  # the tokenizers library raises a bare Exception
            raise ValueError(f"{file} is not a readable tokenizer.json ({err})") from None
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.eos_token_id = self._tok.token_to_id(eos_token)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``, without special tokens."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` (special tokens skipped)."""
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)


def load_tokenizer(spec: str | os.PathLike) -> Tokenizer:
    """A tokenizer from its name: ``"byte"``, ``"stdlib-bpe-<vocab_size>"`` (the BPE trained on the
    standard library's source, :func:`zoo.corpora.stdlib_tokenizer`) or a ``tokenizer.json``
    path (file or folder).

    Raises:
        ValueError: ``spec`` is none of these, or the file is not a readable ``tokenizer.json``.
    """
    if str(spec) == "byte":
        return ByteTokenizer()
    if str(spec).startswith("stdlib-bpe-"):
        from zoo.corpora import stdlib_tokenizer

        size = str(spec).removeprefix("stdlib-bpe-")
        if not size.isdigit():
            raise ValueError(f"tokenizer {str(spec)!r}: the size after 'stdlib-bpe-' must be an int, e.g. stdlib-bpe-2048")
        return stdlib_tokenizer(int(size))
    if not Path(spec).exists():
        raise ValueError(
            f"tokenizer {str(spec)!r} is neither 'byte' nor an existing tokenizer.json file or folder"
        )
    return HFTokenizer(spec)


def resolve_tokenizer(
    requested: Tokenizer | str | os.PathLike | None,
    named: str | None,
    vocab_size: int,
    source: str | os.PathLike,
) -> Tokenizer:
    """The tokenizer to read a model with: the one asked for, else the one its folder names.

    There is no silent default: byte-level ids fed to a model trained on another tokenizer
    give meaningless text and perplexity, so bytes are used only when asked for
    (``"byte"``), by the caller or by the folder's ``run.json``.

    Args:
        requested: what the user passed (``--tokenizer``): a tokenizer, ``"byte"`` or a
            ``tokenizer.json`` path; ``None`` if nothing.
        named: what the model's folder names (``run.json``'s ``tokenizer`` entry or a
            ``tokenizer.json`` beside the weights), as :func:`zoo.checkpoint.load_trained` returns it.
        vocab_size: the model's vocabulary; the tokenizer must not produce ids beyond it.
        source: the model's folder, for messages.

    Raises:
        ValueError: neither names a tokenizer (the message says how to pass one), or the
            tokenizer produces ids the model has no rows for.

    Example:
        >>> resolve_tokenizer(None, "byte", 512, "runs/demo").name
        'byte'
        >>> resolve_tokenizer(None, None, 50304, "pythia-70m")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: pythia-70m names no tokenizer (...) ...; pass the tokenizer it was trained with: ...
    """
    spec = requested if requested is not None else named
    if spec is None:
        raise ValueError(
            f"{source} names no tokenizer (no run.json entry, no tokenizer.json beside the weights) "
            f"and its vocabulary has {vocab_size} ids; pass the tokenizer it was trained with: "
            f"--tokenizer PATH/tokenizer.json (tokenizer= in Python), or --tokenizer byte if it was "
            f"trained on UTF-8 bytes"
        )
    tokenizer = load_tokenizer(spec) if isinstance(spec, (str, os.PathLike)) else spec
    if tokenizer.vocab_size > vocab_size:
        raise ValueError(
            f"tokenizer {tokenizer.name} produces ids up to {tokenizer.vocab_size - 1}, but the model "
            f"of {source} has {vocab_size} vocabulary rows; pass the tokenizer the model was trained with"
        )
    return tokenizer


# Token streams ------------------------------------------------------------------------------


@dataclass
class TokenStream:
    """A flat array of token ids: documents joined by an end-of-text id.

    Attributes:
        tokens: (N,) integer ids; a ``numpy.memmap`` for pre-tokenized files.
        name: where the tokens came from, for error messages.
    """

    tokens: np.ndarray
    name: str

    def __post_init__(self) -> None:
        if self.tokens.ndim != 1 or not np.issubdtype(self.tokens.dtype, np.integer):
            raise ValueError(
                f"{self.name}: a token stream must be a 1-D integer array, got shape "
                f"{self.tokens.shape} and dtype {self.tokens.dtype}"
            )

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def in_memory(self) -> bool:
        """The tokens live in memory (not a memory-mapped file), so scanning them is cheap."""
        return not isinstance(self.tokens, np.memmap)

    def max_id(self) -> int:
        """The largest id in the stream (reads all of it; chunked for memory maps)."""
        if len(self) == 0:
            return -1
        chunk = 1 << 24
        return int(max(self.tokens[i : i + chunk].max() for i in range(0, len(self), chunk)))

    def fingerprint(self) -> dict[str, object]:
        """What identifies the stream's content: its length, dtype and a BLAKE2 digest.

        In-memory streams are hashed whole; memory-mapped ones (possibly hundreds of GB) by
        their first, middle and last 4 Mi tokens. The name is kept for messages but is not
        part of the identity, so a moved file is the same corpus.

        Example:
            >>> a = TokenStream(np.arange(10, dtype=np.uint16), "a")
            >>> b = TokenStream(np.arange(10, dtype=np.uint16), "b")
            >>> a.fingerprint()["digest"] == b.fingerprint()["digest"]
            True
        """
        tokens = self.tokens
        digest = hashlib.blake2b(digest_size=16)
        digest.update(f"{len(self)}:{tokens.dtype.str}".encode())
        if self.in_memory:
            digest.update(np.ascontiguousarray(tokens).tobytes())
        else:
            span = 1 << 22
            middle = max(len(self) // 2 - span // 2, 0)
            for first in sorted({0, middle, max(len(self) - span, 0)}):
                digest.update(np.asarray(tokens[first : first + span]).tobytes())
        return {"name": self.name, "tokens": len(self), "digest": digest.hexdigest()}

    def check_vocab(self, vocab_size: int) -> None:
        """Raises ``ValueError`` if any id is ``>= vocab_size``, naming the id and the fix."""
        top = self.max_id()
        if top >= vocab_size:
            raise ValueError(_vocab_message(self.name, top, vocab_size))

    def split(self, val_fraction: float) -> tuple[TokenStream, TokenStream]:
        """(train, validation): the last ``val_fraction`` of the tokens is the validation part.

        Raises:
            ValueError: ``val_fraction`` outside (0, 1).
        """
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction!r}")
        cut = len(self) - max(1, int(len(self) * val_fraction))
        return (
            TokenStream(self.tokens[:cut], f"{self.name} (train part)"),
            TokenStream(self.tokens[cut:], f"{self.name} (validation part)"),
        )


def _vocab_message(name: str, token: int, vocab_size: int) -> str:
    return (
        f"{name} holds token id {token}, but the model's vocabulary has {vocab_size} rows "
        f"(ids 0..{vocab_size - 1}); use the tokenizer the model was trained with, or a model "
        f"with vocab_size > {token}"
    )


def embedded_documents(split: str) -> list[str]:
    """Documents of the embedded corpus: CPython's ``pydoc_data.topics.topics``.

    Topics are assigned to a split by a hash of their name (CRC-32 modulo 10 equal to 0 goes
    to validation, about 10%), so the split is the same on every machine and the validation
    topics are held out whole.

    Args:
        split: ``"train"`` or ``"validation"``.

    Example:
        >>> len(embedded_documents("train")) > len(embedded_documents("validation")) > 0
        True
    """
    from pydoc_data.topics import topics

    if split not in ("train", "validation"):
        raise ValueError(f"split must be 'train' or 'validation', got {split!r}")
    want_val = split == "validation"
    names = sorted(name for name in topics if (zlib.crc32(name.encode()) % 10 == 0) == want_val)
    return [topics[name] for name in names]


def read_documents(path: str | os.PathLike, text_key: str = "text") -> list[str]:
    """Documents from local files: a text file is one document, a jsonl line is one document.

    Args:
        path: a ``.txt``/``.md``/``.rst`` file, a ``.jsonl`` file (one JSON object per line
            with a ``text_key`` string field), or a folder of such files (read in sorted order).
        text_key: the jsonl field holding the text.

    Raises:
        ValueError: missing path, unknown suffix, or a jsonl line without ``text_key``.
    """
    root = Path(path)
    if not root.exists():
        raise ValueError(f"data path {str(path)!r} does not exist")
    files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
    docs: list[str] = []
    for file in files:
        suffix = file.suffix.lower()
        if suffix == ".jsonl":
            found = 0
            for number, line in enumerate(_utf8_text(file).splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(
                        f"{file}:{number}: not valid JSON ({err.msg} at column {err.colno}); each line "
                        f"of a .jsonl file must be one JSON object"
                    ) from None
                if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
                    raise ValueError(
                        f"{file}:{number}: expected a JSON object with a string field {text_key!r}; "
                        f"pass text_key= to read another field"
                    )
                docs.append(record[text_key])
                found += 1
            if not found:
                raise ValueError(f"{file} holds no documents (no JSON lines); remove it or fill it")
        elif suffix in _TEXT_SUFFIXES:
            text = _utf8_text(file)
            if not text.strip():
                raise ValueError(f"{file} is empty; remove it from the data or fill it")
            docs.append(text)
        elif not root.is_dir():
            raise ValueError(
                f"{file}: unknown data file type {suffix!r}; use text ({', '.join(_TEXT_SUFFIXES)}), "
                f".jsonl, or a pre-tokenized .bin"
            )
    if not docs:
        raise ValueError(f"no documents found under {str(path)!r} (text, .jsonl)")
    return docs


def _utf8_text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"{file} is not UTF-8 text (byte {err.start}: {err.reason}); convert it to UTF-8, e.g. "
            f"iconv -f latin1 -t utf-8"
        ) from None


def tokenize_documents(docs: Iterable[str], tokenizer: Tokenizer, name: str) -> TokenStream:
    """One stream of ``docs`` tokenized, each followed by the end-of-text id (if the tokenizer has one).

    The ids are stored as ``uint16`` when they fit, else ``uint32``, as the ``.bin`` formats do.
    """
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    ids: list[int] = []
    for doc in docs:
        ids.extend(tokenizer.encode(doc))
        ids.extend(eos)
    dtype = np.uint16 if tokenizer.vocab_size <= 1 << 16 else np.uint32
    return TokenStream(np.asarray(ids, dtype=dtype), name)


def load_bin(path: str | os.PathLike, dtype: str | np.dtype | None = None) -> TokenStream:
    """A memory-mapped pre-tokenized ``.bin`` file (nothing is read until batches are drawn).

    The dtype comes from, in order: the ``dtype`` argument; the Megatron/GPT-NeoX ``.idx``
    file beside it (``MMIDIDX`` header); ``uint16``, what nanoGPT writes.

    Args:
        path: the ``.bin`` file.
        dtype: ``"uint16"`` or ``"uint32"`` (any numpy integer dtype), to override.

    Raises:
        ValueError: missing file, a size that is not a whole number of tokens, or a
            non-integer dtype.
    """
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"pre-tokenized file {str(path)!r} does not exist")
    if dtype is None:
        dtype = _idx_dtype(file.with_suffix(".idx")) or np.uint16
    dtype = np.dtype(dtype)
    if not np.issubdtype(dtype, np.integer):
        raise ValueError(f"{file}: token dtype must be an integer type such as uint16 or uint32, got {dtype}")
    size = file.stat().st_size
    if size == 0:
        raise ValueError(f"pre-tokenized file {file} is empty; it holds no tokens")
    if size % dtype.itemsize:
        raise ValueError(
            f"{file} holds {size} bytes, not a whole number of {dtype} tokens; pass the dtype it was "
            f"written with (uint16 or uint32)"
        )
    return TokenStream(np.memmap(file, dtype=dtype, mode="r"), str(file))


def _idx_dtype(idx: Path) -> np.dtype | None:
    if not idx.is_file():
        return None
    with open(idx, "rb") as handle:
        header = handle.read(len(_MMAP_MAGIC) + 9)
    if not header.startswith(_MMAP_MAGIC):
        return None
    (code,) = struct.unpack("<B", header[len(_MMAP_MAGIC) + 8 :])
    if code not in _MMAP_DTYPES:
        raise ValueError(f"{idx}: unknown token dtype code {code} in the index header")
    return np.dtype(_MMAP_DTYPES[code])


def write_bin(path: str | os.PathLike, tokens: Sequence[int] | np.ndarray, dtype: str = "uint16") -> None:
    """Writes ``tokens`` as a raw ``.bin`` (nanoGPT's layout: the ids, nothing else).

    Raises:
        ValueError: an id does not fit ``dtype``.
    """
    array = np.asarray(tokens)
    info = np.iinfo(np.dtype(dtype))
    if array.size and (array.min() < info.min or array.max() > info.max):
        raise ValueError(f"token ids span [{array.min()}, {array.max()}], which does not fit {dtype}")
    array.astype(dtype).tofile(path)


def load_corpus(
    data: str | os.PathLike,
    tokenizer: Tokenizer,
    *,
    val_data: str | os.PathLike | None = None,
    val_fraction: float = 0.05,
    dtype: str | None = None,
) -> tuple[TokenStream, TokenStream]:
    """(train, validation) streams from a data spec, the form recipes take on the command line.

    Args:
        data: ``"embedded"`` (the CPython documentation corpus, split by topic), ``"stdlib"``
            (the standard library's source, split by file, tokenized once and cached:
            :mod:`zoo.corpora`), a ``.bin``
            file (pre-tokenized; ``tokenizer`` unused), or text/jsonl files or a folder of them.
        tokenizer: tokenizes text sources.
        val_data: a separate validation source of the same kinds; without it the last
            ``val_fraction`` of ``data`` is held out (the embedded and stdlib corpora have
            their own splits).
        val_fraction: share of the tokens held out when ``val_data`` is not given.
        dtype: token dtype of ``.bin`` files (see :func:`load_bin`).
    """

    if str(data) == "stdlib" and val_data is None:
        from zoo.corpora import stdlib_streams

        return stdlib_streams(tokenizer)

    def one(spec: str | os.PathLike, split: str) -> TokenStream:
        if str(spec) == EMBEDDED:
            return tokenize_documents(embedded_documents(split), tokenizer, f"embedded corpus ({split})")
        if Path(spec).suffix == ".bin":
            return load_bin(spec, dtype)
        return tokenize_documents(read_documents(spec), tokenizer, str(spec))

    if val_data is not None:
        return one(data, "train"), one(val_data, "validation")
    if str(data) == EMBEDDED:
        return one(data, "train"), one(data, "validation")
    return one(data, "train").split(val_fraction)


# Sampling -----------------------------------------------------------------------------------


class BatchSampler:
    """Deterministic random windows: the batch at ``position`` depends on ``(seed, position)`` only.

    Each batch holds ``batch_size`` windows of ``seq_len + 1`` consecutive tokens (inputs and
    their next-token targets) starting at offsets drawn uniformly with a generator seeded by
    ``(seed, position)``. The sampler's position (the next batch to draw) is all the state
    there is: :meth:`state_dict` / :meth:`load_state_dict` save and restore it.

    Args:
        stream: the corpus.
        seq_len: tokens per input window.
        batch_size: windows per batch (the global batch, before any split across processes).
        seed: the data seed.
        vocab_size: if given, every batch (and, for in-memory streams, the whole stream up
            front) is checked to hold only ids below it.

    Raises:
        ValueError: the stream is shorter than one window, or holds an id ``>= vocab_size``.

    Example:
        >>> stream = TokenStream(np.arange(100, dtype=np.uint16), "toy")
        >>> sampler = BatchSampler(stream, seq_len=8, batch_size=2, seed=0)
        >>> sampler.batch(3).shape
        (2, 9)
        >>> bool((sampler.batch(3) == BatchSampler(stream, 8, 2, seed=0).batch(3)).all())
        True
    """

    def __init__(
        self, stream: TokenStream, seq_len: int, batch_size: int, seed: int = 0, vocab_size: int | None = None
    ) -> None:
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"seq_len and batch_size must be positive, got {seq_len} and {batch_size}")
        if len(stream) < seq_len + 1:
            raise ValueError(
                f"{stream.name} has {len(stream)} tokens, fewer than one window of seq_len + 1 = "
                f"{seq_len + 1}; lower seq_len or add data"
            )
        if vocab_size is not None and stream.in_memory:
            stream.check_vocab(vocab_size)
        self.stream = stream
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        self.vocab_size = vocab_size
        self.position = 0

    def offsets(self, position: int) -> np.ndarray:
        """(batch_size,) start offsets of the windows of batch ``position``."""
        rng = np.random.default_rng([self.seed, position])
        return rng.integers(0, len(self.stream) - self.seq_len, size=self.batch_size)

    def batch(self, position: int, rows: slice | None = None) -> np.ndarray:
        """Batch ``position`` as an int64 array (batch_size, seq_len + 1), or the ``rows`` of it."""
        offsets = self.offsets(position)
        if rows is not None:
            offsets = offsets[rows]
        tokens = self.stream.tokens
        out = np.stack([np.asarray(tokens[o : o + self.seq_len + 1]) for o in offsets]).astype(np.int64)
        if self.vocab_size is not None and out.size and out.max() >= self.vocab_size:
            raise ValueError(_vocab_message(self.stream.name, int(out.max()), self.vocab_size))
        return out

    def __next__(self) -> np.ndarray:
        out = self.batch(self.position)
        self.position += 1
        return out

    def __iter__(self) -> BatchSampler:
        return self

    def state_dict(self) -> dict[str, int]:
        """The sampler's state: seed, window shape and the next position."""
        return {
            "seed": self.seed,
            "position": self.position,
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restores :meth:`state_dict`'s output.

        Raises:
            ValueError: the saved seed or window shape differs from this sampler's, so the
                restored position would not continue the same sequence of batches.
        """
        for key in ("seed", "seq_len", "batch_size"):
            if int(state[key]) != getattr(self, key):
                raise ValueError(
                    f"saved data {key} is {state[key]} but this run uses {getattr(self, key)}; "
                    f"resume with the same settings or start a new run"
                )
        self.position = int(state["position"])


def eval_windows(
    stream: TokenStream, seq_len: int, max_windows: int | None = None, spread: bool = False
) -> np.ndarray:
    """Non-overlapping windows (n, seq_len + 1) of ``stream``, deterministic, for validation.

    By default the windows are consecutive from the start: window ``j`` covers tokens
    ``[j * seq_len, (j + 1) * seq_len]``, so each token after the first is predicted exactly
    once. With ``spread`` and fewer windows than the stream holds, the ``max_windows``
    windows are instead laid evenly over the whole stream (the slots ``round(j * m / n)``
    of the ``m`` consecutive ones): the same cost, drawn from every part of the data
    rather than its first documents.

    Raises:
        ValueError: the stream is shorter than one window.

    Example:
        >>> stream = TokenStream(np.arange(101, dtype=np.uint16), "toy")
        >>> eval_windows(stream, 10, 3)[:, 0].tolist(), eval_windows(stream, 10, 3, spread=True)[:, 0].tolist()
        ([0, 10, 20], [0, 30, 70])
    """
    available = (len(stream) - 1) // seq_len
    n = available if max_windows is None else min(available, max_windows)
    if n < 1:
        raise ValueError(
            f"{stream.name} has {len(stream)} tokens, fewer than one evaluation window of "
            f"{seq_len + 1}; lower seq_len"
        )
    slots = range(n)
    if spread and n < available:
        slots = [round(j * available / n) for j in range(n)]  # increasing: n <= available
    return np.stack(
        [np.asarray(stream.tokens[j * seq_len : (j + 1) * seq_len + 1]).astype(np.int64) for j in slots]
    )
