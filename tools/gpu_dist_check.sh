#!/usr/bin/env bash
# One call on a lent machine with 4 GPUs: build DeepEP (carried in .deepep/, never committed)
# and the kernels, then the GPU tests (1, 2 and 4 ranks; NCCL and DeepEP), the dispatch and
# op benchmarks, the demo, and the notebook. Everything lands under $OUT.
set -uo pipefail
. "$(dirname "$0")/gpu_env.sh"

step machine
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  nvidia-smi topo -m | head -8
  python3 -c "import torch, sys; print(sys.version.split()[0], torch.__version__, torch.version.cuda, torch.cuda.device_count())"
} 2>&1 | tee -a "$LOG"

step "deepep build"
s=$(ms); build_deepep; echo "deepep build took $(( $(ms) - s )) ms" | tee -a "$LOG"
python3 -c "import deep_ep, flexdispatch; print('deep_ep', deep_ep.__file__, flexdispatch.deepep_available())" 2>&1 \
  | tail -2 | tee -a "$LOG"

step "kernels"
s=$(ms); python3 -c "import flexdispatch" 2>&1 | tee -a "$LOG"
echo "cold import (build): $(( $(ms) - s )) ms" | tee -a "$LOG"
s=$(ms); python3 -c "import flexdispatch"; echo "warm import: $(( $(ms) - s )) ms" | tee -a "$LOG"
s=$(ms); python3 -c "import torch"; echo "import torch alone: $(( $(ms) - s )) ms" | tee -a "$LOG"

step "gpu tests"
timeout 900 python3 -m pytest -q -m gpu -p no:cacheprovider -rs tests/test_ops.py tests/test_dispatcher_local.py \
  tests/test_gpu_dist.py > "$OUT/gpu_tests.txt" 2>&1
echo "gpu tests rc=$?" | tee -a "$LOG"; tail -15 "$OUT/gpu_tests.txt" | tee -a "$LOG"

step "bench_dispatch W=4"
timeout 400 python3 tools/bench_dispatch.py --world-size 4 --json "$OUT/bench_dispatch.json" \
  --png "$OUT/bench_dispatch.png" 2>&1 | grep -v "^\[flexdispatch\]" | tee -a "$LOG"

step "bench_ops"
timeout 300 python3 tools/bench_ops.py --json "$OUT/bench_ops.json" --png "$OUT/bench_ops.png" \
  2>&1 | tee -a "$LOG"

step "demo"
timeout 200 python3 -m flexdispatch demo --world-size 4 --device cuda 2>&1 | grep -v "^\[flexdispatch\]" | tee -a "$LOG"
timeout 200 python3 -m flexdispatch demo --world-size 4 --device cuda --backend alltoall 2>&1 \
  | grep -v "^\[flexdispatch\]" | tee -a "$LOG"

step notebook
timeout 200 python3 tools/run_notebook.py examples/quickstart.ipynb 2>&1 | tee -a "$LOG"
step done
