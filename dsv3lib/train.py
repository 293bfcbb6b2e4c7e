"""Training loop: AdamW, warm-up + cosine schedule, clipping, validation, checkpoints, exact resume.

Chapter 0 trains the tiny preset with it; later chapters pass ``callbacks`` (the loss-free balancing
bias update of chapter 3 runs after each optimizer step) and read the per-depth MTP losses (chapter 4).

Recipe after V3 §4.2 (AdamW β = (0.9, 0.95), weight decay 0.1, clip 1.0, warm-up then cosine decay to
10% of the peak, MTP weight λ = 0.3, auxiliary-loss-free balancing); the tiny preset uses a larger peak
learning rate, a faster bias update and far fewer steps.

CLI::

    python -m dsv3lib.train --preset tiny --steps 300 --out runs/tiny

Bad settings fail before any training, in one line. A step whose loss or gradient norm is not finite
stops the run before its update (:class:`FloatingPointError`), leaving the last checkpoint as it was; Ctrl-C
ends the current step, saves a checkpoint of it and stops (exit status 130 from the command line).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import numbers
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch

from . import checkpoint
from .balancing import BiasBalancer, LoadMeter, balance_loss, capture_routing
from .accounting import param_counts
from .config import PRESETS, ModelConfig
from .data import batches, eval_batches, load_corpus, unigram_entropy
from .model import Transformer, eval_mode, mtp_loss

__all__ = ["TrainConfig", "History", "StepInfo", "check_run", "train", "evaluate", "lr_at", "make_optimizer", "main"]


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
        kinds = {"int": numbers.Integral, "float": numbers.Real, "str": str}  # the annotations, as strings
        for f in dataclasses.fields(self):
            value, kind = getattr(self, f.name), kinds.get(f.type, object)
            if isinstance(value, bool) or not isinstance(value, kind):
                raise ValueError(f"{f.name}: expected {f.type}, got {value!r}")
            if f.type == "float" and not math.isfinite(value):
                raise ValueError(f"{f.name}: must be finite, got {value}")
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
        for name in ["beta1", "beta2"]:
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"{name}: must be in [0, 1), got {getattr(self, name)}")


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


def check_run(cfg: ModelConfig, tcfg: TrainConfig, out: str | Path | None, resume: bool) -> None:
    """What :func:`train` would otherwise find out late, as one-line errors: windows longer than the
    model's positions, an output directory that cannot be written (found at the end of the run) or that
    holds other files (a checkpoint replaces its directory whole)."""
    if tcfg.seq_len > cfg.max_seq_len:
        raise ValueError(f"seq_len: {tcfg.seq_len} exceeds the model's max_seq_len {cfg.max_seq_len}")
    if resume and out is None:
        raise ValueError("resume: needs an output directory to resume from")
    if out is not None:
        target = checkpoint.check_writable(out)
        if target.is_dir() and any(target.iterdir()) and not (target / checkpoint.CONFIG).exists():
            raise ValueError(f"out: {target} holds files but no checkpoint (no {checkpoint.CONFIG}); saving "
                             "replaces the whole directory, so give a new one")


@contextlib.contextmanager
def _sigint_at_step_end():
    """While training: a Ctrl-C (SIGINT) is noted in the yielded list and acted on at the end of the step, so
    the checkpoint saved on it holds a whole step; a second Ctrl-C interrupts at once. Only where Python's
    own handler is installed (the main thread, not under a handler someone else set)."""
    pending: list[int] = []
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield pending
        return

    def note(signum, frame):
        pending.append(signum)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        print("interrupt: finishing this step, then saving (Ctrl-C again to stop now)", file=sys.stderr, flush=True)

    signal.signal(signal.SIGINT, note)
    try:
        yield pending
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _kept(out, saved: int | None) -> str:
    return f"the checkpoint in {out} holds step {saved}" if saved is not None else "no checkpoint was written"


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

    Raises:
        FloatingPointError: a step's loss or gradient norm is not finite; raised before that step's update,
            and ``out`` keeps the last checkpoint written before it.
        KeyboardInterrupt: Ctrl-C, acted on at the end of the step; a checkpoint of the last whole step is
            saved to ``out`` first (the message says which).
    """
    check_run(model.cfg, tcfg, out, resume)
    if train_tokens is None or val_tokens is None:
        corpus = load_corpus()
        train_tokens = corpus.train if train_tokens is None else train_tokens
        val_tokens = corpus.val if val_tokens is None else val_tokens
    for name, t in [("train_tokens", train_tokens), ("val_tokens", val_tokens)]:
        if not (isinstance(t, torch.Tensor) and t.dim() == 1 and not t.is_floating_point() and not t.is_complex()):
            raise ValueError(f"{name}: expected a 1-D tensor of token ids, got "
                             f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__} "
                             f"{t.dtype if isinstance(t, torch.Tensor) else ''}".rstrip())
        if len(t) < tcfg.seq_len + 1:
            raise ValueError(f"{name}: {len(t)} tokens, fewer than one window of seq_len + 1 = {tcfg.seq_len + 1}")
    device = model.embed.weight.device
    optimizer = make_optimizer(model, tcfg)
    history, start, saved = History(), 0, None  # saved: the step of the checkpoint in ``out``
    if resume:
        state = checkpoint.load_training_state(out, model, optimizer)
        extra, ours = state["extra"], dataclasses.asdict(tcfg)
        if not isinstance(extra.get("train"), dict) or not isinstance(extra.get("history"), dict):
            raise ValueError(f"resume: {out} has no 'train' and 'history' entries in config.json (not written "
                             "by dsv3lib.train)")
        for k in [k for k in sorted(set(extra["train"]) | set(ours)) if extra["train"].get(k) != ours.get(k)][:1]:
            raise ValueError(f"resume: {k} = {extra['train'].get(k)!r} in {out}'s checkpoint, {ours.get(k)!r} "
                             "now; a run resumes with the TrainConfig it started with")
        start, history, saved = state["step"], History.from_dict(extra["history"]), state["step"]
    data = batches(train_tokens, tcfg.batch_size, tcfg.seq_len, seed=tcfg.seed)
    for _ in range(start):  # the batch stream is a pure function of (seed, step): skip what was used
        next(data)

    if tcfg.bias_update_speed > 0:
        callbacks = [BiasBalancer(model, tcfg.bias_update_speed), *callbacks]
    meter = LoadMeter(model)  # the expert loads of each step, for the balancer and other callbacks
    model.train()
    t0 = time.perf_counter() - history.seconds
    bar = _progress(tcfg.steps, start, progress)
    done, dirty = start, False  # dirty: between a step's update and the end of its bookkeeping
    try:
        with _sigint_at_step_end() as interrupted:
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
                if not (math.isfinite(loss.item()) and math.isfinite(norm.item())):
                    raise FloatingPointError(
                        f"step {step + 1}: loss {loss.item()}, gradient norm {norm.item()} (lr {lr:.3g}); stopped "
                        f"before its update, {_kept(out, saved)}")
                dirty = True
                optimizer.step()
                _record(history, step, loss, main, depth, lr, norm)
                info = StepInfo(step + 1, model, optimizer, history, meter.counts())
                for callback in callbacks:
                    callback(info)
                done = step + 1
                if done % tcfg.eval_every == 0 or done == tcfg.steps:
                    val = evaluate(model, val_tokens, batch_size=tcfg.batch_size, seq_len=tcfg.seq_len,
                                   max_batches=tcfg.eval_batches)
                    history.val_step.append(done)
                    history.val_loss.append(val)
                    bar.set_postfix(loss=f"{history.main_loss[-1]:.3f}", val=f"{val:.3f}")
                history.seconds = time.perf_counter() - t0
                dirty = False
                periodic = tcfg.checkpoint_every and done % tcfg.checkpoint_every == 0
                if out is not None and (done == tcfg.steps or periodic):
                    _save(out, model, optimizer, done, tcfg, history)
                    saved = done
                bar.update(1)
                if interrupted:
                    raise KeyboardInterrupt
    except KeyboardInterrupt as e:
        if out is not None and not dirty and saved != done:
            _save(out, model, optimizer, done, tcfg, history)
            saved = done
        where = f"during step {step + 1}'s update" if dirty else f"after step {done}"
        raise KeyboardInterrupt(f"interrupted {where}; {_kept(out, saved)}") from e
    finally:  # also when a step raises: no hook stays on the gates
        bar.close()
        meter.close()
    return history


