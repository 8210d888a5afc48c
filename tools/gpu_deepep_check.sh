#!/usr/bin/env bash
# A shorter call on a lent 4-GPU machine, for the DeepEP manager alone: build DeepEP (carried
# in .deepep/, never committed) and the kernels, then every DeepEP test at 2 and 4 ranks.
set -uo pipefail
. "$(dirname "$0")/gpu_env.sh"
step "builds"
nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tee -a "$LOG"
build_deepep
python3 -c "import flexdispatch" 2>&1 | tee -a "$LOG"
step "deepep tests"
timeout 300 python3 -m pytest -q -m deepep -p no:cacheprovider -rf tests/test_gpu_dist.py \
  > "$OUT/gpu_tests.txt" 2>&1
grep -E "^(FAILED|PASSED)|passed|failed" "$OUT/gpu_tests.txt" | sed 's/ - .*//' | tee -a "$LOG"
step done
