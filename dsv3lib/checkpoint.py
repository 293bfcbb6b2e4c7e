"""Checkpoints: our own directories and training state (chapter 0).

:func:`save` / :func:`load`: ``model.safetensors`` (all parameters and persistent buffers, gate biases
included, a tied head once) + ``config.json`` = ``{"model": cfg.to_dict(), **extra}``.
:func:`save_training_state` adds ``training_state.pt`` (optimizer, scheduler, step, RNG) for resuming.
Every directory is written through :func:`atomic_write_dir`, and a save killed midway is recovered by the next
load or save (:func:`recover`); loading builds the model on the meta device and checks every name, shape and
dtype from the headers first, failing with one line that names the tensor (a damaged file: the file).
The release's Hugging Face layout (HF names, shards, FP8 blocks) is :mod:`dsv3lib.hf`, built on the
private helpers here.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import random
import shutil
import struct
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .config import ModelConfig
from .model import Transformer
from .model.rope import precompute_freqs_cis

__all__ = ["atomic_write_dir", "recover", "check_writable", "save", "load", "load_weights_into", "save_training_state",
           "load_training_state", "capture_rng_states", "restore_rng_states"]

WEIGHTS, CONFIG, TRAINING_STATE = "model.safetensors", "config.json", "training_state.pt"


@contextlib.contextmanager
def atomic_write_dir(directory: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temporary directory to fill; on a clean exit it replaces ``directory`` whole.

    The temporaries are siblings (rename is atomic only within a file system) whose name says how far a save
    got: ``.tmp-<name>-*`` is being written; once its files are fsynced it is renamed ``.new-<name>-<time>``
    (complete); an existing ``directory`` is renamed ``.old-<name>-<time>``, the new one renamed in, the old
    one removed. On an error ``directory`` is left as it was. A crash at any point leaves a complete
    checkpoint: at ``directory`` or, between the renames, at ``.new-*`` / ``.old-*``, which the next save or
    load of ``directory`` moves back (:func:`recover`, the newest first); the next save also removes the
    temporaries a killed save left. One writer per directory at a time.
    """
    target = _target(directory)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{target}: exists and is not a directory")
    target.parent.mkdir(parents=True, exist_ok=True)
    recover(target)
    for stale in [p for kind in ("tmp", "new", "old") for p in _siblings(target, kind)]:
        shutil.rmtree(stale, ignore_errors=True)  # a killed save's; ``target`` holds the newest complete one
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        for p in [*sorted(tmp.rglob("*"), reverse=True), tmp]:  # files before their directories
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~umask)  # mkdtemp's 0700 is for the temp only
            _fsync(p)
        stamp = f"{time.time_ns():020d}"  # orders the copies of crashed saves: newest last
        done = target.parent / f".new-{target.name}-{stamp}"
        os.rename(tmp, done)
        tmp = done  # complete from here: kept while ``target`` is missing
        aside = target.parent / f".old-{target.name}-{stamp}"
        if target.exists():
            os.rename(target, aside)
        try:
            os.rename(done, target)
        except BaseException:
            if aside.exists():
                os.rename(aside, target)
            raise
        _fsync(target.parent)
        shutil.rmtree(aside, ignore_errors=True)
    except BaseException:
        if tmp.name.startswith(".tmp-") or target.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _target(directory: str | os.PathLike) -> Path:
    if not isinstance(directory, (str, os.PathLike)):
        raise TypeError(f"directory: expected a path, got {type(directory).__name__}")
    target = Path(directory)
    if str(directory) == "" or target.name in ("", ".", ".."):
        raise ValueError(f"{str(directory)!r}: names no directory a checkpoint can replace (give a sub-directory)")
    return target


def check_writable(directory: str | os.PathLike) -> Path:
    """Fail now, in one line, where :func:`atomic_write_dir` would fail at the end of a long run: ``directory``
    is a file, or its nearest existing ancestor is a file or not writable."""
    target = _target(directory)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{target}: exists and is not a directory")
    base = next(a for a in [target.parent, *target.parent.parents] if a.exists() or a == Path(a.anchor or "."))
    if not base.is_dir():
        raise NotADirectoryError(f"{base}: is a file, cannot hold {target}")
    if not os.access(base, os.W_OK | os.X_OK):
        raise PermissionError(f"{base}: not writable, cannot create {target} there")
    return target


