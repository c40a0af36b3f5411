"""The model: embedding -> recurrence(block stack, halting policy, cache strategy) -> head.

The model never reads a registry: :func:`zoo.build.build_model` constructs the parts and
hands them in. The pass loop lives in :mod:`zoo.recurrence`.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from zoo.blocks.head import VocabHead
from zoo.caches.base import CacheStrategy
from zoo.config import ModelConfig
from zoo.halting.base import HaltingPolicy
from zoo.recurrence import ModelOutput, Recurrence, run_dense, run_sparse, stack_pass

__all__ = ["RecurrentLM", "ModelOutput", "EXECUTIONS"]

EXECUTIONS = ("dense", "sparse")


class RecurrentLM(nn.Module):
    """A language model whose block stack may run several passes per token.

    Build it with :func:`zoo.build` or :func:`zoo.from_hf` rather than by hand.

    Attributes:
        dense_fn: the dense forward, ``dense_fn(model, input_ids, step)``:
            :func:`~zoo.recurrence.run_dense`, or its compiled twin after :func:`zoo.compile`.
        pass_fn: one pass of the block stack over a selection of tokens (sparse execution,
            decoding): :func:`~zoo.recurrence.stack_pass`, or its compiled twin.
        slot_bucket: the slot rounding of selections (a static layout for compiled passes,
            see :func:`zoo.layout.select`); ``None`` when eager.

    Args:
        config: the frozen config the parts were built from.
        layers: the block stack.
        final_norm: norm before the head.
        recurrence: how a pass feeds the next.
        halting: the halting policy (holds gate parameters if it has any).
        cache: the cache strategy (no parameters).
    """

    def __init__(
        self,
        config: ModelConfig,
        layers: nn.ModuleList,
        final_norm: nn.Module,
        rotary: nn.Module,
        recurrence: Recurrence,
        halting: HaltingPolicy,
        cache: CacheStrategy,
    ) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.layers = layers
        self.final_norm = final_norm
        self.head = VocabHead(config.dim, config.vocab_size)
        if config.tied_embeddings:
            self.head.weight = self.embed.weight
        self.rotary = rotary
        self.recurrence = recurrence
        self.halting = halting
        self.cache = cache
        # What zoo.compile swaps for compiled twins (and zoo.uncompile swaps back).
        self.dense_fn: Callable[..., ModelOutput] = run_dense
        self.pass_fn: Callable[..., tuple[Tensor, Tensor]] = stack_pass
        self.slot_bucket: int | None = None

    # Forward ------------------------------------------------------------------------------

    def forward(self, input_ids: Tensor, execution: str | None = None, step: int | Tensor | None = None) -> ModelOutput:
        """Runs the model on ``input_ids`` (B, T).

        Args:
            input_ids: LongTensor (B, T) with ids in ``[0, vocab_size)``, ``T <= max_seq_len``.
            execution: ``"dense"`` (every token runs every pass, masks by ``where``; used for
                training) or ``"sparse"`` (only active tokens run; needs a cache strategy
                that freezes halted tokens, such as ``kv_reuse``). ``None`` picks sparse in
                ``eval()`` mode with such a strategy, dense otherwise.
            step: training step for the halting policy's schedules (an int or 0-d tensor);
                ``None`` puts schedules at their final value.

        Raises:
            ValueError: malformed ids, or an execution the cache strategy does not allow.
        """
        self.check_input(input_ids)
        execution = self.resolve_execution(execution)
        if step is not None and not isinstance(step, Tensor):
            step = torch.tensor(step, device=input_ids.device)
        if execution == "dense":
            return self.dense_fn(self, input_ids, step)
        return run_sparse(self, input_ids, step)

    def generate(
        self,
        input_ids: Tensor,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | None = None,
        seed: int | None = None,
        progress: bool | None = None,
    ):
        """Incremental decoding that reproduces the full forward; see :func:`zoo.decode.generate`.

        Returns:
            a :class:`~zoo.decode.GenerationOutput` with ``tokens`` (B, T + M), ``logits``
            (B, M, V) and ``depth`` (B, M).
        """
        from zoo.decode import generate

        return generate(self, input_ids, max_new_tokens, temperature, top_k, top_p, eos_token_id, seed, progress)

    def resolve_execution(self, execution: str | None, training: bool | None = None) -> str:
        """The execution mode a call runs in (see :meth:`forward`).

        Args:
            execution: ``"dense"``, ``"sparse"`` or ``None`` (the default for the mode).
            training: the mode to resolve ``None`` for; ``None`` is the model's own.

        Raises:
            ValueError: an unknown execution, or sparse execution with a cache strategy
                that does not freeze halted tokens.
        """
        training = self.training if training is None else training
        if execution is None:
            return "sparse" if (not training and self.cache.freezes) else "dense"
        if execution not in EXECUTIONS:
            raise ValueError(f"execution must be one of {EXECUTIONS} or None, got {execution!r}")
        if execution == "sparse" and not self.cache.freezes:
            raise ValueError(
                f"execution='sparse' skips halted tokens, which needs a cache strategy that freezes "
                f"them; cache={self.config.cache!r} re-runs every token each pass. Use "
                f"cache='kv_reuse' or execution='dense'"
            )
        return execution

    def check_input(self, input_ids: Tensor) -> None:
        """Raises ``ValueError`` naming the problem if ``input_ids`` is not a valid batch."""
        if not isinstance(input_ids, Tensor):
            raise ValueError(f"input_ids must be a torch.Tensor of token ids, got {type(input_ids).__name__}")
        if input_ids.dim() != 2:
            raise ValueError(
                f"input_ids must be 2-D (batch, time), got shape {tuple(input_ids.shape)}; "
                f"add a batch dimension with input_ids[None]"
            )
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids must be an integer tensor, got dtype {input_ids.dtype}; use .long()")
        T = input_ids.shape[1]
        if T == 0:
            raise ValueError("input_ids has no tokens (time dimension 0)")
        if T > self.config.max_seq_len:
            raise ValueError(
                f"input_ids has {T} tokens, more than max_seq_len={self.config.max_seq_len}; "
                f"truncate the input or build the model with a larger max_seq_len"
            )
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= self.config.vocab_size:
            bad = low if low < 0 else high
            raise ValueError(
                f"input_ids contains token id {bad}, outside [0, vocab_size={self.config.vocab_size})"
            )

    # Initialisation -----------------------------------------------------------------------

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """PonderLM initialisation: truncated normal, std ``sqrt(2 / (5 d))`` for linears and
        the embedding, output projections further divided by ``sqrt(2 * layers * passes)``;
        biases zero, norm weights one; then the halting policy's own parameters."""
        std = self.config.std
        out_std = std / (2 * self.config.num_layers * self.config.passes) ** 0.5
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                is_out = name.endswith("attn.proj") or name.endswith("mlp.fc_out")
                if name.startswith("halting"):
                    continue
                s = out_std if is_out else std
                nn.init.trunc_normal_(module.weight, std=s, a=-2 * s, b=2 * s)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.trunc_normal_(module.weight, std=std, a=-2 * std, b=2 * std)
            elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                module.reset_parameters()
        self.halting.reset_parameters()

    def num_parameters(self, include_embeddings: bool = True) -> int:
        """Parameter count (shared tensors once); without the embedding and head if asked."""
        seen, total = set(), 0
        for name, p in self.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            if not include_embeddings and (name.startswith("embed.") or name.startswith("head.")):
                continue
            total += p.numel()
        return total
