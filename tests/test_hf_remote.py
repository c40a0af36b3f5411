"""Adaptive models as transformers folders with remote code: AutoModelForCausalLM gives the zoo
model's logits, and zoo.from_hf reads the folder back as the same model."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import zoo
from hf_helpers import ids_for
from zoo.halting.none import NoHalting
from zoo.registry import HALTING, REGISTRIES

VARIANTS = {
    "adaponder-mlp_gate-kv_reuse": ("adaponder-pythia-tiny", dict()),
    "ponder-fixed_prune-kv_reuse-tied": (
        "ponder-pythia-tiny",
        dict(halting="fixed_prune", cache="kv_reuse", halting_kwargs={"ratio": 0.4}, tied_embeddings=True),
    ),
    "ponder-act-recompute": ("ponder-pythia-tiny", dict(halting="act", passes=3)),
    "loop-early_exit-kv_reuse": ("loop-pythia-tiny", dict(halting="early_exit", cache="kv_reuse")),
    "llama-ponder-mlp_gate-gqa": (
        "adaponder-pythia-tiny",
        dict(block="llama", rotary_fraction=1.0, num_kv_heads=2, bias=False),
    ),
    "one-pass-neox-gqa": ("pythia-tiny", dict(num_kv_heads=2)),
}


def auto_model(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)


@pytest.mark.parametrize("name, overrides", list(VARIANTS.values()), ids=list(VARIANTS))
def test_auto_model_gives_the_zoo_logits_and_from_hf_the_same_model(
    tmp_path, randomize, modules_cache, name, overrides
):
    model = randomize(zoo.build(name, **overrides), seed=2).eval()
    folder = zoo.to_hf(model, tmp_path / "out")
    ids = ids_for(model.config.vocab_size, T=20, B=3)
    with torch.no_grad():
        reference = model(ids)
        hf = auto_model(folder)
        out = hf(ids)
    assert type(hf).__name__ == "PonderZooForCausalLM" and not hf.training
    assert reference.logits.abs().max() > 1.0
    torch.testing.assert_close(out.logits, reference.logits, rtol=0, atol=1e-5)
    assert torch.equal(out.depth, reference.depth)
    assert (hf.model.head.weight is hf.model.embed.weight) == model.config.tied_embeddings

    back = zoo.from_hf(folder)
    assert back.config == model.config
    with torch.no_grad():
        again = back.eval()(ids)
    assert torch.equal(again.logits, reference.logits) and torch.equal(again.depth, reference.depth)


def test_some_tokens_halt_early_in_the_export_tests(randomize):
    """The variants above exercise halting: not every token runs every pass."""
    name, overrides = VARIANTS["ponder-fixed_prune-kv_reuse-tied"]
    model = randomize(zoo.build(name, **overrides), seed=2).eval()
    with torch.no_grad():
        depth = model(ids_for(model.config.vocab_size, T=20, B=3)).depth
    assert depth.min() < model.config.passes and depth.max() == model.config.passes


def test_folder_contents_and_model_card(tmp_path):
    model = zoo.build("adaponder-pythia-tiny")
    folder = zoo.to_hf(model, tmp_path / "ada")
    assert sorted(p.name for p in folder.iterdir()) == [
        "README.md",
        "config.json",
        "configuration_ponder_zoo.py",
        "model.safetensors",
        "modeling_ponder_zoo.py",
    ]
    package = Path(zoo.__file__).parent / "interop" / "remote_code"
    for code in ("configuration_ponder_zoo.py", "modeling_ponder_zoo.py"):
        assert (folder / code).read_text() == (package / code).read_text()
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_ponder_zoo.PonderZooConfig",
        "AutoModelForCausalLM": "modeling_ponder_zoo.PonderZooForCausalLM",
    }
    assert config["zoo_config"] == model.config.to_dict() and config["zoo_version"] == zoo.__version__
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\n") and "\n# ada\n" in card
    for needle in (
        "trust_remote_code=True",
        "imports\nthe **ponder-zoo** library",
        f"pip install ponder-zoo=={zoo.__version__}",
        "zoo.from_hf",
        "| halting policy | `mlp_gate` |",
        "recurrence='ponder' with passes=4",
    ):
        assert needle in card


def test_labels_give_the_shifted_cross_entropy_and_greedy_generate(tmp_path, randomize, modules_cache):
    model = randomize(zoo.build("adaponder-pythia-tiny"), seed=4).eval()
    hf = auto_model(zoo.to_hf(model, tmp_path / "ada"))
    ids = ids_for(model.config.vocab_size, T=12, B=2)
    labels = ids.clone()
    labels[0, :5] = -100
    with torch.no_grad():
        out = hf(ids, labels=labels)
        logits = model(ids).logits
    expected = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)
    tokens = hf.generate(ids[:, :6], max_new_tokens=5, do_sample=False)
    assert torch.equal(tokens, model.generate(ids[:, :6], 5).tokens)


def test_remote_code_on_request_for_a_plain_model(tmp_path, randomize, modules_cache):
    model = randomize(zoo.build("pythia-tiny"), seed=1).eval()
    folder = zoo.to_hf(model, tmp_path / "out", remote_code=True)
    assert json.loads((folder / "config.json").read_text())["model_type"] == "ponder_zoo"
    assert "remote_code=True was asked for" in (folder / "README.md").read_text()
    ids = ids_for(model.config.vocab_size, T=20, B=3)
    with torch.no_grad():
        torch.testing.assert_close(auto_model(folder)(ids).logits, model(ids).logits, rtol=0, atol=1e-5)


def test_a_padded_batch_through_auto_model_is_the_zoo_model_with_the_mask(tmp_path, randomize, modules_cache):
    model = randomize(zoo.build("adaponder-pythia-tiny"), seed=3).eval()
    hf = auto_model(zoo.to_hf(model, tmp_path / "ada"))
    ids = ids_for(512, T=8, B=3)
    mask = torch.ones_like(ids)
    mask[0, :3] = 0
    mask[2, :6] = 0
    with torch.no_grad():
        out = hf(ids, attention_mask=mask, labels=ids)
        reference = model(ids, attention_mask=mask, labels=ids)
        alone = model(ids[:1, 3:])
    torch.testing.assert_close(out.logits, reference.logits, rtol=0, atol=1e-5)
    assert torch.equal(out.depth, reference.depth) and bool((out.depth[mask == 0] == 0).all())
    torch.testing.assert_close(out.loss, reference.loss)
    torch.testing.assert_close(out.logits[0, 3:], alone.logits[0], rtol=0, atol=1e-5)
    # transformers' generate with left padding: each row as the zoo model generates it.
    tokens = hf.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False)
    assert torch.equal(tokens, model.generate(ids, 3, attention_mask=mask).tokens)
    mask[1, -1] = 0
    with pytest.raises(ValueError, match="right"):
        hf(ids, attention_mask=mask)


def test_overrides_over_a_remote_folder(tmp_path, randomize, caplog):
    model = randomize(zoo.build("adaponder-pythia-tiny"), seed=3)
    folder = zoo.to_hf(model, tmp_path / "ada")
    gates = {n: p for n, p in model.state_dict().items() if n.startswith("halting.")}
    same_policy = zoo.from_hf(folder, cache="recompute").state_dict()
    assert gates and all(torch.equal(same_policy[n], p) for n, p in gates.items())
    with caplog.at_level(logging.INFO, logger="zoo.interop"):
        act = zoo.from_hf(folder, halting="act")
    (record,) = [r.getMessage() for r in caplog.records if r.name == "zoo.interop"]
    assert "halting." in record and "layers." not in record
    assert torch.equal(act.layers[0].attn.qkv.weight, model.layers[0].attn.qkv.weight)


@pytest.fixture
def plugin_policy():
    """A halting policy registered by a module outside ponder-zoo (this test file)."""
    saved = {kind: dict(registry._entries) for kind, registry in REGISTRIES.items()}

    class PluginHalting(NoHalting):
        """Never halts (a stand-in for a user's policy)."""

    HALTING.register("plugin_never")(PluginHalting)
    yield "plugin_never"
    for kind, registry in REGISTRIES.items():
        registry._entries.clear()
        registry._entries.update(saved[kind])


def test_a_plugin_part_is_refused_clearly(tmp_path, plugin_policy):
    model = zoo.build("ponder-pythia-tiny", halting=plugin_policy)
    with pytest.raises(ValueError) as err:
        zoo.to_hf(model, tmp_path / "out")
    message = str(err.value)
    assert f"halting {plugin_policy!r} is registered by the module {__name__!r}" in message
    assert "zoo.save" in message
    assert not (tmp_path / "out").exists()
