"""The dispatcher on 2 and 4 GPUs of one node: all-to-all over NCCL, and DeepEP (marked
``deepep``): the same semantics checks as on the CPU, DeepEP against all-to-all on the same
inputs, async ordering, and a sync-free layer replayed in a CUDA graph."""

import pytest
import torch

from dist_pool import DistPool, check_dense_results as check
from test_dispatcher_dist import (check_first_call_needs_no_numpy, check_layer_settings_differ_raise,
                                  check_layers_called_out_of_order_raise, check_skipped_backward_raises,
                                  check_sync_free_invalid_routing_is_reported)
from test_group_safety import check_nothing_holds_a_destroyed_group, check_two_threads_raise_on_every_rank
from test_stateful import check_agreed

pytestmark = pytest.mark.gpu


def _gpu_count() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"W{w}")
def pool(request):
    if _gpu_count() < request.param:
        pytest.skip(f"needs {request.param} GPUs")
    p = DistPool(request.param, backend="nccl")
    yield p
    p.close()


def _case(cases, name, world):
    """A case's arguments, per-rank token counts cut to the group size."""
    kwargs = dict(cases[name])
    if "tokens_per_rank" in kwargs:
        kwargs["tokens_per_rank"] = kwargs["tokens_per_rank"][:world]
    return kwargs


NCCL_CASES = {
    "probs-fp32": dict(entry="probs"), "indices-pad": dict(entry="indices", pad=4),
    "capacity": dict(entry="probs", capacity=0.8), "fp64": dict(entry="probs", router_dtype="fp64", dtype="float64"),
    "bf16": dict(entry="indices", dtype="bfloat16", hidden=64),
    "empty-rank": dict(entry="indices", tokens_per_rank=[0, 40, 0, 17]),
    "fp8-dispatch": dict(entry="indices", hidden=256, fp8=True, pad=2),
}


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", list(NCCL_CASES))
def test_alltoall_over_nccl(pool, case):
    results = pool.run("moe_matches_dense", device="cuda", backend="alltoall", **_case(NCCL_CASES, case, pool.world))
    assert {r["backend"] for r in results} == {"alltoall"}
    check(results)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", [dict(dtype="bfloat16", hidden=64, deepep=False),
                                  pytest.param(dict(dtype="float32", hidden=64), marks=pytest.mark.deepep)],
                         ids=["no-deepep", "deepep-refuses-fp32"])
def test_auto_takes_nvlink_on_one_node_without_deepep(pool, case):
    """auto on NCCL and CUDA tensors: with DeepEP disabled, or when DeepEP refuses the call
    (float32 rows, a second vote), every rank takes the NVLink backend, and the layer equals
    its dense formula."""
    results = pool.run("moe_matches_dense", device="cuda", backend="auto", entry="indices", **case)
    assert {r["backend"] for r in results} == {"nvlink"}
    check(results)


@pytest.mark.timeout(300)
def test_alltoall_nccl_errors_and_interleaving(pool):
    for res in pool.run("invalid_routing_all_ranks_raise", bad_rank=1, device="cuda", backend="alltoall"):
        assert res["message"] and "rank(s) [1]" in res["message"] and res["recovered"]
    for res in pool.run("two_dispatchers_interleaved", device="cuda", backend="alltoall"):
        assert res["A"] < 2e-5 and res["B"] < 2e-5


DEEPEP_CASES = {
    "probs": dict(entry="probs"), "indices-pad": dict(entry="indices", pad=4),
    "capacity": dict(entry="indices", capacity=0.8), "fp64-routing": dict(entry="probs", router_dtype="fp64"),
    "top1": dict(entry="probs", topk=1), "empty-rank": dict(entry="indices", tokens_per_rank=[0, 40, 0, 17]),
    "fp8-dispatch": dict(entry="indices", fp8=True), "fp8-dispatch-capacity": dict(entry="probs", fp8=True, capacity=0.8),
}


@pytest.mark.deepep
@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", list(DEEPEP_CASES))
def test_deepep_matches_dense(pool, case):
    results = pool.run("moe_matches_dense", device="cuda", backend="deepep", dtype="bfloat16", hidden=1024,
                       **_case(DEEPEP_CASES, case, pool.world))
    assert {r["backend"] for r in results} == {"deepep"}
    check(results)


