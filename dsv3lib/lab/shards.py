"""The lab's checkpoints: one shard per rank that resumes exactly, and a merge into the release's layout (chapter 6).

A parallel run's state is spread over its processes: each rank holds its stages' parameters, 1/ep of each
MoE layer's experts, the gates' biases (loss-free balancing state) and its optimizer's moments. So a
checkpoint directory holds, written by every rank at once and swapped in atomically by rank 0
(:func:`~dsv3lib.checkpoint.atomic_write_dir`: a crash leaves the previous checkpoint whole):

* ``rank{r}.safetensors``: rank r's parameters and gate biases under their names in the unsharded model;
* ``rank{r}.optim.pt``: its AdamW state, keyed by the same names;
* ``lab.json``: the model config, the layout (pp, ep, dp, schedule, micro-batches, fp8), the step and the
  loss history. Resuming needs the same layout: a shard holds exactly what its rank held.

:func:`merge` gathers every rank's tensors to rank 0 and builds the one-process
:class:`~dsv3lib.model.Transformer`; :func:`save_merged` writes it with :func:`~dsv3lib.hf.save_hf`
(FP8 e4m3 weights with a ``weight_scale_inv`` per 128×128 block, like the DeepSeek-V3 release), which
:func:`~dsv3lib.hf.load_hf` reads back.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from ..checkpoint import atomic_write_dir, recover
from ..config import ModelConfig
from ..hf import save_hf
from ..model import Gate, Transformer
from ..parallel.parallelize import ParallelRunner

__all__ = ["load_shards", "merge", "rank_state", "save_merged", "save_shards"]

META = "lab.json"


def rank_state(runner: ParallelRunner) -> dict[str, torch.Tensor]:
    """This rank's parameters and gate biases under their unsharded names (each once)."""
    out = {name: q.detach() for q, name in runner.names.items()}
    for st in runner.stages.values():
        for name, m in st.named_modules():
            if isinstance(m, Gate):
                out[f"{name}.bias"] = m.bias.detach()
    return out


def save_shards(runner: ParallelRunner, optimizer: torch.optim.Optimizer, directory: str | os.PathLike,
                meta: dict) -> None:
    """Every rank calls this: write the checkpoint described above to ``directory`` (replacing it whole)."""
    rank, directory = dist.get_rank(), Path(directory)
    names = runner.names
    optim = {names[q]: s for q, s in optimizer.state.items()}

    def write(tmp: Path) -> None:
        state = {n: t.contiguous().clone() for n, t in rank_state(runner).items()}
        save_file(state, tmp / f"rank{rank}.safetensors")
        torch.save(optim, tmp / f"rank{rank}.optim.pt")

    if rank == 0:
        with atomic_write_dir(directory) as tmp:
            dist.broadcast_object_list([str(tmp)], src=0)
            write(tmp)
            (tmp / META).write_text(json.dumps({**meta, "world": dist.get_world_size()}, indent=1))
            ok = [None] * dist.get_world_size()
            dist.all_gather_object(ok, True)  # every rank has written (a failed rank ends the job before)
    else:
        box = [None]
        dist.broadcast_object_list(box, src=0)
        write(Path(box[0]))
        dist.all_gather_object([None] * dist.get_world_size(), True)
    dist.barrier()  # the swap is done before anyone reads


def load_shards(runner: ParallelRunner, optimizer: torch.optim.Optimizer, directory: str | os.PathLike,
                expect: dict) -> dict:
    """Every rank calls this: load its shard into ``runner``'s parameters, gate biases and ``optimizer``.
    ``expect``: the meta entries that must match (config, layout); one line naming the first that does not.
    Returns the checkpoint's meta (step, history)."""
    directory = Path(directory)
    try:
        recover(directory)  # a save that crashed between its renames left the newest copy beside the target
    except OSError:
        pass  # another rank moved it back first
    path = directory / META
    if not path.is_file():
        raise FileNotFoundError(f"--resume: {directory} holds no lab checkpoint ({META} missing)")
    meta = json.loads(path.read_text())
    for key, want in expect.items():
        have = meta.get(key)
        if have != want:
            field = next((k for k in want if have.get(k) != want[k]), None) if isinstance(have, dict) else None
            where, have, want = (f"{key}.{field}", have.get(field), want[field]) if field else (key, have, want)
            raise ValueError(f"--resume: the checkpoint's {where} is {have!r}, this run's is {want!r}")
    if meta.get("world") != dist.get_world_size():
        raise ValueError(f"--resume: the checkpoint was written by {meta.get('world')} processes, this run has "
                         f"{dist.get_world_size()}")
    rank = dist.get_rank()
    tensors = load_file(directory / f"rank{rank}.safetensors")
    state = rank_state(runner)
    if set(tensors) != set(state):
        raise ValueError(f"--resume: rank {rank}'s shard holds other tensors than this rank "
                         f"(e.g. {sorted(set(tensors) ^ set(state))[0]})")
    with torch.no_grad():
        for name, t in state.items():
            t.copy_(tensors[name])
    by_name = {name: q for q, name in runner.names.items()}
    optim = torch.load(directory / f"rank{rank}.optim.pt", weights_only=True)
    for name, s in optim.items():
        optimizer.state[by_name[name]] = s
    return meta


def merge(runner: ParallelRunner, cfg: ModelConfig) -> Transformer | None:
    """Gather every rank's tensors to rank 0 and build the one-process model there (None on other ranks).
    DualPipe's copies and the replicas hold identical values: any holder's copy will do."""
    mine = {n: t.cpu() for n, t in rank_state(runner).items()}
    everyone = [None] * dist.get_world_size()
    dist.gather_object(mine, everyone if dist.get_rank() == 0 else None, dst=0)
    if dist.get_rank() != 0:
        return None
    merged: dict = {}
    for state in everyone:
        merged.update(state)
    model = Transformer(cfg)
    want = set(model.state_dict())
    if set(merged) != want:
        missing = sorted(want - set(merged))
        raise RuntimeError(f"merge: no rank holds {missing[0]}" if missing else "merge: unexpected tensors")
    model.load_state_dict(merged)
    return model


def save_merged(runner: ParallelRunner, cfg: ModelConfig, directory: str | os.PathLike, *,
                fp8: bool = True) -> Path | None:
    """Every rank calls this; rank 0 writes the merged model in the Hugging Face layout of the release."""
    model = merge(runner, cfg)
    # several files + model.safetensors.index.json, as the release ships (~4 shards for the tiny model)
    size = sum(t.numel() for t in model.state_dict().values()) if model is not None else 0
    out = save_hf(model, directory, fp8=fp8, shard_bytes=max(1 << 20, size // 4)) if model is not None else None
    dist.barrier()
    return out
