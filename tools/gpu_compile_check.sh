#!/usr/bin/env bash
# One call on a one-GPU machine: the kernel build, then the one-rank layer eager, compiled,
# captured by hand in CUDA graphs and compiled with mode="reduce-overhead" (sync-free), at the
# three shapes the host-time and compile targets are stated at, in bf16. Logs under $OUT.
set -uo pipefail
. "$(dirname "$0")/gpu_env.sh"
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, sys; print(sys.version.split()[0], torch.__version__, torch.version.cuda)"; } 2>&1 | tee "$LOG"
step build
s=$(ms); python3 -c "import flexdispatch; flexdispatch.ops.load_kernels()" 2>&1 | tail -3 | tee -a "$LOG"
echo "kernel build: $(( $(ms) - s )) ms" | tee -a "$LOG"
for shape in ${COMPILE_SHAPES:-"1024,1024,32,4" "8192,2048,128,8" "4096,7168,256,8"}; do
  IFS=, read -r t h e k <<< "$shape"
  step "bench_compile T=$t H=$h E=$e K=$k"
  timeout "${SHAPE_TIMEOUT:-150}" python3 tools/bench_compile.py --tokens "$t" --hidden "$h" --experts "$e" --topk "$k" \
    --dtype bfloat16 --runs 50 2>&1 | grep -v "^\[flexdispatch\]" | tee -a "$OUT/bench_compile.md"
done
step done
