#!/usr/bin/env bash
# One call on a lent one-GPU machine: this tree's kernels against another checkout's (BASE,
# default .base: made with `git worktree add .base <commit>` and carried), and against any
# further checkouts named in OTHERS (space-separated folders, e.g. variants of one kernel).
# All cold builds side by side, this tree's one-GPU tests (`one_gpu_tests`), then
# tools/bench_ops.py on every tree in turn, ROUNDS times, same card (OPS, SHAPES: bench_ops'
# --ops and --shapes; ITERS), and where a small batch's and the one-rank layer's host time goes
# (tools/host_small_batch.py, tools/host_layer.py in HOST_LAYER_MODES; every tree, two rounds;
# HOST=0 skips them).
# Logs under $OUT: log.txt, gpu_tests.log, ops.md, host_small_batch.txt and host_layer.txt (each
# run headed by its tree and round); build logs under /tmp.
set -uo pipefail
. "$(dirname "$0")/gpu_env.sh"
BASE=${BASE:-.base}
OPS=${OPS:-permute,permute_map,permute_fp8}
SHAPES=${SHAPES:-0,1,2,3,4,5}
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv | tee "$LOG"
s=$(ms)
# tree label -> folder: new is this tree, base is BASE, the others are named by their folder.
declare -A DIR=([new]=. [base]=$BASE)
for other in ${OTHERS:-}; do DIR[$(basename "$other")]=$other; done
ORDER="new base $(for other in ${OTHERS:-}; do basename "$other"; done)"  # (the order of every round)
# in_rounds ROUNDS FILE LABEL COMMAND...: COMMAND in every tree's folder (its package and kernel
# cache), the trees alternating ROUNDS times; output appended to FILE under "## tree, round r".
in_rounds() {
  local rounds=$1 file=$2 label=$3 round tree
  shift 3
  for round in $(seq "$rounds"); do
    for tree in $ORDER; do
      echo "## $tree, round $round" >> "$file"
      (cd "${DIR[$tree]}" && PYTHONPATH=$PWD FLEXDISPATCH_CACHE_DIR=/tmp/fd-$tree "$@") 2>&1 \
        | grep -v "^\[flexdispatch\]\|Warning\|_warn_once" >> "$file"
      echo "$label $tree round $round rc=${PIPESTATUS[0]} $(( $(ms) - s )) ms" | tee -a "$LOG"
    done
  done
}
build() {
  (cd "${DIR[$1]}" && PYTHONPATH=$PWD FLEXDISPATCH_CACHE_DIR=/tmp/fd-$1 python3 -c "import flexdispatch; flexdispatch.ops.load_kernels()") \
    > "/tmp/build_$1.log" 2>&1
  echo "build $1 rc=$? $(( $(ms) - s )) ms" | tee -a "$LOG"
}
for tree in "${!DIR[@]}"; do build "$tree" & done
wait
FLEXDISPATCH_CACHE_DIR=/tmp/fd-new one_gpu_tests | tail -8 | tee -a "$LOG"
echo "tests done $(( $(ms) - s )) ms" | tee -a "$LOG"
# This tree's bench_ops.py times every tree (it imports the package of the checkout it sits in),
# so the columns come from one tool.
for tree in "${!DIR[@]}"; do
  [ "$tree" = new ] || cp tools/bench_ops.py tools/timing.py tools/host_layer.py tools/host_small_batch.py "${DIR[$tree]}/tools/"
done
in_rounds "${ROUNDS:-2}" "$OUT/ops.md" bench_ops timeout 90 python3 tools/bench_ops.py --iters "${ITERS:-50}" \
  --ref-iters 1 --kernels --ops "$OPS" --shapes "$SHAPES"
[ "${HOST:-1}" = 0 ] && exit 0
# The host's side alternates between the trees too (a machine's host pace drifts within a call).
in_rounds 2 "$OUT/host_small_batch.txt" host_small_batch timeout 45 python3 tools/host_small_batch.py --calls 200
# and the one-rank layer's (sync-free and sized on the host), with the device operations of a call
for mode in ${HOST_LAYER_MODES:-sync-free host-sized}; do
  in_rounds 2 "$OUT/host_layer.txt" "host_layer $mode" timeout 60 python3 tools/host_layer.py --mode $mode --calls 200
done
