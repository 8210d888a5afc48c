#!/usr/bin/env bash
# One call on a lent one-GPU machine: this tree's kernels against another checkout's (BASE,
# default .base: made with `git worktree add .base <commit>` and carried). Both cold builds side
# by side, this tree's GPU op, one-rank layer and torch.compile tests, then tools/bench_ops.py on
# the two trees in turn, ROUNDS times, same card (OPS, SHAPES: bench_ops' --ops and --shapes;
# ITERS), and where a small batch's host time goes (tools/host_small_batch.py, this tree).
# Logs under $OUT: log.txt, build_{new,base}.log, gpu_tests.log, ops_{new,base}_<round>.md,
# host_small_batch.txt.
set -uo pipefail
. "$(dirname "$0")/gpu_env.sh"
BASE=${BASE:-.base}
OPS=${OPS:-permute,permute_map,permute_fp8}
SHAPES=${SHAPES:-0,1,2,3,4,5}
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv | tee "$LOG"
s=$(ms)
build() {
  (cd "$1" && PYTHONPATH=$PWD FLEXDISPATCH_CACHE_DIR=/tmp/fd-$2 python3 -c "import flexdispatch; flexdispatch.ops.load_kernels()") \
    > "$OUT/build_$2.log" 2>&1
  echo "build $2 rc=$? $(( $(ms) - s )) ms" | tee -a "$LOG"
}
build "$BASE" base & build . new
wait
FLEXDISPATCH_CACHE_DIR=/tmp/fd-new timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -m gpu -p no:cacheprovider \
  tests/test_ops.py tests/test_dispatcher_local.py tests/test_compile.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -8 | tee -a "$LOG"
echo "tests done $(( $(ms) - s )) ms" | tee -a "$LOG"
for round in $(seq "${ROUNDS:-2}"); do
  for tree in new base; do
    dir=.; [ "$tree" = base ] && dir=$BASE
    (cd "$dir" && PYTHONPATH=$PWD FLEXDISPATCH_CACHE_DIR=/tmp/fd-$tree timeout 90 python3 tools/bench_ops.py \
      --iters "${ITERS:-50}" --ref-iters 1 --ops "$OPS" --shapes "$SHAPES") 2>&1 | grep -v "^\[flexdispatch\]" \
      > "$OUT/ops_${tree}_$round.md"
    echo "bench_ops $tree round $round rc=$? $(( $(ms) - s )) ms" | tee -a "$LOG"
  done
done
FLEXDISPATCH_CACHE_DIR=/tmp/fd-new timeout 90 python3 tools/host_small_batch.py 2>&1 | grep -v "^\[flexdispatch\]" \
  > "$OUT/host_small_batch.txt"
echo "host_small_batch rc=$? $(( $(ms) - s )) ms" | tee -a "$LOG"
