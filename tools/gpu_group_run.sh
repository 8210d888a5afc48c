#!/usr/bin/env bash
# shellcheck disable=SC2317,SC2016  # (steps are called by name; single-quoted code runs in a shell of its own)
# The GPU checks of a group on one machine of 4 (or 2) H200s, in phases that each fit in 10
# minutes (the deadline below keeps each command within that): DeepEP and the kernels; the whole
# GPU suite at W = 2 and W = 4 (every manager, stateful programs, captured layers, FP8, NVLink,
# agreement and trap tests, auto, the group checks on NCCL, the demo on each backend); DeepEP
# v1.2.1's narrow-row check; tools/bench_dispatch.py at W = 4 and W = 2; the one-GPU tests.
# Everything lands under $OUT:
#   log.txt      what ran, each step's result lines, the benchmark tables
#   summary.txt  one line a step and a phase, what was not reached, the command that resumes
#   logs.tar.gz  every step's full output, pytest's junit XML, the benchmarks' JSON and plots,
#                the stateful programs' step traces (re-packed after each step)
#
#   tools/gpu_group_run.sh all                    # every phase: build suite2 suite4 narrow bench4 bench2 local
#   tools/gpu_group_run.sh build suite2           # phases, in the order given
#   tools/gpu_group_run.sh suite4:group bench4    # single steps of a phase, and phases
#   tools/gpu_group_run.sh list                   # the phases, their steps, expected and longest seconds
#   DRY_RUN=1 tools/gpu_group_run.sh all          # print the commands instead of running them
#
# DeepEP is built from the source in .deepep/ (commit 567632d, the last before 2.0: DeepEP 2.x
# does not run with these machines' torch 2.11 and NCCL 2.28.9) and, for the narrow-row check,
# .deepep-v121/ (tag v1.2.1); both are git-ignored: put the sources there before running, and
# never commit them. DEADLINE_S (default 570, for a machine that ends a command at 600 s): a step
# starts only if its expected seconds fit before the deadline and is stopped (SIGINT: pytest still
# prints its summary) at the deadline; the summary's last line is the command that runs what was
# not reached. DEADLINE_S=0: no deadline (`DEADLINE_S=0 ... all` runs every phase in one go).
# Copy .deepep and .deepep-v121 onto a fresh machine; where an earlier phase has built them, copy
# neither (a copy replaces the folder and its build): both builds and the kernel cache
# (.flexdispatch-cache/) are in place. A fresh machine builds first (step "prep").
# Other settings: BENCH_MANAGERS, BENCH_ITERS (50: large and medium shapes), BENCH_SMALL_ITERS
# (200), DRY_RUN_GPUS (the GPUs a dry run assumes: 4).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

DRY_RUN=${DRY_RUN:-}
DEADLINE_S=${DEADLINE_S:-570}
RESERVE_S=15  # kept for packing the logs and the summary
V121=.deepep-v121
MANAGERS=reference,deepep,deepep:bound=1.25+graph,deepep:fp8,deepep:fp8+bound=1.25+graph
MANAGERS+=,nvlink:onecall,nvlink:bound=1.25+graph,nvlink:onecall+fp8,nvlink:fp8+bound=1.25+graph,alltoall,alltoall:fp8
MANAGERS=${BENCH_MANAGERS:-$MANAGERS}  # (nvlink:onecall is the eager NVLink layer; all-to-all cannot be sync-free)

PHASES=(build suite2 suite4 narrow bench4 bench2 local)
declare -A STEPS=(
  [build]="machine kernels deepep info"
  [suite2]="nccl deepep stateful group own demo" [suite4]="nccl deepep stateful group demo"
  [narrow]="build tests"
  [bench4]="large medium small" [bench2]="large medium small"
  [local]="ops dispatcher demo")
