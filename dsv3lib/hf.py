"""Hugging Face DeepSeek-V3 directories: the release's names, shards and FP8 blocks (chapter 0).

:func:`load_hf` / :func:`save_hf` read and write the layout of ``deepseek-ai/DeepSeek-V3``: Hugging Face
tensor names (:func:`hf_name`), a ``config.json`` (:meth:`ModelConfig.from_hf_config`), shards listed in
``model.safetensors.index.json``, and FP8 e4m3 projections with a float32 ``weight_scale_inv`` per 128×128
block (V3 §3.3), quantised and dequantised by :mod:`dsv3lib.fp8.quant`'s weight quantiser (an all-zero
block gets scale 1, so it stays zeros).

A loaded model gives the logits of the released implementations (Hugging Face transformers'
``deepseek_v3``, DeepSeek's ``inference/model.py``) for any configuration ``config.json`` can express;
``tests/test_hf_fidelity.py`` checks a grid of them against an implementation written in the test. Besides
the model fields, loading reads the keys that describe the files: ``quantization_config.weight_block_size``,
``rope_interleave`` (transformers' name for DeepSeek's interleaved RoPE pairs; ``false`` is converted by
permuting the RoPE rows of the projections, which changes no logit) and ``topk_method`` (``greedy``
checkpoints have no correction bias). Directory plumbing (atomic writes, the meta-device skeleton, checks
that name the tensor) is :mod:`dsv3lib.checkpoint`'s.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .checkpoint import (
    _SAFETENSORS_ERRORS,
    CONFIG,
    TRAINING_STATE,
    WEIGHTS,
    _aliases,
    _available_memory,
    _cast,
    _check,
    _check_dtype,
    _check_finite,
    _check_load_args,
    _checkpoint_dir,
    _materialise,
    _need,
    _own_cpu,
    _read_json,
    _reading,
    _skeleton,
    _write_json,
    atomic_write_dir,
)
from .config import _HF_FIELDS, ModelConfig
from .fp8 import weight_dequant, weight_quant_ref
from .fp8.quant import check_scales
from .model import Transformer

__all__ = ["hf_name", "save_hf", "load_hf"]

HF_INDEX = "model.safetensors.index.json"
FP8_BLOCK = 128  # DeepSeek-V3's weight_block_size: [128, 128]

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


def _n_blocks(shape, block: int) -> tuple[int, int]:
    return -(-shape[0] // block), -(-shape[1] // block)


def _block_size(hf_cfg: dict[str, Any], where: Path) -> int:
    """The FP8 block edge from ``quantization_config.weight_block_size`` (square blocks, as fp8.quant's)."""
    quant = hf_cfg.get("quantization_config") or {}
    if not isinstance(quant, dict):
        raise ValueError(f"quantization_config: expected an object, got {quant!r} (in {where})")
    size = quant.get("weight_block_size") or [FP8_BLOCK, FP8_BLOCK]
    if not isinstance(size, list) or len(size) != 2 or size[0] != size[1] or not _positive_int(size[0]):
        raise ValueError(f"quantization_config.weight_block_size: {json.dumps(size)}; only square blocks [b, b] "
                         f"of an integer b >= 1 are supported (in {where})")
    return size[0]


def _positive_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 1


def save_hf(model: Transformer, directory: str | os.PathLike, *, fp8: bool = False, block: int = FP8_BLOCK,
            shard_bytes: int | None = None) -> Path:
    """Export in the Hugging Face DeepSeek-V3 layout, atomically; tensors keep the model's dtypes.
    ``fp8=True`` stores the projections the release quantises as e4m3 + ``weight_scale_inv`` in
    ``block``×``block`` blocks; MTP layers get copies of embedding and head, as in the release;
    ``shard_bytes`` splits files (+ index.json)."""
    if fp8 and not _positive_int(block):
        raise ValueError(f"block: the FP8 block edge must be an integer >= 1, got {block!r}")
    if shard_bytes is not None and not _positive_int(shard_bytes):
        raise ValueError(f"shard_bytes: must be None or an integer >= 1, got {shard_bytes!r}")
    cfg, aliases = model.cfg, _aliases(model)
    hf_cfg = cfg.to_hf_config()  # first: raises for what config.json cannot express
    tensors: dict[str, torch.Tensor] = {}
    for name, t in [(n, t) for n, t in model.state_dict().items() if n not in aliases]:
        hf, t = hf_name(name, cfg.n_layers), _own_cpu(t)
        _check_finite(hf, t, "refusing to save it")
        quantised = weight_quant_ref(t, block, name=hf) if fp8 and _fp8_target(hf) else (t,)
        tensors.update(zip([hf, hf + "_scale_inv"], quantised))
    for hf, ours in _mtp_copies(cfg.n_layers, cfg.n_mtp_modules).items():
        tensors[hf] = model.get_parameter(ours).detach().cpu().clone()
    if fp8:
        hf_cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                         "weight_block_size": [block, block]}
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
    listed = _read_json(path / HF_INDEX).get("weight_map") if (path / HF_INDEX).exists() else {}
    if not isinstance(listed, dict) or not all(isinstance(v, str) for v in listed.values()):
        raise ValueError(f"{path / HF_INDEX}: 'weight_map' must be an object {{tensor name: file name}}")
    files = sorted(set(listed.values()) if listed else (p.name for p in path.glob("*.safetensors")))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors files")
    where: dict[str, tuple[str, Any]] = {}
    for file in files:
        with _reading(path / file, "safetensors file", _SAFETENSORS_ERRORS):
            f = stack.enter_context(safe_open(_need(path / file), framework="pt", device=str(device)))
        for name in f.keys():
            if name in where:
                raise ValueError(f"{name}: stored in both {where[name][0]} and {file}")
            where[name] = (file, f)
    for name, file in listed.items():
        if where.get(name, ("",))[0] != file:
            raise ValueError(f"{name}: listed in {HF_INDEX} under {file} but not stored there")
    return where


