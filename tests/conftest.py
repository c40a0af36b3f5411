"""Shared test helpers: tiny zoo models, settings under which policies halt, small
random reference models written to disk, and the devices a test runs on.

transformers is imported inside the fixtures, so test files that do not use them do not
pay for the import.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

# Tests run tiny models, for which one intra-op thread is fastest; `make test` runs two
# pytest workers side by side instead. Set at import so module-scoped fixtures get it too.
torch.set_num_threads(1)


def _devices() -> list[str]:
    """The devices of the ``device`` fixture: the CPU, and CUDA where a GPU is visible.

    ``ZOO_TEST_DEVICES=cuda`` (a comma-separated list) runs the device tests there alone.
    """
    available = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    chosen = os.environ.get("ZOO_TEST_DEVICES")
    if not chosen:
        return available
    devices = [d.strip() for d in chosen.split(",") if d.strip()]
    unknown = [d for d in devices if d not in available]
    if unknown:
        raise pytest.UsageError(
            f"ZOO_TEST_DEVICES names {', '.join(unknown)}, not available here (available: "
            f"{', '.join(available)}); unset it or name available devices"
        )
    return devices


DEVICES = _devices()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test that takes ``device`` runs once per device in :data:`DEVICES`."""
    if "device" in metafunc.fixturenames:
        metafunc.parametrize("device", DEVICES)


@pytest.fixture(autouse=True)
def _one_thread():
    """Puts the thread count back to one after any test (or recipe it runs) changed it."""
    yield
    torch.set_num_threads(1)


def randomize_(module: torch.nn.Module, seed: int, std: float = 0.2) -> torch.nn.Module:
    """Fills every parameter with random values, norms included, so wiring bugs show.

    A default-initialised model has LayerNorm weights 1 and biases 0, which hides a
    swapped or missing norm; here norm weights are ``1 + N(0, std)`` and everything else
    ``N(0, std)``.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32) * std
            is_norm_weight = "norm" in name and name.endswith("weight")
            param.copy_(noise + 1.0 if is_norm_weight else noise)
    return module


@pytest.fixture
def randomize() -> Callable[..., torch.nn.Module]:
    """The :func:`randomize_` helper, for tests that randomise a model of their own."""
    return randomize_


@pytest.fixture(scope="session")
def tiny_model() -> Callable[..., Any]:
    """Factory: :func:`zoo.testing.tiny_model` (``ponder-pythia-tiny`` with the given parts,
    its head sharpened so that confidence-based policies halt some tokens). Session-scoped:
    it holds no state, so hypothesis tests may use it too."""
    from zoo.testing import tiny_model

    return tiny_model


@pytest.fixture
def halting_settings() -> dict[str, dict[str, Any]]:
    """Policy name -> keyword arguments under which it halts a good share of a tiny model's
    tokens (:data:`zoo.testing.HALTING_EXAMPLES`; a copy, so tests may change it)."""
    from zoo.testing import HALTING_EXAMPLES

    return {name: dict(kwargs) for name, kwargs in HALTING_EXAMPLES.items()}


@pytest.fixture
def plain_halting_settings() -> dict[str, dict[str, Any]]:
    """Policy name -> keyword arguments under which it halts some tokens and not others of a
    tiny model as initialised (``tiny_model(..., sharpen=1.0)``), whose logits stay near 1:
    tests that compare logits to float32 rounding in absolute terms use these."""
    return {
        "none": {},
        "mlp_gate": {"threshold": 0.5, "bias_init": 0.0},
        "fixed_prune": {"ratio": 0.4},
        "act": {"bias_init": 0.0},
        "early_exit": {"measure": "margin", "threshold": 0.001},
    }


@pytest.fixture
def make_hf_neox() -> Callable[..., Any]:
    """Factory: a random ``transformers.GPTNeoXForCausalLM`` in eval mode.

    Call it as ``make_hf_neox(seed=0, **GPTNeoXConfig_kwargs)``; defaults are a 2-layer,
    width-64, 4-head model with 200 tokens and 64 positions.
    """
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    def make(seed: int = 0, **config: Any) -> GPTNeoXForCausalLM:
        fields = dict(
            vocab_size=200,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=256,
            max_position_embeddings=64,
        )
        fields.update(config)
        torch.manual_seed(seed)
        model = GPTNeoXForCausalLM(GPTNeoXConfig(**fields))
        return randomize_(model, seed).eval()

    return make


@pytest.fixture
def hf_neox_folder(tmp_path: Path, make_hf_neox: Callable[..., Any]) -> Callable[..., tuple[Any, Path]]:
    """Factory: writes a random GPT-NeoX with ``save_pretrained`` (safetensors) under ``tmp_path``.

    ``hf_neox_folder(name="hf", seed=0, save_kwargs=None, **config)`` returns
    ``(model, folder)``.
    """

    def write(name: str = "hf", seed: int = 0, save_kwargs: dict | None = None, **config: Any):
        model = make_hf_neox(seed=seed, **config)
        folder = tmp_path / name
        model.save_pretrained(folder, safe_serialization=True, **(save_kwargs or {}))
        return model, folder

    return write


@pytest.fixture(scope="session")
def modules_cache(tmp_path_factory):
    """transformers copies remote code into its modules cache (under HF_HOME, read at import)
    and imports it as the package ``transformers_modules`` found on sys.path: here a
    temporary cache, first on sys.path, with sys.path and sys.modules as they were
    afterwards.

    First, because another cache on sys.path (the user's, or one appended earlier in the
    process) holding a ``transformers_modules`` package would be found instead, and the
    remote code's relative imports would fail with ``No module named
    'transformers_modules.out'``. Once per process (so here and not in a test module, where
    pytest sets a fixture up again when a worker comes back to the module)."""
    from transformers import dynamic_module_utils

    def forget_remote_modules():
        for name in [name for name in sys.modules if name.split(".")[0] == "transformers_modules"]:
            del sys.modules[name]

    cache = str(tmp_path_factory.mktemp("hf-modules"))
    forget_remote_modules()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(dynamic_module_utils, "HF_MODULES_CACHE", cache)
        patch.setattr(sys, "path", [cache, *sys.path])
        yield
    forget_remote_modules()
