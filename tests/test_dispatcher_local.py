"""The dispatcher on one process with no torch.distributed at all (ep_group=None): the
reference's API, semantics against the dense formula, validation, state, sync-free mode."""

import contextlib

import pytest
import torch
import torch.distributed as dist

import flexdispatch as fd
from dist_scenarios import metadata_released, moe_matches_dense, out_of_order_steps, two_dispatchers_interleaved
from moe_math import TOLERANCE, apply_experts, dense_layer, make_problem, rel_err
from conftest import DEVICES
from cuda_syncs import layer_syncs


def assert_close_to_dense(res):
    tol = res.pop("tolerance")
    assert res.pop("identical_reruns")
    assert res.pop("backend") == "local"
    assert all(v <= tol for v in res.values()), res


def make(experts=8, topk=2, **config):
    return fd.MoEFlexTokenDispatcher(experts, list(range(experts)),
                                     fd.MoEConfig(num_moe_experts=experts, moe_router_topk=topk, **config), None)


def test_public_names():
    assert fd.SHARING_DEEPEP_MANAGER is True
    assert issubclass(fd._DeepepManager, fd._DispatchManager)
    for name in ("setup_metadata", "dispatch", "combine", "get_dispached_metadata", "get_dispatched_metadata",
                 "get_permuted_hidden_states_by_experts", "get_restored_hidden_states_by_experts"):
        assert hasattr(fd._DispatchManager, name)
    for name in ("_initialize_metadata", "dispatch_preprocess", "dispatch_preprocess2", "dispatch_all_to_all",
                 "dispatch_postprocess", "token_permutation", "token_permutation2", "combine_preprocess",
                 "combine_all_to_all", "combine_postprocess", "token_unpermutation"):
        assert callable(getattr(fd.MoEFlexTokenDispatcher, name))
    with pytest.raises(TypeError):
        fd._DispatchManager()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", [dict(entry="probs"), dict(entry="indices", pad=4),
                                  dict(entry="probs", capacity=0.5), dict(entry="indices", capacity=1.25),
                                  dict(entry="probs", router_dtype="fp64", dtype="float64"),
                                  dict(entry="indices", dtype="bfloat16", hidden=32, router_dtype=None),
                                  dict(entry="probs", hidden=256, fp8=True),
                                  dict(entry="indices", dtype="bfloat16", hidden=128, fp8=True, pad=2)])
def test_one_rank_without_torch_distributed(device, case):
    assert not dist.is_initialized()
    assert_close_to_dense(moe_matches_dense(0, 1, tokens_per_rank=[57], device=device, **case))


def test_empty_batch_and_shared_state():
    assert_close_to_dense(moe_matches_dense(0, 1, tokens_per_rank=[0]))
    res = two_dispatchers_interleaved(0, 1)
    assert res["A"] < 2e-5 and res["B"] < 2e-5
    held = metadata_released(0, 1)
    assert not any(held["held"].values()) and held["freed"]
    messages = out_of_order_steps(0, 1)
    assert len(messages) == 3
    assert messages[0].startswith("combine_preprocess called out of order") and "is dispatch_preprocess" in messages[0]
    assert messages[1].startswith("dispatch_postprocess called out of order") and "is dispatch_all_to_all" in messages[1]
    assert messages[2].startswith("token_permutation called out of order") and "token_unpermutation" in messages[2]
    assert not any("setup_metadata" in m or "get_restored" in m for m in messages)  # (internal step names)


def test_leading_dims_restored_and_step_by_step_api():
    xs, logits, weights = make_problem(3, [24], 16, 8)
    d = make(8, 2)
    x = xs[0].float().reshape(6, 4, 16)
    probs = torch.softmax(logits[0], -1).float()
    hidden, token_probs = d.dispatch_preprocess(x, 24, probs.reshape(6, 4, 8))
    assert hidden.shape == (24, 16) and token_probs.shape == (24, 2)
    hidden, dispatched_probs = d.dispatch_all_to_all(hidden)
    indices, probs_again = d._comm_manager.get_dispached_metadata()
    assert probs_again is dispatched_probs and indices.dtype == torch.int64
    tokens, tpe, pprobs = d.dispatch_postprocess(hidden)
    assert tpe.device.type == "cpu" and tpe.dtype == torch.int64
    y = apply_experts(tokens, tpe, pprobs, weights.float())
    out = d.combine_postprocess(d.combine_all_to_all(d.combine_preprocess(y)))
    assert out.shape == (6, 4, 16)
    token_probs, token_indices = torch.topk(torch.softmax(logits[0], -1), 2)
    expected = dense_layer(xs[0], token_probs, token_indices, weights)
    assert rel_err(out.reshape(24, 16), expected) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("sync_free", [True, False])
