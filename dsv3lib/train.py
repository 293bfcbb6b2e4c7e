"""Training loop: AdamW, warm-up + cosine schedule, clipping, validation, checkpoints, exact resume.

Chapter 0 trains the tiny preset with it; later chapters pass ``callbacks`` (the loss-free balancing
bias update of chapter 3 runs after each optimizer step) and read the per-depth MTP losses (chapter 4).

Recipe after V3 §4.2 (AdamW β = (0.9, 0.95), weight decay 0.1, clip 1.0, warm-up then cosine decay to
10% of the peak, MTP weight λ = 0.3, auxiliary-loss-free balancing); the tiny preset uses a larger peak
learning rate, a faster bias update and far fewer steps.

CLI::

    python -m dsv3lib.train --preset tiny --steps 300 --out runs/tiny
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch

from . import checkpoint
from .balancing import BiasBalancer, LoadMeter, balance_loss, capture_routing
from .config import ModelConfig
from .data import batches, eval_batches, load_corpus, unigram_entropy
from .model import Transformer, eval_mode, mtp_loss

__all__ = ["TrainConfig", "History", "StepInfo", "train", "evaluate", "lr_at", "make_optimizer", "main"]


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 400  # about a minute for the tiny preset on 2 CPU cores
    batch_size: int = 16
    seq_len: int = 64
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr · min_lr_ratio
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    mtp_lambda: float = 0.3  # V3: 0.3 for the first 10T tokens, then 0.1
    bias_update_speed: float = 0.01  # γ of loss-free balancing (V3: 0.001); 0 turns balancing off
    aux_loss_alpha: float = 0.0  # α of an auxiliary balance loss added to the loss (V3: 1e-4); 0: none
    aux_loss: str = "sequence"  # "sequence" (V3 eq. 17–20) or "batch" (Switch/GShard, Wang et al. eq. 2)
    eval_every: int = 50
    eval_batches: int = 8
    checkpoint_every: int = 0  # 0: only at the end (when an output directory is given)
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ["steps", "batch_size", "seq_len", "eval_every", "eval_batches"]:
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ["warmup_steps", "checkpoint_every", "weight_decay", "grad_clip", "mtp_lambda",
                     "bias_update_speed", "aux_loss_alpha"]:
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr: must be > 0, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio}")
        if self.aux_loss not in ("sequence", "batch"):
            raise ValueError(f"aux_loss: must be 'sequence' or 'batch', got {self.aux_loss!r}")


@dataclass
class History:
    """Losses per step (train) and per evaluation (val), in nats per token."""

    step: list[int] = field(default_factory=list)
    loss: list[float] = field(default_factory=list)  # the optimised total: main + λ·mean(MTP) (+ aux loss)
    main_loss: list[float] = field(default_factory=list)
    mtp_loss: list[list[float]] = field(default_factory=list)  # per step, one value per depth
    lr: list[float] = field(default_factory=list)
    grad_norm: list[float] = field(default_factory=list)
    val_step: list[int] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "History":
        return cls(**d)


@dataclass
class StepInfo:
    """What a callback sees after each optimizer step."""

    step: int  # steps completed
    model: Transformer
    optimizer: torch.optim.Optimizer
    history: History
    loads: torch.Tensor  # (n_gates, E) tokens per expert of each gate in this step (LoadMeter.counts)


def lr_at(step: int, tcfg: TrainConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warm-up, then cosine to the floor."""
    if step < tcfg.warmup_steps:
        return tcfg.lr * (step + 1) / tcfg.warmup_steps
    span = max(1, tcfg.steps - tcfg.warmup_steps)
    progress = min(1.0, (step - tcfg.warmup_steps) / span)
    floor = tcfg.lr * tcfg.min_lr_ratio
    return floor + (tcfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, tcfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW; matrices decay, vectors (norm weights) do not. Fused on CPU and GPU alike."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": tcfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=tcfg.lr, betas=(tcfg.beta1, tcfg.beta2), fused=True)


@torch.no_grad()
def evaluate(model: Transformer, tokens: torch.Tensor, *, batch_size: int = 16, seq_len: int = 128,
             max_batches: int | None = 8) -> float:
    """Mean next-token cross-entropy (nats) of the main model over deterministic windows of ``tokens``."""
    total, count = 0.0, 0
    device = model.embed.weight.device
    with eval_mode(model):
        for x, y in eval_batches(tokens, batch_size, seq_len, max_batches=max_batches):
            logits = model(x.to(device), mtp=False).logits
            total += torch.nn.functional.cross_entropy(
                logits.flatten(0, 1).float(), y.to(device).flatten(), reduction="sum").item()
            count += y.numel()
    return total / count


def _loss(model: Transformer, x: torch.Tensor, y: torch.Tensor, tcfg: TrainConfig):
    """One step's (loss, main, per-depth MTP losses); with ``aux_loss_alpha`` > 0 the loss includes the
    auxiliary balance loss of the routings this forward captured (they go when this function returns)."""
    if tcfg.aux_loss_alpha == 0:
        return mtp_loss(model(x), y, tcfg.mtp_lambda)
    with capture_routing(model) as routings:
        out = model(x)
    loss, main, depth = mtp_loss(out, y, tcfg.mtp_lambda)
    return loss + balance_loss(routings, tcfg.aux_loss, tcfg.aux_loss_alpha), main, depth


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm  # a widget in Jupyter, text in a terminal

    # at most one refresh a second: every refresh of a notebook bar is a message to the front end, and a
    # flood of them can overflow Jupyter's output channel (nbval then loses the end of the cell)
    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", unit="step", leave=True,
                mininterval=1.0)


