"""Which rank does what: the pipeline × data × expert layout and its process groups (chapters 5 and 6).

``world = pp · dp · ep`` processes form one :class:`~torch.distributed.device_mesh.DeviceMesh` with named
dimensions, the way torchtitan names its parallel dimensions (and the only place process groups are
made):

* ``pp``: pipeline position. The ranks of one pipeline (same ``dp``, ``ep`` coordinates) pass activations
  and gradients point to point.
* ``ep``: expert parallelism. Ranks at the same pipeline position hold the same stages, each with 1/ep of
  every MoE layer's routed experts, and exchange tokens by all-to-all (V3 shards each stage's experts over
  its data-parallel ranks, §3.2). Each EP rank reads its own part of the batch.
* ``dp``: plain data parallelism on top: whole copies of an EP group, each reading its own part of the batch.

So a batch is split over ``dp · ep`` *replicas* (replica index ``dp_rank · ep + ep_rank``); every replica
runs the whole pipeline on its part. After the step, gradients of parameters every replica holds are summed
over the ``replica`` group (dp × ep), the local experts' over ``dp`` only. ``ep`` has a second group,
``ep_backward``, with the same ranks: an overlapped forward/backward pair (DualPipe) runs its halves in two
threads, and each thread's all-to-alls need their own group so that every group sees its collectives in the
same order on every rank.

Rank order puts ``ep`` innermost (consecutive ranks: the fastest links, as V3's NVLink within a node) and
``pp`` outermost: ``rank = (pp_rank · dp + dp_rank) · ep + ep_rank``.
"""

from __future__ import annotations

import argparse
import datetime

import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from . import launch
from .schedules import SCHEDULES, make_schedule, placement

__all__ = ["ParallelLayout", "add_run_arguments", "check_layout", "schedule_arg"]


def _fail(rule: str) -> None:
    raise ValueError(rule)


