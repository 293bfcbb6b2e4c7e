#!/usr/bin/env bash
# The GPU pass in one call: what only a GPU can confirm, each step under its own time limit (570 s in all, so it
# fits one 600 s device command; how long it really takes is unmeasured until the first GPU run), so one hang
# cannot cost the others.
# Logs, a summary and bench.json land in $OUT (default ./gpu-pass).
#
#   bash bench/gpu_pass.sh        # from the repository root, on the device machine (its python3 has torch+triton)
#
# Steps: the environment; the GPU-only tests (compiled Triton kernels bit-exact against the references, FP8Linear
# through the kernels, the MLA decode kernel); every benchmark (python -m bench: correctness + ratios to peers);
# the multi-process code on NCCL (bench/nccl_check.py). Exit status: the number of steps that failed.
set -u
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-$PWD/gpu-pass}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
FAILED=0

step() {  # step NAME LIMIT_S COMMAND...: run it, log to $OUT/NAME.log, show its tail, record rc and seconds
    local name=$1 limit=$2 t0 rc
    shift 2
    echo "===== $name (limit ${limit} s)"
    t0=$(date +%s)
    timeout --kill-after=15 "$limit" "$@" >"$OUT/$name.log" 2>&1
    rc=$?
    tail -n "${TAIL:-30}" "$OUT/$name.log"
    echo "$name: rc=$rc, $(( $(date +%s) - t0 )) s" | tee -a "$OUT/summary.txt"
    [ "$rc" -eq 0 ] || FAILED=$((FAILED + 1))
}

step env 30 bash -c "nvidia-smi; $PY -c 'import torch, triton; print(\"torch\", torch.__version__, \"CUDA\", \
torch.version.cuda, \"triton\", triton.__version__, torch.cuda.get_device_name(), torch.cuda.get_device_capability())'"
step gpu_tests 110 "$PY" -m pytest -q -p no:cacheprovider -o addopts= -m "slow or not slow" -ra \
    tests/test_fp8_kernels.py::test_compiled_kernels_on_gpu tests/test_fp8_kernels.py::test_fp8_linear_on_gpu \
    tests/test_mla_decode.py::test_triton_kernel_on_gpu
TAIL=60 step bench 340 "$PY" -m bench --out "$OUT/bench.json"
step nccl 90 "$PY" bench/nccl_check.py
echo "===== summary"
cat "$OUT/summary.txt"
exit "$FAILED"