def test_one_rank_call_runs_no_tensor_op_that_changes_nothing(sync_free):
    """Host time of a one-rank call: flat [T, H] rows and [T, E] probs go through as they are
    (no reshape to the same shape, no view back), the kernels' error words are read without
    indexing ops, and the router's top-k is selected and checked in one kernel. Every aten op
    of a forward is recorded; none of those kinds may appear (each one costs a torch dispatch
    on the host, every call)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorded(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    d = make(8, 2, moe_sync_free=sync_free)
    x = torch.randn(48, 16)
    probs = torch.softmax(torch.randn(48, 8), -1)
    expected = d.token_unpermutation(d.token_permutation(x, 48, probs)[0])
    with Recorded() as recorded:
        out = d.token_unpermutation(d.token_permutation(x, 48, probs)[0])
    assert torch.equal(out, expected) and out.shape == x.shape
    assert "empty" in recorded.ops  # (the mode saw the call: the kernels' outputs)
    needless = {"view", "reshape", "_unsafe_view", "select", "_local_scalar_dense", "detach"}
    assert not needless.intersection(recorded.ops), recorded.ops
    assert "topk" not in recorded.ops  # (the router's top-k is selected and checked by one kernel)


def test_dispatched_probs_are_zero_where_capacity_left_no_expert():
    """The reference's dispatched metadata: a slot the capacity dropped (index -1) has prob 0,
    the kept slots their router prob, bit for bit."""
    d = make(4, 2, moe_expert_capacity_factor=0.5)
    g = torch.Generator().manual_seed(5)
    probs = torch.softmax(torch.randn(16, 4, generator=g), -1)
    d.dispatch_preprocess(torch.randn(16, 8, generator=g), 16, probs)
    d.dispatch_all_to_all(torch.randn(16, 8, generator=g))
    indices, dispatched = d._comm_manager.get_dispatched_metadata()
    top, _ = torch.topk(probs, 2)
    dropped = indices < 0
    assert dropped.any() and (~dropped).any()
    assert torch.equal(dispatched[dropped], torch.zeros(int(dropped.sum())))
    assert torch.equal(dispatched[~dropped], top[~dropped])
    d.reset()


@pytest.mark.gpu
@pytest.mark.parametrize("sync_free,config", [
    (True, {}), (True, dict(moe_max_tokens_per_expert=16)), (True, dict(moe_fp8_dispatch=True)), (False, {}),
    (False, dict(moe_expert_capacity_factor=1.0, moe_router_expert_pad_multiple=4)),
    (False, dict(moe_fp8_dispatch=True)),
])
def test_one_gpu_layer_syncs_only_to_size_its_permutation(sync_free, config):
    """CUDA's sync debug mode reports every call that waits for the device: over three steps of
    a one-rank layer (routing and its deferred check, permutation, experts, restore, backward),
    a sync-free layer makes none, and one sized on the host exactly one a forward (its
    permutation's size)."""
    syncs, outputs, inputs = layer_syncs(make(8, 2, moe_sync_free=sync_free, **config), seed=23)
    assert len(syncs) == (0 if sync_free else 3), syncs
    assert all(bool(t.abs().sum() > 0) for t in outputs) and all(s[0].grad.abs().sum() > 0 for s in inputs)


_A2A_SYNCS = """
import torch, torch.distributed as dist
import flexdispatch as fd
from cuda_syncs import layer_syncs
from dist_pool import _free_port
dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1,
                        device_id=torch.device("cuda:0"))
cfg = fd.MoEConfig(num_moe_experts=8, moe_router_topk=2, moe_flex_backend="alltoall")
d = fd.MoEFlexTokenDispatcher(8, list(range(8)), cfg, dist.group.WORLD)
syncs, _, _ = layer_syncs(d, seed=5)
print("backend", d.backend)
print("syncs", len(syncs))
fd.shutdown()
dist.destroy_process_group()
"""


@pytest.mark.gpu
def test_all_to_all_on_nccl_waits_only_to_read_its_headers():
    """The all-to-all manager (asked for by name) on a one-rank NCCL group, under CUDA's sync
    debug mode: three forward + backward steps wait for the device only at their header reads,
    four a step (dispatch, combine, and the backward of each). A header message built from a
    Python list waited before each exchange as well (eight a step). In a child process, whose
    NCCL group is its own."""
    import subprocess
    import sys

    from pathlib import Path

    done = subprocess.run([sys.executable, "-c", _A2A_SYNCS], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).parent)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in done.stdout.splitlines() if " " in line)
    assert lines.get("backend") == "alltoall", done.stdout
    assert lines.get("syncs") == str(3 * 4), done.stdout


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sync_free", [False, True])
def test_one_call_permutation_ignores_the_probs_of_unassigned_slots(device, sync_free):
    """The one-call entry point hands the routing's probs to the permutation unmasked: over
    three calls it must give what the step-by-step path (which masks them) gives, bit for bit,
    values and gradients, even where an unassigned slot's prob is NaN or infinite."""
    config = dict(moe_sync_free=sync_free, moe_max_tokens_per_expert=12 if sync_free else None)
    one_call, steps = make(6, 3, **config), make(6, 3, **config)
    g = torch.Generator().manual_seed(11)
    for _ in range(3):
        x = torch.randn(20, 8, generator=g).to(device)
        indices = torch.stack([torch.randperm(6, generator=g)[:3] for _ in range(20)])
        indices[torch.rand(20, 3, generator=g) < 0.3] = -1
        probs = torch.rand(20, 3, generator=g, dtype=torch.float64).float()
        probs[indices < 0] = torch.tensor([float("nan"), float("inf"), -3.0]).repeat(20)[:int((indices < 0).sum())]
        results = []
        for d in (one_call, steps):
            xi, pi = x.clone().requires_grad_(), probs.to(device).requires_grad_()
            if d is one_call:
                tokens, tpe, pprobs = d.token_permutation2(xi, 20, pi, indices.to(device))
            else:
                hidden, _ = d.dispatch_preprocess2(xi, 20, pi, indices.to(device))
                tokens, tpe, pprobs = d.dispatch_postprocess(d.dispatch_all_to_all(hidden)[0])
            out = d.token_unpermutation(tokens * pprobs[:, None])
            (out * torch.arange(8, device=device)).sum().backward()
            results.append((tokens.detach(), tpe, pprobs.detach(), out.detach(), xi.grad, pi.grad))
        for a, b in zip(*results):
            assert torch.equal(a, b)
        assert torch.isfinite(results[0][-1]).all() and not results[0][-1][indices < 0].any()


