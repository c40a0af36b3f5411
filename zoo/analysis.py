"""What a trained model does with its depth: perplexity, halting per pass, NLL by depth, plots.

:func:`evaluate` runs a model over deterministic validation windows and returns an
:class:`EvalReport`: perplexity, mean depth, the share of tokens that run each pass, the
mean negative log-likelihood of the tokens grouped by the depth they ran (the AdaPonderLM
paper's analysis: tokens that halt early are the easy ones), and the compute spent
relative to the same model at full depth (4-pass PonderLM for AdaPonder) and to the
one-pass model (:mod:`zoo.flops`).

Shape legend: N windows, T tokens per window, P passes.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from zoo import flops
from zoo.build import build_model
from zoo.data import Tokenizer, TokenStream, eval_windows
from zoo.model import RecurrentLM

__all__ = [
    "EvalReport",
    "TokenStats",
    "token_stats",
    "token_table",
    "evaluate_tokens",
    "spearman",
    "evaluate",
    "full_depth_copy",
    "depth_sample",
    "plot_token_depth",
    "plot_depth_vs_nll",
    "format_report",
    "format_depth_text",
]


@dataclass
class EvalReport:
    """Validation statistics of one model.

    Attributes:
        tokens: predicted tokens evaluated.
        nll: mean negative log-likelihood, nats per token.
        perplexity: ``exp(nll)``.
        mean_depth: mean passes per token.
        effective_depth: mean gate-weighted passes per token, ``1 + sum_i m^{i+1} s^i``: a
            pass counts by how much of its pondering update the token takes (a pass run with
            gate 0.003 counts 0.003). Equal to ``mean_depth`` for policies without gates.
        depth_nll_spearman: Spearman rank correlation of each token's depth with its own NLL
            (positive: tokens that run longer are the harder ones); ``None`` when every token
            has the same depth.
        passes: the model's ``P``.
        depth_counts: ``[count of tokens with depth 1, ..., depth P]``.
        nll_by_depth: mean NLL of the tokens of each depth (``None`` where there are none).
        active_fraction: share of tokens that ran pass ``i``, ``i = 0..P-1`` (pass 0: 1).
        compute_vs_full: compute as a share of the same model at full depth without halting
            (for AdaPonder: 4-pass PonderLM), everything counted (:func:`zoo.flops.relative_to_full`).
        compute_vs_single: compute in units of the one-pass model's, block stacks only (the
            papers' "x times vanilla FLOPs", :func:`zoo.flops.relative_to_single_pass`).
        execution: the execution the numbers were computed with.
    """

    tokens: int
    nll: float
    perplexity: float
    mean_depth: float
    passes: int
    depth_counts: list[int]
    nll_by_depth: list[float | None]
    active_fraction: list[float]
    compute_vs_full: float
    compute_vs_single: float
    execution: str
    effective_depth: float | None = None
    depth_nll_spearman: float | None = None

    @property
    def compute_saved(self) -> float:
        """``1 - compute_vs_full``: the share of full-depth compute not spent."""
        return 1.0 - self.compute_vs_full

    def to_dict(self) -> dict:
        """A JSON-ready dict (with ``compute_saved``)."""
        return {**asdict(self), "compute_saved": self.compute_saved}


@dataclass
class TokenStats:
    """Per-token statistics of a model's predictions over (N, T) positions.

    Attributes:
        nll: (N, T) float32 negative log-likelihood of the next token, nats.
        depth: (N, T) int64 passes run.
        effective_depth: (N, T) float32 gate-weighted passes, ``1 + sum_i m^{i+1} s^i``.
    """

    nll: Tensor
    depth: Tensor
    effective_depth: Tensor


@torch.no_grad()
def token_table(
    model: RecurrentLM, windows: Tensor | np.ndarray, batch_size: int = 8, execution: str | None = None
) -> TokenStats:
    """Per-token NLL, depth and effective depth of the model's predictions over ``windows``.

    Args:
        model: the model (put in ``eval()`` mode for the call, then restored).
        windows: (N, T + 1) token ids; position ``t`` predicts token ``t + 1``.
        batch_size: windows per forward.
        execution: ``"dense"``, ``"sparse"`` or ``None`` (the model's choice in eval mode).
    """
    windows = torch.as_tensor(windows, dtype=torch.long)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nlls, depths, effective = [], [], []
    try:
        for first in range(0, windows.shape[0], batch_size):
            batch = windows[first : first + batch_size].to(device)
            out = model(batch[:, :-1], execution=execution)
            logp = F.log_softmax(out.logits.float(), dim=-1)  # (B, T, V)
            nlls.append(-logp.gather(-1, batch[:, 1:, None]).squeeze(-1).cpu())
            depths.append(out.depth.cpu())
            taken = (out.masks[1:].float() * out.gates.float()).sum(0) if out.gates.numel() else 0.0
            effective.append((1.0 + taken + torch.zeros_like(out.depth, dtype=torch.float32)).cpu())
    finally:
        model.train(was_training)
    return TokenStats(torch.cat(nlls), torch.cat(depths), torch.cat(effective))


def token_stats(
    model: RecurrentLM, windows: Tensor | np.ndarray, batch_size: int = 8, execution: str | None = None
) -> tuple[Tensor, Tensor]:
    """Per-token NLL and depth of the model's predictions over ``windows`` (see :func:`token_table`).

    Returns:
        ``nll`` (N, T) float32 nats and ``depth`` (N, T) int64 passes.
    """
    stats = token_table(model, windows, batch_size, execution)
    return stats.nll, stats.depth


def _ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n of ``values``, ties sharing their average rank."""
    order = np.argsort(values, kind="stable")
    ordered = values[order]
    # Runs of equal values: each gets the mean of the ranks it spans.
    starts = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])
    ends = np.r_[starts[1:], ordered.size]
    average = (starts + ends + 1) / 2.0  # mean of ranks start+1 .. end
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = np.repeat(average, ends - starts)
    return ranks


