"""Activation checkpointing: the same loss and gradients, with fewer tensors kept for backward."""

from __future__ import annotations

import pytest
import torch

from zoo.testing import tiny_model


def loss_and_grads(model, ids, mask=None):
    out = model(ids, attention_mask=mask, labels=ids, execution="dense", step=10**6)
    model.zero_grad()
    (out.loss + out.aux_loss).backward()
    return out, {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def saved_tensors(model, ids) -> int:
    """How many tensors the forward keeps for backward (outside checkpointed regions)."""
    count = 0

    def pack(tensor):
        nonlocal count
        count += 1
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(ids, labels=ids, execution="dense")
    return count


@pytest.mark.parametrize(
    "cache, halting, kwargs",
    [
        ("kv_reuse", "mlp_gate", {"threshold": 0.5, "bias_init": 0.0}),
        ("recompute", "act", {"bias_init": -0.5}),
        ("kv_share", "mlp_gate", {"threshold": 0.5, "bias_init": 0.0}),
        ("recursion_wise", "fixed_prune", {"ratio": 0.4}),
    ],
)
def test_checkpointing_gives_the_same_loss_and_gradients(cache, halting, kwargs):
    model = tiny_model(halting, kwargs, cache=cache).train()
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    for padding in (None, mask):
        model.gradient_checkpointing_disable()
        plain, plain_grads = loss_and_grads(model, ids, padding)
        model.gradient_checkpointing_enable()
        assert model.gradient_checkpointing
        checked, checked_grads = loss_and_grads(model, ids, padding)
        assert bool((plain.depth < model.config.passes).any()), "no token halted"
        torch.testing.assert_close(checked.loss, plain.loss)
        torch.testing.assert_close(checked.aux_loss, plain.aux_loss)
        assert checked_grads.keys() == plain_grads.keys()
        for name, grad in plain_grads.items():
            torch.testing.assert_close(checked_grads[name], grad, msg=name)


def test_checkpointing_keeps_fewer_tensors_and_only_in_training():
    model = tiny_model("mlp_gate", {"threshold": 0.5, "bias_init": 0.0}).train()
    ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    plain = saved_tensors(model, ids)
    model.gradient_checkpointing_enable()
    checked = saved_tensors(model, ids)
    assert checked < plain / 2, (checked, plain)
    model.eval()  # not in training: no checkpointing, every activation is kept
    kept = saved_tensors(model, ids)
    model.gradient_checkpointing_disable()
    assert kept == saved_tensors(model, ids) > checked
