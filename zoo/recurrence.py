"""Recurrences and the one driver that owns the pass loop.

Shape legend: B batch, T (or n) time, d width, V vocabulary, P passes, L layers; B', N
the rows and slots of a selection of tokens.

The loop, for every combination of recurrence, halting policy and cache strategy, and for
every execution (dense, sparse, decoding)::

    E^0 = c * Embed(x)                           m^0 = 1
    pass i:   H^i = Stack(E^i)  (keys/values as the cache strategy keeps them)
              Z^i = Head(FinalNorm(H^i))
              s^i, keep = policy(i, FinalNorm(H^i), Z^i, m^i)
              m^{i+1} = m^i & keep
              E^{i+1} = E^i + m^{i+1} * s^i * delta^i

where ``delta`` is the recurrence's update: PonderLM's pondering embedding
``softmax(Z^i) @ (c * Embed.weight)``, or LoopTransformer's step to the stack output
``H^i - E^i`` (so that with ``s = 1`` the next input is ``H^i``).

:func:`run_passes` is that loop. It runs each pass over a layout of the tokens
(:mod:`zoo.layout`): the identity, where halting acts through ``where`` (dense execution,
training, ``zoo.compile``), or a gathered selection of the tokens that run the pass
(sparse execution, prefill, decode steps). Either way it alone makes the masks monotone,
keeps the state of tokens that did not run, and fills what a policy leaves out.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, ClassVar

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from zoo.blocks.head import expected_embedding
from zoo.caches.base import KVStore, KVView, PaddedView, padding_columns
from zoo.config import ModelConfig
from zoo.halting.base import HaltingPolicy, PassContext, next_token_targets
from zoo.layout import Grid, Layout, select
from zoo.registry import RECURRENCES

__all__ = [
    "Recurrence",
    "NoRecurrence",
    "Ponder",
    "Loop",
    "ModelOutput",
    "Decision",
    "run_passes",
    "step_policy",
    "finish_policy",
    "run_dense",
    "run_sparse",
    "stack_pass",
    "checkpointed_stack_pass",
]


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
class ModelOutput:
    """The result of ``model(input_ids)`` (and of every run of the pass loop).

    Attributes:
        logits: (B, T, V) next-token logits: each token's from its last active pass (with a
            freezing cache strategy), the last pass's (``recompute``), or the policy's mix
            (ACT).
        depth: (B, T) int64, passes each token ran, ``1..passes`` (0 for rows a decode step
            did not compute).
        aux_loss: scalar, the halting policy's auxiliary loss (0 when it adds none).
        masks: (P, B, T) bool, ``masks[i]`` is True where the token ran pass ``i``.
        gates: (P - 1, B, T) the gate values ``s^i`` (1 for policies without a gate, and
            for tokens that did not run the pass).
        loss: with ``labels``, the mean shifted next-token cross-entropy (the halting
            policy's auxiliary loss stays in :attr:`aux_loss`); ``None`` otherwise.

    Padding tokens (a left-padded batch's ``attention_mask`` zeros) run no pass: their
    depth is 0, their logits are zeros, their masks False and their gates 1.
    """

    logits: Tensor
    depth: Tensor
    aux_loss: Tensor
    masks: Tensor
    gates: Tensor
    loss: Tensor | None = None


def stack_pass(
    model: nn.Module, x: Tensor, rope: tuple[Tensor, Tensor], views: list[KVView | None]
) -> tuple[Tensor, Tensor]:
    """One pass of the block stack over a layout's tokens: (stack output ``H``, ``FinalNorm(H)``).

    The function :func:`zoo.compile` compiles for sparse execution and decoding.
    """
    for layer, view in zip(model.layers, views):
        x, _ = layer(x, rope, view)
    return x, model.final_norm(x)


def checkpointed_stack_pass(
    model: nn.Module, x: Tensor, rope: tuple[Tensor, Tensor], views: list[KVView | None]
) -> tuple[Tensor, Tensor]:
    """:func:`stack_pass` with activation checkpointing: each layer keeps only its input and
    is run again in backward (``torch.utils.checkpoint``, non-reentrant).

    Dense execution uses it in training when ``model.gradient_checkpointing`` is on; the
    dense views read the keys of earlier passes when the pass starts, so a layer run again
    computes what it computed the first time.
    """
    for layer, view in zip(model.layers, views):
        x, _ = checkpoint(layer, x, rope, view, use_reentrant=False)
    return x, model.final_norm(x)


def run_passes(
    model: nn.Module,
    input_ids: Tensor,
    store: KVStore,
    *,
    start: int = 0,
    step: Tensor | None = None,
    sparse: bool = False,
    alive: Tensor | None = None,
    compute: Callable[..., tuple[Tensor, Tensor]] = stack_pass,
    bucket: int | None = None,
    last_only: bool = False,
    padding: Tensor | None = None,
) -> ModelOutput:
    """Runs every pass over a chunk of tokens at positions ``[start, start + n)``.

    Tokens before the chunk must already be in ``store`` (prefill, earlier decode steps).

    Args:
        model: a :class:`~zoo.model.RecurrentLM` (its parts are read, never changed).
        input_ids: (B, n) token ids.
        store: the keys and values, from ``model.cache.store(...)``.
        start: position (and buffer column) of the chunk's first token.
        step: training step for the policy's schedules (``None`` in inference).
        sparse: compute only the tokens that run each pass, gathered into a
            :class:`~zoo.layout.Selection` (with a cache strategy that does not freeze
            halted tokens, every live token runs every pass); ``False``: the identity
            layout, every token at every pass, halting by ``where``.
        alive: (B,) bool rows to compute at all (decoding skips rows that finished);
            needs ``sparse``.
        compute: the pass function (:func:`stack_pass` or a compiled twin).
        bucket: slot-count rounding for compiled passes (see :func:`zoo.layout.select`).
        last_only: return logits for the chunk's last position only, (B, 1, V), as
            generation needs.
        padding: (B, S) bool, True at the columns of left padding (``S`` covers the
            columns of the padded prompt; later columns are not padding). Padding tokens
            run no pass, no real token attends to them (every store's views are wrapped in
            a :class:`~zoo.caches.base.PaddedView`), and a token's position is its column
            minus its row's padding. ``None``: no padding, positions are the columns.

    Returns:
        the chunk's :class:`ModelOutput`.
    """
    B, n = input_ids.shape
    P = model.config.passes
    policy, recurrence, cache = model.halting, model.recurrence, model.cache
    device = input_ids.device
    positions = torch.arange(start, start + n, device=device).expand(B, n)  # (B, n)
    chunk_padding = None
    if padding is not None:  # left padding: a real token's position counts real tokens only
        chunk_padding = padding_columns(padding, start, start + n)  # (B, n)
        positions = (positions - padding.sum(1, keepdim=True)).clamp(min=0)
    context_ids = None if sparse else input_ids  # ids aligned with the logits exist for the whole chunk only
    targets = next_token_targets(input_ids)  # per token, so they follow the layout

    x = recurrence.initial(model.embed(input_ids))  # E^0, (B, n, d)
    live = torch.ones(B, n, dtype=torch.bool, device=device)
    if alive is not None:
        live = live & alive[:, None]
    if chunk_padding is not None:
        live = live & ~chunk_padding
    mask = live  # m^0
    # Cloned: a selection commits into the state in place.
    state = {key: value.clone() for key, value in policy.init_state(mask).items()}
    delta = partial(_delta, recurrence, model.embed.weight)
    # With a freezing cache a token's output logits are those of the last pass it ran. A
    # selection writes them when the token stops, from the logits that pass computed for the
    # policy or the pondering update: the head never runs again for a halted token. The
    # identity layout (and any run without per-pass logits, or with ACT's mix) runs the
    # head once at the end.
    per_pass_logits = recurrence.uses_logits or policy.uses_logits
    keep_logits = sparse and per_pass_logits and not policy.mixes_outputs
    first = n - 1 if last_only else 0  # chunk index of the output's column 0
    hidden = mixed = logits = None
    masks, gates = [mask], []
    aux = x.new_zeros(())

    for i in range(P):
        runs = mask if cache.freezes else live
        part = select(runs, start, bucket) if sparse else Grid(start, n)
        if part is None:  # no token runs this pass or any later one
            for later in range(i, P):
                store.skip(later, start, start + n)
            break
        active = part.active(mask)  # m^i on the layout
        # The tokens that ran the pass, None when they are exactly the computed ones.
        ran = None if cache.freezes and not part.computes_all else active
        pos = part.gather(positions)
        x_i = part.gather(x)
        views = store.views(i, part, active)
        if padding is not None:
            views = _padded(views, store, part, padding, chunk_padding)
        h_i, hidden_i = compute(model, x_i, model.rotary(pos), views)
        # A freezing cache keeps a halted token's state of its last pass; recompute takes the new one.
        hidden = part.commit(hidden, hidden_i, ran if cache.freezes else None)
        if i == P - 1:
            if keep_logits:  # the last pass's head runs for the wanted tokens alone
                wanted = part.valid & (part.index >= first)
                logits = part.write_logits(logits, hidden_i, wanted, n - first, first, model.head)
            break
        logits_i = model.head(hidden_i) if per_pass_logits else None
        ctx = PassContext(pos, context_ids, step, P, part.gather(targets))
        decision = step_policy(policy, i, hidden_i, logits_i, active, state, ctx, part, ran, x.dtype)
        goes_on = decision.mask
        if decision.aux_loss is not None:
            aux = aux + decision.aux_loss
        if policy.mixes_outputs:
            term = decision.weight[..., None].to(hidden_i.dtype) * hidden_i
            mixed = part.commit(mixed, term if mixed is None else part.gather(mixed) + term)
        if keep_logits and cache.freezes:
            stops = active & ~goes_on & (part.index >= first)
            logits = part.write_logits(logits, logits_i, stops, n - first, first)
        gate = decision.gate
        # E^{i+1} = E^i + m^{i+1} s^i delta^i
        scale = goes_on.to(x.dtype) * gate
        step_i = part.direction(delta, x_i, h_i, logits_i, goes_on)
        x = part.commit(x, x_i + scale[..., None] * step_i)
        gates.append(part.commit(torch.ones_like(live, dtype=x.dtype), gate))
        mask = part.commit(mask.clone(), goes_on)
        masks.append(mask)

    while len(masks) < P:  # passes nobody ran (every token halted earlier)
        masks.append(torch.zeros_like(live))
    while len(gates) < P - 1:
        gates.append(torch.ones_like(live, dtype=x.dtype))
    mask_stack = torch.stack(masks)  # (P, B, n)
    gate_stack = torch.stack(gates) if gates else x.new_zeros(0, B, n)
    final_weight, final_aux = finish_policy(policy, gate_stack, mask_stack, state, PassContext(positions, context_ids, step, P, targets))
    if final_aux is not None:
        aux = aux + final_aux
    if hidden is None:  # no row ran at all
        hidden = x.new_zeros(B, n, x.shape[-1])
    if policy.mixes_outputs:
        hidden = (0 if mixed is None else mixed) + final_weight[..., None].to(hidden.dtype) * hidden
    if not keep_logits:
        logits = model.head(hidden[:, first:])
    elif logits is None:  # no row ran at all
        logits = x.new_zeros(B, n - first, model.config.vocab_size)
    if chunk_padding is not None:
        logits = logits.masked_fill(chunk_padding[:, first:, None], 0.0)
    return ModelOutput(logits, mask_stack.sum(0), aux, mask_stack, gate_stack)


@dataclass
class Decision:
    """A policy's step with the driver's bookkeeping applied (see :func:`step_policy`).

    Attributes:
        mask: ``m^{i+1}``: the policy's mask ANDed with the tokens that ran the pass.
        gate: ``s^i``, 1 for tokens that did not run the pass (and for policies without a gate).
        weight: the pass's output weight, 0 for tokens that did not run it; ``None`` unless
            the policy returned one.
        aux_loss: the policy's auxiliary loss, ``None`` for zero.
    """

    mask: Tensor
    gate: Tensor
    weight: Tensor | None
    aux_loss: Tensor | None


def step_policy(
    policy: HaltingPolicy,
    index: int,
    hidden: Tensor,
    logits: Tensor | None,
    active: Tensor,
    state: dict[str, Tensor],
    ctx: PassContext,
    part: Layout,
    ran: Tensor | None,
    dtype: torch.dtype,
) -> Decision:
    """Calls ``policy.step`` on a pass's tokens and applies the driver's bookkeeping.

    The next mask is the policy's ANDed with ``active`` (monotone masks whatever the
    policy returns); the state entries the policy returns are committed into ``state``
    (in place, the dict) only for the tokens that ran; tokens that did not run get gate 1
    and output weight 0; a missing gate is ones.

    Args:
        policy: the halting policy.
        index: the pass just run.
        hidden: (B', N, d) final-norm hidden states of the pass's tokens.
        logits: (B', N, V) their logits, or ``None``.
        active: (B', N) ``m^index`` on the layout.
        state: the policy's per-token state on the chunk's (B, n) grid; updated in place.
        ctx: the pass's context.
        part: the layout of the pass's tokens.
        ran: the tokens whose state is committed (``None``: every token of the layout).
        dtype: the gate's dtype (the model's).
    """
    decision = policy.step(index, hidden, logits, active, _gather_state(part, state), ctx)
    if decision.state is not None:
        for key, value in decision.state.items():
            if key not in state:
                raise ValueError(
                    f"halting policy {type(policy).__name__} returned state {key!r}, which its "
                    f"init_state does not create ({sorted(state)}); create every state entry there"
                )
            state[key] = part.commit(state[key], value, ran)
    if decision.gate is None:
        gate = torch.ones_like(active, dtype=dtype)
    else:
        gate = torch.where(active, decision.gate.to(dtype), torch.ones_like(decision.gate, dtype=dtype))
    weight = decision.weight
    if weight is not None:
        weight = torch.where(active, weight, torch.zeros_like(weight))
    return Decision(active & decision.mask, gate, weight, decision.aux_loss)


def finish_policy(
    policy: HaltingPolicy, gates: Tensor, masks: Tensor, state: dict[str, Tensor], ctx: PassContext
) -> tuple[Tensor | None, Tensor | None]:
    """``policy.finish`` with the last pass's output weight zeroed for tokens that did not run it."""
    weight, aux = policy.finish(gates, masks, state, ctx)
    if weight is not None:
        weight = torch.where(masks[-1], weight, torch.zeros_like(weight))
    return weight, aux


def run_dense(
    model: nn.Module, input_ids: Tensor, step: Tensor | None = None, padding: Tensor | None = None
) -> ModelOutput:
    """Dense execution of ``input_ids`` (B, T): every token runs every pass, halting by ``where``.

    Static shapes and no host synchronisation, so it compiles with ``fullgraph=True``
    (the function :func:`zoo.compile` compiles). ``model`` is a :class:`~zoo.model.RecurrentLM`;
    ``padding`` (B, T) bool marks left padding (see :func:`run_passes`). In training with
    ``model.gradient_checkpointing`` on, the layers are checkpointed
    (:func:`checkpointed_stack_pass`).
    """
    B, T = input_ids.shape
    store = model.cache.store("dense", model.config, B, T, model.embed.weight)
    compute = stack_pass
    if model.gradient_checkpointing and model.training and torch.is_grad_enabled():
        compute = checkpointed_stack_pass
    return run_passes(model, input_ids, store, step=step, compute=compute, padding=padding)


def run_sparse(
    model: nn.Module, input_ids: Tensor, step: Tensor | None = None, padding: Tensor | None = None
) -> ModelOutput:
    """Sparse execution of ``input_ids`` (B, T): each pass computes only the tokens that run it."""
    B, T = input_ids.shape
    store = model.cache.store("sparse", model.config, B, T, model.embed.weight)
    return run_passes(
        model,
        input_ids,
        store,
        step=step,
        sparse=True,
        compute=model.pass_fn,
        bucket=model.slot_bucket,
        padding=padding,
    )


def _delta(recurrence: Recurrence, embed_weight: Tensor, x: Tensor, h: Tensor, logits: Tensor | None) -> Tensor:
    return recurrence.delta(x, h, logits, embed_weight)


def _padded(
    views: list[KVView | None], store: KVStore, part: Layout, padding: Tensor, chunk_padding: Tensor
) -> list[KVView | None]:
    """The pass's views wrapped so that no real token attends to a padding token."""
    keys = store.key_padding(part, padding)
    if keys is None:  # the store's keys are never padding
        return views
    queries = part.gather(chunk_padding)  # (B', N)
    return [PaddedView(view, keys, queries) for view in views]


def _gather_state(part, state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {key: part.gather(value) for key, value in state.items()}