def check_layout(world: int, pp: int = 1, ep: int = 1, dp: int = 1, *, schedule: str | None = None,
                 n_micro: int | None = None, n_layers: int | None = None, n_experts: int | None = None) -> None:
    """Raise a one-line ``ValueError`` naming the first rule the layout breaks (no processes needed).

    Rules: degrees are ints >= 1; ``pp · ep · dp == world``; the schedule exists, and takes ``pp`` ranks
    and ``n_micro`` micro-batches (DualPipe: pp and n_micro even, n_micro >= 2·pp; DualPipeV: n_micro >= 2·pp);
    the model's ``n_layers`` split evenly into the schedule's stages; ``ep`` divides ``n_experts``.
    """
    for name, v in (("pp", pp), ("ep", ep), ("dp", dp)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            _fail(f"{name}: a parallel degree must be an int >= 1, got {v!r}")
    if pp * ep * dp != world:
        _fail(f"layout: pp × ep × dp = {pp} × {ep} × {dp} = {pp * ep * dp}, but the world has {world} processes")
    if n_experts is not None and n_experts % ep:
        _fail(f"ep: {ep} expert-parallel ranks do not divide n_routed_experts={n_experts}")
    if schedule is None:
        return
    if schedule not in SCHEDULES:
        _fail(f"schedule: unknown {schedule!r}; choose from {sorted(SCHEDULES)}")
    if n_micro is not None:
        make_schedule(schedule, pp, n_micro)  # raises naming the schedule's own rule
    elif schedule == "DualPipe" and pp % 2:
        _fail(f"DualPipe needs an even number of ranks (pp % 2 == 0), got pp={pp}")
    n_stages = len(placement(schedule, pp)[0])
    if n_layers is not None and n_layers % n_stages:
        _fail(f"n_layers: {n_layers} layers do not split into the {n_stages} stages of {schedule} on pp={pp}")


class ParallelLayout:
    """This rank's coordinates and process groups in a ``pp × dp × ep`` layout (chapters 5 and 6).

    Call on every rank, after ``init_process_group``, with the same degrees; every group's collectives
    fail after ``timeout`` seconds (default: the job's own, as given to :func:`~dsv3lib.parallel.launch.launch` or
    :func:`~dsv3lib.parallel.launch.init_distributed`; :mod:`~dsv3lib.parallel.launch` then ends the job). Attributes: ``pp``, ``dp``,
    ``ep``; ``pp_rank``, ``dp_rank``, ``ep_rank`` (this rank's coordinates); ``replica`` (its part of the
    batch) of ``n_replicas``; ``mesh`` (dims ``pp``, ``dp``, ``ep``) and the groups ``pp_group``,
    ``dp_group``, ``ep_group``, ``ep_backward_group``, ``replica_group``.
    """

    def __init__(self, pp: int = 1, ep: int = 1, dp: int = 1, *, timeout: float | None = None):
        if not dist.is_initialized():
            raise RuntimeError("ParallelLayout: no process group; start with parallel.launch or torchrun first")
        check_layout(dist.get_world_size(), pp, ep, dp)
        self.pp, self.ep, self.dp = pp, ep, dp
        backend = dist.get_backend()
        options = (dist.ProcessGroupNCCL.Options() if backend == "nccl" else dist.ProcessGroupGloo._Options())
        timeout = timeout or launch.job_timeout()
        options._timeout = datetime.timedelta(seconds=timeout)  # a stalled peer fails a collective, not hangs it

        def mesh(shape, names):
            return init_device_mesh("cuda" if backend == "nccl" else "cpu", shape, mesh_dim_names=names,
                                    backend_override={n: (backend, options) for n in names})

        self.mesh = mesh((pp, dp, ep), ("pp", "dp", "ep"))
        second = mesh((pp, dp, ep), ("pp", "dp", "ep"))  # the same ranks: groups for the backward thread's all-to-alls
        flat = mesh((pp, dp * ep), ("pp", "replica"))  # the gradient sum over a position's replicas (dp × ep)
        self.pp_rank, self.dp_rank, self.ep_rank = self.mesh.get_coordinate()
        self.pp_group, self.dp_group = self.mesh.get_group("pp"), self.mesh.get_group("dp")
        self.ep_group, self.ep_backward_group = self.mesh.get_group("ep"), second.get_group("ep")
        self.replica_group = flat.get_group("replica")
        self.replica, self.n_replicas = self.dp_rank * ep + self.ep_rank, dp * ep

    def __repr__(self) -> str:
        return (f"ParallelLayout(pp={self.pp}, dp={self.dp}, ep={self.ep}; rank {dist.get_rank()}: "
                f"pp_rank={self.pp_rank}, dp_rank={self.dp_rank}, ep_rank={self.ep_rank}, replica={self.replica})")


def schedule_arg(text: str) -> str:
    """A schedule name from the command line, case-insensitive (``dualpipe`` -> ``DualPipe``)."""
    names = {name.lower(): name for name in SCHEDULES}
    if text.lower() not in names:
        raise argparse.ArgumentTypeError(f"unknown schedule {text!r}; choose from {sorted(names)}")
    return names[text.lower()]


def add_run_arguments(p: argparse.ArgumentParser, *, ep: int = 1, steps: int = 5) -> None:
    """The flags of a parallel training run, shared by ``python -m dsv3lib.parallel`` and the lab's ``train``."""
    p.add_argument("--pp", type=int, default=2, help="pipeline ranks")
    p.add_argument("--ep", type=int, default=ep, help="expert-parallel ranks per pipeline position")
    p.add_argument("--dp", type=int, default=1, help="data-parallel copies of the EP group")
    p.add_argument("--schedule", type=schedule_arg, default="DualPipe", help="1f1b, zb1p, dualpipe or dualpipev")
    p.add_argument("--n-micro", type=int, default=0, help="micro-batches per replica (default 2·pp)")
    p.add_argument("--micro-rows", type=int, default=2, help="sequences per micro-batch")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--fp8", action="store_true", help="block-scaled FP8 linears (reference GEMMs on CPU)")
    p.add_argument("--overlap", action="store_true", help="run each F&B pair's halves in two threads")
    p.add_argument("--timeout", type=float, default=launch.DEFAULT_TIMEOUT,
                   help="seconds a collective may wait before the job ends (a stalled rank is named)")
