"""Fuzzing the inputs a user or a damaged disk hands the library.

hypothesis draws config dicts, Hugging Face config.json values, command-line overrides,
sampling arguments, damaged checkpoint files and metrics logs, and folders of arbitrary
entries to save into. Every one must end in a result or a ``ValueError`` (a
``FileNotFoundError`` for missing files) with a message, never another exception, a hang
or an allocation; and a refused write must leave the folder exactly as it was.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import zoo
from test_checkpoint import snapshot
from zoo.config import LIMITS, ModelConfig, parse_hf_config, parse_overrides, preset
from zoo.sampling import check_sampling
from zoo.train import read_metrics

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
FILES = settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

# JSON values of every kind, the odd ones (huge, non-finite, wrong type) included.
json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["false", "true", "64", "1e-5", "none", "act", "kv_reuse", "neox"]),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)
FIELDS = sorted(f for f in ModelConfig.__dataclass_fields__)


def _message(err: Exception) -> str:
    text = str(err)
    assert text and len(text) < 5000, text
    return text


# Config parsing ---------------------------------------------------------------------------------


@FUZZ
@given(changes=st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=4))
def test_any_config_dict_is_a_config_or_a_value_error(changes):
    data = {**preset("ponder-pythia-tiny").to_dict(), **changes}
    try:
        config = ModelConfig.from_dict(data)
    except ValueError as err:
        _message(err)
        return
    assert ModelConfig.from_json(config.to_json()) == config
    for name, (low, high) in LIMITS.items():
        value = getattr(config, name)
        assert value is None or (type(value) is int and low <= value <= high), name
    assert all(math.isfinite(getattr(config, n)) for n in ("norm_eps", "embed_scale", "rotary_base"))


HF_KEYS = [
    "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
    "max_position_embeddings", "layer_norm_eps", "rotary_pct", "rotary_emb_base", "use_parallel_residual",
    "tie_word_embeddings", "hidden_act", "rope_parameters", "rope_scaling", "attention_bias",
]
NEOX = {
    "model_type": "gpt_neox", "vocab_size": 200, "hidden_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "intermediate_size": 256, "max_position_embeddings": 64,
}


@FUZZ
@given(changes=st.dictionaries(st.sampled_from(HF_KEYS), json_values, max_size=3))
def test_any_hugging_face_config_is_fields_or_a_value_error(changes):
    from zoo.interop.hf import hf_config_to_fields

    data = {**NEOX, **changes}
    try:
        config = ModelConfig(**hf_config_to_fields(parse_hf_config(data, "config.json")))
    except ValueError as err:
        _message(err)
        return
    assert config.dim <= LIMITS["dim"][1] and config.num_layers <= LIMITS["num_layers"][1]


# Command-line overrides ----------------------------------------------------------------------------


@FUZZ
@given(
    items=st.lists(
        st.one_of(
            st.text(max_size=30),
            st.builds(lambda f, v: f"{f}={v}", st.sampled_from(FIELDS), st.text(max_size=20)),
        ),
        max_size=3,
    )
)
def test_any_override_text_parses_or_is_a_value_error(items):
    try:
        parsed = parse_overrides(items)
    except ValueError as err:
        _message(err)
        return
    try:
        preset("ponder-pythia-tiny", **parsed)
    except ValueError as err:  # a value of the right type out of range, or fields that disagree
        _message(err)


@FUZZ
@given(
    dim=st.sampled_from([32, 64, 128]),
    eps=st.floats(min_value=1e-12, max_value=1.0),
    bias=st.booleans(),
    kwargs=st.dictionaries(st.sampled_from(["threshold", "k_max"]), st.floats(0.0, 1.0), max_size=2),
)
def test_overrides_round_trip_their_json(dim, eps, bias, kwargs):
    items = [f"dim={dim}", f"norm_eps={json.dumps(eps)}", f"bias={json.dumps(bias)}"]
    items.append(f"halting_kwargs={json.dumps(kwargs)}")
    assert parse_overrides(items) == {"dim": dim, "norm_eps": eps, "bias": bias, "halting_kwargs": kwargs}


# Sampling arguments -----------------------------------------------------------------------------------


@FUZZ
@given(
    temperature=json_scalars,
    top_k=json_scalars,
    top_p=json_scalars,
    eos=json_scalars,
    seed=json_scalars,
)
def test_any_sampling_arguments_are_checked_or_refused(temperature, top_k, top_p, eos, seed):
    try:
        checked = check_sampling(temperature, top_k, top_p, eos, seed, vocab_size=512)
    except ValueError as err:
        _message(err)
        return
    assert checked.temperature >= 0 and math.isfinite(checked.temperature)
    assert checked.temperature > 0 or (checked.top_k is None and checked.top_p is None)
    assert checked.eos_token_id is None or 0 <= checked.eos_token_id < 512


# Damaged checkpoint files -----------------------------------------------------------------------------


class Files(dict):
    """File name -> bytes, shown by name only in hypothesis' reports."""

    def __repr__(self) -> str:
        return f"Files({sorted(self)})"


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Files:
    model = zoo.build("pythia-tiny", num_layers=1, dim=32, num_heads=2, vocab_size=64)
    folder = zoo.save(model, tmp_path_factory.mktemp("ckpt") / "c")
    return Files({name: (folder / name).read_bytes() for name in ("config.json", "model.safetensors")})