@pytest.mark.deepep
@pytest.mark.timeout(300)
def test_deepep_equals_alltoall(pool):
    for res in pool.run("deepep_matches_alltoall", pad=2):
        assert res["backends"] == ("deepep", "alltoall")
        assert res["same_tokens"] and res["same_counts"], res
        assert res["out"] < 1e-2 and res["grad_x"] < 1e-2 and res["grad_probs"] < 1e-2, res


@pytest.mark.deepep
@pytest.mark.timeout(300)
def test_deepep_errors_interleaving_async(pool):
    for res in pool.run("invalid_routing_all_ranks_raise", bad_rank=0, device="cuda", backend="deepep",
                        dtype="bfloat16"):
        assert res["message"] and "every rank raises" in res["message"] and res["recovered"]
    for res in pool.run("two_dispatchers_interleaved", device="cuda", backend="deepep", dtype="bfloat16"):
        assert res["A"] < 4e-2 and res["B"] < 4e-2
    # A host check failing on one rank of an FP8 layer after another layer widened the group's
    # buffer to 1040 values: that rank's stand-in rows once took the buffer's width, which the
    # quantizer refused on that rank alone, and its peer waited in DeepEP until its timeout.
    for res in pool.run("invalid_routing_all_ranks_raise", bad_rank=0, device="cuda", backend="deepep",
                        dtype="bfloat16", bad="probs_shape", fp8=True, widen_first=1040):
        assert res["message"] and "token_probs" in res["message"] and "raises" in res["message"], res
        assert res["recovered"], res
    for res in pool.run("async_overlap", backend="deepep"):
        assert res["identical"] and res["side"]


@pytest.mark.deepep
@pytest.mark.timeout(300)
def test_deepep_sync_free_cuda_graph(pool):
    for res in pool.run("cuda_graph_sync_free", backend="deepep"):
        assert res["backend"] == "deepep"
        assert max(res["errors"]) < 1e-6 and max(res["eager_vs_exact"]) < 1e-6, res


@pytest.mark.timeout(300)
@pytest.mark.timeout(300)
def test_peer_header_exchange_equals_the_all_gather(pool):
    """The DeepEP manager's agreement through symmetric memory, 60 exchanges of one group:
    the same masked indices and gathered headers as the all-gather path, whether the headers
    agree, differ on one rank, or carry its error bits."""
    for res in pool.run("peer_headers_equal_all_gather", steps=60):
        assert res["differ"] == [], res
        assert {k for k, _ in res["kinds"]} == {0, 1, 2, 3}, res
        assert (0, False) in res["kinds"] and (2, True) in res["kinds"], res  # both decisions were taken


@pytest.mark.timeout(200)
def test_peer_header_wait_traps_instead_of_hanging():
    """A rank whose peer never sends its header: the exchange kernel traps after
    FLEXDISPATCH_PEER_TIMEOUT_S (2 s here), a CUDA error on that rank instead of a hang. The
    rank either raises it or is ended by it (torch's NCCL watchdog aborts a process whose CUDA
    context failed: on H200s it died with SIGABRT, after the kernel's message); a hang fails."""
    import time

    if _gpu_count() < 2:
        pytest.skip("needs 2 GPUs")
    p = DistPool(2, backend="nccl")
    start = time.monotonic()
    try:
        first = p.run("peer_header_wait_traps", timeout=120, timeout_s=2.0)[0]
        assert first["error"] is not None and 1.5 <= first["waited"] < 60, first
    except RuntimeError as exc:  # (not TimeoutError: a hang is a failure)
        assert "rank(s) [0] died" in str(exc), exc
    finally:
        p.close()
    assert time.monotonic() - start < 100


@pytest.mark.parametrize("backend", ["alltoall", "nvlink", pytest.param("deepep", marks=pytest.mark.deepep)])
def test_fp8_experts_get_the_dequantizing_rows_on_gpus(pool, backend):
    for res in pool.run("fp8_experts_equal_the_dequantizing_path", device="cuda", backend=backend, hidden=1024):
        assert res["backend"] == backend and res["rows"] and res["tpe"] and res["probs"] and res["out"], res
        assert res["nonzero"] and res["message"] and res["message"].startswith("hidden_states:"), res
        assert res["recovered"], res


