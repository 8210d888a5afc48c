#!/usr/bin/env bash
# One call on a lent one-GPU machine: cold kernel build, warm import, the GPU tests, the op
# benchmark. Writes its logs under $OUT (the device tool brings them back).
set -uo pipefail
. "$(dirname "$0")/gpu_env.sh"
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv
  python3 -c "import torch, sys; print(sys.version.split()[0], torch.__version__, torch.version.cuda)"
  nvcc --version | tail -1; } 2>&1 | tee "$LOG"
s=$(ms); python3 -c "import flexdispatch; flexdispatch.ops.load_kernels()" 2>&1 | tee "$OUT/build.log"
echo "cold kernel build: $(( $(ms) - s )) ms" | tee -a "$LOG"
s=$(ms); python3 -c "import flexdispatch"
echo "warm import: $(( $(ms) - s )) ms" | tee -a "$LOG"
s=$(ms); python3 -c "import torch"
echo "import torch alone: $(( $(ms) - s )) ms" | tee -a "$LOG"
python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_ops.py tests/test_dispatcher_local.py 2>&1 \
  | tee "$OUT/gpu_tests.log" | tail -25
python3 -m pytest -q -p no:cacheprovider tests/test_jit.py -k "no_cuda_context" 2>&1 | tail -3 | tee -a "$OUT/gpu_tests.log"
python3 tools/bench_ops.py --json "$OUT/bench_ops.json" --png "$OUT/bench_ops.png" 2>&1 | tee "$OUT/bench_ops.md"
