"""The lab's training loop: a tiny DeepSeek-V3 trained across processes (chapter 6).

Every rank builds the same seeded model and reads the same global batches; :func:`parallelize` keeps its part
(pipeline stages, 1/ep of the experts, FP8 linears if asked). Each step:

1. the MTP weight λ follows V3's schedule scaled to the run (§4.2: 0.3 for the first 10T of 14.8T tokens,
   then 0.1), and the learning rate the book's warm-up + cosine (:func:`dsv3lib.train.lr_at`);
2. one pipelined forward + backward (:meth:`ParallelRunner.step`), gradients clipped by their global norm;
3. AdamW on the parameters this rank holds;
4. loss-free balancing (§2.1.2): each gate's expert loads, counted over all of the step's micro-batches, are
   summed over every rank that holds the gate (DualPipe's two copies and all replicas), so every holder
   moves its bias the same way; the biases are checked identical on all holders.

Rank 0 shows a progress bar (loss, tokens/s); every ``val_every`` steps the merged model's validation loss is
measured; checkpoints (:mod:`dsv3lib.lab.shards`) resume exactly: the same losses as an uninterrupted run.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.distributed as dist

from ..balancing import BiasBalancer, LoadMeter, max_violation
from ..config import ModelConfig
from ..data import batches, load_corpus
from ..model import Transformer
from ..parallel.launch import device
from ..parallel.layout import ParallelLayout
from ..parallel.parallelize import ParallelRunner, parallelize
from ..parallel.schedules import make_schedule
from ..parallel.stages import reference_step
from ..train import TrainConfig, evaluate, lr_at
from . import shards

__all__ = ["LabConfig", "mtp_lambda_at", "reference_first_loss", "run"]

MTP_SWITCH = 10.0 / 14.8  # V3 §4.2: λ = 0.3 for the first 10T tokens of 14.8T, then 0.1


@dataclass
class LabConfig:
    """One lab run (the command line's flags)."""
    pp: int = 2
    ep: int = 2
    dp: int = 1
    schedule: str = "DualPipe"
    n_micro: int = 0  # micro-batches per replica; 0: 2·pp
    micro_rows: int = 2  # sequences per micro-batch
    seq_len: int = 64
    steps: int = 40
    lr: float = 3e-3
    gamma: float = 0.01  # bias update speed of loss-free balancing
    grad_clip: float = 1.0
    fp8: bool = False
    overlap: bool = False
    bitwise: bool = False  # expert GEMMs per source rank: the loss equals one process's bit for bit (tests)
    val_every: int = 20  # 0: never
    ckpt_every: int = 0  # 0: only at the end
    out: str | None = None
    resume: bool = False
    seed: int = 0
    progress: bool = True  # a progress bar on rank 0
    log_every: int = 0  # instead of the bar: one printed line every this many steps (0: none)

    def __post_init__(self):
        flag = lambda name: "--" + name.replace("_", "-")  # noqa: E731  (the command line's spelling)
        for name in ("pp", "ep", "dp", "n_micro", "micro_rows", "seq_len", "steps", "val_every", "ckpt_every",
                     "seed", "log_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{flag(name)}: expected an integer, got {value!r}")
        for name in ("lr", "gamma", "grad_clip"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{flag(name)}: expected a finite number, got {value!r}")
        self.n_micro = self.n_micro or 2 * self.pp
        for name in ("pp", "ep", "dp", "n_micro", "steps", "micro_rows", "seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{flag(name)}: must be >= 1, got {getattr(self, name)}")
        for name in ("val_every", "ckpt_every", "log_every", "gamma", "grad_clip"):
            if getattr(self, name) < 0:
                raise ValueError(f"{flag(name)}: must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"--lr: must be > 0, got {self.lr}")
        if self.out is not None and not str(self.out).strip():
            raise ValueError(f"--out: {self.out!r} names no directory (leave it out to save nothing)")
        if self.resume and not self.out:
            raise ValueError("--resume: needs --out (the directory to resume from)")

    def model_config(self) -> ModelConfig:
        # positions up to 256 for serving (trained on seq_len windows; YaRN stays off below original_seq_len)
        return ModelConfig.preset("tiny", n_layers=2 * self.pp, max_seq_len=max(256, self.seq_len), n_mtp_modules=1)

    def layout_meta(self) -> dict:
        return {k: getattr(self, k) for k in ("pp", "ep", "dp", "schedule", "n_micro", "micro_rows", "seq_len",
                                               "fp8", "seed")}


@dataclass
class LabHistory:
    steps: list = field(default_factory=list)
    loss: list = field(default_factory=list)
    main_loss: list = field(default_factory=list)  # the next-token cross-entropy part of loss
    mtp_loss: list = field(default_factory=list)  # the MTP module's cross-entropy (loss = main + λ · mtp)
    val_steps: list = field(default_factory=list)
    val_loss: list = field(default_factory=list)
    max_vio: list = field(default_factory=list)  # per step, mean over gates of (max load - mean) / mean
    seconds: list = field(default_factory=list)
    loads: dict = field(default_factory=dict)  # gate name -> per step, its expert loads summed over holders


def mtp_lambda_at(step: int, steps: int) -> float:
    """V3's MTP loss weight scaled to a run of ``steps``: 0.3, then 0.1 for the last 4.8/14.8 of the steps."""
    return 0.3 if step < math.ceil(MTP_SWITCH * steps) else 0.1


def reference_first_loss(cfg: LabConfig, world: int, on: torch.device | str = "cpu") -> float:
    """The loss of :func:`run`'s first step as one process computes it on ``on``, with no parallelism: the same
    seeded model (FP8 linears if ``cfg.fp8``) and the same first global batch (``world // pp`` replicas' micro-
    batches). With ``bitwise=True`` the lab's first loss on the CPU equals it bit for bit (tests/test_lab.py);
    on GPUs under NCCL, to rounding (bench/nccl_check.py)."""
    torch.manual_seed(cfg.seed)
    ref = Transformer(cfg.model_config()).to(on)  # built, moved, then converted: as run() and parallelize() do
    if cfg.fp8:
        from ..fp8 import convert_to_fp8

        convert_to_fp8(ref)
    n_micro = world // cfg.pp * cfg.n_micro
    x, y = next(batches(load_corpus().train, n_micro * cfg.micro_rows, cfg.seq_len, seed=cfg.seed))
    return reference_step(ref, x.to(on), y.to(on), n_micro, mtp_lambda_at(0, cfg.steps)).item()


def _rank_gates(runner: ParallelRunner) -> torch.nn.ModuleList:
    """This rank's stages in one container: the balancing classes walk its gates once each, in module order."""
    return torch.nn.ModuleList(runner.stages[k] for k in sorted(runner.stages))


def _balance(runner: ParallelRunner, meter: LoadMeter, balancer: BiasBalancer, hist: LabHistory) -> float:
    """Loss-free bias update from the step's loads (every micro-batch) summed over every rank holding each gate;
    returns the mean MaxVio over the gates."""
    keys = [g.weight for g in meter.gates]  # a gate's weight names its holders
    total = runner.sum_over_holders(dict(zip(keys, meter.counts().float().to(device()))))
    loads = torch.stack([total[k] for k in keys])  # (n_gates, E)
    if balancer is not None:
        balancer.update(loads)
    for key, row in zip(keys, loads):
        hist.loads.setdefault(runner.names[key].removesuffix(".gate.weight"), []).append(row.cpu().tolist())
    _check_identical(runner, {g.weight: g.bias for g in meter.gates})
    return statistics.mean(max_violation(row) for row in loads)


def _check_identical(runner: ParallelRunner, values: dict) -> None:
    """Every holder of each gate has the same bias: the minimum and maximum over the replicas and the mean over
    all holders (DualPipe's partner too; exact in float64) all equal this rank's value."""
    flat = torch.cat([v.flatten() for v in values.values()])
    lo, hi = flat.clone(), flat.clone()
    group = runner.layout.replica_group
    if runner.layout.n_replicas > 1:
        dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=group)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=group)
    summed = runner.sum_over_holders({w: v.double() for w, v in values.items()})
    holders = runner.sum_over_holders({w: torch.ones_like(v, dtype=torch.float64) for w, v in values.items()})
    mean = torch.cat([(summed[w] / holders[w]).flatten() for w in values])
    if not (torch.equal(lo, flat) and torch.equal(hi, flat) and torch.equal(mean, flat.double())):
        raise RuntimeError(f"rank {dist.get_rank()}: gate biases differ between the ranks that hold them")


def _clip(runner: ParallelRunner, max_norm: float) -> float:
    """Clip by the global gradient norm: each distinct parameter counted once (replicas and DualPipe's copies
    hold equal gradients; the first holder counts them)."""
    lay = runner.layout
    experts = set(runner.expert_params)
    partners = {q: peer for peer, qs in runner.tied.items() for q in qs}
    sq = torch.zeros((), dtype=torch.float64, device=device())
    for q in runner.parameters():
        first_replica = lay.replica == 0 or (q in experts and lay.dp_rank == 0)
        first_copy = lay.pp_rank < partners.get(q, lay.pp + 1)
        if first_replica and first_copy:
            sq += q.grad.double().pow(2).sum()
    dist.all_reduce(sq)
    norm = sq.sqrt().item()
    if max_norm > 0 and norm > max_norm:
        for q in runner.parameters():
            q.grad.mul_(max_norm / (norm + 1e-6))
    return norm


def run(cfg: LabConfig, log=print) -> LabHistory:
    """Train as configured; every rank calls this inside a process group. Returns the history (on every rank)."""
    layout = ParallelLayout(pp=cfg.pp, ep=cfg.ep, dp=cfg.dp)
    mcfg = cfg.model_config()
    torch.manual_seed(cfg.seed)
    model = Transformer(mcfg).to(device())
    runner = parallelize(model, layout, make_schedule(cfg.schedule, cfg.pp, cfg.n_micro), fp8=cfg.fp8,
                         overlap=cfg.overlap, bitwise=cfg.bitwise)
    tcfg = TrainConfig(steps=cfg.steps, lr=cfg.lr, warmup_steps=min(20, max(1, cfg.steps // 10)))
    opt = torch.optim.AdamW(runner.parameters(), lr=cfg.lr, betas=(tcfg.beta1, tcfg.beta2),
                            weight_decay=tcfg.weight_decay)
    meter = LoadMeter(_rank_gates(runner))  # counts every micro-batch's routing until reset()
    balancer = BiasBalancer(_rank_gates(runner), cfg.gamma) if cfg.gamma > 0 else None
    hist, start, saved = LabHistory(), 0, None  # saved: the step of the checkpoint in out/shards
    expect = {"config": mcfg.to_dict(), "layout": cfg.layout_meta()}
    if cfg.resume:
        meta = shards.load_shards(runner, opt, f"{cfg.out}/shards", expect)
        start, hist = meta["step"], LabHistory(**meta["history"])
        saved = start
    corpus = load_corpus()
    rows = layout.n_replicas * cfg.n_micro * cfg.micro_rows
    data = batches(corpus.train, rows, cfg.seq_len, seed=cfg.seed)  # the same stream on every rank
    for _ in range(start):
        next(data)
    bar = _progress(cfg, start) if dist.get_rank() == 0 and cfg.progress else None
    try:
        for step in range(start, cfg.steps):
            x, y = (t.to(device()) for t in next(data))
            t0 = time.perf_counter()
            for group in opt.param_groups:
                group["lr"] = lr_at(step, tcfg)
            runner.set_mtp_lambda(mtp_lambda_at(step, cfg.steps))
            opt.zero_grad(set_to_none=True)
            meter.reset()
            loss = runner.step(x, y).item()
            norm = _clip(runner, cfg.grad_clip)
            if not (math.isfinite(loss) and math.isfinite(norm)):  # equal on every rank: all stop here
                raise FloatingPointError(f"step {step + 1}: loss {loss}, gradient norm {norm}; stopped before its "
                                         f"update, {_kept(cfg, saved)}")
            opt.step()
            vio = _balance(runner, meter, balancer, hist)
            hist.steps.append(step + 1)
            hist.loss.append(loss)
            hist.main_loss.append(runner.last_parts[0].item())
            hist.mtp_loss.append(runner.last_parts[1].item())
            hist.max_vio.append(vio)
            hist.seconds.append(time.perf_counter() - t0)
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{x.numel() / hist.seconds[-1]:,.0f}", refresh=False)
                bar.update(1)
            if cfg.log_every and dist.get_rank() == 0 and (step + 1) % cfg.log_every == 0:
                log(f"step {step + 1}/{cfg.steps}: loss {loss:.4f} (main {hist.main_loss[-1]:.4f}, MTP "
                    f"{hist.mtp_loss[-1]:.4f}), MaxVio {vio:.2f}, {x.numel() / hist.seconds[-1]:,.0f} tokens/s")
            done = step + 1 == cfg.steps
            if cfg.val_every and ((step + 1) % cfg.val_every == 0 or done):
                full = shards.merge(runner, mcfg)
                val = [evaluate(full, corpus.val, batch_size=8, seq_len=cfg.seq_len, max_batches=4)] if full else [0.0]
                dist.broadcast_object_list(val, src=0)
                hist.val_steps.append(step + 1)
                hist.val_loss.append(val[0])
                if dist.get_rank() == 0:
                    (bar.write if bar is not None else log)(f"step {step + 1}: validation loss {val[0]:.4f}")
            if cfg.out and ((cfg.ckpt_every and (step + 1) % cfg.ckpt_every == 0) or done):
                meta = {**expect, "step": step + 1, "history": asdict(hist)}
                shards.save_shards(runner, opt, f"{cfg.out}/shards", meta)
                saved = step + 1
    except KeyboardInterrupt as e:  # each rank stops where it is: no collective save (peers may be mid-step)
        raise KeyboardInterrupt(f"interrupted; {_kept(cfg, saved)}") from e
    finally:
        if bar is not None:
            bar.close()
    timeline = runner.pipeline.gather_events()  # the last step's measured timeline, every pipeline rank
    if cfg.out:
        shards.save_merged(runner, mcfg, f"{cfg.out}/hf", fp8=True)
        if dist.get_rank() == 0:
            torch.save({"timeline": timeline, "schedule": runner.pipeline.schedule}, f"{cfg.out}/timeline.pt")
    return hist


def _kept(cfg: LabConfig, saved: int | None) -> str:
    if saved is None:
        return "no checkpoint was written"
    return f"the checkpoint in {cfg.out}/shards holds step {saved} (--resume continues from it)"


def _progress(cfg: LabConfig, start: int):
    from tqdm.auto import tqdm

    return tqdm(total=cfg.steps, initial=start, desc="lab train", unit="step", mininterval=1.0)
