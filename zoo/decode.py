"""Incremental decoding that reproduces the full forward, pass by pass.

Shape legend: B batch, T prompt length, M new tokens, V vocabulary, P passes.

Prefill runs the prompt through the driver (:func:`zoo.recurrence.run_passes`) into the
cache strategy's decode store (``model.cache.store("decode", ...)``); each step then runs
one new token per row through the same loop: pass 0 for every live row, later passes only
for rows whose token is still active. Rows halt independently, and a row that stopped (a
stop token or a stop string) is not computed again. Because every halting decision is
causal, ``gen.logits[:, j]`` equals ``model(gen.tokens).logits[:, T - 1 + j]``, and
``gen.depth`` likewise.

Ragged prompts come left-padded with an ``attention_mask``, as transformers' tokenizers
give them with ``padding_side="left"``: the padding runs no pass, no token attends to it,
and positions count each row's real tokens, so every row generates exactly what it
generates alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from zoo.recurrence import run_passes
from zoo.sampling import check_sampling, check_token_id, sample_next  # sample_next is re-exported here

__all__ = ["GenerationOutput", "generate", "sample_next"]

Streamer = Callable[[Tensor, Tensor], Any]


@dataclass
class GenerationOutput:
    """The result of :meth:`~zoo.model.RecurrentLM.generate`.

    Attributes:
        tokens: (B, T + M) the prompt (as given, padding included) followed by the new
            tokens. After a row stops, its remaining tokens are ``pad_token_id``.
        logits: (B, M, V) the logits each new token was drawn from (zeros after a row
            stopped); ``None`` with ``output_logits=False``.
        depth: (B, M) passes run at the position whose logits drew each new token (0 after
            a row stopped).
        stopped: (B,) bool, the row stopped on a stop token or a stop string (``False``:
            it ran to ``max_new_tokens``).
        lengths: (B,) int64, new tokens each row generated, the one that stopped it
            included: row ``b``'s are ``tokens[b, T : T + lengths[b]]``.
    """

    tokens: Tensor
    logits: Tensor | None
    depth: Tensor
    stopped: Tensor
    lengths: Tensor


@torch.no_grad()
def generate(
    model,
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
    streamer: Streamer | None = None,
    output_logits: bool = True,
) -> GenerationOutput:
    """Generates up to ``max_new_tokens`` tokens after ``input_ids`` (B, T).

    Args:
        model: a :class:`~zoo.model.RecurrentLM` (put in ``eval()`` for the call).
        input_ids: (B, T) prompt ids; ragged prompts left-padded (see ``attention_mask``).
        max_new_tokens: tokens to add; ``T + max_new_tokens <= max_seq_len``.
        temperature: 0 for greedy decoding, else the sampling temperature.
        top_k: sample among the ``top_k`` most likely tokens.
        top_p: nucleus sampling mass.
        eos_token_id: a stop token id, or a list of them: a row that emits one stops (and
            costs nothing afterwards).
        seed: seeds the sampler's own generator, so sampling is reproducible.
        progress: show a progress bar; ``None`` shows one for 64 or more new tokens.
        attention_mask: (B, T) 1 for prompt tokens, 0 for left padding (as
            ``model(ids, attention_mask=...)`` takes it); every row then generates what it
            generates alone.
        stop_strings: a row stops once the text of its new tokens contains one of these
            (the tokens that complete it are kept). Needs ``tokenizer``.
        tokenizer: what turns new tokens into text for ``stop_strings``: an object with a
            ``decode(ids) -> str`` method (a ``tokenizers.Tokenizer``, a transformers
            tokenizer, the library's tokenizers) or such a function.
        pad_token_id: the id written after a row stops; defaults to the (first)
            ``eos_token_id``, and must be given with ``stop_strings`` and no
            ``eos_token_id``.
        streamer: called after every step as ``streamer(tokens, active)``: ``tokens`` (B,)
            the step's new token of each row, ``active`` (B,) bool the rows for which it is
            a new token (``False`` for rows that stopped earlier, whose entry is
            ``pad_token_id``). A row's stream is the tokens of the steps where it is
            active; it ends with the step after which ``gen.lengths`` says it stopped.
        output_logits: keep the (B, M, V) logits; ``False`` leaves ``gen.logits`` ``None``
            and saves that memory.

    Raises:
        ValueError: malformed ids, mask or options; the message names the fix.

    Example:
        >>> import torch, zoo
        >>> model = zoo.build("adaponder-pythia-tiny").eval()
        >>> ids = torch.tensor([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]])
        >>> mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
        >>> steps = []
        >>> gen = model.generate(ids, 4, attention_mask=mask, output_logits=False,
        ...                      streamer=lambda tokens, active: steps.append(tokens.tolist()))
        >>> alone = model.generate(ids[:1, 2:], 4)
        >>> torch.equal(gen.tokens[0, 2:], alone.tokens[0]), gen.logits is None, len(steps)
        (True, True, 4)
    """
    model.check_input(input_ids)
    padding = model.check_attention_mask(input_ids, attention_mask)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    cfg = model.config
    temperature, top_k, top_p, eos, seed = check_sampling(
        temperature, top_k, top_p, eos_token_id, seed, cfg.vocab_size
    )
    stop_ids = () if eos is None else (eos,) if isinstance(eos, int) else eos
    decode, stop_strings = _check_stop_strings(stop_strings, tokenizer)
    if pad_token_id is not None:
        pad_token_id = check_token_id("pad_token_id", pad_token_id, cfg.vocab_size)
    elif stop_ids:
        pad_token_id = stop_ids[0]
    elif stop_strings:
        raise ValueError(
            "stop_strings needs a pad_token_id (the id written after a row stops) when there is "
            "no eos_token_id; pass pad_token_id=..., e.g. the tokenizer's end-of-text id"
        )
    if streamer is not None and not callable(streamer):
        raise ValueError(
            f"streamer must be a callable streamer(tokens, active), got {type(streamer).__name__}"
        )
    if not isinstance(output_logits, bool):
        raise ValueError(f"output_logits must be True or False, got {output_logits!r}")
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
        run = dict(
            sparse=True, compute=model.pass_fn, bucket=model.slot_bucket, last_only=True, padding=padding
        )
        tokens = torch.cat([input_ids, input_ids.new_zeros(B, max_new_tokens)], dim=1)
        logits_out = None
        if output_logits:
            logits_out = model.embed.weight.new_zeros(B, max_new_tokens, cfg.vocab_size)
        depth_out = torch.zeros(B, max_new_tokens, dtype=torch.long, device=device)
        alive = torch.ones(B, dtype=torch.bool, device=device)
        lengths = torch.full((B,), max_new_tokens, dtype=torch.long, device=device)
        can_stop = bool(stop_ids) or bool(stop_strings)
        stop_tensor = torch.tensor(stop_ids, dtype=input_ids.dtype, device=device)

        out = run_passes(model, input_ids, store, **run)
        logits, depth = out.logits[:, -1], out.depth[:, -1]
        show = progress if progress is not None else max_new_tokens >= 64
        for j in tqdm(range(max_new_tokens), desc="generate", unit="tok", disable=not show):
            if logits_out is not None:
                logits_out[:, j] = torch.where(alive[:, None], logits, 0.0)
            depth_out[:, j] = torch.where(alive, depth, 0)
            token = sample_next(logits, temperature, top_k, top_p, generator)
            if can_stop:
                token = torch.where(alive, token, pad_token_id)
            tokens[:, T + j] = token
            if streamer is not None:
                streamer(token.clone(), alive.clone())
            if can_stop:
                stops = alive & torch.isin(token, stop_tensor)
                if stop_strings:
                    stops |= _stop_string_rows(tokens[:, T : T + j + 1], alive & ~stops, decode, stop_strings)
                if bool(stops.any()):
                    lengths = torch.where(stops, j + 1, lengths)
                    alive = alive & ~stops
                    if not bool(alive.any()):
                        tokens[:, T + j + 1 :] = pad_token_id
                        break
            if j + 1 == max_new_tokens:
                break
            out = run_passes(model, token[:, None], store, start=T + j, alive=alive, **run)
            logits, depth = out.logits[:, 0], out.depth[:, 0]
        return GenerationOutput(tokens, logits_out, depth_out, ~alive, lengths)
    finally:
        model.train(was_training)


def _check_stop_strings(
    stop_strings: Sequence[str] | None, tokenizer: Any
) -> tuple[Callable[[list[int]], str] | None, tuple[str, ...]]:
    """(decode function, stop strings) checked; ``(None, ())`` without stop strings."""
    if stop_strings is None:
        if tokenizer is not None:
            raise ValueError(
                "tokenizer is only used to find stop_strings; pass stop_strings=[...] or drop it"
            )
        return None, ()
    if isinstance(stop_strings, str):
        stop_strings = [stop_strings]
    strings = tuple(stop_strings)
    if not strings or not all(isinstance(text, str) and text for text in strings):
        raise ValueError(f"stop_strings must be a non-empty list of non-empty strings, got {stop_strings!r}")
    if tokenizer is None:
        raise ValueError(
            "stop_strings needs a tokenizer= to turn new tokens into text: an object with a "
            "decode(ids) method, or a function ids -> str"
        )
    decode = getattr(tokenizer, "decode", tokenizer)
    if not callable(decode):
        raise ValueError(
            f"tokenizer must have a decode(ids) method or be a function, got {type(tokenizer).__name__}"
        )
    return decode, strings


def _stop_string_rows(
    new: Tensor, rows: Tensor, decode: Callable[[list[int]], str], stop_strings: tuple[str, ...]
) -> Tensor:
    """(B,) bool: the ``rows`` whose new tokens (B, j) decode to a text holding a stop string."""
    hits = torch.zeros_like(rows)
    for b in rows.nonzero().flatten().tolist():
        text = decode(new[b].tolist())
        hits[b] = any(stop in text for stop in stop_strings)
    return hits
