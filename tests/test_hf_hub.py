"""Hub ids through huggingface_hub's cache, with no network.

Each test builds a real cache layout (``models--org--name/blobs``, ``snapshots/<commit>``
linking to the blobs, ``refs/<revision>``), checks that huggingface_hub's own cache
scanner reads it as a cached repository, and resolves ids offline (``HF_HUB_OFFLINE``).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import zoo
from hf_helpers import hf_logits, ids_for, max_diff
from hf_helpers import zoo_logits as logits


def cache_repo(cache: Path, repo_id: str, folder: Path, *, revision: str = "main", files=None) -> str:
    """Puts ``folder``'s files (or ``files`` of them) into the huggingface_hub cache ``cache``
    as a download of ``repo_id`` at ``revision`` leaves them; returns the commit hash."""
    names = sorted(files if files is not None else (p.name for p in folder.iterdir()))
    content = b"".join(name.encode() + (folder / name).read_bytes() for name in names)
    commit = hashlib.sha1(repo_id.encode() + revision.encode() + content).hexdigest()
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir(exist_ok=True)
    for name in names:
        data = (folder / name).read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        (snapshot / name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return commit


def assert_cached(cache: Path, repo_id: str, commit: str, revision: str, files: list[str]) -> None:
    """huggingface_hub's own scanner reads the layout as the cached repository it should be."""
    from huggingface_hub import scan_cache_dir

    info = scan_cache_dir(cache)
    assert not info.warnings, info.warnings
    (repo,) = [r for r in info.repos if r.repo_id == repo_id]
    (rev,) = [r for r in repo.revisions if r.commit_hash == commit]
    assert revision in rev.refs
    assert sorted(f.file_name for f in rev.files) == sorted(files)


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty cache that huggingface_hub uses, offline: what HF_HUB_CACHE and HF_HUB_OFFLINE=1
    set when the process starts (huggingface_hub reads them once, at import)."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-home" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture
def hf_folder(tmp_path, randomize):
    """Factory: a random tiny model written by zoo.to_hf; returns (model, folder)."""

    def write(name: str = "pythia", seed: int = 0, **overrides):
        model = randomize(zoo.build("pythia-tiny", **overrides), seed).eval()
        return model, zoo.to_hf(model, tmp_path / "folders" / name)

    return write


@pytest.mark.parametrize(
    "overrides",
    [dict(), dict(block="llama", rotary_fraction=1.0, num_kv_heads=2, bias=False)],
    ids=["gpt_neox", "llama"],
)
def test_hub_id_loads_from_the_cache(hub_cache, hf_folder, overrides):
    model, folder = hf_folder(**overrides)
    files = ["config.json", "model.safetensors"]
    commit = cache_repo(hub_cache, "org/tiny", folder)
    assert_cached(hub_cache, "org/tiny", commit, "main", files)
    loaded = zoo.from_hf("org/tiny")
    assert loaded.config == model.config
    ids = ids_for(model.config.vocab_size)
    assert torch.equal(logits(loaded, ids), logits(model, ids))


def test_revisions_branch_tag_and_commit(hub_cache, hf_folder):
    _, main = hf_folder("main", seed=0)
    old_model, old = hf_folder("old", seed=5)
    main_commit = cache_repo(hub_cache, "org/tiny", main)
    old_commit = cache_repo(hub_cache, "org/tiny", old, revision="v1")
    ids = ids_for(512)
    reference = logits(old_model, ids)
    assert not torch.equal(logits(zoo.from_hf("org/tiny"), ids), reference)
    assert torch.equal(logits(zoo.from_hf("org/tiny", revision="v1"), ids), reference)
    assert torch.equal(logits(zoo.from_hf("org/tiny", revision=old_commit), ids), reference)
    latest = logits(zoo.from_hf("org/tiny"), ids)
    assert torch.equal(logits(zoo.from_hf("org/tiny", revision=main_commit), ids), latest)
    with pytest.raises(FileNotFoundError, match="'org/tiny' at revision 'v2'"):
        zoo.from_hf("org/tiny", revision="v2")


def test_sharded_weights_and_overrides_from_the_hub(hub_cache, tmp_path, make_hf_neox):
    hf = make_hf_neox()
    folder = tmp_path / "sharded"
    hf.save_pretrained(folder, safe_serialization=True, max_shard_size="60KB")
    shards = [p.name for p in folder.glob("model-*.safetensors")]
    assert len(shards) > 1
    cache_repo(hub_cache, "org/sharded", folder)
    ada = zoo.from_hf("org/sharded", recurrence="ponder", passes=3, halting="mlp_gate", cache="kv_reuse")
    assert torch.equal(ada.layers[1].attn.qkv.weight, hf.gpt_neox.layers[1].attention.query_key_value.weight)
    ids = ids_for(hf.config.vocab_size)
    assert max_diff(logits(zoo.from_hf("org/sharded"), ids), hf_logits(hf, ids)) <= 1e-4


