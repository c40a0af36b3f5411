"""``mlp_gate``: AdaPonderLM's per-pass MLP gates with a monotonic halting mask."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from zoo.config import ModelConfig
from zoo.halting.base import HaltingPolicy, HaltStep, PassContext
from zoo.registry import HALTING

__all__ = ["MLPGate", "bottom_k_mean"]


@HALTING.register("mlp_gate")
class MLPGate(HaltingPolicy):
    """AdaPonderLM gates (Song et al., arXiv 2603.01914): one MLP gate per pondering pass.

    After pondering pass ``i < P - 1``, with ``H^i`` the pass's final-norm hidden state::

        s^i     = sigmoid(MLP_i(H^i))           MLP_i: Linear(d, k d) -> GELU -> Linear(k d, 1)
        m^{i+1} = m^i & (s^i >= threshold)      monotone: a halted token never resumes
        E^{i+1} = E^i + m^{i+1} * s^i * e^i     (applied by the driver)

    The ``P - 1`` gates are separate modules (a single shared gate collapses to halting
    everything or nothing). The auxiliary loss pools, over every token and pondering pass
    where the token ran (``masks[i]`` for ``gates[i]``), the gate values and averages the
    smallest ``k`` of them::

        aux = lam * mean(smallest k of the pooled s),   k = floor(k_s * n_active)

    ``k`` rounds down, so a pool smaller than ``1 / k_s`` adds nothing (``aux = 0`` when
    ``k = 0``). Pushing the smallest gates down teaches the gates to close on the tokens
    that need the fewest passes. ``k_s`` follows a schedule in the training step: 0 for
    ``step < warmup_steps``, then linear from 0 to ``k_max`` over ``ramp_steps``, then
    ``k_max``; outside training (``step=None``) it is ``k_max``. The step arrives as a
    0-d tensor, so a compiled model does not recompile as it changes.

    The gates returned for tokens that did not run pass ``i`` are 1 (no gate value, as for
    policies without gates), which is also what sparse execution records for them.

    Args:
        config: the model config (``dim``, ``passes``, initialisation ``std``).
        threshold: ``tau``; a token halts once its gate falls below it (paper: 1e-4).
        hidden_mult: gate MLP hidden width as a multiple of ``dim`` (paper: 4).
        bias_init: initial bias of each gate's output layer. The default 4.0 makes every
            gate start at about ``sigmoid(4) = 0.98``: open, so at initialisation the model
            behaves like PonderLM (every token runs every pass with a nearly unscaled
            pondering update), and the auxiliary loss, not chance, decides what closes.
        k_max: final fraction of the pooled gates in the bottom-k loss (paper: 0.1).
        lam: weight ``lambda`` of the bottom-k loss (paper: 0.1).
        warmup_steps: steps with ``k_s = 0`` (the cross-entropy-only stage).
        ramp_steps: steps over which ``k_s`` rises linearly to ``k_max`` (0: jumps).

    Raises:
        ValueError: a keyword outside its valid range.

    Example:
        >>> import zoo, torch
        >>> schedule = {"warmup_steps": 100, "ramp_steps": 100}
        >>> model = zoo.build("adaponder-pythia-tiny", halting_kwargs=schedule)
        >>> len(model.halting.gates)  # P - 1 pondering passes, one gate each
        3
        >>> [round(float(model.halting.k_fraction(s)), 3) for s in (0, 150, 500)]
        [0.0, 0.05, 0.1]
        >>> out = model(torch.randint(0, 512, (2, 16)), execution="dense", step=150)
        >>> out.gates.shape
        torch.Size([3, 2, 16])
    """

    def __init__(
        self,
        config: ModelConfig,
        threshold: float = 1e-4,
        hidden_mult: int = 4,
        bias_init: float = 4.0,
        k_max: float = 0.1,
        lam: float = 0.1,
        warmup_steps: int = 0,
        ramp_steps: int = 0,
    ) -> None:
        super().__init__(config)
        _check_number("threshold", threshold, 0.0, 1.0)
        _check_int("hidden_mult", hidden_mult, 1)
        if (
            isinstance(bias_init, bool)
            or not isinstance(bias_init, (int, float))
            or not math.isfinite(bias_init)
        ):
            raise ValueError(f"mlp_gate: bias_init must be a finite number, got {bias_init!r}")
        _check_number("k_max", k_max, 0.0, 1.0)
        _check_number("lam", lam, 0.0, math.inf)
        _check_int("warmup_steps", warmup_steps, 0)
        _check_int("ramp_steps", ramp_steps, 0)
        self.threshold = float(threshold)
        self.bias_init = float(bias_init)
        self.k_max = float(k_max)
        self.lam = float(lam)
        self.warmup_steps = warmup_steps
        self.ramp_steps = ramp_steps
        self.std = config.std
        width = hidden_mult * config.dim
        self.gates = nn.ModuleList(
            nn.Sequential(nn.Linear(config.dim, width), nn.GELU(), nn.Linear(width, 1))
            for _ in range(max(config.passes - 1, 0))
        )

    def step(
        self,
        index: int,
        hidden: Tensor,
        logits: Tensor | None,
        mask: Tensor,
        state: dict[str, Tensor],
        ctx: PassContext,
    ) -> HaltStep:
        score = torch.sigmoid(self.gates[index](hidden).squeeze(-1).float())  # s^i, (B, T)
        return HaltStep(gate=score.to(hidden.dtype), mask=score >= self.threshold)

    def finish(
        self, gates: Tensor, masks: Tensor, state: dict[str, Tensor], ctx: PassContext
    ) -> tuple[Tensor | None, Tensor]:
        if gates.shape[0] == 0:
            return None, gates.new_zeros((), dtype=torch.float32)
        loss = bottom_k_mean(gates, masks[:-1], self.k_fraction(ctx.step, device=gates.device))
        return None, self.lam * loss

    def k_fraction(self, step: int | Tensor | None, device: torch.device | str | None = None) -> Tensor:
        """The scheduled bottom-k fraction ``k_s`` at ``step`` as a 0-d float64 tensor.

        For logging, ``float(policy.k_fraction(step))``.

        Args:
            step: the training step (an int or 0-d tensor); ``None`` means the end of the
                schedule, ``k_max``.
            device: where to put the result when ``step`` is not a tensor.
        """
        if step is None:
            return torch.tensor(self.k_max, dtype=torch.float64, device=device)
        if not isinstance(step, Tensor):
            step = torch.tensor(step, device=device)
        step = step.to(torch.float64)
        if self.ramp_steps == 0:
            ramp = torch.ones_like(step)
        else:
            ramp = ((step - self.warmup_steps) / self.ramp_steps).clamp(0.0, 1.0)
        return torch.where(step < self.warmup_steps, torch.zeros_like(step), self.k_max * ramp)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """PonderLM-style truncated normal weights (std ``sqrt(2 / (5 d))``), zero hidden
        biases, and output bias ``bias_init``."""
        for gate in self.gates:
            for layer in (gate[0], gate[2]):
                nn.init.trunc_normal_(layer.weight, std=self.std, a=-2 * self.std, b=2 * self.std)
            nn.init.zeros_(gate[0].bias)
            nn.init.constant_(gate[2].bias, self.bias_init)


def bottom_k_mean(values: Tensor, active: Tensor, fraction: Tensor) -> Tensor:
    """Mean of the smallest ``floor(fraction * n)`` entries of ``values`` where ``active``.

    Static shapes throughout (a compiled graph does not depend on how many entries are
    active): inactive entries are set to ``+inf``, everything is sorted, and the entries
    whose rank is below ``k`` are summed. ``k`` is computed in float64 so that, e.g.,
    ``0.1 * 30`` floors to 3 and not 2.

    Args:
        values: any shape, e.g. (P - 1, B, T) gate values.
        active: bool, same shape, the entries in the pool.
        fraction: 0-d tensor in ``[0, 1]``.

    Returns:
        a float32 0-d tensor, 0 when ``k = 0``.
    """
    pool = torch.where(
        active, values.float(), torch.full_like(values, math.inf, dtype=torch.float32)
    ).flatten()
    ordered = pool.sort().values  # active entries first, ascending
    n_active = active.sum().to(torch.float64)
    k = torch.floor(fraction.to(torch.float64) * n_active)
    rank = torch.arange(ordered.numel(), device=ordered.device, dtype=torch.float64)
    chosen = torch.where(rank < k, ordered, torch.zeros_like(ordered))
    return chosen.sum() / k.clamp(min=1.0).to(torch.float32)


def _check_number(name: str, value: object, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ValueError(f"mlp_gate: {name} must be a number in [{low}, {high}], got {value!r}")


def _check_int(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"mlp_gate: {name} must be an int >= {low}, got {value!r}")
