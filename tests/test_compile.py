"""torch.compile over a layer that uses the dispatcher (one rank, CPU; CUDA in the GPU suite).

The kernels are registered as torch.library ops (flexdispatch/_library.py): a compiled
layer must give the eager results bit for bit (AOT-eager backend: the same kernels run), over
several steps whose token count and routing change, forward and backward, and compile to one
graph in sync-free mode and on one rank where the route sizes the permutation (the top-K of
dense probs: T * K rows), to at most two around one break otherwise (the step that sizes the
permutation on the host runs eagerly), with no recompilation while shapes stay the same.
"""

import re

import pytest
import torch

import flexdispatch as fd
from flexdispatch import reference
from moe_math import capacity_drop, dense_layer, rel_err

E, K, H = 4, 2, 8
STEPS = [12, 12, 7, 0, 19, 3]
CASES = {
    "probs": dict(entry="probs"),
    "indices": dict(entry="indices"),
    "probs-pad": dict(entry="probs", pad=3),
    "probs-capacity": dict(entry="probs", capacity=1.5),
    "indices-pad-capacity": dict(entry="indices", pad=2, capacity=1.5),
    "fp64-routing": dict(entry="probs", router_dtype="fp64", dtype=torch.float64),
    "sync-free-bound": dict(entry="indices", sync_free=True, bound=64),
    "fp8-dispatch": dict(entry="probs", fp8=True, hidden=128),
}
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)]


def _dispatcher(case):
    cfg = fd.MoEConfig(num_moe_experts=E, moe_router_topk=K, moe_router_expert_pad_multiple=case.get("pad"),
                       moe_expert_capacity_factor=case.get("capacity"), moe_router_dtype=case.get("router_dtype", "fp32"),
                       moe_sync_free=case.get("sync_free", False), moe_max_tokens_per_expert=case.get("bound"),
                       moe_fp8_dispatch=case.get("fp8", False))
    return fd.MoEFlexTokenDispatcher(E, list(range(E)), cfg)


def _layer(d, weights, x, router, entry):
    """Experts f_e(x) = tanh(x @ W_e) on the permuted rows (expert of a row from the counts,
    no host read, so sync-free rows need no sync either)."""
    if entry == "probs":
        rows, tpe, probs = d.token_permutation(x, x.shape[0], router)
    else:
        rows, tpe, probs = d.token_permutation2(x, x.shape[0], router[0], router[1])
    ends = torch.cumsum(tpe.to(rows.device), 0)
    expert = torch.searchsorted(ends, torch.arange(rows.shape[0], device=rows.device), right=True).clamp(max=E - 1)
    y = torch.tanh(torch.einsum("nh,nhg->ng", rows, weights[expert]))
    return d.token_unpermutation(y * probs[:, None].to(y.dtype))


def _inputs(seed, tokens, case, device):
    g = torch.Generator().manual_seed(seed)
    dtype = case.get("dtype", torch.float32)
    hidden = case.get("hidden", H)
    x = torch.randn(tokens, hidden, generator=g, dtype=torch.float64)
    probs = torch.softmax(2 * torch.randn(tokens, E, generator=g, dtype=torch.float64), -1)
    grad = torch.randn(tokens, hidden, generator=g, dtype=torch.float64)
    if case["entry"] == "indices":
        tp, ti = torch.topk(probs, K, dim=-1)
        ti = torch.where(torch.rand(tokens, K, generator=g) < 0.2, -1, ti)
        return x.to(dtype), (tp, ti), grad
    return x.to(dtype), probs, grad


def _run(fn, d, weights, x, router, grad, case, device):
    """One step: output and the gradients of x, the router probs and the experts."""
    dtype = case.get("dtype", torch.float32)
    xl = x.to(device).requires_grad_()
    w = weights.to(device, dtype).requires_grad_()
    if case["entry"] == "probs":
        r = router.to(device, torch.float32 if dtype == torch.float32 else dtype).requires_grad_()
        leaf = r
    else:
        leaf = router[0].to(device, torch.float32).requires_grad_()
        r = (leaf, router[1].to(device))
    out = fn(d, w, xl, r, case["entry"])
    (out * grad.to(device, out.dtype)).sum().backward()
    return [t.detach().cpu() for t in (out, xl.grad, leaf.grad, w.grad)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(CASES))
