"""The lab: train one tiny DeepSeek-V3 across processes, then serve it (chapter 6).

Everything the chapters built, on one model: MLA, DeepSeekMoE with loss-free balancing, one MTP module, FP8
linears, expert parallelism and a DualPipe (or 1F1B, ZB1P, DualPipeV) pipeline, composed by
:func:`~dsv3lib.parallel.parallelize.parallelize`.

* :mod:`~dsv3lib.lab.train`: the training loop (torchrun or :func:`~dsv3lib.parallel.launch.launch`):
  progress, validation, per-expert loads summed over every holder of a gate, the MTP weight schedule,
  checkpoints as per-rank shards that resume exactly;
* :mod:`~dsv3lib.lab.shards`: those shards, and their merge into one directory in the DeepSeek-V3 release's
  Hugging Face layout (FP8 weights with 128×128 block scales) that :func:`~dsv3lib.hf.load_hf` reads.

Command line: ``torchrun --nproc-per-node 4 -m dsv3lib.lab train --pp 2 --ep 2 --steps 50 --out runs/lab``.
"""
