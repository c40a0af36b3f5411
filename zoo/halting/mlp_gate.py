"""``mlp_gate``: AdaPonderLM's per-pass MLP gates with a monotonic halting mask."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from zoo.config import ModelConfig
from zoo.halting.base import IGNORE, HaltingPolicy, HaltStep, PassContext, token_nll
from zoo.registry import HALTING

__all__ = ["MLPGate", "bottom_k_mean", "hinge_loss", "PAPER", "LOSSES", "POOLS", "SELECTIONS"]

LOSSES = ("bottom_k", "hinge")
POOLS = ("all", "per_gate")
SELECTIONS = ("gate", "nll")

PAPER = dict(loss="bottom_k", pool="all", select="gate", detach=False, open_warmup=False)
"""The paper's form of gate training: ``halting_kwargs={**PAPER, "k_max": 0.1, ...}``."""


@HALTING.register("mlp_gate")
class MLPGate(HaltingPolicy):
    """AdaPonderLM gates (Song et al., arXiv 2603.01914): one MLP gate per pondering pass.

    After pondering pass ``i < P - 1``, with ``H^i`` the pass's final-norm hidden state::

        s^i     = sigmoid(MLP_i(H^i))           MLP_i: Linear(d, k d) -> GELU -> Linear(k d, 1)
        m^{i+1} = m^i & (s^i >= threshold)      monotone: a halted token never resumes
        E^{i+1} = E^i + m^{i+1} * s^i * e^i     (applied by the driver)

    The ``P - 1`` gates are separate modules (a single shared gate collapses to halting
    everything or nothing). The gates returned for tokens that did not run pass ``i`` are 1
    (no gate value, as for policies without gates), which is also what sparse execution
    records for them.

    **Training the gates.** Training adds a halting loss whose share of halted tokens
    ``k_s`` follows a schedule in the training step: 0 for ``step < warmup_steps`` (stage 1),
    then linear from 0 to ``k_max`` over ``ramp_steps``, then ``k_max``; outside training
    (``step=None``) it is ``k_max``. The step arrives as a 0-d tensor, so a compiled model
    does not recompile as it changes. Two losses:

    * ``loss="bottom_k"`` (the paper's): the mean of the smallest ``k = floor(k_s n)`` gate
      values of the tokens that ran the pass, ``aux = lam * mean(smallest k of s)``
      (:func:`bottom_k_mean`). Its gradient ``s (1 - s)`` vanishes exactly where a gate
      must cross a small threshold, and gates the cross-entropy already closed fill the
      bottom ``k``: the cross-entropy, not ``k_max``, decides how many tokens halt.
    * ``loss="hinge"``: a two-sided hinge on the gate logits (:func:`hinge_loss`) pushes the
      ``k`` chosen tokens below ``logit(threshold)`` and the others up to ``open_logit``, so
      that ``k_max`` sets the halted share and the tokens that go on take most of their
      pondering update.

    Which tokens the hinge chooses (``select``): ``"gate"``, the gates' own smallest values
    (as the bottom-k loss does); ``"nll"``, the tokens the pass already predicts best (lowest
    next-token loss against the training targets, the last position excluded), so the gates
    learn to halt by difficulty. ``pool``: ``"all"`` pools every pondering pass (the paper),
    ``"per_gate"`` makes each gate halt ``k_s`` of the tokens that reach it. ``detach``:
    the gates read a detached hidden state, so the halting loss trains the gates alone.
    ``open_warmup``: during stage 1 every gate is held open (``s = 1``, every token goes on)
    and gets no gradient, so stage 1 is plain PonderLM and the cross-entropy cannot close
    the gates before the halting loss starts. :data:`PAPER` selects the paper's form.

    The defaults are the form measured best on the library's iso-FLOPs experiment (hinge,
    per gate, chosen by NLL, detached, held open in stage 1, ``open_logit=4``); the
    measurements are on the ``mlp_gate`` documentation page.

    Args:
        config: the model config (``dim``, ``passes``, initialisation ``std``).
        threshold: ``tau``; a token halts once its gate falls below it (paper: 1e-4). 0 turns
            halting off (the gates only scale the update; the hinge then adds no loss).
        hidden_mult: gate MLP hidden width as a multiple of ``dim`` (paper: 4).
        bias_init: initial bias of each gate's output layer. The default 4.0 makes every
            gate start at about ``sigmoid(4) = 0.98``: open, so at initialisation the model
            behaves like PonderLM (every token runs every pass with a nearly unscaled
            pondering update), and the halting loss, not chance, decides what closes.
        k_max: final share ``k_s`` of halted tokens the loss asks for (paper: 0.1).
        lam: weight ``lambda`` of the halting loss (paper: 0.1).
        warmup_steps: steps with ``k_s = 0`` (stage 1).
        ramp_steps: steps over which ``k_s`` rises linearly to ``k_max`` (0: jumps).
        loss: ``"hinge"`` or ``"bottom_k"`` (the paper's).
        pool: ``"per_gate"`` or ``"all"`` (the paper's).
        select: ``"nll"`` or ``"gate"`` (the paper's); ``"nll"`` needs ``loss="hinge"``.
        detach: the gates read a detached hidden state (the paper: no).
        open_warmup: gates held open and untrained during stage 1 (the paper: no).
        open_logit: with the hinge, the logit the tokens that go on are pushed up to.

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
        loss: str = "hinge",
        pool: str = "per_gate",
        select: str = "nll",
        detach: bool = True,
        open_warmup: bool = True,
        open_logit: float = 4.0,
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
        _check_choice("loss", loss, LOSSES)
        _check_choice("pool", pool, POOLS)
        _check_choice("select", select, SELECTIONS)
        for name, value in (("detach", detach), ("open_warmup", open_warmup)):
            if not isinstance(value, bool):
                raise ValueError(f"mlp_gate: {name} must be True or False, got {value!r}")
        if select == "nll" and loss != "hinge":
            raise ValueError(
                "mlp_gate: select='nll' chooses which tokens the hinge loss teaches to halt; "
                "use it with loss='hinge' (loss='bottom_k' always pushes the gates' own smallest values)"
            )
        if isinstance(open_logit, bool) or not isinstance(open_logit, (int, float)) or not math.isfinite(open_logit):
            raise ValueError(f"mlp_gate: open_logit must be a finite number, got {open_logit!r}")
        self.threshold = float(threshold)
        self.bias_init = float(bias_init)
        self.k_max = float(k_max)
        self.lam = float(lam)
        self.warmup_steps = warmup_steps
        self.ramp_steps = ramp_steps
        self.loss = loss
        self.pool = pool
        self.select = select
        self.detach = detach
        self.open_warmup = open_warmup
        self.open_logit = float(open_logit)
        self.std = config.std
        width = hidden_mult * config.dim
        self.gates = nn.ModuleList(
            nn.Sequential(nn.Linear(config.dim, width), nn.GELU(), nn.Linear(width, 1))
            for _ in range(max(config.passes - 1, 0))
        )

    @property
    def uses_logits(self) -> bool:  # type: ignore[override]
        """``select='nll'`` ranks tokens by the pass's next-token loss, which needs the head
        at every pass while training (PonderLM runs it anyway); inference does not."""
        return self.select == "nll" and self.training

    def init_state(self, mask: Tensor) -> dict[str, Tensor]:
        """The hinge loss keeps each pass's gate logit and selection score until :meth:`finish`."""
        if self.loss != "hinge":
            return {}
        zeros = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
        return {f"{kind}{i}": zeros for i in range(len(self.gates)) for kind in ("logit", "score")}

    def step(
        self,
        index: int,
        hidden: Tensor,
        logits: Tensor | None,
        mask: Tensor,
        state: dict[str, Tensor],
        ctx: PassContext,
    ) -> HaltStep:
        gate_input = hidden.detach() if self.detach else hidden
        logit = self.gates[index](gate_input).squeeze(-1).float()  # (B, T)
        score = torch.sigmoid(logit)  # s^i
        goes_on = score >= self.threshold
        if self.open_warmup and ctx.step is not None:
            # Stage 1 is plain PonderLM: every token goes on with an unscaled update, and the
            # gates get no gradient from the cross-entropy.
            held = ctx.step < self.warmup_steps
            score = torch.where(held, torch.ones_like(score), score)
            goes_on = torch.where(held, torch.ones_like(goes_on), goes_on)
        new_state = None
        if self.loss == "hinge":
            rank = logit.detach() if self.select == "gate" else _next_token_nll(logits, ctx)
            new_state = {**state, f"logit{index}": logit, f"score{index}": rank}
        return HaltStep(mask=goes_on, gate=score.to(hidden.dtype), state=new_state)

    def finish(
        self, gates: Tensor, masks: Tensor, state: dict[str, Tensor], ctx: PassContext
    ) -> tuple[Tensor | None, Tensor]:
        if gates.shape[0] == 0:
            return None, gates.new_zeros((), dtype=torch.float32)
        fraction = self.k_fraction(ctx.step, device=gates.device)
        active = masks[:-1]  # (P - 1, B, T): gate i's pool is the tokens that ran pass i
        if self.loss == "bottom_k":
            if self.pool == "all":
                loss = bottom_k_mean(gates, active, fraction)
            else:
                loss = torch.stack([bottom_k_mean(g, a, fraction) for g, a in zip(gates, active)]).mean()
            return None, self.lam * loss
        if self.threshold == 0.0:  # no gate can fall below 0: nothing halts, nothing to teach
            return None, gates.new_zeros((), dtype=torch.float32)
        if self.select == "nll":
            if ctx.targets is None:  # no targets: nothing to rank by, nothing to train
                return None, gates.new_zeros((), dtype=torch.float32)
            active = active & (ctx.targets != IGNORE)  # a chunk's last token has no target
        logits = torch.stack([state[f"logit{i}"] for i in range(gates.shape[0])])  # (P - 1, B, T)
        scores = torch.stack([state[f"score{i}"] for i in range(gates.shape[0])])
        halt_logit = math.log(self.threshold) - math.log1p(-self.threshold) if self.threshold < 1 else math.inf
        loss = hinge_loss(
            logits, scores, active, fraction, halt_logit, per_gate=self.pool == "per_gate", open_logit=self.open_logit
        )
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


