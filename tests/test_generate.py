"""Generation for real batches: ragged left-padded prompts (each row as it generates alone),
stop token ids and stop strings, a streaming callback, and generation without logits."""

from __future__ import annotations

import pytest
import torch

from test_padding import left_padded
from zoo.testing import tiny_model

LENGTHS = (7, 3, 10)
NEW = 6


def ragged(vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    return left_padded(vocab, LENGTHS, seed)


@pytest.mark.parametrize(
    "cache, halting, block",
    [
        ("kv_reuse", "mlp_gate", "neox"),
        ("recompute", "act", "neox"),
        ("kv_share", "fixed_prune", "neox"),
        ("recursion_wise", "early_exit", "neox"),
        ("kv_reuse", "fixed_prune", "llama"),
    ],
)
def test_each_row_of_a_ragged_batch_generates_what_it_generates_alone(
    cache, halting, block, plain_halting_settings, device
):
    model = tiny_model(halting, plain_halting_settings[halting], cache=cache, block=block, sharpen=1.0)
    model = model.to(device).eval()
    ids, mask = (t.to(device) for t in ragged(model.config.vocab_size))
    T = ids.shape[1]
    gen = model.generate(ids, NEW, attention_mask=mask)
    for b, n in enumerate(LENGTHS):
        alone = model.generate(ids[b : b + 1, T - n :], NEW)
        assert torch.equal(gen.tokens[b, T - n :], alone.tokens[0]), b
        torch.testing.assert_close(gen.logits[b], alone.logits[0], rtol=0, atol=1e-5)
        assert torch.equal(gen.depth[b], alone.depth[0])
    assert bool((gen.depth < model.config.passes).any()), "no token halted"
    # Decoding reproduces the padded full forward.
    whole = torch.cat([mask, torch.ones(len(LENGTHS), NEW, dtype=torch.long, device=device)], 1)
    full = model(gen.tokens, attention_mask=whole)
    torch.testing.assert_close(gen.logits, full.logits[:, T - 1 : -1], rtol=0, atol=1e-5)
    assert torch.equal(gen.depth, full.depth[:, T - 1 : -1])


def free_run(model, ids, mask):
    return model.generate(ids, NEW, attention_mask=mask)


def test_stop_token_ids_stop_each_row_and_pad_it():
    model = tiny_model("mlp_gate", {"threshold": 0.5, "bias_init": 0.0}).eval()
    ids, mask = ragged(model.config.vocab_size, seed=1)
    T = ids.shape[1]
    free = free_run(model, ids, mask)
    # Stop ids: row 0's third new token and row 2's first; row 1 runs on unless it meets them.
    stops = [int(free.tokens[0, T + 2]), int(free.tokens[2, T])]
    gen = model.generate(ids, NEW, attention_mask=mask, eos_token_id=stops, pad_token_id=1)
    for b in range(len(LENGTHS)):
        new = free.tokens[b, T:].tolist()
        hit = [j for j, t in enumerate(new) if t in stops]
        length = hit[0] + 1 if hit else NEW
        assert int(gen.lengths[b]) == length and bool(gen.stopped[b]) == bool(hit)
        assert gen.tokens[b, T : T + length].tolist() == new[:length]
        assert bool((gen.tokens[b, T + length :] == 1).all())
        assert bool((gen.depth[b, length:] == 0).all()) and bool((gen.logits[b, length:] == 0).all())
        scale = float(free.logits.abs().max())  # a sharpened head: logits in the tens
        torch.testing.assert_close(gen.logits[b, :length], free.logits[b, :length], rtol=0, atol=1e-5 * scale)
    assert int(gen.lengths[0]) <= 3 and int(gen.lengths[2]) == 1
    # One int works as before: the padding after a stop is that id.
    one = model.generate(ids, NEW, attention_mask=mask, eos_token_id=stops[1])
    assert int(one.lengths[2]) == 1 and bool((one.tokens[2, T + 1 :] == stops[1]).all())


def test_stop_strings_stop_a_row_once_its_text_holds_one():
    model = tiny_model("mlp_gate", {"threshold": 0.5, "bias_init": 0.0}).eval()
    ids, mask = ragged(model.config.vocab_size, seed=2)
    T = ids.shape[1]
    free = free_run(model, ids, mask)

    def decode(tokens: list[int]) -> str:  # two letters per token, so a stop may span tokens
        return "".join(chr(97 + t % 26) + chr(97 + (t // 26) % 26) for t in tokens)

    text = decode(free.tokens[1, T:].tolist())
    stop = text[5:8]  # ends inside row 1's fourth new token, begins in its third
    gen = model.generate(ids, NEW, attention_mask=mask, stop_strings=[stop], tokenizer=decode, pad_token_id=0)
    for b in range(len(LENGTHS)):
        new = free.tokens[b, T:].tolist()
        length = next((j + 1 for j in range(NEW) if stop in decode(new[: j + 1])), NEW)
        assert int(gen.lengths[b]) == length, b
        assert gen.tokens[b, T : T + length].tolist() == new[:length]
        assert bool(gen.stopped[b]) == (stop in decode(new))
    assert int(gen.lengths[1]) <= 4 and bool(gen.stopped[1])

    class Tokenizer:  # an object with decode(), like tokenizers.Tokenizer
        def decode(self, tokens):
            return decode(tokens)

    again = model.generate(
        ids, NEW, attention_mask=mask, stop_strings=[stop], tokenizer=Tokenizer(), pad_token_id=0
    )
    assert torch.equal(again.tokens, gen.tokens)


def test_the_streamer_sees_every_new_token_and_no_logits_are_kept():
    model = tiny_model("mlp_gate", {"threshold": 0.5, "bias_init": 0.0}).eval()
    ids, mask = ragged(model.config.vocab_size, seed=3)
    T = ids.shape[1]
    free = free_run(model, ids, mask)
    stop = int(free.tokens[0, T + 1])
    steps = []
    gen = model.generate(
        ids, NEW, attention_mask=mask, eos_token_id=stop, output_logits=False,
        streamer=lambda tokens, active: steps.append((tokens, active)),
    )
    assert gen.logits is None
    streamed = [[int(t[b]) for t, a in steps if a[b]] for b in range(len(LENGTHS))]
    for b in range(len(LENGTHS)):
        assert streamed[b] == gen.tokens[b, T : T + int(gen.lengths[b])].tolist()
    kept = model.generate(ids, NEW, attention_mask=mask, eos_token_id=stop)
    assert torch.equal(kept.tokens, gen.tokens) and torch.equal(kept.depth, gen.depth)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"stop_strings": ["x"]}, "needs a tokenizer"),
        ({"stop_strings": ["x"], "tokenizer": str}, "needs a pad_token_id"),
        ({"stop_strings": [""], "tokenizer": str}, "non-empty strings"),
        ({"tokenizer": str}, "only used to find stop_strings"),
        ({"eos_token_id": []}, "empty list"),
        ({"eos_token_id": [1, 2.0]}, "integer token id"),
        ({"pad_token_id": -1}, "outside"),
        ({"streamer": 3}, "callable"),
        ({"output_logits": "no"}, "True or False"),
        ({"attention_mask": torch.tensor([[1, 0]])}, "right padding|shape"),
    ],
)
def test_bad_generation_options_are_refused(options, message):
    model = tiny_model("none")
    with pytest.raises(ValueError, match=message):
        model.generate(torch.zeros(1, 2, dtype=torch.long), 2, **options)