# Seconds a step is expected to take with the builds in place (estimated from the timings in
# docs/PERFORMANCE.md: DeepEP's build 74 s on 2 x H200, 160 stateful DeepEP steps 18.6 s at W = 4,
# 52 W = 4 tests within one 420 s pytest run), and the most it may take.
declare -A EXPECT CAP
def() { EXPECT[$1]=$2; CAP[$1]=$3; }
def prep 150 330  # (both builds; 120 the kernels alone, 90 DeepEP alone, 15 neither)
def build:machine 15 60;   def build:kernels 120 330;  def build:deepep 90 330;  def build:info 15 60
for w in 2 4; do
  def "suite$w:nccl" 150 420;  def "suite$w:deepep" 150 420;  def "suite$w:stateful" 120 480
  def "suite$w:group" 100 400; def "suite$w:demo" 100 360
  def "bench$w:large" 120 330; def "bench$w:medium" 100 300;  def "bench$w:small" 100 300
done
def suite2:own 60 200
def narrow:build 90 330;   def narrow:tests 90 300
def local:ops 240 480;     def local:dispatcher 150 400; def local:demo 30 120

usage() { sed -n '3,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
list_plan() {
  local p s
  for p in "${PHASES[@]}"; do
    for s in ${STEPS[$p]}; do printf '%-16s expected %4s s, at most %4s s\n' "$p:$s" "${EXPECT[$p:$s]}" "${CAP[$p:$s]}"; done
  done
  printf '%-16s expected %4s s, at most %4s s (the builds, before the first step after "build"; seconds when in place)\n' \
    prep "${EXPECT[prep]}" "${CAP[prep]}"
}

# ---- what to run -----------------------------------------------------------------------------
TODO=()
add() {  # add PHASE | PHASE:STEP
  local p=${1%%:*} s
  [ -n "${STEPS[$p]:-}" ] || { echo "unknown phase '$p' in '$1' (phases: ${PHASES[*]} all list)" >&2; exit 2; }
  if [ "$1" = "$p" ]; then
    for s in ${STEPS[$p]}; do TODO+=("$p:$s"); done
  elif [[ " ${STEPS[$p]} " == *" ${1#*:} "* ]]; then
    TODO+=("$1")
  else
    echo "unknown step '$1' (steps of $p: ${STEPS[$p]})" >&2; exit 2
  fi
}
[ $# -gt 0 ] || { usage; exit 2; }
for arg in "$@"; do
  case $arg in
    -h|--help|help) usage; exit 0 ;;
    list) list_plan; exit 0 ;;
    all) for p in "${PHASES[@]}"; do add "$p"; done ;;
    *) add "$arg" ;;
  esac
done

export FLEXDISPATCH_CACHE_DIR=${FLEXDISPATCH_CACHE_DIR:-$PWD/.flexdispatch-cache}
. tools/gpu_env.sh
mkdir -p "$OUT"
export OUT  # (the DeepEP builds source gpu_env.sh again, in a shell of their own: the same log)
export FLEXDISPATCH_HANG_DUMP=${FLEXDISPATCH_HANG_DUMP:-150}  # every rank's stacks when one pool call hangs
SUMMARY=$OUT/summary.txt
WORK=$(mktemp -d /tmp/flexdispatch-group-run.XXXXXX)  # each step's logs, packed into $OUT

# ---- time ------------------------------------------------------------------------------------
START=$(date +%s)
SIMULATED=0  # DRY_RUN: the expected seconds of the steps "run" so far
elapsed() { if [ -n "$DRY_RUN" ]; then echo "$SIMULATED"; else echo $(( $(date +%s) - START )); fi; }
left() {  # seconds before the deadline, less the reserve
  if [ "$DEADLINE_S" -eq 0 ]; then echo 999999; else echo $(( DEADLINE_S - RESERVE_S - $(elapsed) )); fi
}
STEP_T=0 STEP_END=0
step_left() { if [ -n "$DRY_RUN" ]; then echo "$STEP_T"; else echo $(( STEP_END - $(date +%s) )); fi; }

