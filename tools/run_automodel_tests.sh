#!/usr/bin/env bash
# Runs NeMo Automodel's own CPU unit tests that touch its flex token dispatcher twice: with
# Automodel's module, and with that module aliased to flexdispatch (tools/automodel_alias.py),
# and prints, per file, the counts of both runs and every test whose outcome differs.
#
#   tools/run_automodel_tests.sh AUTOMODEL_CHECKOUT [OUT_DIR]
#
# Needs, in the active environment: nemo-automodel's dependencies (pip install nemo-automodel),
# flexdispatch (pip install -e .), pytest. The tests run from the checkout's sources.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
usage="usage: $0 AUTOMODEL_CHECKOUT [OUT_DIR]"
[ $# -ge 1 ] || { echo "$usage" >&2; exit 2; }
am=$(cd "$1" && pwd) || { echo "$0: $1: not a folder; $usage" >&2; exit 2; }
out=${2:-$(mktemp -d)}
mkdir -p "$out" && out=$(cd "$out" && pwd) || exit 2  # (absolute: the tests run from the checkout)
files=(
  tests/unit_tests/moe/test_token_dispatcher.py
  tests/unit_tests/moe/test_fused_a2a.py
  tests/unit_tests/moe/test_uccl_ep_integration.py
  tests/unit_tests/moe/test_experts.py
  tests/unit_tests/moe/test_layers.py
  tests/unit_tests/moe/test_backend_config.py
  tests/unit_tests/moe/test_parallelizer.py
  tests/unit_tests/distributed/test_destroy_global_state.py
  tests/unit_tests/models/gemma4/test_gemma4_layers.py
  tests/unit_tests/models/laguna/test_model.py
  tests/unit_tests/models/kimi_k3/test_pipeline_parallel.py
  tests/unit_tests/components/cuda_graphs/test_partial.py
  tests/unit_tests/_peft/test_lora_experts.py
  tests/unit_tests/recipes/llm/test_eagle3_kimi_k3_target.py
  tests/unit_tests/recipes/llm/test_glm_5_2_lora_config.py
  tests/unit_tests/recipes/llm/test_nemotron_v3_5_lightning_singlegpu_lora_config.py
  tests/unit_tests/recipes/llm/test_train_dspark_helpers.py
  tests/unit_tests/recipes/llm/test_qwen3_moe_thd_config.py
)
cd "$am" || exit 2
# One line per test: "OUTCOME nodeid" (pytest -rA's summary), for each run.
outcomes() {  # $1: log
  grep -E '^(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS) ' "$1" | sed -E 's/ - .*//' | sort -u
}
counts() {  # $1: log
  tail -n 1 "$1" | sed -E 's/ in [0-9.]+s.*//; s/^=+ //'
}
printf '%-78s | %-40s | %s\n' "file" "Automodel's module" "flexdispatch"
status=0
for f in "${files[@]}"; do
  name=$(echo "$f" | tr / _)
  timeout 900 python -m pytest --cpu -m "not pleasefixme" -q -rA -p no:cacheprovider "$f" >"$out/$name.own.log" 2>&1
  PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" timeout 900 python -m pytest --cpu -m "not pleasefixme" -q -rA \
    -p no:cacheprovider -p automodel_alias "$f" >"$out/$name.alias.log" 2>&1
  printf '%-78s | %-40s | %s\n' "$f" "$(counts "$out/$name.own.log")" "$(counts "$out/$name.alias.log")"
  diff <(outcomes "$out/$name.own.log") <(outcomes "$out/$name.alias.log") >"$out/$name.diff" || { status=1; sed 's/^/    /' "$out/$name.diff"; }
done
echo "logs: $out"
exit $status
