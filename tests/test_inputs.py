"""Bad input to the forward raises a ValueError that names the value and the limit."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import zoo
from zoo.sampling import sample_next

VOCAB, MAX_T = 512, 256  # the *-tiny presets


@pytest.fixture(scope="module")
def model():
    return zoo.build("ponder-pythia-tiny").eval()


def test_edges_of_the_valid_range_run(model):
    ids = torch.full((1, MAX_T), VOCAB - 1, dtype=torch.long)
    ids[0, 0] = 0
    with torch.no_grad():
        out = model(ids)
    assert out.logits.shape == (1, MAX_T, VOCAB)
    assert model(torch.zeros(2, 3, dtype=torch.int32)).logits.shape == (2, 3, VOCAB)  # any integer dtype


@pytest.mark.parametrize(
    "ids, needles",
    [
        (torch.zeros(8, dtype=torch.long), ["2-D", "(8,)", "input_ids[None]"]),
        (torch.zeros(1, 2, 8, dtype=torch.long), ["2-D", "(1, 2, 8)"]),
        (torch.zeros(1, 8), ["integer", "torch.float32", ".long()"]),
        (torch.zeros(1, 8, dtype=torch.bool), ["integer", "torch.bool"]),
        (torch.tensor([[3, -1, 4]]), ["-1", f"vocab_size={VOCAB}"]),
        (torch.tensor([[3, VOCAB, 4]]), [str(VOCAB), f"vocab_size={VOCAB}"]),
        (torch.tensor([[3, VOCAB + 1000]]), [str(VOCAB + 1000), f"vocab_size={VOCAB}"]),
        (torch.zeros(1, MAX_T + 1, dtype=torch.long), [str(MAX_T + 1), f"max_seq_len={MAX_T}"]),
        (torch.zeros(1, 0, dtype=torch.long), ["no tokens"]),
    ],
    ids=["1-D", "3-D", "float", "bool", "negative", "vocab", "far-over-vocab", "too-long", "empty"],
)
def test_bad_ids_raise_naming_value_and_limit(model, ids, needles):
    with pytest.raises(ValueError) as err:
        model(ids)
    for needle in needles:
        assert needle in str(err.value)


def test_non_tensor_input(model):
    with pytest.raises(ValueError, match="torch.Tensor"):
        model([[1, 2, 3]])


def test_checks_apply_in_every_execution(model):
    bad = torch.tensor([[1, VOCAB]])
    for execution in ("dense", None):
        with pytest.raises(ValueError, match="vocab_size"):
            model(bad, execution=execution)


def test_unknown_execution_and_sparse_without_freezing_cache(model):
    ids = torch.zeros(1, 4, dtype=torch.long)
    with pytest.raises(ValueError, match="'dense', 'sparse'"):
        model(ids, execution="fast")
    with pytest.raises(ValueError, match="cache='kv_reuse'"):
        model(ids, execution="sparse")  # ponder-pythia-tiny uses the recompute cache


# Sampling arguments: conflicts are refused, NumPy integers accepted ---------------------------


PROMPT = torch.tensor([[1, 2, 3, 4]])


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"top_k": 5}, "top_k=5 has no effect with temperature=0"),
        ({"top_p": 0.9}, "top_p=0.9 has no effect with temperature=0"),
        ({"temperature": float("nan")}, "temperature must be a finite number >= 0"),
        ({"temperature": float("inf")}, "temperature must be a finite number >= 0"),
        ({"temperature": True}, "temperature must be"),
        ({"temperature": 1.0, "top_k": 2.0}, "top_k must be a positive integer"),
        ({"temperature": 1.0, "top_p": True}, "top_p must be a number in (0, 1]"),
        ({"eos_token_id": 2.0}, "eos_token_id must be an integer token id or None, got 2.0 (float)"),
        ({"eos_token_id": True}, "eos_token_id must be an integer token id or None, got True (bool)"),
        ({"eos_token_id": VOCAB}, f"eos_token_id {VOCAB} is outside [0, vocab_size={VOCAB})"),
        ({"temperature": 1.0, "seed": 1.5}, "seed must be an integer in [0, 2**64)"),
        ({"temperature": 1.0, "seed": -1}, "seed must be an integer in [0, 2**64)"),
    ],
)
def test_conflicting_or_mistyped_sampling_arguments_are_refused(model, kwargs, needle):
    with pytest.raises(ValueError) as err:
        model.generate(PROMPT, 3, **kwargs)
    assert needle in str(err.value)


def test_numpy_integers_are_taken_as_the_same_python_integers(model):
    numpy_ints = dict(top_k=np.int64(20), seed=np.uint32(7), eos_token_id=np.int32(3))
    a = model.generate(PROMPT, 5, temperature=1.0, **numpy_ints)
    b = model.generate(PROMPT, 5, temperature=1.0, top_k=20, seed=7, eos_token_id=3)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logits, b.logits)


def test_a_tiny_temperature_samples_the_greedy_token(model):
    greedy = model.generate(PROMPT, 6)
    for temperature in (1e-30, 1e-45):
        tiny = model.generate(PROMPT, 6, temperature=temperature, top_p=0.5, seed=0)
        assert torch.equal(tiny.tokens, greedy.tokens)
    huge_logits = torch.tensor([[3e38, -3e38, 1e38]])
    assert sample_next(huge_logits, temperature=1e-20).tolist() == [0]  # no overflow to NaN


def test_sample_next_is_importable_from_decode_and_sampling():
    from zoo.decode import sample_next as from_decode

    assert from_decode is sample_next
