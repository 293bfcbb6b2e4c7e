"""DualPipe's overlapped forward + backward chunk pair, as a two-lane timeline (chapter 5; V3 §3.2.1, Fig. 4).

A simple timing model, not a measurement (for measured overlap see :mod:`dsv3lib.parallel.overlap`):
:func:`pair_schedule` lays one pair out, :func:`draw_dualpipe_pair` draws it,
:func:`dualpipe_pair_small_multiples` draws several ratios (the static fallback for the website) and
:func:`dualpipe_pair_widget` puts the ratio on a slider.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
from matplotlib.patches import Patch, Rectangle

from ._draw import PALETTE, canvas, fit_labels, tint

__all__ = ["pair_schedule", "draw_dualpipe_pair", "dualpipe_pair_small_multiples", "dualpipe_pair_widget"]

# (name, lane, duration in units of one forward part's compute (c) or all-to-all (r), producer it waits for)
# Forward chunk of micro-batch i: ATTN -> dispatch -> MLP -> combine.
# Backward chunk of micro-batch j, gradients flowing in reverse: combine -> MLP (B then W) -> dispatch ->
# ATTN (B then W). B = input gradient (needed downstream), W = weight gradient (needed by nobody here).
_OPS = [
    ("ATTN F", "compute", "c", None), ("dispatch F", "comm", "r", "ATTN F"),
    ("MLP F", "compute", "c", "dispatch F"), ("combine F", "comm", "r", "MLP F"),
    ("combine B", "comm", "r", None), ("MLP B", "compute", "c", "combine B"), ("MLP W", "compute", "c", "MLP B"),
    ("dispatch B", "comm", "r", "MLP B"), ("ATTN B", "compute", "c", "dispatch B"),
    ("ATTN W", "compute", "c", "ATTN B"),
]
# The order each lane runs its ops in (V3 Fig. 4): each all-to-all of one chunk sits under compute of the other.
_LANE_ORDER = {
    "compute": ["ATTN F", "MLP B", "MLP W", "MLP F", "ATTN B", "ATTN W"],
    "comm": ["combine B", "dispatch F", "dispatch B", "combine F"],
}
_SHORT = {"ATTN": "A", "MLP": "M", "dispatch": "D", "combine": "C"}


def pair_schedule(comm_ratio: float) -> tuple[list[tuple], dict[str, float]]:
    """Lay out one forward chunk and one backward chunk overlapped on a compute lane and a comm lane.

    The timing model (all times in units of one forward attention's compute):

    - forward attention and forward MLP each take 1; backward = 2× forward, split evenly into the input-grad
      part B and the weight-grad part W (ZeroBubble-style), so each B and each W takes 1;
    - every all-to-all (forward dispatch and combine, and their backward counterparts) takes ``comm_ratio``
      (all-to-all time / compute time of the same chunk part; V3 §3.2 sets up about 1:1);
    - one compute stream and one communication stream, each running its ops in the fixed order of V3 Fig. 4
      (``compute: ATTN F, MLP B, MLP W, MLP F, ATTN B, ATTN W``; ``comm: combine B, dispatch F, dispatch B,
      combine F``); an op starts when its lane is free and its producer has finished (a dispatch after the
      attention that produced its tokens, an MLP after its dispatch, ...); the backward's first combine has
      its input from the previous pair, so it may start at time 0;
    - communication does not slow compute down (the paper gives all-to-all 20 of 132 SMs and tunes the split
      by hand; here the cost of those SMs is ignored), PP sends are not drawn, and the pair is alone: nothing
      before or after it hides its first or last all-to-all.

    Exposed communication = time only the comm lane is busy (= makespan − compute time);
    hidden_fraction = share of all-to-all time that runs under compute. In this model everything hides for
    ``comm_ratio <= 1`` (the first combine B sits under ATTN F alone, beyond 1 it is exposed), then the
    exposure grows with the ratio. The paper reports the overlap qualitatively: with its ≈1:1 ratio "both
    all-to-all and PP communication can be fully hidden during execution" (V3 §3.2.1).

    Returns ``(ops, stats)``: ops as ``(name, lane, start, end)`` and stats with ``makespan``,
    ``compute``, ``comm``, ``exposed_comm`` and ``hidden_fraction``.
    """
    if not comm_ratio >= 0:
        raise ValueError(f"comm_ratio: must be a number >= 0, got {comm_ratio!r}")
    spec = {name: (lane, 1.0 if d == "c" else float(comm_ratio), dep) for name, lane, d, dep in _OPS}
    end: dict[str, float] = {}
    free = {"compute": 0.0, "comm": 0.0}
    pending = {lane: list(order) for lane, order in _LANE_ORDER.items()}
    ops = []
    while any(pending.values()):  # list scheduling: start whichever lane head is ready
        ready = [(max(free[lane], end[spec[q[0]][2]] if spec[q[0]][2] else 0.0), lane)
                 for lane, q in pending.items() if q and (spec[q[0]][2] is None or spec[q[0]][2] in end)]
        start, lane = min(ready)
        name = pending[lane].pop(0)
        end[name] = free[lane] = start + spec[name][1]
        ops.append((name, lane, start, end[name]))
    busy = [(s, e) for _, lane, s, e in ops if lane == "compute"]
    comm = [(s, e) for _, lane, s, e in ops if lane == "comm"]
    hidden = sum(max(0.0, min(e, e2) - max(s, s2)) for s, e in comm for s2, e2 in busy)
    total_comm = sum(e - s for s, e in comm)
    makespan = max(e for *_, e in ops)
    stats = {
        "makespan": makespan, "compute": sum(e - s for s, e in busy), "comm": total_comm,
        "exposed_comm": total_comm - hidden, "hidden_fraction": hidden / total_comm if total_comm else 1.0,
    }
    return ops, stats


def _exposed(ops) -> list[tuple[float, float]]:
    """Intervals of all-to-all with no compute running at the same time."""
    busy = sorted((s, e) for _, lane, s, e in ops if lane == "compute")
    out = []
    for _, lane, s, e in ops:
        if lane != "comm":
            continue
        t = s
        for s2, e2 in busy:
            if e2 <= t or s2 >= e:
                continue
            if s2 > t:
                out.append((t, s2))
            t = max(t, e2)
        if t < e:
            out.append((t, e))
    return [iv for iv in out if iv[1] - iv[0] > 1e-9]


def draw_dualpipe_pair(comm_ratio: float = 1.0, ax=None, *, legend: bool = True, xmax: float | None = None):
    """Draw one DualPipe forward+backward pair on a compute lane and a comm lane (V3 §3.2.1, Fig. 4).

    Attention parts are blue, MLP parts green, all-to-alls purple; F = forward, B = input-grad backward,
    W = weight-grad backward; red hatching marks all-to-all time with no compute under it. Timing model:
    :func:`pair_schedule`. Returns ``(fig, stats)`` with stats as :func:`pair_schedule` gives them.
    """
    ops, stats = pair_schedule(comm_ratio)
    span = xmax or max(stats["makespan"], 6.0)
    fig, ax = canvas(ax, (10, 2.6), (-1.35, span + 0.1), (-0.15, 2.3 if legend else 1.85))
    lanes = {"compute": 1.45, "comm": 0.55}
    for lane, y in lanes.items():
        ax.text(-0.1, y, lane, ha="right", va="center", fontsize=10)
    items = []
    for name, lane, s, e in ops:
        part, phase = name.split()
        kind = "comm" if lane == "comm" else ("attention" if part == "ATTN" else "moe")
        colour = PALETTE[kind]
        fill = colour if phase == "B" and lane == "compute" else tint(colour, 0.35 if phase == "W" else 0.7)
        patch = Rectangle((s, lanes[lane] - 0.32), e - s, 0.64, facecolor=fill, edgecolor="black", lw=0.8)
        ax.add_patch(patch)
        text = ax.text((s + e) / 2, lanes[lane], name, ha="center", va="center", fontsize=9, zorder=4,
                       color="white" if fill == colour else "black",
                       bbox=dict(boxstyle="square,pad=0.05", facecolor=fill, edgecolor="none"))
        items.append((text, patch, [name, name.replace(" ", "\n"), _SHORT[part] + phase]))
    for s, e in _exposed(ops):
        ax.add_patch(Rectangle((s, lanes["comm"] - 0.32), e - s, 0.64, facecolor="none",
                               edgecolor=PALETTE["exposed"], hatch="///", lw=1.5, zorder=3))
        ax.add_patch(Rectangle((s, lanes["compute"] - 0.32), e - s, 0.64, facecolor=tint(PALETTE["exposed"], 0.85),
                               edgecolor="none"))
    ax.plot([0, span], [0.05, 0.05], color="black", lw=0.8)
    for t in range(int(span) + 1):
        ax.plot([t, t], [0.05, 0.0], color="black", lw=0.8)
        ax.text(t, -0.02, str(t), ha="center", va="top", fontsize=9)
    ax.text(-0.1, -0.02, "time", ha="right", va="top", fontsize=9)
    ax.set_title(f"comm/compute = {comm_ratio:g}: makespan {stats['makespan']:.2f}, exposed all-to-all "
                 f"{stats['exposed_comm']:.2f} ({stats['hidden_fraction']:.0%} hidden)", fontsize=10)
    if legend:
        handles = [Patch(facecolor=tint(PALETTE["attention"], 0.7), edgecolor="black", label="attention"),
                   Patch(facecolor=tint(PALETTE["moe"], 0.7), edgecolor="black", label="MLP (experts)"),
                   Patch(facecolor=tint(PALETTE["comm"], 0.7), edgecolor="black", label="all-to-all"),
                   Patch(facecolor="none", edgecolor=PALETTE["exposed"], hatch="///", label="exposed"),
                   Patch(visible=False, label="F forward, B input-grad, W weight-grad")]
        ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 1.0), ncol=5, fontsize=9,
                  frameon=False, handlelength=1.5, columnspacing=1.2)
    fit_labels(fig, items)
    return fig, stats


def dualpipe_pair_small_multiples(ratios=(0.25, 0.5, 1.0, 1.5, 2.0)):
    """One :func:`draw_dualpipe_pair` panel per ratio on a shared time axis, plus a key (the website's static
    stand-in for :func:`dualpipe_pair_widget`). Returns ``(fig, {ratio: stats})``."""
    ratios = list(ratios)
    span = max(max(pair_schedule(r)[1]["makespan"] for r in ratios), 6.0)
    fig, axes = plt.subplots(len(ratios) + 1, 1, figsize=(10, 1.75 * len(ratios) + 1.1),
                             gridspec_kw={"height_ratios": [1.0] * len(ratios) + [0.35]})
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.97, hspace=0.35)
    stats = {r: draw_dualpipe_pair(r, ax=a, legend=False, xmax=span)[1] for r, a in zip(ratios, axes)}
    key = axes[-1]
    key.set_axis_off()
    handles = [Patch(facecolor=tint(PALETTE["attention"], 0.7), edgecolor="black", label="A = attention"),
               Patch(facecolor=tint(PALETTE["moe"], 0.7), edgecolor="black", label="M = MLP"),
               Patch(facecolor=tint(PALETTE["comm"], 0.7), edgecolor="black", label="D/C = dispatch/combine"),
               Patch(facecolor="none", edgecolor=PALETTE["exposed"], hatch="///", label="exposed")]
    key.legend(handles=handles, loc="upper center", ncol=4, fontsize=9, frameon=False,
               title="F forward, B input-grad, W weight-grad; time in units of one forward part's compute",
               title_fontsize=9)
    return fig, stats


def dualpipe_pair_widget(min_ratio: float = 0.0, max_ratio: float = 3.0):
    """An ``ipywidgets.interactive`` with a slider for the all-to-all/compute ratio that redraws the pair."""
    import ipywidgets

    def show(comm_ratio: float = 1.0):
        draw_dualpipe_pair(comm_ratio, xmax=max(pair_schedule(max_ratio)[1]["makespan"], 6.0))
        plt.show()

    slider = ipywidgets.FloatSlider(value=1.0, min=min_ratio, max=max_ratio, step=0.05,
                                    description="comm/compute", continuous_update=False,
                                    style={"description_width": "initial"})
    return ipywidgets.interactive(show, comm_ratio=slider)
