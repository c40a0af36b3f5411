"""Draws the concept figures of the documentation (SVG, deterministic bytes).

Command (from the repository root)::

    python docs/figures/make_figures.py              # rewrites docs/figures/*.svg
    python docs/figures/make_figures.py --out /tmp   # somewhere else
    python docs/figures/make_figures.py --only kv_reuse.svg

The diagrams are schematic: where a figure shows gate values or depths they are a small
worked example, stated as such on the page; the registry figure lists the names that are
registered when it is drawn, and the FLOPs figure is computed with :mod:`zoo.flops`.
"""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path
from typing import Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.patches import FancyBboxPatch, Patch, Rectangle  # noqa: E402

plt.rcParams.update(
    {
        "svg.hashsalt": "ponder-zoo",  # fixed ids: the same drawing gives the same bytes
        "svg.fonttype": "none",  # text stays text (small, searchable files)
        "font.family": "DejaVu Sans",
        "font.size": 10,
        "axes.titlesize": 11,
    }
)

INK = "#1f2430"
EDGE = "#3b4a6b"
BOX = "#eef1f8"
ACTIVE = "#4c72b0"
HALTED = "#e4e4e4"
ACCENT = "#dd8452"
GREEN = "#55a868"
# One colour per pass whose keys/values a cache entry holds.
PASS_COLORS = ["#c6dbef", "#6baed6", "#2171b5", "#08306b"]
MONO = "DejaVu Sans Mono"


# Drawing helpers ----------------------------------------------------------------------------


def _canvas(width: float, height: float, xlim: tuple[float, float], ylim: tuple[float, float]):
    fig, ax = plt.subplots(figsize=(width, height))
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    ax.set_aspect("equal")
    ax.axis("off")
    return fig, ax


