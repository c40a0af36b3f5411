"""``kl``: halt a token once its next-token distribution stops changing between passes.

Huginn's zero-shot exit (Geiping et al., arXiv 2502.05171; seal-rg/recurrent-pretraining)::

    D^i = KL(p^{i-1} || p^i) = sum_v p^{i-1}_v (log p^{i-1}_v - log p^i_v)     p^i = softmax(Z^i)
    m^1 = 1,   m^{i+1} = m^i * [D^i >= threshold]   for i >= 1

Pass 0 has nothing to compare with, so every token runs pass 1.
"""

import torch
from torch import Tensor

from zoo.config import ModelConfig
from zoo.halting.base import HaltingPolicy, HaltStep, PassContext
from zoo.registry import HALTING


@HALTING.register("kl")
class KLHalting(HaltingPolicy):
    """Halts tokens whose next-token distribution moved less than ``threshold`` (nats) in a pass.

    Args:
        config: the model config (``passes``, ``vocab_size``).
        threshold: the KL below which a token halts (Huginn uses 5e-4).
    """

    uses_logits = True  # the head must run at every pass, whatever the recurrence

    def __init__(self, config: ModelConfig, threshold: float = 5e-4) -> None:
        super().__init__(config)
        if not threshold >= 0:
            raise ValueError(f"kl: threshold must be a KL value >= 0, got {threshold!r}")
        self.threshold = float(threshold)
        self.vocab_size = config.vocab_size

    def init_state(self, mask: Tensor) -> dict[str, Tensor]:
        """Per token, the log-probabilities of its previous pass: (B, T, V) in fp32."""
        return {"log_probs": torch.zeros(*mask.shape, self.vocab_size, device=mask.device)}

    def step(
        self, index: int, hidden: Tensor, logits: Tensor | None, mask: Tensor,
        state: dict[str, Tensor], ctx: PassContext,
    ) -> HaltStep:
        """Keeps the tokens whose distribution moved by at least ``threshold`` in this pass."""
        log_probs = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
        if index == 0:
            keep = mask  # no previous pass to compare with
        else:
            previous = state["log_probs"]
            kl = (previous.exp() * (previous - log_probs)).sum(-1)  # (B, T)
            keep = mask & (kl >= self.threshold)
        # Tokens that did not run this pass keep their stored distribution.
        log_probs = torch.where(mask[..., None], log_probs, state["log_probs"])
        gate = torch.ones_like(mask, dtype=hidden.dtype)
        return HaltStep(gate=gate, mask=keep, aux_loss=hidden.new_zeros(()), state={"log_probs": log_probs})