def test_compiled_layer_equals_eager_over_steps(case, device):
    """One dispatcher per way of running, called for several steps with changing token counts
    and routing: compiled (AOT eager) equals eager bit for bit, and eager equals the dense
    formula, in the output and every gradient."""
    _assert_compiled_equals_eager_over_steps(CASES[case], device)


def _assert_compiled_equals_eager_over_steps(case, device):
    torch._dynamo.reset()
    hidden = case.get("hidden", H)
    weights = torch.randn(E, hidden, hidden, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    weights /= hidden ** 0.5
    eager, compiled = _dispatcher(case), _dispatcher(case)
    compiled_layer = torch.compile(_layer, backend="aot_eager")
    for step, tokens in enumerate(STEPS):
        x, router, grad = _inputs(100 + step, tokens, case, device)
        want = _run(_layer, eager, weights, x, router, grad, case, device)
        got = _run(compiled_layer, compiled, weights, x, router, grad, case, device)
        for name, a, b in zip(("output", "grad x", "grad probs"), got, want):
            assert torch.equal(a, b), f"step {step} ({tokens} tokens): compiled {name} differs from eager"
        # The experts' weight gradient sums rows in the stand-in experts' own code (an indexed
        # gather's backward), whose summation order a compiled graph may change: last bits only.
        assert rel_err(got[3], want[3]) <= 1e-6, f"step {step}: compiled grad experts differs from eager"
        # The eager output against the dense formula (capacity applied as documented).
        tp, ti = (torch.topk(router, K, dim=-1) if case["entry"] == "probs" else router)
        if case.get("capacity"):
            ti = capacity_drop(tp, ti, E, case["capacity"])
        seen = x.double()
        if case.get("fp8"):  # the experts see the tokens rounded through FP8
            seen = fd.reference.fp8_round_trip(x).double()
        dense = dense_layer(seen, tp.double(), ti, weights)
        tol = 1e-9 if case.get("dtype") == torch.float64 else 1e-5
        assert rel_err(want[0], dense) <= tol, f"step {step}: eager output differs from the dense formula"


def _router(case, tokens, seed, device):
    x, router, _ = _inputs(seed, tokens, case, device)
    return x.to(device), (router.float().to(device) if case["entry"] == "probs"
                          else (router[0].float().to(device), router[1].to(device)))


def _breaks(case, device="cpu"):
    torch._dynamo.reset()
    d = _dispatcher(case)
    weights = torch.randn(E, H, H, dtype=torch.float64).to(device, case.get("dtype", torch.float32))
    x, router = _router(case, 12, 7, device)
    return torch._dynamo.explain(_layer)(d, weights, x, router, case["entry"])


HOST_SIZED = ["indices", "probs-pad", "probs-capacity", "indices-pad-capacity"]


def permutes(graph) -> bool:
    """Whether a Dynamo graph holds a permutation op (alone, or one rank's routing and
    permutation in one)."""
    return re.search(r"flexdispatch\.((route|check)_and_)?permute\b", str(graph.graph)) is not None
ROUTE_SIZED = ["probs", "fp64-routing"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", HOST_SIZED)
def test_a_host_sized_layer_breaks_at_most_once(case, device):
    """Outside sync-free mode the host reads the permutation's size: the dispatcher's step that
    sizes it runs as one eager call, so the layer compiles to at most two graphs around at most
    one break (a data-dependent size inside the graph would break it once more per frame between
    the layer and the permutation), and the permutation stays eager."""
    explained = _breaks(CASES[case], device)
    assert explained.graph_count <= 2 and explained.graph_break_count <= 1, \
        [b.reason for b in explained.break_reasons]
    assert not any(permutes(g) for g in explained.graphs)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", ROUTE_SIZED)
def test_a_one_rank_layer_of_dense_probs_is_one_graph(case, device):
    """On one rank the top-K of dense probs names an expert in every slot, so the permutation
    has T * K rows, known without a sync, and its host-side counts come from the permutation op
    itself (on CUDA a copy of its layout, the call's one sync): the layer compiles to one graph
    holding the permutation, whatever Dynamo keeps."""
    for settings in ({}, DATA_DEPENDENT_SIZES):
        with torch._dynamo.config.patch(**settings):
            explained = _breaks(CASES[case], device)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), \
            [b.reason for b in explained.break_reasons]
        assert permutes(explained.graphs[0])


DATA_DEPENDENT_SIZES = dict(capture_dynamic_output_shape_ops=True, capture_scalar_outputs=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", HOST_SIZED)
def test_a_host_sized_layer_is_one_graph_where_dynamo_keeps_data_dependent_sizes(case, device):
    """With Dynamo set to keep data-dependent sizes and their host reads in its graphs, the
    step that sizes the permutation on the host is traced: the layer is one graph holding the
    permutation, and over the steps (token counts changing, zero included) it equals eager bit
    for bit, forward and backward. Either setting alone still runs the step eagerly (one break):
    the permutation's size needs the one, its host-side counts the other."""
    with torch._dynamo.config.patch(**DATA_DEPENDENT_SIZES):
        explained = _breaks(CASES[case], device)
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), \
            [b.reason for b in explained.break_reasons]
        assert permutes(explained.graphs[0])
        _assert_compiled_equals_eager_over_steps(CASES[case], device)
    for alone in DATA_DEPENDENT_SIZES:
        with torch._dynamo.config.patch(**{alone: True}):
            explained = _breaks(CASES[case], device)
            assert not any(permutes(g) for g in explained.graphs), alone


def _stepwise_layer(d, x, probs):
    """The layer through the dispatcher's step API (Automodel's newer path)."""
    hidden, token_probs = d.dispatch_preprocess(x, x.shape[0], probs)
    hidden, _ = d.dispatch_all_to_all(hidden, token_probs)
    rows, _, permuted_probs = d.dispatch_postprocess(hidden)
    y = d.combine_preprocess(torch.tanh(rows) * permuted_probs[:, None].to(rows.dtype))
    return d.combine_postprocess(d.combine_all_to_all(y))


@pytest.mark.parametrize("settings", [{}, DATA_DEPENDENT_SIZES], ids=["default", "data-dependent-sizes"])
def test_step_api_of_dense_probs_is_one_graph(settings):
    """dispatch_postprocess, the step API's permuting step, is traced as token_permutation is
    after routing dense probs (the route sizes the permutation), whatever Dynamo keeps: one
    graph, and over steps (token counts changing, zero included) the compiled steps equal eager
    bit for bit, forward and backward."""
    torch._dynamo.reset()

    def dispatcher():
        return fd.MoEFlexTokenDispatcher(E, list(range(E)), fd.MoEConfig(num_moe_experts=E, moe_router_topk=K), None)

    with torch._dynamo.config.patch(**settings):
        explained = torch._dynamo.explain(_stepwise_layer)(dispatcher(), torch.randn(10, H),
                                                           torch.rand(10, E).softmax(-1))
        assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
        compiled_layer, eager, compiled = torch.compile(_stepwise_layer, backend="aot_eager"), dispatcher(), dispatcher()
        for step, tokens in enumerate(STEPS):
            g = torch.Generator().manual_seed(200 + step)
            x, probs = torch.randn(tokens, H, generator=g), torch.rand(tokens, E, generator=g).softmax(-1)
            results = []
            for fn, d in ((_stepwise_layer, eager), (compiled_layer, compiled)):
                leaves = [x.clone().requires_grad_(), probs.clone().requires_grad_()]
                out = fn(d, *leaves)
                out.square().sum().backward()
                results.append([out.detach(), *(leaf.grad for leaf in leaves)])
            assert all(torch.equal(a, b) for a, b in zip(*results)), f"step {step} ({tokens} tokens)"


def test_fp8_experts_get_fp8_rows_from_a_compiled_layer_whatever_dynamo_keeps():
    """moe_fp8_experts hands the experts (FP8 rows, scales): a compiled layer does too, sized on
    the host or sync-free, with or without Dynamo's data-dependent-size settings (an FP8 layer's
    permuting step stays eager), and the bytes equal eager's."""
    def dispatcher(sync_free=False):
        cfg = fd.MoEConfig(num_moe_experts=E, moe_router_topk=K, moe_fp8_dispatch=True, moe_fp8_experts=True,
                           moe_sync_free=sync_free)
        return fd.MoEFlexTokenDispatcher(E, list(range(E)), cfg, None)

    def permuted(d, x, probs):
        return d.token_permutation(x, x.shape[0], probs)[0]

    g = torch.Generator().manual_seed(9)
    x, probs = torch.randn(10, 128, generator=g), torch.rand(10, E, generator=g).softmax(-1)
    with torch.no_grad():
        for sync_free in (False, True):
            want = permuted(dispatcher(sync_free), x, probs)
            for settings in ({}, DATA_DEPENDENT_SIZES):
                torch._dynamo.reset()
                with torch._dynamo.config.patch(**settings):
                    got = torch.compile(permuted, backend="aot_eager")(dispatcher(sync_free), x, probs)
                assert isinstance(got, tuple) and got[0].dtype == torch.float8_e4m3fn, (sync_free, settings)
                assert torch.equal(got[0].view(torch.uint8), want[0].view(torch.uint8))
                assert torch.equal(got[1], want[1])


def test_a_group_s_host_sized_step_stays_one_eager_call(monkeypatch):
    """Dynamo's data-dependent-size settings trace a one-rank layer's host-sized step only: a
    group's step reads its exchanges' headers on the host and branches on them, and a traced
    step runs without FP8 (moe_fp8_experts would get dequantized rows), so under torch.compile
    those stay one eager call whatever Dynamo keeps (sync-free steps are traced)."""
    import types

    step = fd.MoEFlexTokenDispatcher.__dict__["token_permutation"]
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)

    def layer(ep_size, sync_free=False, fp8_dispatch=False):
        spec = types.SimpleNamespace(sync_free=sync_free, fp8_dispatch=fp8_dispatch)
        return types.SimpleNamespace(ep_size=ep_size, spec=spec)

    with torch._dynamo.config.patch(**DATA_DEPENDENT_SIZES):
        assert step.__get__(layer(1)).func is step.method
        assert step.__get__(layer(2)).func is step.eager
        assert step.__get__(layer(1, fp8_dispatch=True)).func is step.eager
        assert step.__get__(layer(2, sync_free=True)).func is step.method
        assert step.__get__(types.SimpleNamespace(ep_size=1, spec=None)).func is step.method
    assert step.__get__(layer(1)).func is step.eager
    assert step.__get__(layer(1, sync_free=True, fp8_dispatch=True)).func is step.eager
    assert step.__get__(types.SimpleNamespace(ep_size=1, spec=None)).func is step.eager
    # (a one-rank layer whose manager sizes a full route by its shape: traced without the settings;
    # not with FP8 dispatch, nor for given indices, which may leave slots unused)
    one_rank = fd.MoEFlexTokenDispatcher(E, list(range(E)), fd.MoEConfig(num_moe_experts=E, moe_router_topk=K))
    assert step.__get__(one_rank).func is step.method
    given = fd.MoEFlexTokenDispatcher.__dict__["token_permutation2"]
    assert given.__get__(one_rank).func is given.eager
    fp8 = fd.MoEFlexTokenDispatcher(E, list(range(E)), fd.MoEConfig(num_moe_experts=E, moe_router_topk=K,
                                                                    moe_fp8_dispatch=True))
    assert step.__get__(fp8).func is step.eager


