"""Counting the compute a forward actually spends, given each token's depth.

Counts are multiply-accumulates (MACs) of matrix products; ``FLOPs = 2 * MACs``. What
is counted, per pass ``i``::

    layers (each of L):  query projection    d * H * D              per token the pass computes
                         key/value proj.     d * 2 * H_kv * D       per token whose keys and values
                                                                    the pass projects
                         attention           2 * H * D              per query-key pair attended
                         output projection   H * D * d              per token the pass computes
                         MLP                 its linear weights (GELU: 2 d f; SwiGLU: 3 d f)
    head                 V * d               per logits computed (below)
    pondering embedding  V * d               softmax(Z) @ Embed.weight, per token that takes
                                             the update (runs the next pass)
    gates                the policy's linear weights for one pass (mlp_gate: k d^2 + k d;
                                             act: d), per token the pass gates

Which tokens a pass computes, which project keys and values and which keys each query
attends is the cache strategy's to say (:meth:`~zoo.caches.base.CacheStrategy.work`):
under ``kv_reuse`` and ``recompute`` the tokens that run pass ``i`` (``depth > i``) compute
it and project their keys and values, and a query at position ``t`` attends to the
``t + 1`` keys up to it, halted tokens' included; ``kv_share`` projects keys and values at
pass 0 only; ``recursion_wise`` attends only to the running tokens' keys.

The head runs at every pass a token runs when the recurrence or the policy reads the
logits (PonderLM, early exit), else once per token; a policy that mixes the passes'
outputs (ACT) adds one head on the mix. Norms, activations, rotary, softmax, residual adds
and bias adds are elementwise and not counted (the usual convention of counting matrix
products only).

``execution="dense"`` counts what dense execution computes, every token at every pass
(the depths do not matter); ``"sparse"`` counts what sparse execution needs: only the
tokens that run a pass.

Example:
    >>> import zoo, torch
    >>> from zoo import flops
    >>> config = zoo.preset("adaponder-pythia-70m")
    >>> depth = torch.full((1, 2048), 4)
    >>> depth[:, ::10] = 1  # every tenth token halts after its first pass
    >>> round(flops.relative_to_full(config, depth), 3)  # share of 4-pass PonderLM's compute
    0.929
    >>> round(flops.relative_to_single_pass(config, depth, layers_only=True), 2)  # "x times vanilla"
    3.7
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from zoo.build import build_model
from zoo.config import ModelConfig
from zoo.model import EXECUTIONS, RecurrentLM
from zoo.recurrence import Ponder

__all__ = ["MacCount", "count", "relative_to_full", "relative_to_single_pass", "EXECUTIONS"]


@dataclass(frozen=True)
class MacCount:
    """Multiply-accumulates of one forward, by part.

    Attributes:
        qkv: the fused query/key/value projections (the query part alone where a cache
            strategy reuses keys and values).
        attention: attention scores and the weighted sum of values.
        attn_out: the attention output projections.
        mlp: the MLPs.
        head: the output head.
        ponder_embed: the pondering embeddings ``softmax(Z) @ Embed.weight``.
        gates: the halting policy's gates (mlp_gate MLPs, ACT units).
    """

    qkv: int = 0
    attention: int = 0
    attn_out: int = 0
    mlp: int = 0
    head: int = 0
    ponder_embed: int = 0
    gates: int = 0

    @property
    def layers(self) -> int:
        """The block stack alone (QKV, attention, output projection, MLP)."""
        return self.qkv + self.attention + self.attn_out + self.mlp

    @property
    def total(self) -> int:
        """All multiply-accumulates."""
        return sum(dataclasses.astuple(self))

    @property
    def flops(self) -> int:
        """``2 * total`` floating-point operations."""
        return 2 * self.total

    def __add__(self, other: MacCount) -> MacCount:
        return MacCount(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other))))


def count(
    model: RecurrentLM | ModelConfig,
    depth: Tensor | int,
    seq_len: int | None = None,
    execution: str | None = None,
) -> MacCount:
    """The multiply-accumulates of a forward whose tokens ran ``depth`` passes.

    Args:
        model: a model or a config (built on the meta device, which costs no memory).
        depth: (B, T) or (T,) passes per token, ``1..passes`` (e.g. ``out.depth``); or one
            int for every token, with ``seq_len``.
        seq_len: sequence length when ``depth`` is an int (one sequence).
        execution: ``"sparse"`` or ``"dense"``; ``None`` is sparse when the model's cache
            freezes halted tokens (``kv_reuse``, ``kv_share``, ``recursion_wise``), dense
            otherwise, like ``model(ids)`` in ``eval()`` mode.

    Raises:
        ValueError: depths outside ``1..passes``, an int depth without ``seq_len``, an
            unknown execution, or sparse execution with a cache that does not freeze halted
            tokens.
    """
    model = _as_model(model)
    config = model.config
    P = config.passes
    depth = _depth_tensor(depth, seq_len, P)
    # None: as model(ids) in eval() mode, whatever mode the model is in
    execution = model.resolve_execution(execution, training=False)
    if execution == "dense":
        depth = torch.full_like(depth, P)

    work = [model.cache.work(depth, i) for i in range(P)]
    runs = [w.queries for w in work]  # tokens that run pass i
    tokens = depth.numel()

    layer = model.layers[0]
    query = config.dim * config.num_heads * config.head_dim  # the query rows of the fused projection
    key_value = layer.attn.qkv.weight.numel() - query
    attn_out = layer.attn.proj.weight.numel()
    mlp = _linear_macs(layer.mlp)
    pair = 2 * config.num_heads * config.head_dim  # one query-key pair: score + value
    vocab_macs = model.head.weight.numel()
    gate = _linear_macs(model.halting) // max(P - 1, 1)  # one gate (MLP or unit) per pondering pass

    logits_each_pass = model.recurrence.uses_logits or model.halting.uses_logits
    pondering = sum(runs[:-1])  # token-passes that feed a decision (i < P - 1)
    if model.halting.mixes_outputs:
        head_calls = (pondering if logits_each_pass else 0) + tokens
    else:
        head_calls = sum(runs) if logits_each_pass else tokens
    L = config.num_layers
    return MacCount(
        qkv=L * (query * sum(runs) + key_value * sum(w.kv_tokens for w in work)),
        attention=L * pair * sum(w.keys for w in work),
        attn_out=L * attn_out * sum(runs),
        mlp=L * mlp * sum(runs),
        head=vocab_macs * head_calls,
        ponder_embed=model.embed.weight.numel() * sum(runs[1:])
        if isinstance(model.recurrence, Ponder)
        else 0,
        gates=gate * pondering,
    )


def relative_to_full(
    model: RecurrentLM | ModelConfig, depth: Tensor, execution: str | None = None, layers_only: bool = False
) -> float:
    """Compute of a forward with ``depth`` as a share of the full-depth model without halting.

    The reference is the same backbone and recurrence with every token running all
    ``passes`` and no halting policy (no gates): for an AdaPonder model, 4-pass PonderLM.
    0.9 reads "90% of the compute of PonderLM".

    Args:
        model: a model or a config.
        depth: (B, T) or (T,) passes per token.
        execution: as in :func:`count`.
        layers_only: compare the block stacks' compute alone (:attr:`MacCount.layers`),
            leaving out the head, pondering embeddings and gates.
    """
    model = _as_model(model)
    full = _as_model(model.config.replace(halting="none", halting_kwargs={}))
    depth = _depth_tensor(depth, None, model.config.passes)
    return _ratio(
        count(model, depth, execution=execution), count(full, depth, execution="dense"), layers_only
    )


def relative_to_single_pass(
    model: RecurrentLM | ModelConfig, depth: Tensor, execution: str | None = None, layers_only: bool = False
) -> float:
    """Compute of a forward with ``depth`` in units of the plain one-pass model's.

    The reference is the same block stack run once (``recurrence="none"``, ``passes=1``,
    no halting). Papers quote "x times vanilla FLOPs" (AdaPonderLM: 3.8x against
    PonderLM's 4x), which is ``layers_only=True``: there 4-pass PonderLM is exactly 4.
    Counting everything, the head at every pass and the pondering embeddings make
    PonderLM cost more than 4x, markedly so at small sizes where the vocabulary's matrix
    products rival the layers' (about 5.5x for Pythia-70M at 2048 tokens).

    Args:
        model: a model or a config.
        depth: (B, T) or (T,) passes per token.
        execution: as in :func:`count`.
        layers_only: compare the block stacks' compute alone (:attr:`MacCount.layers`).
    """
    model = _as_model(model)
    single = _as_model(
        model.config.replace(
            recurrence="none", passes=1, halting="none", halting_kwargs={}, cache="recompute"
        )
    )
    depth = _depth_tensor(depth, None, model.config.passes)
    return _ratio(
        count(model, depth, execution=execution), count(single, torch.ones_like(depth)), layers_only
    )


def _ratio(used: MacCount, reference: MacCount, layers_only: bool) -> float:
    if layers_only:
        return used.layers / reference.layers
    return used.total / reference.total


def _as_model(model: RecurrentLM | ModelConfig) -> RecurrentLM:
    if isinstance(model, RecurrentLM):
        return model
    if isinstance(model, ModelConfig):
        return build_model(model, device="meta").eval()  # count what inference runs
    raise ValueError(f"expected a RecurrentLM or a ModelConfig, got {type(model).__name__}")


def _depth_tensor(depth: Tensor | int, seq_len: int | None, passes: int) -> Tensor:
    if isinstance(depth, int) and not isinstance(depth, bool):
        if seq_len is None:
            raise ValueError("an int depth applies to every token of one sequence: pass seq_len as well")
        depth = torch.full((1, seq_len), depth)
    elif not isinstance(depth, Tensor):
        raise ValueError(
            f"depth must be a (B, T) or (T,) integer tensor or an int, got {type(depth).__name__}"
        )
    if depth.dim() not in (1, 2) or depth.numel() == 0:
        raise ValueError(f"depth must have shape (B, T) or (T,) with T >= 1, got {tuple(depth.shape)}")
    if depth.dtype.is_floating_point or depth.dtype == torch.bool:
        raise ValueError(f"depth must hold integers (passes per token), got dtype {depth.dtype}")
    depth = depth.detach().to("cpu", torch.int64)
    low, high = int(depth.min()), int(depth.max())
    if low < 1 or high > passes:
        raise ValueError(f"depth values must lie in 1..passes={passes}, got values in {low}..{high}")
    return depth


def _linear_macs(module: nn.Module) -> int:
    """MACs per token of every linear layer in ``module`` applied once."""
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))
