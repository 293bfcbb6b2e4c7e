"""Shared pieces of the book's diagrams: one palette, boxes, arrows and a label fitter (``dsv3lib.viz``)."""

from __future__ import annotations

from dataclasses import dataclass

import matplotlib.colors as mcolors
import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

__all__ = ["PALETTE", "Box", "box", "arrow", "canvas", "tint", "n", "fit_labels"]

# One meaning per colour across every figure of the book.
PALETTE = {
    "attention": "#3b6fb0",  # MLA, attention compute
    "moe": "#3a8f47",        # router, experts, MLP compute
    "fp8": "#e07b22",        # FP8 (E4M3) tensors and GEMMs
    "comm": "#8159b8",       # all-to-all, pipeline sends
    "norm": "#6f6f6f",       # RMSNorm, residual adds, plain tensors
    "embed": "#a8862a",      # embedding, output head
    "fp32": "#a0522d",       # FP32 master weights, accumulators
    "bf16": "#4a9a9a",       # BF16 tensors
    "cache": "#c0392b",      # what the KV cache holds
    "exposed": "#d62728",    # communication nobody hides
}

FONT = 10  # default text size in points (>= 9 everywhere)


def tint(colour: str, amount: float = 0.78) -> tuple:
    """``colour`` mixed with ``amount`` of white: the fill of a box whose edge is ``colour``."""
    r, g, b = mcolors.to_rgb(colour)
    return (r + (1 - r) * amount, g + (1 - g) * amount, b + (1 - b) * amount)


def n(x: int) -> str:
    """An integer with thousands separators: 7168 -> '7,168'."""
    return f"{x:,}"


@dataclass
class Box:
    """A drawn box: centre (x, y), width w, height h in data units, and its patch."""

    x: float
    y: float
    w: float
    h: float
    patch: object = None
    label: object = None

    @property
    def top(self):
        return (self.x, self.y + self.h / 2)

    @property
    def bottom(self):
        return (self.x, self.y - self.h / 2)

    @property
    def left(self):
        return (self.x - self.w / 2, self.y)

    @property
    def right(self):
        return (self.x + self.w / 2, self.y)


def canvas(ax, figsize, xlim, ylim):
    """``(fig, ax)``: the given axes (or a new figure of ``figsize``) with these limits and no frame."""
    if ax is None:
        fig, ax = plt.subplots(figsize=figsize)
        fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.35 / figsize[1])  # room for a title
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    ax.set_axis_off()
    return ax.figure, ax


def box(ax, x, y, w, h, text, kind="norm", *, fs=FONT, dashed=False, fill=True, weight="normal",
        text_colour="black", lw=1.3, zorder=2) -> Box:
    """A rounded box centred at (x, y) in ``PALETTE[kind]``, with ``text`` centred in it."""
    colour = PALETTE[kind]
    patch = FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0,rounding_size=0.12",
                           facecolor=tint(colour) if fill else "none", edgecolor=colour, linewidth=lw,
                           linestyle="--" if dashed else "-", zorder=zorder)
    ax.add_patch(patch)
    label = None
    if text:
        label = ax.text(x, y, text, ha="center", va="center", fontsize=fs, fontweight=weight,
                        color=text_colour, zorder=zorder + 1)
    return Box(x, y, w, h, patch, label)


def arrow(ax, start, end, kind="norm", *, text=None, text_at=0.5, offset=(0, 0), fs=9, ha="center",
          va="center", style="-|>", connection="arc3", lw=1.3, dashed=False, zorder=1):
    """A ``FancyArrowPatch`` from ``start`` to ``end``, optionally labelled at ``text_at`` of the way
    (shifted by ``offset`` in data units). Returns the label (or None)."""
    colour = PALETTE[kind]
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle=style, mutation_scale=12, color=colour, lw=lw,
                                 shrinkA=0, shrinkB=0, connectionstyle=connection,
                                 linestyle="--" if dashed else "-", zorder=zorder))
    if text is None:
        return None
    tx = start[0] + (end[0] - start[0]) * text_at + offset[0]
    ty = start[1] + (end[1] - start[1]) * text_at + offset[1]
    return ax.text(tx, ty, text, ha=ha, va=va, fontsize=fs, color="black", zorder=zorder + 3)


def _renderer(fig):
    get = getattr(fig.canvas, "get_renderer", None)
    return get() if get is not None else fig._get_renderer()


def fit_labels(fig, items, pad_px: float = 2.0) -> None:
    """Give each box the longest of its candidate labels that fits inside it (none if none fits).

    ``items``: ``(text_artist, patch, [candidate strings, longest first])``. Measured in pixels after the
    figure is laid out, so call it last.
    """
    renderer = _renderer(fig)
    for text, patch, candidates in items:
        space = patch.get_window_extent(renderer)
        for cand in [*candidates, ""]:
            text.set_text(cand)
            ext = text.get_window_extent(renderer)
            if not cand or (ext.width + pad_px <= space.width and ext.height + pad_px <= space.height):
                break
