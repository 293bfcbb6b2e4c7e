"""Figures a reader would rather look at than read: diagrams drawn by code, sized from a config.

One module per figure family, each function taking an optional ``ax`` and returning the figure:

- :func:`draw_v3_block` (chapter 0): a DeepSeek-V3 block, its MoE and the MTP module (V3 Fig. 2-3);
- :func:`draw_fp8_linear` (chapter 1): the FP8 Linear's three GEMMs and where each tensor is quantised
  (V3 §3.3, Fig. 6);
- :func:`draw_mla_dataflow`, :func:`draw_mla_comparison` (chapter 2): naive vs absorbed MLA with per-token
  tensor sizes and what the cache holds (V3 §2.1.1);
- :func:`draw_dualpipe_pair`, :func:`dualpipe_pair_small_multiples`, :func:`dualpipe_pair_widget`
  (chapter 5): DualPipe's overlapped forward/backward pair under a simple timing model (V3 §3.2.1, Fig. 4).
"""

from ._draw import PALETTE
from .block import draw_v3_block
from .dualpipe import dualpipe_pair_small_multiples, dualpipe_pair_widget, draw_dualpipe_pair, pair_schedule
from .fp8 import draw_fp8_linear
from .mla import draw_mla_comparison, draw_mla_dataflow, mla_sizes

__all__ = [
    "PALETTE", "draw_v3_block", "draw_fp8_linear", "draw_mla_dataflow", "draw_mla_comparison", "mla_sizes",
    "draw_dualpipe_pair", "dualpipe_pair_small_multiples", "dualpipe_pair_widget", "pair_schedule",
]
