#!/usr/bin/env bash
# A shorter call on a lent 4-GPU machine, for the DeepEP manager alone: build DeepEP (carried
# in .deepep/, never committed) and the kernels, the DeepEP tests, the DeepEP demo and the
# dispatch benchmark with a profile of its first shape.
set -uo pipefail
OUT=${OUT:-$(mktemp -d)}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export CPATH=/usr/local/cuda/include/cccl:${CPATH:-}
export PYTHONPATH=$PWD:$PWD/.deepep FLEXDISPATCH_CACHE_DIR=$(mktemp -d) PYTHONUNBUFFERED=1 MAX_JOBS=$(nproc)
export FLEXDISPATCH_JIT=1
LOG=$OUT/log.txt
step() { echo "=== $1 ($(date +%T))" | tee -a "$LOG"; }
step "builds"
nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tee -a "$LOG"
(cd .deepep && TORCH_CUDA_ARCH_LIST=9.0 timeout 300 python3 setup.py build_ext --inplace > /tmp/deepep_build.txt 2>&1)
echo "deepep build rc=$?" | tee -a "$LOG"
python3 -c "import flexdispatch" 2>&1 | tee -a "$LOG"
step "deepep tests"
timeout 420 python3 -m pytest -q -m deepep -p no:cacheprovider -x tests/test_gpu_dist.py -k "stages or W4" \
  > "$OUT/gpu_tests.txt" 2>&1
echo "deepep tests rc=$?" | tee -a "$LOG"; grep -E "passed|failed|^E .*(assert|Error|{)" "$OUT/gpu_tests.txt" | head -30 | tee -a "$LOG"
step "demo"
timeout 150 python3 -m flexdispatch demo --world-size 4 --device cuda 2>&1 | grep -v "^\[flexdispatch\]" | tee -a "$LOG"
step "bench_dispatch"
timeout 300 python3 tools/bench_dispatch.py --world-size 4 --profile --json "$OUT/bench_dispatch.json" \
  --png "$OUT/bench_dispatch.png" 2>&1 | grep -v "^\[flexdispatch\]" | tee -a "$LOG"
step done
