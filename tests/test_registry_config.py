"""Registries, presets and ModelConfig: names, counts, validation, JSON round trip."""

from __future__ import annotations

import json
import math
import time

import pytest

import zoo
from zoo.config import PYTHIA_SHAPES, ModelConfig, count_parameters, parse_overrides, preset
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

# The config field values of the public contract (docs/api/config.md).
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


# Strict fields, bounds and sizes ------------------------------------------------------------


@pytest.mark.parametrize(
    "field, value, needle",
    [
        ("parallel_residual", "false", "must be true or false"),
        ("tied_embeddings", 1, "must be true or false"),
        ("embed_scale", math.inf, "finite positive number"),
        ("norm_eps", math.inf, "finite positive number"),
        ("rotary_base", math.nan, "finite positive number"),
        ("init_std", math.inf, "finite positive number or None"),
        ("num_layers", 10**6, "num_layers must be an int in [1, 1,024]"),
        ("dim", 10**9, "dim must be an int in [1, 131,072]"),
        ("vocab_size", 2**30, "vocab_size must be an int in [1, 16,777,216]"),
        ("passes", "4", "passes must be an int"),
        ("block", 3, "ModelConfig.block"),
        ("halting_kwargs", {"threshold": math.nan}, "halting_kwargs['threshold'] is NaN"),
        ("halting_kwargs", {1: 2}, "keys must be strings"),
        ("halting_kwargs", {"f": object()}, "use JSON values"),
    ],
)
def test_fields_are_typed_and_bounded(field, value, needle):
    started = time.perf_counter()
    with pytest.raises(ValueError) as err:
        preset("ponder-pythia-tiny", **{field: value})
    assert needle in str(err.value)
    assert time.perf_counter() - started < 1  # refused before anything is built


def test_absurd_sizes_are_refused_before_building(monkeypatch):
    started = time.perf_counter()
    with pytest.raises(ValueError, match=r"GiB in torch.float32, more than this machine's memory"):
        zoo.build("pythia-tiny", num_layers=1000, dim=32768, num_heads=64)
    assert time.perf_counter() - started < 10
    monkeypatch.setenv("PONDER_ZOO_MAX_MODEL_BYTES", "1e5")
    with pytest.raises(ValueError, match=r"more than the ceiling PONDER_ZOO_MAX_MODEL_BYTES=1e5"):
        zoo.build("pythia-tiny")
    meta = zoo.build("pythia-2.8b", device="meta")  # the meta device takes no memory: never refused
    assert meta.num_parameters() == PYTHIA_PARAMS["2.8b"]


@pytest.mark.parametrize("halting", zoo.available("halting"))
@pytest.mark.parametrize("block", zoo.available("block"))
def test_count_parameters_is_exact_and_below_the_fast_bound(halting, block):
    from zoo.config import _size_bound

    config = preset("ponder-pythia-tiny", halting=halting, block=block, num_kv_heads=2, cache="kv_reuse")
    model = zoo.build_model(config, device="meta")
    stored = sum(t.numel() for t in {id(t): t for t in model.state_dict().values()}.values())
    assert count_parameters(config) == stored
    assert count_parameters(config) <= _size_bound(config)  # lets ordinary builds skip counting


# Command-line overrides ------------------------------------------------------------------------


def test_overrides_take_plain_values_and_json():
    parsed = parse_overrides(
        ["dim=128", "halting=act", 'cache="kv_reuse"', "norm_eps=1e-6", "rotary_base=.5", "bias=false",
         "num_kv_heads=null", 'halting_kwargs={"threshold": 0.01}']
    )
    assert parsed == {
        "dim": 128,
        "halting": "act",
        "cache": "kv_reuse",
        "norm_eps": 1e-6,
        "rotary_base": 0.5,
        "bias": False,
        "num_kv_heads": None,
        "halting_kwargs": {"threshold": 0.01},
    }
    assert preset("ponder-pythia-tiny", **parse_overrides(["passes=2", "halting=act"])).passes == 2


@pytest.mark.parametrize(
    "item, needle",
    [
        ("dim=abc", "dim takes an integer (e.g. dim=512), not 'abc'"),
        ("dim=1.5", "dim takes an integer"),
        ("embed_scale=inf", "embed_scale takes a finite number"),
        ("norm_eps=Infinity", "norm_eps takes a finite number"),
        ("norm_eps=NaN", "norm_eps takes a finite number"),
        ("bias=yes", "bias takes true or false"),
        ("bias=True", "bias takes true or false (lower case)"),
        ("halting_kwargs={threshold: 0.1}", "halting_kwargs takes a JSON object (Expecting property name"),
        ("halting_kwargs=0.1", "halting_kwargs takes a JSON object (it reads as float)"),
        ("dimm=3", "did you mean 'dim'"),
        ("dim", "is not FIELD=VALUE"),
        ("=3", "is not FIELD=VALUE"),
    ],
)
def test_bad_overrides_name_the_value_and_the_fix(item, needle):
    with pytest.raises(ValueError) as err:
        parse_overrides([item])
    assert needle in str(err.value)


def test_an_override_given_twice_is_refused():
    with pytest.raises(ValueError, match="dim is given twice"):
        parse_overrides(["dim=64", "dim=128"])


# Hugging Face config.json ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key, value, needle",
    [
        ("hidden_size", 10**9, "hidden_size must be an integer in [1, 131,072], got 1000000000"),
        ("num_hidden_layers", 10**6, "num_hidden_layers must be an integer in [1, 1,024]"),
        ("hidden_size", "abc", "hidden_size must be an integer in [1, 131,072], got 'abc'"),
        ("layer_norm_eps", "1e-5", "layer_norm_eps must be a finite positive number, got '1e-5'"),
        ("tie_word_embeddings", "false", "tie_word_embeddings must be true or false (a JSON boolean)"),
        ("use_parallel_residual", "true", "use_parallel_residual must be true or false"),
        ("rotary_pct", 1.5, "rotary_pct must be a number in [0, 1]"),
        ("rope_parameters", {"rope_theta": "big"}, "rope_parameters.rope_theta must be a finite positive"),
    ],
)
def test_hugging_face_config_is_parsed_strictly_naming_the_file(hf_neox_folder, key, value, needle):
    _, folder = hf_neox_folder()
    config_file = folder / "config.json"
    data = json.loads(config_file.read_text())
    data[key] = value
    config_file.write_text(json.dumps(data))
    started = time.perf_counter()
    with pytest.raises(ValueError) as err:
        zoo.from_hf(folder)
    assert f"{config_file}: {needle}" in str(err.value)
    assert time.perf_counter() - started < 5