def _record(history: History, step: int, loss, main, depth, lr: float, norm) -> None:
    history.step.append(step + 1)
    history.loss.append(loss.item())
    history.main_loss.append(main.item())
    history.mtp_loss.append([d.item() for d in depth])
    history.lr.append(lr)
    history.grad_norm.append(norm.item())


def _save(out, model: Transformer, optimizer, step: int, tcfg: TrainConfig, history: History) -> None:
    checkpoint.save_training_state(out, model, optimizer, step=step,
                                   extra={"train": dataclasses.asdict(tcfg), "history": history.to_dict()})


def main(argv: list[str] | None = None) -> History:
    p = argparse.ArgumentParser(prog="python -m dsv3lib.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="ModelConfig preset (default: tiny)")
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
    cfg, tcfg = _check_args(p, args, knobs)
    torch.manual_seed(tcfg.seed)
    model = Transformer(cfg).to(args.device)
    corpus = load_corpus()
    try:
        history = train(model, tcfg, out=args.out, resume=args.resume)
    except KeyboardInterrupt as e:
        p.exit(130, f"{p.prog}: {e}\n")
    except (FloatingPointError, ValueError, OSError) as e:  # a bad checkpoint to resume, a diverged run
        p.exit(1, f"{p.prog}: error: {e}\n")
    h = unigram_entropy(corpus.train)
    print(f"steps {tcfg.steps}  time {history.seconds:.1f} s  train loss {history.main_loss[-1]:.3f}  "
          f"val loss {history.val_loss[-1]:.3f} nats  (unigram entropy {h:.3f})  checkpoint {args.out}")
    return history


def _check_args(p: argparse.ArgumentParser, args: argparse.Namespace, knobs: list[str]):
    """Every argument checked before a model is built: one ``usage … error:`` line (exit status 2) each."""
    def flag(msg: str) -> str:  # TrainConfig's "seq_len: ..." as "--seq-len: ..."
        field, sep, rest = msg.partition(":")
        return f"--{field.replace('_', '-')}{sep}{rest}" if field in [*knobs, "steps", "out"] else msg

    try:
        tcfg = TrainConfig(steps=args.steps, **{k: getattr(args, k) for k in knobs})
        cfg = ModelConfig.preset(args.preset)
    except ValueError as e:
        p.error(flag(str(e)))
    try:
        device = torch.device(args.device)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as e:
        p.error(f"--device {args.device}: not usable here ({(str(e).splitlines() or [''])[0]})")
    params = (lambda c: c["total"] + c["mtp_total"])(param_counts(cfg))
    need = 16 * params  # fp32 weights, gradients and AdamW's two moments; activations come on top
    free, source = checkpoint._available_memory(device)
    if need > free:
        p.error(f"--preset {args.preset}: {params / 1e9:,.1f}B parameters need {need / 2**30:,.0f} GiB to train "
                f"(16 bytes each: fp32 weights, gradients, AdamW moments), more than the {free / 2**30:,.1f} GiB "
                f"{source}")
    try:
        checkpoint.check_writable(args.out)
    except (ValueError, OSError) as e:
        p.error(f"--out: {e}")
    try:
        check_run(cfg, tcfg, args.out, args.resume)
    except ValueError as e:
        p.error(flag(str(e)))
    return cfg, tcfg


if __name__ == "__main__":
    main()
