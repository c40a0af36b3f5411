"""Data: tokenizers, the three corpus sources, vocabulary checks and deterministic sampling."""

from __future__ import annotations

import json
import struct
from pydoc_data.topics import topics

import numpy as np
import pytest

from zoo.data import (
    BatchSampler,
    ByteTokenizer,
    HFTokenizer,
    TokenStream,
    embedded_documents,
    eval_windows,
    load_bin,
    load_corpus,
    load_tokenizer,
    read_documents,
    resolve_tokenizer,
    tokenize_documents,
    write_bin,
)


def make_tokenizer_json(folder) -> str:
    """A small byte-level BPE tokenizer.json, GPT-NeoX style, trained on a few documents."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(embedded_documents("train")[:10], trainer)
    path = folder / "tokenizer.json"
    tok.save(str(path))
    return str(path)


# Tokenizers -----------------------------------------------------------------------------------


def test_byte_tokenizer_round_trips_and_fits_tiny_vocab():
    tok = ByteTokenizer()
    text = "def f(x):\n    return x ** 2  # ünïcode ✓"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids + [tok.eos_token_id]) == text
    assert tok.vocab_size == 257 <= 512 and tok.eos_token_id == 256
    assert load_tokenizer("byte").name == "byte"


def test_hf_tokenizer_reads_tokenizer_json(tmp_path):
    path = make_tokenizer_json(tmp_path)
    from tokenizers import Tokenizer

    reference = Tokenizer.from_file(path)
    for spec in (path, tmp_path):  # the file, or the folder holding it
        tok = load_tokenizer(spec)
        assert isinstance(tok, HFTokenizer)
        text = "The assert statement is a convenient way to insert debugging assertions."
        assert tok.encode(text) == reference.encode(text).ids
        assert tok.decode(tok.encode(text)) == text
        assert tok.eos_token_id == reference.token_to_id("<|endoftext|>")
        assert tok.vocab_size == reference.get_vocab_size()


def test_load_tokenizer_rejects_unknown(tmp_path):
    with pytest.raises(ValueError, match="neither 'byte' nor"):
        load_tokenizer(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="no tokenizer.json"):
        HFTokenizer(tmp_path)


# Sources --------------------------------------------------------------------------------------


def test_embedded_split_is_deterministic_disjoint_and_complete():
    train, val = embedded_documents("train"), embedded_documents("validation")
    assert train == embedded_documents("train")
    assert sorted(train + val) == sorted(topics.values())
    assert not set(train) & set(val)
    share = sum(map(len, val)) / sum(map(len, topics.values()))
    assert 0.03 < share < 0.25
    with pytest.raises(ValueError, match="'train' or 'validation'"):
        embedded_documents("test")


def test_load_corpus_embedded_joins_documents_with_eos():
    tok = ByteTokenizer()
    train, val = load_corpus("embedded", tok)
    docs = embedded_documents("validation")
    assert len(val) == sum(len(d.encode()) + 1 for d in docs)
    assert int((np.asarray(val.tokens) == tok.eos_token_id).sum()) == len(docs)
    assert tok.decode(val.tokens[: len(docs[0].encode())]) == docs[0]
    assert len(train) > 8 * len(val)


def test_text_and_jsonl_files(tmp_path):
    (tmp_path / "a.txt").write_text("first document")
    rows = [{"text": "second"}, {"text": "third", "meta": 1}]
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert read_documents(tmp_path) == ["first document", "second", "third"]
    assert read_documents(tmp_path / "b.jsonl") == ["second", "third"]
    stream = tokenize_documents(read_documents(tmp_path), ByteTokenizer(), "files")
    assert ByteTokenizer().decode(stream.tokens) == "first documentsecondthird"
    assert len(stream) == len("first documentsecondthird") + 3

    train, val = load_corpus(tmp_path / "a.txt", ByteTokenizer(), val_fraction=0.25)
    assert len(train) + len(val) == len("first document") + 1 and len(val) == 3


def test_jsonl_without_text_field_names_line_and_field(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"body": "no text"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: .*'text'"):
        read_documents(tmp_path / "bad.jsonl")
    with pytest.raises(ValueError, match="does not exist"):
        read_documents(tmp_path / "nope")
    (tmp_path / "data.csv").write_text("a,b")
    with pytest.raises(ValueError, match="unknown data file type '.csv'"):
        read_documents(tmp_path / "data.csv")


def test_bin_memmap_nanogpt_uint16_and_uint32(tmp_path):
    ids = np.array([5, 0, 65535, 7, 1], dtype=np.uint16)
    ids.tofile(tmp_path / "train.bin")  # nanoGPT's prepare.py writes exactly this
    stream = load_bin(tmp_path / "train.bin")
    assert isinstance(stream.tokens, np.memmap) and stream.tokens.dtype == np.uint16
    assert stream.tokens.tolist() == ids.tolist()

    big = np.array([70000, 3, 100000], dtype=np.uint32)
    write_bin(tmp_path / "big.bin", big, dtype="uint32")
    assert load_bin(tmp_path / "big.bin", dtype="uint32").tokens.tolist() == big.tolist()
    with pytest.raises(ValueError, match="not a whole number of uint32 tokens"):
        load_bin(tmp_path / "train.bin", dtype="uint32")  # 10 bytes
    with pytest.raises(ValueError, match="does not fit uint16"):
        write_bin(tmp_path / "x.bin", big, dtype="uint16")


def test_bin_dtype_from_megatron_idx(tmp_path):
    """GPT-NeoX's MMapIndexedDataset: the .idx header (magic, version, dtype code) names the dtype."""
    ids = np.array([1, 2, 3, 4], dtype=np.int32)
    ids.tofile(tmp_path / "pile_text_document.bin")
    header = b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", 4)  # 4: int32
    (tmp_path / "pile_text_document.idx").write_bytes(header + b"\x00" * 16)
    stream = load_bin(tmp_path / "pile_text_document.bin")
    assert stream.tokens.dtype == np.int32 and stream.tokens.tolist() == [1, 2, 3, 4]


