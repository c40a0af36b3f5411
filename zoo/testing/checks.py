"""The library's properties, run on any registered halting policy or cache strategy.

Shape legend: B batch, T time, P passes, M new tokens.

Each check draws cases with hypothesis (model settings, seeds and token batches; the
draws are derandomized, so a check is reproducible) and holds each case's tiny model
(:func:`~zoo.testing.strategies.tiny_model`) to every property in :data:`PROPERTIES`.
The first property that fails raises an ``AssertionError`` that names it and the case.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from zoo.model import RecurrentLM
from zoo.recurrence import run_passes
from zoo.registry import CACHES, HALTING
from zoo.testing.strategies import _HALTING_KWARGS, BLOCK_OVERRIDES, HALTING_EXAMPLES, VOCAB, tiny_model

__all__ = ["check_policy", "check_cache", "check_model", "CheckReport", "PROPERTIES"]

PROPERTIES = (
    "deterministic",
    "masks monotone",
    "depth within 1..P",
    "causal",
    "row-independent",
    "dense == sparse",
    "left padding == alone",
    "decoding == full forward",
    "gradients finite",
    "decode memory within decode_bytes",
)
"""The properties, in the order they are checked (``dense == sparse`` only with a cache
strategy that freezes halted tokens; the last one only for caches)."""


@dataclass(frozen=True)
class CheckReport:
    """What a check ran and saw.

    Attributes:
        subject: what was checked (``"halting 'kl'"``).
        cases: cases run; every property held in each.
        mean_depth: mean passes per token over every case's dense forward.
        halted_share: share of the cases' token-passes skipped (``1 - depth / P`` on
            average): 0 means nothing ever halted and the halting properties were vacuous.
    """

    subject: str
    cases: int
    mean_depth: float
    halted_share: float


def check_policy(
    name: str,
    halting_kwargs: dict[str, Any] | st.SearchStrategy | None = None,
    *,
    caches: Iterable[str] = ("kv_reuse", "recompute"),
    recurrences: Iterable[str] = ("ponder", "loop"),
    examples: int = 6,
    device: str | torch.device = "cpu",
) -> CheckReport:
    """Holds the registered halting policy ``name`` to the library's properties.

    Each case is a tiny model with the policy (its head sharpened, see
    :func:`~zoo.testing.strategies.tiny_model`), a drawn cache strategy, recurrence, pass
    count (2 to 4), block and seed, and a drawn batch of 1-3 rows of 2-16 tokens. The
    properties, in order (:data:`PROPERTIES`): the dense forward is deterministic; its masks
    are monotone and start all True; depth lies in ``1..P``; a token's decisions and
    logits do not depend on later tokens (causal) nor on the other rows of the batch
    (row-independent); with a freezing cache, sparse execution gives the dense depths,
    masks and logits; greedy decoding from the first half reproduces the full forward;
    a training step's loss and gradients are finite.

    Args:
        name: a registered halting policy (import its module first).
        halting_kwargs: its keyword arguments: a dict, a hypothesis strategy of dicts, or
            ``None`` (a built-in policy's settings under which tokens halt, see
            :func:`~zoo.testing.strategies.halting_kwargs`; ``{}`` for other policies).
            Choose settings under which tokens do halt, or the halting properties say
            little (the report's ``halted_share`` tells).
        caches: cache strategies to draw from.
        recurrences: recurrences to draw from (``"ponder"``, ``"loop"``).
        examples: cases to run.
        device: where the cases run (``"cuda"`` holds the policy to the same properties on
            a GPU, to the same tolerance).

    Returns:
        a :class:`CheckReport`.

    Raises:
        AssertionError: a property fails; the message names it and the case.
        ValueError: ``name`` or a cache is not registered.

    Example:
        >>> from zoo.testing import check_policy
        >>> report = check_policy("fixed_prune", {"ratio": 0.4}, examples=2)
        >>> report.cases, report.halted_share > 0
        (2, True)
    """
    HALTING.get(name)
    caches = _registered(CACHES, caches)
    if halting_kwargs is None:
        kwargs = _HALTING_KWARGS.get(name, st.just({}))
    elif isinstance(halting_kwargs, dict):
        kwargs = st.just(dict(halting_kwargs))
    else:
        kwargs = halting_kwargs
    cases = _cases(st.just(name), kwargs, st.sampled_from(caches), recurrences)
    return _run(f"halting {name!r}", cases, examples, device=device)


def check_cache(
    name: str,
    *,
    policies: dict[str, dict[str, Any]] | None = None,
    recurrences: Iterable[str] = ("ponder", "loop"),
    examples: int = 6,
    device: str | torch.device = "cpu",
) -> CheckReport:
    """Holds the registered cache strategy ``name`` to the library's properties.

    Each case is a tiny model with the strategy, a policy drawn from ``policies`` with its
    settings, a drawn recurrence, pass count, block and seed, and a drawn batch. The
    properties are those of :func:`check_policy`, and the strategy's decode store holds
    no more than its :meth:`~zoo.caches.base.CacheStrategy.decode_bytes`.

    Args:
        name: a registered cache strategy (import its module first).
        policies: halting policy name -> keyword arguments to draw from; default: the
            built-in policies under settings that halt
            (:data:`~zoo.testing.strategies.HALTING_EXAMPLES`).
        recurrences: recurrences to draw from.
        examples: cases to run.
        device: where the cases run.

    Returns:
        a :class:`CheckReport`.

    Raises:
        AssertionError: a property fails; the message names it and the case.
        ValueError: ``name`` or a policy is not registered.

    Example:
        >>> from zoo.testing import check_cache
        >>> check_cache("kv_reuse", examples=2).cases
        2
    """
    CACHES.get(name)
    policies = dict(HALTING_EXAMPLES if policies is None else policies)
    _registered(HALTING, policies)
    cases = st.sampled_from(sorted(policies)).flatmap(
        lambda halting: _cases(st.just(halting), st.just(dict(policies[halting])), st.just(name), recurrences)
    )
    return _run(f"cache {name!r}", cases, examples, memory=True, device=device)


def check_model(model: RecurrentLM, input_ids: torch.Tensor, case: str = "", memory: bool = False) -> torch.Tensor:
    """Holds one model on one batch to every property; returns the dense forward's depth.

    The building block of :func:`check_policy` and :func:`check_cache`, for models of
    your own. The model's mode and gradients are restored afterwards.

    Args:
        model: any :class:`~zoo.model.RecurrentLM`.
        input_ids: (B, T) token ids, ``T >= 2``.
        case: a description of the case for the error message.
        memory: also check the decode store's size against the cache strategy's bound.

    Raises:
        AssertionError: a property fails; the message names it and the case.
    """
    was_training = model.training
    try:
        depth = _properties(model, input_ids, case, memory)
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return depth


# Running cases ------------------------------------------------------------------------------


def _cases(
    halting: st.SearchStrategy, kwargs: st.SearchStrategy, cache: st.SearchStrategy, recurrences: Iterable[str]
) -> st.SearchStrategy[dict[str, Any]]:
    """Keyword arguments of :func:`~zoo.testing.strategies.tiny_model`, drawn."""
    return st.fixed_dictionaries(
        {
            "halting": halting,
            "halting_kwargs": kwargs,
            "cache": cache,
            "recurrence": st.sampled_from(list(recurrences)),
            "passes": st.integers(2, 4),
            "block": st.sampled_from(sorted(BLOCK_OVERRIDES)),
            "seed": st.integers(0, 2**16),
        }
    )


def _run(
    subject: str, cases: st.SearchStrategy, examples: int, memory: bool = False, device: str | torch.device = "cpu"
) -> CheckReport:
    seen: list[tuple[torch.Tensor, int]] = []
    ids_strategy = st.tuples(st.integers(1, 3), st.integers(2, 16), st.integers(0, 2**32 - 1))

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        derandomize=True,
        phases=(Phase.explicit, Phase.generate),
        suppress_health_check=list(HealthCheck),
        print_blob=False,
    )
    @given(case=cases, shape=ids_strategy)
    def run(case: dict[str, Any], shape: tuple[int, int, int]) -> None:
        B, T, seed = shape
        ids = torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed)).to(device)
        described = f"{subject}, case {_describe(case)}, ids of shape {(B, T)} (seed {seed}) on {device}"
        try:
            model = tiny_model(**case).to(device)
        except ValueError as err:
            raise ValueError(f"{described}: the model does not build: {err}") from None
        seen.append((check_model(model, ids, described, memory), model.config.passes))

    run()
    depths = torch.cat([d.flatten().double() for d, _ in seen])
    shares = torch.cat([1 - d.flatten().double() / P for d, P in seen])
    return CheckReport(subject, len(seen), float(depths.mean()), float(shares.mean()))


def _properties(model: RecurrentLM, ids: torch.Tensor, case: str, memory: bool) -> torch.Tensor:
    P = model.config.passes
    B, T = ids.shape
    model.eval()

    def require(ok: bool, prop: str, detail: str) -> None:
        if not ok:
            raise AssertionError(f"property {prop!r} fails for {case}: {detail}")

    with torch.no_grad():
        out = model(ids, execution="dense")
        again = model(ids, execution="dense")
    finite = bool(torch.isfinite(out.logits).all()) and bool(torch.isfinite(out.aux_loss).all())
    require(finite, "gradients finite", "the dense forward's logits or auxiliary loss are not finite")
    require(
        torch.equal(out.depth, again.depth)
        and torch.equal(out.masks, again.masks)
        and torch.equal(out.logits, again.logits)
        and torch.equal(out.aux_loss, again.aux_loss),
        "deterministic",
        "two dense forwards of the same ids differ",
    )
    masks = out.masks
    require(tuple(masks.shape) == (P, B, T), "masks monotone", f"masks have shape {tuple(masks.shape)}")
    require(bool(masks[0].all()), "masks monotone", "a token did not run pass 0")
    require(not bool((masks[1:] & ~masks[:-1]).any()), "masks monotone", "a halted token ran a later pass")
    require(torch.equal(out.depth, masks.sum(0)), "masks monotone", "depth is not the number of passes run")
    require(
        bool(((out.depth >= 1) & (out.depth <= P)).all()),
        "depth within 1..P",
        f"depths range over {int(out.depth.min())}..{int(out.depth.max())}",
    )

    cut = T // 2  # tokens from here on change; nothing before may
    changed = ids.clone()
    changed[:, cut:] = (ids[:, cut:] + 1 + torch.arange(T - cut, device=ids.device)) % model.config.vocab_size
    with torch.no_grad():
        other = model(changed, execution="dense")
    require(
        torch.equal(other.depth[:, :cut], out.depth[:, :cut]),
        "causal",
        f"changing the tokens from position {cut} on changed the depth before it",
    )
    require(
        _close(other.logits[:, :cut], out.logits[:, :cut]),
        "causal",
        f"changing the tokens from position {cut} on changed the logits before it",
    )

    with torch.no_grad():
        rows = [model(ids[b : b + 1], execution="dense") for b in range(B)]
    for b, row in enumerate(rows):
        require(torch.equal(row.depth[0], out.depth[b]), "row-independent", f"row {b} alone halts differently")
        require(_close(row.logits[0], out.logits[b]), "row-independent", f"row {b} alone has other logits")

    if model.cache.freezes:
        with torch.no_grad():
            sparse = model(ids, execution="sparse")
        require(torch.equal(sparse.masks, out.masks), "dense == sparse", "sparse execution halts differently")
        require(_close(sparse.logits, out.logits), "dense == sparse", "sparse execution has other logits")
        require(_close(sparse.gates, out.gates), "dense == sparse", "sparse execution has other gates")

    # Left padding: row b drops its first (b + 1) % 2 tokens and is padded on the left instead
    # (the padded ids keep their values: the mask alone makes them padding). Each execution
    # is held to the row alone in the same execution.
    cuts = [(b + 1) % 2 for b in range(B)]  # a single row is padded too
    attention_mask = torch.ones_like(ids)
    for b, k in enumerate(cuts):
        attention_mask[b, :k] = 0
    for execution in ["dense", "sparse"] if model.cache.freezes else ["dense"]:
        with torch.no_grad():
            run = model(ids, attention_mask=attention_mask, execution=execution)
            alone = [
                rows[b] if execution == "dense" and not k else model(ids[b : b + 1, k:], execution=execution)
                for b, k in enumerate(cuts)
            ]  # an unpadded row alone in dense execution was run above
        for b, (k, row) in enumerate(zip(cuts, alone)):
            where = f"row {b} after {k} padding token(s) ({execution} execution)"
            same_depth = torch.equal(run.depth[b, k:], row.depth[0])
            require(same_depth, "left padding == alone", f"{where} halts otherwise than alone")
            same_logits = _close(run.logits[b, k:], row.logits[0])
            require(same_logits, "left padding == alone", f"{where} has other logits than alone")

    prompt = max(1, T // 2)
    new = T - prompt + 1
    gen = model.generate(ids[:, :prompt], new, progress=False)
    with torch.no_grad():
        full = model(gen.tokens, execution="dense")
    require(
        torch.equal(gen.depth, full.depth[:, prompt - 1 : prompt - 1 + new]),
        "decoding == full forward",
        f"decoding {new} tokens after a prompt of {prompt} gives other depths than the full forward",
    )
    require(
        _close(gen.logits, full.logits[:, prompt - 1 : prompt - 1 + new]),
        "decoding == full forward",
        f"decoding {new} tokens after a prompt of {prompt} gives other logits than the full forward",
    )

    model.train()
    model.zero_grad(set_to_none=True)
    trained = model(ids, execution="dense", step=torch.tensor(10**6, device=ids.device))
    require(bool(torch.isfinite(trained.logits).all()), "gradients finite", "the training forward's logits")
    require(bool(torch.isfinite(trained.aux_loss).all()), "gradients finite", "the auxiliary loss")
    loss = F.cross_entropy(trained.logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten()) + trained.aux_loss
    loss.backward()
    bad = [n for n, p in model.named_parameters() if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
    require(not bad, "gradients finite", f"non-finite gradients of {', '.join(bad[:5])}")

    if memory:  # the decode above once more, through a store of our own
        cfg, length = model.config, prompt + new
        store = model.cache.store("decode", cfg, B, length, model.embed.weight)
        bound = model.cache.decode_bytes(cfg, B, length, model.embed.weight.dtype)
        with torch.no_grad():
            run_passes(model, gen.tokens[:, :prompt], store, sparse=True, last_only=True)
            for j in range(prompt, length - 1):
                run_passes(model, gen.tokens[:, j : j + 1], store, start=j, sparse=True, last_only=True)
        require(
            store.nbytes() <= bound,
            "decode memory within decode_bytes",
            f"the decode store holds {store.nbytes()} bytes, more than decode_bytes' {bound}",
        )
    return out.depth


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to float32 rounding, relative to the values' scale.

    A sharpened head's logits reach about 50, and the rounding of several passes adds up:
    differences of a few 1e-6 of the largest logit are rounding, a wiring error shows as
    differences of the order of the logits.
    """
    if a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    scale = max(1.0, float(b.abs().max()))
    return bool(((a - b).abs() <= 1e-4 * scale).all())


def _registered(registry, names: Iterable[str]) -> list[str]:
    names = list(names)
    for name in names:
        registry.get(name)
    return names


def _describe(case: dict[str, Any]) -> str:
    kwargs = case["halting_kwargs"]
    return (
        f"halting={case['halting']!r} halting_kwargs={kwargs} cache={case['cache']!r} "
        f"recurrence={case['recurrence']!r} passes={case['passes']} block={case['block']!r} seed={case['seed']}"
    )