shown() {  # a command as one could paste it
  local a out=""
  for a in "$@"; do
    if [[ $a =~ ^[A-Za-z0-9_./:=,+@%-]+$ ]]; then out+="$a "; else out+="'${a//\'/\'\\\'\'}' "; fi
  done
  echo "${out% }"
}
# x SECONDS LOGFILE COMMAND...: COMMAND's output appended to LOGFILE, stopped after SECONDS or at
# the end of the step's time (SIGINT, then SIGKILL 30 s later, to its whole process group).
x() {
  local cap=$1 log=$2 t; shift 2
  t=$(step_left); (( cap < t )) && t=$cap
  if [ -n "$DRY_RUN" ]; then
    echo "    [at most $t s] $(shown "$@") >> ${log#"$WORK"/}"; return 0
  fi
  if (( t < 10 )); then echo "not run, no time left in the step: $*" | tee -a "$log" "$LOG"; return 124; fi
  echo "\$ $(shown "$@")   (at most $t s)" >> "$log"
  timeout -s INT -k 30 "$t" "$@" >> "$log" 2>&1
}

# ---- results ---------------------------------------------------------------------------------
declare -A RESULT
FAILED=() NOT_REACHED=() CUT=()
note() { echo "$*" | tee -a "$SUMMARY"; }
pack() {  # the work folder into $OUT (after every step: a command stopped from outside keeps the steps done)
  [ -n "$DRY_RUN" ] && return 0
  tar -czf "$OUT/logs.tar.gz.tmp" -C "$WORK" . 2>/dev/null && mv "$OUT/logs.tar.gz.tmp" "$OUT/logs.tar.gz"
}
pytest_line() {  # pytest's last summary line in a log ("N passed, M skipped in S s")
  grep -E "(passed|failed|errors?|skipped|deselected|no tests ran)( |,|$)" "$1" 2>/dev/null \
    | grep -E "^=|in [0-9.]+s" | tail -1 | tr -d '=' | sed 's/^ *//; s/ *$//'
}
GPUS=0
if [ -n "$DRY_RUN" ]; then GPUS=${DRY_RUN_GPUS:-4}; else GPUS=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU'); fi
have_deepep() {  # have_deepep [DIR]: DeepEP's source (or its build) is there
  [ -n "$DRY_RUN" ] || [ -f "${1:-.deepep}/setup.py" ] || ls "${1:-.deepep}"/deep_ep_cpp*.so >/dev/null 2>&1
}
live() { [ -z "$DRY_RUN" ]; }  # (not a dry run: there are outputs to read)

# ---- steps: each writes under $WORK/PHASE/, returns non-zero when something failed, and may
# set DETAIL (its words in the summary) ----------------------------------------------------------
DETAIL=""
pytest_run() {  # pytest_run CAP NAME PYTEST-ARGS...: one pytest process (its own pool of ranks)
  local cap=$1 name=$2 log rc; shift 2
  log=$WORK/$PHASE/$name.txt
  x "$cap" "$log" env FLEXDISPATCH_STATEFUL_TRACE="$WORK/$PHASE/trace-$name" python3 -m pytest -q \
    -p no:cacheprovider -rfEs --durations=20 --junitxml="$WORK/$PHASE/$name.xml" "$@"
  rc=$?
  if live; then
    DETAIL="${DETAIL:+$DETAIL; }$name: $(pytest_line "$log")"
    { echo "$name (rc=$rc): $(pytest_line "$log")"; grep -E "^(FAILED|ERROR) " "$log" | cut -c1-300 | head -30
      (( rc == 0 )) || grep -qE "^(FAILED|ERROR) " "$log" || tail -5 "$log"; } | tee -a "$LOG"
  fi
  return "$rc"
}

s_build_machine() {
  local log=$WORK/build/machine.txt rc=0
  x 20 "$log" nvidia-smi --query-gpu=index,name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv || rc=1
  x 20 "$log" nvidia-smi topo -m
  x 60 "$log" python3 -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__,
      'cuda', torch.version.cuda, 'nccl', torch.cuda.nccl.version(), 'gpus', torch.cuda.device_count())" || rc=1
  x 20 "$log" bash -c 'echo "cores $(nproc)"; nvcc --version | tail -1
    echo "flexdispatch: $(git log -1 --format="%h %cs %s" 2>/dev/null || echo "no git metadata")"
    for d in .deepep .deepep-v121; do echo "$d: $(git -C $d log -1 --format="%h %cs %s" 2>/dev/null || echo "no git metadata")"; done
    env | grep -E "^(NCCL_NVLS_ENABLE|TORCH_SYMM_MEM_DISABLE_MULTICAST|NVSHMEM_DISABLE_NVLS|FLEXDISPATCH_)" | sort'
  if live; then tee -a "$LOG" < "$log" >/dev/null; DETAIL="$GPUS GPUs"; fi
  return "$rc"
}