def _siblings(target: Path, kind: str) -> list[Path]:
    """``target``'s temporaries of one kind (``tmp``, ``new``, ``old``), oldest first for new/old."""
    prefix = f".{kind}-{target.name}-"
    if not target.parent.is_dir():
        return []
    return sorted(p for p in target.parent.iterdir()  # the suffix has no '-': not another target's
                  if p.name.startswith(prefix) and "-" not in p.name[len(prefix):] and p.is_dir())


def recover(directory: str | os.PathLike) -> Path | None:
    """If a save crashed between the renames of :func:`atomic_write_dir` and ``directory`` is missing, move
    its newest complete copy back (``.new-*``, else ``.old-*``) and return where it was; else None."""
    target = Path(directory)
    if target.exists():
        return None
    for copy in [*reversed(_siblings(target, "new")), *reversed(_siblings(target, "old"))]:
        os.rename(copy, target)
        _fsync(target.parent)
        return copy
    return None


def _checkpoint_dir(directory: str | os.PathLike) -> Path:
    """A directory to read: recovered first (:func:`recover`); one line if it is missing or a file."""
    target = _target(directory)
    recover(target)
    if target.is_file():
        raise NotADirectoryError(f"{target}: is a file, expected a checkpoint directory")
    if not target.exists():
        unfinished = _siblings(target, "tmp")
        why = f" (only {unfinished[0].name}: a save that never finished)" if unfinished else ""
        raise FileNotFoundError(f"{target}: no such checkpoint directory{why}")
    return target


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


# what a damaged file raises from deep inside its reader (an OSError with a file name already names it)
_SAFETENSORS_ERRORS = (SafetensorError, OSError)
_PICKLE_ERRORS = (pickle.UnpicklingError, EOFError, struct.error, RuntimeError, OSError, ValueError, TypeError,
                  AttributeError, IndexError, KeyError)


@contextlib.contextmanager
def _reading(path: Path, what: str, errors: tuple[type[BaseException], ...]) -> Iterator[None]:
    """Re-raise ``errors`` from reading ``path`` as one ValueError line that names the file (cause chained)."""
    try:
        yield
    except errors as e:
        if isinstance(e, FileNotFoundError) or (isinstance(e, OSError) and e.filename is not None):
            raise
        first = (str(e).strip().splitlines() or [""])[0]
        raise ValueError(f"{path}: not a readable {what} ({type(e).__name__}: {first})") from e


def _read_json(path: Path) -> dict[str, Any]:
    """A JSON object from ``path``; a damaged, non-UTF-8 or non-object file fails in one line naming it."""
    with _reading(path, "JSON file", (json.JSONDecodeError, UnicodeDecodeError, RecursionError)):
        obj = json.loads(_need(path).read_bytes().decode("utf-8"))
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object {{...}}, got a {type(obj).__name__}")
    return obj


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
    """To ``dtype``, except the gate correction biases, which are float32 whatever was stored: the balancing
    rule moves them by γ = 0.001 a step (V3 §2.1.2), below bf16's resolution near 1, and the gate runs in
    fp32 (§3.3.1)."""
    if not t.is_floating_point():
        return t
    if name.endswith("gate.bias"):
        return t.float()
    return t if dtype is None else t.to(dtype)


_FLOATS = ("F16", "BF16", "F32", "F64")  # safetensors' names of the dtypes a floating tensor may be stored in


def _check_dtype(label: str, stored: str, where: str) -> None:
    """Every tensor of the model is floating: refuse e.g. an I32 weight, which would load and fail later."""
    if stored not in _FLOATS:
        raise ValueError(f"{label}: stored as {stored} in {where}; the model expects a floating-point tensor "
                         f"({', '.join(_FLOATS)})")


