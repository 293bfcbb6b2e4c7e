"""Did the all-to-all hide under the other half of a pair? Measuring and drawing the overlap (chapter 5).

DualPipe's point (V3 §3.2.1, Fig. 4) is that in a paired forward/backward chunk, one micro-batch's
communication (pipeline sends, the MoE dispatch/combine all-to-alls) hides behind the other micro-batch's
computation. With expert-parallel stages and ``overlap=True``,
:class:`~dsv3lib.parallel.pipeline.PipelineRunner` runs an ``FB``'s halves in two threads;
:func:`comm_overlap` measures how much all-to-all time ran under the other half and :func:`draw_overlap`
draws one rank's step as four lanes.
"""

from __future__ import annotations

__all__ = ["comm_overlap", "draw_overlap"]


def _length(a: tuple, b: tuple) -> float:
    return max(0.0, min(a[1], b[1]) - max(a[0], b[0]))


def comm_overlap(part_events: list, comm_log: list) -> dict[str, float]:
    """Seconds of all-to-all and how much of it ran while the *other* half of an ``FB`` pair was running.

    ``part_events``: a runner's ``(start, end, op)`` per simple op; ``comm_log``: ``(start, end, name)``
    of every exchange on the same clock. Exchanges named ``"... grad"`` belong to backward halves.
    """
    total = sum(e - s for s, e, _ in comm_log)
    halves: dict = {}
    for s, e, p in part_events:  # FB halves: an F and a B with overlapping intervals
        halves.setdefault(p.kind, []).append((s, e))
    hidden = 0.0
    for s, e, name in comm_log:
        other = halves.get("F" if name.endswith("grad") else "B", [])
        hidden += sum(_length((s, e), iv) for iv in other)
    return {"comm": total, "under_other_half": hidden}


def draw_overlap(part_events: list, comm_log: list, ax=None, title: str | None = None):
    """One rank's measured step as four rows: forward ops (and ``FB`` forward halves), backward ones (B, W),
    each including its own exchanges, and the forward and backward all-to-alls (``comm_log``): an exchange
    under the other direction's bar ran while the other half of a pair was busy. Times in ms; returns the axes."""
    import matplotlib.pyplot as plt

    if ax is None:
        _, ax = plt.subplots(figsize=(12, 2.4))
    rows = {"forward ops": 0, "backward ops": 1, "forward all-to-all": 2, "backward all-to-all": 3}
    colours = {0: "tab:blue", 1: "tab:orange", 2: "tab:cyan", 3: "tab:red"}
    bars = [(rows["forward ops" if p.kind == "F" else "backward ops"], s, e) for s, e, p in part_events]
    bars += [(rows["backward all-to-all" if n.endswith("grad") else "forward all-to-all"], s, e)
             for s, e, n in comm_log]
    for row, s, e in bars:
        ax.barh(row, (e - s) * 1e3, left=s * 1e3, height=0.7, color=colours[row], edgecolor="black", linewidth=0.3)
    ax.set_yticks(list(rows.values()))
    ax.set_yticklabels(list(rows))
    ax.invert_yaxis()
    ax.set_xlabel("ms since the step began")
    if title:
        ax.set_title(title)
    return ax