def train(model: Transformer, tcfg: TrainConfig, *, train_tokens: torch.Tensor | None = None,
          val_tokens: torch.Tensor | None = None, out: str | Path | None = None, resume: bool = False,
          callbacks: Iterable[Callable[[StepInfo], None]] = (), progress: bool = True) -> History:
    """Train ``model`` in place for ``tcfg.steps`` optimizer steps and return the loss history.

    Args:
        train_tokens, val_tokens: 1-D token tensors (default: the book's corpus, :func:`load_corpus`).
        out: directory for checkpoints (model.safetensors + config.json + training state); with
            ``resume=True`` training continues from the checkpoint there, bit-for-bit as if uninterrupted.
        callbacks: called after every optimizer step with a :class:`StepInfo` (with the step's expert
            loads), after the loss-free balancing update (``tcfg.bias_update_speed``) of the gate biases.
    """
    if train_tokens is None or val_tokens is None:
        corpus = load_corpus()
        train_tokens = corpus.train if train_tokens is None else train_tokens
        val_tokens = corpus.val if val_tokens is None else val_tokens
    device = model.embed.weight.device
    optimizer = make_optimizer(model, tcfg)
    history, start = History(), 0
    if resume:
        if out is None:
            raise ValueError("resume: needs an output directory to resume from")
        state = checkpoint.load_training_state(out, model, optimizer)
        start, history = state["step"], History.from_dict(state["extra"]["history"])
        if state["extra"].get("train") != dataclasses.asdict(tcfg):
            raise ValueError("resume: the TrainConfig differs from the one the checkpoint was trained with")
    data = batches(train_tokens, tcfg.batch_size, tcfg.seq_len, seed=tcfg.seed)
    for _ in range(start):  # the batch stream is a pure function of (seed, step): skip what was used
        next(data)

    if tcfg.bias_update_speed > 0:
        callbacks = [BiasBalancer(model, tcfg.bias_update_speed), *callbacks]
    meter = LoadMeter(model)  # the expert loads of each step, for the balancer and other callbacks
    model.train()
    t0 = time.perf_counter() - history.seconds
    bar = _progress(tcfg.steps, start, progress)
    try:
        for step in range(start, tcfg.steps):
            x, y = (t.to(device) for t in next(data))
            lr = lr_at(step, tcfg)
            for group in optimizer.param_groups:
                group["lr"] = lr
            meter.reset()  # this step's loads only (not the evaluation's)
            loss, main, depth = _loss(model, x, y, tcfg)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), tcfg.grad_clip or float("inf"))
            optimizer.step()

            history.step.append(step + 1)
            history.loss.append(loss.item())
            history.main_loss.append(main.item())
            history.mtp_loss.append([d.item() for d in depth])
            history.lr.append(lr)
            history.grad_norm.append(norm.item())
            info = StepInfo(step + 1, model, optimizer, history, meter.counts())
            for callback in callbacks:
                callback(info)
            done = step + 1
            if done % tcfg.eval_every == 0 or done == tcfg.steps:
                history.val_step.append(done)
                history.val_loss.append(evaluate(model, val_tokens, batch_size=tcfg.batch_size,
                                                 seq_len=tcfg.seq_len, max_batches=tcfg.eval_batches))
                bar.set_postfix(loss=f"{history.main_loss[-1]:.3f}", val=f"{history.val_loss[-1]:.3f}")
            history.seconds = time.perf_counter() - t0
            periodic = tcfg.checkpoint_every and done % tcfg.checkpoint_every == 0
            if out is not None and (done == tcfg.steps or periodic):
                checkpoint.save_training_state(out, model, optimizer, step=done,
                                               extra={"train": dataclasses.asdict(tcfg), "history": history.to_dict()})
            bar.update(1)
    finally:  # also when a step raises: no hook stays on the gates
        bar.close()
        meter.close()
    return history


def main(argv: list[str] | None = None) -> History:
    p = argparse.ArgumentParser(prog="python -m dsv3lib.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny", help="ModelConfig preset (default: tiny)")
    p.add_argument("--steps", type=int, default=TrainConfig.steps)
    p.add_argument("--out", required=True, help="checkpoint directory")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --out")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda (default: cuda when available)")
    knobs = ["batch_size", "seq_len", "lr", "warmup_steps", "mtp_lambda", "bias_update_speed", "aux_loss_alpha",
             "aux_loss", "eval_every",
             "checkpoint_every", "seed"]
    for name in knobs:
        default = getattr(TrainConfig, name)
        p.add_argument("--" + name.replace("_", "-"), type=type(default), default=default)
    args = p.parse_args(argv)
    tcfg = TrainConfig(steps=args.steps, **{k: getattr(args, k) for k in knobs})
    torch.manual_seed(tcfg.seed)
    model = Transformer(ModelConfig.preset(args.preset)).to(args.device)
    corpus = load_corpus()
    history = train(model, tcfg, out=args.out, resume=args.resume)
    h = unigram_entropy(corpus.train)
    print(f"steps {tcfg.steps}  time {history.seconds:.1f} s  train loss {history.main_loss[-1]:.3f}  "
          f"val loss {history.val_loss[-1]:.3f} nats  (unigram entropy {h:.3f})  checkpoint {args.out}")
    return history


if __name__ == "__main__":
    main()
