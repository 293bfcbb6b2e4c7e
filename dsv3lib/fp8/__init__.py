"""FP8 training and inference pieces of DeepSeek-V3 (V3 §3.3; chapter 1).

``formats``: bit-level E4M3/E5M2/E5M6/FP16/BF16, and ``FP8_DTYPE``/``FP8_MAX``. ``quant``: the references
(``*_ref``) of tile/block quantisation and the block-scaled GEMM. ``accumulate``: the tensor core's
limited-precision accumulator. ``kernels``: the Triton versions (imported lazily, only where used).
``gemm``: picks kernels or reference (policy in :mod:`dsv3lib.dispatch`). ``linear``: ``FP8Linear`` and
``convert_to_fp8``.
"""

from .accumulate import accumulation_experiment, tensor_core_dot
from .formats import BF16, E4M3, E5M2, E5M6, FORMATS, FP8_DTYPE, FP8_MAX, FP16, FloatFormat, all_values, decode, encode
from .formats import round_to_format
from .gemm import act_quant, fp8_gemm, weight_quant
from .linear import FP8Linear, FP8LinearFunction, convert_to_fp8, fp8_linear
from .quant import act_dequant, act_quant_ref, dequant_per_row, fp8_gemm_ref, fp8_to_float, quant_per_row
from .quant import quant_per_tensor, weight_dequant, weight_quant_ref

__all__ = [
    # formats
    "FloatFormat", "E4M3", "E5M2", "E5M6", "FP16", "BF16", "FORMATS", "encode", "decode", "round_to_format",
    "all_values",
    # quantisation (dispatching) and the reference
    "FP8_DTYPE", "FP8_MAX", "act_quant", "weight_quant", "fp8_gemm", "act_quant_ref", "weight_quant_ref",
    "fp8_gemm_ref", "act_dequant", "weight_dequant", "fp8_to_float", "quant_per_tensor", "quant_per_row",
    "dequant_per_row",
    # accumulation
    "tensor_core_dot", "accumulation_experiment",
    # training
    "FP8Linear", "FP8LinearFunction", "fp8_linear", "convert_to_fp8",
]