def test_token_beyond_vocabulary_is_a_clear_error(tmp_path):
    np.array([1, 2, 600, 3] * 10, dtype=np.uint16).tofile(tmp_path / "d.bin")
    stream = load_bin(tmp_path / "d.bin")
    with pytest.raises(ValueError, match=r"token id 600, but the model's vocabulary has 512 rows"):
        stream.check_vocab(512)
    # Memory-mapped streams are checked batch by batch (a 300B-token file is not scanned first).
    sampler = BatchSampler(stream, seq_len=8, batch_size=4, seed=0, vocab_size=512)
    with pytest.raises(ValueError, match="use the tokenizer the model was trained with"):
        sampler.batch(0)
    in_memory = TokenStream(np.asarray(stream.tokens), "in memory")
    with pytest.raises(ValueError, match="in memory holds token id 600"):
        BatchSampler(in_memory, seq_len=8, batch_size=4, vocab_size=512)


# Sampling -------------------------------------------------------------------------------------


def test_batches_are_windows_determined_by_seed_and_position():
    stream = TokenStream(np.arange(1000, dtype=np.uint32), "ramp")
    sampler = BatchSampler(stream, seq_len=16, batch_size=6, seed=3)
    batch = sampler.batch(5)
    assert batch.shape == (6, 17) and batch.dtype == np.int64
    assert (np.diff(batch, axis=1) == 1).all()  # consecutive tokens: inputs and their targets
    assert (batch == BatchSampler(stream, 16, 6, seed=3).batch(5)).all()
    assert not (batch == sampler.batch(6)).all()
    assert not (batch == BatchSampler(stream, 16, 6, seed=4).batch(5)).all()
    # Rows of a batch are the same rows whoever draws them (processes split the global batch).
    assert (sampler.batch(5, slice(2, 4)) == batch[2:4]).all()