s_build_kernels() {  # the cold build alone (nothing else running), then a cached one and the imports
  local log=$WORK/build/kernels.txt rc
  x 300 "$log" python3 -m flexdispatch build; rc=$?
  x 60 "$log" python3 -m flexdispatch build
  x 60 "$log" bash -c 'for what in torch flexdispatch; do s=$(date +%s%N); python3 -c "import $what"
    echo "import $what: $(( ($(date +%s%N) - s) / 1000000 )) ms"; done'
  if live; then
    grep -E "built in|already cached|^import|rror" "$log" | tee -a "$LOG"
    DETAIL=$(grep -m1 -E "built in|already cached" "$log")
  fi
  return "$rc"
}

deepep_check() {  # deepep_check DIR LOG: the DeepEP that imports from DIR, and what flexdispatch makes of it
  x 60 "$2" env PYTHONPATH="$PWD:$PWD/$1" python3 -c "import importlib.util, deep_ep, flexdispatch as fd
from flexdispatch.managers import deepep as d
print('deep_ep', getattr(deep_ep, '__version__', '?'), 'from', deep_ep.__file__, '| available:', fd.deepep_available(),
      '| narrow rows fixed:', d.narrow_rows_fixed(), '| index dtype:', d.topk_index_dtype(),
      '| 2.x layout (deep_ep._C, does not run here):', importlib.util.find_spec('deep_ep._C') is not None)"
}
DEEPEP_TRIED=""  # .deepep was built (or tried) by this command: prep does not try again
build_one_deepep() {  # build_one_deepep DIR: a step's DeepEP build and check
  local dir=$1 log=$WORK/$PHASE/deepep.txt rc
  [ "$dir" = .deepep ] && DEEPEP_TRIED=1
  x 300 "$log" bash -c ". tools/gpu_env.sh && build_deepep $dir"; rc=$?
  if live; then cp /tmp/deepep_build*.txt "$WORK/$PHASE/" 2>/dev/null; fi
  deepep_check "$dir" "$log" || rc=1
  if live; then tail -1 "$log" | tee -a "$LOG"; DETAIL=$(grep -m1 "deepep" "$log"); fi
  return "$rc"
}
s_build_deepep() {
  if ! have_deepep; then
    DETAIL="no .deepep/ (put DeepEP 567632d's source there): DeepEP's tests and variants skip"; return 1
  fi
  build_one_deepep .deepep
}
s_build_info() {
  x 60 "$WORK/build/info.txt" python3 -m flexdispatch info; local rc=$?
  if live; then tee -a "$LOG" < "$WORK/build/info.txt" >/dev/null; fi
  return "$rc"
}