def _rope_pairs_interleaved(hf_cfg: dict[str, Any], where: Path) -> bool:
    value = hf_cfg.get("rope_interleave", True)  # transformers' default: DeepSeek's (2i, 2i+1) pairs
    if not isinstance(value, bool):
        raise ValueError(f"rope_interleave: must be true or false, got {value!r} (in {where})")
    return value


def _hf_config(path: Path) -> dict[str, Any]:
    """config.json of a Hugging Face directory; another layout is named (with its loader) before any work."""
    if not (path / CONFIG).exists() and (path / "hf" / CONFIG).exists():
        raise FileNotFoundError(f"{path}: a lab run directory; its merged model is in {path / 'hf'}")
    hf_cfg = _read_json(path / CONFIG)
    if "model" in hf_cfg or (path / TRAINING_STATE).exists():
        raise ValueError(f"{path}: a dsv3lib checkpoint (config.json has a 'model' entry), not a Hugging Face "
                         "directory; load it with dsv3lib.checkpoint.load")
    if not any(key in hf_cfg for key in _HF_FIELDS.values()):
        raise ValueError(f"{path / CONFIG}: none of DeepSeek-V3's config keys (hidden_size, num_hidden_layers, "
                         "...); not a Hugging Face DeepSeek-V3 config.json")
    return hf_cfg


