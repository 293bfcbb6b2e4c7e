"""Pipeline × expert parallelism, with each FB pair's all-to-all overlapped (chapter 5; V3 §3.2.1–3.2.2).

DualPipe's point is that in a paired forward/backward chunk, one micro-batch's communication (pipeline
sends, and the MoE dispatch/combine all-to-alls) hides behind the other micro-batch's computation. Here
that runs for real: the stages' MoE layers are expert-parallel and :class:`PipelineRunner` with
``overlap=True`` executes an ``FB``'s halves in two threads.

Layout of ``pp · ep`` processes: replica ``d`` is a whole pipeline over global ranks ``d·pp … d·pp+pp−1``
fed its own batch (data parallelism). The ranks at pipeline position ``p`` of all replicas form position
``p``'s expert-parallel group: they hold the same stages, each with 1/ep of every MoE layer's routed
experts, and exchange tokens by all-to-all (V3 likewise shards each stage's experts over its data-parallel
ranks). Each position has two such groups, one for forward and one for backward all-to-alls, so the two
threads of an overlapped pair never share a group and every group sees its collectives in the same order
on every rank.

After the step, the replicated parameters' gradients (all but the local experts') are summed over the
group, the data-parallel all-reduce; ``loss_scale = 1/ep`` makes that sum a mean. The oracle is one
process running every replica's micro-batches through the unsharded model (:func:`hybrid_check`).
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .expert import ExpertParallelMoE, shard_experts
from .pipeline import PipelineRunner
from .stages import mean_loss, micro_batches, micro_loss, stages_for_rank

__all__ = [
    "HybridGroups", "comm_overlap", "draw_overlap", "global_names", "hybrid_check", "make_groups",
    "replicated_params", "run_hybrid_check",
]


@dataclass
class HybridGroups:
    """This rank's place in a ``pp × ep`` layout and its process groups."""
    replica: int  # data-parallel replica d (its own batch)
    position: int  # pipeline rank p within the replica
    pipe: dist.ProcessGroup  # the replica's pipeline ranks
    ep_forward: dist.ProcessGroup  # ranks at the same position, forward all-to-alls (and the DP all-reduce)
    ep_backward: dist.ProcessGroup  # the same ranks, backward all-to-alls


def make_groups(pp: int, ep: int) -> HybridGroups:
    """Create every pipeline and EP group (all ranks must call this, in the same order); this rank's."""
    if dist.get_world_size() != pp * ep:
        raise ValueError(f"world size: {dist.get_world_size()} processes, but pp × ep = {pp} × {ep}")
    rank = dist.get_rank()
    replica, position = divmod(rank, pp)
    pipes = [dist.new_group([d * pp + p for p in range(pp)]) for d in range(ep)]
    eps = [[dist.new_group([d * pp + p for d in range(ep)]) for p in range(pp)] for _ in range(2)]
    return HybridGroups(replica, position, pipes[replica], eps[0][position], eps[1][position])


def _local_expert_params(stages: dict) -> set[int]:
    return {id(q) for st in stages.values() for m in st.modules() if isinstance(m, ExpertParallelMoE)
            for q in m.experts.parameters()}


def replicated_params(stages: dict) -> list[torch.nn.Parameter]:
    """Parameters every EP rank of a position holds in full (all but the local experts), each once."""
    local, seen, out = _local_expert_params(stages), set(), []
    for st in stages.values():
        for q in st.parameters():
            if id(q) not in local and id(q) not in seen:
                seen.add(id(q))
                out.append(q)
    return out


def global_names(stages: dict) -> dict[str, torch.nn.Parameter]:
    """``{name in the unsharded model: parameter}``: local expert j of a shard is global expert first + j."""
    out = {}
    for st in stages.values():
        firsts = {name: m.first for name, m in st.named_modules() if isinstance(m, ExpertParallelMoE)}
        for name, q in st.named_parameters():
            m = re.match(r"(.*)\.experts\.(\d+)\.(.*)", name)
            if m and m.group(1) in firsts:
                name = f"{m.group(1)}.experts.{firsts[m.group(1)] + int(m.group(2))}.{m.group(3)}"
            out[name] = q
    return out


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