def _check_finite(label: str, t: torch.Tensor, where: str) -> torch.Tensor:
    """NaN or inf in a weight is never a model to use: refused by name, on save and on load."""
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{label}: contains NaN or inf ({where})")
    return t


def _own_cpu(t: torch.Tensor) -> torch.Tensor:
    """``t`` detached, on the CPU, contiguous and in a storage of its own: safetensors refuses tensors that share
    memory (a packed MoE's expert weights are slices of one buffer, :meth:`MoE.pack_experts`). Copies only
    where one of those does not already hold."""
    t = t.detach().cpu().contiguous()
    return t if t.untyped_storage().nbytes() == t.numel() * t.element_size() else t.clone()


def _check_load_args(device, dtype) -> torch.device:
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point
                                  and dtype.itemsize >= 2):
        raise TypeError(f"dtype: expected None or a torch.dtype of 16 bits or more such as torch.bfloat16, "
                        f"got {dtype!r}")
    try:
        dev = torch.device(device)
        torch.empty(0, device=dev)  # e.g. 'cuda' where torch has none: fail here, not inside the reader
    except (RuntimeError, AssertionError, TypeError) as e:
        raise ValueError(f"device: {device!r} is not usable here ({(str(e).splitlines() or [''])[0]})") from e
    if dev.type == "meta":
        raise ValueError("device: 'meta' holds no data to load into (the structure alone: build the model on it)")
    return torch.device("cpu") if dev.type == "cpu" else dev  # safetensors reads 'cpu', not 'cpu:0'


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


def _available_memory(device: torch.device) -> tuple[float, str]:
    """Bytes free for new tensors on ``device`` and where the number comes from (for error messages);
    ``inf`` where it cannot be told."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0], f"free on {device} (torch.cuda.mem_get_info)"
    if device.type != "cpu":
        return math.inf, ""
    try:
        with open("/proc/meminfo") as f:
            kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
        return kib * 1024, "MemAvailable in /proc/meminfo"
    except (OSError, StopIteration, ValueError, IndexError):
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "physical RAM (os.sysconf)"
        except (AttributeError, ValueError, OSError):
            return math.inf, ""


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
    path = _need(directory / WEIGHTS)
    with _reading(path, "safetensors file", _SAFETENSORS_ERRORS), \
            safe_open(path, framework="pt", device=str(device)) as f:
        _check({n: tuple(f.get_slice(n).get_shape()) for n in f.keys()}, expected, WEIGHTS, aliases)
        for n in expected:
            _check_dtype(n, f.get_slice(n).get_dtype(), WEIGHTS)
        return {n: _check_finite(n, _cast(n, f.get_tensor(n), dtype), f"in {path}") for n in expected}


def save(model: Transformer, directory: str | os.PathLike, *, extra: dict | None = None) -> Path:
    """Write ``model.safetensors`` + ``config.json`` atomically. ``extra``: JSON metadata (training step,
    data position, …) stored next to the ``"model"`` config entry."""
    meta = _model_meta(model, extra)
    with atomic_write_dir(directory) as tmp:
        _write_model(model, tmp, meta)
    return Path(directory)


def _model_meta(model: Transformer, extra: dict | None) -> dict[str, Any]:
    """config.json's content, checked before anything is written."""
    if not isinstance(model, nn.Module) or not isinstance(getattr(model, "cfg", None), ModelConfig):
        raise TypeError(f"model: expected a dsv3lib Transformer, got {type(model).__name__}")
    if extra is not None and not isinstance(extra, dict):
        raise TypeError(f"extra: expected a dict of JSON values, got {type(extra).__name__}")
    if "model" in (extra or {}):
        raise ValueError("extra: the key 'model' is reserved for the model config")
    meta = {"model": model.cfg.to_dict(), **(extra or {})}
    try:
        json.dumps(meta)
    except (TypeError, ValueError) as e:
        raise TypeError(f"extra: not JSON-serialisable ({e})") from e
    return meta


