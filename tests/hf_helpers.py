"""Helpers of the Hugging Face interop tests: token ids and the logits of both libraries."""

from __future__ import annotations

import torch


def ids_for(vocab: int, T: int = 24, B: int = 2, seed: int = 1) -> torch.Tensor:
    """(B, T) random token ids below ``vocab``, the same for a given seed."""
    return torch.randint(0, vocab, (B, T), generator=torch.Generator().manual_seed(seed))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


@torch.no_grad()
def hf_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """A transformers model's logits."""
    return model(input_ids=ids).logits


@torch.no_grad()
def zoo_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """A zoo model's logits, dense, in eval mode."""
    return model.eval()(ids, execution="dense").logits
