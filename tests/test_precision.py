"""Dense, sparse and incremental execution agree within the dtype's tolerance
(:data:`zoo.testing.precision.TOLERANCES`), on every device the tests run on."""

from __future__ import annotations

import pytest
import torch

from zoo.testing import tiny_model
from zoo.testing.precision import TOLERANCES, Agreement, agreement, compare_executions

FREEZING = ["kv_reuse", "kv_share", "recursion_wise"]
POLICIES = ["none", "mlp_gate", "fixed_prune", "act", "early_exit"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("block", ["neox", "llama"])
@pytest.mark.parametrize("cache", FREEZING)
def test_sparse_and_decoding_agree_with_dense_within_the_dtypes_tolerance(
    cache, block, dtype, device, plain_halting_settings
):
    tolerance = TOLERANCES[dtype]
    for policy in POLICIES:
        model = tiny_model(policy, plain_halting_settings[policy], cache=cache, block=block, sharpen=1.0)
        model = model.to(device, dtype)
        ids = torch.randint(0, 512, (3, 40), generator=torch.Generator().manual_seed(1)).to(device)
        for execution, seen in compare_executions(model, ids).items():
            assert seen.within(tolerance), (policy, execution, seen, tolerance)


def test_agreement_leaves_out_tokens_of_another_depth_and_scales_by_the_largest_logit():
    reference = torch.tensor([[[4.0, -2.0], [1.0, 1.0], [0.5, 0.0]]])  # (1, 3, 2), largest |logit| 4
    depth = torch.tensor([[2, 3, 1]])
    logits = reference.clone()
    logits[0, 1] += 1.0  # a token of another depth: left out of max_diff
    logits[0, 2, 0] += 0.02
    other = depth.clone()
    other[0, 1] = 2
    seen = agreement(logits, other, reference, depth)
    assert seen.same_depth == pytest.approx(2 / 3)
    assert seen.max_diff == pytest.approx(0.02 / 4)
    assert not seen.within(TOLERANCES[torch.bfloat16])  # a third of the tokens took another depth
    assert Agreement(1.0, 0.0).within(TOLERANCES[torch.float32])


def test_other_weights_are_far_outside_every_tolerance():
    """The comparison can fail: the same tokens through a model of other weights are caught."""
    ids = torch.randint(0, 512, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a, b = (tiny_model("none", sharpen=1.0, seed=seed)(ids, execution="dense") for seed in (0, 1))
    seen = agreement(b.logits, b.depth, a.logits, a.depth)
    assert seen.max_diff > 10 * TOLERANCES[torch.bfloat16].max_diff, seen


def test_shapes_and_prompt_are_checked():
    with pytest.raises(ValueError, match="shapes differ"):
        agreement(torch.zeros(1, 2, 3), torch.zeros(1, 2), torch.zeros(1, 3, 3), torch.zeros(1, 3))
    with pytest.raises(ValueError, match="prompt must lie in 1..7"):
        compare_executions(tiny_model("none"), torch.zeros(1, 8, dtype=torch.long), prompt=8)
