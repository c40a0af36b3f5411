"""Hugging Face GPT-NeoX interop: logits parity with transformers in both directions.

Llama folders, Hub ids and adaptive models with remote code have their own test files."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

import zoo
from hf_helpers import hf_logits, ids_for, max_diff, zoo_logits

TOL = 1e-4



CONFIGS = {
    "rotary0.25-parallel-untied": dict(rotary_pct=0.25),
    "rotary0.5-sequential-untied": dict(rotary_pct=0.5, use_parallel_residual=False, vocab_size=131),
    "rotary1.0-parallel-tied": dict(rotary_pct=1.0, tie_word_embeddings=True, num_hidden_layers=3),
    "rotary0.25-sequential-tied-dim32": dict(
        rotary_pct=0.25,
        use_parallel_residual=False,
        tie_word_embeddings=True,
        hidden_size=32,
        intermediate_size=96,
        vocab_size=300,
    ),
}


@pytest.mark.parametrize("config", list(CONFIGS.values()), ids=list(CONFIGS))
def test_from_hf_matches_transformers(hf_neox_folder, config, device):
    hf, folder = hf_neox_folder(**config)
    hf, model = hf.to(device), zoo.from_hf(folder).to(device)
    assert model.config.recurrence == "none" and model.config.passes == 1 and model.config.embed_scale == 1.0
    assert model.config.tied_embeddings == hf.config.tie_word_embeddings
    assert (model.head.weight is model.embed.weight) == model.config.tied_embeddings
    ids = ids_for(hf.config.vocab_size).to(device)
    reference = hf_logits(hf, ids)
    assert reference.abs().max() > 1.0  # a non-trivial model, so the comparison can fail
    assert max_diff(zoo_logits(model, ids), reference) <= TOL


def test_wiring_bug_is_caught(hf_neox_folder):
    """The parity check is sharp: the same weights with the residual wiring flipped differ."""
    hf, folder = hf_neox_folder()
    wrong = zoo.from_hf(folder, parallel_residual=False)
    ids = ids_for(hf.config.vocab_size)
    assert max_diff(zoo_logits(wrong, ids), hf_logits(hf, ids)) > 1e-2


def _pythia_v4_folder(hf, folder):
    """Rewrites ``folder`` as published Pythia checkpoints look: a transformers 4.x
    config.json, fp16 weights and the legacy buffers old GPT-NeoX code saved."""
    cfg = hf.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    rotary = int(head_dim * cfg.rope_parameters["partial_rotary_factor"])
    config = {
        "architectures": ["GPTNeoXForCausalLM"],
        "bos_token_id": 0,
        "eos_token_id": 0,
        "hidden_act": "gelu",
        "hidden_size": cfg.hidden_size,
        "initializer_range": 0.02,
        "intermediate_size": cfg.intermediate_size,
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": cfg.max_position_embeddings,
        "model_type": "gpt_neox",
        "num_attention_heads": cfg.num_attention_heads,
        "num_hidden_layers": cfg.num_hidden_layers,
        "rotary_emb_base": 10000,
        "rotary_pct": cfg.rope_parameters["partial_rotary_factor"],
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
        "transformers_version": "4.24.0",
        "use_cache": True,
        "use_parallel_residual": True,
        "vocab_size": cfg.vocab_size,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    weights = {k: v.half() for k, v in load_file(folder / "model.safetensors").items()}
    T = cfg.max_position_embeddings
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary, 2).float() / rotary))
    for i in range(cfg.num_hidden_layers):
        causal = torch.tril(torch.ones(T, T, dtype=torch.bool))[None, None]
        weights[f"gpt_neox.layers.{i}.attention.bias"] = causal
        weights[f"gpt_neox.layers.{i}.attention.masked_bias"] = torch.tensor(-1e9)
        weights[f"gpt_neox.layers.{i}.attention.rotary_emb.inv_freq"] = inv_freq.clone()
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


def test_published_pythia_form_fp16_with_legacy_buffers(hf_neox_folder):
    hf, folder = hf_neox_folder(rotary_pct=0.5)
    _pythia_v4_folder(hf, folder)
    # The reference computes with the fp16-rounded weights, in fp32.
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(p.half().float())
    model = zoo.from_hf(folder)
    assert model.embed.weight.dtype == torch.float32
    assert model.config.rotary_fraction == 0.5
    assert model.config.max_seq_len == hf.config.max_position_embeddings
    ids = ids_for(hf.config.vocab_size)
    assert max_diff(zoo_logits(model, ids), hf_logits(hf, ids)) <= TOL

    half = zoo.from_hf(folder, dtype=torch.float16)
    assert half.embed.weight.dtype == torch.float16
    assert torch.equal(half.embed.weight, load_file(folder / "model.safetensors")["gpt_neox.embed_in.weight"])


def test_transformers_reads_the_v4_form_the_same_way(hf_neox_folder):
    """The 4.x-form folder, read by transformers itself, is the same model (fixture sanity)."""
    from transformers import GPTNeoXForCausalLM

    hf, folder = hf_neox_folder(rotary_pct=0.5)
    _pythia_v4_folder(hf, folder)
    reloaded = GPTNeoXForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    model = zoo.from_hf(folder)
    ids = ids_for(hf.config.vocab_size)
    assert max_diff(zoo_logits(model, ids), hf_logits(reloaded, ids)) <= TOL


@pytest.mark.parametrize("act, approximate", [("gelu", "none"), ("gelu_new", "tanh"), ("gelu_fast", "tanh")])
def test_hidden_act_maps_to_gelu_flavour(hf_neox_folder, act, approximate):
    hf, folder = hf_neox_folder(hidden_act=act, num_hidden_layers=1)
    model = zoo.from_hf(folder)
    assert model.config.gelu_approximate == approximate
    ids = ids_for(hf.config.vocab_size)
    assert max_diff(zoo_logits(model, ids), hf_logits(hf, ids)) <= TOL


def test_sharded_checkpoint(hf_neox_folder):
    hf, folder = hf_neox_folder(save_kwargs={"max_shard_size": "60KB"})
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (folder / "model.safetensors").exists()
    ids = ids_for(hf.config.vocab_size)
    assert max_diff(zoo_logits(zoo.from_hf(folder), ids), hf_logits(hf, ids)) <= TOL


@pytest.mark.parametrize(
    "overrides",
    [
        dict(),
        dict(tied_embeddings=True),
        dict(parallel_residual=False, gelu_approximate="tanh", rotary_fraction=0.5),
    ],
    ids=["untied", "tied", "sequential-tanh-rotary0.5"],
)
def test_to_hf_round_trip(tmp_path, randomize, overrides):
    from transformers import GPTNeoXForCausalLM

    model = randomize(zoo.build("pythia-tiny", **overrides), seed=3).eval()
    folder = zoo.to_hf(model, tmp_path / "out")
    hf = GPTNeoXForCausalLM.from_pretrained(folder).eval()
    assert hf.config.tie_word_embeddings == model.config.tied_embeddings
    ids = ids_for(model.config.vocab_size, T=32)
    reference = zoo_logits(model, ids)
    assert reference.abs().max() > 1.0
    assert max_diff(hf_logits(hf, ids), reference) <= TOL
    # And back again: from_hf of what to_hf wrote is the same model.
    back = zoo.from_hf(folder)
    assert back.config == model.config
    assert max_diff(zoo_logits(back, ids), reference) == 0.0


PLAIN_REFUSALS = [
    ("ponder-pythia-tiny", dict(), "GPT-NeoX", "recurrence='ponder'"),
    ("pythia-tiny", dict(embed_scale=2.0), "GPT-NeoX", "embed_scale"),
    ("pythia-tiny", dict(num_kv_heads=2), "GPT-NeoX", "num_kv_heads"),
    ("pythia-tiny", dict(bias=False), "GPT-NeoX", "bias=False"),
    ("pythia-tiny", dict(cache="kv_reuse"), "GPT-NeoX", "cache='kv_reuse'"),
    ("pythia-tiny", dict(block="llama"), "Llama", "rotary_fraction=0.25"),
    ("ponder-pythia-tiny", dict(block="llama", rotary_fraction=1.0), "Llama", "recurrence='ponder'"),
]


@pytest.mark.parametrize("name, overrides, plain, reason", PLAIN_REFUSALS)
def test_to_hf_without_remote_code_refuses_what_is_not_plain(tmp_path, name, overrides, plain, reason):
    model = zoo.build(name, **overrides)
    with pytest.raises(ValueError, match=f"cannot be expressed as {plain}") as err:
        zoo.to_hf(model, tmp_path / "out", remote_code=False)
    assert reason in str(err.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name, overrides, plain, reason", PLAIN_REFUSALS)
def test_to_hf_writes_remote_code_for_the_rest_and_says_why(tmp_path, name, overrides, plain, reason):
    folder = zoo.to_hf(zoo.build(name, **overrides), tmp_path / "out")
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "ponder_zoo" and "auto_map" in config
    card = (folder / "README.md").read_text()
    assert f"It is not a {plain} model" in card and reason in card


@pytest.mark.parametrize("cache", ["recompute", "kv_reuse"])
def test_ponder_from_pythia_equals_reference_loop(hf_neox_folder, cache):
    """4-pass PonderLM over the transformers model, written out: E += softmax(Z) @ Embed."""
    hf, folder = hf_neox_folder()
    model = zoo.from_hf(folder, recurrence="ponder", passes=4, halting="none", cache=cache)
    assert model.config.embed_scale == 1.0
    ids = ids_for(hf.config.vocab_size)
    with torch.no_grad():
        embed = hf.gpt_neox.embed_in.weight
        E = hf.gpt_neox.embed_in(ids)
        for _ in range(3):
            logits = hf(inputs_embeds=E).logits
            E = E + torch.softmax(logits, dim=-1) @ embed
        reference = hf(inputs_embeds=E).logits
        plain = hf(input_ids=ids).logits
    assert max_diff(reference, plain) > 1e-2  # pondering changes the output
    out = model.eval()(ids, execution="dense")
    assert max_diff(out.logits, reference) <= TOL
    assert out.depth.eq(4).all()


def test_one_pass_ponder_is_plain_pythia(hf_neox_folder):
    hf, folder = hf_neox_folder()
    model = zoo.from_hf(folder, recurrence="ponder", passes=1)
    ids = ids_for(hf.config.vocab_size)
    assert max_diff(zoo_logits(model, ids), hf_logits(hf, ids)) <= TOL


def test_adaponder_from_pythia_keeps_fresh_gates_and_logs_them(hf_neox_folder, caplog):
    hf, folder = hf_neox_folder()
    with caplog.at_level(logging.INFO, logger="zoo.interop"):
        model = zoo.from_hf(folder, recurrence="ponder", passes=4, halting="mlp_gate", cache="kv_reuse")
    records = [r for r in caplog.records if r.name == "zoo.interop"]
    assert len(records) == 1
    gate_names = [n for n, _ in model.named_parameters() if n.startswith("halting.")]
    assert gate_names and all(n in records[0].getMessage() for n in gate_names)
    assert "layers.0" not in records[0].getMessage()
    # Backbone from the checkpoint, gates freshly initialised (finite, not all zero).
    hf_qkv = hf.gpt_neox.layers[1].attention.query_key_value.weight
    assert torch.equal(model.layers[1].attn.qkv.weight, hf_qkv)
    assert torch.equal(model.head.weight, hf.lm_head.weight)
    gates = torch.cat([p.flatten() for n, p in model.named_parameters() if n.startswith("halting.")])
    assert torch.isfinite(gates).all() and gates.abs().sum() > 0
    out = model.eval()(ids_for(hf.config.vocab_size), execution="dense")
    assert torch.isfinite(out.logits).all()


def test_plain_load_logs_nothing(hf_neox_folder, caplog):
    _, folder = hf_neox_folder()
    with caplog.at_level(logging.INFO, logger="zoo.interop"):
        zoo.from_hf(folder)
    assert not [r for r in caplog.records if r.name == "zoo.interop"]


# Errors ---------------------------------------------------------------------------------


def test_pickle_only_folder_is_refused(hf_neox_folder):
    _, folder = hf_neox_folder()
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(ValueError) as err:
        zoo.from_hf(folder)
    message = str(err.value)
    for needle in ("pytorch_model.bin", "pickle", "arbitrary code", "safe_serialization=True"):
        assert needle in message


@pytest.mark.parametrize("name", ["weights.pt", "model.pth"])
def test_other_pickle_extensions_are_refused(hf_neox_folder, name):
    _, folder = hf_neox_folder()
    (folder / "model.safetensors").unlink()
    (folder / name).write_bytes(b"\x80\x04")
    with pytest.raises(ValueError, match="pickle"):
        zoo.from_hf(folder)


def test_missing_folder_and_missing_config(tmp_path, hf_neox_folder):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        zoo.from_hf(tmp_path / "nowhere")
    _, folder = hf_neox_folder()
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        zoo.from_hf(folder)


def test_no_weights_at_all(hf_neox_folder):
    _, folder = hf_neox_folder()
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        zoo.from_hf(folder)


def test_truncated_weights_name_the_file(hf_neox_folder):
    _, folder = hf_neox_folder()
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])
    with pytest.raises(ValueError, match="model.safetensors") as err:
        zoo.from_hf(folder)
    assert "truncated or corrupted" in str(err.value)


def test_missing_unexpected_and_misshaped_tensors_are_listed(hf_neox_folder):
    _, folder = hf_neox_folder()
    weights = load_file(folder / "model.safetensors")
    del weights["gpt_neox.layers.1.mlp.dense_4h_to_h.bias"]
    weights["gpt_neox.layers.0.attention.dense.weight"] = torch.zeros(3, 3)
    weights["gpt_neox.layers.2.attention.dense.weight"] = torch.zeros(64, 64)  # a layer too many
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError) as err:
        zoo.from_hf(folder)
    message = str(err.value)
    assert "missing tensors: layers.1.mlp.fc_out.bias" in message
    assert "unexpected tensors: layers.2.attn.proj.weight" in message
    assert "layers.0.attn.proj.weight: stored [3, 3], model [64, 64]" in message


def test_foreign_tensor_names_are_listed(hf_neox_folder):
    _, folder = hf_neox_folder()
    weights = load_file(folder / "model.safetensors")
    weights["transformer.h.0.attn.weight"] = torch.zeros(2)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="transformer.h.0.attn.weight"):
        zoo.from_hf(folder)


def test_unknown_override_and_unsupported_config(hf_neox_folder):
    _, folder = hf_neox_folder()
    with pytest.raises(ValueError, match="did you mean 'passes'"):
        zoo.from_hf(folder, pases=4)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, hidden_act="relu")))
    with pytest.raises(ValueError, match="hidden_act 'relu'"):
        zoo.from_hf(folder)
    (folder / "config.json").write_text(json.dumps(dict(config, model_type="gpt2")))
    reads = "model_type 'gpt2'; zoo.from_hf reads 'gpt_neox', 'llama', 'ponder_zoo'"
    with pytest.raises(ValueError, match=reads):
        zoo.from_hf(folder)


def test_zoo_checkpoint_is_pointed_to_load(tmp_path):
    folder = zoo.save(zoo.build("pythia-tiny"), tmp_path / "ckpt")
    with pytest.raises(ValueError, match="zoo.load"):
        zoo.from_hf(folder)


@pytest.mark.parametrize("halting", zoo.available("halting"))
def test_every_halting_policy_starts_from_pythia(hf_neox_folder, halting):
    hf, folder = hf_neox_folder(num_hidden_layers=1)
    model = zoo.from_hf(folder, recurrence="ponder", passes=3, halting=halting, cache="kv_reuse")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    ids = ids_for(hf.config.vocab_size, T=8)
    with torch.no_grad():
        dense = model.eval()(ids, execution="dense")
    assert torch.isfinite(dense.logits).all()
    assert dense.depth.min() >= 1 and dense.depth.max() <= 3
