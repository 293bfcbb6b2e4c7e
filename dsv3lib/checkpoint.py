"""Checkpoints: our own directories, training state, Hugging Face DeepSeek-V3 directories (chapter 0).

:func:`save` / :func:`load`: ``model.safetensors`` (all parameters and persistent buffers, gate biases
included, a tied head once) + ``config.json`` = ``{"model": cfg.to_dict(), **extra}``.
:func:`save_training_state` adds ``training_state.pt`` (optimizer, scheduler, step, RNG) for resuming.
:func:`load_hf` / :func:`save_hf`: the release's layout: HF names, shards + ``model.safetensors.index.json``,
FP8 e4m3 weights with a float32 ``weight_scale_inv`` per 128×128 block (V3 §3.3).
Every directory is written through :func:`atomic_write_dir`; loading builds the model on the meta device
and checks every name and shape from the headers first, failing with one line that names the tensor.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
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
           "load_training_state", "capture_rng_states", "restore_rng_states", "hf_name",
           "quantize_block_fp8", "dequantize_block_fp8", "save_hf", "load_hf"]

WEIGHTS, CONFIG, TRAINING_STATE, HF_INDEX = (
    "model.safetensors", "config.json", "training_state.pt", "model.safetensors.index.json")
FP8_BLOCK = (128, 128)  # DeepSeek-V3's weight_block_size
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448


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
    "last_counts": lambda cfg, b: torch.zeros(b.shape, dtype=b.dtype),
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
    saved, ours = _read_config(directory)["model"], model.cfg.to_dict()
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


_HF_TOP = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
           "head.weight": "lm_head.weight"}
_HF_MTP = {"enorm.weight": "enorm.weight", "hnorm.weight": "hnorm.weight",
           "eh_proj.weight": "eh_proj.weight", "norm.weight": "shared_head.norm.weight"}
_HF_BLOCK = [  # inside a block, ours -> HF by prefix; first match wins
    ("attn_norm.", "input_layernorm."), ("ffn_norm.", "post_attention_layernorm."),
    ("attn.wq_a.", "self_attn.q_a_proj."), ("attn.q_norm.", "self_attn.q_a_layernorm."),
    ("attn.wq_b.", "self_attn.q_b_proj."), ("attn.wq.", "self_attn.q_proj."),
    ("attn.wkv_a.", "self_attn.kv_a_proj_with_mqa."), ("attn.kv_norm.", "self_attn.kv_a_layernorm."),
    ("attn.wkv_b.", "self_attn.kv_b_proj."), ("attn.wo.", "self_attn.o_proj."),
    ("ffn.gate.bias", "mlp.gate.e_score_correction_bias"), ("ffn.", "mlp."),
]
_HF_PROJ = {"w1": "gate_proj", "w2": "down_proj", "w3": "up_proj"}


def hf_name(name: str, n_layers: int) -> str:
    """The Hugging Face DeepSeek-V3 name of one of our state-dict names, e.g.
    ``layers.1.ffn.experts.3.w1.weight`` → ``model.layers.1.mlp.experts.3.gate_proj.weight``.

    MTP module k is layer ``n_layers + k``: its own tensors under that layer, its block's as a layer's.
    """
    if name in _HF_TOP:
        return _HF_TOP[name]
    m = re.fullmatch(r"(layers|mtp)\.(\d+)\.(.+)", name)
    if m:
        kind, i, rest = m[1], int(m[2]), m[3]
        layer = f"model.layers.{i if kind == 'layers' else n_layers + i}"
        if kind == "mtp" and rest in _HF_MTP:
            return f"{layer}.{_HF_MTP[rest]}"
        rest = rest.removeprefix("block.") if kind == "mtp" else rest
        for ours, theirs in _HF_BLOCK:
            if rest.startswith(ours):
                hf = theirs + rest[len(ours):]
                return f"{layer}." + re.sub(r"\.(w[123])\.", lambda p: f".{_HF_PROJ[p[1]]}.", hf)
    raise ValueError(f"{name}: no Hugging Face name known for this tensor")


def _fp8_target(hf: str) -> bool:
    """Quantised in the released checkpoint: the attention and FFN/expert projections. Not embedding,
    head, router (``mlp.gate``), norms, biases, nor the MTP ``eh_proj`` (stored in bf16)."""
    return bool(re.search(r"\.(self_attn|mlp)\.(.+\.)?[a-z_]*proj[a-z_]*\.weight$", hf))


def _mtp_copies(n_layers: int, n_mtp: int) -> dict[str, str]:
    """The release repeats embedding and head under each MTP layer: {HF name: our name}."""
    pairs = [("embed_tokens.weight", "embed.weight"), ("shared_head.head.weight", "head.weight")]
    return {f"model.layers.{n_layers + k}.{hf}": ours for k in range(n_mtp) for hf, ours in pairs}


def _n_blocks(shape, block) -> tuple[int, int]:
    return -(-shape[0] // block[0]), -(-shape[1] // block[1])


def quantize_block_fp8(w: torch.Tensor, block=FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """w (out, in) → e4m3 weight (out, in) and float32 scale_inv (⌈out/bo⌉, ⌈in/bi⌉): one scale per
    block, mapping its absolute maximum to 448. The reference version; chapter 1 builds the fast one."""
    (out, inn), (bo, bi) = w.shape, block
    rows, cols = _n_blocks(w.shape, block)
    blocks = torch.zeros(rows * bo, cols * bi, dtype=torch.float32, device=w.device)
    blocks[:out, :inn] = w.float()
    blocks = blocks.view(rows, bo, cols, bi)
    scale = (blocks.abs().amax(dim=(1, 3)) / FP8_MAX).clamp(min=1e-30)  # (rows, cols); all-zero blocks
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).view(rows * bo, cols * bi)
    return q[:out, :inn].to(torch.float8_e4m3fn).contiguous(), scale


def dequantize_block_fp8(w: torch.Tensor, scale_inv: torch.Tensor, block=FP8_BLOCK) -> torch.Tensor:
    """float32 ``w · scale_inv`` for a (out, in) float8 weight and its (⌈out/bo⌉, ⌈in/bi⌉) float32
    ``<name>_scale_inv``: each scale broadcast over its bo×bi block (edge blocks may be partial)."""
    if w.dim() != 2 or tuple(scale_inv.shape) != _n_blocks(w.shape, block):
        raise ValueError(f"scale_inv: shape {tuple(scale_inv.shape)}, expected {_n_blocks(w.shape, block)} "
                         f"for a {tuple(w.shape)} weight in {block[0]}x{block[1]} blocks")
    s = scale_inv.float().repeat_interleave(block[0], 0)[: w.shape[0]]
    return w.float() * s.repeat_interleave(block[1], 1)[:, : w.shape[1]]


def save_hf(model: Transformer, directory: str | os.PathLike, *, fp8: bool = False, block=FP8_BLOCK,
            shard_bytes: int | None = None) -> Path:
    """Export in the Hugging Face DeepSeek-V3 layout, atomically; tensors keep the model's dtypes.
    ``fp8=True`` stores the projections the release quantises as e4m3 + ``weight_scale_inv``; MTP layers
    get copies of embedding and head, as in the release; ``shard_bytes`` splits files (+ index.json)."""
    cfg, aliases = model.cfg, _aliases(model)
    tensors: dict[str, torch.Tensor] = {}
    for name, t in [(n, t) for n, t in model.state_dict().items() if n not in aliases]:
        hf, t = hf_name(name, cfg.n_layers), t.detach().cpu().contiguous()
        quantised = quantize_block_fp8(t, block) if fp8 and _fp8_target(hf) else (t,)
        tensors.update(zip([hf, hf + "_scale_inv"], quantised))
    for hf, ours in _mtp_copies(cfg.n_layers, cfg.n_mtp_modules).items():
        tensors[hf] = model.get_parameter(ours).detach().cpu().clone()
    hf_cfg = cfg.to_hf_config()
    if fp8:
        hf_cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                         "weight_block_size": list(block)}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = total = 0
    for hf, t in tensors.items():  # greedy: a new shard when this tensor would overflow the current one
        nbytes = t.numel() * t.element_size()
        if shard_bytes is not None and shards[-1] and size + nbytes > shard_bytes:
            shards, size = [*shards, {}], 0
        shards[-1][hf], size, total = t, size + nbytes, total + nbytes
    n = len(shards)
    files = [WEIGHTS] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    with atomic_write_dir(directory) as tmp:
        _write_json(tmp / CONFIG, hf_cfg)
        for file, shard in zip(files, shards):
            save_file(shard, tmp / file, metadata={"format": "pt"})
        if n > 1:
            weight_map = {hf: file for file, shard in zip(files, shards) for hf in shard}
            _write_json(tmp / HF_INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return Path(directory)


def _open_shards(path: Path, stack: contextlib.ExitStack, device) -> dict[str, tuple[str, Any]]:
    """{HF tensor name: (file name, open safe_open handle)} over every shard (headers only)."""
    listed = _read_json(path / HF_INDEX)["weight_map"] if (path / HF_INDEX).exists() else {}
    files = sorted(set(listed.values()) if listed else (p.name for p in path.glob("*.safetensors")))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors files")
    where: dict[str, tuple[str, Any]] = {}
    for file in files:
        f = stack.enter_context(safe_open(_need(path / file), framework="pt", device=str(device)))
        for name in f.keys():
            if name in where:
                raise ValueError(f"{name}: stored in both {where[name][0]} and {file}")
            where[name] = (file, f)
    for name, file in listed.items():
        if where.get(name, ("",))[0] != file:
            raise ValueError(f"{name}: listed in {HF_INDEX} under {file} but not stored there")
    return where


def load_hf(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, device="cpu", strict: bool = True,
            n_layers: int | None = None) -> Transformer:
    """Build a Transformer from a Hugging Face DeepSeek-V3 directory (config.json + safetensors shards).

    FP8 tensors are dequantised (block from ``quantization_config.weight_block_size``), all cast to
    ``dtype`` (gate biases stay fp32). Names and shapes are checked from the headers, then the shards read
    one tensor at a time. ``strict=False`` ignores unexpected tensors and zero-fills a missing
    ``e_score_correction_bias`` (V2-style checkpoints). ``n_layers``: keep only the first blocks (+ MTP).
    """
    path = Path(path)
    hf_cfg = _read_json(path / CONFIG)
    full = ModelConfig.from_hf_config(hf_cfg)
    cfg = full if n_layers is None else full.replace(
        n_layers=n_layers, n_dense_layers=min(full.n_dense_layers, n_layers))
    block = tuple((hf_cfg.get("quantization_config") or {}).get("weight_block_size", FP8_BLOCK))
    model = _skeleton(cfg)
    aliases, sd = _aliases(model), model.state_dict()
    to_ours = {hf_name(n, full.n_layers): n for n in sd}  # MTP k stays at layer full.n_layers + k
    expected = {n: tuple(t.shape) for n, t in sd.items() if n not in aliases}
    # copies we check and skip: MTP layers' embedding/head, and e.g. lm_head.weight of a tied model
    copies = _mtp_copies(full.n_layers, cfg.n_mtp_modules) | {hf_name(a, full.n_layers): a for a in aliases}
    label = lambda n: f"{hf_name(n, full.n_layers)} (ours: {n})"  # noqa: E731
    with contextlib.ExitStack() as stack:
        where, found, fp8 = _open_shards(path, stack, device), {}, set()
        for hf, (file, f) in where.items():  # headers only: validate everything before reading data
            s = f.get_slice(hf)
            shape, layer = tuple(s.get_shape()), re.match(r"model\.layers\.(\d+)\.", hf)
            if hf.endswith("inv_freq") or (layer and cfg.n_layers <= int(layer[1]) < full.n_layers):
                continue  # RoPE tables are recomputed; layers dropped by n_layers
            if hf.endswith("_scale_inv") and hf[: -len("_scale_inv")] in where:
                continue  # checked with its weight
            if hf in copies and shape != tuple(sd[copies[hf]].shape):
                raise ValueError(f"{hf}: shape {shape} in checkpoint, but it copies {copies[hf]} "
                                 f"{tuple(sd[copies[hf]].shape)}")
            if strict and hf not in copies and hf not in to_ours:
                raise ValueError(f"{hf}: unexpected tensor in {file} (no tensor of ours maps to it)")
            if hf in copies or hf not in to_ours:
                continue
            found[to_ours[hf]], scale = shape, hf + "_scale_inv"
            if s.get_dtype().startswith("F8"):  # needs a (⌈out/bo⌉, ⌈in/bi⌉) scale_inv next to it
                if scale not in where:
                    raise ValueError(f"{label(to_ours[hf])}: float8 tensor without its {scale}")
                got = tuple(where[scale][1].get_slice(scale).get_shape())
                want = _n_blocks(shape, block) if len(shape) == 2 else "a 2-D weight"
                if got != want:
                    raise ValueError(f"{scale}: shape {got} in checkpoint, expected {want} for "
                                     f"{shape} weight")
                fp8.add(hf)
        zero = [] if strict else [n for n in expected if n.endswith("gate.bias") and n not in found]
        _check(found | {n: expected[n] for n in zero}, expected, "the checkpoint", label=label)
        tensors = {n: torch.zeros(expected[n], device=device) for n in zero}
        for hf, (_, f) in where.items():  # in file order: shard by shard, one tensor at a time
            n = to_ours.get(hf)
            if n not in expected or n in tensors:
                continue
            t = f.get_tensor(hf)
            if hf in fp8:
                t = dequantize_block_fp8(t, where[hf + "_scale_inv"][1].get_tensor(hf + "_scale_inv"), block)
            tensors[n] = _cast(n, t, dtype)
    return _materialise(model, tensors, device)