@pytest.mark.timeout(300)
@pytest.mark.parametrize("backend", ["alltoall", pytest.param("deepep", marks=pytest.mark.deepep)])
def test_fp8_one_call_equals_the_three_steps_on_gpus(pool, backend):
    for res in pool.run("fp8_one_call_equals_steps", device="cuda", backend=backend, dtype="bfloat16", hidden=1024):
        assert res["backend"] == backend and all(res["equal"]) and res["nonzero"], res


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", ["plain", "bounded", "fp8"])
@pytest.mark.parametrize("backend", [pytest.param("deepep", marks=pytest.mark.deepep), "nvlink"])
def test_captured_forward_backward(pool, backend, case):
    """Forward and backward of a sync-free layer in one CUDA graph, replayed on new inputs:
    bit for bit the eager run's output and gradients (with a bound that drops assignments,
    dropped counts equal too; and with FP8 dispatch). The bound, 120 rows against a mean of 128
    an expert, drops some of every expert's rows but leaves every rank some (it keeps an
    expert's first rows, source rank by source rank)."""
    options = {"plain": {}, "bounded": {"bound": 120}, "fp8": {"fp8": True}}[case]
    for res in pool.run("cuda_graph_fwd_bwd", backend=backend, **options):
        assert res["backend"] == backend
        assert all(all(step.values()) for step in res["same"]), res
        assert all(min(n.values()) > 0 for n in res["norms"]), res
        for replayed, eager in res["dropped"]:
            assert replayed == eager and (replayed > 0) == (case == "bounded"), res


@pytest.mark.timeout(900)
def test_stateful_alltoall_nccl(pool):
    """The stateful multi-step programs (tests/stateful.py) over NCCL, float32 on the GPUs."""
    seeds = [7000 + 10 * pool.world + i for i in range(4)]
    results = pool.run("stateful_programs", timeout=800, seeds=seeds, steps=40, device="cuda", backend="alltoall",
                       hidden_sizes=(8, 16))
    assert check_agreed(results) == 160


@pytest.mark.deepep
@pytest.mark.timeout(900)
def test_stateful_deepep(pool):
    """The stateful programs on DeepEP: bf16 rows of widths every DeepEP build serves, one of
    them not whole 128-value groups (1040: FP8 layers then share a buffer sized by a layer
    they could not be, seeds 8022 and 8040 fail a host check there); no mid-call reset on
    one rank (DeepEP's combine has no header to agree at)."""
    seeds = [8000 + 10 * pool.world + i for i in range(4)]
    results = pool.run("stateful_programs", timeout=800, seeds=seeds, steps=40, device="cuda", backend="deepep",
                       dtypes=("bfloat16",), hidden_sizes=(1024, 1040), max_tokens=96, expert_error=False)
    assert check_agreed(results) == 160


@pytest.mark.deepep
@pytest.mark.timeout(300)
@pytest.mark.parametrize("tokens", [512, 4096])
def test_deepep_narrow_rows_on_fixed_builds(pool, tokens):
    """256-byte rows (hidden 128): DeepEP builds with its narrow-row fix serve them and agree
    with all-to-all stage by stage; older builds are refused before any collective."""
    from flexdispatch.managers import deepep

    if not deepep.narrow_rows_fixed():
        pytest.skip("this DeepEP build predates its narrow-row fix")
    for res in pool.run("deepep_stage_diff", tokens=tokens, hidden=128):
        assert res["recv_equal"] and res["rows_equal"] and res["tpe_equal"] and res["restored_equal"], res
        assert res["nan_rows_deepep"] == 0 and res["deepep_out_err"] < 1e-2 and res["alltoall_out_err"] < 1e-2, res