def _box(ax, x: float, y: float, w: float, h: float, text: str, color: str = BOX, size: float = 9.5,
         family: str | None = None, edge: str = EDGE, weight: str = "normal", align: str = "center") -> None:
    """A rounded box centred on (x, y)."""
    ax.add_patch(
        FancyBboxPatch(
            (x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.02,rounding_size=0.12",
            facecolor=color, edgecolor=edge, linewidth=1.2,
        )
    )
    tx = x if align == "center" else x - w / 2 + 0.15
    ax.text(tx, y, text, ha=align, va="center", fontsize=size, color=INK, family=family or "DejaVu Sans",
            weight=weight, linespacing=1.35)


def _arrow(ax, start: tuple[float, float], end: tuple[float, float], text: str = "", color: str = EDGE,
           style: str = "-|>", dashed: bool = False, size: float = 8.5,
           offset: tuple[float, float] = (0, 0.12), rad: float = 0.0) -> None:
    ax.annotate(
        "", xy=end, xytext=start,
        arrowprops=dict(arrowstyle=style, color=color, lw=1.3, linestyle="--" if dashed else "-",
                        shrinkA=0, shrinkB=0, connectionstyle=f"arc3,rad={rad}"),
    )
    if text:
        mx, my = (start[0] + end[0]) / 2 + offset[0], (start[1] + end[1]) / 2 + offset[1]
        ax.text(mx, my, text, ha="center", va="bottom", fontsize=size, color=color)


def _grid(ax, values, x0: float, y0: float, colors, cell: float = 1.0, labels=None, size: float = 8.5,
          text_colors=None) -> None:
    """Cells of ``values`` (rows top to bottom) with the colour ``colors[value]`` each."""
    for r, row in enumerate(values):
        for c, value in enumerate(row):
            if value is None:
                continue
            x, y = x0 + c * cell, y0 - r * cell
            ax.add_patch(
                Rectangle((x, y), cell, cell, facecolor=colors[value], edgecolor="white", linewidth=1.5)
            )
            if labels is not None and labels[r][c]:
                tc = text_colors[value] if text_colors else INK
                ax.text(x + cell / 2, y + cell / 2, labels[r][c], ha="center", va="center", fontsize=size,
                        color=tc)


# The figures ----------------------------------------------------------------------------------


def registry_figure():
    """Config (names) -> builder (the one reader of the registries) -> model (parts)."""
    import zoo

    fig, ax = _canvas(12.5, 5.8, (-0.3, 16.9), (-1.1, 7.0))
    _box(ax, 1.9, 5.6, 3.8, 1.9,
         "presets: zoo.available('model')\npythia-{14m..2.8b}\nponder-pythia-*  loop-pythia-*\n"
         "adaponder-pythia-*  (+ *-tiny)", size=8.5, family=MONO)
    _box(ax, 1.9, 2.0, 3.8, 3.6,
         "ModelConfig (frozen)\n\nblock='neox'\nrecurrence='ponder'\npasses=4\nhalting='mlp_gate'\n"
         "halting_kwargs={...}\ncache='kv_reuse'\n...shapes...", size=8.5, family=MONO, align="left")
    _arrow(ax, (1.9, 4.62), (1.9, 3.84), "preset(name, **overrides)", offset=(1.0, -0.15))
    ax.text(1.9, -0.45, "to_json() / from_json():\nnames are strings", ha="center", fontsize=8.5, color=EDGE)

    kinds = [("block", "BLOCKS"), ("recurrence", "RECURRENCES"), ("halting", "HALTING"), ("cache", "CACHES")]
    _box(ax, 7.4, 6.3, 4.3, 0.85, "build_model(config)\nthe one place that reads registries", size=8.5,
         color="#fdf0e6", edge=ACCENT)
    _arrow(ax, (3.85, 2.8), (5.2, 6.05))
    slots = [4.5, 3.5, 2.5, 1.5]
    for k, (kind, reg) in enumerate(kinds):
        y = 5.0 - k * 1.45
        names = "\n".join(textwrap.wrap(", ".join(zoo.available(kind)), 34))
        _box(ax, 7.4, y, 4.3, 1.15, f"{reg}\n{names}", size=8, family=MONO)
        _arrow(ax, (9.6, y), (11.7, slots[k]), color=ACCENT)
    ax.text(7.4, -0.45, "an unknown name raises ValueError\nwith the valid names and the nearest match",
            ha="center", fontsize=8.5, color=EDGE)
    _box(ax, 14.2, 3.25, 5.0, 6.4, "", color="white")
    ax.text(14.2, 6.05, "RecurrentLM", ha="center", va="center", fontsize=10.5, weight="bold", color=INK)
    parts = {"embed": 5.35, "layers[0..L-1]  (block)": 4.5, "recurrence": 3.5, "halting  (policy)": 2.5,
             "cache  (strategy)": 1.5, "final_norm, head": 0.6}
    for name, y in parts.items():
        plain = name in ("embed", "final_norm, head")
        _box(ax, 14.2, y, 4.4, 0.55 if plain else 0.75, name, size=8.5, family=MONO,
             color="#f6f6f6" if plain else BOX)
    return fig


def pass_loop_figure():
    """The unrolled pass loop for P = 4 with gated pondering updates."""
    P, step = 4, 4.4
    fig, ax = _canvas(13.5, 5.0, (-1.9, step * (P - 1) + 1.9), (-1.0, 5.6))
    for i in range(P):
        x = i * step
        ax.text(x, 5.25, f"pass {i}", ha="center", fontsize=10.5, weight="bold", color=INK)
        _box(ax, x, 2.1, 2.2, 1.0, "block stack\n(L layers)", color=BOX)
        _box(ax, x, 3.75, 2.2, 1.0, f"final norm, head\n→ Z{_sup(i)}", color=BOX)
        _arrow(ax, (x, 0.35), (x, 1.6))
        _arrow(ax, (x, 2.6), (x, 3.25), f"H{_sup(i)}", offset=(0.32, -0.2))
        ax.text(x, 0.0, f"E{_sup(i)}", ha="center", va="center", fontsize=11, color=INK,
                bbox=dict(boxstyle="circle,pad=0.25", facecolor="white", edgecolor=EDGE))
        if i < P - 1:
            gx = x + step / 2
            _box(ax, gx, 2.95, 1.8, 2.05,
                 f"policy\ns{_sup(i)}, m{_sup(i + 1)}\n\npondering\n"
                 f"e{_sup(i)} = softmax(Z{_sup(i)})\n· (c·Embed)",
                 color="#eaf4ea", edge=GREEN, size=8.5)
            _arrow(ax, (x + 1.1, 3.75), (gx - 0.9, 3.75), color=GREEN)
            ax.text(gx, 0.0, "+", ha="center", va="center", fontsize=13, color=GREEN,
                    bbox=dict(boxstyle="circle,pad=0.2", facecolor="white", edgecolor=GREEN))
            _arrow(ax, (gx, 1.92), (gx, 0.3), color=GREEN)
            ax.text(gx + 0.1, 1.1, f"m{_sup(i + 1)}s{_sup(i)}e{_sup(i)}", ha="left", fontsize=8.5,
                    color=GREEN)
            _arrow(ax, (x + 0.32, 0.0), (gx - 0.3, 0.0))
            _arrow(ax, (gx + 0.3, 0.0), (x + step - 0.32, 0.0))
            _arrow(ax, (x + 1.1, 1.75), (x + step - 1.1, 1.75), dashed=True, color=ACCENT)
        else:
            _arrow(ax, (x, 4.25), (x, 4.95))
            ax.text(x + 0.15, 4.55, "output logits", ha="left", fontsize=8.5, color=INK)
    ax.text(-1.35, 0.0, "c·Embed(x)", ha="right", va="center", fontsize=9, color=INK)
    _arrow(ax, (-1.3, 0.0), (-0.32, 0.0))
    ax.text(step / 2, -0.75, "Eⁱ⁺¹ = Eⁱ + mⁱ⁺¹ · sⁱ · eⁱ          dashed: keys/values of halted tokens "
            "carried to the next pass (kv_reuse)", ha="left", fontsize=9, color=INK)
    return fig


# A worked example shared by the mask, token and cache figures: 8 tokens, P = 4, tau = 1e-4.
EXAMPLE_GATES = [
    [0.93, 0.81, 0.97, 4e-5, 0.88, 0.72, 0.99, 0.91],
    [0.85, 2e-5, 0.94, 0.90, 0.64, 7e-5, 0.97, 0.83],
    [0.77, 0.70, 3e-5, 0.95, 6e-5, 0.58, 0.93, 0.89],
]
TAU = 1e-4


def _example_masks() -> list[list[int]]:
    masks = [[1] * 8]
    for gates in EXAMPLE_GATES:
        masks.append([m * int(s >= TAU) for m, s in zip(masks[-1], gates)])
    return masks


def _gate_label(s: float) -> str:
    return f"{s:.0e}".replace("e-0", "e-") if s < 0.01 else f"{s:.2f}"


def halting_mask_figure():
    """Gate values s^i, the monotonic masks m^i and the resulting depth for 8 tokens."""
    masks = _example_masks()
    T, P = 8, 4
    fig, ax = _canvas(10.5, 6.6, (-2.6, T + 4.6), (-9.4, 4.0))
    ax.text(T / 2, 3.5, "gate sⁱ (example values), τ = 1e-4", ha="center", fontsize=10.5, color=INK)
    gate_cls = [[2 if not masks[i][t] else (1 if s < TAU else 0) for t, s in enumerate(row)]
                for i, row in enumerate(EXAMPLE_GATES)]
    labels = [[_gate_label(s) for s in row] for row in EXAMPLE_GATES]
    _grid(ax, gate_cls, 0, 1.8, {0: "#d9ead3", 1: "#f4cccc", 2: "#f3f3f3"}, labels=labels, size=8,
          text_colors={0: INK, 1: INK, 2: "#9a9a9a"})
    for i in range(P - 1):
        ax.text(-0.25, 2.3 - i, f"s{_sup(i)}", ha="right", va="center", fontsize=10, color=INK)
    ax.text(T / 2, -2.9, "mask mⁱ (token runs pass i):  m⁰ = 1,  mⁱ⁺¹ = mⁱ · [sⁱ ≥ τ]", ha="center",
            fontsize=10.5, color=INK)
    _grid(ax, masks, 0, -4.5, {1: ACTIVE, 0: HALTED}, labels=[["1" if m else "0" for m in r] for r in masks],
          text_colors={1: "white", 0: "#777777"})
    for i in range(P):
        ax.text(-0.25, -4.0 - i, f"m{_sup(i)}", ha="right", va="center", fontsize=10, color=INK)
    depth = [sum(col) for col in zip(*masks)]
    _grid(ax, [depth], 0, -8.9, {d: "white" for d in range(1, P + 1)}, labels=[[str(d) for d in depth]],
          size=10)
    ax.add_patch(Rectangle((0, -8.9), T, 1, fill=False, edgecolor=EDGE, linewidth=1))
    ax.text(-0.25, -8.4, "depth", ha="right", va="center", fontsize=10, color=INK)
    for t in range(T):
        ax.text(t + 0.5, 2.85, f"x{_sub(t)}", ha="center", fontsize=9, color=INK)
    # Token 1 halts at s^1 but its s^2 = 0.70 is above tau: once 0, the mask stays 0.
    ax.annotate("x₁: s¹ = 2e-5 < τ, so m² = 0; its s² = 0.70 ≥ τ changes nothing:\n"
                "once 0, always 0 (monotone). Grey: gates of tokens that did not run.",
                xy=(1.5, -0.2), xytext=(0.0, -1.55), fontsize=8.5, color=ACCENT, va="center",
                arrowprops=dict(arrowstyle="-|>", color=ACCENT, lw=1.2))
    ax.annotate("depth = Σᵢ mⁱ\n(passes the token ran)", xy=(T, -8.4), xytext=(T + 0.4, -7.2), fontsize=8.5,
                color=EDGE, va="center", arrowprops=dict(arrowstyle="-|>", color=EDGE, lw=1.0))
    return fig


def one_token_figure():
    """Token x1 of the example through the passes: mask, gate, input, K/V, output."""
    masks = _example_masks()
    t = 1
    fig, ax = _canvas(14.5, 4.6, (-1.2, 25.0), (-1.0, 6.4))
    ax.text(4, 6.0, "mask mⁱ of the example (token x₁ outlined)", ha="center", fontsize=10, color=INK)
    _grid(ax, masks, 0, 4.0, {1: ACTIVE, 0: HALTED})
    for i in range(4):
        ax.text(-0.2, 4.5 - i, f"pass {i}", ha="right", va="center", fontsize=9, color=INK)
    for c in range(8):
        ax.text(c + 0.5, 5.25, f"x{_sub(c)}", ha="center", fontsize=9, color=INK)
    ax.add_patch(Rectangle((t, 1.0), 1, 4, fill=False, edgecolor=ACCENT, linewidth=2.5))
    rows = [
        ("runs;  s⁰ = 0.81 ≥ τ", "E⁰ = c·Embed(x₁)", "K⁰, V⁰ fresh", "H⁰, Z⁰"),
        ("runs;  s¹ = 2e-5 < τ  →  m² = 0", "E¹ = E⁰ + s⁰e⁰", "K¹, V¹ fresh", "H¹, Z¹"),
        ("halted", "E² = E¹ (frozen)", "kv_reuse: K¹, V¹ carried\nrecompute: recomputed",
         "kv_reuse: H¹, Z¹\nrecompute: new"),
        ("halted", "E³ = E¹ (frozen)", "kv_reuse: K¹, V¹ carried\nrecompute: recomputed",
         "kv_reuse: H¹, Z¹\nrecompute: new"),
    ]
    headers = ("decision after the pass", "input", "its keys/values (every layer)", "hidden, logits")
    xs = (11.6, 15.6, 19.4, 23.1)
    for x, head in zip(xs, headers):
        ax.text(x, 5.25, head, ha="center", fontsize=9, weight="bold", color=INK)
    for i, row in enumerate(rows):
        y = 4.5 - i
        ax.add_patch(Rectangle((9.2, y - 0.5), 15.6, 1, facecolor="#f3f6fb" if i % 2 else "white",
                               edgecolor="none"))
        for x, cell in zip(xs, row):
            ax.text(x, y, cell, ha="center", va="center", fontsize=8.5, color=INK if i < 2 else "#555555")
        _arrow(ax, (8.05, y), (9.15, y), color="#b0b0b0", style="-")
    ax.text(17.0, 0.45,
            "output of x₁:  kv_reuse → Z¹ (its last active pass);  recompute → the last pass's logits",
            ha="center", fontsize=8.5, color=EDGE)
    ax.text(17.0, -0.15, "under kv_reuse, later tokens attend to x₁'s K¹, V¹ at passes 2 and 3",
            ha="center", fontsize=8.5, color=EDGE)
    return fig


def _source_pass(depth: int, i: int) -> int:
    """The pass whose keys/values a token of ``depth`` holds at pass ``i`` under KV reuse."""
    return min(i, depth - 1)


def kv_reuse_figure():
    """Which pass's K/V each query sees at pass 2: recompute against KV reuse."""
    depth = [sum(col) for col in zip(*_example_masks())]
    T, i = 8, 2
    fig, axes = plt.subplots(1, 2, figsize=(11, 5.2))
    cmap = {p: PASS_COLORS[p] for p in range(4)}
    for ax, strategy in zip(axes, ("recompute", "kv_reuse")):
        ax.set_xlim(-1.4, T + 0.2)
        ax.set_ylim(-0.2, T + 1.6)
        ax.set_aspect("equal")
        ax.axis("off")
        ax.set_title(f"{strategy}: attention at pass {i}", color=INK)
        for q in range(T):
            y = T - 1 - q
            runs = depth[q] > i
            for k in range(q + 1):
                src = i if strategy == "recompute" else _source_pass(depth[k], i)
                frozen_row = strategy == "kv_reuse" and not runs
                ax.add_patch(Rectangle((k, y), 1, 1, facecolor="#f0f0f0" if frozen_row else cmap[src],
                                       edgecolor="white", linewidth=1.5))
                if not frozen_row:
                    ax.text(k + 0.5, y + 0.5, str(src), ha="center", va="center", fontsize=8,
                            color="white" if src >= 2 else INK)
            label = f"x{_sub(q)} (depth {depth[q]})"
            ax.text(-0.15, y + 0.5, label, ha="right", va="center", fontsize=8,
                    color=INK if runs or strategy == "recompute" else "#888888")
            if strategy == "kv_reuse" and not runs:
                ax.text((q + 1) / 2, y + 0.5, "not run" if q > 1 else "", ha="center", va="center",
                        fontsize=7.5, color="#888888")
        for k in range(T):
            ax.text(k + 0.5, T + 0.25, f"x{_sub(k)}", ha="center", fontsize=8, color=INK)
        ax.text(T / 2, T + 0.9, "key / value of token", ha="center", fontsize=8.5, color=EDGE)
    handles = [Patch(facecolor=PASS_COLORS[p], label=f"K/V computed at pass {p}") for p in range(3)]
    handles.append(Patch(facecolor="#f0f0f0", label="halted query: frozen, not computed"))
    fig.legend(handles=handles, loc="lower center", ncol=4, frameon=False, fontsize=8.5)
    fig.subplots_adjust(bottom=0.1, wspace=0.35)
    return fig


def execution_figure():
    """Dense execution runs every token and masks; sparse gathers the running tokens."""
    runs = [
        [1, 0, 1, 1, 0, 0, 1, 0],
        [0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 1, 1, 1, 0, 1],
    ]
    B, T = len(runs), len(runs[0])
    fig, ax = _canvas(13.0, 5.6, (-1.6, 28.0), (-7.4, 4.4))
    ax.text(T / 2, 3.7, "dense: every token runs, halted ones are masked", ha="center", fontsize=10,
            color=INK)
    _grid(ax, runs, 0, 2.0, {1: ACTIVE, 0: "#b9c7de"})
    for b in range(B):
        ax.text(-0.2, 2.5 - b, f"row {b}", ha="right", va="center", fontsize=8.5, color=INK)
    ax.text(T + 0.5, 1.0, "where(m, new, previous)\nkeeps halted tokens frozen;\nstatic shapes (training,\n"
            "torch.compile fullgraph)", ha="left", va="center", fontsize=8.5, color=INK)
    ax.text(T / 2, -2.2, "sparse: gather the running tokens, run them, scatter back", ha="center",
            fontsize=10, color=INK)
    _grid(ax, runs, 0, -3.9, {1: ACTIVE, 0: HALTED})
    for b in range(B):
        ax.text(-0.2, -3.4 - b, f"row {b}", ha="right", va="center", fontsize=8.5, color=INK)
    # Packed layout: rows with a running token, slots = the largest count, padding marked.
    packed = [[t for t in range(T) if runs[b][t]] for b in range(B) if any(runs[b])]
    slots = max(len(r) for r in packed)
    x0 = T + 3.6
    _arrow(ax, (T + 0.3, -4.4), (x0 - 0.3, -4.4), "gather", offset=(0, 0.15))
    for r, toks in enumerate(packed):
        for s in range(slots):
            y = -3.9 - r
            pad = s >= len(toks)
            ax.add_patch(Rectangle((x0 + s, y), 1, 1, facecolor="white" if pad else ACTIVE,
                                   edgecolor="#999999" if pad else "white", linewidth=1.2,
                                   hatch="///" if pad else None))
            if not pad:
                ax.text(x0 + s + 0.5, y + 0.5, f"x{_sub(toks[s])}", ha="center", va="center", fontsize=7.5,
                        color="white")
    ax.text(x0 + slots / 2, -2.5, f"(B', N) = ({len(packed)}, {slots})", ha="center", fontsize=9, color=INK,
            family=MONO)
    ax.text(x0 + slots / 2, -6.5, "row 1 ran nothing: dropped\nhatched: padding slots (masked)",
            ha="center", fontsize=8, color=EDGE)
    x1 = x0 + slots + 3.6
    _arrow(ax, (x0 + slots + 0.3, -4.4), (x1 - 2.6, -4.4), "run", offset=(0, 0.15))
    _box(ax, x1, -4.4, 5.0, 2.2,
         "block stack on (B', N):\nqueries attend over the\nper-layer K/V buffer, where\n"
         "halted tokens' entries are\nthose of their last pass", size=8.2)
    ax.text(x1, -6.5, "scatter: results written back\nat the running tokens", ha="center", fontsize=8,
            color=EDGE)
    handles = [Patch(facecolor=ACTIVE, label="runs this pass"),
               Patch(facecolor="#b9c7de", label="halted, computed anyway (dense)"),
               Patch(facecolor=HALTED, label="halted, skipped (sparse)")]
    ax.legend(handles=handles, loc="upper right", frameon=False, fontsize=8.5, bbox_to_anchor=(1.0, 1.0))
    return fig


def decode_cache_figure():
    """One preallocated K/V cache per pass; a halted token's entries carried to later passes."""
    prompt_depth = [sum(col) for col in zip(*_example_masks())]
    new_depth = [2, 4, 1, 3]
    depth = prompt_depth + new_depth
    S = 16  # preallocated length
    P = 4
    fig, ax = _canvas(12.5, 4.6, (-3.4, S + 5.4), (-2.6, 5.8))
    for i in range(P):
        y = 3 - i
        ax.text(-0.25, y + 0.5, f"cache of pass {i}", ha="right", va="center", fontsize=9, color=INK)
        for t in range(S):
            if t < len(depth):
                src = _source_pass(depth[t], i)
                carried = src < i
                ax.add_patch(Rectangle((t, y), 1, 1, facecolor=PASS_COLORS[src], edgecolor="white",
                                       linewidth=1.5, hatch="////" if carried else None))
                ax.text(t + 0.5, y + 0.5, str(src), ha="center", va="center", fontsize=7.5,
                        color="white" if src >= 2 else INK)
            else:
                ax.add_patch(Rectangle((t, y), 1, 1, facecolor="white", edgecolor="#cccccc", linewidth=1.0))
    for t in range(S):
        ax.text(t + 0.5, 4.25, str(t), ha="center", fontsize=7.5, color=INK)
    ax.text(S / 2, 4.85, "position (0-7 prompt: prefill; 8-11 decoded; 12-15 preallocated, empty)",
            ha="center", fontsize=9, color=INK)
    for t in range(len(depth)):
        ax.text(t + 0.5, -0.6, str(depth[t]), ha="center", fontsize=8, color=INK)
    ax.text(-0.25, -0.6, "depth", ha="right", fontsize=9, color=INK)
    ax.plot([8, 8], [-0.9, 4.1], color=ACCENT, lw=1.5, ls="--")
    ax.text(S + 0.4, 2.6, "cell number: the pass whose\nK/V the entry holds;\nhatched: carried from\n"
            "an earlier pass at the\nstart of this pass", ha="left", va="center", fontsize=8.5, color=INK)
    ax.text(S / 2, -1.9, "memory: passes × layers × 2 × B × max_len × kv_heads × head_dim × bytes  "
            "(P × one dense KV cache)", ha="center", fontsize=9, family=MONO, color=INK)
    return fig


def flops_figure():
    """Where the compute of a full-depth 4-pass AdaPonder forward goes, by size (zoo.flops)."""
    import torch

    import zoo
    from zoo import flops

    sizes = ["70m", "160m", "410m", "1.4b", "2.8b"]
    parts = [
        ("QKV + output projections", lambda c: c.qkv + c.attn_out, "#4c72b0"),
        ("attention (scores, values)", lambda c: c.attention, "#8da0cb"),
        ("MLP", lambda c: c.mlp, "#55a868"),
        ("head (every pass)", lambda c: c.head, "#dd8452"),
        ("pondering embedding", lambda c: c.ponder_embed, "#c44e52"),
        ("gates", lambda c: c.gates, "#8172b3"),
    ]
    T = 2048
    fig, ax = plt.subplots(figsize=(10, 3.8))
    for row, size in enumerate(sizes):
        config = zoo.preset(f"adaponder-pythia-{size}")
        macs = flops.count(config, config.passes, seq_len=T, execution="dense")
        left = 0.0
        for name, part, color in parts:
            share = 100.0 * part(macs) / macs.total
            ax.barh(row, share, left=left, color=color, edgecolor="white", label=name if row == 0 else None)
            if share >= 6:
                ax.text(left + share / 2, row, f"{share:.0f}%", ha="center", va="center", fontsize=8,
                        color="white")
            left += share
        vanilla = flops.relative_to_single_pass(config, torch.full((1, T), config.passes))
        ax.text(101, row, f"{vanilla:.2f}x", ha="left", va="center", fontsize=8.5, color=INK)
    ax.set_yticks(range(len(sizes)), [f"adaponder-pythia-{s}" for s in sizes], fontsize=8.5)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel(f"share of the forward's multiply-accumulates (%), every token at 4 passes, T = {T}")
    ax.text(101, -0.85, "x one-pass\nPythia", ha="left", va="center", fontsize=8, color=EDGE)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.22), ncol=3, frameon=False, fontsize=8.5)
    return fig