@FILES
@given(data=st.data())
def test_damaged_weights_load_or_raise_naming_the_file(tmp_path_factory, saved, data):
    blob = bytearray(saved["model.safetensors"])
    header_end = 8 + int.from_bytes(blob[:8], "little")
    how = data.draw(st.sampled_from(["flip", "truncate", "length"]))
    if how == "flip":  # bytes of the header or the first tensors changed
        for _ in range(data.draw(st.integers(1, 4))):
            where = data.draw(st.integers(0, min(header_end + 64, len(blob) - 1)))
            blob[where] = data.draw(st.integers(0, 255))
    elif how == "truncate":
        del blob[data.draw(st.integers(0, len(blob) - 1)) :]
    else:  # the header length itself, huge or wrong
        blob[:8] = data.draw(st.integers(0, 2**64 - 1)).to_bytes(8, "little")
    folder = tmp_path_factory.mktemp("damaged")
    (folder / "config.json").write_bytes(saved["config.json"])
    (folder / "model.safetensors").write_bytes(bytes(blob))
    try:
        model = zoo.load(folder)
    except ValueError as err:
        assert "model.safetensors" in _message(err) or "config.json" in str(err)
        return
    assert model.config.num_layers == 1  # a change inside tensor data loads as other values


@FILES
@given(data=st.data())
def test_damaged_config_json_loads_or_raises_naming_the_file(tmp_path_factory, saved, data):
    header = json.loads(saved["config.json"])
    how = data.draw(st.sampled_from(["text", "value", "header"]))
    if how == "text":
        text = saved["config.json"].decode()
        cut = data.draw(st.integers(0, len(text)))
        raw = (text[:cut] + data.draw(st.text(max_size=5)) + text[cut + 1 :]).encode("utf-8", "surrogatepass")
    elif how == "value":
        header["config"][data.draw(st.sampled_from(FIELDS))] = data.draw(json_values)
        raw = json.dumps(header).encode()
    else:
        key = data.draw(st.sampled_from(["format", "format_version", "config", "write_id"]))
        header[key] = data.draw(json_values)
        raw = json.dumps(header).encode()
    folder = tmp_path_factory.mktemp("damaged")
    (folder / "config.json").write_bytes(raw)
    (folder / "model.safetensors").write_bytes(saved["model.safetensors"])
    try:
        zoo.load(folder)
    except ValueError as err:
        assert "config.json" in _message(err) or "model.safetensors" in str(err)


@FILES
@given(data=st.data())
def test_a_metrics_log_cut_anywhere_reads_as_its_whole_rows(tmp_path_factory, data):
    rows = [{"step": i, "loss": 1.0 / i} for i in range(1, 6)]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    cut = data.draw(st.integers(0, len(text)))
    folder = tmp_path_factory.mktemp("run")
    (folder / "metrics.jsonl").write_text(text[:cut])
    assert read_metrics(folder) == rows[: text[:cut].count("\n") + (1 if text[:cut].endswith("}") else 0)]


# Folders to save into ------------------------------------------------------------------------------------


ENTRY_NAMES = [
    "config.json",
    "model.safetensors",
    "README.md",
    "tokenizer.json",
    "sub",
    ".hidden",
    "model.safetensors.tmp",
]
entries = st.dictionaries(
    st.sampled_from(ENTRY_NAMES),
    st.one_of(
        st.tuples(st.just("file"), st.binary(max_size=20)),
        st.tuples(st.just("zoo-config"), st.just(b"")),
        st.tuples(st.just("dir"), st.just(b"")),
        st.tuples(st.just("link"), st.sampled_from(["elsewhere", "missing"])),
    ),
    max_size=4,
)


@FILES
@given(layout=entries, allow=st.booleans())
def test_save_into_any_folder_writes_its_two_files_or_changes_nothing(tmp_path_factory, saved, layout, allow):
    root = tmp_path_factory.mktemp("save")
    folder, outside = root / "folder", root / "elsewhere"
    folder.mkdir()
    outside.write_bytes(b"shared blob")
    for name, (kind, content) in layout.items():
        path = folder / name
        if kind == "file":
            path.write_bytes(content)
        elif kind == "zoo-config":
            path.write_bytes(saved["config.json"])
        elif kind == "dir":
            path.mkdir()
        else:
            path.symlink_to(root / content)
    before, blob = snapshot(folder), outside.read_bytes()
    model = zoo.build("pythia-tiny", num_layers=1, dim=32, num_heads=2, vocab_size=64)
    try:
        zoo.save(model, folder, allow_other_files=allow)
    except ValueError as err:
        _message(err)
        assert snapshot(folder) == before  # refused: nothing written, nothing deleted
    else:
        after = snapshot(folder)
        for name, value in before.items():
            if name not in ("config.json", "model.safetensors"):
                assert after.get(name) == value, name  # every other entry kept as it was
        assert torch.equal(zoo.load(folder).embed.weight, model.embed.weight)
    assert outside.read_bytes() == blob  # nothing written through a link