def _write_model(model: Transformer, tmp: Path, meta: dict[str, Any]) -> None:
    aliases = _aliases(model)
    tensors = {n: _check_finite(n, _own_cpu(t), "refusing to save it")
               for n, t in model.state_dict().items() if n not in aliases}
    save_file(tensors, tmp / WEIGHTS, metadata={"format": "pt"})
    _write_json(tmp / CONFIG, meta)


def _read_config(directory: Path) -> dict[str, Any]:
    meta = _read_json(directory / CONFIG)
    if "model" not in meta:
        raise ValueError(f"{directory / CONFIG}: no 'model' entry (a Hugging Face directory? use load_hf)")
    if not isinstance(meta["model"], dict):
        raise ValueError(f"{directory / CONFIG}: 'model' must be an object of ModelConfig fields, got "
                         f"{type(meta['model']).__name__}")
    return meta


def _model_config(directory: Path, meta: dict[str, Any]) -> ModelConfig:
    try:
        return ModelConfig.from_dict(meta["model"])
    except (ValueError, TypeError) as e:
        raise ValueError(f"model.{e} (in {directory / CONFIG})") from e


def load(directory: str | os.PathLike, *, device="cpu", dtype: torch.dtype | None = None) -> Transformer:
    """Build the Transformer a :func:`save` directory describes and load its weights strictly.
    ``dtype=None`` keeps the stored dtypes; otherwise floating tensors are cast (gate biases stay fp32)."""
    device = _check_load_args(device, dtype)
    directory = _checkpoint_dir(directory)
    model = _skeleton(_model_config(directory, _read_config(directory)))
    return _materialise(model, _read_weights(model, directory, device, dtype), device)


def load_weights_into(model: Transformer, directory: str | os.PathLike) -> None:
    """Copy a checkpoint's weights into an existing model in place (its Parameters stay the same objects,
    so an optimizer built on them stays valid). The stored config must equal ``model.cfg``."""
    directory = _checkpoint_dir(directory)
    saved = _model_config(directory, _read_config(directory))
    saved, ours = saved.to_dict(), model.cfg.to_dict()  # fields added since: defaults
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
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step: expected an integer >= 0, got {step!r}")
    meta = _model_meta(model, {"step": step, **(extra or {})})
    state = {"optimizer": optimizer.state_dict(), "step": step,
             "scheduler": None if scheduler is None else scheduler.state_dict(),
             "rng_states": capture_rng_states() if rng_states is None else rng_states}
    with atomic_write_dir(directory) as tmp:
        _write_model(model, tmp, meta)
        torch.save(state, tmp / TRAINING_STATE)
    return Path(directory)


def load_training_state(directory: str | os.PathLike, model: Transformer, optimizer=None,
                        scheduler=None) -> dict[str, Any]:
    """Load weights into ``model`` in place, optimizer / scheduler state into the given objects. Returns
    ``{"step", "rng_states", "extra"}``; :func:`restore_rng_states` resumes the random streams too."""
    directory = _checkpoint_dir(directory)
    path = _need(directory / TRAINING_STATE)
    with _reading(path, "training state (torch.save file)", _PICKLE_ERRORS):
        state = torch.load(path, map_location="cpu", weights_only=True)
    missing = [k for k in ("optimizer", "step", "scheduler", "rng_states") if k not in state] \
        if isinstance(state, dict) else ["optimizer"]
    if missing:
        raise ValueError(f"{path}: not a training state (no {missing[0]!r} entry)")
    if scheduler is not None and state["scheduler"] is None:
        raise ValueError(f"{path}: holds no scheduler state (saved without a scheduler)")
    load_weights_into(model, directory)
    for name, obj in [("optimizer", optimizer), ("scheduler", scheduler)]:
        if obj is not None:
            with _reading(path, f"state for this {name}", (ValueError, KeyError, TypeError, IndexError)):
                obj.load_state_dict(state[name])
    extra = {k: v for k, v in _read_config(directory).items() if k != "model"}
    return {"step": state["step"], "rng_states": state["rng_states"], "extra": extra}
