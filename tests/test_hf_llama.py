"""Hugging Face Llama interop: logits parity with transformers' LlamaForCausalLM both ways."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

import zoo
from hf_helpers import hf_logits, ids_for, max_diff, zoo_logits

TOL = 1e-4



@pytest.fixture
def hf_llama_folder(tmp_path, randomize):
    """Factory: a random ``LlamaForCausalLM`` written with ``save_pretrained``; returns (model, folder).

    ``rope_theta`` is given as transformers 5 spells it, in ``rope_parameters``; defaults
    are a 2-layer, width-64 model with 4 query and 2 key/value heads.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    def write(name: str = "llama", seed: int = 0, rope_theta: float = 10000.0, **config):
        fields = dict(
            vocab_size=200,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=256,
            max_position_embeddings=64,
            rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        )
        fields.update(config)
        torch.manual_seed(seed)
        model = randomize(LlamaForCausalLM(LlamaConfig(**fields)), seed).eval()
        folder = tmp_path / name
        model.save_pretrained(folder, safe_serialization=True)
        return model, folder

    return write


CONFIGS = {
    "gqa-untied-nobias": dict(),
    "mha-tied-bias-theta5e5-eps1e-5": dict(
        num_key_value_heads=4,
        tie_word_embeddings=True,
        attention_bias=True,
        mlp_bias=True,
        rope_theta=500000.0,
        rms_norm_eps=1e-5,
        intermediate_size=100,
    ),
    "mqa-untied-3layers-vocab131": dict(num_key_value_heads=1, num_hidden_layers=3, vocab_size=131),
    "gqa-tied-dim96-heads6": dict(
        hidden_size=96,
        num_attention_heads=6,
        num_key_value_heads=3,
        intermediate_size=384,
        tie_word_embeddings=True,
    ),
}


@pytest.mark.parametrize("config", list(CONFIGS.values()), ids=list(CONFIGS))
def test_from_hf_llama_matches_transformers(hf_llama_folder, config):
    hf, folder = hf_llama_folder(**config)
    model = zoo.from_hf(folder)
    c = model.config
    assert (c.block, c.recurrence, c.passes) == ("llama", "none", 1)
    assert c.rotary_fraction == 1.0 and c.embed_scale == 1.0
    assert c.kv_heads == hf.config.num_key_value_heads and c.norm_eps == hf.config.rms_norm_eps
    assert c.rotary_base == hf.config.rope_parameters["rope_theta"]
    assert c.bias == hf.config.attention_bias and c.hidden_dim == hf.config.intermediate_size
    assert (model.head.weight is model.embed.weight) == hf.config.tie_word_embeddings
    ids = ids_for(hf.config.vocab_size)
    reference = hf_logits(hf, ids)
    assert reference.abs().max() > 1.0  # a non-trivial model, so the comparison can fail
    assert max_diff(zoo_logits(model, ids), reference) <= TOL


def test_parity_is_sharp(hf_llama_folder):
    """The same weights with another rope theta, or with key and value heads swapped, differ."""
    hf, folder = hf_llama_folder()
    ids = ids_for(hf.config.vocab_size)
    reference = hf_logits(hf, ids)
    assert max_diff(zoo_logits(zoo.from_hf(folder, rotary_base=500.0), ids), reference) > 1e-2
    weights = load_file(folder / "model.safetensors")
    k, v = "model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.v_proj.weight"
    weights[k], weights[v] = weights[v], weights[k]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    assert max_diff(zoo_logits(zoo.from_hf(folder), ids), reference) > 1e-2


def test_bf16_equals_transformers_bf16(hf_llama_folder):
    """RMSNorm rounds as LlamaRMSNorm does (fp32 normalisation, scale in bf16): equal in bf16 too."""
    from transformers import LlamaForCausalLM

    _, folder = hf_llama_folder()
    hf = LlamaForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()
    model = zoo.from_hf(folder, dtype=torch.bfloat16)
    ids = ids_for(hf.config.vocab_size)
    # Under one bf16 step at the logits' size (1/32 between 4 and 8): the same roundings throughout.
    assert max_diff(zoo_logits(model, ids), hf_logits(hf, ids)) <= 1e-2


def test_transformers_4_config_form(hf_llama_folder):
    """config.json as transformers 4.x wrote it: rope_theta at the top, rope_scaling null, torch_dtype."""
    hf, folder = hf_llama_folder(rope_theta=250000.0)
    config = json.loads((folder / "config.json").read_text())
    del config["rope_parameters"]
    config.update(rope_theta=250000.0, rope_scaling=None, torch_dtype="float32", pretraining_tp=1)
    (folder / "config.json").write_text(json.dumps(config))
    model = zoo.from_hf(folder)
    assert model.config.rotary_base == 250000.0
    ids = ids_for(hf.config.vocab_size)
    assert max_diff(zoo_logits(model, ids), hf_logits(hf, ids)) <= TOL


