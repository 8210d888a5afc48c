#!/usr/bin/env bash
# A shorter call on a lent 4-GPU machine, for the DeepEP manager alone: build DeepEP (carried
# in .deepep/, never committed) and the kernels; DeepEP against all-to-all stage by stage
# (row widths, token counts, sync/async, and once with a large NVLink buffer); the DeepEP
# tests; the dispatch benchmark; the demo.
set -uo pipefail
OUT=${OUT:-$(mktemp -d)}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export CPATH=/usr/local/cuda/include/cccl:${CPATH:-}
export PYTHONPATH=$PWD:$PWD/.deepep FLEXDISPATCH_CACHE_DIR=$(mktemp -d) PYTHONUNBUFFERED=1 MAX_JOBS=$(nproc)
export FLEXDISPATCH_JIT=1
LOG=$OUT/log.txt
step() { echo "=== $1 ($(date +%T))" | tee -a "$LOG"; }
pt() { timeout "$1" python3 -m pytest -q -m deepep -p no:cacheprovider -rf tests/test_gpu_dist.py "${@:2}"; }
step "builds"
nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tee -a "$LOG"
(cd .deepep && TORCH_CUDA_ARCH_LIST=9.0 timeout 300 python3 setup.py build_ext --inplace > /tmp/deepep_build.txt 2>&1)
echo "deepep build rc=$?" | tee -a "$LOG"
python3 -c "import flexdispatch" 2>&1 | tee -a "$LOG"
step "stages (W4, hint-sized buffer)"
pt 200 -k "stages and W4 and sync" > "$OUT/stages.txt" 2>&1
grep -E "^(FAILED|PASSED)|passed|failed" "$OUT/stages.txt" | sed 's/ - .*//' | tee -a "$LOG"
step "stages (W4, 1 GB buffer)"
FLEXDISPATCH_DEEPEP_MIN_NVL_BYTES=1e9 pt 120 -k "stages and W4 and sync-512-128" 2>&1 | tail -2 | tee -a "$LOG"
step "deepep tests"
pt 300 -k "not stages" > "$OUT/gpu_tests.txt" 2>&1
grep -E "^(FAILED|PASSED)|passed|failed" "$OUT/gpu_tests.txt" | sed 's/ - .*//' | tee -a "$LOG"
step "bench_dispatch"
timeout 200 python3 tools/bench_dispatch.py --world-size 4 --json "$OUT/bench_dispatch.json" \
  --png "$OUT/bench_dispatch.png" 2>&1 | grep -v "^\[flexdispatch\]" | tee -a "$LOG"
step "demo"
timeout 100 python3 -m flexdispatch demo --world-size 4 --device cuda --hidden 1024 --ffn 1024 2>&1 \
  | grep -v "^\[flexdispatch\]" | tee -a "$LOG"
step done