_SUP = str.maketrans("0123456789+-", "⁰¹²³⁴⁵⁶⁷⁸⁹⁺⁻")
_SUB = str.maketrans("0123456789", "₀₁₂₃₄₅₆₇₈₉")


def _sup(i: int) -> str:
    return str(i).translate(_SUP)


def _sub(i: int) -> str:
    return str(i).translate(_SUB)


FIGURES: dict[str, Callable] = {
    "registry.svg": registry_figure,
    "pass_loop.svg": pass_loop_figure,
    "one_token.svg": one_token_figure,
    "halting_mask.svg": halting_mask_figure,
    "kv_reuse.svg": kv_reuse_figure,
    "execution.svg": execution_figure,
    "decode_cache.svg": decode_cache_figure,
    "flops.svg": flops_figure,
}


def save(fig, path: Path) -> None:
    """Writes ``fig`` as SVG with no date stamp (the bytes depend only on the drawing)."""
    fig.savefig(path, format="svg", metadata={"Date": None}, bbox_inches="tight", facecolor="white")
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent, help="output folder")
    parser.add_argument("--only", action="append", choices=sorted(FIGURES), help="draw only these figures")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.only or FIGURES:
        save(FIGURES[name](), args.out / name)
        print(args.out / name)


if __name__ == "__main__":
    main()
