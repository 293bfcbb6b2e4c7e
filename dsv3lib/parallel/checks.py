"""Checks that spawn processes and hold a parallel result against one process (chapters 3 and 5; the tests).

Workers for :func:`~dsv3lib.parallel.launch.launch` (``launch(worker, nprocs, args)``); they live in a module
because spawned children import them. Nothing here is needed to *run* the parallel model: this is the
harness that shows it computes what one process computes.

* :func:`moe_vs_one_process`: one expert-parallel MoE layer (and a small sharded Transformer) against
  the unsharded layer on every rank's tokens (chapter 3).
* :func:`step_vs_one_process`: :func:`~dsv3lib.parallel.parallelize.parallelize` for any layout and
  schedule against :func:`~dsv3lib.parallel.stages.reference_step` on the whole batch (chapter 5): losses,
  every gradient under its unsharded name, the measured timelines and all-to-all overlap.
"""

from __future__ import annotations

import copy
import time

import torch
import torch.distributed as dist

from ..config import ModelConfig
from ..fp8 import FP8Linear, convert_to_fp8
from ..model import Gate, MoE, Transformer
from .expert import ExpertParallelMoE, shard_experts
from .layout import ParallelLayout
from .overlap import comm_overlap
from .parallelize import parallelize
from .schedules import make_schedule
from .stages import reference_step

__all__ = ["moe_vs_one_process", "step_vs_one_process"]


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item() if a.numel() else 0.0


# ------------------------------------------------------------------------------------------ one MoE layer
def moe_vs_one_process(rank: int, world_size: int, cases: list, seed: int = 0, model_check: bool = False) -> list:
    """EP over ``world_size`` ranks vs one process; returns (on every rank) each case's max differences.

    For each case ``(overrides, tokens[, to_rank0])``, every rank builds the same seeded MoE (tiny preset +
    ``overrides``, fp32), computes the single-process reference on every rank's tokens, then the sharded
    layer on its own (2, tokens + 3·rank) tokens (uneven per rank): maximum absolute differences of the
    output, input grad, expert grads gathered from all ranks, gate and shared grads summed over ranks.
    ``to_rank0``: bias the gate so that every token picks rank 0's experts only (the others receive nothing
    but must still join the collectives). ``model_check``: one more result, a 2-layer Transformer (MoE layer
    + MTP block) through :func:`shard_experts` against the unsharded model: logits, all parameter grads, and
    the loss-free bias update from the loads of all ranks.
    """
    results = [_ep_case(rank, world_size, *case, seed=seed) for case in cases]
    if model_check:
        results.append(_model_case(rank, world_size, seed))
    return results


def _grad(p: torch.Tensor) -> torch.Tensor:
    return p.grad.clone() if p.grad is not None else torch.zeros_like(p)