# ------------------------------------------------------------------------------- check (a spawnable worker)
def hybrid_check(rank: int, world: int, init_file: str, result_file: str, pp: int, ep: int, cases: list,
                 seed: int = 0, batch: tuple = (8, 16)) -> None:
    """Worker for ``torch.multiprocessing.spawn``: each case ``(schedule_name, num_chunks, overlap)`` runs
    one step of a seeded tiny model (``n_layers = 2·pp``, every layer MoE, no MTP) over ``pp × ep``
    processes, replica d on its own ``batch``; rank 0 also runs the one-process oracle. Rank 0 saves, per
    case, the step loss and the oracle's, the largest gradient difference (every rank's parameters under
    their unsharded names), the wall time, rank 0's part events and all-to-all log, and
    :func:`comm_overlap` per rank."""
    from ..config import ModelConfig
    from ..model import Transformer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        groups = make_groups(pp, ep)
        cfg = ModelConfig.preset("tiny", n_layers=2 * pp, n_dense_layers=0, n_mtp_modules=0,
                                 max_seq_len=max(32, batch[1]))
        g = torch.Generator().manual_seed(seed + 1)
        data = [torch.randint(0, cfg.vocab_size, (batch[0], batch[1] + 1), generator=g) for _ in range(ep)]
        results = []
        for name, num_chunks, overlap in cases:
            torch.manual_seed(seed)
            model = shard_experts(Transformer(cfg), groups.ep_forward, backward_group=groups.ep_backward)
            stages = stages_for_rank(model, name, groups.position, pp)
            log: list = []
            for st in stages.values():
                for m in st.modules():
                    if isinstance(m, ExpertParallelMoE):
                        m.comm_log = log
            runner = PipelineRunner(name, stages, groups.position, pp, groups.pipe, overlap=overlap)
            tokens = data[groups.replica]
            t0 = time.perf_counter()
            loss = runner.step(tokens[:, :-1], tokens[:, 1:], num_chunks, loss_scale=1 / ep)
            seconds = time.perf_counter() - t0
            for q in replicated_params(stages):  # the data-parallel all-reduce (a sum of 1/ep-scaled grads)
                if q.grad is None:
                    q.grad = torch.zeros_like(q)
                dist.all_reduce(q.grad, group=groups.ep_forward)
            comm = [(s - runner.t_start, e - runner.t_start, n) for s, e, n in log]
            mine = {"loss": loss.item(), "grads": {n: q.grad for n, q in global_names(stages).items()},
                    "overlap": comm_overlap(runner.part_events, comm)}
            gathered = [None] * world
            dist.gather_object(mine, gathered if rank == 0 else None, dst=0)
            if rank == 0:
                results.append(_compare(cfg, seed, data, num_chunks, gathered, name, overlap, seconds,
                                        runner.part_events, comm))
        if rank == 0:
            torch.save(results, result_file)
    finally:
        dist.destroy_process_group()


def _compare(cfg, seed, data, num_chunks, gathered, name, overlap, seconds, part_events, comm) -> dict:
    from ..model import Transformer

    torch.manual_seed(seed)
    ref = Transformer(cfg)
    replica_losses = []
    for tokens in data:  # every replica's micro-batches, one process, the unsharded model
        mbs = micro_batches(tokens[:, :-1], tokens[:, 1:], num_chunks)
        replica_losses.append(mean_loss(torch.stack([micro_loss(ref(x, mtp=False).logits, y) for x, y in mbs])))
    torch.stack(replica_losses).mean().backward()
    ref_params = dict(ref.named_parameters())
    diff, covered = 0.0, set()
    for r in gathered:
        for n, q in r["grads"].items():
            covered.add(n)
            want = ref_params[n].grad if ref_params[n].grad is not None else torch.zeros_like(q)
            diff = max(diff, (q - want).abs().max().item())
    pp = len(gathered) // len(data)
    losses = [gathered[d * pp]["loss"] for d in range(len(data))]  # every rank of a replica has its loss
    return {"schedule": name, "num_chunks": num_chunks, "overlap": overlap, "losses": losses,
            "ref_losses": [v.item() for v in replica_losses], "grad_diff": diff,
            "all_params": covered == set(ref_params), "seconds": seconds, "part_events": part_events,
            "comm_log": comm, "comm_overlap": [r["overlap"] for r in gathered]}


def run_hybrid_check(pp: int, ep: int, cases: list, seed: int = 0, batch: tuple = (8, 16)) -> list[dict]:
    """Spawn ``pp × ep`` CPU processes running :func:`hybrid_check`; returns rank 0's per-case results."""
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as tmp:
        init_file, result_file = os.path.join(tmp, "store"), os.path.join(tmp, "result.pt")
        mp.spawn(hybrid_check, args=(pp * ep, init_file, result_file, pp, ep, list(cases), seed, batch),
                 nprocs=pp * ep, join=True)
        return torch.load(result_file, weights_only=False)


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
