"""Checkpoints: our own directories and training state (chapter 0).

:func:`save` / :func:`load`: ``model.safetensors`` (all parameters and persistent buffers, gate biases
included, a tied head once) + ``config.json`` = ``{"model": cfg.to_dict(), **extra}``.
:func:`save_training_state` adds ``training_state.pt`` (optimizer, scheduler, step, RNG) for resuming.
Every directory is written through :func:`atomic_write_dir`; loading builds the model on the meta device
and checks every name and shape from the headers first, failing with one line that names the tensor.
The release's Hugging Face layout (HF names, shards, FP8 blocks) is :mod:`dsv3lib.hf`, built on the
private helpers here.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .config import ModelConfig
from .model import Transformer
from .model.rope import precompute_freqs_cis

__all__ = ["atomic_write_dir", "save", "load", "load_weights_into", "save_training_state",
           "load_training_state", "capture_rng_states", "restore_rng_states"]

WEIGHTS, CONFIG, TRAINING_STATE = "model.safetensors", "config.json", "training_state.pt"


@contextlib.contextmanager
def atomic_write_dir(directory: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary directory to fill; on a clean exit it replaces ``directory`` whole.

    The temporary directory is a sibling (``.tmp-<name>-*``): rename is atomic only within a file system.
    Files are fsynced, an existing ``directory`` renamed aside (``.old-<name>-*``), the new one renamed in,
    the old one removed. On an error the temporary directory is removed and ``directory`` left as it was;
    a crash between the renames leaves the whole old checkpoint at ``.old-*``, never a half-written one.
    """
    target = Path(directory)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{target}: exists and is not a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        for p in [*sorted(tmp.rglob("*"), reverse=True), tmp]:  # files before their directories
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)  # mkdtemp's 0700 is for the temp only
            _fsync(p)
        aside = target.parent / f".old-{target.name}-{secrets.token_hex(4)}"
        if target.exists():
            os.rename(target, aside)
        try:
            os.rename(tmp, target)
        except BaseException:
            if aside.exists():
                os.rename(aside, target)
            raise
        _fsync(target.parent)
        shutil.rmtree(aside, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _fsync(path: Path) -> None:
    with contextlib.suppress(OSError):  # some platforms (Windows) cannot open or fsync a directory
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _need(path: Path) -> Path:
    if path.is_file():
        return path
    raise FileNotFoundError(f"{path}: not found")


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(_need(path).read_text(encoding="utf-8"))


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


def _aliases(model: nn.Module) -> dict[str, str]:
    """Tied tensors as {alias: first name}, e.g. ``head.weight: embed.weight`` under tie_embeddings.
    safetensors refuses two names for one storage, so an alias is stored once and re-tied on load."""
    first: dict[int, str] = {}
    return {n: first[id(t)] for n, t in model.state_dict(keep_vars=True).items()
            if first.setdefault(id(t), n) != n}


def _skeleton(cfg: ModelConfig) -> Transformer:
    """The model on the meta device: structure and shapes only, no memory, no random init."""
    with torch.device("meta"):
        return Transformer(cfg)


def _cast(name: str, t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """To ``dtype``, except the gate correction biases, which stay float32: the balancing rule moves them
    by γ = 0.001 a step (V3 §2.1.2), below bf16's resolution near 1, and the gate runs in fp32 (§3.3.1)."""
    if dtype is None or not t.is_floating_point():
        return t
    return t.to(torch.float32 if name.endswith("gate.bias") else dtype)


_REBUILD = {  # non-persistent buffers (in no checkpoint), by their own name: how to rebuild them
    "freqs_cis": lambda cfg, b: precompute_freqs_cis(cfg),
}


def _materialise(model: Transformer, tensors: dict[str, torch.Tensor], device) -> Transformer:
    """Put loaded tensors into a meta model, re-tie aliases, rebuild the non-persistent buffers."""
    aliases = _aliases(model)
    model.load_state_dict(tensors | {a: tensors[c] for a, c in aliases.items()}, strict=True, assign=True)
    for alias, canonical in aliases.items():  # assign made two Parameters of one tensor: tie them again
        owner, _, leaf = alias.rpartition(".")
        setattr(model.get_submodule(owner), leaf, model.get_parameter(canonical))
    for name, buf in [(n, b) for n, b in model.named_buffers() if b.is_meta]:
        owner, _, leaf = name.rpartition(".")
        if leaf not in _REBUILD:
            raise RuntimeError(f"{name}: a non-persistent buffer checkpoint.py cannot rebuild (see _REBUILD)")
        setattr(model.get_submodule(owner), leaf, _REBUILD[leaf](model.cfg, buf).to(device))
    return model


def _check(found: dict[str, tuple], expected: dict[str, tuple], where: str, optional=(), label=str) -> None:
    """One-line ValueError for the first missing, mis-shaped or unexpected tensor (names of ours)."""
    missing = [n for n in expected if n not in found]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ValueError(f"{label(missing[0])}: missing from {where}{more}")
    for n, shape in expected.items():
        if found[n] != shape:
            raise ValueError(f"{label(n)}: shape {found[n]} in checkpoint, model expects {shape}")
    for n in [n for n in found if n not in expected and n not in optional][:1]:
        raise ValueError(f"{n}: unexpected in {where} (the model has no such tensor)")


def _read_weights(model: Transformer, directory: Path, device, dtype) -> dict[str, torch.Tensor]:
    """Our ``model.safetensors``, checked against ``model`` from the header before any data is read."""
    aliases = _aliases(model)
    expected = {n: tuple(t.shape) for n, t in model.state_dict().items() if n not in aliases}
    with safe_open(_need(directory / WEIGHTS), framework="pt", device=str(device)) as f:
        _check({n: tuple(f.get_slice(n).get_shape()) for n in f.keys()}, expected, WEIGHTS, aliases)
        return {n: _cast(n, f.get_tensor(n), dtype) for n in expected}


def save(model: Transformer, directory: str | os.PathLike, *, extra: dict | None = None) -> Path:
    """Write ``model.safetensors`` + ``config.json`` atomically. ``extra``: JSON metadata (training step,
    data position, …) stored next to the ``"model"`` config entry."""
    with atomic_write_dir(directory) as tmp:
        _write_model(model, tmp, extra)
    return Path(directory)


def _write_model(model: Transformer, tmp: Path, extra: dict | None) -> None:
    if "model" in (extra or {}):
        raise ValueError("extra: the key 'model' is reserved for the model config")
    aliases = _aliases(model)
    tensors = {n: t.detach().cpu().contiguous() for n, t in model.state_dict().items() if n not in aliases}
    save_file(tensors, tmp / WEIGHTS, metadata={"format": "pt"})
    _write_json(tmp / CONFIG, {"model": model.cfg.to_dict(), **(extra or {})})


def _read_config(directory: Path) -> dict[str, Any]:
    meta = _read_json(directory / CONFIG)
    if "model" not in meta:
        raise ValueError(f"{directory / CONFIG}: no 'model' entry (a Hugging Face directory? use load_hf)")
    return meta


def load(directory: str | os.PathLike, *, device="cpu", dtype: torch.dtype | None = None) -> Transformer:
    """Build the Transformer a :func:`save` directory describes and load its weights strictly.
    ``dtype=None`` keeps the stored dtypes; otherwise floating tensors are cast (gate biases stay fp32)."""
    directory = Path(directory)
    model = _skeleton(ModelConfig.from_dict(_read_config(directory)["model"]))
    return _materialise(model, _read_weights(model, directory, device, dtype), device)


def load_weights_into(model: Transformer, directory: str | os.PathLike) -> None:
    """Copy a checkpoint's weights into an existing model in place (its Parameters stay the same objects,
    so an optimizer built on them stays valid). The stored config must equal ``model.cfg``."""
    directory = Path(directory)
    saved = _read_config(directory)["model"]
    saved, ours = ModelConfig.from_dict(saved).to_dict(), model.cfg.to_dict()  # fields added since: defaults
    for k in [k for k in sorted(set(saved) | set(ours)) if saved.get(k) != ours.get(k)][:1]:
        raise ValueError(f"{directory / CONFIG}: model.{k} = {saved.get(k)!r}, the model has {ours.get(k)!r}")
    tensors = _read_weights(model, directory, "cpu", None)
    tensors.update({a: tensors[c] for a, c in _aliases(model).items()})
    model.load_state_dict(tensors, strict=True)  # copy_ into the existing tensors (casts dtype/device)


def capture_rng_states() -> dict[str, Any]:
    """Python, torch CPU and (if present) CUDA generator states, for an exactly resumable run."""
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def restore_rng_states(states: dict[str, Any]) -> None:
    """Set the generators back to states from :func:`capture_rng_states`."""
    random.setstate(states["python"])
    torch.set_rng_state(states["torch"])
    if states.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_training_state(directory: str | os.PathLike, model: Transformer, optimizer: torch.optim.Optimizer,
                        scheduler=None, step: int = 0, rng_states: dict | None = None,
                        extra: dict | None = None) -> Path:
    """One atomic directory: the weights as :func:`save` writes them (``extra`` + ``step`` in config.json)
    and ``training_state.pt`` = optimizer, scheduler, step and RNG states (``None``: captured now).

    Weights go to safetensors: flat {name: tensor}, loads without running code, read by other tools.
    Optimizer internals go through ``torch.save``: an optimizer state_dict is a nested tree (param groups
    with hyper-parameters, moments keyed by parameter index, step counters) that safetensors cannot hold.
    The file is ours, read back only with ``weights_only=True`` (no arbitrary unpickling), never shared.
    """
    state = {"optimizer": optimizer.state_dict(), "step": step,
             "scheduler": None if scheduler is None else scheduler.state_dict(),
             "rng_states": capture_rng_states() if rng_states is None else rng_states}
    with atomic_write_dir(directory) as tmp:
        _write_model(model, tmp, {"step": step, **(extra or {})})
        torch.save(state, tmp / TRAINING_STATE)
    return Path(directory)


def load_training_state(directory: str | os.PathLike, model: Transformer, optimizer=None,
                        scheduler=None) -> dict[str, Any]:
    """Load weights into ``model`` in place, optimizer / scheduler state into the given objects. Returns
    ``{"step", "rng_states", "extra"}``; :func:`restore_rng_states` resumes the random streams too."""
    directory = Path(directory)
    state = torch.load(_need(directory / TRAINING_STATE), map_location="cpu", weights_only=True)
    load_weights_into(model, directory)
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    extra = {k: v for k, v in _read_config(directory).items() if k != "model"}
    return {"step": state["step"], "rng_states": state["rng_states"], "extra": extra}
