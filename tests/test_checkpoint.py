"""zoo.save / zoo.load: safetensors + config round trips, atomic writes, corrupted files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

import zoo
import zoo.checkpoint as checkpoint
from zoo.checkpoint import atomic_write

TINY = [name for name in zoo.available("model") if name.endswith("-tiny")]


def ids(vocab: int = 512, T: int = 16) -> torch.Tensor:
    return torch.randint(0, vocab, (2, T), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def logits(model, x: torch.Tensor) -> torch.Tensor:
    return model.eval()(x, execution="dense").logits


@pytest.mark.parametrize("name", TINY)
def test_round_trip_is_exact(tmp_path, randomize, name):
    model = randomize(zoo.build(name), seed=1, std=0.1)
    zoo.save(model, tmp_path / "ckpt")
    loaded = zoo.load(tmp_path / "ckpt")
    assert loaded.config == model.config
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for (n, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), n
    x = ids()
    assert torch.equal(logits(loaded, x), logits(model, x))


@pytest.mark.parametrize("halting", zoo.available("halting"))
@pytest.mark.parametrize("cache", zoo.available("cache"))
def test_round_trip_every_policy_and_cache(tmp_path, randomize, halting, cache):
    """Loading allocates on the meta device first: every part must come back whole."""
    model = zoo.build("ponder-pythia-tiny", num_layers=1, halting=halting, cache=cache)
    randomize(model, seed=4, std=0.05)
    loaded = zoo.load(zoo.save(model, tmp_path / "ckpt"))
    x = ids(T=8)
    with torch.no_grad():
        a, b = model.eval()(x, execution="dense"), loaded.eval()(x, execution="dense")
    assert torch.equal(a.logits, b.logits) and torch.equal(a.depth, b.depth)
    assert torch.equal(a.aux_loss, b.aux_loss)


def test_config_json_carries_marker_and_config(tmp_path):
    model = zoo.build("adaponder-pythia-tiny", halting_kwargs={"threshold": 0.01})
    zoo.save(model, tmp_path / "ckpt")
    header = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert header["format"] == "ponder-zoo" and header["format_version"] == checkpoint.FORMAT_VERSION
    assert zoo.ModelConfig.from_dict(header["config"]) == model.config
    assert zoo.load(tmp_path / "ckpt").config.halting_kwargs == {"threshold": 0.01}


def test_tied_weights_are_stored_once_and_retied(tmp_path, randomize):
    model = randomize(zoo.build("pythia-tiny", tied_embeddings=True), seed=2)
    zoo.save(model, tmp_path / "ckpt")
    with safe_open(str(tmp_path / "ckpt" / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert "embed.weight" in keys and "head.weight" not in keys
    loaded = zoo.load(tmp_path / "ckpt")
    assert loaded.head.weight is loaded.embed.weight
    x = ids()
    assert torch.equal(logits(loaded, x), logits(model, x))


def test_dtype_is_kept_or_converted(tmp_path):
    model = zoo.build("pythia-tiny", dtype=torch.bfloat16)
    zoo.save(model, tmp_path / "ckpt")
    assert zoo.load(tmp_path / "ckpt").embed.weight.dtype == torch.bfloat16
    upcast = zoo.load(tmp_path / "ckpt", dtype=torch.float32)
    assert upcast.embed.weight.dtype == torch.float32
    assert torch.equal(upcast.embed.weight, model.embed.weight.float())


def test_overwrite_replaces_the_old_checkpoint(tmp_path):
    first, second = zoo.build("pythia-tiny"), zoo.build("pythia-tiny")
    zoo.save(first, tmp_path / "ckpt")
    zoo.save(second, tmp_path / "ckpt")
    assert torch.equal(zoo.load(tmp_path / "ckpt").embed.weight, second.embed.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # nothing left beside it


def _failing_writer(tensors, filename, metadata=None):
    # Simulates a crash mid-write: half a file on disk, then an error.
    with open(filename, "wb") as handle:
        handle.write(b"\x00" * 1000)
    raise OSError("disk full")


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    good = zoo.build("pythia-tiny")
    zoo.save(good, tmp_path / "ckpt")
    before = {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()}
    monkeypatch.setattr(checkpoint, "save_file", _failing_writer)
    with pytest.raises(OSError, match="disk full"):
        zoo.save(zoo.build("pythia-tiny", num_layers=3), tmp_path / "ckpt")
    assert {p.name: p.read_bytes() for p in (tmp_path / "ckpt").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # the temporary is gone
    assert torch.equal(zoo.load(tmp_path / "ckpt").embed.weight, good.embed.weight)


def test_interrupted_first_save_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "save_file", _failing_writer)
    with pytest.raises(OSError):
        zoo.save(zoo.build("pythia-tiny"), tmp_path / "ckpt")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_damaged_weight_file_is_named(tmp_path, damage):
    zoo.save(zoo.build("pythia-tiny"), tmp_path / "ckpt")
    weights = tmp_path / "ckpt" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\xff" * 64 + data[64:])
    with pytest.raises(ValueError, match="model.safetensors") as err:
        zoo.load(tmp_path / "ckpt")
    assert "truncated or corrupted" in str(err.value)


def test_missing_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        zoo.load(tmp_path / "nowhere")
    zoo.save(zoo.build("pythia-tiny"), tmp_path / "ckpt")
    (tmp_path / "ckpt" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        zoo.load(tmp_path / "ckpt")
    (tmp_path / "ckpt" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        zoo.load(tmp_path / "ckpt")


def test_missing_checkpoint_points_to_a_folder_moved_aside(tmp_path):
    # What a crash between the two renames of an overwriting save would leave.
    zoo.save(zoo.build("pythia-tiny"), tmp_path / ".ckpt.old-1234abcd")
    with pytest.raises(FileNotFoundError, match="rename it to"):
        zoo.load(tmp_path / "ckpt")


def test_weights_that_do_not_fit_the_config_are_listed(tmp_path):
    zoo.save(zoo.build("pythia-tiny"), tmp_path / "ckpt")
    config_file = tmp_path / "ckpt" / "config.json"
    header = json.loads(config_file.read_text())
    header["config"]["num_layers"] = 3
    header["config"]["vocab_size"] = 500
    config_file.write_text(json.dumps(header))
    with pytest.raises(ValueError) as err:
        zoo.load(tmp_path / "ckpt")
    message = str(err.value)
    assert "missing tensors: layers.2." in message
    assert "embed.weight: stored [512, 64], model [500, 64]" in message


def test_foreign_config_is_refused(tmp_path, hf_neox_folder):
    _, folder = hf_neox_folder()
    with pytest.raises(ValueError, match="zoo.from_hf"):
        zoo.load(folder)
    zoo.save(zoo.build("pythia-tiny"), tmp_path / "ckpt")
    config_file = tmp_path / "ckpt" / "config.json"
    header = json.loads(config_file.read_text())
    config_file.write_text(json.dumps(dict(header, format_version=checkpoint.FORMAT_VERSION + 1)))
    with pytest.raises(ValueError, match="format_version"):
        zoo.load(tmp_path / "ckpt")


def test_save_refuses_other_objects(tmp_path):
    with pytest.raises(ValueError, match="RecurrentLM"):
        zoo.save(torch.nn.Linear(2, 2), tmp_path / "x")


# atomic_write, the helper other writers reuse ---------------------------------------------


def test_atomic_write_file_success_and_failure(tmp_path):
    target = tmp_path / "state.json"
    with atomic_write(target) as tmp:
        assert tmp.parent == tmp_path and tmp != target
        tmp.write_text("one")
    assert target.read_text() == "one"
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_write(target) as tmp:
            tmp.write_text("two, half written")
            raise RuntimeError("boom")
    assert target.read_text() == "one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_atomic_write_refuses_kind_mismatch(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        with atomic_write(tmp_path / "file", directory=True):
            pass
    (tmp_path / "folder").mkdir()
    with pytest.raises(ValueError, match="is a folder"):
        with atomic_write(tmp_path / "folder"):
            pass


def test_atomic_write_without_content_raises(tmp_path):
    with pytest.raises(ValueError, match="nothing was written"):
        with atomic_write(tmp_path / "empty.txt"):
            pass
    assert not (tmp_path / "empty.txt").exists()
