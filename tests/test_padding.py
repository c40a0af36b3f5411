"""Forward like transformers: labels give the shifted cross-entropy, and a left-padded batch
gives every row exactly what it gets alone, in dense and sparse execution, for every cache
strategy and both blocks; transformers' GPT-NeoX with the same mask is the reference."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import zoo
from zoo.halting.mlp_gate import PAPER
from zoo.testing import tiny_model

LENGTHS = (9, 4, 12)
# (cache, halting) pairs: every cache strategy, and between them every policy.
PARTS = [
    ("kv_reuse", "mlp_gate"),
    ("recompute", "act"),
    ("kv_share", "fixed_prune"),
    ("recursion_wise", "early_exit"),
    ("kv_reuse", "act"),
]


def left_padded(vocab: int, lengths=LENGTHS, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) random ids and the left-padding mask of rows of the given lengths."""
    T = max(lengths)
    ids = torch.randint(0, vocab, (len(lengths), T), generator=torch.Generator().manual_seed(seed))
    mask = torch.zeros(len(lengths), T, dtype=torch.long)
    for b, n in enumerate(lengths):
        mask[b, T - n :] = 1
    return ids, mask


def executions(model) -> list[str]:
    return ["dense", "sparse"] if model.cache.freezes else ["dense"]


@pytest.mark.parametrize("block", ["neox", "llama"])
@pytest.mark.parametrize("cache, halting", PARTS)
def test_each_row_of_a_padded_batch_is_that_row_alone(block, cache, halting, plain_halting_settings):
    model = tiny_model(halting, plain_halting_settings[halting], cache=cache, block=block, sharpen=1.0).eval()
    ids, mask = left_padded(model.config.vocab_size)
    T = ids.shape[1]
    halted = False
    for execution in executions(model):
        with torch.no_grad():
            out = model(ids, attention_mask=mask, execution=execution)
            for b, n in enumerate(LENGTHS):
                alone = model(ids[b : b + 1, T - n :], execution=execution)
                torch.testing.assert_close(out.logits[b, T - n :], alone.logits[0], rtol=0, atol=1e-5)
                assert torch.equal(out.depth[b, T - n :], alone.depth[0]), (execution, b)
                assert torch.equal(out.masks[:, b, T - n :], alone.masks[:, 0])
                halted |= bool((alone.depth < model.config.passes).any())
        pads = mask == 0
        assert bool((out.depth[pads] == 0).all()) and bool((out.logits[pads] == 0).all())
        assert bool((out.gates[:, pads] == 1).all())
    assert halted, "no token halted: the comparison would not see halting decisions"


@pytest.mark.parametrize("halting", ["mlp_gate", "act", "early_exit"])
def test_padding_changes_neither_the_halting_decisions_nor_the_aux_loss(halting, halting_settings):
    kwargs = dict(halting_settings[halting])
    if halting == "early_exit":
        kwargs["aux_weight"] = 1.0
    if halting == "mlp_gate":  # the paper's bottom-k loss over every gate
        kwargs.update(PAPER)
    model = tiny_model(halting, kwargs, cache="kv_reuse").train()
    ids, mask = left_padded(model.config.vocab_size, lengths=(10, 16), seed=3)
    row, pad = ids[:1, 6:], mask[:1]
    alone = model(row, execution="dense", step=10**6)
    padded = model(ids[:1], attention_mask=pad, execution="dense", step=10**6)
    assert alone.aux_loss.abs() > 0
    torch.testing.assert_close(padded.aux_loss, alone.aux_loss, rtol=1e-5, atol=1e-6)
    assert torch.equal(padded.depth[0, 6:], alone.depth[0])
    # And the gradients reach the same parameters with the same values.
    grads = []
    for out in (alone, padded):
        model.zero_grad()
        (out.logits[:, -row.shape[1] :].square().mean() + out.aux_loss).backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        scale = float(grads[0][name].abs().max())  # float32 rounding of sums of many large terms
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-3, atol=5e-5 * scale, msg=name)


def test_labels_give_the_shifted_cross_entropy_with_minus_100_ignored():
    model = tiny_model("mlp_gate", {"threshold": 0.5, "bias_init": 0.0}, sharpen=1.0).eval()
    ids, mask = left_padded(model.config.vocab_size)
    labels = ids.clone()
    labels[0, -3] = -100
    out = model(ids, attention_mask=mask, labels=labels, execution="dense")
    # By hand: position t predicts labels[t + 1], unless that is -100 or t is padding (a
    # row alone has no prediction for its first token).
    targets = labels[:, 1:].masked_fill(mask[:, :-1] == 0, -100)
    expected = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=-100)
    torch.testing.assert_close(out.loss, expected)
    # Row by row, the padded batch's loss is the rows' own (the same targets, the same logits).
    T = ids.shape[1]
    alone = [
        model(ids[b : b + 1, T - n :], labels=labels[b : b + 1, T - n :], execution="dense")
        for b, n in enumerate(LENGTHS)
    ]
    counts = [int((labels[b, T - n + 1 :] != -100).sum()) for b, n in enumerate(LENGTHS)]
    pooled = sum(a.loss * c for a, c in zip(alone, counts)) / sum(counts)
    torch.testing.assert_close(out.loss, pooled, rtol=1e-5, atol=1e-6)
    plain = model(ids, labels=ids, execution="dense")
    expected = F.cross_entropy(plain.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    torch.testing.assert_close(plain.loss, expected)
    assert plain.aux_loss.shape == () and model(ids).loss is None


def test_an_all_ones_mask_is_the_unpadded_call():
    model = tiny_model("mlp_gate", {"threshold": 0.5, "bias_init": 0.0}).eval()
    ids, _ = left_padded(model.config.vocab_size)
    for execution in executions(model):
        a = model(ids, execution=execution)
        b = model(ids, attention_mask=torch.ones_like(ids), execution=execution)
        assert torch.equal(a.logits, b.logits) and torch.equal(a.depth, b.depth)


def test_transformers_gpt_neox_with_the_same_mask_is_the_reference(tmp_path, randomize, device):
    from transformers import GPTNeoXForCausalLM

    model = randomize(zoo.build("pythia-tiny"), seed=4).eval()
    hf = GPTNeoXForCausalLM.from_pretrained(zoo.to_hf(model, tmp_path / "hf")).to(device).eval()
    model = model.to(device)
    ids, mask = (t.to(device) for t in left_padded(model.config.vocab_size, seed=5))
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # transformers' generate does this
    with torch.no_grad():
        reference = hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits
        out = model(ids, attention_mask=mask)
    real = mask.bool()
    assert reference[real].abs().max() > 1.0
    torch.testing.assert_close(out.logits[real], reference[real], rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    "mask, message",
    [
        (torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]]), "right\npadding|padding_side = 'left'"),
        (torch.tensor([[0, 0, 0, 0], [1, 1, 1, 1]]), "no real token"),
        (torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]]).float(), r"use \.long\(\)"),
        (torch.tensor([[0, 2, 1, 1], [1, 1, 1, 1]]), "only 0"),
        (torch.ones(2, 3, dtype=torch.long), "shape"),
        ("dense", "by keyword"),
    ],
)
def test_malformed_masks_are_refused_with_the_fix(mask, message):
    model = zoo.build("adaponder-pythia-tiny")
    ids = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match=message.split("\n")[-1]):
        model(ids, attention_mask=mask)


def test_malformed_labels_are_refused():
    model = zoo.build("adaponder-pythia-tiny")
    ids = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="shaped like input_ids"):
        model(ids, labels=ids[:, 1:])
    with pytest.raises(ValueError, match="-100"):
        model(ids, labels=ids - 5)