def spearman(x: Tensor | np.ndarray, y: Tensor | np.ndarray) -> float | None:
    """Spearman's rank correlation of two equally long samples (ties get average ranks).

    Returns ``None`` when either sample is constant (the correlation is undefined).

    Example:
        >>> spearman([1, 2, 2, 3], [0.1, 0.5, 0.4, 0.9])
        0.9486832980505138
    """
    a = np.asarray(x, dtype=np.float64).ravel()
    b = np.asarray(y, dtype=np.float64).ravel()
    if a.size != b.size:
        raise ValueError(f"spearman needs samples of equal size, got {a.size} and {b.size}")
    if a.size < 2 or np.all(a == a[0]) or np.all(b == b[0]):
        return None
    ra, rb = _ranks(a), _ranks(b)
    ra -= ra.mean()
    rb -= rb.mean()
    return float((ra * rb).sum() / np.sqrt((ra * ra).sum() * (rb * rb).sum()))


def evaluate(
    model: RecurrentLM,
    stream: TokenStream,
    seq_len: int,
    *,
    batch_size: int = 8,
    max_windows: int | None = None,
    execution: str | None = None,
    spread: bool = False,
) -> EvalReport:
    """Perplexity, depth and compute of ``model`` over windows of ``stream``.

    The windows are :func:`zoo.data.eval_windows` (non-overlapping; the first ones, or with
    ``spread`` laid evenly over the stream), so the numbers are deterministic.

    Args:
        model: the model.
        stream: validation tokens.
        seq_len: tokens per window.
        batch_size: windows per forward.
        max_windows: at most this many windows (``None``: the whole stream).
        execution: as in :func:`token_stats`.
        spread: lay the windows over the whole stream instead of taking the first ones.
    """
    return evaluate_tokens(
        model, stream, seq_len, batch_size=batch_size, max_windows=max_windows, execution=execution, spread=spread
    )[1]


def evaluate_tokens(
    model: RecurrentLM,
    stream: TokenStream,
    seq_len: int,
    *,
    batch_size: int = 8,
    max_windows: int | None = None,
    execution: str | None = None,
    spread: bool = False,
) -> tuple[TokenStats, EvalReport]:
    """:func:`evaluate`, with the per-token statistics it was computed from (same arguments)."""
    windows = eval_windows(stream, seq_len, max_windows, spread)
    stats = token_table(model, windows, batch_size, execution)
    nll, depth = stats.nll, stats.depth
    P = model.config.passes
    flat_nll, flat_depth = nll.flatten().double(), depth.flatten()
    counts = [int((flat_depth == d).sum()) for d in range(1, P + 1)]
    by_depth = [
        float(flat_nll[flat_depth == d].mean()) if c else None for d, c in zip(range(1, P + 1), counts)
    ]
    mean_nll = float(flat_nll.mean())
    used = execution or _count_mode(model)  # what model(ids) picks in eval() mode
    return stats, EvalReport(
        tokens=int(flat_nll.numel()),
        nll=mean_nll,
        perplexity=math.exp(mean_nll),
        mean_depth=float(flat_depth.double().mean()),
        passes=P,
        depth_counts=counts,
        nll_by_depth=by_depth,
        active_fraction=[float((flat_depth > i).double().mean()) for i in range(P)],
        compute_vs_full=flops.relative_to_full(model, depth, execution=_count_mode(model)),
        compute_vs_single=flops.relative_to_single_pass(
            model, depth, execution=_count_mode(model), layers_only=True
        ),
        execution=used,
        effective_depth=float(stats.effective_depth.double().mean()),
        depth_nll_spearman=spearman(flat_depth, flat_nll),
    )


