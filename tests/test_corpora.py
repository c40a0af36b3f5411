"""The standard library's source as a corpus: split, BPE tokenizer and memory-mapped streams."""

from __future__ import annotations

import zlib

import numpy as np
import pytest

from zoo import corpora
from zoo.data import ByteTokenizer, load_corpus, load_tokenizer


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One cache folder for the module: the BPE is trained once."""
    folder = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("PONDER_ZOO_CACHE", str(folder))
        yield folder


def test_the_split_is_by_file_and_disjoint():
    train, val = corpora.stdlib_files("train"), corpora.stdlib_files("validation")
    assert not set(train) & set(val)
    assert 0.07 < len(val) / (len(train) + len(val)) < 0.13
    assert all(zlib.crc32(name.encode()) % 10 == 0 for name in val)
    assert train == sorted(train)
    assert [zlib.crc32(n.encode()) for n in val] == sorted(zlib.crc32(n.encode()) for n in val)
    assert len(corpora.stdlib_documents("validation")) == len(val)
    assert sum(map(len, corpora.stdlib_documents("train"))) > 10_000_000  # big enough to not repeat
    with pytest.raises(ValueError, match="split"):
        corpora.stdlib_files("test")


def test_bpe_is_trained_once_cached_and_named_for_rebuilding(cache):
    tok = corpora.stdlib_tokenizer(512)
    assert tok.name == "stdlib-bpe-512" and tok.vocab_size == 512 and tok.eos_token_id is not None
    path = tok.path
    stamp = path.stat().st_mtime_ns
    again = load_tokenizer("stdlib-bpe-512")  # the name a run records opens the same tokenizer
    assert again.path == path and path.stat().st_mtime_ns == stamp
    text = corpora.stdlib_documents("validation")[0][:2000]
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert len(ids) < 0.7 * len(text.encode())  # merges: fewer ids than bytes


@pytest.mark.parametrize("bad", [100, 70000, "512", True])
def test_bpe_size_is_checked(bad):
    with pytest.raises(ValueError, match="vocab_size"):
        corpora.stdlib_tokenizer(bad)
    with pytest.raises(ValueError, match="stdlib-bpe"):
        load_tokenizer("stdlib-bpe-big")


def test_streams_are_memory_mapped_and_hold_every_document(cache):
    tok = ByteTokenizer()
    train, val = load_corpus("stdlib", tok)
    assert isinstance(val.tokens, np.memmap) and val.tokens.dtype == np.uint16
    docs = corpora.stdlib_documents("validation")
    assert len(val) == sum(len(d.encode()) for d in docs) + len(docs)  # each doc + end-of-text
    first = docs[0].encode()
    assert bytes(np.asarray(val.tokens[: len(first)], dtype=np.uint8)) == first
    assert int(val.tokens[len(first)]) == tok.eos_token_id
    files = sorted(p for p in cache.rglob("*.bin"))
    stamps = [p.stat().st_mtime_ns for p in files]
    load_corpus("stdlib", tok)  # read from the cache, nothing rewritten
    assert [p.stat().st_mtime_ns for p in files] == stamps
    assert len(train) > 9 * len(val) // 2


def test_another_tokenizer_gets_its_own_token_files(cache):
    _, by_bytes = load_corpus("stdlib", ByteTokenizer())
    _, by_bpe = load_corpus("stdlib", corpora.stdlib_tokenizer(512))
    assert by_bpe.tokens.filename != by_bytes.tokens.filename
    assert len(by_bpe) < len(by_bytes)


def test_docstring_examples_run():
    import doctest

    result = doctest.testmod(corpora)
    assert result.attempted > 0 and result.failed == 0