def _ep_case(rank: int, world_size: int, overrides: dict, tokens: int, to_rank0: bool = False, *,
             seed: int) -> dict[str, float]:
    cfg = ModelConfig.preset("tiny", **overrides)
    torch.manual_seed(seed)
    moe = MoE(cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        moe.gate.weight.normal_(std=0.1, generator=g)
        moe.gate.bias.copy_(torch.randn(cfg.n_routed_experts, generator=g) * 0.05)
        if to_rank0:  # every token picks rank 0's experts: the other ranks' experts receive no rows
            moe.gate.bias[:cfg.n_activated_experts] += 10.0
    sizes = [tokens + 3 * r for r in range(world_size)]  # uneven token counts per rank
    xs = [torch.randn(2, n, cfg.dim, generator=g) for n in sizes]
    gs = [torch.randn(2, n, cfg.dim, generator=g) for n in sizes]

    # the oracle: one process, every rank's tokens
    x_ref = [x.clone().requires_grad_(True) for x in xs]
    y_ref = [moe(x) for x in x_ref]
    sum((y * gy).sum() for y, gy in zip(y_ref, gs)).backward()
    ref_grads = {n: _grad(p) for n, p in moe.named_parameters()}
    moe.zero_grad(set_to_none=True)

    ep = ExpertParallelMoE(moe)
    x = xs[rank].clone().requires_grad_(True)
    y = ep(x)
    (y * gs[rank]).sum().backward()

    diffs = {"output": _max_diff(y, y_ref[rank]), "input_grad": _max_diff(x.grad, x_ref[rank].grad)}
    local = torch.stack([torch.cat([_grad(p).flatten() for p in e.parameters()]) for e in ep.experts])
    gathered = [torch.empty_like(local) for _ in range(world_size)]
    dist.all_gather(gathered, local)
    names = [n for n, _ in ep.experts[0].named_parameters()]
    ref = torch.stack([torch.cat([ref_grads[f"experts.{e}.{n}"].flatten() for n in names])
                       for e in range(cfg.n_routed_experts)])
    diffs["expert_grads"] = _max_diff(torch.cat(gathered), ref)  # (E, params per expert), global order
    for n, p in moe.named_parameters():  # replicated parameters: their grads add up over the ranks
        if not n.startswith("experts."):
            grad = _grad(p)
            dist.all_reduce(grad)
            key = "gate_grad" if n.startswith("gate.") else "shared_grads"
            diffs[key] = max(diffs.get(key, 0.0), _max_diff(grad, ref_grads[n]))
    diffs["received"] = float(ep.last_recv_counts.sum())
    all_diffs = [None] * world_size
    dist.all_gather_object(all_diffs, diffs)
    merged = {k: max(d[k] for d in all_diffs) for k in diffs if k != "received"}
    merged["min_received"] = min(d["received"] for d in all_diffs)  # rows some rank's experts got
    return merged


def _model_case(rank: int, world_size: int, seed: int) -> dict[str, float]:
    from ..balancing import BiasBalancer, LoadMeter

    cfg = ModelConfig.preset("tiny", n_layers=2, max_seq_len=64)
    torch.manual_seed(seed)
    model = Transformer(cfg)
    g = torch.Generator().manual_seed(seed + 2)
    batches = [torch.randint(0, cfg.vocab_size, (2, 8 + 2 * r), generator=g) for r in range(world_size)]

    w = torch.linspace(-1, 1, cfg.vocab_size)  # a loss whose gradients are O(1) per token

    def loss_of(m, tokens):
        out = m(tokens)
        return out.logits, (out.logits * w).sum() + sum((t * w).sum() for t in out.mtp_logits)

    sharded = shard_experts(copy.deepcopy(model))
    ref_logits, ref_loss = [], 0.0
    with LoadMeter(model) as ref_meter:  # one process, every rank's batch: the loads add up
        for b in batches:
            logits, loss = loss_of(model, b)
            ref_logits.append(logits)
            ref_loss = ref_loss + loss
    ref_counts = ref_meter.counts()
    ref_loss.backward()
    with LoadMeter(sharded) as meter:
        logits, loss = loss_of(sharded, batches[rank])
    loss.backward()
    # the loss-free bias update from the loads of all ranks: identical on every rank, as one process
    BiasBalancer(sharded, 0.01, reduce_loads=True).update(meter.counts())
    gates = [m for m in sharded.modules() if isinstance(m, Gate)]
    bias_ok = all(torch.equal(g.bias, 0.01 * torch.sign(c.float().mean() - c.float()))
                  for g, c in zip(gates, ref_counts))
    diffs = {"model_logits": _max_diff(logits, ref_logits[rank].detach()), "model_grads": 0.0,
             "model_grad_scale": max(_grad(p).abs().max().item() for p in model.parameters()),
             "model_bias_mismatch": float(not bias_ok)}
    ref_params = dict(model.named_parameters())
    for name, mod in sharded.named_modules():
        if isinstance(mod, ExpertParallelMoE):
            for j, e in enumerate(mod.experts):  # local expert j is global expert mod.first + j
                for n, p in e.named_parameters():
                    ref = ref_params[f"{name}.experts.{mod.first + j}.{n}"]
                    diffs["model_grads"] = max(diffs["model_grads"], _max_diff(_grad(p), _grad(ref)))
    for n, p in sharded.named_parameters():
        if ".experts." not in n:  # replicated: grads add up over the ranks
            grad = _grad(p)
            dist.all_reduce(grad)
            diffs["model_grads"] = max(diffs["model_grads"], _max_diff(grad, _grad(ref_params[n])))
    all_diffs = [None] * world_size
    dist.all_gather_object(all_diffs, diffs)
    return {k: max(d[k] for d in all_diffs) for k in diffs}


# ------------------------------------------------------------------------------ the composed parallel step
def step_vs_one_process(rank: int, world_size: int, cases: list, seed: int = 0) -> list:
    """:func:`~dsv3lib.parallel.parallelize.parallelize` vs one process, for each case; returns rank 0's results.

    A case is a dict: ``pp``, ``ep`` (1), ``dp`` (1), ``schedule``, ``n_micro``; optional ``steps`` (1;
    gradients accumulate over them), ``fp8``, ``overlap``, ``bitwise`` (True), ``rows`` per micro-batch (2),
    ``seq`` (16), ``overrides`` of the tiny preset. The model has ``n_layers = 2·pp`` and one MTP module.
    Every rank builds the same seeded model and global batch; rank 0 also runs
    :func:`~dsv3lib.parallel.stages.reference_step` on an identical model (FP8-converted too when ``fp8``).
    Each result: the case, ``losses`` and ``ref_losses`` per step, ``loss_equal`` (``torch.equal`` on every
    step), ``grad_diff`` (largest absolute difference of any rank's gradient, under unsharded names),
    ``all_params`` (every parameter is on some rank), ``seconds`` (last step), the pipeline ``timeline`` and
    ``waits`` of every pipeline rank of replica 0, rank 0's ``part_events`` and all-to-all ``comm_log``, and
    ``comm_overlap`` per rank (:func:`~dsv3lib.parallel.overlap.comm_overlap`); on rank 0, ``deferred`` (weight-
    gradient GEMMs each chunk's ``W`` ran) and ``fp8_always_used`` (per stage, the FP8 Linears every micro-batch
    uses: all but the routed experts).
    """
    return [_step_case(rank, {"ep": 1, "dp": 1, "steps": 1, "rows": 2, "seq": 16, **case}, seed) for case in cases]


def _step_case(rank: int, case: dict, seed: int) -> dict | None:
    pp, ep, dp, n_micro = case["pp"], case["ep"], case["dp"], case["n_micro"]
    layout = ParallelLayout(pp=pp, ep=ep, dp=dp)
    kw = {"n_layers": 2 * pp, "max_seq_len": max(32, case["seq"]), **case.get("overrides", {})}
    cfg = ModelConfig.preset("tiny", **kw)
    rows = layout.n_replicas * n_micro * case["rows"]
    g = torch.Generator().manual_seed(seed + 1)
    tokens = torch.randint(0, cfg.vocab_size, (rows, case["seq"] + 1), generator=g)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    torch.manual_seed(seed)
    model = Transformer(cfg)  # the same model on every rank; parallelize keeps this rank's part
    runner = parallelize(model, layout, make_schedule(case["schedule"], pp, n_micro), fp8=case.get("fp8", False),
                         overlap=case.get("overlap", False), bitwise=case.get("bitwise", True))
    log: list = []
    for st in runner.stages.values():
        for m in st.modules():
            if isinstance(m, ExpertParallelMoE):
                m.comm_log = log
    losses = []
    for _ in range(case["steps"]):
        t0 = time.perf_counter()
        losses.append(runner.step(inputs, labels))
        seconds = time.perf_counter() - t0
    pipe = runner.pipeline
    timeline, waits = pipe.gather_events(), pipe.gather_events(waits=True)
    comm = [(s - pipe.t_start, e - pipe.t_start, n) for s, e, n in log]
    mine = {"grads": {name: q.grad for q, name in runner.names.items()},
            "overlap": comm_overlap(pipe.part_events, comm) if ep > 1 else None}
    gathered = [None] * dist.get_world_size()
    dist.gather_object(mine, gathered if rank == 0 else None, dst=0)
    if rank != 0:
        return None
    torch.manual_seed(seed)
    ref = Transformer(cfg)
    if case.get("fp8"):
        convert_to_fp8(ref)
    ref_losses = [reference_step(ref, inputs, labels, layout.n_replicas * n_micro) for _ in range(case["steps"])]
    ref_params = dict(ref.named_parameters())
    diff, covered = 0.0, set()
    for r in gathered:
        for name, q in r["grads"].items():
            covered.add(name)
            want = ref_params[name].grad
            diff = max(diff, _max_diff(q, want if want is not None else torch.zeros_like(q)))
    return {**case, "losses": [v.item() for v in losses], "ref_losses": [v.item() for v in ref_losses],
            "loss_equal": all(map(torch.equal, losses, ref_losses)), "grad_diff": diff,
            "all_params": covered == set(ref_params), "seconds": seconds, "timeline": timeline, "waits": waits,
            "part_events": pipe.part_events, "comm_log": comm, "deferred": pipe.deferred,
            "fp8_always_used": {k: sum(isinstance(m, FP8Linear) and ".experts." not in n for n, m in st.named_modules())
                                for k, st in runner.stages.items()},
            "comm_overlap": [r["overlap"] for r in gathered] if ep > 1 else None}