def _count_mode(model: RecurrentLM) -> str:
    # Count what inference needs: only running tokens where halted ones are frozen.
    return "sparse" if model.cache.freezes else "dense"


def full_depth_copy(model: RecurrentLM) -> RecurrentLM:
    """The same weights with every token running every pass: the model at full depth.

    For ``mlp_gate`` the gates are forced open (``threshold = 0``): every token runs every
    pass and the gate values still scale the pondering update, so the copy computes the
    function the model was trained to compute, without halting; the difference to the
    adaptive model is what halting costs. Any other policy is replaced by ``"none"``.
    """
    config = model.config
    if config.halting == "mlp_gate":
        config = config.replace(halting_kwargs={**config.halting_kwargs, "threshold": 0.0})
    else:
        config = config.replace(halting="none", halting_kwargs={})
    full = build_model(config, device="meta")
    full.to_empty(device=next(model.parameters()).device)
    if config.tied_embeddings:
        full.head.weight = full.embed.weight
    weights = model.state_dict()
    if config.halting == "none":
        weights = {k: v for k, v in weights.items() if not k.startswith("halting.")}
    full.load_state_dict(weights, strict=True)
    return full.train(model.training)


@torch.no_grad()
def depth_sample(
    model: RecurrentLM, tokenizer: Tokenizer, text: str, execution: str | None = None
) -> tuple[list[str], list[int | None], list[float | None]]:
    """Each token of ``text`` with the depth that predicted it and its NLL.

    The depth at position ``t`` is the passes run to predict token ``t + 1``; it is shown
    on token ``t + 1``, the token whose prediction cost that depth (the convention of
    :meth:`~zoo.model.RecurrentLM.generate`'s ``depth``). The first token was not predicted:
    its depth and NLL are ``None``.

    Returns:
        (pieces, depth, nll): the decoded text of every token, and per token its depth and NLL.
    """
    ids = tokenizer.encode(text)[: model.config.max_seq_len + 1]
    if len(ids) < 2:
        raise ValueError("the text sample must hold at least two tokens")
    nll, depth = token_stats(model, torch.tensor([ids]), 1, execution)
    pieces = [tokenizer.decode([i]) for i in ids]
    return pieces, [None, *depth[0].tolist()], [None, *nll[0].tolist()]


