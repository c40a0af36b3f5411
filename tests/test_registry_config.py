"""Registries, presets and ModelConfig: names, counts, validation, JSON round trip."""

from __future__ import annotations

import math

import pytest

import zoo
from zoo.config import PYTHIA_SHAPES, ModelConfig, preset
from zoo.registry import HALTING, Registry

# The Pythia README's parameter counts (EleutherAI/pythia), embeddings and head included.
PYTHIA_PARAMS = {
    "14m": 14_067_712,
    "31m": 30_494_720,
    "70m": 70_426_624,
    "160m": 162_322_944,
    "410m": 405_334_016,
    "1b": 1_011_781_632,
    "1.4b": 1_414_647_808,
    "2.8b": 2_775_208_960,
}

# DESIGN.md section 3: these names are the public contract.
CONTRACT = {
    "block": ["llama", "neox"],
    "recurrence": ["loop", "none", "ponder"],
    "halting": ["act", "early_exit", "fixed_prune", "mlp_gate", "none"],
    "cache": ["kv_reuse", "recompute"],
    "model": sorted(
        f"{family}pythia-{size}"
        for family in ("", "ponder-", "loop-", "adaponder-")
        for size in [*PYTHIA_SHAPES, "tiny"]
    ),
}


# Registry ---------------------------------------------------------------------------------


def test_duplicate_name_raises_and_keeps_the_first():
    registry = Registry("widget")
    registry.register("a")(int)
    with pytest.raises(ValueError, match="widget 'a' is already registered"):
        registry.register("a")(float)
    assert registry.get("a") is int


def test_duplicate_in_a_live_registry_raises_without_changing_it():
    before = HALTING.get("none")
    with pytest.raises(ValueError, match="already registered"):
        HALTING.register("none")(object)
    assert HALTING.get("none") is before


def test_unknown_preset_names_the_closest_match():
    with pytest.raises(ValueError) as err:
        zoo.build("adaponder-pythia-70mm")
    assert "did you mean 'adaponder-pythia-70m'" in str(err.value)
    assert "adaponder-pythia-410m" in str(err.value)  # the valid names are listed


@pytest.mark.parametrize(
    "field, value, close", [("halting", "mlp_gat", "mlp_gate"), ("cache", "kvreuse", "kv_reuse")]
)
def test_unknown_part_names_the_field_and_closest_match(field, value, close):
    with pytest.raises(ValueError) as err:
        zoo.build("ponder-pythia-tiny", **{field: value})
    assert f"ModelConfig.{field}" in str(err.value) and f"did you mean {close!r}" in str(err.value)


@pytest.mark.parametrize("kind", sorted(CONTRACT))
def test_available_lists_the_contract_names(kind):
    names = zoo.available(kind)
    assert names == sorted(names)
    assert set(CONTRACT[kind]) <= set(names)
    if kind == "model":
        assert names == CONTRACT["model"]


def test_available_unknown_kind():
    with pytest.raises(ValueError, match="valid kinds"):
        zoo.available("policy")


# Presets ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", zoo.available("model"))
def test_every_preset_builds_on_meta(name):
    model = zoo.build(name, device="meta")
    assert model.embed.weight.is_meta
    config = model.config
    assert config == preset(name)
    assert (config.passes == 1) == (config.recurrence == "none")


@pytest.mark.parametrize("size", list(PYTHIA_PARAMS))
def test_pythia_parameter_counts(size):
    model = zoo.build(f"pythia-{size}", device="meta")
    assert model.num_parameters() == PYTHIA_PARAMS[size]


def test_pythia_70m_without_embeddings():
    assert zoo.build("pythia-70m", device="meta").num_parameters(include_embeddings=False) == 18_915_328


def test_ponder_presets_follow_ponderlm():
    assert preset("ponder-pythia-70m").embed_scale == pytest.approx(math.sqrt(512))
    assert preset("ponder-pythia-410m").initial_embed_mult == 3.0
    assert preset("ponder-pythia-70m").initial_embed_mult == 1.0
    assert preset("loop-pythia-160m").embed_scale == pytest.approx(math.sqrt(2.5 * 768))
    ada = preset("adaponder-pythia-1.4b")
    assert (ada.passes, ada.halting, ada.cache, ada.recurrence) == (4, "mlp_gate", "kv_reuse", "ponder")
    assert preset("pythia-2.8b").embed_scale == 1.0 and preset("pythia-2.8b").passes == 1


# ModelConfig -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["pythia-70m", "adaponder-pythia-tiny", "loop-pythia-1b"])
def test_config_json_round_trip(name):
    config = preset(name, halting_kwargs={"threshold": 0.5, "nested": [1, 2]}, num_kv_heads=None)
    text = config.to_json()
    assert ModelConfig.from_json(text) == config
    assert ModelConfig.from_json(text).to_json() == text


@pytest.mark.parametrize(
    "field, value",
    [
        ("vocab_size", 0),
        ("vocab_size", True),
        ("dim", 100),  # not divisible by 8 heads
        ("num_layers", 1.5),
        ("num_kv_heads", 3),
        ("mlp_dim", -1),
        ("rotary_fraction", 1.5),
        ("rotary_fraction", 0.05),  # 3 rotary dims of a 64-wide head: odd
        ("norm_eps", 0.0),
        ("gelu_approximate", "fast"),
        ("block", "gpt2"),
        ("recurrence", "rnn"),
        ("halting", "always"),
        ("cache", "lru"),
        ("halting_kwargs", [1, 2]),
        ("embed_scale", -1.0),
        ("initial_embed_mult", 0),
        ("init_std", -0.1),
        ("passes", 0),
    ],
)
def test_invalid_field_raises_naming_it(field, value):
    with pytest.raises(ValueError) as err:
        preset("pythia-70m", **{field: value})
    assert field in str(err.value)


def test_single_pass_recurrence_with_many_passes_is_explained():
    with pytest.raises(ValueError, match="recurrence='none' runs exactly one pass"):
        preset("pythia-tiny", passes=4)


def test_unknown_override_field_raises_with_hint():
    with pytest.raises(ValueError) as err:
        zoo.build("pythia-tiny", pases=4)
    assert "'pases'" in str(err.value) and "did you mean 'passes'" in str(err.value)
    with pytest.raises(ValueError, match="did you mean 'num_layers'"):
        ModelConfig.from_dict(dict(preset("pythia-tiny").to_dict(), num_layer=3))
    with pytest.raises(ValueError, match="did you mean 'dim'"):
        preset("pythia-tiny").replace(dimm=3)


def test_bad_halting_kwargs_raise_value_error():
    with pytest.raises(ValueError, match="halting_kwargs"):
        zoo.build("ponder-pythia-tiny", halting_kwargs={"bogus": 1})


def test_config_is_frozen():
    config = preset("pythia-tiny")
    with pytest.raises(AttributeError):
        config.dim = 3  # type: ignore[misc]
