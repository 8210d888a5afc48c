# Sourced by the tools/gpu_*.sh scripts run on lent GPU machines: where logs go, and the
# environment every run needs (NVLink multicast off, DeepEP's headers and module, a fresh
# kernel cache, strict kernel builds).
OUT=${OUT:-$(mktemp -d)}
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export CPATH=/usr/local/cuda/include/cccl:${CPATH:-}
export PYTHONPATH=$PWD:$PWD/.deepep FLEXDISPATCH_CACHE_DIR=${FLEXDISPATCH_CACHE_DIR:-$(mktemp -d)} PYTHONUNBUFFERED=1 MAX_JOBS=$(nproc)
export FLEXDISPATCH_JIT=1
LOG=$OUT/log.txt
step() { echo "=== $1 ($(date +%T))" | tee -a "$LOG"; }
ms() { echo $(( $(date +%s%N) / 1000000 )); }
# A warm machine keeps an earlier call's build when .deepep is not carried again (carrying it
# replaces the folder, build included: 74 s to rebuild on 2 x H200). build_deepep [DIR] builds
# another checkout (e.g. .deepep-v121), within DEEPEP_BUILD_TIMEOUT seconds (300); its log is
# /tmp/deepep_build.txt (/tmp/deepep_build-DIR.txt for another folder).
build_deepep() {
  local dir=${1:-.deepep} out=/tmp/deepep_build.txt rc
  [ "$dir" = .deepep ] || out=/tmp/deepep_build-${dir#.}.txt
  if ls "$dir"/deep_ep_cpp*.so >/dev/null 2>&1; then echo "deepep: already built ($dir)" | tee -a "$LOG"; return; fi
  (cd "$dir" && TORCH_CUDA_ARCH_LIST=9.0 timeout "${DEEPEP_BUILD_TIMEOUT:-300}" python3 setup.py build_ext --inplace > "$out" 2>&1)
  rc=$?; echo "deepep build rc=$rc ($dir)" | tee -a "$LOG"; tail -3 "$out" >> "$LOG"; return $rc
}
# The one-GPU tests (ops, the one-rank layer, torch.compile, the local manager's stateful
# programs: the gpu-marked tests of those files) on this tree, within TEST_TIMEOUT seconds
# (240), their log in $OUT/gpu_tests.log and on stdout.
one_gpu_tests() {
  timeout "${TEST_TIMEOUT:-240}" python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_ops.py \
    tests/test_dispatcher_local.py tests/test_compile.py tests/test_stateful.py 2>&1 | tee "$OUT/gpu_tests.log"
}