def plot_token_depth(
    pieces: Sequence[str],
    depth: Sequence[int | None],
    passes: int,
    path: str | os.PathLike,
    title: str = "",
    width: int = 80,
) -> Path:
    """A PNG of the text, each character's cell coloured by the depth of its token.

    Tokens are laid out in a monospace grid ``width`` characters wide; newlines start a new
    row; a token whose depth is ``None`` is left white. Writes with matplotlib's Agg
    backend (no display needed).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import BoundaryNorm, ListedColormap

    cells: list[list[tuple[str, float]]] = [[]]
    for piece, d in zip(pieces, depth):
        d = np.nan if d is None else d
        for ch in piece:
            if ch == "\n":
                cells[-1].append(("⏎", d))
                cells.append([])
                continue
            if len(cells[-1]) >= width:
                cells.append([])
            cells[-1].append((ch if ch.isprintable() else "·", d))
    rows = len(cells)
    grid = np.full((rows, width), np.nan)
    for r, row in enumerate(cells):
        for c, (_, d) in enumerate(row):
            grid[r, c] = d
    cmap = ListedColormap(plt.get_cmap("viridis")(np.linspace(0.15, 0.95, passes)))
    norm = BoundaryNorm(np.arange(0.5, passes + 1.5), cmap.N)
    fig, ax = plt.subplots(figsize=(width * 0.12 + 1.5, rows * 0.26 + 1.0))
    image = ax.imshow(grid, cmap=cmap, norm=norm, aspect="auto", interpolation="nearest")
    for r, row in enumerate(cells):
        for c, (ch, d) in enumerate(row):
            dark = not np.isnan(d) and d <= (passes + 1) / 2  # the low end of viridis is dark
            ax.text(
                c,
                r,
                ch,
                ha="center",
                va="center",
                fontsize=8,
                family="monospace",
                color="white" if dark else "black",
            )
    ax.set_axis_off()
    bar = fig.colorbar(image, ax=ax, ticks=range(1, passes + 1), fraction=0.02, pad=0.01)
    bar.set_label("passes")
    ax.set_title(title or "passes run per token")
    return _save_png(fig, path)


def plot_depth_vs_nll(report: EvalReport, path: str | os.PathLike, title: str = "") -> Path:
    """A PNG bar chart of the mean NLL of tokens by the depth they ran, with token shares."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    depths = list(range(1, report.passes + 1))
    values = [v if v is not None else 0.0 for v in report.nll_by_depth]
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    bars = ax.bar(depths, values, color="tab:blue")
    total = max(report.tokens, 1)
    for bar, count in zip(bars, report.depth_counts):
        ax.annotate(
            f"{100 * count / total:.1f}% of tokens",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.set_xticks(depths)
    ax.set_xlabel("passes run (depth)")
    ax.set_ylabel("mean NLL (nats / token)")
    ax.set_title(title or "NLL by depth")
    return _save_png(fig, path)


def _save_png(fig, path: str | os.PathLike) -> Path:
    """Writes ``fig`` (laid out tight) as a PNG at ``path``, creating its folder, and closes it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def format_report(name: str, report: EvalReport) -> str:
    """A few human-readable lines for ``report``."""
    by_depth = ", ".join(
        f"{d}: {v:.3f} ({c} tok)" if v is not None else f"{d}: - (0 tok)"
        for d, (v, c) in enumerate(zip(report.nll_by_depth, report.depth_counts), 1)
    )
    active = ", ".join(f"{100 * a:.1f}%" for a in report.active_fraction)
    return "\n".join(
        [
            f"{name}: perplexity {report.perplexity:.3f} "
            f"(NLL {report.nll:.4f} nats/token over {report.tokens} tokens)",
            f"  mean depth {report.mean_depth:.3f} of {report.passes} passes"
            + (f" (effective {report.effective_depth:.3f})" if report.effective_depth is not None else "")
            + f"; tokens running each pass: {active}",
            f"  compute: {100 * report.compute_vs_full:.1f}% of full depth "
            f"({100 * report.compute_saved:.1f}% saved), "
            f"{report.compute_vs_single:.2f}x the one-pass model (layers)",
            f"  mean NLL by depth: {by_depth}"
            + (
                f"; Spearman(depth, NLL) {report.depth_nll_spearman:+.3f}"
                if report.depth_nll_spearman is not None
                else ""
            ),
        ]
    )


_SUPERSCRIPTS = str.maketrans("0123456789", "⁰¹²³⁴⁵⁶⁷⁸⁹")
_ANSI_BACKGROUNDS = ["44", "46", "43", "41", "45", "42"]  # blue, cyan, yellow, red, magenta, green


def format_depth_text(pieces: Sequence[str], depth: Sequence[int], style: str = "aligned") -> str:
    """Text with each token's depth shown.

    Args:
        pieces: decoded tokens.
        depth: passes run for each token.
        style: ``"aligned"`` (each line of text over a line holding each token's depth
            under its first character; a newline's depth stands just past the end of the
            line it ends), ``"superscript"`` (``"d¹e¹f⁴"``: the depth after
            each token) or ``"color"`` (an ANSI background colour per depth, for terminals).

    Example:
        >>> print(format_depth_text(["de", "f", "\\n", "g"], [1, 4, 2, 3]))
        def
        1 42
        g
        3
        >>> format_depth_text(["de", "f"], [1, 4], "superscript")
        'de¹f⁴'
    """
    if style not in ("aligned", "superscript", "color"):
        raise ValueError(f"style must be 'aligned', 'superscript' or 'color', got {style!r}")
    if style == "superscript":
        return "".join(f"{p}{str(d).translate(_SUPERSCRIPTS)}" for p, d in zip(pieces, depth))
    if style == "aligned":
        rows: list[tuple[str, str]] = [("", "")]
        for piece, d in zip(pieces, depth):
            for k, part in enumerate(piece.split("\n")):
                if k:
                    rows.append(("", ""))
                text, marks = rows[-1]
                mark = (str(d) if k == 0 else "").ljust(len(part))
                rows[-1] = (text + part, marks + mark)
        return "\n".join(f"{text}\n{marks.rstrip()}" for text, marks in rows if text or marks.strip())
    out = []
    for p, d in zip(pieces, depth):
        code = _ANSI_BACKGROUNDS[(int(d) - 1) % len(_ANSI_BACKGROUNDS)]
        # One escape per line, so a background colour never runs on past a newline.
        out.append("\n".join(f"\x1b[30;{code}m{line}\x1b[0m" if line else "" for line in p.split("\n")))
    return "".join(out)