@pytest.mark.parametrize("device", DEVICES)
def test_sync_free_layer_compiles_to_one_graph(device):
    explained = _breaks(CASES["sync-free-bound"], device)
    assert explained.graph_break_count == 0, [b.reason for b in explained.break_reasons]
    assert explained.graph_count == 1
    assert permutes(explained.graphs[0])


def test_sized_permutation_ops_keep_every_output_on_the_route_device():
    """A permutation op told its output size (sync-free: the ops a compiled graph holds) makes
    every output on the route's device, the stand-in of its host layout included: a CPU tensor
    in a CUDA graph splits it (inductor partitions reduce-overhead's graphs around CPU nodes).
    An op that sizes its output on the host (a sync, never in a graph) returns that layout on
    the CPU. Checked on the ops' fakes with fake CUDA tensors, which need no GPU."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    ops = torch.ops.flexdispatch
    with FakeTensorMode():
        route = torch.empty(8, 2, dtype=torch.int64, device="cuda")
        rows, probs = torch.empty(8, 16, device="cuda"), torch.empty(8, 2, device="cuda")
        for outputs in (ops.plan(route, 4, 1, 24, "indices"), ops.permute(rows, probs, route, 4, 1, 24, "indices"),
                        ops.permute(rows, None, route, 4, 4, 40, "indices")):
            assert [o.device.type for o in outputs] == ["cuda"] * len(outputs)
        assert ops.plan(route, 4, 1, -1, "indices")[2].device.type == "cpu"


def test_a_cpu_layout_sized_on_the_host_is_read_in_place():
    """A permutation op that sizes a CPU route's output reads the layout where it is: its host
    layout output is [0] (no copy, and no output that aliases another), as its fake says, and
    the plan made from the outputs reads its counts and rows from the layout itself."""
    from flexdispatch import _library, ops as public

    if not _library.load_kernels():
        pytest.skip("the compiled kernels are not built here")
    g = torch.Generator().manual_seed(3)
    route = torch.stack([torch.randperm(6, generator=g)[:2] for _ in range(10)])
    rows = torch.randn(10, 16, generator=g)
    outputs = torch.ops.flexdispatch.permute(rows, None, route, 6, 4, -1, "indices")
    host, layout = outputs[4], outputs[3]
    assert host.numel() == 0 and host.dtype == torch.int64
    storages = [o.untyped_storage().data_ptr() for o in outputs if o.numel()]
    assert len(set(storages)) == len(storages)
    out, _, plan, counts = public.permute_by_indices(rows, route, None, 6, pad_multiple=4)
    ref_out, _, _, ref_counts = reference.permute_by_indices(rows, route, None, 6, pad_multiple=4)
    assert torch.equal(out, ref_out) and torch.equal(counts, ref_counts)
    assert torch.equal(plan.host_tokens_per_expert(), ref_counts) and plan.num_out == out.shape[0] == layout[18]
    plan.host_tokens_per_expert().add_(1)  # (the user's copy: the layout the kernels read stays)
    assert torch.equal(plan.layout[6:12], ref_counts)
    assert torch.equal(public.make_plan(route, 6, pad_multiple=4).map, plan.map)


@pytest.mark.parametrize("case,sizes_in_graph", [("probs", False), ("sync-free-bound", False), ("probs", True)])
def test_compiled_layer_graphs_are_made_once(case, sizes_in_graph):
    """Counted by a backend that records every graph it is given: a layer compiles to 1 graph
    sync-free or where Dynamo keeps data-dependent sizes (``sizes_in_graph``), 2 at most
    otherwise, and called again with the same shapes (the routing, and so the permutation's
    size, changing) it compiles nothing more (but once, when the sync-free bound's
    dropped-token counter, made by the first call, becomes an input), and its results stay the
    eager ones."""
    torch._dynamo.reset()
    case = CASES[case]
    settings = DATA_DEPENDENT_SIZES if sizes_in_graph else {}
    graphs = []

    def counting(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    weights = torch.randn(E, H, H, generator=torch.Generator().manual_seed(2), dtype=torch.float64).float()
    eager, compiled = _dispatcher(case), _dispatcher(case)
    layer = torch.compile(_layer, backend=counting)
    made = []
    for step in range(4):
        x, router, grad = _inputs(20 + step, 12, case, "cpu")
        want = _run(_layer, eager, weights, x, router, grad, case, "cpu")
        with torch._dynamo.config.patch(**settings):
            got = _run(layer, compiled, weights, x, router, grad, case, "cpu")
        assert all(torch.equal(a, b) for a, b in zip(got, want))
        made.append(len(graphs))
    limit = 1 if case.get("sync_free") or sizes_in_graph else 2
    assert made[0] <= limit and made[1] - made[0] <= (limit if case.get("bound") else 0), made
    assert made[-1] == made[1], made


def test_ops_compile_whole_with_dynamic_output_shapes():
    """The ops alone, under fullgraph with capture_dynamic_output_shape_ops (the permutation's
    size an unbacked symbol in the graph), forward and backward through the ops' registered
    backward, equal eager bit for bit."""
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(10, H, generator=g)
    probs = torch.rand(10, K, generator=g)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(10)])
    idx[2, 1] = -1

    def fn(x, probs):
        out, out_probs, plan, _ = fd.ops.permute_by_indices(x, idx, probs, num_experts=E, pad_multiple=2)
        return fd.ops.unpermute(torch.tanh(out) * out_probs[:, None], plan)

    compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)
    results = []
    for f in (fn, compiled):
        leaves = [x.clone().requires_grad_(), probs.clone().requires_grad_()]
        with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=True):
            out = f(*leaves)
        out.square().sum().backward()
        results.append([out.detach(), *(leaf.grad for leaf in leaves)])
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_compiled_bad_routing_raises_and_recovers():
    """An out-of-range expert id inside a compiled layer raises the same ValueError as eager;
    after reset() the next compiled step is right again."""
    torch._dynamo.reset()
    case = CASES["indices-pad-capacity"]
    weights = torch.randn(E, H, H, dtype=torch.float64) / H ** 0.5
    eager, compiled = _dispatcher(case), _dispatcher(case)
    compiled_layer = torch.compile(_layer, backend="aot_eager")
    x, (tp, ti), grad = _inputs(3, 10, case, "cpu")
    bad = ti.clone()
    bad[4, 1] = E + 3
    with pytest.raises(ValueError, match="token_indices"):
        compiled_layer(compiled, weights.float(), x, (tp.float(), bad), "indices")
    compiled.reset()
    want = _run(_layer, eager, weights, x, (tp, ti), grad, case, "cpu")
    got = _run(compiled_layer, compiled, weights, x, (tp, ti), grad, case, "cpu")
    assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_sync_free_layer_under_inductor():
    """The sync-free layer through Inductor (generated code around the ops) matches eager."""
    torch._dynamo.reset()
    case = CASES["sync-free-bound"]
    weights = torch.randn(E, H, H, dtype=torch.float64) / H ** 0.5
    eager, compiled = _dispatcher(case), _dispatcher(case)
    compiled_layer = torch.compile(_layer, fullgraph=True)
    for step, tokens in enumerate([12, 12]):
        x, router, grad = _inputs(50 + step, tokens, case, "cpu")
        want = _run(_layer, eager, weights, x, router, grad, case, "cpu")
        got = _run(compiled_layer, compiled, weights, x, router, grad, case, "cpu")
        for a, b in zip(got, want):
            assert rel_err(a, b) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("bound", [None, 64])
def test_sync_free_layer_under_reduce_overhead(bound):
    """torch.compile(mode="reduce-overhead"), the compiled layer in CUDA graphs, on a sync-free
    one-rank layer (worst-case sized, or bounded), forward and backward over several steps: no
    tensor a call makes outlives it in the CUDA-graph pool (the graphs' first runs check that)
    and the results are eager's. The bound's counter is made by an eager call first."""
    torch._dynamo.reset()
    case = dict(CASES["sync-free-bound"], bound=bound)
    weights = (torch.randn(E, H, H, generator=torch.Generator().manual_seed(3), dtype=torch.float64) / H ** 0.5).float()
    eager, compiled = _dispatcher(case), _dispatcher(case)
    if bound is not None:
        x, router, grad = _inputs(59, 12, case, "cuda")
        _run(_layer, compiled, weights, x, router, grad, case, "cuda")
        _run(_layer, eager, weights, x, router, grad, case, "cuda")
    layer = torch.compile(_layer, mode="reduce-overhead")
    for step in range(5):
        x, router, grad = _inputs(60 + step, 12, case, "cuda")
        want = _run(_layer, eager, weights, x, router, grad, case, "cuda")
        got = _run(layer, compiled, weights, x, router, grad, case, "cuda")
        for a, b in zip(got, want):
            assert rel_err(a, b) < 1e-5, f"step {step}"
    if bound is not None:
        assert compiled.report_dropped_tokens() == eager.report_dropped_tokens()


_ALL_CHECKS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
_NO_AOT = _ALL_CHECKS[:3]


def _opcheck_cases():
    """(name, op, arguments, checks) for torch.library.opcheck: each op on random CPU inputs,
    the differentiable ones with inputs that need a gradient, the permutations told their size
    (the form a graph holds). indices_to_multihot skips the AOT check, whose harness adds every
    output's sum into a tensor of the first output's dtype (bool: the map); the next test
    traces it instead."""
    from flexdispatch import _library

    ops = torch.ops.flexdispatch
    g = torch.Generator().manual_seed(11)
    rows, hidden, experts, topk = 12, 256, 6, 2
    idx = torch.stack([torch.randperm(experts, generator=g)[:topk] for _ in range(rows)])
    x = torch.randn(rows, hidden, generator=g).requires_grad_()
    probs = torch.rand(rows, topk, generator=g).requires_grad_()
    routing_map, multihot = _library.indices_to_multihot(idx, probs.detach(), experts)
    n = rows * topk
    _, _, row_map, layout, _ = _library.permute(x.detach(), None, idx, experts, 1, n, "indices")
    q, scales = _library.quantize_fp8(x.detach())
    permuted = torch.randn(n, hidden, generator=g).requires_grad_()
    return [
        ("check_route", ops.check_route.default, (idx, experts, 0, probs, None)),
        ("indices_to_multihot", ops.indices_to_multihot.default, (idx, probs, experts), _NO_AOT),
        ("plan", ops.plan.default, (idx, experts, 4, n + 3 * experts, "indices")),
        ("permute", ops.permute.default, (x, probs, idx, experts, 1, n + 5, "indices")),
        ("permute sized on the host", ops.permute.default, (x, probs, idx, experts, 2, -1, "indices"), _NO_AOT),
        ("permute by map", ops.permute.default, (x, multihot.requires_grad_(), routing_map, experts, 1, n, "map")),
        ("permute_fp8", ops.permute_fp8.default, (x, probs, idx, experts, 1, n, "indices", q, scales, torch.float32)),
        ("scatter_rows", ops.scatter_rows.default, (x, row_map, n, layout, experts, False, False)),
        ("gather_rows", ops.gather_rows.default, (permuted, row_map, probs, layout, experts, False, False)),
        ("gather_rows_backward", ops.gather_rows_backward.default,
         (torch.randn(rows, hidden, generator=g), permuted.detach(), row_map, probs.detach(), layout, experts, False,
          False)),
        ("gather_slots", ops.gather_slots.default, (torch.randn(n, generator=g), row_map)),
        ("quantize_fp8", ops.quantize_fp8.default, (x,)),
        ("dequantize_fp8", ops.dequantize_fp8.default, (q, scales, torch.bfloat16)),
        ("fp8_round_trip", ops.fp8_round_trip.default, (x,)),
    ]


def test_ops_pass_torch_library_opcheck():
    """Every kernel op passes torch.library.opcheck on CPU: its schema, its autograd
    registration (a backward where inputs need a gradient; autograd passes by the others, whose
    outputs then need none), its fake against the real outputs, and AOT autograd's dynamic-shape
    trace, backward included."""
    from flexdispatch import _library

    if not _library.load_kernels():
        pytest.skip("the compiled kernels are not built here")
    failed = {}
    for name, op, args, *checks in _opcheck_cases():
        try:
            torch.library.opcheck(op, args, test_utils=checks[0] if checks else _ALL_CHECKS)
        except Exception as exc:  # (collected, so that one run names every op that fails)
            failed[name] = str(exc).splitlines()[0]
    assert not failed, failed


def test_indices_to_multihot_backward_traced_with_dynamic_shapes():
    """indices_to_multihot's forward and backward through AOT autograd with dynamic shapes (the
    check opcheck's harness cannot make for it) equal eager and the dense formula."""
    from flexdispatch import _library

    if not _library.load_kernels():
        pytest.skip("the compiled kernels are not built here")
    idx = torch.tensor([[0, 3], [2, -1], [1, 0]])
    probs = torch.rand(3, 2, generator=torch.Generator().manual_seed(2)).requires_grad_()
    weights = torch.randn(3, 4, generator=torch.Generator().manual_seed(3))

    def f(idx, probs):
        return (torch.ops.flexdispatch.indices_to_multihot(idx, probs, 4)[1] * weights).sum()

    traced = torch.compile(f, backend="aot_eager", dynamic=True, fullgraph=True)
    grads = [torch.autograd.grad(fn(idx, probs), probs)[0] for fn in (f, traced)]
    assert torch.equal(grads[0], grads[1])
    assert torch.equal(grads[0], torch.where(idx >= 0, weights.gather(1, idx.clamp(min=0)), 0.0))