@pytest.mark.deepep
@pytest.mark.timeout(300)
@pytest.mark.parametrize("hidden", [1024, 2048])
@pytest.mark.parametrize("tokens", [64, 512, 4096])
@pytest.mark.parametrize("async_finish", [False, True], ids=["sync", "async"])
def test_deepep_stages_agree_with_alltoall(pool, tokens, hidden, async_finish):
    for res in pool.run("deepep_stage_diff", tokens=tokens, hidden=hidden, async_finish=async_finish):
        assert res["recv_equal"] and res["rows_equal"] and res["tpe_equal"] and res["restored_equal"], res
        assert res["nan_rows_deepep"] == 0 and res["deepep_out_err"] < 1e-2 and res["alltoall_out_err"] < 1e-2, res


# ---- the NVLink manager on symmetric memory ----------------------------------------------------


@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", list(NCCL_CASES))
def test_nvlink_matches_dense(pool, case):
    results = pool.run("moe_matches_dense", device="cuda", backend="nvlink", **_case(NCCL_CASES, case, pool.world))
    assert {r["backend"] for r in results} == {"nvlink"}
    check(results)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("options", [dict(dtype="bfloat16", hidden=7168, tokens=512, topk=8),
                                     dict(dtype="bfloat16", hidden=2048, tokens=256, pad=4),
                                     dict(dtype="float32", hidden=36), dict(fp8=True, dtype="bfloat16", hidden=1024),
                                     dict(dtype="bfloat16", hidden=4096, tokens=700, topk=8, max_blocks=3)],
                         ids=["wide", "pad", "narrow-fp32", "fp8", "capped-blocks"])
@pytest.mark.parametrize("transport", ["symmetric", "gather"])
def test_nvlink_equals_alltoall_bit_for_bit_on_gpus(pool, options, transport):
    """Over symmetric memory (rows read over NVLink) and over the gather transport on NCCL:
    every stage, both entry points, the same bits as the all-to-all manager."""
    results = pool.run("backends_bitwise_equal", device="cuda", transport=transport, **options)
    for res in results:
        assert res["backends"] == ("alltoall", "nvlink") and res["nonzero"], res
        assert res["differ"] == [], res


@pytest.mark.timeout(300)
def test_nvlink_errors_and_interleaving_on_gpus(pool):
    for res in pool.run("invalid_routing_all_ranks_raise", bad_rank=1, device="cuda", backend="nvlink"):
        assert res["message"] and "rank(s) [1]" in res["message"] and res["recovered"], res
    for res in pool.run("two_dispatchers_interleaved", device="cuda", backend="nvlink"):
        assert res["A"] < 2e-5 and res["B"] < 2e-5, res


@pytest.mark.timeout(900)
def test_stateful_nvlink(pool):
    """The stateful programs on the NVLink manager (symmetric memory), float32, half the layers
    sync-free."""
    seeds = [9000 + 10 * pool.world + i for i in range(4)]
    results = pool.run("stateful_programs", timeout=800, seeds=seeds, steps=40, device="cuda", backend="nvlink",
                       hidden_sizes=(8, 16), sync_free=True)
    assert check_agreed(results) == 160


@pytest.mark.timeout(300)
def test_nvlink_group_of_one_on_a_gpu():
    """Symmetric memory with a group of one rank (allocation, rendezvous, barrier, tables):
    the dense formula, and the all-to-all manager's bits."""
    if _gpu_count() < 1:
        pytest.skip("needs a GPU")
    p = DistPool(1, backend="nccl")
    try:
        check(p.run("moe_matches_dense", device="cuda", backend="nvlink", entry="indices", pad=4))
        for res in p.run("backends_bitwise_equal", device="cuda", dtype="bfloat16", hidden=2048, tokens=256):
            assert res["backends"] == ("alltoall", "nvlink") and res["nonzero"] and res["differ"] == [], res
        for bound in (None, 60):  # sync-free, captured forward and backward
            for res in p.run("cuda_graph_fwd_bwd", backend="nvlink", bound=bound):
                assert res["backend"] == "nvlink" and all(all(step.values()) for step in res["same"]), res
    finally:
        p.close()