def test_cache_dir_argument(tmp_path, hf_folder, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    model, folder = hf_folder()
    elsewhere = tmp_path / "elsewhere"
    cache_repo(elsewhere, "org/tiny", folder)
    loaded = zoo.from_hf("org/tiny", cache_dir=elsewhere)
    ids = ids_for(512)
    assert torch.equal(logits(loaded, ids), logits(model, ids))


# Errors ---------------------------------------------------------------------------------


def test_offline_and_not_cached_says_what_to_do(hub_cache):
    with pytest.raises(FileNotFoundError) as err:
        zoo.from_hf("EleutherAI/pythia-70m")
    message = str(err.value)
    for needle in ("'EleutherAI/pythia-70m'", "is not a local folder", str(hub_cache), "HF_HUB_OFFLINE",
                   "hf download EleutherAI/pythia-70m", "HF_HOME"):
        assert needle in message


def test_pickle_only_repo_is_refused(hub_cache, tmp_path, hf_folder):
    _, folder = hf_folder()
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((folder / "config.json").read_text())
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    cache_repo(hub_cache, "org/pickled", pickled)
    with pytest.raises(ValueError) as err:
        zoo.from_hf("org/pickled")
    message = str(err.value)
    for needle in ("'org/pickled'", "pytorch_model.bin", "arbitrary code", "safe_serialization=True"):
        assert needle in message


def test_config_cached_without_weights(hub_cache, hf_folder):
    _, folder = hf_folder()
    cache_repo(hub_cache, "org/partial", folder, files=["config.json"])
    holds = "holds the config.json of 'org/partial' at revision 'main' but not its safetensors weights"
    with pytest.raises(FileNotFoundError, match=holds):
        zoo.from_hf("org/partial")


def test_missing_shard_is_named(hub_cache, tmp_path, make_hf_neox):
    folder = tmp_path / "sharded"
    make_hf_neox().save_pretrained(folder, safe_serialization=True, max_shard_size="60KB")
    shards = sorted(p.name for p in folder.glob("model-*.safetensors"))
    files = ["config.json", "model.safetensors.index.json", *shards[1:]]
    cache_repo(hub_cache, "org/sharded", folder, files=files)
    with pytest.raises(FileNotFoundError, match=f"shard '{shards[0]}' is missing"):
        zoo.from_hf("org/sharded")


def test_local_paths_stay_local(tmp_path, hf_folder):
    _, folder = hf_folder()
    with pytest.raises(ValueError, match="is a local folder"):
        zoo.from_hf(folder, revision="main")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        zoo.from_hf(str(tmp_path / "no" / "such" / "folder"))  # not spelled like an id
    with pytest.raises(ValueError, match="is a file"):
        zoo.from_hf(str(folder / "config.json"))


@pytest.mark.slow
def test_environment_variables_in_a_fresh_process(tmp_path, hf_folder):
    """HF_HOME and HF_HUB_OFFLINE as a user sets them, read by a fresh interpreter."""
    model, folder = hf_folder(recurrence="ponder", passes=3, halting="fixed_prune", cache="kv_reuse",
                              halting_kwargs={"ratio": 0.5})
    assert json.loads((folder / "config.json").read_text())["model_type"] == "ponder_zoo"
    home = tmp_path / "home"
    cache_repo(home / "hub", "org/ada", folder)
    out = tmp_path / "logits.safetensors"
    script = (
        "import sys, torch, zoo\n"
        "from safetensors.torch import save_file\n"
        "ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(1))\n"
        "out = zoo.from_hf('org/ada').eval()(ids, execution='dense')\n"
        "save_file({'logits': out.logits, 'depth': out.depth}, sys.argv[1])\n"
        "try:\n"
        "    zoo.from_hf('org/absent')\n"
        "except FileNotFoundError as err:\n"
        "    print(err)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE="1")
    run = subprocess.run([sys.executable, "-c", script, str(out)], env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr
    with torch.no_grad():
        reference = model(ids_for(512, T=16), execution="dense")
    stored = load_file(out)
    assert torch.equal(stored["logits"], reference.logits)
    assert torch.equal(stored["depth"], reference.depth) and reference.depth.min() < 3
    assert "HF_HUB_OFFLINE is set" in run.stdout and str(home / "hub") in run.stdout