def hinge_loss(
    logits: Tensor,
    scores: Tensor,
    active: Tensor,
    fraction: Tensor,
    halt_logit: float,
    per_gate: bool = True,
    margin: float = 1.0,
    open_logit: float = 0.0,
) -> Tensor:
    """Two-sided hinge on gate logits that makes ``fraction`` of the active tokens halt.

    The ``k = floor(fraction * n)`` active entries of smallest ``scores`` (per gate, or pooled
    over the gates) are pushed below ``halt_logit - margin`` (so that they halt), every other
    active entry up to ``open_logit`` (0: gate value 0.5 or more, so that it goes on)::

        loss = mean over active of  relu(z - halt_logit + margin)   if chosen
                                    relu(open_logit - z)            otherwise

    Unlike the bottom-k mean of the sigmoid values, whose gradient ``s (1 - s)`` vanishes
    exactly where a gate must cross a small threshold, each term has a unit gradient until
    its target is met, and entries that already meet it add nothing: the halted fraction is
    ``fraction``, whatever the cross-entropy does. Static shapes throughout (sorts and
    comparisons), so it compiles without graph breaks. Zero when ``k = 0``.

    Args:
        logits: (G, B, T) gate logits ``z`` (the pre-sigmoid output), with gradient.
        scores: (G, B, T) what ranks the tokens (the detached logits, or a difficulty such as
            the pass's next-token loss: the easiest are chosen to halt).
        active: (G, B, T) bool, the entries in the pool.
        fraction: 0-d tensor in ``[0, 1]``.
        halt_logit: ``logit(threshold)``.
        per_gate: choose ``k`` of each gate's active tokens (``True``) or of the pool of every
            gate together.
        margin: how far below the threshold the chosen logits are pushed.
        open_logit: the logit the other entries are pushed up to.

    Returns:
        a float32 0-d tensor.
    """
    G = logits.shape[0]
    rows = G if per_gate else 1
    pool = torch.where(active, scores.float(), torch.full_like(scores, math.inf, dtype=torch.float32))
    pool = pool.reshape(rows, -1)  # (G, B*T) or (1, G*B*T)
    ordered = pool.sort(dim=-1).values  # active entries first, ascending
    n_active = active.reshape(rows, -1).sum(-1, keepdim=True).to(torch.float64)  # (rows, 1)
    k = torch.floor(fraction.to(torch.float64) * n_active).to(torch.int64)
    kth = ordered.gather(-1, (k - 1).clamp(min=0))  # the k-th smallest score of each row
    chosen = (pool <= kth) & (k > 0)
    chosen = chosen.reshape(active.shape) & active
    z = logits.float()
    terms = torch.where(chosen, F.relu(z - (halt_logit - margin)), F.relu(open_logit - z))
    total = torch.where(active, terms, torch.zeros_like(terms)).sum()
    loss = total / active.sum().clamp(min=1).to(torch.float32)
    return torch.where(k.sum() > 0, loss, torch.zeros_like(loss))


def _next_token_nll(logits: Tensor | None, ctx: PassContext) -> Tensor:
    """(B, T) detached next-token loss of the pass's logits; 0 where there is no target.

    Targets are ``ctx.targets``, on the pass's layout (dense or gathered alike); a token
    without one (a chunk's last, or no ids at all) gets 0.
    """
    if logits is None or ctx.targets is None:
        return torch.zeros(ctx.positions.shape, dtype=torch.float32, device=ctx.positions.device)
    with torch.no_grad():
        return token_nll(logits, ctx.targets)


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"mlp_gate: {name} must be one of {choices}, got {value!r}")


def _check_number(name: str, value: object, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ValueError(f"mlp_gate: {name} must be a number in [{low}, {high}], got {value!r}")


def _check_int(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"mlp_gate: {name} must be an int >= {low}, got {value!r}")