def _interleave_rope(name: str, t: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """The RoPE rows of a query or shared-key projection, from transformers' ``rope_interleave: false``
    layout (dims i and i + d/2 rotate together) to DeepSeek's (dims 2i and 2i+1). Rows are only reordered,
    identically for queries and keys, so every q·k and every logit stays as it was."""
    d = cfg.qk_rope_head_dim
    perm = torch.arange(d).view(2, d // 2).t().flatten()  # new 2i ← old i, new 2i+1 ← old i + d/2
    if name.endswith(("attn.wq.weight", "attn.wq_b.weight")):
        rows = t.view(cfg.n_heads, cfg.qk_head_dim, -1)  # (H, nope + rope, in)
        nope = cfg.qk_nope_head_dim
        return torch.cat([rows[:, :nope], rows[:, nope:][:, perm]], dim=1).flatten(0, 1)
    if name.endswith("attn.wkv_a.weight"):  # rows: (kv_lora_rank latent | rope shared key)
        return torch.cat([t[: cfg.kv_lora_rank], t[cfg.kv_lora_rank:][perm]])
    return t


def _check_memory(path: Path, where: dict[str, tuple[str, Any]], full: ModelConfig, n_layers: int | None,
                  dtype: torch.dtype | None, device: torch.device) -> None:
    """Refuse, from the headers, a model that would not fit in memory (e.g. the 671B release on a laptop)."""
    keep = n_layers if n_layers is not None else full.n_layers
    need = 0
    for hf, (_, f) in where.items():
        layer = re.match(r"model\.layers\.(\d+)\.", hf)
        if not (layer and keep <= int(layer[1]) < full.n_layers) and not hf.endswith("_scale_inv"):
            need += math.prod(f.get_slice(hf).get_shape()) * (dtype or torch.float32).itemsize
    free, source = _available_memory(device)
    if need > free:
        raise MemoryError(f"{path}: loading needs {need / 2**30:,.1f} GiB as {dtype or torch.float32}, more than "
                          f"the {free / 2**30:,.1f} GiB {source}; load fewer layers (n_layers=) or a smaller dtype")


def load_hf(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32, device="cpu", strict: bool = True,
            n_layers: int | None = None) -> Transformer:
    """Build a Transformer from a Hugging Face DeepSeek-V3 directory (config.json + safetensors shards).

    FP8 tensors are dequantised (block from ``quantization_config.weight_block_size``), all cast to
    ``dtype`` (gate biases stay fp32). Names and shapes are checked from the headers, then the shards read
    one tensor at a time. MTP layers load when the files hold them; a directory without any (as
    transformers saves one: it drops them) loads with ``n_mtp_modules=0``. ``strict=False`` ignores
    unexpected tensors and zero-fills a missing ``e_score_correction_bias``. ``n_layers``: keep only the
    first blocks (+ MTP).
    """
    device = _check_load_args(device, dtype)
    path = _checkpoint_dir(path)
    hf_cfg = _hf_config(path)
    try:
        full = ModelConfig.from_hf_config(hf_cfg)
    except ValueError as e:
        raise ValueError(f"{e} (in {path / CONFIG})") from e
    block, interleaved = _block_size(hf_cfg, path / CONFIG), _rope_pairs_interleaved(hf_cfg, path / CONFIG)
    method = hf_cfg.get("topk_method", "noaux_tc")  # only noaux_tc routes with a correction bias
    if n_layers is not None and not (_positive_int(n_layers) and n_layers <= full.n_layers):
        raise ValueError(f"n_layers: must be an integer in [1, {full.n_layers}] (the layers of {path / CONFIG}), "
                         f"got {n_layers!r}")
    with contextlib.ExitStack() as stack:
        where, found, fp8 = _open_shards(path, stack, device), {}, set()
        if "embed.weight" in where and not any(n.startswith("model.") for n in where):
            raise ValueError(f"{path}: tensor names of dsv3lib.checkpoint.save (embed.weight, ...), not Hugging "
                             "Face ones; load it with dsv3lib.checkpoint.load")
        _check_memory(path, where, full, n_layers, dtype, device)
        if full.n_mtp_modules and not any(n.startswith(f"model.layers.{full.n_layers}.") for n in where):
            full = full.replace(n_mtp_modules=0)
        cfg = full if n_layers is None else full.replace(
            n_layers=n_layers, n_dense_layers=min(full.n_dense_layers, n_layers))
        model = _skeleton(cfg)
        aliases, sd = _aliases(model), model.state_dict()
        to_ours = {hf_name(n, full.n_layers): n for n in sd}  # MTP k stays at layer full.n_layers + k
        expected = {n: tuple(t.shape) for n, t in sd.items() if n not in aliases}
        # copies we check and skip: MTP layers' embedding/head, and e.g. lm_head.weight of a tied model
        copies = _mtp_copies(full.n_layers, cfg.n_mtp_modules) | {hf_name(a, full.n_layers): a for a in aliases}
        label = lambda n: f"{hf_name(n, full.n_layers)} (ours: {n})"  # noqa: E731
        for hf, (file, f) in where.items():  # headers only: validate everything before reading data
            s = f.get_slice(hf)
            shape, layer = tuple(s.get_shape()), re.match(r"model\.layers\.(\d+)\.", hf)
            if hf.endswith("inv_freq") or (layer and cfg.n_layers <= int(layer[1]) < full.n_layers):
                continue  # RoPE tables are recomputed; layers dropped by n_layers
            if hf.endswith("_scale_inv") and hf[: -len("_scale_inv")] in where:
                continue  # checked with its weight
            if cfg.n_shared_experts == 0 and ".mlp.shared_experts." in hf and 0 in shape:
                continue  # the empty shared expert transformers and DeepSeek's code build for 0 of them
            if method != "noaux_tc" and hf.endswith(".e_score_correction_bias"):
                if strict:
                    raise ValueError(f"{hf}: a correction bias, but topk_method {method!r} routes without one")
                continue
            if hf in copies and shape != tuple(sd[copies[hf]].shape):
                raise ValueError(f"{hf}: shape {shape} in checkpoint, but it copies {copies[hf]} "
                                 f"{tuple(sd[copies[hf]].shape)}")
            if strict and hf not in copies and hf not in to_ours:
                raise ValueError(f"{hf}: unexpected tensor in {file} (no tensor of ours maps to it)")
            if hf in copies or hf not in to_ours:
                continue
            found[to_ours[hf]], scale = shape, hf + "_scale_inv"
            if not s.get_dtype().startswith("F8"):
                _check_dtype(label(to_ours[hf]), s.get_dtype(), file)
            else:  # needs a (⌈out/b⌉, ⌈in/b⌉) scale_inv next to it
                if scale not in where:
                    raise ValueError(f"{label(to_ours[hf])}: float8 tensor without its {scale}")
                _check_dtype(scale, where[scale][1].get_slice(scale).get_dtype(), where[scale][0])
                got = tuple(where[scale][1].get_slice(scale).get_shape())
                want = _n_blocks(shape, block) if len(shape) == 2 else "a 2-D weight"
                if got != want:
                    raise ValueError(f"{scale}: shape {got} in checkpoint, expected {want} for "
                                     f"{shape} weight")
                fp8.add(hf)
        no_bias = method != "noaux_tc" or not strict  # zero-filled: routing by the scores alone
        zero = [n for n in expected if n.endswith("gate.bias") and n not in found and no_bias]
        _check(found | {n: expected[n] for n in zero}, expected, "the checkpoint", label=label)
        tensors = {n: torch.zeros(expected[n], device=device) for n in zero}
        for hf, (_, f) in where.items():  # in file order: shard by shard, one tensor at a time
            n = to_ours.get(hf)
            if n not in expected or n in tensors:
                continue
            t = f.get_tensor(hf)
            if hf in fp8:
                scale, (scale_file, sf) = hf + "_scale_inv", where[hf + "_scale_inv"]
                scales = sf.get_tensor(scale).float()
                check_scales(scales, f"{scale} (in {path / scale_file})")  # 0 or < 0: zeroed or flipped weights
                t = weight_dequant(t, scales, block)
            tensors[n] = _cast(n, t if interleaved else _interleave_rope(n, t, cfg), dtype)
            _check_finite(label(n), tensors[n], f"in {path / where[hf][0]}")
    return _materialise(model, tensors, device)