@pytest.mark.parametrize(
    "overrides",
    [
        dict(num_kv_heads=2),
        dict(tied_embeddings=True, bias=True),
        dict(num_kv_heads=1, mlp_dim=40, norm_eps=1e-5),
    ],
    ids=["gqa", "tied-bias", "mqa-mlp40"],
)
def test_to_hf_llama_round_trip(tmp_path, randomize, overrides):
    from transformers import LlamaForCausalLM

    model = zoo.build("pythia-tiny", block="llama", rotary_fraction=1.0, rotary_base=20000.0, **overrides)
    model = randomize(model, seed=3).eval()
    folder = zoo.to_hf(model, tmp_path / "out")
    assert json.loads((folder / "config.json").read_text())["model_type"] == "llama"
    assert not (folder / "README.md").exists()  # a plain folder: no remote code to explain
    hf = LlamaForCausalLM.from_pretrained(folder).eval()
    assert hf.config.num_key_value_heads == model.config.kv_heads
    assert hf.config.tie_word_embeddings == model.config.tied_embeddings
    ids = ids_for(model.config.vocab_size, T=32)
    reference = zoo_logits(model, ids)
    assert reference.abs().max() > 1.0
    assert max_diff(hf_logits(hf, ids), reference) <= TOL
    back = zoo.from_hf(folder)
    assert back.config == model.config
    assert max_diff(zoo_logits(back, ids), reference) == 0.0


@pytest.mark.parametrize("cache", ["recompute", "kv_reuse"])
def test_ponder_from_llama_equals_reference_loop(hf_llama_folder, cache):
    """4-pass PonderLM over the transformers Llama, written out: E += softmax(Z) @ Embed."""
    hf, folder = hf_llama_folder()
    model = zoo.from_hf(folder, recurrence="ponder", passes=4, halting="none", cache=cache)
    ids = ids_for(hf.config.vocab_size)
    with torch.no_grad():
        embed = hf.model.embed_tokens.weight
        E = hf.model.embed_tokens(ids)
        for _ in range(3):
            E = E + torch.softmax(hf(inputs_embeds=E).logits, dim=-1) @ embed
        reference = hf(inputs_embeds=E).logits
    assert max_diff(reference, hf_logits(hf, ids)) > 1e-2  # pondering changes the output
    out = model.eval()(ids, execution="dense")
    assert max_diff(out.logits, reference) <= TOL
    assert out.depth.eq(4).all()


def test_adaponder_from_llama_keeps_backbone_and_logs_fresh_gates(hf_llama_folder, caplog):
    hf, folder = hf_llama_folder()
    with caplog.at_level(logging.INFO, logger="zoo.interop"):
        model = zoo.from_hf(folder, recurrence="ponder", passes=3, halting="mlp_gate", cache="kv_reuse")
    records = [r.getMessage() for r in caplog.records if r.name == "zoo.interop"]
    assert len(records) == 1 and "halting." in records[0] and "layers." not in records[0]
    attn = hf.model.layers[1].self_attn
    # Key/value head 1's rows of the fused weight: its two query heads, its key, its value.
    fused = model.layers[1].attn.qkv.weight.view(2, 4, 16, 64)[1]
    assert torch.equal(fused[:2].reshape(32, 64), attn.q_proj.weight[32:])
    assert torch.equal(fused[2], attn.k_proj.weight[16:])
    assert torch.equal(fused[3], attn.v_proj.weight[16:])
    ids = ids_for(hf.config.vocab_size, T=12)
    model.eval()
    with torch.no_grad():
        dense, sparse = model(ids, execution="dense"), model(ids, execution="sparse")
    torch.testing.assert_close(dense.logits, sparse.logits)
    assert torch.equal(dense.depth, sparse.depth)


# Errors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5}), "rope_type 'llama3'"),
        (dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope_type 'linear'"),
        (dict(head_dim=32), "head_dim=32"),
        (dict(attention_bias=True, mlp_bias=False), "attention_bias=True and mlp_bias=False"),
        (dict(hidden_act="gelu"), "hidden_act 'gelu'"),
        (dict(partial_rotary_factor=0.5), "partial_rotary_factor=0.5"),
    ],
    ids=["llama3-rope", "linear-rope-scaling", "head_dim", "mixed-bias", "gelu", "partial-rotary"],
)
def test_unsupported_llama_configs_are_named(hf_llama_folder, change, message):
    _, folder = hf_llama_folder()
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(dict(config, **change)))
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        zoo.from_hf(folder)


def test_missing_misshaped_and_foreign_llama_tensors_are_listed(hf_llama_folder):
    _, folder = hf_llama_folder()
    weights = load_file(folder / "model.safetensors")
    del weights["model.layers.1.self_attn.k_proj.weight"]
    weights["model.layers.0.mlp.up_proj.weight"] = torch.zeros(3, 64)
    weights["model.layers.2.mlp.down_proj.weight"] = torch.zeros(64, 256)  # a layer too many
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError) as err:
        zoo.from_hf(folder)
    message = str(err.value)
    assert "missing tensors: model.layers.1.self_attn.k_proj.weight" in message
    assert "unexpected tensors: model.layers.2.mlp.down_proj.weight" in message
    assert "model.layers.0.mlp.up_proj.weight: stored [3, 64], model [256, 64]" in message
    weights = load_file(folder / "model.safetensors")
    weights["transformer.wte.weight"] = torch.zeros(2)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="not Llama weights: transformer.wte.weight"):
        zoo.from_hf(folder)
