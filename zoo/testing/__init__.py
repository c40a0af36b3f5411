"""``zoo.testing``: hold any registered halting policy or cache strategy to the library's properties.

::

    from zoo.testing import check_policy, check_cache
    check_policy("kl", {"threshold": 4e-4})   # AssertionError naming the property that fails
    check_cache("kv_share")

Plus hypothesis strategies (tiny configs, token batches, monotone masks, settings under
which the built-in policies halt), a tiny-model factory and :func:`run_policy` (a policy's
decisions on hand-made tensors, with the driver's bookkeeping) for tests of your own, and
:func:`compare_executions` (how closely sparse execution and decoding follow the dense
forward, in any dtype and on any device, against :data:`TOLERANCES`). It needs
hypothesis, which the ``testing`` extra installs: ``pip install "ponder-zoo[testing]"``.
"""

try:
    import hypothesis  # noqa: F401
except ImportError as err:  # pragma: no cover - the extra is installed wherever the tests run
    raise ImportError(
        "zoo.testing needs hypothesis; install the testing extra: pip install 'ponder-zoo[testing]'"
    ) from err

from zoo.testing.checks import PROPERTIES, CheckReport, check_cache, check_model, check_policy
from zoo.testing.drive import PolicyRun, run_policy
from zoo.testing.precision import TOLERANCES, Agreement, Tolerance, agreement, compare_executions
from zoo.testing.strategies import (
    BLOCK_OVERRIDES,
    HALTING_EXAMPLES,
    VOCAB,
    configs,
    halting_kwargs,
    monotone_masks,
    tiny_model,
    token_batches,
)

__all__ = [
    "check_policy",
    "check_cache",
    "check_model",
    "CheckReport",
    "PROPERTIES",
    "run_policy",
    "PolicyRun",
    "compare_executions",
    "agreement",
    "Agreement",
    "Tolerance",
    "TOLERANCES",
    "tiny_model",
    "halting_kwargs",
    "configs",
    "token_batches",
    "monotone_masks",
    "HALTING_EXAMPLES",
    "BLOCK_OVERRIDES",
    "VOCAB",
]
