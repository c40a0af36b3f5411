"""zoo.blocks.linear: the same products as F.linear, on oneDNN only where it is allowed."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from zoo.blocks import linear as linear_module
from zoo.blocks.linear import MIN_ROWS, Linear

needs_onednn = pytest.mark.skipif(not linear_module._ONEDNN, reason="this torch build has no oneDNN linear kernel")


def layer(bias: bool = True) -> Linear:
    torch.manual_seed(0)
    return Linear(64, 96, bias=bias)


def counting_f_linear(monkeypatch) -> list[torch.Size]:
    """Replaces the module's F.linear by one that records the shape of each input."""
    calls: list[torch.Size] = []
    real = F.linear

    def counted(x, *args):
        calls.append(x.shape)
        return real(x, *args)

    monkeypatch.setattr(linear_module.F, "linear", counted)
    return calls


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("rows", [1, MIN_ROWS - 1, MIN_ROWS, 4 * 256])
def test_equals_f_linear(rows, bias):
    lin, x = layer(bias), torch.randn(rows, 64)
    with torch.no_grad():
        torch.testing.assert_close(lin(x), F.linear(x, lin.weight, lin.bias), atol=1e-5, rtol=1e-5)


@needs_onednn
def test_inference_of_many_rows_runs_on_onednn_and_the_rest_on_f_linear(monkeypatch):
    lin = layer()
    calls = counting_f_linear(monkeypatch)
    with torch.no_grad():
        lin(torch.randn(1, MIN_ROWS - 1, 64))  # 63 rows: F.linear
        lin(torch.randn(2, MIN_ROWS // 2, 64))  # 64 rows over two sequences: oneDNN
        lin(torch.randn(MIN_ROWS, 64))  # 64 rows: oneDNN
    lin64 = layer().double()
    with torch.no_grad():
        lin64(torch.randn(MIN_ROWS, 64, dtype=torch.float64))  # float64: F.linear
    assert calls == [torch.Size([1, MIN_ROWS - 1, 64]), torch.Size([MIN_ROWS, 64])]


def test_training_takes_f_linear_and_gets_gradients(monkeypatch):
    lin = layer()
    x = torch.randn(4, MIN_ROWS, 64, requires_grad=True)
    calls = counting_f_linear(monkeypatch)
    lin(x).square().sum().backward()
    assert len(calls) == 1 and lin.weight.grad is not None and x.grad is not None


def test_state_dict_is_that_of_nn_linear():
    lin, plain = layer(), torch.nn.Linear(64, 96)
    plain.load_state_dict(lin.state_dict())
    assert lin.state_dict().keys() == plain.state_dict().keys()