@pytest.mark.deepep
@pytest.mark.timeout(300)
def test_auto_passes_narrow_rows_on_from_builds_without_the_fix(pool):
    """256-byte rows (hidden 128) on a DeepEP build that predates its narrow-row fix (v1.2.1:
    wrong combine sums from 512 tokens a rank): auto passes them on to the NVLink manager, right."""
    from flexdispatch.managers import deepep

    if deepep.narrow_rows_fixed():
        pytest.skip("this DeepEP build has its narrow-row fix (test_deepep_narrow_rows_on_fixed_builds)")
    results = pool.run("moe_matches_dense", device="cuda", backend="auto", entry="indices", dtype="bfloat16",
                       hidden=128, tokens_per_rank=[512] * pool.world)
    assert {r["backend"] for r in results} == {"nvlink"}
    check(results)


class TestGroupChecksOnNccl:
    """The group's checks that test_dispatcher_dist.py and test_group_safety.py run on gloo
    (tests/dist_scenarios.py), here on NCCL and CUDA tensors: the first call's vote without
    NumPy, the layer and settings fields of the headers, the backward's header exchange,
    sync-free routing validation, the thread guard, no reference kept to a destroyed group.
    (Peer timeouts bound gloo's waits only: on GPUs the header exchange traps, tested above.)"""

    @pytest.mark.timeout(300)
    def test_first_call_needs_no_numpy(self, pool):
        check_first_call_needs_no_numpy(pool, device="cuda")

    @pytest.mark.timeout(300)
    @pytest.mark.parametrize("backend", ["alltoall", "nvlink", pytest.param("deepep", marks=pytest.mark.deepep)])
    def test_layers_called_in_a_different_order_raise_on_every_rank(self, pool, backend):
        options = dict(dtype="bfloat16", hidden=1024, tolerance=0.1) if backend == "deepep" else {}  # (bf16)
        check_layers_called_out_of_order_raise(pool, backend, device="cuda", **options)

    @pytest.mark.timeout(300)
    @pytest.mark.parametrize("field,named", [("backend", "backend"), ("fp8", "moe_fp8_dispatch"),
                                             ("experts", "num_moe_experts")])
    def test_ranks_that_built_a_layer_differently_raise_on_every_rank(self, pool, field, named):
        check_layer_settings_differ_raise(pool, field, named, device="cuda")

    @pytest.mark.timeout(300)
    @pytest.mark.parametrize("backend", ["alltoall", "nvlink"])
    def test_a_rank_skipping_backward_makes_every_rank_raise(self, pool, backend):
        check_skipped_backward_raises(pool, backend, device="cuda")

    @pytest.mark.timeout(300)
    @pytest.mark.parametrize("kind", ["above", "negative", "huge", "nan", "inf", "duplicate"])
    def test_sync_free_invalid_routing_is_reported_on_every_rank(self, pool, kind):
        check_sync_free_invalid_routing_is_reported(pool, kind, device="cuda")

    @pytest.mark.timeout(900)
    @pytest.mark.parametrize("backend", ["alltoall", "nvlink", pytest.param("deepep", marks=pytest.mark.deepep)])
    def test_stateful_shared_managers(self, pool, backend):
        """Layers 0 and 1 of the same settings share one manager (moe_share_token_dispatcher),
        "pair" steps keep both in flight; DeepEP with the rows of test_stateful_deepep."""
        options = dict(dtypes=("bfloat16",), hidden_sizes=(1024, 1040), max_tokens=96, expert_error=False) \
            if backend == "deepep" else dict(hidden_sizes=(8, 16))
        seeds = [9500 + 10 * pool.world + i for i in range(2)]
        results = pool.run("stateful_programs", timeout=800, seeds=seeds, steps=40, device="cuda", backend=backend,
                           shared=True, **options)
        assert check_agreed(results) == 80

    @pytest.mark.timeout(200)
    @pytest.mark.parametrize("backend", ["alltoall", "nvlink"])
    def test_nothing_keeps_a_destroyed_group_alive(self, pool, backend):
        check_nothing_holds_a_destroyed_group(pool, backend, timeout=120, device="cuda")

    @pytest.mark.timeout(200)
    @pytest.mark.parametrize("backend", ["alltoall", "nvlink"])
    def test_two_threads_on_one_group_raise_on_every_rank(self, pool, backend):
        check_two_threads_raise_on_every_rank(pool, backend, timeout=120, device="cuda")