def test_sampler_position_saves_and_restores():
    stream = TokenStream(np.arange(500, dtype=np.uint16), "ramp")
    a = BatchSampler(stream, 8, 2, seed=1)
    for _ in range(3):
        next(a)
    state = a.state_dict()
    b = BatchSampler(stream, 8, 2, seed=1)
    b.load_state_dict(state)
    assert b.position == 3
    assert all((next(a) == next(b)).all() for _ in range(4))
    with pytest.raises(ValueError, match="saved data seed is 1 but this run uses 2"):
        BatchSampler(stream, 8, 2, seed=2).load_state_dict(state)


def test_short_stream_and_eval_windows():
    stream = TokenStream(np.arange(50, dtype=np.uint16), "short")
    with pytest.raises(ValueError, match="fewer than one window"):
        BatchSampler(stream, seq_len=64, batch_size=1)
    windows = eval_windows(stream, 16)
    assert windows.shape == (3, 17)
    assert windows[1, 0] == 16 and windows[2, -1] == 48  # each token predicted once
    assert eval_windows(stream, 16, max_windows=2).shape == (2, 17)


# Bad data files name the file -------------------------------------------------------------------


def test_empty_and_non_utf8_files_are_named(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match=r"empty.txt is empty"):
        read_documents(tmp_path / "empty.txt")
    (tmp_path / "latin1.txt").write_bytes("café".encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.txt is not UTF-8 text \(byte 3"):
        read_documents(tmp_path / "latin1.txt")
    (tmp_path / "latin1.jsonl").write_bytes('{"text": "café"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match=r"latin1.jsonl is not UTF-8 text"):
        read_documents(tmp_path / "latin1.jsonl")
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match=r"blank.jsonl holds no documents"):
        read_documents(tmp_path / "blank.jsonl")
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty.bin is empty"):
        load_bin(tmp_path / "empty.bin")


def test_a_broken_jsonl_line_names_file_and_line(tmp_path):
    (tmp_path / "cut.jsonl").write_text('{"text": "ok"}\n{"text": "cut off\n{"text": "fine"}\n')
    with pytest.raises(ValueError, match=r"cut.jsonl:2: not valid JSON \(Unterminated string"):
        read_documents(tmp_path / "cut.jsonl")


def test_a_broken_tokenizer_json_is_named(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model":')
    with pytest.raises(ValueError, match=r"tokenizer.json is not a readable tokenizer.json"):
        load_tokenizer(tmp_path)


# The tokenizer rule: asked for, or named by the folder; never bytes by default --------------------


def test_resolve_tokenizer_takes_what_is_asked_then_what_the_folder_names(tmp_path):
    path = make_tokenizer_json(tmp_path)
    assert resolve_tokenizer("byte", path, 512, "run").name == "byte"  # asked for wins
    assert resolve_tokenizer(None, path, 512, "run").name == path
    assert resolve_tokenizer(ByteTokenizer(), None, 512, "run").name == "byte"


@pytest.mark.parametrize("vocab", [50304, 512, 257])
def test_no_tokenizer_is_an_error_that_says_how_to_pass_one(vocab):
    with pytest.raises(ValueError) as err:
        resolve_tokenizer(None, None, vocab, "runs/x")
    message = str(err.value)
    assert "runs/x names no tokenizer" in message and f"{vocab} ids" in message
    assert "--tokenizer PATH/tokenizer.json" in message and "--tokenizer byte" in message


def test_a_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"byte produces ids up to 256, but the model of hf has 200"):
        resolve_tokenizer("byte", None, 200, "hf")


def test_fingerprint_identifies_content_not_name(tmp_path):
    ids = np.arange(5000, dtype=np.uint16)
    write_bin(tmp_path / "a.bin", ids)
    on_disk, in_memory = load_bin(tmp_path / "a.bin"), TokenStream(ids.copy(), "other name")
    assert on_disk.fingerprint()["tokens"] == in_memory.fingerprint()["tokens"] == 5000
    changed = ids.copy()
    changed[-1] += 1
    assert TokenStream(changed, "x").fingerprint()["digest"] != in_memory.fingerprint()["digest"]
    assert TokenStream(ids.copy(), "y").fingerprint()["digest"] == in_memory.fingerprint()["digest"]
