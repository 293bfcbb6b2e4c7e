"""What every benchmark in ``bench/`` shares: a timer, error measures, result rows, the table and the JSON file.

A benchmark section returns :class:`Row` objects, one per (kernel, shape). A row holds the kernel's error
against its PyTorch reference on random data, its own figure of merit, the same figure for each peer measured
in the same run, and the goal it is judged by. ``python -m bench`` (``bench/run_all.py``) collects the rows of
every section, prints one table and writes them as JSON.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

__all__ = ["Row", "Timer", "max_rel_err", "environment", "print_table", "write_json"]


def max_rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got − want| / max |want| over all elements, in float64 (NaN or inf anywhere gives inf)."""
    g, w = got.double(), want.double()
    if g.shape != w.shape:
        raise ValueError(f"max_rel_err: shapes differ, {tuple(g.shape)} vs {tuple(w.shape)}")
    if not (torch.isfinite(g).all() and torch.isfinite(w).all()):
        return math.inf
    den = w.abs().max().item()
    num = (g - w).abs().max().item()
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)


class Timer:
    """Median milliseconds of a call. On CUDA: ``triton.testing.do_bench`` (CUDA events, warm-up, an L2 flush
    before each run; falls back to events without Triton). On the CPU (dry runs): one warm-up call, then
    ``reps`` timed calls with ``time.perf_counter``."""

    def __init__(self, device: torch.device, *, warmup_ms: int = 25, rep_ms: int = 100, reps: int = 5):
        self.device, self.warmup_ms, self.rep_ms, self.reps = device, warmup_ms, rep_ms, reps

    def __call__(self, fn: Callable[[], object]) -> float:
        if self.device.type == "cuda":
            fn()
            torch.cuda.synchronize()
            try:
                from triton.testing import do_bench
            except ImportError:
                return self._events(fn)
            return float(do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms, return_mode="median"))
        fn()
        times = []
        for _ in range(self.reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)

    def _events(self, fn) -> float:
        times = []
        for _ in range(20):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return statistics.median(times)


@dataclass
class Row:
    """One kernel at one shape.

    ``ours`` and each entry of ``peers`` are the same figure of merit in ``unit`` (higher is better); a peer
    this build cannot run is ``None`` with the reason in ``notes``. ``ratio`` is ours / the strongest peer;
    ``met`` is whether the goal holds (``None``: no goal for this row, or not judged, as in a dry run).
    """

    kernel: str
    shape: str
    unit: str
    rel_err: float | None = None  # max|ours − reference| / max|reference| on random data
    exact: bool | None = None  # bit-for-bit equal to the reference, where that is the claim
    tol: float = 0.0  # the largest rel_err that counts as correct; 0: must be exact
    ours: float | None = None
    peers: dict[str, float | None] = field(default_factory=dict)
    ratio: float | None = None
    strongest_peer: str | None = None
    goal: str = ""
    met: bool | None = None
    extra: dict[str, object] = field(default_factory=dict)  # secondary numbers (times, other ratios)
    notes: list[str] = field(default_factory=list)
    error: str | None = None  # the section failed: its exception, in one line

    @property
    def correct(self) -> bool:
        """Ran, and matched its reference: bit-for-bit where ``tol`` is 0, else within ``tol``."""
        if self.error is not None or self.rel_err is None:
            return False
        return bool(self.exact) if self.tol == 0 else self.rel_err <= self.tol

    def set_ratio(self, peers: list[str] | None = None) -> None:
        """ratio = ours / the best of ``peers`` (default: every peer that ran)."""
        names = [n for n in (peers or list(self.peers)) if self.peers.get(n)]
        if self.ours is None or not names:
            return
        self.strongest_peer = max(names, key=lambda n: self.peers[n])
        self.ratio = self.ours / self.peers[self.strongest_peer]


def _cmd(*args: str) -> str | None:
    try:
        out = subprocess.run(args, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def environment(device: torch.device) -> dict[str, object]:
    """Device, driver and versions, for the JSON file and the table's heading."""
    env: dict[str, object] = {"python": platform.python_version(), "torch": torch.__version__,
                              "machine": platform.machine(), "cpu_threads": torch.get_num_threads()}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    env["triton_interpret"] = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(device=p.name, capability=f"sm_{p.major}{p.minor}", sms=p.multi_processor_count,
                   memory_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda)
        env["driver"] = _cmd("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader")
    else:
        env.update(device="CPU (" + (platform.processor() or platform.machine()) + ")")
    return env


def _fmt(v: float | None) -> str:
    if v is None:
        return "n/a"
    if v == 0 or 0.01 <= abs(v) < 1e5:
        return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
    return f"{v:.2e}"


def print_table(rows: list[Row]) -> None:
    """The one table: kernel, shape, error, ours, peers, ratio to the strongest peer, goal and verdict."""
    head = ("kernel", "shape", "rel.err", "ours", "peers", "ours/best", "goal", "met")
    lines = []
    for r in rows:
        if r.error:
            lines.append((r.kernel, r.shape, "-", "-", "FAILED: " + r.error[:70], "-", r.goal, "no"))
            continue
        err = _fmt(r.rel_err) + (" exact" if r.exact else "") + ("" if r.correct else " WRONG")
        peers = ", ".join(f"{n} {_fmt(v)}" for n, v in r.peers.items())
        met = {True: "yes", False: "NO", None: "-"}[r.met]
        lines.append((r.kernel, r.shape, err, f"{_fmt(r.ours)} {r.unit}", peers,
                      f"{r.ratio:.2f}x" if r.ratio is not None else "n/a", r.goal, met))
    widths = [max(len(str(x[i])) for x in [head, *lines]) for i in range(len(head))]
    fmt = " | ".join("{:<%d}" % w for w in widths)
    print(fmt.format(*head))
    print("-+-".join("-" * w for w in widths))
    for line in lines:
        print(fmt.format(*line))
    for r in rows:
        for note in r.notes:
            print(f"  {r.kernel} {r.shape}: {note}")


def _jsonable(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf: write them as strings
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def write_json(path: str, env: dict, rows: list[Row], **extra) -> None:
    """Write ``{"environment", "rows", **extra}`` to ``path`` atomically (a temp file renamed into place)."""
    doc = _jsonable({"environment": env, **extra, "rows": [{**asdict(r), "correct": r.correct} for r in rows]})
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".bench-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=1, allow_nan=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
