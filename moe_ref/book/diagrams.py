"""The book's conceptual diagrams, drawn as code with matplotlib.

Each function draws one figure of the book and returns a :class:`matplotlib.figure.Figure`; its keyword
arguments are the numbers the figure shows, with defaults that match the text. Nothing is downloaded and no
external tool is needed: the diagrams are matplotlib patches (rounded :class:`~matplotlib.patches.FancyBboxPatch`
boxes, :class:`~matplotlib.patches.FancyArrowPatch` arrows) on one axes without ticks or frame.

* :func:`moe_block`: an MoE transformer block, one token's path through the router to its ``k`` experts;
* :func:`data_path`: the tensors of the sort-based (dropless) MoE layer, with their shapes and a small
  worked example, from ``x`` ``[T, d]`` to ``y`` ``[T, d]``;
* :func:`capacity_drops`: expert capacity, the slots each expert keeps and the assignments it drops;
* :func:`gemm_tile_schedule`: the tile schedule of the Triton grouped-matmul kernel of chapter 6;
* :func:`expert_cuts`: the same hidden units cut into experts in different ways, and the units one token
  passes through (chapter 7);
* :func:`expert_parallel`: one MoE layer's dispatch and combine across ranks, the five steps of expert
  parallelism (chapter 9).

Style, shared by all of them: at most 6.4 inches wide (the book's text column), at most two panels side by
side, text of 10 or 11 points, one colour per expert (:data:`EXPERT_COLORS`, the same expert has the same
colour in every diagram). The figures are pyplot figures, so a notebook shows one like any plot
(``diagrams.moe_block(); plt.show()``); close them (``plt.close(fig)``) when drawing many outside a
notebook. :func:`save_all` writes every diagram as SVG.

The axes of each figure spans the whole figure with data units equal to inches, so positions and sizes in
the code below are inches on the page.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple

import numpy as np
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.patches import Circle, FancyArrowPatch, FancyBboxPatch, Patch, Polygon, Rectangle

__all__ = ["EXPERT_COLORS", "expert_color", "moe_block", "data_path", "capacity_drops", "gemm_tile_schedule",
           "GemmTile", "gemm_row_tiles", "gemm_launch_row_tiles", "expert_cuts", "CUTS", "expert_parallel",
           "expert_parallel_plan", "DIAGRAMS", "save_all"]

#: One colour per expert, reused by every diagram (expert ``e`` is ``EXPERT_COLORS[e % 8]``): calm,
#: mid-saturation hues that stay apart from each other and from the red of dropped assignments.
EXPERT_COLORS = ("#4C78A8", "#E0904A", "#59A14F", "#8E6BB5", "#C9A227", "#3FA7A0", "#B5657D", "#7F8C99")

#: Text, lines and neutral fills.
INK = "#2B2B2B"
GREY = "#8A8F96"
LIGHT = "#EDEEF0"
DROP = "#C8423B"  # dropped assignments
WIDTH = 6.4  # the book's text column, inches
FONT = 10  # body text, points
TITLE = 11  # titles, points


# --- drawing helpers --------------------------------------------------------------------------------------

def expert_color(e: int) -> str:
    """The colour of expert ``e``."""
    return EXPERT_COLORS[e % len(EXPERT_COLORS)]


def _tint(color, amount: float) -> tuple:
    """``color`` mixed with white: ``amount`` 0 is the colour, 1 is white."""
    r, g, b = to_rgb(color)
    return (r + (1 - r) * amount, g + (1 - g) * amount, b + (1 - b) * amount)


def _canvas(width: float, height: float):
    """A figure ``width`` x ``height`` inches with one frameless axes whose data units are inches."""
    import matplotlib.pyplot as plt  # a pyplot figure, so a notebook shows it with plt.show() like any plot

    fig = plt.figure(figsize=(width, height), layout="none")
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, width)
    ax.set_ylim(0, height)
    ax.set_axis_off()
    return fig, ax


def _box(ax, x, y, w, h, text="", *, fc="white", ec=INK, lw=1.0, ls="-", color=INK, size=FONT, radius=0.06,
         weight="normal", hatch=None, zorder=2):
    """A rounded box with its lower-left corner at ``(x, y)`` and centred text."""
    radius = min(radius, w / 2, h / 2)
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle=f"round,pad=0,rounding_size={radius}", fc=fc, ec=ec,
                                lw=lw, ls=ls, hatch=hatch, zorder=zorder))
    if text:
        ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=size, color=color,
                weight=weight, zorder=zorder + 1)


def _cell(ax, x, y, w, h, text="", *, fc="white", ec="white", lw=0.8, color=INK, hatch=None, size=FONT,
          zorder=2):
    """A square-cornered cell (one entry of a tensor) with optional centred text."""
    ax.add_patch(Rectangle((x, y), w, h, fc=fc, ec=ec, lw=lw, hatch=hatch, zorder=zorder))
    if text != "":
        ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=size, color=color,
                zorder=zorder + 1)


def _arrow(ax, start, end, *, color=INK, lw=1.1, ls="-", style="-|>", connection="arc3", zorder=1):
    """An arrow from ``start`` to ``end`` (inches)."""
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle=style, mutation_scale=10, color=color, lw=lw,
                                 linestyle=ls, connectionstyle=connection, shrinkA=0, shrinkB=0,
                                 zorder=zorder))


def _text(ax, x, y, s, *, size=FONT, color=INK, ha="center", va="center", **kw):
    return ax.text(x, y, s, fontsize=size, color=color, ha=ha, va=va, **kw)


def _label(ax, x, y, name, shape, *, size=FONT):
    """A tensor's name over its shape, bottom-aligned at ``y``, centred on ``x``."""
    _text(ax, x, y + 0.19, name, size=size, va="bottom", family="monospace")
    _text(ax, x, y, shape, size=size, va="bottom", color=GREY)


# --- 1. the MoE block -------------------------------------------------------------------------------------

