"""``kl``: halt a token once its next-token distribution stops changing between passes.

Huginn's zero-shot exit (Geiping et al., arXiv 2502.05171; seal-rg/recurrent-pretraining)::

    D^i = KL(p^{i-1} || p^i) = sum_v p^{i-1}_v (log p^{i-1}_v - log p^i_v)     p^i = softmax(Z^i)
    m^1 = 1,   m^{i+1} = m^i * [D^i >= threshold]   for i >= 1

Pass 0 has nothing to compare with, so every token runs pass 1.
"""

import torch

from zoo.halting.base import HaltingPolicy, HaltStep
from zoo.registry import HALTING


@HALTING.register("kl")
class KLHalting(HaltingPolicy):
    """Halts tokens whose next-token distribution moved less than ``threshold`` (nats) in a pass."""

    uses_logits = True  # the head must run at every pass, whatever the recurrence

    def __init__(self, config, threshold: float = 5e-4):
        super().__init__(config)
        if not threshold >= 0:
            raise ValueError(f"kl: threshold must be a KL value >= 0, got {threshold!r}")
        self.threshold = float(threshold)
        self.vocab_size = config.vocab_size

    def init_state(self, mask):
        """Per token, the log-probabilities of its previous pass: (B, T, V)."""
        return {"log_probs": torch.zeros(*mask.shape, self.vocab_size, device=mask.device)}

    def step(self, index, hidden, logits, mask, state, ctx):
        log_probs = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
        previous = state["log_probs"]
        kl = (previous.exp() * (previous - log_probs)).sum(-1)  # (B, T)
        keep = kl >= self.threshold if index > 0 else torch.ones_like(mask)
        return HaltStep(mask=keep, state={"log_probs": log_probs})
