"""Bad input to the forward raises a ValueError that names the value and the limit."""

from __future__ import annotations

import pytest
import torch

import zoo

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