def moe_block(num_experts: int = 4, k: int = 2, *, shared: bool = False,
              token_experts: tuple[int, ...] | None = None) -> Figure:
    """An MoE transformer block, drawn bottom to top, with one token's path highlighted.

    Input tokens ``x`` ``[T, d]`` go through attention and its residual connection to ``h``; the router
    (gate ``W_g``, softmax, top-k) picks ``k`` of the ``num_experts`` expert FFNs for the token; the
    ``k`` chosen experts (coloured, the others greyed out) run on ``h`` and their outputs are summed with the
    combine weights ``g``; the residual ``h`` is added back to give ``y`` ``[T, d]``. With ``shared=True`` a
    dashed shared expert, which every token goes through with weight 1, is added to the sum.

    Args:
        num_experts: ``E``, 1 to 16 expert boxes.
        k: experts per token, ``1 <= k <= E``.
        shared: draw a shared expert (DeepSeekMoE, Qwen-MoE).
        token_experts: the ``k`` experts highlighted (0-based); by default ``k`` spread-out ones.
    """
    E = int(num_experts)
    if not 1 <= E <= 16:
        raise ValueError(f"num_experts must be in [1, 16], got {num_experts}")
    if not 1 <= k <= E:
        raise ValueError(f"k must be in [1, num_experts={E}], got {k}")
    if token_experts is None:
        token_experts = tuple(sorted({i * E // k + (E // k) // 2 for i in range(k)}))
    chosen = tuple(sorted(int(e) for e in token_experts))
    if len(set(chosen)) != k or not all(0 <= e < E for e in chosen):
        raise ValueError(f"token_experts must be {k} distinct experts in [0, {E}), got {token_experts}")

    fig, ax = _canvas(WIDTH, 5.9)
    left, right = 0.85, 4.85  # the expert row (and the router) span
    cx = (left + right) / 2
    res_x = 0.3  # the residual line
    _text(ax, WIDTH / 2, 5.68, f"MoE block: E = {E} expert{'s' * (E > 1)}, top-k = {k} (one token's path in colour)",
          size=TITLE)

    # input and attention
    _text(ax, cx, 0.18, r"tokens $x$   [T, d]")
    _arrow(ax, (cx, 0.32), (cx, 0.52))
    _box(ax, cx - 1.1, 0.52, 2.2, 0.42, "attention + residual", fc=LIGHT, ec=GREY)
    _arrow(ax, (cx, 0.94), (cx, 1.63))
    branch_y = 1.22
    ax.add_patch(Circle((cx, branch_y), 0.035, color=INK, zorder=3))
    _text(ax, cx + 0.1, branch_y + 0.12, "$h$", ha="left")

    # router: a dashed container with gate, softmax, top-k
    ry0, ry1 = 1.63, 2.33
    _box(ax, left - 0.1, ry0 - 0.0, right - left + 0.2, ry1 - ry0, ec=GREY, ls="--", lw=0.9, radius=0.1,
         zorder=1)
    _text(ax, right + 0.2, (ry0 + ry1) / 2, "router", ha="left", color=GREY)
    bw, gap = 1.1, (right - left - 3 * 1.1) / 2
    labels = [r"logits $h\,W_g$", "softmax", f"top-k (k = {k})"]
    xs = [left + i * (bw + gap) for i in range(3)]
    by = ry0 + 0.14
    for i, (x, lab) in enumerate(zip(xs, labels)):
        _box(ax, x, by, bw, 0.42, lab, fc="white", ec=INK)
        if i:
            _arrow(ax, (xs[i - 1] + bw, by + 0.21), (x, by + 0.21))

    # experts
    ey0, eh = 2.95, 0.58
    egap = 0.15 if E <= 6 else 0.08
    ew = (right - left - (E - 1) * egap) / E
    topk_top = (xs[2] + bw / 2, by + 0.42)
    centers = []
    for e in range(E):
        x = left + e * (ew + egap)
        centers.append(x + ew / 2)
        name = f"expert {e}" if ew >= 0.8 else (f"FFN {e}" if ew >= 0.5 else f"{e}")
        if e in chosen:
            c = expert_color(e)
            _box(ax, x, ey0, ew, eh, name, fc=_tint(c, 0.55), ec=c, lw=1.8)
            _arrow(ax, topk_top, (x + ew / 2, ey0), color=c, lw=1.4)
        else:
            _box(ax, x, ey0, ew, eh, name, fc="#F7F7F8", ec="#C5C8CC", color=GREY)
    if ew >= 0.8:
        _text(ax, left - 0.1, ey0 + eh + 0.14, "expert FFNs", ha="left", color=GREY)

    # weighted sum and residual
    sy, py, r = 4.2, 4.85, 0.17
    ax.add_patch(Circle((cx, sy), r, fc="white", ec=INK, lw=1.2, zorder=3))
    _text(ax, cx, sy, r"$\Sigma$", size=TITLE, zorder=4)
    _text(ax, cx - 0.3, sy + 0.02, r"weighted sum  $\Sigma_e\, g_e\,\mathrm{FFN}_e(h)$", ha="right")
    for j, e in enumerate(chosen):
        c = expert_color(e)
        start, end = (centers[e], ey0 + eh), (cx + (j - (k - 1) / 2) * 0.12, sy - r)
        _arrow(ax, start, end, color=c, lw=1.4)
        t = 0.45
        mx, my = start[0] + t * (end[0] - start[0]), start[1] + t * (end[1] - start[1])
        side = -1 if centers[e] < cx else 1
        _text(ax, mx + side * 0.1, my, rf"$\times\, g_{{{e}}}$", color=c, ha="left" if side > 0 else "right")

    ax.add_patch(Circle((cx, py), r, fc="white", ec=INK, lw=1.2, zorder=3))
    _text(ax, cx, py + 0.01, "+", size=TITLE, zorder=4)
    _arrow(ax, (cx, sy + r), (cx, py - r))
    # residual: from the branch point, left and up into the +
    ax.plot([cx, res_x, res_x], [branch_y, branch_y, py], color=GREY, lw=1.1, zorder=1)
    _arrow(ax, (res_x, py), (cx - r, py), color=GREY)
    _text(ax, res_x + 0.08, (branch_y + py) / 2 + 0.35, "residual", color=GREY, ha="left", rotation=90)
    _arrow(ax, (cx, py + r), (cx, 5.18))
    _text(ax, cx, 5.32, r"output $y$   [T, d]")

    if shared:
        sx, sw = right + 0.3, WIDTH - right - 0.4
        _box(ax, sx, ey0, sw, eh, "shared\nexpert", fc="white", ec=INK, ls="--", lw=1.2)
        scx = sx + sw / 2
        ax.plot([cx, scx], [branch_y, branch_y], color=INK, lw=1.0, ls="--", zorder=1)
        _arrow(ax, (scx, branch_y), (scx, ey0), ls="--", lw=1.0)
        _arrow(ax, (scx, ey0 + eh), (cx + r, sy), ls="--", lw=1.0, connection="angle,angleA=90,angleB=0,rad=0")
        _text(ax, scx - 0.08, ey0 - 0.16, "every token", color=GREY, ha="right")
        _text(ax, scx - 0.1, sy + 0.14, r"$\times\,1$", ha="right")
    return fig


# --- 2. the data path -------------------------------------------------------------------------------------

def _example_routing(T: int, E: int, k: int, seed: int):
    """Router logits, top-k experts (best first) and combine weights of a small random example."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(T, E))
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    idx = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    w = np.take_along_axis(probs, idx, 1)
    if k > 1:  # the book's default: renormalised weights for k >= 2, the raw probability for k = 1
        w = w / w.sum(1, keepdims=True)
    return logits, idx, w


def data_path(T: int = 6, d: int = 4, E: int = 3, k: int = 2, d_ff: int = 8, *, seed: int = 1) -> Figure:
    """The data path of the sort-based MoE layer, with tensor shapes and a small worked example.

    Top band: the tokens ``x`` ``[T, d]`` (one row per token, token id in the row), the router logits
    ``[T, E]`` (each token's top-k cells in its experts' colours), and the top-k result: ``expert_indices``
    ``[T, k]`` and ``combine_weights`` ``[T, k]``. Bottom band: sorting the ``T·k`` assignments by expert
    (stable, so tokens keep their order within an expert) and permuting the rows gives ``x_sorted``
    ``[T·k, d]``, rows coloured by expert, groups of ``tokens_per_expert`` rows; the grouped matmul runs one
    block per expert (``[n_e, d] @ [d, d_ff]``, activation, ``@ [d_ff, d]``); the output rows are
    unpermuted and each token's ``k`` rows summed with its combine weights, giving ``y`` ``[T, d]`` (each row
    drawn in its experts' colours, in proportion to the weights). The example routing is random
    (``seed``), with the book's weights: top-k softmax probabilities, renormalised when ``k >= 2``. The steps
    are those of :mod:`moe_ref.dispatch` (``sort_by_expert``, ``permute``, the experts, ``combine``).
    """
    if not (1 <= T <= 32 and 1 <= d and 1 <= E <= 8 and 1 <= k <= E and 1 <= d_ff):
        raise ValueError(f"need 1 <= T <= 32, d >= 1, 1 <= E <= 8, 1 <= k <= E, d_ff >= 1; got T={T}, d={d}, "
                         f"E={E}, k={k}, d_ff={d_ff}")
    logits, idx, w = _example_routing(T, E, k, seed)
    flat_expert = idx.reshape(-1)
    order = np.argsort(flat_expert, kind="stable")
    token_ids = order // k
    sorted_expert = flat_expert[order]
    counts = np.bincount(flat_expert, minlength=E)
    A = T * k

    rh = min(0.2, 2.6 / A)  # row height; token ids written when rows are tall enough
    rh1 = min(0.2, 1.6 / T)
    cw_d = min(0.2, 0.8 / d)  # width of one of the d columns
    cw_e = min(0.22, 0.9 / E)
    write = rh >= 0.17
    top_h, band1 = 0.5, T * rh1
    height = 0.45 + top_h + band1 + 1.2 + 0.45 + A * rh + 0.55
    fig, ax = _canvas(WIDTH, height)
    _text(ax, WIDTH / 2, height - 0.22,
          f"Data path of the MoE layer: T = {T}, d = {d}, E = {E}, k = {k}, " + r"$d_{ff}$" + f" = {d_ff}",
          size=TITLE)

    def rows(x0, y_top, n, w_cells, rh_, fill, text, ec="white"):
        for i in range(n):
            y = y_top - (i + 1) * rh_
            for c in range(w_cells[0]):
                _cell(ax, x0 + c * w_cells[1], y, w_cells[1], rh_, fc=fill(i, c), ec=ec)
            if text is not None and rh_ >= 0.17:
                _text(ax, x0 + w_cells[0] * w_cells[1] / 2, y + rh_ / 2, text(i), zorder=4)

    # ---- top band
    y1 = height - 0.45 - top_h  # top of the band's matrices
    x_x = 0.95
    wd = d * cw_d
    _label(ax, x_x + wd / 2, y1 + 0.08, "x", "[T, d]")
    rows(x_x, y1, T, (d, cw_d), rh1, lambda i, c: LIGHT, lambda i: f"t{i}")
    xa = x_x + wd + 0.12
    x_l = xa + 0.6
    _arrow(ax, (xa, y1 - band1 / 2), (x_l - 0.1, y1 - band1 / 2))
    _text(ax, (xa + x_l - 0.1) / 2, y1 - band1 / 2 + 0.16, r"$@\,W_g$")
    we = E * cw_e
    _label(ax, x_l + we / 2, y1 + 0.08, "logits", "[T, E]")
    top = set()
    for t in range(T):
        top.update((t, int(e)) for e in idx[t])

    def logit_fill(i, c):
        return _tint(expert_color(c), 0.25) if (i, c) in top else _tint(expert_color(c), 0.85)
    rows(x_l, y1, T, (E, cw_e), rh1, logit_fill, None)
    for e in range(E):
        _text(ax, x_l + (e + 0.5) * cw_e, y1 - band1 - 0.13, str(e), color=expert_color(e))
    _text(ax, x_l - 0.05, y1 - band1 - 0.13, "e", color=GREY, ha="right")
    xa = x_l + we + 0.12
    x_i = xa + 0.75
    _arrow(ax, (xa, y1 - band1 / 2), (x_i - 0.1, y1 - band1 / 2))
    _text(ax, (xa + x_i - 0.1) / 2, y1 - band1 / 2 + 0.16, "top-k")
    cw_i = 0.26
    _label(ax, x_i + k * cw_i / 2 + 0.05, y1 + 0.08, "expert_indices", "[T, k]")
    for t in range(T):
        for j in range(k):
            e = int(idx[t, j])
            _cell(ax, x_i + 0.05 + j * cw_i, y1 - (t + 1) * rh1, cw_i, rh1, str(e) if rh1 >= 0.17 else "",
                  fc=_tint(expert_color(e), 0.25), color="white")
    cw_w = 0.44
    x_w = x_i + 0.05 + k * cw_i / 2 + 1.35 - k * cw_w / 2
    _label(ax, x_w + k * cw_w / 2, y1 + 0.08, "combine_weights", "[T, k]")
    for t in range(T):
        for j in range(k):
            e = int(idx[t, j])
            _cell(ax, x_w + j * cw_w, y1 - (t + 1) * rh1, cw_w, rh1,
                  f"{w[t, j]:.2f}" if rh1 >= 0.17 else "", fc=_tint(expert_color(e), 0.7))

    # ---- permute: x's rows, in the order of the sorted expert_indices, down to x_sorted
    y2 = y1 - band1 - 1.2 - 0.45  # top of the bottom band's matrices
    _arrow(ax, (x_x + wd / 2, y1 - band1 - 0.06), (x_x + wd / 2, y2 + 0.5), color=INK)
    tx, ty = x_x + wd / 2 + 0.15, (y1 - band1 + y2 + 0.5) / 2 - 0.08
    label = _text(ax, tx, ty + 0.12, "sort by expert (stable), permute:", ha="left")
    _text(ax, tx, ty - 0.12, "x_sorted = x[token_ids]", ha="left", family="monospace")
    # expert_indices feeds the sort: a dashed arrow down, then left to the end of the label
    label_end = label.get_window_extent(fig.canvas.get_renderer()).transformed(ax.transData.inverted()).x1
    _arrow(ax, (x_i + 0.05 + k * cw_i / 2, y1 - band1 - 0.06), (label_end + 0.08, ty + 0.12),
           color=GREY, ls="--", lw=1.0, connection="angle,angleA=-90,angleB=0,rad=0")

    # ---- bottom band
    band2 = A * rh
    _label(ax, x_x + wd / 2, y2 + 0.08, "x_sorted", "[T·k, d]")
    rows(x_x, y2, A, (d, cw_d), rh, lambda i, c: _tint(expert_color(int(sorted_expert[i])), 0.55),
         lambda i: f"t{token_ids[i]}")
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    for e in range(E):
        if counts[e] == 0:
            continue
        yt, yb = y2 - starts[e] * rh, y2 - (starts[e] + counts[e]) * rh
        ax.plot([x_x - 0.06, x_x - 0.1, x_x - 0.1, x_x - 0.06], [yt - 0.02, yt - 0.02, yb + 0.02, yb + 0.02],
                color=expert_color(e), lw=1.3)
        _text(ax, x_x - 0.16, (yt + yb) / 2, f"$n_{e}$ = {counts[e]}", ha="right", color=expert_color(e))
    _text(ax, 0.1, y2 - band2 - 0.2, "tokens_per_expert = [" + ", ".join(str(int(c)) for c in counts) + "]",
          ha="left", va="center", family="monospace")

    xa = x_x + wd + 0.1
    x_g = xa + 0.4
    gw = 1.45
    _arrow(ax, (xa, y2 - band2 / 2), (x_g - 0.06, y2 - band2 / 2))
    _text(ax, x_g + gw / 2, y2 + 0.27, "grouped matmul", va="bottom")
    _text(ax, x_g + gw / 2, y2 + 0.08, r"$[n_e, d]\,@\,[d, d_{ff}]$ …", va="bottom", color=GREY)
    for e in range(E):
        if counts[e] == 0:
            continue
        yt = y2 - starts[e] * rh
        hgt = counts[e] * rh
        lab = f"[{counts[e]}, {d}] @ [{d}, {d_ff}]" if hgt >= 0.17 else ""
        _box(ax, x_g, yt - hgt + 0.02, gw, hgt - 0.04, lab, fc=_tint(expert_color(e), 0.8), ec=expert_color(e),
             lw=1.2, radius=0.05)
    xa = x_g + gw + 0.06
    x_ys = xa + 0.4
    _arrow(ax, (xa, y2 - band2 / 2), (x_ys - 0.1, y2 - band2 / 2))
    _label(ax, x_ys + wd / 2, y2 + 0.08, "y_sorted", "[T·k, d]")
    rows(x_ys, y2, A, (d, cw_d), rh, lambda i, c: _tint(expert_color(int(sorted_expert[i])), 0.35),
         lambda i: f"t{token_ids[i]}" if write else None)

    # unpermute + weighted combine: lines from each output row to its token
    x_y = WIDTH - 0.2 - wd
    yc = y2 - (band2 - T * rh1) / 2  # the T rows of y, centred on the band
    for i in range(A):
        t, e = int(token_ids[i]), int(sorted_expert[i])
        ax.plot([x_ys + wd + 0.03, x_y - 0.03], [y2 - (i + 0.5) * rh, yc - (t + 0.5) * rh1],
                color=expert_color(e), lw=1.0, alpha=0.8, zorder=1)
    _label(ax, x_y + wd / 2, y2 + 0.08, "y", "[T, d]")
    for t in range(T):
        x = x_y
        for j in range(k):  # the row split between the token's experts in proportion to their weights
            ww = wd * float(w[t, j] / w[t].sum())
            _cell(ax, x, yc - (t + 1) * rh1, ww, rh1, fc=_tint(expert_color(int(idx[t, j])), 0.45), ec="white")
            x += ww
        if rh1 >= 0.17:
            _text(ax, x_y + wd / 2, yc - (t + 0.5) * rh1, f"t{t}", zorder=4)
    _text(ax, (x_ys + wd + x_y) / 2, y2 - band2 - 0.2, "unpermute, weighted sum", va="center")
    _text(ax, WIDTH - 0.1, y2 - band2 - 0.45,
          r"$y_t = \Sigma_j\,$combine_weights$[t, j]\;\cdot$ row of $(t, j)$ in y_sorted", ha="right")
    return fig


# --- 3. capacity and drops --------------------------------------------------------------------------------

def capacity_drops(tokens_per_expert: tuple[int, ...] = (5, 2, 3, 2), capacity: int | None = 3, *,
                   capacity_factor: float | None = None) -> Figure:
    """Expert capacity: each expert's ``C`` slots, the assignments it keeps, and the ones it drops.

    One column of slots per expert, one cell per (token, expert) assignment routed to it, numbered in
    arrival (priority) order: the first ``C`` are kept (filled in the expert's colour), the rest are dropped
    (hatched red); slots below ``C`` that no assignment fills are empty padding (dashed outline). A line marks
    the capacity ``C = ceil(c_f · T·k / E)``; the title states ``C`` and the number dropped.

    Args:
        tokens_per_expert: assignments routed to each expert (their sum is ``T·k``).
        capacity: ``C``; ``None`` computes it from ``capacity_factor`` as ``ceil(c_f · T·k / E)``.
        capacity_factor: ``c_f``, used (and written in the formula) when given.
    """
    counts = [int(n) for n in tokens_per_expert]
    E, A = len(counts), sum(counts)
    if E == 0 or E > 12 or min(counts) < 0:
        raise ValueError(f"tokens_per_expert must hold 1 to 12 non-negative counts, got {tokens_per_expert}")
    formula = None
    if capacity_factor is not None:
        formula = math.ceil(capacity_factor * A / E)
        if capacity is not None and capacity != formula:
            raise ValueError(f"capacity={capacity} disagrees with ceil({capacity_factor} * {A} / {E}) = {formula}")
        capacity = formula
    if capacity is None or capacity < 0:
        raise ValueError("give a capacity >= 0, or a capacity_factor")
    C = int(capacity)
    dropped = sum(max(0, n - C) for n in counts)
    empty = sum(max(0, C - n) for n in counts)
    tallest = max(max(counts), C, 1)

    height = 3.3
    cell = min(0.36, 1.85 / tallest)
    base = 0.78
    fig, ax = _canvas(WIDTH, height)
    _text(ax, WIDTH / 2, height - 0.22, f"C = {C}, dropped = {dropped}", size=TITLE)
    sub = (f"c_f = {capacity_factor:g}: " if capacity_factor is not None else "") + \
        f"T·k = {A} assignments over E = {E} experts, {empty} empty slot{'s' if empty != 1 else ''}"
    _text(ax, WIDTH / 2, height - 0.47, sub, color=GREY)

    x0, x1 = 0.75, 4.05  # the columns' span; the legend goes to the right
    col_w = min(0.55, (x1 - x0) / E * 0.62)
    step = (x1 - x0) / E
    for e, n in enumerate(counts):
        xc = x0 + (e + 0.5) * step
        x = xc - col_w / 2
        c = expert_color(e)
        for s in range(max(n, C)):
            y = base + s * cell
            label = str(s + 1) if s < n and cell >= 0.2 else ""
            if s < min(n, C):
                _cell(ax, x, y, col_w, cell, label, fc=_tint(c, 0.3), ec="white", lw=1.2)
            elif s < n:
                _cell(ax, x, y, col_w, cell, fc=_tint(DROP, 0.85), ec=DROP, hatch="////", lw=1.0)
                if label:
                    ax.text(x + col_w / 2, y + cell / 2, label, ha="center", va="center", fontsize=FONT,
                            color=DROP, zorder=4, bbox=dict(boxstyle="round,pad=0.12", fc="white", ec="none"))
            else:
                ax.add_patch(Rectangle((x + 0.02, y + 0.02), col_w - 0.04, cell - 0.04, fc="white", ec=GREY,
                                       lw=0.9, ls=(0, (2, 2)), zorder=2))
        _text(ax, xc, base - 0.17, f"expert {e}" if step >= 0.8 else f"{e}", color=c)
        _text(ax, xc, base - 0.42, f"{n} routed" if step >= 0.8 else f"{n}", color=GREY)
    if step < 0.8:  # narrow columns: the row names once, on the left
        _text(ax, x0 - 0.1, base - 0.17, "expert", ha="right", color=GREY)
        _text(ax, x0 - 0.1, base - 0.42, "routed", ha="right", color=GREY)
    yC = base + C * cell
    ax.plot([x0 - 0.1, x1 + 0.05], [yC, yC], color=INK, lw=1.3, ls="--", zorder=5)
    _text(ax, x0 - 0.16, yC, f"C = {C}", ha="right")
    cap = r"$C = \lceil c_f \cdot T{\cdot}k\, /\, E\, \rceil$"
    handles = [Patch(fc=_tint(EXPERT_COLORS[0], 0.3), ec="white", label="kept"),
               Patch(fc=_tint(DROP, 0.85), ec=DROP, hatch="////", label="dropped"),
               Patch(fc="white", ec=GREY, ls=(0, (2, 2)), label="empty slot (padding)")]
    leg = ax.legend(handles=handles, loc="upper left", bbox_to_anchor=((x1 + 0.2) / WIDTH, (base + 1.9) / height),
                    fontsize=FONT, frameon=False, handlelength=1.6, handleheight=1.2, borderaxespad=0)
    for t in leg.get_texts():
        t.set_color(INK)
    _text(ax, x1 + 0.25, base + 0.5, cap, ha="left")
    _text(ax, x1 + 0.25, base + 0.2, "cell number:", ha="left", color=GREY)
    _text(ax, x1 + 0.25, base - 0.02, "arrival (priority) order", ha="left", color=GREY)
    return fig


# --- 4. the grouped-GEMM tile schedule --------------------------------------------------------------------

class GemmTile(NamedTuple):
    """One row tile of the schedule of ``_gmm_kernel`` (:mod:`moe_ref.kernels.triton_gmm`)."""

    tile_m: int  #: row-tile index (``pid // n_col_tiles`` in the kernel)
    expert: int  #: the group (expert) that owns it
    row_start: int  #: its first row in the sorted rows
    rows: int  #: rows it computes, ``<= BLOCK_M``; the other ``BLOCK_M - rows`` are masked


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def gemm_launch_row_tiles(group_sizes, block_m: int) -> int:
    """The row tiles ``_launch_fwd`` launches: the upper bound ``ceil(M / BLOCK_M) + E``."""
    return _cdiv(sum(int(n) for n in group_sizes), block_m) + len(group_sizes)


def gemm_row_tiles(group_sizes, block_m: int) -> list[GemmTile]:
    """The row tiles of the grouped matmul, in program order, computed as ``_gmm_kernel`` computes them.

    The kernel's device-side schedule, step by step: row tiles per expert ``tiles = cdiv(ends - starts,
    BLOCK_M)``, their inclusive ``cum = cumsum(tiles)``; a program with row-tile index ``tile_m >=
    sum(tiles)`` returns at once; otherwise its expert is ``sum(cum <= tile_m)``, its first tile
    ``cum[expert] - tiles[expert]``, and its rows start at ``starts[expert] + (tile_m - first_tile) *
    BLOCK_M``, masked at the expert's end.
    """
    sizes = np.array([int(n) for n in group_sizes], dtype=np.int64)
    if block_m < 1 or (sizes < 0).any():
        raise ValueError(f"need block_m >= 1 and non-negative group sizes, got {block_m}, {tuple(group_sizes)}")
    ends = np.cumsum(sizes)  # the kernel's ``offsets``
    starts = ends - sizes
    tiles = -(-(ends - starts) // block_m)
    cum = np.cumsum(tiles)
    out = []
    for tile_m in range(gemm_launch_row_tiles(sizes, block_m)):
        if tile_m >= tiles.sum():
            break  # this program and every later one has no tile
        expert = int((cum <= tile_m).sum())
        first_tile = int(cum[expert] - tiles[expert])
        row_start = int(starts[expert] + (tile_m - first_tile) * block_m)
        out.append(GemmTile(tile_m, expert, row_start, int(min(block_m, ends[expert] - row_start))))
    return out


def gemm_tile_schedule(group_sizes: tuple[int, ...] = (70, 20, 0, 45), block_m: int = 32, block_n: int = 64,
                       n: int = 128, *, output_grid: bool = True) -> Figure:
    """The tile schedule of the Triton grouped matmul, ``_gmm_kernel`` of :mod:`moe_ref.kernels.triton_gmm`.

    Left panel: the sorted rows ``[M, K]``, cut into groups (one per expert, ``group_sizes`` rows, their ends
    being the kernel's ``offsets``); each group is tiled on its own into ``ceil(n_e / BLOCK_M)`` row tiles,
    numbered ``tile_m`` in the order the kernel assigns them (expert 0's first); the rows of a group's last
    tile past the group's end are masked (hatched), and an empty group gets no tile. Right panel
    (``output_grid``): the launch grid, ``ceil(M / BLOCK_M) + E`` row tiles (the host's upper bound) times
    ``ceil(N / BLOCK_N)`` column tiles, with each program's id ``pid = tile_m * n_col_tiles + tile_n``;
    programs past the last row tile return at once.

    It mirrors ``_gmm_kernel``'s device-side schedule (``tiles = cdiv(ends - starts, BLOCK_M)``, ``cum =
    cumsum(tiles)``, ``expert = sum(cum <= tile_m)``) and ``_launch_fwd``'s grid; :func:`gemm_row_tiles`
    computes the same schedule in Python.

    Args:
        group_sizes: rows per expert, ``n_e`` (zeros allowed).
        block_m: ``BLOCK_M``, rows per tile.
        block_n: ``BLOCK_N``, columns per tile (right panel).
        n: ``N``, output columns (right panel).
        output_grid: draw the right panel.
    """
    sizes = [int(s) for s in group_sizes]
    tiles = gemm_row_tiles(sizes, block_m)
    if not tiles:
        raise ValueError("group_sizes has no rows")
    E, M = len(sizes), sum(sizes)
    launch_m = gemm_launch_row_tiles(sizes, block_m)
    n_col = _cdiv(n, block_n)
    ends = np.cumsum(sizes)
    starts = ends - np.array(sizes)

    height = 4.9
    top, bottom = height - 0.85, 1.05  # the panels' drawing span
    groups = f"groups ({', '.join(map(str, sizes))}) → {len(tiles)} row tile{'s' * (len(tiles) > 1)}"
    title = f"_gmm_kernel schedule: BLOCK_M = {block_m}, {groups}"
    if not output_grid or len(title) > 75:
        top -= 0.15  # room for a two-line title
    empty_gap, gap = 0.32, 0.1
    n_empty = sum(1 for s in sizes if s == 0)
    n_groups = E - n_empty
    s = (top - bottom - n_empty * empty_gap - (n_groups - 1) * gap) / (len(tiles) * block_m)  # inches per row
    fig, ax = _canvas(WIDTH if output_grid else 3.7, height)
    W = WIDTH if output_grid else 3.7
    if output_grid and len(title) <= 75:
        _text(ax, W / 2, height - 0.22, title, size=TITLE)
    else:  # two lines
        _text(ax, W / 2, height - 0.2, f"_gmm_kernel schedule: BLOCK_M = {block_m}", size=TITLE)
        _text(ax, W / 2, height - 0.42, groups, size=TITLE)

    # left panel: rows bar, connectors, tiles, group labels
    bar_x, bar_w = 0.5, 0.25
    tile_x, tile_w = 1.15, 0.8
    _text(ax, bar_x + bar_w / 2, top + 0.12, "rows", va="bottom")
    _text(ax, tile_x + tile_w / 2, top + 0.12, "row tiles (tile_m)", va="bottom")
    rows_top = top  # the rows bar, from the top, on the tiles' scale
    y_tile = top
    labelled, label_ys = set(), []  # row offsets written beside the bar, and where
    for e in range(E):
        c = expert_color(e)
        ry0 = rows_top - starts[e] * s
        ry1 = rows_top - ends[e] * s
        if sizes[e]:
            ax.add_patch(Rectangle((bar_x, ry1), bar_w, ry0 - ry1, fc=_tint(c, 0.35), ec="white", lw=1.0))
        for b, yy in ((int(starts[e]), ry0), (int(ends[e]), ry1)):
            if b not in labelled and (not label_ys or min(abs(yy - v) for v in label_ys) >= 0.18):
                labelled.add(b)
                label_ys.append(yy)
                _text(ax, bar_x - 0.06, yy, str(b), ha="right", color=GREY)
        g_tiles = [t for t in tiles if t.expert == e]
        if not g_tiles:
            yl = y_tile - empty_gap / 2 + gap / 2
            ax.plot([tile_x, tile_x + tile_w], [yl, yl], color=c, lw=1.2, ls=(0, (2, 2)))
            ax.plot([bar_x + bar_w, tile_x], [ry0, yl], color=c, lw=0.8, ls=(0, (2, 2)))
            _text(ax, tile_x + tile_w + 0.12, yl, f"expert {e}: 0 rows, no tile", ha="left", color=c)
            y_tile -= empty_gap
            continue
        g_top = y_tile
        for t in g_tiles:
            valid_h, full_h = t.rows * s, block_m * s
            ax.add_patch(Rectangle((tile_x, y_tile - valid_h), tile_w, valid_h, fc=_tint(c, 0.35), ec="none"))
            if t.rows < block_m:
                ax.add_patch(Rectangle((tile_x, y_tile - full_h), tile_w, full_h - valid_h, fc="white", ec=GREY,
                                       hatch="////", lw=0.0))
            _box(ax, tile_x, y_tile - full_h, tile_w, full_h, fc="none", ec=INK, lw=1.0, radius=0.03)
            if full_h >= 0.19:
                ax.text(tile_x + tile_w / 2, y_tile - max(valid_h, 0.2) / 2, f"tile {t.tile_m}", ha="center",
                        va="center", fontsize=FONT, color=INK, zorder=5,
                        bbox=dict(boxstyle="round,pad=0.1", fc="white", ec="none", alpha=0.85))
            y_tile -= full_h
        g_bot = y_tile
        ax.add_patch(Polygon([(bar_x + bar_w, ry0), (tile_x, g_top), (tile_x, g_bot), (bar_x + bar_w, ry1)],
                             closed=True, fc=_tint(c, 0.85), ec="none", zorder=0))
        plural = "s" * (len(g_tiles) > 1)
        lines = f"expert {e}: {sizes[e]} rows\n⌈{sizes[e]}/{block_m}⌉ = {len(g_tiles)} tile{plural}"
        _text(ax, tile_x + tile_w + 0.12, (g_top + g_bot) / 2, lines, ha="left", color=c, linespacing=1.3)
        y_tile -= gap

    if output_grid:
        gx0 = 4.25
        cols = list(range(n_col)) if n_col <= 4 else [0, 1, None, n_col - 1]
        cell_w = min(0.55, 1.5 / len(cols))
        gy = top - 0.42  # the grid's top
        cell_h = min(0.3, (gy - bottom) / launch_m)
        gx1 = gx0 + len(cols) * cell_w
        _text(ax, (gx0 + gx1) / 2, top + 0.12, "launch grid: program ids", va="bottom")
        _text(ax, (gx0 + gx1) / 2, top - 0.02, "tile_n", va="top", color=GREY)
        for j, tn in enumerate(cols):
            _text(ax, gx0 + (j + 0.5) * cell_w, gy + 0.04, "…" if tn is None else str(tn), va="bottom", color=GREY)
        _text(ax, gx0 - 0.42, gy - launch_m * cell_h / 2, "tile_m", rotation=90, color=GREY)
        by_m = {t.tile_m: t for t in tiles}
        for tm in range(launch_m):
            y = gy - (tm + 1) * cell_h
            t = by_m.get(tm)
            _text(ax, gx0 - 0.1, y + cell_h / 2, str(tm), ha="right", color=GREY)
            for j, tn in enumerate(cols):
                x = gx0 + j * cell_w
                if t is None:
                    fc, color = LIGHT, GREY
                else:
                    fc, color = _tint(expert_color(t.expert), 0.55), INK
                label = "…" if tn is None else str(tm * n_col + tn)
                _cell(ax, x, y, cell_w, cell_h, label if cell_h >= 0.18 else "", fc=fc, ec="white", lw=1.2,
                      color=color)
        if launch_m > len(tiles):
            ya, yb = gy - len(tiles) * cell_h - 0.02, gy - launch_m * cell_h + 0.02
            ax.plot([gx1 + 0.06, gx1 + 0.1, gx1 + 0.1, gx1 + 0.06], [ya, ya, yb, yb], color=GREY, lw=1.0)
            _text(ax, gx1 + 0.16, (ya + yb) / 2, "no tile:\nreturn", ha="left", color=GREY, linespacing=1.3)
        gb = gy - launch_m * cell_h
        tx = gx0 - 0.62
        _text(ax, tx, gb - 0.12, f"row tiles launched: ⌈{M}/{block_m}⌉ + {E} = {launch_m}", ha="left", va="top")
        _text(ax, tx, gb - 0.36, f"N = {n}, BLOCK_N = {block_n}: n_col = {n_col}", ha="left", va="top")
        _text(ax, tx, gb - 0.6, r"pid = tile_m $\cdot$ n_col + tile_n", ha="left", va="top")
    handles = [Patch(fc=_tint(EXPERT_COLORS[0], 0.35), ec="none", label="rows computed"),
               Patch(fc="white", ec=GREY, hatch="////", label="masked rows")]
    ax.legend(handles=handles, loc="lower left", bbox_to_anchor=(0.05 / W, 0.05 / height), ncol=2,
              fontsize=FONT, frameon=False, handlelength=1.6, handleheight=1.1, borderaxespad=0, columnspacing=1.2)
    return fig


# --- 5. ways to cut the same hidden units ------------------------------------------------------------------

#: The rows of :func:`expert_cuts`: label, routed experts, width of each, experts per token, shared experts.
CUTS = (("dense FFN", 1, 256, 1, 0),
        ("dense, params of E=8", 1, 1024, 1, 0),
        ("top-2 of 8", 8, 128, 2, 0),
        ("top-1 of 4 (Switch)", 4, 256, 1, 0),
        ("top-8 of 32 (fine)", 32, 32, 8, 0),
        ("1 shared + top-7 of 31", 31, 32, 7, 1))


def expert_cuts(rows: tuple = CUTS, *, seed: int = 3) -> Figure:
    """Hidden units of one FFN slot cut into experts, and those one token passes through.

    Each row is ``(label, num_experts, expert_width, k, shared)``: a bar whose length is proportional to the
    slot's hidden units, cut into its experts; the ``k`` experts one token is routed to (drawn at random with
    ``seed``) are filled in their colours, the others pale, a shared expert in grey. On the right, the token's
    active hidden units over the slot's total: rows with the same active number cost the same FLOPs.
    """
    if not rows:
        raise ValueError("rows must not be empty")
    for row in rows:
        if len(row) != 5 or not all(isinstance(v, int) and v >= 0 for v in row[1:]) or row[1] < 1 \
                or row[2] < 1 or not 1 <= row[3] <= row[1]:
            raise ValueError(f"each row must be (label, num_experts >= 1, expert_width >= 1, "
                             f"1 <= k <= num_experts, shared >= 0), got {row!r}")
    rng = np.random.default_rng(seed)
    most = max((n + shared) * w for _, n, w, _, shared in rows)
    label_w, right_w, row_h, gap = 1.95, 0.95, 0.26, 0.16
    bar_w = WIDTH - label_w - right_w - 0.1
    height = 0.45 + len(rows) * (row_h + gap)
    fig, ax = _canvas(WIDTH, height)
    _text(ax, label_w + bar_w / 2, height - 0.2, "hidden units of one FFN slot", size=FONT, color=GREY)
    _text(ax, label_w + bar_w + 0.1 + right_w / 2, height - 0.2, "active / total", size=FONT, color=GREY)
    unit = bar_w / most
    for r, (label, n, w, k, shared) in enumerate(rows):
        y = height - 0.45 - (r + 1) * (row_h + gap) + gap
        _text(ax, label_w - 0.08, y + row_h / 2, label, ha="right")
        x = label_w
        for _ in range(shared):
            _cell(ax, x, y, w * unit, row_h, fc=GREY, ec="white", lw=0.6)
            x += w * unit
        chosen = set(rng.choice(n, size=k, replace=False).tolist()) if n > 1 else {0}
        for e in range(n):
            color = INK if n == 1 else expert_color(e)
            fill = _tint(color, 0.35 if n == 1 else 0.0) if e in chosen else _tint(color, 0.82)
            _cell(ax, x, y, w * unit, row_h, fc=fill, ec="white", lw=0.6 if n > 8 else 1.0)
            x += w * unit
        _text(ax, label_w + bar_w + 0.1 + right_w / 2, y + row_h / 2,
              f"{(k + shared) * w} / {(n + shared) * w}")
    return fig


# --- 6. expert parallelism: dispatch and combine across ranks -----------------------------------------------

def expert_parallel_plan(expert_indices, world_size: int, num_experts: int) -> dict:
    """Where every (token, expert) row goes in the expert-parallel layer of chapter 9, in Python.

    Rank ``r`` holds tokens ``r * T ... (r + 1) * T - 1`` and experts ``r * E/W ... (r + 1) * E/W - 1``.

    Args:
        expert_indices: ``[W * T, k]`` integers, each token's experts.
        world_size: ``W``, dividing the tokens and ``num_experts``.
        num_experts: ``E``.

    Returns:
        ``x_sorted``: per rank, its ``(token, expert)`` rows sorted by expert (stably, so tokens keep their
        order within an expert); they are also grouped by the rank they go to. ``send_counts``: ``[W][W][E/W]``
        rows rank ``r`` sends to each local expert of rank ``s``. ``x_recv``: per rank ``s``, the
        ``(source rank, token, expert)`` rows it receives, source-major (the all-to-all's order).
        ``expert_major``: the same rows reordered by local expert for the grouped matmul.
    """
    idx = np.asarray(expert_indices)
    W, E = int(world_size), int(num_experts)
    if idx.ndim != 2 or W < 1 or idx.shape[0] % W or E % W or idx.size and not 0 <= idx.min() <= idx.max() < E:
        raise ValueError(f"need [W * T, k] expert indices in [0, E) with W dividing the tokens and E; got shape "
                         f"{idx.shape}, W={world_size}, E={num_experts}")
    T, per = idx.shape[0] // W, E // W
    x_sorted = [sorted(((t, int(e)) for t in range(r * T, (r + 1) * T) for e in idx[t]), key=lambda p: p[1])
                for r in range(W)]
    send = [[[sum(1 for _, e in x_sorted[r] if e == s * per + j) for j in range(per)] for s in range(W)]
            for r in range(W)]
    x_recv = [[(r, t, e) for r in range(W) for t, e in x_sorted[r] if e // per == s] for s in range(W)]
    expert_major = [sorted(rows, key=lambda row: row[2]) for rows in x_recv]
    return {"x_sorted": x_sorted, "send_counts": send, "x_recv": x_recv, "expert_major": expert_major}


def expert_parallel(world_size: int = 2, num_experts: int = 4, k: int = 2, tokens_per_rank: int = 3, *,
                    seed: int = 5) -> Figure:
    """Expert parallelism: one MoE layer's dispatch and combine across ``W`` ranks (chapter 9).

    One lane per rank (a device), holding ``T = tokens_per_rank`` tokens and ``E / W`` experts; the data flows
    left to right through the five steps of :class:`~moe_ref.expert_parallel.ExpertParallelMoE`:

    1. **sort**: each token's ``k`` rows (a line from its row of ``x`` per expert, in the expert's colour)
       sorted by expert, ``x_sorted``, which groups them by the rank they go to;
    2. **counts**: the ranks exchange their ``[W, E/W]`` row counts (dashed arrows between lanes);
    3. **dispatch**: an all-to-all sends each group of rows to its rank (solid arrows cross ranks, dashed ones
       stay), where they arrive source-major, ``x_recv``;
    4. **experts**: rows reordered by local expert, one grouped matmul per rank;
    5. **combine**: a second all-to-all brings every output row home (``y_sorted``, in ``x_sorted``'s order),
       and each token sums its rows with its combine weights into ``y`` (each row of ``y`` split in its
       experts' colours in proportion to the weights).

    The routing is a small random example (``seed``) with the book's top-k softmax weights. Every token
    label ``t<i>`` appears once in ``x`` and ``y`` and ``k`` times in each of ``x_sorted``, ``x_recv`` and
    ``y_sorted``.

    Args:
        world_size: ``W``, 2 or 3 ranks.
        num_experts: ``E``, divisible by ``W``, at most 8.
        k: experts per token, ``1 <= k <= E``.
        tokens_per_rank: ``T``, with ``W * T <= 10`` and ``T * k <= 8``.
        seed: the random example routing (the default gives uneven splits in both directions).
    """
    W, E, T = int(world_size), int(num_experts), int(tokens_per_rank)
    if not (W in (2, 3) and 1 <= E <= 8 and E % W == 0 and 1 <= k <= E and T >= 1 and W * T <= 10
            and T * k <= 8):
        raise ValueError(f"need W in (2, 3), E <= 8 divisible by W, 1 <= k <= E, T >= 1, W * T <= 10 and "
                         f"T * k <= 8; got W={world_size}, E={num_experts}, k={k}, T={tokens_per_rank}")
    _, idx, w = _example_routing(W * T, E, k, seed)
    plan = expert_parallel_plan(idx, W, E)
    per = E // W
    cw, ch, g = 0.3, 0.2, 0.07  # cell width and height, gap between groups of rows
    bw = 0.5  # width of an expert's box
    # the columns' left edges, inches: x, x_sorted, x_recv, experts, y_sorted, y
    cols = {"x": 0.25}
    cols["x_sorted"] = cols["x"] + cw + 0.5
    cols["x_recv"] = cols["x_sorted"] + cw + 0.95
    cols["experts"] = cols["x_recv"] + cw + 0.4
    cols["y_sorted"] = cols["experts"] + bw + 1.2
    cols["y"] = cols["y_sorted"] + cw + 0.7
    right = cols["y"] + cw + 0.2

    def column_height(n_rows, n_groups):
        return n_rows * ch + max(n_groups - 1, 0) * g

    lane_rows = [max(column_height(T * k, W), column_height(len(plan["x_recv"][r]), W),
                     column_height(len(plan["x_recv"][r]) + sum(1 for j in range(per) if not any(
                         e == r * per + j for _, _, e in plan["x_recv"][r])), per))
                 for r in range(W)]
    head, lane_pad, lane_gap, legend = 1.0, 0.34, 0.5, 0.55
    height = head + sum(h + lane_pad + 0.12 for h in lane_rows) + (W - 1) * lane_gap + legend
    fig, ax = _canvas(WIDTH, height)
    _text(ax, WIDTH / 2, height - 0.22, f"Expert parallelism: W = {W} ranks, E = {E} experts, k = {k}",
          size=TITLE)

    # header: the steps over the gaps where they happen, the tensors over their columns
    y_step, y_name = height - 0.55, height - 0.82
    steps = [("1", "sort", (cols["x"] + cw + cols["x_sorted"]) / 2),
             ("3", "dispatch", (cols["x_sorted"] + cw + cols["x_recv"]) / 2),
             ("4", "experts", cols["experts"] + bw / 2),
             ("5", "combine", (cols["experts"] + bw + cols["y_sorted"]) / 2 + 0.1)]
    for number, name, xc in steps:  # a numbered disc, then the name; the pair centred on xc
        half = (0.24 + 0.085 * len(name)) / 2
        ax.add_patch(Circle((xc - half + 0.1, y_step), 0.1, fc=INK, ec="none", zorder=3))
        _text(ax, xc - half + 0.1, y_step, number, color="white", weight="bold", zorder=4)
        _text(ax, xc - half + 0.25, y_step, name, weight="bold", ha="left")
    for name in ("x", "x_sorted", "x_recv", "y_sorted", "y"):
        _text(ax, cols[name] + cw / 2, y_name, name, family="monospace")

    # lanes, top to bottom; every row's vertical centre, by column, for the lines between columns
    tops, centres = [], {name: [] for name in ("x", "x_sorted", "x_recv", "experts", "y_sorted")}
    top = height - head
    for r in range(W):
        bottom = top - lane_pad - lane_rows[r] - 0.12
        ax.add_patch(FancyBboxPatch((0.1, bottom), right - 0.1, top - bottom, boxstyle="round,pad=0,rounding_size=0.08",
                                    fc=LIGHT, ec="none", zorder=0))
        _text(ax, 0.2, top - 0.15, f"rank {r}", ha="left", weight="bold")
        _text(ax, 0.75, top - 0.15, f"holds experts {r * per}–{(r + 1) * per - 1}" if per > 1 else
              f"holds expert {r}", ha="left", color=GREY)
        tops.append(top - lane_pad)
        top = bottom - lane_gap

    def row_top(r, i, group):
        return tops[r] - i * ch - group * g

    for r in range(W):
        # x: the rank's tokens, not yet routed
        cx = {}
        for i, t in enumerate(range(r * T, (r + 1) * T)):
            y0 = row_top(r, i, 0) - ch
            _cell(ax, cols["x"], y0, cw, ch, f"t{t}", fc="white", ec=LIGHT)
            cx[t] = y0 + ch / 2
        centres["x"].append(cx)
        # x_sorted: by expert, so grouped by destination rank
        rows = []
        for i, (t, e) in enumerate(plan["x_sorted"][r]):
            y0 = row_top(r, i, e // per) - ch
            _cell(ax, cols["x_sorted"], y0, cw, ch, f"t{t}", fc=_tint(expert_color(e), 0.45), ec="white")
            rows.append(y0 + ch / 2)
            ax.plot([cols["x"] + cw + 0.03, cols["x_sorted"] - 0.03], [cx[t], y0 + ch / 2], color=expert_color(e),
                    lw=0.9, zorder=1)
        centres["x_sorted"].append(rows)
        # x_recv: source-major
        rows = []
        for i, (source, t, e) in enumerate(plan["x_recv"][r]):
            y0 = row_top(r, i, source) - ch
            _cell(ax, cols["x_recv"], y0, cw, ch, f"t{t}", fc=_tint(expert_color(e), 0.45), ec="white")
            rows.append(y0 + ch / 2)
        centres["x_recv"].append(rows)
        # experts: the received rows by local expert, one box per expert (a block of the grouped matmul)
        slots, i = {}, 0
        for j in range(per):
            e = r * per + j
            mine = [n for n, row in enumerate(plan["expert_major"][r]) if row[2] == e]
            y_top = row_top(r, i, j)
            if not mine:  # an expert that received nothing: an empty block
                _box(ax, cols["experts"], y_top - ch, bw, ch, f"e{e}: 0", fc="white", ec=GREY, ls="--", color=GREY,
                     radius=0.04)
                i += 1
                continue
            _box(ax, cols["experts"], y_top - len(mine) * ch, bw, len(mine) * ch, f"e{e}",
                 fc=_tint(expert_color(e), 0.3), ec=expert_color(e), color="white", weight="bold", radius=0.04)
            for n_row, n in enumerate(mine):
                slots[n] = y_top - (n_row + 0.5) * ch
            i += len(mine)
        centres["experts"].append([slots[n] for n in range(len(plan["expert_major"][r]))])
        # reorder lines: source-major -> expert-major
        order = {row: n for n, row in enumerate(plan["expert_major"][r])}  # rows are distinct (t, e) pairs
        for i_row, row in enumerate(plan["x_recv"][r]):
            ax.plot([cols["x_recv"] + cw + 0.03, cols["experts"] - 0.03],
                    [centres["x_recv"][r][i_row], slots[order[row]]], color=GREY, lw=0.8, zorder=1)
        # y_sorted: the outputs back home, in x_sorted's order; y: each token's weighted sum
        rows = []
        for i, (t, e) in enumerate(plan["x_sorted"][r]):
            y0 = row_top(r, i, e // per) - ch
            _cell(ax, cols["y_sorted"], y0, cw, ch, f"t{t}", fc=_tint(expert_color(e), 0.15), color="white",
                  ec="white")
            rows.append(y0 + ch / 2)
        centres["y_sorted"].append(rows)
        for i, t in enumerate(range(r * T, (r + 1) * T)):
            y0 = row_top(r, i, 0) - ch
            x0 = cols["y"]
            for j in range(k):
                part = cw * float(w[t, j] / w[t].sum())
                _cell(ax, x0, y0, part, ch, fc=_tint(expert_color(int(idx[t, j])), 0.45), ec="white")
                x0 += part
            _text(ax, cols["y"] + cw / 2, y0 + ch / 2, f"t{t}", zorder=4)
        for i, (t, e) in enumerate(plan["x_sorted"][r]):
            ax.plot([cols["y_sorted"] + cw + 0.03, cols["y"] - 0.03],
                    [centres["y_sorted"][r][i], centres["x"][r][t]], color=expert_color(e), lw=0.9, zorder=1)

    # dispatch: one arrow per (source, destination) group of rows
    for r in range(W):
        for s in range(W):
            src = [i for i, (_, e) in enumerate(plan["x_sorted"][r]) if e // per == s]
            dst = [i for i, (source, _, _) in enumerate(plan["x_recv"][s]) if source == r]
            if not src:
                continue
            y_from = sum(centres["x_sorted"][r][i] for i in src) / len(src)
            y_to = sum(centres["x_recv"][s][i] for i in dst) / len(dst)
            local = r == s
            _arrow(ax, (cols["x_sorted"] + cw + 0.04, y_from), (cols["x_recv"] - 0.05, y_to),
                   color=GREY if local else INK, lw=1.0 if local else 1.4, ls="--" if local else "-", zorder=3)
    # combine: every output row back to its home rank, at its place in y_sorted
    for s in range(W):
        for n, (source, t, e) in enumerate(plan["expert_major"][s]):
            i = next(i for i, row in enumerate(plan["x_sorted"][source]) if row == (t, e))
            local = source == s
            ax.plot([cols["experts"] + bw + 0.03, cols["y_sorted"] - 0.03],
                    [centres["experts"][s][n], centres["y_sorted"][source][i]], color=expert_color(e),
                    lw=0.9 if local else 1.3, ls="--" if local else "-", zorder=2)
    # counts: the [W, E/W] row counts, exchanged between every pair of ranks before the dispatch
    xc = cols["x_sorted"] + cw / 2
    for r in range(W - 1):
        lower = min(row_top(r, 0, 0) - lane_rows[r], tops[r] - lane_rows[r]) - 0.12
        upper = tops[r + 1] + lane_pad
        y_hi, y_lo = lower - 0.02, upper + 0.02
        _arrow(ax, (xc, y_hi), (xc, y_lo), color=INK, lw=1.1, ls=(0, (3, 2)), style="<|-|>", zorder=3)
        y_mid = (y_hi + y_lo) / 2
        ax.add_patch(Circle((cols["x"] - 0.03, y_mid + 0.1), 0.1, fc=INK, ec="none", zorder=3))
        _text(ax, cols["x"] - 0.03, y_mid + 0.1, "2", color="white", weight="bold", zorder=4)
        _text(ax, cols["x"] + 0.12, y_mid + 0.1, "counts", ha="left", weight="bold")
        _text(ax, cols["x"] + 0.12, y_mid - 0.1, "[W, E/W]", ha="left", color=GREY, family="monospace")

    # legend
    y_leg = 0.28
    x = 0.2
    for e in range(E):
        _cell(ax, x, y_leg - 0.09, 0.18, 0.18, fc=_tint(expert_color(e), 0.45), ec="white")
        x += 0.2
    _text(ax, x + 0.02, y_leg, "experts", ha="left", color=GREY)
    x += 0.75
    _arrow(ax, (x, y_leg), (x + 0.4, y_leg), color=INK, lw=1.4)
    _text(ax, x + 0.47, y_leg, "to another rank", ha="left")
    x += 1.75
    _arrow(ax, (x, y_leg), (x + 0.4, y_leg), color=GREY, lw=1.0, ls="--")
    _text(ax, x + 0.47, y_leg, "stays on its rank", ha="left")
    return fig


# --- all of them ------------------------------------------------------------------------------------------

#: Every diagram with its default arguments, by file name.
DIAGRAMS = {
    "moe_block": moe_block,
    "moe_block_shared": lambda: moe_block(shared=True),
    "data_path": data_path,
    "capacity_drops": capacity_drops,
    "gemm_tile_schedule": gemm_tile_schedule,
    "expert_cuts": expert_cuts,
    "expert_parallel": expert_parallel,
}


def save_all(directory, *, fmt: str = "svg", dpi: int = 100) -> list[Path]:
    """Write every diagram (default arguments) to ``directory`` as ``<name>.<fmt>`` (SVG by default).

    Returns the paths written.
    """
    import matplotlib.pyplot as plt

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, draw in DIAGRAMS.items():
        fig = draw()
        path = out / f"{name}.{fmt}"
        fig.savefig(path, format=fmt, dpi=dpi)
        plt.close(fig)
        paths.append(path)
    return paths
