"""Incremental decoding that reproduces the full forward, pass by pass.

Shape legend: B batch, T prompt length, M new tokens, V vocabulary, P passes.

Prefill runs the prompt through the driver (:func:`zoo.recurrence.run_passes`) into the
cache strategy's decode store (``model.cache.store("decode", ...)``); each step then runs
one new token per row through the same loop: pass 0 for every live row, later passes only
for rows whose token is still active. Rows halt independently, and a row that emitted
``eos_token_id`` is not computed again. Because every halting decision is causal,
``gen.logits[:, j]`` equals ``model(gen.tokens).logits[:, T - 1 + j]``, and ``gen.depth``
likewise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from zoo.recurrence import run_passes
from zoo.sampling import check_sampling, sample_next  # sample_next is re-exported here

__all__ = ["GenerationOutput", "generate", "sample_next"]


@dataclass
class GenerationOutput:
    """The result of :meth:`~zoo.model.RecurrentLM.generate`.

    Attributes:
        tokens: (B, T + M) the prompt followed by the new tokens. After a row emits
            ``eos_token_id`` its remaining tokens are ``eos_token_id``.
        logits: (B, M, V) the logits each new token was drawn from (zeros after a row ended).
        depth: (B, M) passes run at the position whose logits drew each new token (0 after
            a row ended).
    """

    tokens: Tensor
    logits: Tensor
    depth: Tensor


@torch.no_grad()
def generate(
    model,
    input_ids: Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | None = None,
    seed: int | None = None,
    progress: bool | None = None,
) -> GenerationOutput:
    """Generates ``max_new_tokens`` tokens after ``input_ids`` (B, T).

    Args:
        model: a :class:`~zoo.model.RecurrentLM` (put in ``eval()`` for the call).
        input_ids: (B, T) prompt ids; every row has the same length.
        max_new_tokens: tokens to add; ``T + max_new_tokens <= max_seq_len``.
        temperature: 0 for greedy decoding, else the sampling temperature.
        top_k: sample among the ``top_k`` most likely tokens.
        top_p: nucleus sampling mass.
        eos_token_id: a row that emits it stops (and costs nothing afterwards).
        seed: seeds the sampler's own generator, so sampling is reproducible.
        progress: show a progress bar; ``None`` shows one for 64 or more new tokens.
    """
    model.check_input(input_ids)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    cfg = model.config
    temperature, top_k, top_p, eos_token_id, seed = check_sampling(
        temperature, top_k, top_p, eos_token_id, seed, cfg.vocab_size
    )
    B, T = input_ids.shape
    if T + max_new_tokens > cfg.max_seq_len:
        raise ValueError(
            f"prompt of {T} tokens + max_new_tokens={max_new_tokens} exceeds max_seq_len={cfg.max_seq_len}; "
            f"shorten the prompt or ask for at most {cfg.max_seq_len - T} new tokens"
        )
    generator = None
    if seed is not None:
        generator = torch.Generator(device=input_ids.device).manual_seed(seed)

    was_training = model.training
    model.eval()
    try:
        device = input_ids.device
        store = model.cache.store("decode", cfg, B, T + max_new_tokens, model.embed.weight)
        run = dict(sparse=True, compute=model.pass_fn, bucket=model.slot_bucket, last_only=True)
        tokens = torch.cat([input_ids, input_ids.new_zeros(B, max_new_tokens)], dim=1)
        logits_out = model.embed.weight.new_zeros(B, max_new_tokens, cfg.vocab_size)
        depth_out = torch.zeros(B, max_new_tokens, dtype=torch.long, device=device)
        alive = torch.ones(B, dtype=torch.bool, device=device)

        out = run_passes(model, input_ids, store, **run)
        logits, depth = out.logits[:, -1], out.depth[:, -1]
        show = progress if progress is not None else max_new_tokens >= 64
        for j in tqdm(range(max_new_tokens), desc="generate", unit="tok", disable=not show):
            logits_out[:, j] = torch.where(alive[:, None], logits, 0.0)
            depth_out[:, j] = torch.where(alive, depth, 0)
            token = sample_next(logits, temperature, top_k, top_p, generator)
            if eos_token_id is not None:
                token = torch.where(alive, token, eos_token_id)
                tokens[:, T + j] = token
                alive = alive & (token != eos_token_id)
                if not bool(alive.any()):
                    tokens[:, T + j + 1 :] = eos_token_id
                    break
            else:
                tokens[:, T + j] = token
            if j + 1 == max_new_tokens:
                break
            out = run_passes(model, token[:, None], store, start=T + j, alive=alive, **run)
            logits, depth = out.logits[:, 0], out.depth[:, 0]
        return GenerationOutput(tokens, logits_out, depth_out)
    finally:
        model.train(was_training)
