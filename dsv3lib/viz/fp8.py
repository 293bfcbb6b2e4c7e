"""The FP8 Linear's three GEMMs and where each tensor is quantised (chapter 1; V3 §3.3, Fig. 6-7).

Drawn to be read beside :mod:`dsv3lib.fp8.linear`: activations and output gradients are quantised to E4M3
in 1×128 tiles (per token, per 128 channels), weights in 128×128 blocks; every GEMM multiplies FP8
operands and accumulates in FP32; Wgrad needs the tiles along the token axis (128×1), so its operands are
re-tiled (dequantise, transpose, requantise; V3 §3.5.2).
"""

from __future__ import annotations

from matplotlib.patches import Patch, Rectangle

from ._draw import PALETTE, arrow, box, canvas, tint

__all__ = ["draw_fp8_linear"]


def _tiles(ax, x, y, kind: str, size: float = 0.9):
    """A tiny 4×4 matrix at (x, y) (lower-left) with one scaling group filled: a row piece ``"1x128"``, a
    column piece ``"128x1"`` or a square ``"128x128"``."""
    cell = size / 4
    ax.add_patch(Rectangle((x, y), size, size, facecolor="white", edgecolor=PALETTE["fp8"], lw=0.8, zorder=3))
    for i in range(1, 4):
        ax.plot([x + i * cell] * 2, [y, y + size], color=tint(PALETTE["fp8"], 0.5), lw=0.5, zorder=3)
        ax.plot([x, x + size], [y + i * cell] * 2, color=tint(PALETTE["fp8"], 0.5), lw=0.5, zorder=3)
    w, h = {"1x128": (cell, cell / 3), "128x1": (cell / 3, cell), "128x128": (cell, cell)}[kind]
    ax.add_patch(Rectangle((x + cell, y + size - cell - h), w, h, facecolor=PALETTE["fp8"], lw=0, zorder=4))


def _quant(ax, x, y, text, tiles, w=3.75, h=1.2):
    b = box(ax, x, y, w, h, None, "fp8")
    _tiles(ax, x - w / 2 + 0.25, y - 0.45, tiles)
    ax.text(x - w / 2 + 1.3, y, text, ha="left", va="center", fontsize=9, zorder=5)
    return b


def _panel(ax, cx, name, formula, inputs, quants, output, note):
    """One GEMM: two inputs (top) → their quantisation (E4M3) → the FP8 GEMM → its output (bottom)."""
    xs = (cx - 2.0, cx + 2.0)
    gemm = box(ax, cx, 5.55, 7.2, 1.55, f"{name}:  {formula}\nE4M3 × E4M3, accumulate in FP32\n"
               f"(promoted every 128 products)", "fp8", fs=10)
    gemm.label.set_fontweight("normal")
    for x, (label, kind), (qtext, tiles) in zip(xs, inputs, quants):
        src = box(ax, x, 10.4, 3.75, 1.0, label, kind)
        q = _quant(ax, x, 8.3, qtext, tiles)
        arrow(ax, src.bottom, q.top)
        arrow(ax, q.bottom, (x, gemm.y + gemm.h / 2))
    out = box(ax, cx, 2.75, 6.4, 1.4, output[0], output[1], fs=9 if output[0].count("\n") > 1 else 10)
    arrow(ax, gemm.bottom, out.top)
    ax.text(cx, 1.35, note, ha="center", va="top", fontsize=9, style="italic")


def draw_fp8_linear(ax=None):
    """The FP8 Linear of V3 §3.3 (Fig. 6) as three panels: Fprop y = x Wᵀ, Dgrad dx = dy W, Wgrad dW = dyᵀ x.

    Each shows which tensors enter in which precision, where they are quantised to E4M3 and with which
    scaling groups (1×128 tiles for x and dy, 128×128 blocks for W, 128×1 tiles for Wgrad's re-tiled
    operands), FP32 accumulation, BF16 outputs, and the FP32 weight gradient feeding AdamW (m, v in BF16)
    and the FP32 master weights. Returns the figure.
    """
    fig, ax = canvas(ax, (11, 6.2), (-0.2, 24.2), (-0.3, 11.6))
    _panel(ax, 4.0, "Fprop", "y = x $W^T$",
           [("x: BF16\n(input)", "bf16"), ("W: FP32\n(master weight)", "fp32")],
           [("E4M3,\n1×128 tiles", "1x128"), ("E4M3,\n128×128 blocks", "128x128")],
           ("y: BF16 (output)", "bf16"), "the FP8 tiles of x are kept\nfor Wgrad")
    _panel(ax, 12.1, "Dgrad", "dx = dy W",
           [("dy: BF16\n(from next layer)", "bf16"), ("W: FP32\n(master weight)", "fp32")],
           [("E4M3,\n1×128 tiles", "1x128"), ("E4M3,\n128×128 blocks", "128x128")],
           ("dx: BF16 (to previous layer)", "bf16"), "same weight blocks as Fprop")
    _panel(ax, 20.2, "Wgrad", "dW = $dy^T$ x",
           [("dy: FP8 tiles\n(from Dgrad)", "fp8"), ("x: FP8 tiles\n(kept by Fprop)", "fp8")],
           [("re-tiled to\n128×1 tiles", "128x1"), ("re-tiled to\n128×1 tiles", "128x1")],
           ("dW: FP32, summed over micro-batches\n→ AdamW (m, v in BF16)\n→ FP32 master W", "fp32"),
           "dequantise, transpose, requantise:\nWgrad sums over tokens (V3 §3.5.2)")
    handles = [Patch(facecolor=tint(PALETTE[k]), edgecolor=PALETTE[k], label=label)
               for k, label in (("fp8", "FP8 (E4M3)"), ("bf16", "BF16"), ("fp32", "FP32"))]
    handles.append(Patch(facecolor=PALETTE["fp8"], label="one scaling group (one scale)"))
    ax.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, -0.02), ncol=4, fontsize=9,
              frameon=False)
    ax.set_title("FP8 Linear (V3 §3.3, Fig. 6): all three GEMMs in E4M3, scales per tile/block, FP32 accumulation",
                 fontsize=11)
    return fig
