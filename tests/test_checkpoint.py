"""zoo.save / zoo.load: safetensors + config round trips, atomic writes, corrupted files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

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


def test_atomic_write_follows_a_symlinked_file(tmp_path):
    (tmp_path / "real.json").write_text("old")
    (tmp_path / "link.json").symlink_to("real.json")
    with atomic_write(tmp_path / "link.json") as tmp:
        tmp.write_text("new")
    assert (tmp_path / "link.json").is_symlink() and (tmp_path / "real.json").read_text() == "new"


def test_atomic_write_creates_folders_but_never_replaces_one(tmp_path):
    with atomic_write(tmp_path / "new", directory=True) as tmp:
        (tmp / "a").write_text("1")
    assert (tmp_path / "new" / "a").read_text() == "1"
    with pytest.raises(ValueError, match="creates new folders only"):
        with atomic_write(tmp_path / "new", directory=True) as tmp:
            (tmp / "b").write_text("2")
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["a"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new"]


# Writers own only what they write ------------------------------------------------------------


def snapshot(folder) -> dict:
    """Every entry under ``folder``: file bytes, symlink targets, folders."""
    out = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        if path.is_symlink():
            out[key] = ("link", os.readlink(path))
        elif path.is_dir():
            out[key] = ("dir",)
        else:
            out[key] = ("file", path.read_bytes())
    return out


def test_save_refuses_a_folder_of_other_files_and_deletes_nothing(tmp_path):
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "README.md").write_text("my project")
    (project / "src" / "main.py").write_text("print(1)")
    before = snapshot(project)
    with pytest.raises(ValueError) as err:
        zoo.save(zoo.build("pythia-tiny"), project)
    assert "README.md, src" in str(err.value) and "allow_other_files=True" in str(err.value)
    assert snapshot(project) == before  # nothing written, nothing deleted


def test_save_beside_other_files_when_allowed_keeps_them(tmp_path):
    (tmp_path / "notes.txt").write_text("keep me")
    model = zoo.build("pythia-tiny")
    zoo.save(model, tmp_path, allow_other_files=True)
    zoo.save(model, tmp_path, allow_other_files=True)  # the second save replaces only its own files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors", "notes.txt"]
    assert (tmp_path / "notes.txt").read_text() == "keep me"
    assert torch.equal(zoo.load(tmp_path).embed.weight, model.embed.weight)


def test_save_never_replaces_a_config_json_it_did_not_write(tmp_path):
    (tmp_path / "config.json").write_text('{"learning_rate": 0.1}')
    for allow in (False, True):
        with pytest.raises(ValueError, match="config.json, which zoo.save did not write"):
            zoo.save(zoo.build("pythia-tiny"), tmp_path, allow_other_files=allow)
    assert snapshot(tmp_path) == {"config.json": ("file", b'{"learning_rate": 0.1}')}


def test_save_to_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model = zoo.build("pythia-tiny")
    assert zoo.save(model, ".") == Path(".")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    assert torch.equal(zoo.load(".").embed.weight, model.embed.weight)


def test_save_through_a_symlinked_folder_keeps_the_link(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "latest").symlink_to("real")
    model = zoo.build("pythia-tiny")
    zoo.save(model, tmp_path / "latest")
    zoo.save(model, tmp_path / "latest")
    assert (tmp_path / "latest").is_symlink() and os.readlink(tmp_path / "latest") == "real"
    assert sorted(p.name for p in (tmp_path / "real").iterdir()) == ["config.json", "model.safetensors"]
    assert torch.equal(zoo.load(tmp_path / "latest").embed.weight, model.embed.weight)


def test_symlinks_that_a_save_would_break_are_refused(tmp_path):
    (tmp_path / "dangling").symlink_to("nowhere")
    with pytest.raises(ValueError, match="symlink to nowhere, which does not exist"):
        zoo.save(zoo.build("pythia-tiny"), tmp_path / "dangling")
    # A weight file that links to a shared blob (as in a Hugging Face cache) is not written through.
    folder = zoo.save(zoo.build("pythia-tiny"), tmp_path / "ckpt")
    blob = tmp_path / "blob.safetensors"
    (folder / "model.safetensors").rename(blob)
    (folder / "model.safetensors").symlink_to(blob)
    before = blob.read_bytes()
    with pytest.raises(ValueError, match="are symlinks"):
        zoo.save(zoo.build("pythia-tiny", num_layers=1), folder)
    assert blob.read_bytes() == before and (folder / "model.safetensors").is_symlink()


def test_to_hf_onto_the_folder_the_model_came_from_keeps_its_other_files(hf_neox_folder):
    _, folder = hf_neox_folder()
    extras = {"tokenizer.json": "{}", "README.md": "# card", "generation_config.json": '{"do_sample": false}'}
    for name, text in extras.items():
        (folder / name).write_text(text)
    model = zoo.from_hf(folder)
    with pytest.raises(ValueError) as err:  # refused, listed, unless asked
        zoo.to_hf(model, folder)
    assert "README.md, generation_config.json, tokenizer.json" in str(err.value)
    with torch.no_grad():
        model.embed.weight.add_(1.0)
    zoo.to_hf(model, folder, allow_other_files=True)
    for name, text in extras.items():
        assert (folder / name).read_text() == text
    assert torch.equal(zoo.from_hf(folder).embed.weight, model.embed.weight)


def test_to_hf_refuses_a_sharded_index_that_would_shadow_its_weights(hf_neox_folder):
    _, folder = hf_neox_folder(save_kwargs={"max_shard_size": "20KB"})
    assert (folder / "model.safetensors.index.json").is_file()
    before = snapshot(folder)
    with pytest.raises(ValueError, match="model.safetensors.index.json.*readers would take instead"):
        zoo.to_hf(zoo.from_hf(folder), folder, allow_other_files=True)
    assert snapshot(folder) == before


def small(num_layers: int = 1) -> zoo.RecurrentLM:
    """A model that saves in about a millisecond, so concurrent saves overlap."""
    return zoo.build("pythia-tiny", num_layers=num_layers, dim=32, num_heads=2, vocab_size=64)


def test_concurrent_saves_take_turns_and_leave_one_whole_checkpoint(tmp_path):
    models = [small(1 + i % 2) for i in range(8)]
    errors = []

    def save(model):
        try:
            for _ in range(20):
                zoo.save(model, tmp_path / "ckpt")
        except BaseException as err:  # noqa: BLE001 - any error fails the test below
            errors.append(err)

    threads = [threading.Thread(target=save, args=(m,)) for m in models]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no .old or temporary leftovers
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    loaded = zoo.load(tmp_path / "ckpt")
    assert any(
        loaded.config == m.config and torch.equal(loaded.embed.weight, m.embed.weight) for m in models
    )


def test_concurrent_saves_from_two_processes(tmp_path):
    script = (  # both processes start saving together, once both have imported torch
        "import pathlib, sys, time, zoo\n"
        "model = zoo.build('pythia-tiny', num_layers=int(sys.argv[2]), dim=32, num_heads=2, vocab_size=64)\n"
        "ready = pathlib.Path(sys.argv[3])\n"
        "(ready / sys.argv[2]).touch()\n"
        "while len(list(ready.iterdir())) < 2:\n"
        "    time.sleep(0.01)\n"
        "for _ in range(100):\n"
        "    zoo.save(model, sys.argv[1])\n"
    )
    (tmp_path / "ready").mkdir()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, str(tmp_path / "ckpt"), str(n), str(tmp_path / "ready")],
            env=env,
            stderr=subprocess.PIPE,
        )
        for n in (1, 2)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err.decode()[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt", "ready"]  # no .old or temporary leftovers
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    assert zoo.load(tmp_path / "ckpt").config.num_layers in (1, 2)


def test_a_pair_torn_between_two_renames_is_reported(tmp_path):
    # What a crash between renaming config.json and model.safetensors would leave.
    zoo.save(zoo.build("pythia-tiny"), tmp_path / "a")
    zoo.save(zoo.build("pythia-tiny"), tmp_path / "b")
    shutil.copy(tmp_path / "b" / "model.safetensors", tmp_path / "a" / "model.safetensors")
    with pytest.raises(ValueError, match="come from two different saves"):
        zoo.load(tmp_path / "a")


def test_killed_save_leftovers_are_cleared_by_the_next_save(tmp_path):
    folder = zoo.save(zoo.build("pythia-tiny"), tmp_path / "ckpt")
    (folder / ".model.safetensors.tmp-999-deadbeef").write_bytes(b"\x00" * 10)  # a SIGKILLed save
    zoo.save(zoo.build("pythia-tiny"), folder)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]


# Configs and weights that do not fit ----------------------------------------------------------


@pytest.mark.parametrize(
    "field, value, needle",
    [
        ("num_layers", 10**6, "num_layers must be an int in [1, 1,024]"),
        ("dim", 10**9, "dim must be an int in [1, 131,072]"),
        ("bias", "false", "bias must be true or false"),
        ("norm_eps", "1e-5", "norm_eps must be a finite positive number"),
        ("vocab_size", "512", "vocab_size must be an int"),
    ],
)
def test_bad_config_fields_name_the_file_the_field_and_the_value(tmp_path, field, value, needle):
    zoo.save(zoo.build("pythia-tiny"), tmp_path / "ckpt")
    config_file = tmp_path / "ckpt" / "config.json"
    header = json.loads(config_file.read_text())
    header["config"][field] = value
    config_file.write_text(json.dumps(header))
    started = time.perf_counter()
    with pytest.raises(ValueError) as err:
        zoo.load(tmp_path / "ckpt")
    assert time.perf_counter() - started < 5  # refused before anything is built
    message = str(err.value)
    assert str(config_file) in message and needle in message and repr(value) in message


def test_a_model_larger_than_the_ceiling_is_refused_before_allocation(tmp_path, monkeypatch):
    zoo.save(zoo.build("pythia-tiny"), tmp_path / "ckpt")
    monkeypatch.setenv("PONDER_ZOO_MAX_MODEL_BYTES", "100000")
    with pytest.raises(ValueError, match=r"PONDER_ZOO_MAX_MODEL_BYTES") as err:
        zoo.load(tmp_path / "ckpt")
    assert str(tmp_path / "ckpt") in str(err.value) and "num_layers=2" in str(err.value)
    with pytest.raises(ValueError, match="more than the ceiling"):
        zoo.build("pythia-tiny")
    assert zoo.build("pythia-tiny", device="meta").embed.weight.is_meta  # the meta device allocates nothing
    monkeypatch.setenv("PONDER_ZOO_MAX_MODEL_BYTES", "lots")
    with pytest.raises(ValueError, match="must be a positive number of bytes"):
        zoo.build("pythia-tiny")


def test_integer_weights_are_refused_not_converted(tmp_path):
    folder = zoo.save(zoo.build("pythia-tiny"), tmp_path / "ckpt")
    weights = folder / "model.safetensors"
    tensors = load_file(weights)
    with safe_open(str(weights), framework="pt") as handle:
        metadata = handle.metadata()
    norm = "layers.0.attn_norm.weight"
    tensors[norm] = torch.ones_like(tensors[norm], dtype=torch.int64)
    save_file(tensors, weights, metadata=metadata)
    with pytest.raises(ValueError, match=r"layers.0.attn_norm.weight: stored int64 in model.safetensors"):
        zoo.load(folder)
    tensors["embed.weight"] = tensors["embed.weight"].to(torch.int32)
    save_file(tensors, weights, metadata=metadata)
    with pytest.raises(ValueError, match="stores embed.weight as torch.int32"):
        zoo.load(folder)
