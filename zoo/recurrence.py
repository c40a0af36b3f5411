"""Recurrences and the one driver that owns the pass loop.

Shape legend: B batch, T time, d width, V vocabulary, P passes, L layers.

The loop, for every combination of recurrence, halting policy and cache strategy::

    E^0 = c * Embed(x)                           m^0 = 1
    pass i:   H^i = Stack(E^i)  (keys/values of halted tokens as the cache strategy says)
              Z^i = Head(FinalNorm(H^i))
              s^i, m^{i+1} = policy(i, FinalNorm(H^i), Z^i, m^i)
              E^{i+1} = E^i + m^{i+1} * s^i * delta^i

where ``delta`` is the recurrence's update: PonderLM's pondering embedding
``softmax(Z^i) @ (c * Embed.weight)``, or LoopTransformer's step to the stack output
``H^i - E^i`` (so that with ``s = 1`` the next input is ``H^i``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor, nn

from zoo.blocks.head import expected_embedding
from zoo.config import ModelConfig
from zoo.halting.base import HaltingPolicy, PassContext
from zoo.registry import RECURRENCES

__all__ = ["Recurrence", "NoRecurrence", "Ponder", "Loop", "PassTrace", "run_dense", "run_stack"]


class Recurrence(nn.Module):
    """How a pass's result becomes the next pass's input.

    Class attributes:
        uses_logits: :meth:`delta` needs the pass's logits (the head runs every pass).

    Args:
        config: the model config (``embed_scale``, ``initial_embed_mult``).
    """

    uses_logits: ClassVar[bool] = False

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_scale = float(config.embed_scale)
        self.initial_mult = float(config.initial_embed_mult)

    def initial(self, embeds: Tensor) -> Tensor:
        """``E^0`` from the raw embeddings (B, T, d): ``c * initial_embed_mult * Embed(x)``."""
        return embeds * (self.embed_scale * self.initial_mult)

    def delta(self, x: Tensor, hidden: Tensor, logits: Tensor | None, embed_weight: Tensor) -> Tensor:
        """The update direction added to ``x`` (B, T, d), scaled by ``m * s`` by the driver.

        Args:
            x: this pass's input ``E^i``.
            hidden: the stack's output ``H^i`` (before the final norm).
            logits: ``Z^i`` (B, T, V) when :attr:`uses_logits`.
            embed_weight: the input embedding matrix (V, d).
        """
        raise NotImplementedError(f"{type(self).__name__} runs a single pass and has no update")


@RECURRENCES.register("none")
class NoRecurrence(Recurrence):
    """One pass: the plain model (``passes`` must be 1)."""


@RECURRENCES.register("ponder")
class Ponder(Recurrence):
    """PonderLM (arXiv 2505.20674): the pondering embedding refines each token's input.

    ``delta = softmax(Z^i) @ (c * Embed.weight)``, the expected scaled input embedding under
    the token's own next-token distribution (computed in fp32 softmax).
    """

    uses_logits = True

    def delta(self, x: Tensor, hidden: Tensor, logits: Tensor | None, embed_weight: Tensor) -> Tensor:
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(embed_weight.dtype)  # (B, T, V)
        return expected_embedding(probs, embed_weight) * self.embed_scale  # (B, T, d)


@RECURRENCES.register("loop")
class Loop(Recurrence):
    """LoopTransformer (the PonderLM-2 baseline): the stack output is the next pass's input.

    ``delta = H^i - E^i``, so an open token's next input is ``H^i`` and a halted token's
    input stays frozen. The final norm matters only for the output: intermediate passes are
    normalised only when a halting policy reads them.
    """

    def initial(self, embeds: Tensor) -> Tensor:
        return embeds * self.embed_scale

    def delta(self, x: Tensor, hidden: Tensor, logits: Tensor | None, embed_weight: Tensor) -> Tensor:
        return hidden - x


@dataclass
class PassTrace:
    """What the pass loop produced.

    Attributes:
        logits: (B, T, V) output logits.
        hidden: (B, T, d) final-norm hidden state the logits were computed from.
        masks: (P, B, T) bool, ``m^0 .. m^{P-1}`` (token ran pass i).
        gates: (P - 1, B, T) gate values ``s^i`` (ones for policies without a gate).
        aux_loss: scalar, the policy's auxiliary losses summed.
    """

    logits: Tensor
    hidden: Tensor
    masks: Tensor
    gates: Tensor
    aux_loss: Tensor

    @property
    def depth(self) -> Tensor:
        """(B, T) passes each token ran, ``1..P``."""
        return self.masks.sum(0)


def run_stack(layers: nn.ModuleList, x: Tensor, rope: tuple[Tensor, Tensor], views: list) -> tuple[Tensor, list]:
    """Runs every layer once; returns the output and each layer's attended (k, v)."""
    kvs = []
    for layer, view in zip(layers, views):
        x, kv = layer(x, rope, view)
        kvs.append(kv)
    return x, kvs


def run_dense(model: nn.Module, input_ids: Tensor, step: Tensor | None) -> PassTrace:
    """Dense execution: every token runs every pass; halting acts through ``where`` masks.

    Static shapes and no host synchronisation, so it compiles with ``fullgraph=True``.
    ``model`` is a :class:`~zoo.model.RecurrentLM` (its parts are read, never mutated).
    """
    B, T = input_ids.shape
    P = model.config.passes
    policy: HaltingPolicy = model.halting
    recurrence: Recurrence = model.recurrence
    positions = torch.arange(T, device=input_ids.device)
    ctx = PassContext(positions=positions.expand(B, T), input_ids=input_ids, step=step, passes=P)
    rope = model.rotary(positions)

    x = recurrence.initial(model.embed(input_ids))  # E^0, (B, T, d)
    mask = torch.ones(B, T, dtype=torch.bool, device=input_ids.device)  # m^0
    state = policy.init_state(mask)
    masks, gates = [mask], []
    aux = x.new_zeros(())
    kv_prev, hidden_prev = None, None
    mixed = None
    for i in range(P):
        last = i == P - 1
        views = model.cache.dense_views(i, kv_prev, mask) if kv_prev is not None else [None] * len(model.layers)
        h, kv_prev = run_stack(model.layers, x, rope, views)  # (B, T, d)
        hidden = model.cache.merge_hidden(model.final_norm(h), hidden_prev, mask)
        hidden_prev = hidden
        need_logits = not last and (recurrence.uses_logits or policy.uses_logits)
        logits = model.head(hidden) if need_logits else None
        if last:
            break
        decision = policy.step(i, hidden, logits, mask, state, ctx)
        state = decision.state if decision.state is not None else state
        aux = aux + decision.aux_loss
        if policy.mixes_outputs:
            mixed = _accumulate(mixed, decision.weight, hidden)
        delta = recurrence.delta(x, h, logits, model.embed.weight)
        x = x + (decision.mask.to(x.dtype) * decision.gate)[..., None] * delta  # E^{i+1}
        mask = decision.mask
        masks.append(mask)
        gates.append(decision.gate)

    gate_stack = torch.stack(gates) if gates else x.new_zeros(0, B, T)
    mask_stack = torch.stack(masks)
    final_weight, final_aux = policy.finish(gate_stack, mask_stack, state, ctx)
    aux = aux + final_aux
    if policy.mixes_outputs:
        hidden = _accumulate(mixed, final_weight, hidden)
    return PassTrace(model.head(hidden), hidden, mask_stack, gate_stack, aux)


def _accumulate(total: Tensor | None, weight: Tensor, hidden: Tensor) -> Tensor:
    term = weight[..., None].to(hidden.dtype) * hidden
    return term if total is None else total + term
