"""The model: embedding -> recurrence(block stack, halting policy, cache strategy) -> head.

The model never reads a registry: :func:`zoo.build.build_model` constructs the parts and
hands them in. The pass loop lives in :mod:`zoo.recurrence`.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.blocks.head import VocabHead
from zoo.caches.base import CacheStrategy
from zoo.config import ModelConfig
from zoo.halting.base import IGNORE, HaltingPolicy
from zoo.recurrence import ModelOutput, Recurrence, run_dense, run_sparse, stack_pass

__all__ = ["RecurrentLM", "ModelOutput", "EXECUTIONS", "causal_lm_loss"]

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
        gradient_checkpointing: dense training recomputes each layer in backward instead
            of keeping its activations (see :meth:`gradient_checkpointing_enable`).

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
        self.gradient_checkpointing = False

    # Forward ------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
        labels: Tensor | None = None,
        execution: str | None = None,
        step: int | Tensor | None = None,
    ) -> ModelOutput:
        """Runs the model on ``input_ids`` (B, T), as transformers' causal LMs are called.

        Args:
            input_ids: LongTensor (B, T) with ids in ``[0, vocab_size)``, ``T <= max_seq_len``.
            attention_mask: (B, T) of 1 (real token) and 0 (padding), bool or integer, with
                the padding on the left (``tokenizer.padding_side = "left"``). Each row then
                gets exactly what it gets alone: positions count its real tokens only
                (transformers' ``cumsum - 1``), no real token attends to padding, and
                padding tokens run no pass (depth 0, logits zeros), so halting decisions
                and the auxiliary loss are those of the real tokens. ``None`` (or all ones):
                no padding.
            labels: (B, T) target ids, usually ``input_ids``; the loss at position ``t``
                is the cross-entropy of ``logits[:, t]`` against ``labels[:, t + 1]``,
                averaged over the targets that are not -100 and not predicted from a
                padding token (a row alone has no prediction for its first token), as
                transformers' causal-LM loss computes it.
            execution: ``"dense"`` (every token runs every pass, masks by ``where``; used for
                training) or ``"sparse"`` (only active tokens run; needs a cache strategy
                that freezes halted tokens, such as ``kv_reuse``). ``None`` picks sparse in
                ``eval()`` mode with such a strategy, dense otherwise.
            step: training step for the halting policy's schedules (an int or 0-d tensor);
                ``None`` puts schedules at their final value.

        Returns:
            a :class:`~zoo.recurrence.ModelOutput`; ``loss`` is set with ``labels`` (the
            halting policy's auxiliary loss stays in ``aux_loss``: train on
            ``out.loss + out.aux_loss``).

        Raises:
            ValueError: malformed ids, mask or labels (right padding included), or an
                execution the cache strategy does not allow.

        Example:
            >>> import torch, zoo
            >>> model = zoo.build("adaponder-pythia-tiny").eval()
            >>> ids = torch.randint(0, 512, (2, 6))
            >>> mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
            >>> out = model(ids, attention_mask=mask, labels=ids)
            >>> out.depth[0, :2].tolist(), out.loss.shape
            ([0, 0], torch.Size([]))
            >>> alone = model(ids[:1, 2:])
            >>> torch.allclose(out.logits[0, 2:], alone.logits[0], atol=1e-5)
            True
        """
        self.check_input(input_ids)
        padding = self.check_attention_mask(input_ids, attention_mask)
        if labels is not None:
            self.check_labels(input_ids, labels)
        execution = self.resolve_execution(execution)
        if step is not None and not isinstance(step, Tensor):
            step = torch.tensor(step, device=input_ids.device)
        if execution == "dense":
            # Without padding the call is exactly the unpadded one (the compiled graph too).
            if padding is None:
                out = self.dense_fn(self, input_ids, step)
            else:
                out = self.dense_fn(self, input_ids, step, padding)
        else:
            out = run_sparse(self, input_ids, step, padding)
        if labels is not None:
            out.loss = causal_lm_loss(out.logits, labels, padding)
        return out

    def generate(
        self,
        input_ids: Tensor,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        seed: int | None = None,
        progress: bool | None = None,
        *,
        attention_mask: Tensor | None = None,
        stop_strings: Sequence[str] | None = None,
        tokenizer: Any = None,
        pad_token_id: int | None = None,
        streamer: Callable[[Tensor, Tensor], Any] | None = None,
        output_logits: bool = True,
    ):
        """Incremental decoding that reproduces the full forward; see :func:`zoo.decode.generate`.

        Returns:
            a :class:`~zoo.decode.GenerationOutput` with ``tokens`` (B, T + M), ``logits``
            (B, M, V) (``None`` with ``output_logits=False``), ``depth`` (B, M), and
            ``stopped`` and ``lengths`` (B,).
        """
        from zoo.decode import generate

        return generate(
            self,
            input_ids,
            max_new_tokens,
            temperature,
            top_k,
            top_p,
            eos_token_id,
            seed,
            progress,
            attention_mask=attention_mask,
            stop_strings=stop_strings,
            tokenizer=tokenizer,
            pad_token_id=pad_token_id,
            streamer=streamer,
            output_logits=output_logits,
        )

    # Activation checkpointing ----------------------------------------------------------------

    def gradient_checkpointing_enable(self) -> None:
        """Recomputes each layer in backward instead of keeping its activations (transformers' name).

        Applies to dense execution in training with gradients enabled (what training runs):
        each layer of each pass keeps only its input, and ``torch.utils.checkpoint``
        (non-reentrant) runs it again in backward. Losses and gradients are unchanged; the
        memory of the passes' activations (``passes`` times a one-pass model's) falls to
        the layer inputs, for about one more forward of compute.

        Example:
            >>> import zoo
            >>> model = zoo.build("adaponder-pythia-tiny")
            >>> model.gradient_checkpointing_enable()
            >>> model.gradient_checkpointing
            True
        """
        self.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        """Keeps every activation for backward again (the default)."""
        self.gradient_checkpointing = False

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

    def check_attention_mask(self, input_ids: Tensor, attention_mask: Tensor | None) -> Tensor | None:
        """Checks a left-padding ``attention_mask`` for ``input_ids``; returns the padding.

        Returns:
            (B, T) bool, True at padding tokens; ``None`` when there is none (no mask, or
            all ones: the call is then exactly the unpadded one).

        Raises:
            ValueError: not a (B, T) tensor of 0 and 1, a row with no real token, or right
                padding (a 0 after a 1); the message names the fix.
        """
        if attention_mask is None:
            return None
        if not isinstance(attention_mask, Tensor):
            raise ValueError(
                f"attention_mask must be a torch.Tensor of 0 and 1, got {type(attention_mask).__name__}; "
                f"pass execution= and step= by keyword"
            )
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)}, "
                f"input_ids {tuple(input_ids.shape)}; "
                f"give one 0/1 entry per token"
            )
        if attention_mask.dtype.is_floating_point or attention_mask.dtype.is_complex:
            raise ValueError(
                f"attention_mask must be bool or integer, got dtype {attention_mask.dtype}; use .long()"
            )
        binary = (attention_mask == 0) | (attention_mask == 1)
        if attention_mask.dtype != torch.bool and not bool(binary.all()):
            raise ValueError("attention_mask must hold only 0 (padding) and 1 (real token)")
        real = attention_mask.bool()
        if bool(real.all()):
            return None
        empty = ~real.any(1)
        if bool(empty.any()):
            raise ValueError(
                f"attention_mask row {int(empty.nonzero()[0])} has no real token; drop that row"
            )
        right = (real[:, :-1] & ~real[:, 1:]).any(1)  # a 1 followed by a 0
        if bool(right.any()):
            raise ValueError(
                f"attention_mask row {int(right.nonzero()[0])} has padding after a real token (right "
                f"padding); pad on the left, e.g. tokenizer.padding_side = 'left'"
            )
        return ~real

    def check_labels(self, input_ids: Tensor, labels: Tensor) -> None:
        """Raises ``ValueError`` unless ``labels`` is a (B, T) integer tensor of ids or -100."""
        if not isinstance(labels, Tensor) or labels.shape != input_ids.shape:
            shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
            raise ValueError(
                f"labels must be a tensor shaped like input_ids {tuple(input_ids.shape)}, got {shape}; "
                f"pass labels=input_ids (the shift is done inside)"
            )
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            raise ValueError(f"labels must be an integer tensor, got dtype {labels.dtype}; use .long()")
        bad = ((labels < 0) & (labels != IGNORE)) | (labels >= self.config.vocab_size)
        if bool(bad.any()):
            raise ValueError(
                f"labels contains {int(labels[bad][0])}, neither a token id in [0, vocab_size="
                f"{self.config.vocab_size}) nor -100 (ignored)"
            )

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


def causal_lm_loss(logits: Tensor, labels: Tensor, padding: Tensor | None = None) -> Tensor:
    """Mean next-token cross-entropy (float32): ``logits[:, t]`` against ``labels[:, t + 1]``.

    Targets equal to -100 are ignored (transformers' causal-LM loss), and so are targets
    predicted from a padding token (``padding`` (B, T) bool): a padded row's loss is the
    row's own.

    Example:
        >>> logits = torch.zeros(1, 3, 4)
        >>> round(float(causal_lm_loss(logits, torch.tensor([[1, 2, -100]]))), 4)  # log(4)
        1.3863
    """
    targets = labels[:, 1:]
    if padding is not None:
        targets = targets.masked_fill(padding[:, :-1], IGNORE)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE)
