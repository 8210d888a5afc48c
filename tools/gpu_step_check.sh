#!/usr/bin/env bash
# One call on a lent 2- or 4-GPU machine (WORLD, default 4) for the multi-step work: build DeepEP (carried in .deepep/,
# never committed) and the kernels, then the GPU tests (ops, one GPU, NCCL and DeepEP at 2 and
# 4 ranks, the stateful programs included), the demo, and a short dispatch benchmark.
set -uo pipefail
. "$(dirname "$0")/gpu_env.sh"
step machine
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, sys; print(sys.version.split()[0], torch.__version__, torch.version.cuda, torch.cuda.device_count())"
} 2>&1 | tee -a "$LOG"
step "deepep build"
s=$(ms); build_deepep; echo "deepep build took $(( $(ms) - s )) ms" | tee -a "$LOG"
python3 -c "import flexdispatch as fd; from flexdispatch.managers import deepep as d; print(fd.deepep_available(), 'narrow rows fixed:', d.narrow_rows_fixed(), d.topk_index_dtype())" 2>&1 | tail -1 | tee -a "$LOG"
step "gpu tests"
# (SIGINT: pytest prints its summary when cut; a hung distributed call prints every rank's
# stacks after FLEXDISPATCH_HANG_DUMP seconds, and the stateful programs trace their steps)
export FLEXDISPATCH_HANG_DUMP=${FLEXDISPATCH_HANG_DUMP:-150} FLEXDISPATCH_STATEFUL_TRACE=${FLEXDISPATCH_STATEFUL_TRACE:-$OUT/st}
timeout -s INT ${GPU_TEST_TIMEOUT:-420} python3 -m pytest -q -m gpu -p no:cacheprovider -rfs --durations=15 -k "${PYTEST_K:-not nothing}" ${GPU_TESTS:-tests/test_ops.py tests/test_dispatcher_local.py tests/test_gpu_dist.py} \
  > "$OUT/gpu_tests.txt" 2>&1
echo "gpu tests rc=$?" | tee -a "$LOG"; grep -E "passed|failed|^FAILED|^ERROR" "$OUT/gpu_tests.txt" | tail -25 | tee -a "$LOG"
if [ -z "${SKIP_DEMO:-}" ]; then
step "demo"
timeout 120 python3 -m flexdispatch demo --world-size ${WORLD:-4} --device cuda --hidden 1024 2>&1 | grep -v "^\[flexdispatch\]" | tee -a "$LOG"
timeout 60 python3 -m flexdispatch demo --world-size 1 --device cuda 2>&1 | grep -v "^\[flexdispatch\]" | tee -a "$LOG"
fi
if [ -z "${SKIP_BENCH:-}" ]; then
step "bench_dispatch W=${WORLD:-4}"
timeout ${BENCH_TIMEOUT:-150} python3 tools/bench_dispatch.py --world-size ${WORLD:-4} --shapes ${BENCH_SHAPES:-0,2} --iters ${BENCH_ITERS:-20} --managers ${BENCH_MANAGERS:-deepep,deepep:fp8,alltoall} --json "$OUT/bench_dispatch.json" ${BENCH_ARGS:-} 2>&1 | grep -v "^\[flexdispatch\]" | tee -a "$LOG"
fi
[ -d "$OUT/trace" ] && python3 tools/trace_summary.py "$OUT"/trace/*.json > "$OUT/trace_summary.txt" 2>&1
step done
