#!/usr/bin/env bash
# One call on a lent one-GPU machine that refreshes docs/PERFORMANCE.md's one-GPU tables on this
# tree, one kernel build shared by the steps named in STEPS (default: all of them):
#   tests    the GPU op, one-rank layer and torch.compile tests (gpu_tests.log)
#   ops      every op against a device copy, kernels listed (tools/bench_ops.py; bench_ops.md)
#   host     where a small batch's host time goes (tools/host_small_batch.py; host_small_batch.txt)
#   compile  the one-rank layer eager, compiled, captured by hand and under reduce-overhead at the
#            three shapes the host-time targets name, bf16 (tools/bench_compile.py; bench_compile.md)
# Logs under $OUT, with log.txt.
set -uo pipefail
. "$(dirname "$0")/gpu_env.sh"
STEPS=${STEPS:-tests ops host compile}
wants() { [[ " $STEPS " == *" $1 "* ]]; }
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv,noheader
  python3 -c "import torch, sys; print(sys.version.split()[0], torch.__version__, torch.version.cuda)"; } 2>&1 | tee "$LOG"
step build
s=$(ms); python3 -c "import flexdispatch; flexdispatch.ops.load_kernels()" > /tmp/build.log 2>&1
echo "kernel build rc=$? $(( $(ms) - s )) ms" | tee -a "$LOG"
if wants tests; then
  step tests
  one_gpu_tests | tail -3 | tee -a "$LOG"
fi
if wants ops; then
  step ops
  timeout "${OPS_TIMEOUT:-200}" python3 tools/bench_ops.py --iters "${ITERS:-30}" --ref-iters 2 --kernels 2>&1 \
    | grep -v "^\[flexdispatch\]\|Warning\|_warn_once" > "$OUT/bench_ops.md"
  echo "bench_ops rc=$?" | tee -a "$LOG"
fi
if wants host; then
  step host
  timeout 90 python3 tools/host_small_batch.py 2>&1 | grep -v "^\[flexdispatch\]" > "$OUT/host_small_batch.txt"
fi
if wants compile; then
  for shape in ${COMPILE_SHAPES:-"1024,1024,32,4" "8192,2048,128,8" "4096,7168,256,8"}; do
    IFS=, read -r t h e k <<< "$shape"
    step "compile T=$t H=$h E=$e K=$k"
    timeout "${SHAPE_TIMEOUT:-120}" python3 tools/bench_compile.py --tokens "$t" --hidden "$h" --experts "$e" \
      --topk "$k" --dtype bfloat16 --runs 50 2>&1 | grep -v "^\[flexdispatch\]" >> "$OUT/bench_compile.md"
  done
fi
step done