need_deepep_build() { [ -z "$DEEPEP_TRIED" ] && have_deepep && ! ls .deepep/deep_ep_cpp*.so >/dev/null 2>&1; }
kernels_cached() { [ -z "$DRY_RUN" ] && ls "$FLEXDISPATCH_CACHE_DIR"/*/flexdispatch_C*.so >/dev/null 2>&1; }
prep_expected() {  # what prep should take: the builds it has to make
  if kernels_cached; then
    if need_deepep_build; then echo 90; else echo 15; fi
  elif need_deepep_build; then echo "${EXPECT[prep]}"; else echo 120; fi
}
prep() {  # the kernels and DeepEP, built side by side where missing (a bare machine)
  local log=$WORK/prep.txt rc
  if need_deepep_build; then
    x 300 "$log.deepep" bash -c '. tools/gpu_env.sh && build_deepep .deepep' &
  fi
  x 300 "$log" python3 -m flexdispatch build; rc=$?
  wait
  if live; then
    cat "$log.deepep" >> "$log" 2>/dev/null; rm -f "$log.deepep"
    grep -E "built in|already cached|deepep" "$log" | tee -a "$LOG"
  fi
  return "$rc"
}

# The suite at W ranks (tests/test_gpu_dist.py picks W by its pool's id, W2 or W4), in pytest runs
# that the deadline can fall between: NCCL and NVLink; DeepEP; the stateful programs; the group's
# checks on NCCL (last: a hang there closes that pytest process's pool of ranks only).
s_suite_nccl() {
  pytest_run "${CAP[$PHASE:nccl]}" nccl -m "gpu and not deepep" -k "W$1 and not stateful and not GroupChecks" \
    tests/test_gpu_dist.py
}
s_suite_deepep() {
  have_deepep || DETAIL="no .deepep/: every test here skips"
  pytest_run "${CAP[$PHASE:deepep]}" deepep -m "gpu and deepep" -k "W$1 and not stateful and not GroupChecks" \
    tests/test_gpu_dist.py
}
s_suite_stateful() {
  pytest_run "${CAP[$PHASE:stateful]}" stateful -m gpu -k "W$1 and stateful and not GroupChecks" tests/test_gpu_dist.py
}
s_suite_group() { pytest_run "${CAP[$PHASE:group]}" group -m gpu -k "W$1 and GroupChecks" tests/test_gpu_dist.py; }
s_suite_own() {  # the tests with pools of their own: the header wait's trap (2 GPUs), a group of one
  pytest_run "${CAP[$PHASE:own]}" own -m gpu -k "not W2 and not W4" tests/test_gpu_dist.py
}
demo() {  # demo W LOG BACKEND [DEMO-ARGS]
  local w=$1 log=$2 backend=$3 rc; shift 3
  x 90 "$log" python3 -m flexdispatch demo --world-size "$w" --device cuda --backend "$backend" "$@"; rc=$?
  if live; then
    DETAIL="${DETAIL:+$DETAIL; }$backend rc=$rc"
    { echo "demo W=$w --backend $backend $* (rc=$rc):"; grep -v "^\[flexdispatch\]" "$log" | tail -$(( rc ? 8 : 4 )); } \
      | tee -a "$LOG"
  fi
  return "$rc"
}
s_suite_demo() {
  local rc=0 b
  for b in auto deepep nvlink alltoall; do
    if [ "$b" = deepep ] && ! have_deepep; then DETAIL="${DETAIL:+$DETAIL; }deepep: no .deepep/"; continue; fi
    demo "$1" "$WORK/$PHASE/demo-$b.txt" "$b" --hidden 1024 || rc=1
  done
  return "$rc"
}

s_narrow_build() { build_one_deepep "$V121"; }
s_narrow_tests() {  # v1.2.1 predates DeepEP's narrow-row fix: its narrow rows go elsewhere, and are right
  local rc=0 w
  local -x PYTHONPATH="$PWD:$PWD/$V121"  # (this DeepEP, not .deepep's, for every command below)
  x 60 "$WORK/narrow/info.txt" python3 -m flexdispatch info || rc=1
  if live; then grep -E "^deep_ep|auto picks" "$WORK/narrow/info.txt" | tee -a "$LOG"; fi
  pytest_run "${CAP[narrow:tests]}" tests -m "gpu and deepep" -k narrow_rows tests/test_gpu_dist.py || rc=1
  for w in 2 4; do  # (hidden 128, the demo's default: 256-byte rows)
    if (( GPUS >= w )); then demo "$w" "$WORK/narrow/demo-W$w-auto-hidden128.txt" auto || rc=1; fi
  done
  return "$rc"
}

# bench_dispatch.py at W ranks, one shape a run (each its own table and JSON): every manager eager
# and captured with the 1.25x bound, bf16 and FP8, beside raw DeepEP and the reference dispatcher.
bench() {  # bench W NAME SHAPE ITERS
  local log=$WORK/$PHASE/$2.txt rc
  x "${CAP[$PHASE:$2]}" "$log" python3 tools/bench_dispatch.py --world-size "$1" --shapes "$3" --iters "$4" \
    --managers "$MANAGERS" --json "$WORK/$PHASE/$2.json" --png "$WORK/$PHASE/$2.png"; rc=$?
  if live; then
    { echo "bench_dispatch W=$1 shape $3, $4 iterations (rc=$rc):"
      grep -E "^\||^NVLink traffic|^aggregate|^raw DeepEP|^[0-9]+ x |^experts:" "$log"
      (( rc == 0 )) || tail -8 "$log"; } | tee -a "$LOG"
    DETAIL="$(grep -c "^| [0-9]" "$log") variants timed"
  fi
  return "$rc"
}
s_bench_large() { bench "$1" large 0 "${BENCH_ITERS:-50}"; }
s_bench_medium() { bench "$1" medium 1 "${BENCH_ITERS:-50}"; }
s_bench_small() { bench "$1" small 2 "${BENCH_SMALL_ITERS:-200}"; }

s_local_ops() { pytest_run "${CAP[local:ops]}" ops -m gpu tests/test_ops.py; }
s_local_dispatcher() {
  local rc=0
  pytest_run "${CAP[local:dispatcher]}" dispatcher -m gpu tests/test_dispatcher_local.py tests/test_compile.py || rc=1
  pytest_run 120 jit tests/test_jit.py -k no_cuda_context || rc=1
  return "$rc"
}
s_local_demo() { demo 1 "$WORK/local/demo-local.txt" auto; }

# ---- the run ---------------------------------------------------------------------------------
needs() {  # the GPUs a step needs
  case $1 in build:*) echo 0 ;; *4:*) echo 4 ;; *2:*|narrow:*) echo 2 ;; *) echo 1 ;; esac
}
skip() { RESULT[$1]="skipped: $2"; note "$(printf '%-16s skipped: %s' "$1" "$2")"; }
CURRENT=""
timed() {  # timed ID EXPECTED CAP FUNCTION [ARGS]: run a step's function within its time; sets RC, TOOK
  local id=$1 expected=$2 cap=$3 t start; shift 3
  t=$(left); (( cap < t )) && t=$cap
  STEP_T=$t; STEP_END=$(( $(date +%s) + t ))
  step "$id (at most $t s)"
  [ -n "$DRY_RUN" ] && echo "  expected $expected s"
  start=$(date +%s); CURRENT=$id
  "$@"; RC=$?
  CURRENT=""; TOOK=$(( $(date +%s) - start ))
  if [ -n "$DRY_RUN" ]; then TOOK=$expected; SIMULATED=$(( SIMULATED + expected )); fi
  if (( RC != 0 && (RC == 124 || TOOK >= t - 2) )); then CUT+=("$id"); fi
}
run_step() {  # run_step PHASE:STEP
  local id=$1
  PHASE=${id%%:*}; DETAIL=""
  if (( $(needs "$id") > GPUS )); then skip "$id" "needs $(needs "$id") GPUs, $GPUS here"; return; fi
  if [[ $PHASE == narrow ]] && ! have_deepep "$V121"; then
    skip "$id" "no $V121/ (DeepEP v1.2.1's source)"; return
  fi
  if (( $(left) < EXPECT[$id] )); then
    NOT_REACHED+=("$id")
    note "$(printf '%-16s not reached: %s s left before the deadline, %s expected' "$id" "$(left)" "${EXPECT[$id]}")"
    return
  fi
  mkdir -p "$WORK/$PHASE"
  timed "$id" "${EXPECT[$id]}" "${CAP[$id]}" "s_${PHASE//[0-9]/}_${id#*:}" "${PHASE//[!0-9]/}"
  (( RC != 0 )) && FAILED+=("$id")
  RESULT[$id]="rc=$RC"
  note "$(printf '%-16s rc=%-3s %4s s  %s' "$id" "$RC" "$TOOK" "$DETAIL")"
  pack
}

finish() {  # the phases' lines, and the command that runs what was not reached or was cut short
  local p s n_run n_fail n_skip missing again resume=()
  if [ -n "$CURRENT" ]; then note "$CURRENT: stopped from outside after $(elapsed) s in all"; NOT_REACHED+=("$CURRENT"); fi
  CURRENT=""
  note "---- phases ($(elapsed) s in all, deadline ${DEADLINE_S} s)"
  for p in "${PHASES[@]}"; do
    n_run=0 n_fail=0 n_skip=0 missing=() again=()
    for s in ${STEPS[$p]}; do
      case ${RESULT[$p:$s]:-} in
        "") ;; rc=0) n_run=$((n_run + 1)) ;; rc=*) n_run=$((n_run + 1)) n_fail=$((n_fail + 1)) ;; *) n_skip=$((n_skip + 1)) ;;
      esac
      if [[ " ${NOT_REACHED[*]} " == *" $p:$s "* ]]; then missing+=("$s"); again+=("$s");
      elif [[ " ${CUT[*]} " == *" $p:$s "* ]]; then again+=("$s"); fi
    done
    (( n_run + n_skip + ${#missing[@]} > 0 )) || continue
    note "phase $p: $n_run step(s) run, $n_fail failed, $n_skip skipped${missing[*]:+; not reached: ${missing[*]}}"
    if [ "${again[*]}" = "${STEPS[$p]}" ]; then resume+=("$p"); else resume+=("${again[@]/#/$p:}"); fi
  done
  (( ${#CUT[@]} )) && note "stopped at their time limit (run again in the resume below): ${CUT[*]}"
  (( ${#FAILED[@]} )) && note "failed: ${FAILED[*]} (log.txt; logs.tar.gz holds each step's whole output)"
  if (( ${#resume[@]} )); then note "resume: tools/gpu_group_run.sh ${resume[*]}"; else note "every step asked for was reached"; fi
  pack
  if [ -n "$DRY_RUN" ] || [ -s "$OUT/logs.tar.gz" ]; then rm -rf "$WORK"; fi  # (packed)
  live && echo "logs: $OUT (log.txt, summary.txt, logs.tar.gz)"
  return 0
}
on_signal() { trap - INT TERM; finish; exit 130; }
trap on_signal INT TERM

[ -n "$DRY_RUN" ] && echo "DRY_RUN: commands only; time advances by each step's expected seconds"
note "==== gpu_group_run $(date -u +%FT%TZ): ${*} ($GPUS GPUs, deadline ${DEADLINE_S} s${DRY_RUN:+, dry run})"
if live && (( GPUS == 0 )); then note "no GPU here (nvidia-smi -L lists none): nothing to run"; rm -rf "$WORK"; exit 2; fi
have_deepep || note "no .deepep/ (DeepEP 567632d's source): put it there; DeepEP's tests, demo and variants skip without it"
prepped="" built=""
for i in "${!TODO[@]}"; do
  id=${TODO[$i]}
  [[ $id == build:kernels ]] && built=1
  if [ -z "$prepped" ] && [[ $id != build:* ]]; then  # the builds, once, before the first step after "build"
    prepped=1
    expected=$(prep_expected); [ -n "$built" ] && expected=15  # (in place after the build phase)
    if (( $(left) < expected )); then
      note "prep (the builds) not reached: $(left) s left, $expected expected"; NOT_REACHED+=("${TODO[@]:$i}"); break
    fi
    timed prep "$expected" "${CAP[prep]}" prep
    note "$(printf '%-16s rc=%-3s %4s s' prep "$RC" "$TOOK")"
    if (( RC != 0 )); then
      note "prep failed: the kernels did not build (log.txt): nothing else can run"
      NOT_REACHED+=("${TODO[@]:$i}"); finish; exit 1
    fi
  fi
  run_step "$id"
done
finish
(( ${#FAILED[@]} )) && exit 1
(( ${#NOT_REACHED[@]} + ${#CUT[@]} )) && exit 3
exit 0