# (config, probs dtype, one op for dense probs, one op for given routing): the configurations
# whose routing and permutation are one operation, and those with something between them
# (capacity, a bound; for dense probs a dtype conversion of the top-k's values, while given probs
# are converted before the one op, as the routing step converts them)
ONE_STEP_CASES = [
    (dict(), torch.float32, True, True), (dict(moe_sync_free=True), torch.float32, True, True),
    (dict(moe_router_expert_pad_multiple=4, moe_router_dtype=None), torch.float64, True, True),
    (dict(moe_sync_free=True, moe_router_expert_pad_multiple=4), torch.float32, True, True),
    (dict(moe_router_dtype="fp64"), torch.float64, True, True), (dict(), torch.bfloat16, False, True),
    (dict(moe_router_dtype="fp64"), torch.float32, False, True), (dict(), torch.float64, False, True),
    (dict(moe_expert_capacity_factor=1.0), torch.float32, False, False),
    (dict(moe_sync_free=True, moe_max_tokens_per_expert=10), torch.float32, False, False),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("config,prob_dtype,one_node,given_in_one", ONE_STEP_CASES)
@pytest.mark.parametrize("route", ["dense", "given"])
def test_one_rank_token_permutation_routes_and_permutes_in_one_step(device, config, prob_dtype, one_node,
                                                                    given_in_one, route, monkeypatch):
    """On one rank ``token_permutation`` (``token_permutation2``: routing given) routes,
    dispatches and permutes as one step, the routing (the top-k, or the check of the given
    route) and the permutation in one operation where nothing runs between them (for dense
    probs one autograd node): over three calls it gives what the step-by-step API gives, bit
    for bit (tokens, counts, probs, the restored output, both gradients), and leaves the same
    records (token probs and indices, the dispatched probs of assigned slots) for the steps
    that follow. Given routes have unused slots, and int32 indices in one call."""
    one_step, steps = make(6, 3, **config), make(6, 3, **config)
    fused = []
    for name in ("route_and_permute_trusted", "check_and_permute_trusted"):
        op = getattr(fd.ops, name)
        monkeypatch.setattr(fd.ops, name, lambda *a, _op=op, **k: (fused.append(1), _op(*a, **k))[1])
    g = torch.Generator().manual_seed(29)
    for call in range(3):
        x = torch.randn(20, 8, generator=g).to(device)
        probs = torch.softmax(torch.randn(20, 6, generator=g, dtype=torch.float64), -1).to(prob_dtype).to(device)
        given = torch.topk(probs, 3)
        given[1][torch.rand(20, 3, generator=g).to(device) < 0.2] = -1
        if call == 1:  # (int32 indices, as a router may give them)
            given = (given[0], given[1].int())
        results = []
        for d in (one_step, steps):
            xi, pi = x.clone().requires_grad_(), (probs if route == "dense" else given[0]).clone().requires_grad_()
            if d is one_step and route == "dense":
                tokens, tpe, pprobs = d.token_permutation(xi, 20, pi)
            elif d is one_step:
                tokens, tpe, pprobs = d.token_permutation2(xi, 20, pi, given[1])
            else:
                hidden, _ = (d.dispatch_preprocess(xi, 20, pi) if route == "dense" else
                             d.dispatch_preprocess2(xi, 20, pi, given[1]))
                tokens, tpe, pprobs = d.dispatch_postprocess(d.dispatch_all_to_all(hidden)[0])
            manager = d._comm_manager
            assigned = manager.dispatched_indices >= 0  # (the one-call path leaves other slots' probs unmasked)
            records = (manager.token_probs.detach(), manager.token_indices, manager.dispatched_indices,
                       torch.where(assigned, manager.dispatched_probs.detach(), 0))
            if d is one_step and route == "dense":
                assert (manager.token_probs.grad_fn is tokens.grad_fn) == one_node
            out = d.token_unpermutation(tokens * pprobs[:, None].to(tokens.dtype))
            (out * torch.arange(8, device=device)).sum().backward()
            results.append((tokens.detach(), tpe, pprobs.detach(), out.detach(), xi.grad, pi.grad) + records)
        for a, b in zip(*results):
            assert a.dtype == b.dtype and torch.equal(a, b)
        assert results[0][5].abs().sum() > 0
    assert len(fused) == (3 if (one_node if route == "dense" else given_in_one) else 0)


def test_a_step_replaced_on_the_manager_runs_in_the_one_call_entry_points():
    """A test or subclass that replaces one of a manager's steps sees it called by
    ``token_permutation`` or ``token_unpermutation`` (their one-step paths are the base
    class's steps only)."""
    for step in ("route_dense", "set_routing", "dispatch", "get_permuted_hidden_states_by_experts",
                 "get_restored_hidden_states_by_experts", "combine"):
        d = make(6, 3)
        manager, seen = d._comm_manager, []
        original = getattr(manager, step)
        setattr(manager, step, lambda *a, _original=original, **k: (seen.append(step), _original(*a, **k))[1])
        probs = torch.softmax(torch.randn(10, 6), -1)
        tokens, _, _ = d.token_permutation(torch.randn(10, 8), 10, probs)
        d.token_unpermutation(tokens)
        tokens, _, _ = d.token_permutation2(torch.randn(10, 8), 10, *torch.topk(probs, 3))
        d.token_unpermutation(tokens)
        assert seen == {"route_dense": [step], "set_routing": [step]}.get(step, [step, step])


@pytest.mark.gpu
@pytest.mark.parametrize("route", ["dense", "given"])
@pytest.mark.parametrize("bad", [False, True])
def test_a_sync_free_one_gpu_call_leaves_only_its_route_checks_error_word(route, bad):
    """One rank, sync-free: the route is checked where it is selected or given (its bad entries
    are -1 from there on), so its permutation, sized for the worst case, takes no error word of
    its own. Each call leaves exactly one word pending, and a bad route still raises under the
    caller's argument at the next sync."""
    from flexdispatch import _library

    d = make(8, 2, moe_sync_free=True)
    g = torch.Generator().manual_seed(5)
    for call in range(3):
        x = torch.randn(64, 16, generator=g).cuda()
        probs = torch.softmax(torch.randn(64, 8, generator=g), -1)
        token_probs, token_indices = torch.topk(probs, 2)
        if bad and call == 2:
            probs[7, token_indices[7, 0]] = float("nan")
            token_indices[9, 1] = 8
        fd.ops.check_pending_errors()
        before = len(_library._pending)
        given = token_probs.cuda(), token_indices.cuda()  # (alive: the error names their entry)
        if route == "dense":
            rows, _, _ = d.token_permutation(x, 64, probs.cuda())
        else:
            rows, _, _ = d.token_permutation2(x, 64, *given)
        assert len(_library._pending) == before + 1
        d.token_unpermutation(rows)
        match = "^probs: non-finite" if route == "dense" else r"^token_indices: .*value 8 at row 9"
        with pytest.raises(ValueError, match=match) if bad and call == 2 else contextlib.nullcontext():
            fd.ops.check_pending_errors()


@pytest.mark.parametrize("device", DEVICES)
def test_sync_free_mode(device):
    xs, logits, weights = make_problem(4, [40], 16, 8)
    d = make(8, 3, moe_sync_free=True, moe_router_expert_pad_multiple=4)
    x = xs[0].float().to(device)
    tokens, tpe, pprobs = d.token_permutation(x, 40, torch.softmax(logits[0], -1).float().to(device))
    assert tpe.device.type == device  # no host copy
    assert tokens.shape[0] == 40 * 3 + 8 * 3  # worst case: T * min(K, E) + E * (pad - 1)
    assert int(tpe.sum()) <= tokens.shape[0] and int(tpe.sum()) % 4 == 0
    assert torch.count_nonzero(tokens[int(tpe.sum()):]) == 0
    w = weights.float().to(device)
    counts = tpe.tolist()
    used = sum(counts)
    y = torch.cat([apply_experts(tokens[:used], tpe, pprobs[:used], w), tokens[used:]])
    out = d.token_unpermutation(y)
    token_probs, token_indices = torch.topk(torch.softmax(logits[0], -1), 3)
    assert rel_err(out, dense_layer(xs[0], token_probs, token_indices, weights)) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("call,error,match", [
    (lambda d, x, p: d.token_permutation(x, 9, p), ValueError, "num_local_tokens: 9 does not match"),
    (lambda d, x, p: d.token_permutation(x, 10, p[:, :5]), ValueError, r"probs: expected shape \[num_local_tokens, num_moe_experts\]"),
    (lambda d, x, p: d.token_permutation(x, 10, p.t().contiguous().reshape(8, 10)), ValueError, r"probs: expected shape"),
    (lambda d, x, p: d.token_permutation(x, 10, p.flatten()), ValueError, r"probs: expected shape"),
    (lambda d, x, p: d.token_permutation(x.long(), 10, p), TypeError, "hidden_states: expected a floating-point"),
    (lambda d, x, p: d.token_permutation(x[:, :0], 10, p), ValueError, "hidden_states: expected a hidden size >= 1"),
    (lambda d, x, p: d.token_permutation(x, 10, torch.where(p > 0.5, float("nan"), p)), ValueError, "^probs: non-finite"),
    (lambda d, x, p: d.token_permutation2(x, 10, torch.full((10, 2), float("inf")), torch.topk(p, 2)[1]), ValueError, "^token_probs: non-finite"),
    (lambda d, x, p: d.token_permutation(x, 10, p.long()), TypeError, "probs: expected a floating-point"),
    (lambda d, x, p: d.token_permutation2(x, 10, *torch.topk(p, 3)), ValueError, "token_indices: expected .*topk=2"),
    (lambda d, x, p: d.token_permutation2(x, 10, p[:, :2], torch.topk(p, 2)[1].float()), TypeError, "token_indices: expected an int32 or int64"),
    (lambda d, x, p: d.token_permutation2(x, 10, p[:, :2], torch.full((10, 2), 9)), ValueError, "value 9 .* out of range"),
    (lambda d, x, p: d.token_permutation2(x, 10, p[:, :2], torch.zeros(10, 2, dtype=torch.long)), ValueError, "names an expert twice"),
    (lambda d, x, p: d.token_permutation(x[0], 10, p), ValueError, "hidden_states: expected a tensor"),
    (lambda d, x, p: d.token_unpermutation(d.token_permutation(x, 10, p)[0].long()), TypeError,
     "^hidden_states: expected a floating-point"),
    (lambda d, x, p: d.token_unpermutation(d.token_permutation(x, 10, p)[0][1:]), ValueError,
     r"^hidden_states: expected \d+ rows \(the permuted rows\)"),
])
def test_bad_input(call, error, match):
    d = make(8, 2)
    with pytest.raises(error, match=match):
        call(d, torch.randn(10, 4), torch.rand(10, 8))
    d.reset()
    tokens, tpe, pprobs = d.token_permutation(torch.randn(10, 4), 10, torch.rand(10, 8))  # still usable
    assert d.token_unpermutation(tokens).shape == (10, 4)


def test_constructor_validation():
    cfg = fd.MoEConfig(num_moe_experts=8)
    with pytest.raises(ValueError, match="num_local_experts"):
        fd.MoEFlexTokenDispatcher(4, list(range(4)), cfg, None)
    with pytest.raises(ValueError, match="local_expert_indices"):
        fd.MoEFlexTokenDispatcher(8, list(range(1, 9)), cfg, None)
    with pytest.raises(ValueError, match="moe_flex_backend='deepep'"):
        fd.MoEFlexTokenDispatcher(8, list(range(8)), fd.MoEConfig(num_moe_experts=8, moe_flex_backend="deepep"), None)
    with pytest.raises(ValueError, match="moe_flex_backend='nvlink': needs an expert-parallel process group"):
        fd.MoEFlexTokenDispatcher(8, list(range(8)), fd.MoEConfig(num_moe_experts=8, moe_flex_backend="nvlink"), None)


class ForeignConfig:
    """A config object of another class with the reference's field names."""
    num_moe_experts = 8
    moe_router_topk = 3
    moe_enable_deepep = True
    moe_expert_capacity_factor = None


def test_foreign_config_accepted():
    d = fd.MoEFlexTokenDispatcher(8, list(range(8)), ForeignConfig(), None)
    assert d.config.moe_router_topk == 3 and d.backend == "local"


@pytest.mark.parametrize("field,value,match", [
    ("moe_router_topk", 0, "moe_router_topk"), ("moe_router_topk", 65, "at most num_moe_experts"),
    ("num_moe_experts", 0, "num_moe_experts"), ("moe_expert_capacity_factor", -1.0, "capacity_factor"),
    ("moe_router_expert_pad_multiple", 0, "pad_multiple"), ("moe_router_dtype", "bf16", "moe_router_dtype"),
    ("moe_flex_backend", "nccl", "moe_flex_backend"), ("moe_deepep_num_sms", 21, "even"),
    ("moe_max_tokens_per_expert", 4, "set moe_sync_free=True"), ("moe_dropped_tokens", "drop", "moe_dropped_tokens"),
    ("moe_nvlink_max_blocks", -1, "moe_nvlink_max_blocks"), ("moe_nvlink_max_blocks", 1.5, "moe_nvlink_max_blocks"),
    ("moe_comm_sms", 1, "moe_comm_sms"), ("moe_comm_sms", 8.0, "moe_comm_sms"),
])
def test_config_validation(field, value, match):
    with pytest.raises(ValueError, match=match):
        fd.MoEConfig(**{field: value})


def test_checked_routing_expert_limit_at_construction():
    """Routing validation serves at most the kernels' MAX_EXPERTS experts: a layer with more is
    refused when its config is built (naming num_moe_experts), not at its first call; without
    validation the limit does not apply to the global count."""
    from flexdispatch.spec import MAX_EXPERTS

    with pytest.raises(ValueError, match=f"num_moe_experts: routing validation serves at most {MAX_EXPERTS}"):
        fd.MoEConfig(num_moe_experts=MAX_EXPERTS + 1)
    with pytest.raises(ValueError, match=f"num_experts: routing validation serves at most {MAX_EXPERTS}"):
        fd.managers._LocalManager(None, router_topk=2, num_experts=MAX_EXPERTS + 1)
    assert fd.MoEConfig(num_moe_experts=MAX_EXPERTS + 1, moe_validate_routing=False).num_moe_experts == MAX_EXPERTS + 1
    d = fd.MoEFlexTokenDispatcher(MAX_EXPERTS, list(range(MAX_EXPERTS)), fd.MoEConfig(num_moe_experts=MAX_EXPERTS), None)
    x, probs = torch.randn(6, 4), torch.randn(6, MAX_EXPERTS).softmax(-1)
    rows, counts, _ = d.token_permutation(x, 6, probs)
    assert int(counts.sum()) == 6 * d.config.moe_router_topk and rows.shape[0] == 6 * d.config.moe_router_topk


@pytest.mark.parametrize("budget,deepep,hybridep,nvlink", [(None, 20, 24, 0), (33, 32, 33, 33), (2, 2, 2, 2)])
def test_one_sm_budget_sets_every_backend(budget, deepep, hybridep, nvlink):
    """moe_comm_sms sets the SM (block) count of every backend at once, DeepEP's rounded down to
    an even count; unset, each backend's own field applies. The dispatcher's checked settings
    carry the counts that apply."""
    from flexdispatch.config import SM_FIELDS, sm_setting

    cfg = fd.MoEConfig(num_moe_experts=8, moe_comm_sms=budget)
    assert [sm_setting(cfg, name) for name in SM_FIELDS] == [deepep, hybridep, nvlink]
    assert sm_setting(cfg, "moe_router_topk") == cfg.moe_router_topk
    d = fd.MoEFlexTokenDispatcher(8, list(range(8)), cfg, None)
    assert (d.spec.num_sms, d.spec.nvlink_max_blocks) == (deepep, nvlink)


@pytest.mark.parametrize("budget,deepep,hybridep", [(None, 20, 24), (33, 32, 33)])
def test_the_sm_budget_reaches_each_engine(monkeypatch, budget, deepep, hybridep):
    """The SM count that applies is what each engine's manager is built with: DeepEP's and
    UCCL-EP's set_num_sms, HybridEP's dispatch and combine (engine stand-ins, a group object
    of two ranks as Automodel's tests pass)."""
    from unittest import mock

    import engine_standins
    from flexdispatch.managers import registry
    from flexdispatch.spec import LayerSpec

    group = mock.Mock()
    group.size.return_value = 2
    cfg = fd.TokenDispatcherConfig(num_moe_experts=8, moe_router_topk=2, moe_comm_sms=budget)
    spec = LayerSpec.checked(num_experts=8, num_local_experts=4, world_size=2, topk=2)
    told = []
    monkeypatch.setattr(fd, "set_deepep_num_sms", told.append, raising=False)
    monkeypatch.setattr(fd, "set_uccl_num_sms", lambda n: told.append(("uccl", n)), raising=False)
    with engine_standins.installed("deepep"):
        registry._build_deepep(group, spec, cfg)
    with engine_standins.installed("uccl_ep"):
        registry._build_uccl_ep(group, spec, cfg)
    assert told == [deepep, ("uccl", deepep)]
    with engine_standins.installed("hybridep"):
        assert registry._build_hybridep(group, spec, cfg).moe_hybridep_num_sms == hybridep


def test_a_deferred_error_names_its_argument_by_attribute_not_by_text():
    """The agreement sends the code of the argument an error carries (spec.input_error, the
    two-thread error), not one read out of its message: a message that merely starts with an
    argument's name carries none."""
    from flexdispatch.managers import agreement, groups
    from flexdispatch.spec import input_error

    named = input_error(TypeError, "hidden_states", "expected a floating-point tensor")
    assert isinstance(named, TypeError) and str(named) == "hidden_states: expected a floating-point tensor"
    assert agreement.ARGUMENTS[agreement.argument_code(named)] == "hidden_states"
    assert agreement.argument_code(ValueError("hidden_states: a message alone")) == 0
    assert agreement.argument_code(groups.ConcurrentCallError("threads: two at once")) == agreement.THREADS
    d = make(4, 2)
    with pytest.raises(ValueError, match="num_local_tokens") as caught:
        d.dispatch_preprocess(torch.randn(6, 8), 5, torch.rand(6, 4))
    assert caught.value.argument == "num_local_tokens"


def test_fp8_fused_permutation_is_deprecated_and_changes_nothing():
    """The option that only chose a slower path with the same bits warns and is ignored."""
    with pytest.warns(DeprecationWarning, match="moe_fp8_fused_permutation has no effect"):
        cfg = fd.MoEConfig(num_moe_experts=4, moe_router_topk=2, moe_fp8_dispatch=True, moe_fp8_fused_permutation=False)
    d = fd.MoEFlexTokenDispatcher(4, list(range(4)), cfg, None)
    x, p = torch.randn(6, 128), torch.rand(6, 4)
    rows, _, probs = d.token_permutation(x, 6, p)
    plain = fd.MoEFlexTokenDispatcher(4, list(range(4)), fd.MoEConfig(num_moe_experts=4, moe_router_topk=2,
                                                                       moe_fp8_dispatch=True), None)
    expected, _, expected_probs = plain.token_permutation(x, 6, p)
    assert torch.equal(rows, expected) and torch.equal(probs, expected_probs)
    assert torch.count_nonzero(rows) > 0


@pytest.mark.parametrize("device", DEVICES)
def test_bounded_sync_free_mode(device):
    """moe_max_tokens_per_expert: E_local * round_up(bound, pad) rows, each expert's first rows
    kept, the rest counted on the device and reported as the config says."""
    idx = torch.tensor([[0, 1], [0, 2], [0, 1], [0, 3], [1, 0], [2, 3]], device=device)
    x, p = torch.randn(6, 5, device=device), torch.rand(6, 2, device=device)
    d = make(4, 2, moe_sync_free=True, moe_max_tokens_per_expert=3, moe_router_expert_pad_multiple=2,
             moe_dropped_tokens="raise")
    tokens, tpe, pprobs = d.token_permutation2(x, 6, p, idx)
    assert tokens.shape[0] == 4 * 4 and tpe.tolist() == [4, 4, 2, 2] and tpe.device.type == device
    assert torch.equal(tokens[:3], x[:3]) and torch.count_nonzero(tokens[3]) == 0  # expert 0: rows 0-2, one pad
    assert torch.equal(pprobs[:3], p[:3, 0])
    out = d.token_unpermutation(tokens * pprobs[:, None])
    kept = torch.tensor([[1, 1], [1, 1], [1, 1], [0, 1], [1, 0], [1, 1]], device=device)  # rows 3, 4 lost expert 0
    assert torch.allclose(out, x * (p * kept).sum(1, keepdim=True))
    assert int(d.dropped_tokens()) == 2
    with pytest.raises(ValueError, match="2 assignment"):
        d.report_dropped_tokens()
    assert int(d.dropped_tokens()) == 0


def test_capacity_formula():
    assert fd.expert_capacity(num_tokens=100, topk=2, num_experts=8, capacity_factor=1.0) == 25
    assert fd.expert_capacity(num_tokens=10, topk=3, num_experts=4, capacity_factor=1.1) == 9


@pytest.mark.gpu
def test_one_gpu_sync_free_layer_replays_in_cuda_graph():
    from dist_scenarios import cuda_graph_sync_free

    res = cuda_graph_sync_free(0, 1)
    assert res["backend"] == "local" and max(res["errors"]) < 1e-6, res
    assert max(res["eager_vs_exact"]) < 1e-6, res


@pytest.mark.gpu
@pytest.mark.parametrize("bound", [None, 120])
def test_one_gpu_captured_forward_backward(bound):
    from dist_scenarios import cuda_graph_fwd_bwd

    res = cuda_graph_fwd_bwd(0, 1, bound=bound)
    assert all(all(step.values()) for step in res["same"]), res
    assert all(min(n.values()) > 0 for n in res["norms"]), res
    assert all(a == b and (a > 0) == (bound is not None) for a, b in res["dropped"]), res


@pytest.mark.parametrize("field,config_name,manager_name,value", [
    ("topk", "moe_router_topk", "router_topk", 0),
    ("pad_multiple", "moe_router_expert_pad_multiple", "moe_router_expert_pad_multiple", 0),
    ("capacity_factor", "moe_expert_capacity_factor", "capacity_factor", -1.0),
    ("router_dtype", "moe_router_dtype", "router_dtype", "bf16"),
])
def test_one_validator_for_config_and_managers(field, config_name, manager_name, value):
    """The config and a manager built with the reference's arguments run the same checks
    (flexdispatch/spec.py), each naming the argument its caller wrote."""
    with pytest.raises(ValueError, match=f"^{config_name}:"):
        fd.MoEConfig(num_moe_experts=8, **{config_name: value})
    kwargs = {"router_topk": 2, "num_experts": 8, manager_name: value}
    with pytest.raises(ValueError, match=f"^{manager_name}:"):
        fd._LocalManager(None, **kwargs)
    manager = fd._LocalManager(None, router_topk=2, num_experts=8, capacity_factor=1.5)
    assert manager.spec.topk == 2 and manager.num_local_experts == 8 and manager.capacity_factor == 1.5


def test_a_new_backend_is_one_registry_entry(monkeypatch):
    """A backend registered in managers/registry.py is accepted by the config and chosen, with
    no other change."""
    from flexdispatch.managers import registry

    class _EchoManager(fd._LocalManager):
        name = "echo"

    entry = registry.Backend("echo", _EchoManager, lambda group, **call: None)
    monkeypatch.setitem(registry.BACKENDS, "echo", entry)
    d = fd.MoEFlexTokenDispatcher(4, list(range(4)), fd.MoEConfig(num_moe_experts=4, moe_flex_backend="echo"))
    assert d.backend == "echo"
    x, p = torch.randn(6, 3), torch.rand(6, 4)
    tokens, tpe, probs = d.token_permutation(x, 6, p)
    out = d.token_unpermutation(tokens * probs[:, None])
    top = torch.topk(p, 2).values.sum(1, keepdim=True)
    assert torch.allclose(out, x * top)
    monkeypatch.delitem(registry.BACKENDS, "echo")
    with pytest.raises(ValueError, match="moe_flex_backend"):
        fd.MoEConfig(moe_flex_backend="echo")


def test_fp8_dispatch_rounds_and_checks_its_input():
    """One rank: the experts see the tokens rounded through FP8 (not the tokens themselves),
    the gradient passes the rounding unchanged, and unsuitable hidden states are refused."""
    d = make(4, 2, moe_fp8_dispatch=True)
    x = torch.randn(9, 256) * torch.logspace(-3, 3, 9)[:, None]
    x.requires_grad_()
    p = torch.rand(9, 4)
    tokens, tpe, probs = d.token_permutation(x, 9, p)
    rounded = fd.reference.fp8_round_trip(x.detach())
    rows = torch.cat([rounded[(torch.topk(p, 2).indices == e).any(1)] for e in range(4)])
    assert torch.equal(tokens, rows) and not torch.equal(rounded, x.detach())
    out = d.token_unpermutation(tokens * probs[:, None])
    out.backward(torch.ones_like(out))
    assert torch.allclose(x.grad, torch.topk(p, 2).values.sum(1, keepdim=True).expand(9, 256))
    with pytest.raises(ValueError, match="hidden_states: FP8 dispatch needs a hidden size that is a multiple of 128"):
        d.token_permutation(torch.randn(9, 200), 9, p)
    d.reset()
    with pytest.raises(TypeError, match="hidden_states: FP8 dispatch takes float32, float16 or bfloat16"):
        d.token_permutation(torch.randn(9, 128, dtype=torch.float64), 9, p)


def test_auto_choice_and_fallback_come_from_the_registry(monkeypatch):
    """auto on a group: the first backend of AUTO_ORDER whose probe passes, deferred to the first
    dispatch when it needs the tensors; the fallback is the next one that passes (DeepEP, then
    the NVLink backend, then the all-to-all manager)."""
    from flexdispatch.managers import registry

    group = object()  # a stand-in group of two ranks
    monkeypatch.setattr(registry, "_group_size", lambda g: 1 if g is None else 2)
    monkeypatch.setitem(registry.BACKENDS, "deepep", registry.Backend(
        "deepep", fd._DeepepManager, lambda g, **call: None if call.get("device") is None else "no", needs_tensors=True))
    assert registry.choose("auto", group, 2) == registry.Choice(None, candidate="deepep")
    assert registry.choose("auto", group, 2, prefer_deepep=False) == registry.Choice(None, candidate="nvlink")
    assert registry.choose("auto", None, 2) == registry.Choice("local")
    assert registry.fallback("deepep", group) == "nvlink"
    assert registry.fallback("nvlink", group) == "alltoall"
    monkeypatch.setitem(registry.BACKENDS, "deepep", registry.Backend(
        "deepep", fd._DeepepManager, lambda g, **call: "deep_ep does not import", needs_tensors=True))
    assert registry.choose("auto", group, 2) == registry.Choice(None, candidate="nvlink",
                                                                passed_over="deep_ep does not import")
    with pytest.raises(ValueError, match="moe_flex_backend='deepep': deep_ep does not import"):
        registry.choose("deepep", group, 2)


@pytest.mark.parametrize("world", [2, 4, 8])
def test_nvlink_pulls_start_at_the_next_ranks_rows(world):
    """Each rank's pull of its received rows (grouped by source) starts at the first row from
    rank + 1, so that at any moment the readers and the sources they read are a one-to-one
    match; sync-free (counts on the device only): the next rank's share of the worst case."""
    from types import SimpleNamespace

    from flexdispatch.managers.nvlink import _NvlinkManager

    g = torch.Generator().manual_seed(world)
    rows = torch.randint(0, 50, (world, world), generator=g).tolist()  # [source][dest]
    starts = []
    for rank in range(world):
        me = SimpleNamespace(rank=rank, world_size=world, stagger_pulls=True)
        received = sum(r[rank] for r in rows)
        first = _NvlinkManager._first_row(me, {"received": received}, rows)
        source = (rank + 1) % world
        want = sum(rows[s][rank] for s in range(source))
        assert first == (want if want < received else 0)  # (past the last row: from the start)
        starts.append(source)
        worst = _NvlinkManager._first_row(me, {"received": 64 * world}, None)
        assert worst == 64 * source
        assert _NvlinkManager._first_row(SimpleNamespace(rank=rank, world_size=world, stagger_pulls=False),
                                         {"received": received}, rows) == 0
    assert sorted(starts) == list(range(world))  # every source is some reader's first


def test_auto_takes_nvlink_only_for_cuda_tensors_on_nccl_with_kernels(monkeypatch):
    """The NVLink backend can serve CPU (gloo) groups through its emulation, which auto passes
    over, as it does non-NCCL groups and a build without CUDA kernels."""
    from flexdispatch.managers import registry

    group, cpu, cuda = object(), torch.device("cpu"), torch.device("cuda", 0)
    monkeypatch.setattr(registry.dist, "get_backend", lambda g: "gloo")
    assert registry.unusable_reason("nvlink", group, device=cpu) is None  # (explicitly: served, emulated)
    assert "CUDA tensors" in registry.auto_passes_over("nvlink", group, device=cpu)
    assert "NCCL" in registry.auto_passes_over("nvlink", group, device=cuda)
    monkeypatch.setattr(registry.dist, "get_backend", lambda g: "nccl")
    monkeypatch.setattr(registry.ops, "cuda_kernels_loaded", lambda: False)
    assert "kernels" in registry.auto_passes_over("nvlink", group, device=cuda)
    monkeypatch.setattr(registry.ops, "cuda_kernels_loaded", lambda: True)
    assert registry.auto_passes_over("nvlink", group, device=cuda) is None
    assert registry.auto_passes_over("alltoall", group, device=cpu) is None


def test_negative_routing_probs_follow_the_formula():
    """Negative probabilities are accepted (the layer is linear in them; some routers produce
    signed weights): the output is the dense formula's, through both entry points."""
    xs, logits, weights = make_problem(8, [30], 16, 8)
    dense = -torch.softmax(logits[0], -1)  # every prob negative: the top-k are the least negative
    token_probs, token_indices = torch.topk(dense, 2)
    want = dense_layer(xs[0], token_probs, token_indices, weights)
    for entry in ("indices", "probs"):
        d = make(8, 2)
        if entry == "indices":
            tokens, tpe, pprobs = d.token_permutation2(xs[0], 30, token_probs, token_indices)
        else:
            tokens, tpe, pprobs = d.token_permutation(xs[0], 30, dense)
        assert (pprobs < 0).all()
        out = d.token_unpermutation(apply_experts(tokens, tpe, pprobs, weights))
        assert rel_err(out, want) < TOLERANCE[torch.float32], entry
