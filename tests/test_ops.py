"""The fused ops against flexdispatch.reference, on random inputs of many shapes and dtypes."""

import contextlib
import os
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flexdispatch import _library, envs, ops, reference
from flexdispatch.rowmap import index_route_error_bits
from flexdispatch.spec import MAX_EXPERTS
from routing import random_indices, random_probs, random_tokens
from conftest import DEVICES

# (rows, hidden, experts, topk): empty, one row, odd hidden, experts not a power of two,
# top-1, top-k = E, a hidden size with a scalar tail, many experts.
SHAPES = [(0, 8, 4, 2), (1, 8, 4, 1), (37, 33, 7, 3), (256, 64, 16, 4), (513, 130, 5, 5),
          (1000, 8, 64, 8), (300, 16, 3, 1), (70, 4096, 12, 2), (260, 24, 300, 6)]
TOKEN_DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


def assert_plans_equal(a, b):
    assert torch.equal(a.map.cpu(), b.map.cpu())
    assert torch.equal(a.tokens_per_expert.cpu(), b.tokens_per_expert.cpu())
    assert a.num_out == b.num_out


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rows,hidden,experts,topk", SHAPES)
@pytest.mark.parametrize("pad", [None, 4])
def test_permute_by_indices_matches_reference(device, rows, hidden, experts, topk, pad, poison):
    idx = random_indices(rows, experts, topk, seed=rows + experts, device=device)
    x = random_tokens(rows, hidden, torch.bfloat16, device=device)
    p = random_probs(rows, topk, device=device)
    poison(device)
    out, out_p, plan, tpe = ops.permute_by_indices(x, idx, p, num_experts=experts, pad_multiple=pad)
    ref, ref_p, ref_plan, ref_tpe = reference.permute_by_indices(x, idx, p, num_experts=experts, pad_multiple=pad)
    assert torch.equal(out, ref)  # rows only move: bit-exact
    assert torch.equal(out_p, ref_p)
    assert_plans_equal(plan, ref_plan)
    assert int(tpe.sum()) == out.shape[0]
    back = ops.unpermute(out, plan)
    assert torch.equal(back, reference.unpermute(ref, ref_plan))  # fixed-order float32 sums


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", TOKEN_DTYPES)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_dtypes(device, dtype, index_dtype, poison):
    rows, hidden, experts, topk = 333, 72, 10, 3
    idx = random_indices(rows, experts, topk, seed=5, dtype=index_dtype, device=device)
    x = random_tokens(rows, hidden, dtype, device=device)
    for prob_dtype in (torch.float32, torch.float64):
        p = random_probs(rows, topk, prob_dtype, device=device)
        poison(device)
        out, out_p, plan, _ = ops.permute_by_indices(x, idx, p, num_experts=experts)
        ref, ref_p, ref_plan, _ = reference.permute_by_indices(x, idx, p, num_experts=experts)
        assert out.dtype == dtype and out_p.dtype == prob_dtype
        assert torch.equal(out, ref) and torch.equal(out_p, ref_p)
        weighted = ops.unpermute(out, plan, p)
        expected = reference.unpermute(ref, ref_plan, p)
        tol = {torch.float64: 1e-12, torch.float32: 1e-6}.get(dtype, 1e-2)
        torch.testing.assert_close(weighted.double(), expected.double(), rtol=tol, atol=tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("prob_dtype", [torch.float16, torch.bfloat16])
def test_narrow_float_probs_are_moved_and_merged_as_float32(device, prob_dtype, poison):
    """Probs of a float dtype the kernels do not take travel as float32, in the permutation and
    in unpermute's merge, as the reference does with the same probs made float32."""
    rows, hidden, experts, topk = 257, 64, 12, 3
    idx = random_indices(rows, experts, topk, seed=11, device=device)
    x = random_tokens(rows, hidden, torch.float32, device=device)
    p = random_probs(rows, topk, device=device).to(prob_dtype)
    poison(device)
    out, out_p, plan, _ = ops.permute_by_indices(x, idx, p, num_experts=experts)
    ref, ref_p, ref_plan, _ = reference.permute_by_indices(x, idx, p.float(), num_experts=experts)
    assert out_p.dtype == torch.float32
    assert torch.equal(out, ref) and torch.equal(out_p, ref_p)
    # (a weighted sum may round differently on the GPU, fused multiply-adds: as test_dtypes allows)
    torch.testing.assert_close(ops.unpermute(out, plan, p), reference.unpermute(ref, ref_plan, p.float()),
                               rtol=1e-6, atol=1e-6)
    routing_map, map_probs = reference.indices_to_multihot(idx, p.float(), experts)
    out_m, out_mp, _, _ = ops.permute(x, routing_map, map_probs.to(prob_dtype))
    assert out_mp.dtype == torch.float32 and torch.equal(out_m, ref) and torch.equal(out_mp, ref_p)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rows,hidden,experts,topk", [(0, 8, 4, 2), (129, 40, 9, 3), (777, 128, 32, 8)])
@pytest.mark.parametrize("prob_dtype", [torch.float32, torch.float64])
def test_multihot_and_permute_by_map(device, rows, hidden, experts, topk, prob_dtype, poison):
    idx = random_indices(rows, experts, topk, seed=7, device=device)
    p = random_probs(rows, topk, prob_dtype, device=device)
    routing_map, multihot = ops.indices_to_multihot(idx, p, experts)
    ref_map, ref_multihot = reference.indices_to_multihot(idx, p, experts)
    assert torch.equal(routing_map, ref_map) and torch.equal(multihot, ref_multihot)
    x = random_tokens(rows, hidden, torch.float16, device=device)
    poison(device)
    out, out_p, plan, _ = ops.permute(x, routing_map, multihot, pad_multiple=3)
    ref, ref_p, ref_plan, _ = reference.permute(x, ref_map, ref_multihot, pad_multiple=3)
    assert torch.equal(out, ref) and torch.equal(out_p, ref_p)
    assert_plans_equal(plan, ref_plan)
    # The map form and the index form give the same rows in the same order.
    by_idx = ops.permute_by_indices(x, idx, p, num_experts=experts, pad_multiple=3)[0]
    assert torch.equal(out, by_idx)


# (rows, hidden, experts, topk): small routes and large ones (more than 16384 entries), 32-row
# chunks (E > 1536), rows of more than 32 destinations, 512 experts, and the expert counts whose
# masks fill 48 KiB of shared memory (1536 with 256-row chunks, the most experts with 32-row
# chunks), and rows of 5 and 14 KB (a block per 128 vectors of a row, the last block of a row
# part-used; in map form, more than 16 slots a row, whose destinations the block compacts first)
# with a multihot map of 256 experts over a row count not a multiple of 32.
SIZED_SHAPES = [(1000, 64, 8, 4), (3000, 40, 64, 8), (90, 16, 2000, 3), (300, 32, 64, 40), (700, 24, 512, 8),
                (300, 16, 1536, 4), (40, 8, MAX_EXPERTS, 2), (300, 2600, 64, 8), (200, 7000, 256, 8)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rows,hidden,experts,topk", SIZED_SHAPES)
@pytest.mark.parametrize("form", ["int32", "int64", "map"])
@pytest.mark.parametrize("pad", [None, 4])
def test_sized_permutation_matches_reference(device, rows, hidden, experts, topk, form, pad, poison):
    """A permutation told its output size (the managers' call) plans without a sync: the same
    rows, probs and plan as the reference, spare rows zero, for indices and the multihot map."""
    idx = random_indices(rows, experts, topk, seed=rows + topk, dtype=torch.int32 if form == "int32" else torch.int64,
                         device=device)
    x = random_tokens(rows, hidden, torch.bfloat16, device=device)
    p = random_probs(rows, topk, device=device)
    ref_map, ref_multihot = reference.indices_to_multihot(idx, p, experts)
    route, probs = (ref_map, ref_multihot) if form == "map" else (idx, p)
    permute = ops.permute if form == "map" else lambda *a, **k: ops.permute_by_indices(*a, num_experts=experts, **k)
    reference_permute = (reference.permute if form == "map"
                         else lambda *a, **k: reference.permute_by_indices(*a, num_experts=experts, **k))
    used = reference_permute(x, route, probs, pad_multiple=pad)[0].shape[0]
    poison(device)
    out, out_p, plan, tpe = permute(x, route, probs, num_out_tokens=used + 9, pad_multiple=pad)
    ref, ref_p, ref_plan, ref_tpe = reference_permute(x, route, probs, num_out_tokens=used + 9, pad_multiple=pad)
    assert torch.equal(out, ref) and torch.equal(out_p, ref_p)
    assert torch.count_nonzero(out[used:]) == 0 and torch.count_nonzero(out_p[used:]) == 0
    assert_plans_equal(plan, ref_plan)
    assert torch.equal(tpe.cpu(), ref_tpe.cpu())
    assert torch.equal(ops.unpermute(out, plan, probs), reference.unpermute(ref, ref_plan, probs))
    alone = ops.make_plan(route, experts, num_out_tokens=used + 9, pad_multiple=pad)  # the plan without rows
    assert_plans_equal(alone, ref_plan)
    assert torch.equal(ops.apply_permutation(x, alone), ref)


def _device_ops(fn) -> list:
    """The names of the device operations (kernels, copies, fills) one call of ``fn`` queues,
    after a warm-up call."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]


def _captured(fn):
    """``(graph, fn's outputs)``: ``fn`` captured into a CUDA graph, after a warm-up call off the
    capturing stream (as torch.cuda.graph asks)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = fn()
    return graph, outputs


def _permuted_by(lib, route: str, rows, idx, topk_probs, routing_map, map_probs, experts: int, scales=None,
                 **sizes):
    """The permutation of ``rows`` by ``lib`` (:mod:`flexdispatch.ops`, or its twin
    :mod:`flexdispatch.reference` of the same signatures) along a route of kind ``route``: "map"
    (``routing_map`` and ``map_probs``), "indices" (``idx`` and ``topk_probs``) or "fp8" (the
    same, ``rows`` FP8 with their ``scales``); ``sizes``: num_out_tokens, pad_multiple."""
    if route == "map":
        return lib.permute(rows, routing_map, map_probs, **sizes)
    if route == "indices":
        return lib.permute_by_indices(rows, idx, topk_probs, num_experts=experts, **sizes)
    return lib.permute_fp8_by_indices(rows, scales, idx, topk_probs, num_experts=experts, **sizes)


def _one_launch_fits(rows: int, experts: int, slots: int, multihot: bool, captured: bool = False) -> bool:
    """Whether a route of small rows is permuted in one launch (the limits of
    cuda_src/route_small.cu): at most 1024 experts and 64 slots of a top-k route, blocks of 8 or
    16 rows whose shared memory stays within 46 KiB; the grid launch where the fewer rows' blocks
    are at most one a multiprocessor and experts x blocks at most 2^16 (``captured`` into a CUDA
    graph, 2^15); else whole-route counts: 8192 entries of a
    top-k route or 2^18 of a multihot map (whose slots are its experts), blocks of 8 or 16 rows
    (the fewest for which the entries times the blocks stay within 2^20, 2^23 for a map, or for a
    map 2^25 where 2^23 finds none); ``captured`` into a CUDA graph, only where those blocks read
    at most half of 2^20 (2^23 for a map)."""
    entries = rows * slots
    if rows == 0 or experts > 1024 or (not multihot and slots > 64):
        return False
    words = -(-slots // 4)

    def shared_fits(block_rows: int) -> bool:
        partial = 1024 // words * 4 * words if multihot else 0  # (a map's partial counts share the dests' room)
        return 8 * (32 + experts + 1) + 4 * (3 * experts + 16 + max(block_rows * slots, partial)) <= 46 * 1024

    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    grid_rows = next((block_rows for block_rows in (8, 16) if -(-rows // block_rows) <= sms), 0)
    if grid_rows and shared_fits(grid_rows) and experts * -(-rows // grid_rows) <= (1 << 15 if captured else 1 << 16):
        return True
    if entries > (1 << 18 if multihot else 8192):
        return False

    def reads(block_rows: int) -> int:  # (every block reads the whole route)
        return entries * -(-rows // block_rows)

    def block_rows_within(limit: int) -> int:
        for block_rows in (8, 16):
            if reads(block_rows) > limit:
                continue
            return block_rows if shared_fits(block_rows) else 0
        return 0

    limit = 1 << 23 if multihot else 1 << 20
    block_rows = block_rows_within(limit) or (block_rows_within(1 << 25) if multihot else 0)
    return block_rows != 0 and (not captured or reads(block_rows) <= limit // 2)


# (rows, experts, topk) at the one-launch permutation's limits (_one_launch_fits: the grid launch's
# blocks of 8 and 16 rows, one a multiprocessor (1056 and 2112 rows on 132 of them); past it 8192
# entries and the reads of blocks of 8 and 16 rows; 1024 experts, 64 slots) and just past them.
ONE_LAUNCH_EDGES = [(1024, 32, 8), (1025, 32, 8), (64, 1024, 8), (64, 1025, 8), (100, 128, 64), (100, 128, 65),
                    (1, 4, 2), (9, 5, 3), (2048, 4, 4), (2049, 4, 4), (4096, 4, 2), (1056, 16, 8), (1057, 16, 8),
                    (2112, 8, 4), (2113, 8, 4)]


@pytest.mark.gpu
@pytest.mark.parametrize("rows,experts,topk", ONE_LAUNCH_EDGES)
@pytest.mark.parametrize("fault", ["none", "range", "duplicate", "far duplicate", "overflow"])
@pytest.mark.parametrize("pad", [None, 3])
def test_one_launch_permutation_is_the_planned_one(rows, experts, topk, fault, pad, poison):
    """A small route whose output size is known is permuted in one launch on CUDA, a larger one by
    the plan's passes and the scatter: on both sides of the limits the rows, probs, plan, zero
    tail and pad rows are the reference's, and a bad route or a too small output raises the
    error the host-sized permutation (always the passes) raises."""
    idx = random_indices(rows, experts, topk, seed=rows + experts + topk).to("cuda")
    if fault == "range":
        idx[rows // 2, topk - 1] = experts
    elif fault == "duplicate" and topk > 1:
        idx[rows - 1, :2] = experts - 1
    elif fault == "far duplicate" and topk > 1:  # (a row's first and last slots: K - 1 slots apart)
        idx[rows // 3, 0] = idx[rows // 3, topk - 1] = experts // 2
    x = random_tokens(rows, 72, torch.bfloat16, device="cuda")
    p = random_probs(rows, topk, device="cuda")
    if fault in ("range", "duplicate", "far duplicate"):
        with pytest.raises(ValueError) as sized_on_host:
            ops.permute_by_indices(x, idx, p, num_experts=experts, pad_multiple=pad)
        with pytest.raises(ValueError) as known_size:
            ops.permute_by_indices(x, idx, p, num_experts=experts, num_out_tokens=rows * topk + 5, pad_multiple=pad)
            ops.check_pending_errors()
        assert str(known_size.value) == str(sized_on_host.value)
        return
    ref, ref_p, ref_plan, ref_tpe = reference.permute_by_indices(x, idx, p, num_experts=experts, pad_multiple=pad)
    used = ref.shape[0]
    launched = _device_ops(lambda: ops.permute_by_indices(x, idx, p, num_experts=experts, num_out_tokens=used + 7,
                                                          pad_multiple=pad))
    assert (len(launched) == 1) == _one_launch_fits(rows, experts, topk, multihot=False), launched
    if fault == "overflow":
        with pytest.raises(ValueError, match="num_out_tokens"):
            ops.permute_by_indices(x, idx, p, num_experts=experts, num_out_tokens=used - 1, pad_multiple=pad)
            ops.check_pending_errors()
        return
    poison("cuda")
    out, out_p, plan, tpe = ops.permute_by_indices(x, idx, p, num_experts=experts, num_out_tokens=used + 7,
                                                   pad_multiple=pad)
    assert torch.equal(out[:used], ref) and torch.equal(out_p[:used], ref_p)
    assert torch.count_nonzero(out[used:]) == 0 and torch.count_nonzero(out_p[used:]) == 0
    assert torch.equal(plan.map.cpu(), ref_plan.map.cpu()) and torch.equal(tpe.cpu(), ref_tpe.cpu())
    # (fixed-order sums: the same bits; weighted by the probs, the kernel's fused multiply-adds
    # round once where the reference's multiply and add round twice: within bf16's rounding)
    assert torch.equal(ops.unpermute(out, plan), reference.unpermute(ref, ref_plan))
    torch.testing.assert_close(ops.unpermute(out, plan, p), reference.unpermute(ref, ref_plan, p), rtol=8e-3, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("rows,experts,topk", [(1024, 32, 4), (4096, 64, 8)])  # (one launch; the passes)
@pytest.mark.parametrize("fault", ["none", "range", "duplicate", "overflow"])
def test_a_sized_permutation_that_copies_its_layout_reads_counts_and_errors_on_the_host(rows, experts, topk, fault,
                                                                                       poison):
    """``copy_layout`` (what a one-rank manager asks of a full route's permutation, sized by its
    shape): the call returns with its plan's layout on the host, copied before the rows moved,
    and raises a bad route or a too small output itself, as the host-sized call does, deferring
    no error word; its rows, probs and plan are the reference's."""
    idx = random_indices(rows, experts, topk, seed=rows + topk).to("cuda")
    if fault == "range":
        idx[rows // 2, 0] = experts
    elif fault == "duplicate":
        idx[rows - 1, :2] = 1
    x = random_tokens(rows, 128, torch.bfloat16, device="cuda")
    p = random_probs(rows, topk, device="cuda")
    ops.check_pending_errors()
    used = int((idx >= 0).sum()) if fault in ("none", "overflow") else rows * topk  # (random routes leave slots unused)
    size = used - (1 if fault == "overflow" else 0)
    if fault != "none":
        with pytest.raises(ValueError) as sized_on_host:
            ops.permute_by_indices(x, idx, p, num_experts=experts)
            if fault == "overflow":
                ops.permute_by_indices(x, idx, p, num_experts=experts, num_out_tokens=size)
                ops.check_pending_errors()
        with pytest.raises(ValueError) as copied:
            ops.permute_by_indices_trusted(x, idx, p, experts, size, None, copy_layout=True)
        assert str(copied.value) == str(sized_on_host.value)
        assert not _library._pending
        return
    ref, ref_p, ref_plan, ref_tpe = reference.permute_by_indices(x, idx, p, num_experts=experts)
    poison("cuda")
    out, out_p, plan = ops.permute_by_indices_trusted(x, idx, p, experts, size, None, copy_layout=True)
    assert not _library._pending
    assert plan.host_layout is not None and plan.host_layout.device.type == "cpu"
    assert torch.equal(plan.host_layout, plan.layout.cpu())
    assert torch.equal(plan.host_tokens_per_expert(), ref_tpe.cpu())
    assert torch.equal(out, ref) and torch.equal(out_p, ref_p) and torch.equal(plan.map.cpu(), ref_plan.map.cpu())


# (rows, experts, topk) of multihot maps at the one-launch limits (_one_launch_fits) and just past
# them: the reads of blocks of 8 rows (1024 x 64, 2896 x 8) and of 16 (1025 x 64, 1024 x 128,
# 2048 x 32), 2^18 entries (512 x 512), the shared memory (64 x 899), maps read byte by byte
# (widths not a multiple of 4); queued eagerly, the larger reads (2896 x 64) and 2^18 entries
# under them (1024 x 256, 2048 x 128).
ONE_LAUNCH_MULTIHOT_EDGES = [(1024, 64, 8), (1025, 64, 8), (2896, 8, 4), (2897, 8, 4), (1024, 128, 8),
                             (1025, 128, 8), (2048, 32, 4), (2049, 32, 4), (512, 512, 8), (513, 512, 8),
                             (64, 899, 8), (64, 900, 8), (100, 65, 8), (1, 4, 2), (9, 5, 3), (1024, 256, 8),
                             (1025, 256, 8), (2048, 128, 8), (2049, 128, 8), (2896, 64, 8), (2897, 64, 8)]


@pytest.mark.gpu
@pytest.mark.parametrize("rows,experts,topk", ONE_LAUNCH_MULTIHOT_EDGES)
@pytest.mark.parametrize("prob_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("pad", [None, 3])
def test_one_launch_multihot_permutation_is_the_planned_one(rows, experts, topk, prob_dtype, pad, poison):
    """A small multihot map (its slots are its experts) whose output size is known is permuted in
    one launch, a larger one by the passes: on both sides of the limits the rows, probs, plan,
    zero tail and pad rows are the reference's, the index route's rows are the same, and a too
    small output raises."""
    idx = random_indices(rows, experts, topk, seed=rows + experts).to("cuda")
    routing_map, probs = reference.indices_to_multihot(idx, random_probs(rows, topk, prob_dtype, device="cuda"),
                                                       experts)
    x = random_tokens(rows, 72, torch.bfloat16, device="cuda")
    ref, ref_p, ref_plan, ref_tpe = reference.permute(x, routing_map, probs, pad_multiple=pad)
    used = ref.shape[0]
    fits = _one_launch_fits(rows, experts, experts, multihot=True)
    dense = [t.contiguous() for t in (routing_map, probs)]  # (no copy kernel before the permutation)
    launched = _device_ops(lambda: ops.permute(x, *dense, num_out_tokens=used + 7, pad_multiple=pad))
    assert (len(launched) == 1) == fits, launched
    with pytest.raises(ValueError, match="num_out_tokens"):
        ops.permute(x, routing_map, probs, num_out_tokens=used - 1, pad_multiple=pad)
        ops.check_pending_errors()
    poison("cuda")
    out, out_p, plan, tpe = ops.permute(x, routing_map, probs, num_out_tokens=used + 7, pad_multiple=pad)
    assert torch.equal(out[:used], ref) and torch.equal(out_p[:used], ref_p)
    assert torch.count_nonzero(out[used:]) == 0 and torch.count_nonzero(out_p[used:]) == 0
    assert torch.equal(plan.map.cpu(), ref_plan.map.cpu()) and torch.equal(tpe.cpu(), ref_tpe.cpu())
    by_index = ops.permute_by_indices(x, idx, num_experts=experts, num_out_tokens=used + 7, pad_multiple=pad)[0]
    assert torch.equal(out, by_index)
    assert torch.equal(ops.unpermute(out, plan), reference.unpermute(ref, ref_plan))


@pytest.mark.gpu
@pytest.mark.parametrize("route,experts,topk,rows", [("map", 16, 4, None), ("map", 32, 4, None),
                                                     ("indices", 32, 3, None), ("fp8", 32, 3, None),
                                                     ("map", 512, 8, 1024), ("indices", 512, 8, 1024)])
def test_a_route_past_the_captured_limit_is_one_launch_eagerly_and_the_passes_in_a_graph(route, experts, topk, rows,
                                                                                       poison):
    """A route whose one launch costs the device more than the passes, which only a CUDA graph
    makes worth their launches, is permuted in one launch when queued eagerly and by the passes
    when captured: one too long for the grid launch (None rows: more than 16 a multiprocessor)
    whose whole-route counts read more than half their limit (a multihot map, top-k indices,
    also of FP8 rows), and one whose grid launch sums a count table of more than 2^15 words (512
    experts in blocks of 8 of 1024 rows). The reference's rows, probs, plan and zero tail both
    ways."""
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    rows, multihot = rows or 16 * sms + 88, route == "map"
    slots = experts if multihot else topk
    assert _one_launch_fits(rows, experts, slots, multihot=multihot)
    assert not _one_launch_fits(rows, experts, slots, multihot=multihot, captured=True)
    idx = random_indices(rows, experts, topk, seed=experts).to("cuda")
    topk_probs = random_probs(rows, topk, device="cuda")
    routing_map, probs = (t.contiguous() for t in reference.indices_to_multihot(idx, topk_probs, experts))
    x = random_tokens(rows, 128 if route == "fp8" else 64, torch.bfloat16, device="cuda")
    x, scales = ops.quantize_fp8(x) if route == "fp8" else (x, None)

    def by(lib, **sizes):
        return _permuted_by(lib, route, x, idx, topk_probs, routing_map, probs, experts, scales, **sizes)

    ref, ref_p, ref_plan, ref_tpe = by(reference)
    used = ref.shape[0]

    def permute():
        return by(ops, num_out_tokens=used + 5)

    assert len(_device_ops(permute)) == 1
    graph, captured = _captured(permute)
    eager = permute()
    poison("cuda")
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        graph.replay()
        torch.cuda.synchronize()
    replayed = " ".join(e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    # (the passes: count, map, scatter, and for rows this narrow a launch that zeroes the tail)
    kind = "_multihot" if multihot else "_kernel"
    assert f"route_count{kind}" in replayed and f"route_map{kind}" in replayed, replayed
    assert "permute_small" not in replayed, replayed
    for out, out_p, plan, tpe in (captured, eager):
        assert torch.equal(out[:used], ref) and torch.equal(out_p[:used], ref_p)
        assert torch.count_nonzero(out[used:]) == 0 and torch.count_nonzero(out_p[used:]) == 0
        assert torch.equal(plan.map.cpu(), ref_plan.map.cpu()) and torch.equal(tpe.cpu(), ref_tpe.cpu())
    ops.check_pending_errors()


@pytest.mark.gpu
@pytest.mark.parametrize("route,experts", [("map", 256), ("indices", 32), ("fp8", 128)])
@pytest.mark.parametrize("pad", [None, 3])
def test_a_grid_launch_replays_the_reference_for_every_route_copied_in(route, experts, pad, poison):
    """A 1024 x 1024, K = 8 route (its blocks one a multiprocessor or fewer) is permuted by the
    grid launch, captured into a CUDA graph as one kernel too; replayed after new routes, probs
    and rows are copied into the graph's inputs, each replay gives the reference's rows, probs,
    plan, pad rows and zero tail for what was copied in, and a bad route copied in raises."""
    rows, topk, multihot = 1024, 8, route == "map"
    hidden = 128 if route == "fp8" else 64
    num_out = rows * topk + 11

    def inputs(seed: int):
        idx = random_indices(rows, experts, topk, seed=seed).to("cuda")
        topk_probs = random_probs(rows, topk, seed=seed + 1, device="cuda")
        routing_map, probs = (t.contiguous() for t in reference.indices_to_multihot(idx, topk_probs, experts))
        x = random_tokens(rows, hidden, torch.bfloat16, seed=seed + 2, device="cuda")
        q, scales = ops.quantize_fp8(x) if route == "fp8" else (x, None)
        return [idx, topk_probs, routing_map, probs, q] + ([] if scales is None else [scales])

    static = inputs(0)

    def by(lib, args):  # (args: inputs()'s list)
        idx, topk_probs, routing_map, probs, rows_in = args[:5]
        return _permuted_by(lib, route, rows_in, idx, topk_probs, routing_map, probs, experts, *args[5:],
                            num_out_tokens=num_out, pad_multiple=pad)

    slots = experts if multihot else topk
    assert _one_launch_fits(rows, experts, slots, multihot=multihot, captured=True)
    assert len(_device_ops(lambda: by(ops, static))) == 1
    graph, (out, out_p, plan, tpe) = _captured(lambda: by(ops, static))
    for seed in (10, 20, 30):
        fresh = inputs(seed)
        for dst, src in zip(static, fresh):
            dst.copy_(src)
        poison("cuda")
        graph.replay()
        ref, ref_p, ref_plan, ref_tpe = by(reference, fresh)
        assert torch.equal(out, ref) and torch.equal(out_p, ref_p)
        assert torch.equal(plan.map.cpu(), ref_plan.map.cpu()) and torch.equal(tpe.cpu(), ref_tpe.cpu())
        assert torch.equal(plan.layout.cpu(), ref_plan.layout.cpu())
    if route == "map":
        return
    static[0][rows // 2, 1] = experts  # (out of range: the replayed kernel flags it in the layout's error word)
    graph.replay()
    with pytest.raises(ValueError, match="invalid routing"):
        plan.check(static[0])


@pytest.mark.gpu
@pytest.mark.parametrize("route,experts", [("indices", 32), ("map", 128), ("fp8", 32)])
@pytest.mark.parametrize("pad", [None, 3])
def test_a_grid_route_in_a_green_context_of_few_multiprocessors_is_permuted_as_the_reference(route, experts, pad,
                                                                                          poison, green_context):
    """The grid launch's fit counts the device's multiprocessors; a green context of 16 of them
    cannot hold its 128 blocks at once, so the driver refuses the cooperative launch there. The
    permutation then counts the whole route in every block: the reference's rows, probs, plan
    and zero tail, inside the context and after it, and the restore on top."""
    rows, topk, multihot = 1024, 8, route == "map"
    hidden = 128 if route == "fp8" else 64
    idx = random_indices(rows, experts, topk, seed=7).to("cuda")
    topk_probs = random_probs(rows, topk, seed=8, device="cuda")
    routing_map, map_probs = (t.contiguous() for t in reference.indices_to_multihot(idx, topk_probs, experts))
    x = random_tokens(rows, hidden, torch.bfloat16, seed=9, device="cuda")
    rows_in, scales = ops.quantize_fp8(x) if route == "fp8" else (x, None)
    assert _one_launch_fits(rows, experts, experts if multihot else topk, multihot=multihot)

    def by(lib):
        return _permuted_by(lib, route, rows_in, idx, topk_probs, routing_map, map_probs, experts, scales,
                            num_out_tokens=rows * topk + 5, pad_multiple=pad)

    ref, ref_p, ref_plan, ref_tpe = by(reference)
    with green_context(16):
        poison("cuda")
        out, out_p, plan, tpe = by(ops)
        restored = ops.unpermute(out, plan)
    again = by(ops)
    for got in ((out, out_p, plan, tpe), again):
        assert torch.equal(got[0], ref) and torch.equal(got[1], ref_p)
        assert torch.equal(got[2].map.cpu(), ref_plan.map.cpu()) and torch.equal(got[3].cpu(), ref_tpe.cpu())
    assert torch.equal(restored, reference.unpermute(ref, ref_plan))


def _replay_in_a_green_context() -> None:
    """The program of :func:`test_a_grid_route_captured_in_a_green_context_replays_as_the_reference`,
    run in a child process: a line a replay (``ROUTE SEED equal``, then ``layer equal``), or exit
    status 3 where no green context can be made."""
    import sys

    from conftest import new_green_context
    from dist_scenarios import cuda_graph_fwd_bwd

    context, why = new_green_context(16)
    if context is None:
        print(why)
        sys.exit(3)
    rows, experts, topk, hidden = 1024, 32, 8, 256
    num_out = rows * topk + 5

    def inputs(seed: int):
        idx = random_indices(rows, experts, topk, drop=0.0, seed=seed, device="cuda")
        topk_probs = random_probs(rows, topk, seed=seed + 1, device="cuda")
        routing_map, map_probs = (t.contiguous() for t in reference.indices_to_multihot(idx, topk_probs, experts))
        x = random_tokens(rows, hidden, torch.bfloat16, seed=seed + 2, device="cuda")
        return [x, idx, topk_probs, routing_map, map_probs]

    context.set_context()
    try:
        for route in ("indices", "map"):
            def by(lib, args):
                return _permuted_by(lib, route, *args, experts, num_out_tokens=num_out)

            static = inputs(0)
            graph, (out, out_p, plan, tpe) = _captured(lambda: by(ops, static))
            for seed in (1, 2, 3):
                fresh = inputs(10 * seed)
                for held, new in zip(static, fresh):
                    held.copy_(new)
                graph.replay()
                torch.cuda.current_stream().synchronize()
                ref, ref_p, ref_plan, ref_tpe = by(reference, fresh)
                same = (torch.equal(out, ref) and torch.equal(out_p, ref_p) and torch.equal(plan.map, ref_plan.map)
                        and torch.equal(tpe, ref_tpe))
                print(route, seed, "equal" if same else "DIFFERENT", flush=True)
        # The one-rank sync-free layer, forward and backward captured in one graph and replayed on
        # new inputs, against its eager calls: its permutation is a grid route.
        result = cuda_graph_fwd_bwd(0, 1, tokens=1024, hidden=256, topk=4)
        print("layer", "equal" if all(all(step.values()) for step in result["same"]) else result, flush=True)
    finally:
        context.pop_context()


@pytest.mark.gpu
def test_a_grid_route_captured_in_a_green_context_replays_as_the_reference():
    """A CUDA graph captured in a green context of 16 SMs keeps the launch the fit chose: were it
    the grid of 128 blocks (the device's 132 SMs counted), its replay would wait at the grid's
    barrier for blocks that never become resident, and never end. The fit counts the context's
    SMs, so the graph holds whole-route counts, and every replay of a new route (by indices and
    by a multihot map) equals the reference; so does the one-rank sync-free layer's forward and
    backward, captured and replayed three times on new inputs, its eager calls. Run in its own
    process (:func:`_replay_in_a_green_context`), whose end frees a hung GPU."""
    import subprocess
    import sys

    tests = str(Path(__file__).parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")])))
    try:
        out = subprocess.run([sys.executable, "-c", "import test_ops; test_ops._replay_in_a_green_context()"],
                             capture_output=True, text=True, timeout=180, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail("a replay of the graph captured in the green context did not end within 180 s: a grid "
                    "waiting at its barrier for blocks the context cannot hold")
    if out.returncode == 3:
        pytest.skip(out.stdout.strip())
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.split("\n")
    assert [line for line in lines if line.endswith("equal")] == [
        f"{route} {seed} equal" for route in ("indices", "map") for seed in (1, 2, 3)] + ["layer equal"], out.stdout


@pytest.mark.gpu
@pytest.mark.parametrize("experts", [32, 30])
def test_one_launch_multihot_permutation_reads_a_map_at_any_byte_offset(experts, poison):
    """The one-launch permutation reads a multihot map's rows as 4-byte words where its width and
    address allow, byte by byte otherwise: a map that starts one byte into its storage (a
    contiguous view) permutes as the same map aligned does, and as the reference."""
    rows, topk = 1000, 4
    idx = random_indices(rows, experts, topk, seed=experts).to("cuda")
    aligned, probs = (t.contiguous() for t in reference.indices_to_multihot(
        idx, random_probs(rows, topk, device="cuda"), experts))
    storage = torch.zeros(rows * experts + 1, dtype=torch.bool, device="cuda")
    shifted = storage[1:].view(rows, experts)
    shifted.copy_(aligned)
    assert shifted.is_contiguous() and shifted.data_ptr() % 4 == 1
    x = random_tokens(rows, 256, torch.bfloat16, device="cuda")
    ref = reference.permute(x, aligned, probs)
    used = ref[0].shape[0]
    poison("cuda")
    for routing_map in (aligned, shifted):
        out, out_p, plan, tpe = ops.permute(x, routing_map, probs, num_out_tokens=used + 3)
        assert torch.equal(out[:used], ref[0]) and torch.equal(out_p[:used], ref[1])
        assert torch.count_nonzero(out[used:]) == 0
        assert torch.equal(plan.map.cpu(), ref[2].map.cpu()) and torch.equal(tpe.cpu(), ref[3].cpu())


@pytest.mark.gpu
@pytest.mark.parametrize("form", ["indices", "map", "fp8"])
def test_a_sized_permutation_past_one_launch_stores_its_error_word_from_the_scatter(form, poison):
    """Past the one-launch limits a permutation whose size is known runs three kernels: the count
    pass, the map (which scans the counts itself at this size) and the scatter, whose last blocks
    zero the tail and store the error word to its pinned slot. No fourth launch copies the word,
    and the word still reports: a clean call raises nothing at the next check, a too small
    output raises there."""
    rows, experts, topk, hidden = 4096, 32, 8, 1024  # (32768 entries; 2 KiB rows: the segment scatter)
    idx = random_indices(rows, experts, topk, seed=17, device="cuda")
    p = random_probs(rows, topk, device="cuda")
    x = random_tokens(rows, hidden, torch.bfloat16, device="cuda")
    ref, ref_p = reference.permute_by_indices(x, idx, p, num_experts=experts)[:2]
    used = ref.shape[0]
    q, scales = ops.quantize_fp8(x)
    routing_map, map_probs = (t.contiguous() for t in reference.indices_to_multihot(idx, p, experts))

    def permute(num_out):
        if form == "indices":
            return ops.permute_by_indices(x, idx, p, num_experts=experts, num_out_tokens=num_out)
        if form == "map":
            return ops.permute(x, routing_map, map_probs, num_out_tokens=num_out)
        return ops.permute_fp8_by_indices(q, scales, idx, p, num_experts=experts, num_out_tokens=num_out,
                                          dtype=torch.bfloat16)

    launched = _device_ops(lambda: permute(used + 5))
    assert len(launched) == 3, launched
    ops.check_pending_errors()
    poison("cuda")
    out, out_p = permute(used + 5)[:2]
    want = reference.permute_fp8_by_indices(q, scales, idx, p, experts, None, None, torch.bfloat16)[0] \
        if form == "fp8" else ref
    assert torch.equal(out[:used], want) and torch.equal(out_p[:used], ref_p)
    assert torch.count_nonzero(out[used:]) == 0 and torch.count_nonzero(out_p[used:]) == 0
    ops.check_pending_errors()
    with pytest.raises(ValueError, match="num_out_tokens"):
        permute(used - 1)
        ops.check_pending_errors()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rows,experts,topk", [(0, 4, 2), (300, 9, 3), (5000, 64, 8)])
def test_gather_slots_reads_each_slots_output_row(device, dtype, rows, experts, topk):
    """The permuted probs' gradient to the route's probs: each slot reads its output row's value,
    an unused slot 0."""
    idx = random_indices(rows, experts, topk, seed=5, device=device)
    _, _, plan, _ = ops.permute_by_indices(random_tokens(rows, 8, torch.float32, device=device), idx,
                                           num_experts=experts)
    values = random_probs(1, plan.num_out, dtype, device=device).flatten() - 0.5
    want = torch.where(plan.map >= 0, values[plan.map.clamp(min=0).long()] if plan.num_out else 0, 0).to(dtype)
    assert torch.equal(_library.gather_slots(values, plan.map), want)


@pytest.mark.parametrize("device", DEVICES)
def test_num_out_tokens_tail_is_zero_and_overflow_raises(device, poison):
    rows, experts, topk = 200, 6, 2
    idx = random_indices(rows, experts, topk, seed=3, device=device)
    x = random_tokens(rows, 16, torch.float32, device=device)
    p = random_probs(rows, topk, device=device)
    exact = ops.permute_by_indices(x, idx, p, num_experts=experts)[0].shape[0]
    poison(device)
    out, out_p, plan, tpe = ops.permute_by_indices(x, idx, p, num_experts=experts, num_out_tokens=exact + 50)
    assert out.shape[0] == exact + 50
    assert torch.count_nonzero(out[exact:]) == 0 and torch.count_nonzero(out_p[exact:]) == 0
    assert int(tpe.sum()) == exact
    with pytest.raises(ValueError, match="num_out_tokens"):
        ops.permute_by_indices(x, idx, p, num_experts=experts, num_out_tokens=exact - 1)
        ops.check_pending_errors()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("form", ["indices", "map", "fp8"])
def test_padding_that_does_not_fit_raises(device, form, poison):
    """An output that holds the real rows but not their padding is an overflow (ValueError, as
    the reference), and its pad rows past the end are not written: the pad zeroing once wrote
    them past the buffer (a CPU heap corruption that aborted the process)."""
    tiny = (torch.tensor([[0], [1]], device=device), 2, 4, 5)  # expert 1's pad rows 5..7 lie past 5 rows
    rows, experts, topk, pad = 301, 7, 3, 8
    spread = (random_indices(rows, experts, topk, seed=13, device=device), experts, pad, None)
    for idx, experts, pad, num_out in (tiny, spread):
        x = random_tokens(idx.shape[0], 128, torch.float32, device=device)
        p = random_probs(idx.shape[0], idx.shape[1], device=device)
        real = int((idx >= 0).sum())
        padded = reference.permute_by_indices(x, idx, p, num_experts=experts, pad_multiple=pad)[0].shape[0]
        num_out = padded - 1 if num_out is None else num_out
        assert real <= num_out < padded
        with pytest.raises(ValueError, match="num_out_tokens"):
            reference.permute_by_indices(x, idx, p, num_experts=experts, num_out_tokens=num_out, pad_multiple=pad)
        poison(device)
        with pytest.raises(ValueError, match="num_out_tokens"):
            if form == "indices":
                ops.permute_by_indices(x, idx, p, num_experts=experts, num_out_tokens=num_out, pad_multiple=pad)
            elif form == "map":
                route, probs = reference.indices_to_multihot(idx, p, experts)
                ops.permute(x, route, probs, num_out_tokens=num_out, pad_multiple=pad)
            else:
                q, scales = ops.quantize_fp8(x)
                ops.permute_fp8_by_indices(q, scales, idx, p, num_experts=experts, num_out_tokens=num_out,
                                           pad_multiple=pad, dtype=torch.float32)
            ops.check_pending_errors()


@pytest.mark.parametrize("device", DEVICES)
def test_padding_rows_are_zero_with_zero_prob(device, poison):
    rows, experts, topk, pad = 301, 7, 3, 8
    idx = random_indices(rows, experts, topk, seed=11, device=device)
    x = random_tokens(rows, 24, torch.bfloat16, device=device) + 1  # no zero rows among real ones
    p = random_probs(rows, topk, device=device) + 0.5
    poison(device)
    out, out_p, plan, tpe = ops.permute_by_indices(x, idx, p, num_experts=experts, pad_multiple=pad)
    counts = torch.bincount(idx[idx >= 0].cpu(), minlength=experts)
    assert torch.equal(tpe.cpu(), (counts + pad - 1) // pad * pad)
    start = 0
    for e in range(experts):
        real, total = int(counts[e]), int(tpe[e])
        assert torch.count_nonzero(out[start + real:start + total]) == 0
        assert torch.count_nonzero(out_p[start + real:start + total]) == 0
        assert (out_p[start:start + real] > 0).all()
        start += total


@pytest.mark.parametrize("device", DEVICES)
def test_unpermute_is_deterministic(device):
    rows, experts, topk = 4000, 16, 8
    idx = random_indices(rows, experts, topk, drop=0.0, seed=13, device=device)
    x = random_tokens(rows, 256, torch.bfloat16, device=device)
    p = random_probs(rows, topk, device=device)
    out, _, plan, _ = ops.permute_by_indices(x, idx, num_experts=experts)
    first = ops.unpermute(out, plan, p)
    for _ in range(3):
        assert torch.equal(ops.unpermute(out, plan, p), first)


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(0, 120), hidden=st.integers(1, 40), experts=st.integers(1, 24),
       k=st.integers(1, 8), pad=st.sampled_from([None, 1, 2, 5]), seed=st.integers(0, 2**16),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]))
def test_permutation_properties(rows, hidden, experts, k, pad, seed, dtype):
    """Expert-major, ascending source row inside an expert, every copy at its row, counts
    consistent with the rows, and the same as the reference."""
    topk = min(k, experts)
    idx = random_indices(rows, experts, topk, seed=seed)
    x = random_tokens(rows, hidden, dtype, seed=seed + 1)
    out, _, plan, tpe = ops.permute_by_indices(x, idx, num_experts=experts, pad_multiple=pad)
    assert out.shape[0] == int(tpe.sum())
    offsets = torch.cumsum(tpe, 0) - tpe
    seen = set()
    for e in range(experts):
        src = sorted(r for r in range(rows) if e in idx[r].tolist())
        for rank, r in enumerate(src):
            slot = idx[r].tolist().index(e)
            dest = int(plan.map[r, slot])
            assert dest == int(offsets[e]) + rank
            assert torch.equal(out[dest], x[r])
            seen.add(dest)
    assert all(int(d) < 0 for r in range(rows) for d, i in zip(plan.map[r], idx[r]) if i < 0)
    assert len(seen) == int((idx >= 0).sum())
    assert torch.equal(out, reference.permute_by_indices(x, idx, num_experts=experts, pad_multiple=pad)[0])


def test_gradients_float64():
    rows, hidden, experts, topk = 23, 5, 6, 3
    idx = random_indices(rows, experts, topk, seed=17)
    x = random_tokens(rows, hidden, torch.float64).requires_grad_()
    p = random_probs(rows, topk, torch.float64).requires_grad_()
    scale = torch.linspace(0.5, 2.0, hidden, dtype=torch.float64)

    def layer(x, p):
        out, out_p, plan, _ = ops.permute_by_indices(x, idx, p, num_experts=experts, pad_multiple=4)
        y = out * out_p[:, None] * scale
        return ops.unpermute(y, plan), ops.unpermute(out * scale, plan, p)

    assert torch.autograd.gradcheck(layer, (x, p))
    multihot_p = random_probs(rows, topk, torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda q: ops.indices_to_multihot(idx, q, experts)[1], (multihot_p,))

    def by_map(x, q):
        routing_map, multihot = ops.indices_to_multihot(idx, q, experts)
        out, out_p, plan, _ = ops.permute(x, routing_map, multihot)
        return ops.unpermute(out * out_p[:, None], plan)

    assert torch.autograd.gradcheck(by_map, (x, multihot_p))


@pytest.mark.parametrize("device", DEVICES)
def test_gradients_match_reference(device):
    rows, hidden, experts, topk = 500, 64, 12, 4
    idx = random_indices(rows, experts, topk, seed=19, device=device)
    w = random_tokens(1, hidden, torch.float32, seed=4, device=device)
    grads = []
    for impl in (ops, reference):
        x = random_tokens(rows, hidden, torch.float32, device=device).requires_grad_()
        p = random_probs(rows, topk, device=device).requires_grad_()
        out, out_p, plan, _ = impl.permute_by_indices(x, idx, p, num_experts=experts, pad_multiple=2)
        y = impl.unpermute(out * out_p[:, None] * w, plan) + impl.unpermute(out.sin(), plan, p)
        y.square().sum().backward()
        grads.append((x.grad, p.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-5, atol=1e-5)


# ---- bad input --------------------------------------------------------------------------------


def test_eager_ops_switch_goes_through_the_op_dispatcher_with_the_same_results():
    """The testing switch eager_ops=dispatcher sends eager calls through torch.ops (the path
    compiled code takes; the profiler sees the op), the direct path does not: the same
    outputs and gradients either way, and the switch is back to direct after the block."""
    if not _library.load_kernels():
        pytest.skip("the compiled kernels are not built here")

    def run():
        x = random_tokens(40, 24, torch.float32).requires_grad_()
        idx, probs = random_indices(40, 6, 3, seed=3), random_probs(40, 3, seed=4)
        with torch.autograd.profiler.profile() as prof:
            out, out_probs, plan, _ = ops.permute_by_indices(x, idx, probs, num_experts=6)
        ops.unpermute(out, plan).square().sum().backward()
        seen = any(e.name == "flexdispatch::permute" for e in prof.function_events)
        return (out.detach(), out_probs, x.grad), seen

    direct, direct_seen = run()
    with envs.testing_switches(eager_ops="dispatcher"):
        through_ops, ops_seen = run()
    assert not direct_seen and ops_seen
    assert _library.eager_direct
    assert all(torch.equal(a, b) for a, b in zip(direct, through_ops))
    assert float(direct[0].abs().sum()) > 0


def test_ops_without_a_backward_give_no_gradient_on_either_path():
    """An op with no backward (FP8 quantization, the route check) makes outputs that need no
    gradient whether called directly or through the op dispatcher, and says nothing: autograd
    passes it by instead of attaching a node that warns or fails on backward."""
    import warnings

    if not _library.load_kernels():
        pytest.skip("the compiled kernels are not built here")
    x = random_tokens(12, 256, torch.float32).requires_grad_()
    idx, probs = random_indices(12, 6, 2, seed=5), random_probs(12, 2, seed=6).requires_grad_()
    results = []
    for mode in ("direct", "dispatcher"):
        with envs.testing_switches(eager_ops=mode), warnings.catch_warnings():
            warnings.simplefilter("error")
            q, scales = _library.quantize_fp8(x)
            clean, _ = _library.check_route(idx, 6, 0, probs, None)
            back = _library.dequantize_fp8(q, scales, torch.float32)
            assert not any(t.requires_grad for t in (q, scales, clean, back))
            (back + x).sum().backward()  # (x's own path only)
            results.append((q, scales, x.grad.clone()))
            x.grad = None
    assert all(torch.equal(a, b) for a, b in zip(*results))
    assert torch.equal(results[0][2], torch.ones_like(x)) and float(results[0][1].abs().sum()) > 0


def test_invalid_routing_raises_value_error():
    x = random_tokens(10, 4, torch.float32)
    idx = random_indices(10, 5, 2, drop=0.0)
    bad = idx.clone()
    bad[3, 1] = 5
    with pytest.raises(ValueError, match=r"indices: .*value 5 at row 3, slot 1 .*\[0, 5\)"):
        ops.permute_by_indices(x, bad, num_experts=5)
    bad[3, 1] = -2
    with pytest.raises(ValueError, match="value -2"):
        ops.indices_to_multihot(bad, random_probs(10, 2), 5)
    dup = idx.clone()
    dup[7, 1] = dup[7, 0]
    with pytest.raises(ValueError, match="row 7 names an expert twice"):
        ops.permute_by_indices(x, dup, num_experts=5)
    with pytest.raises(ValueError, match="twice"):
        ops.indices_to_multihot(dup, random_probs(10, 2), 5)
    # A non-finite prob is named as the op's argument (probs), not as the dispatcher's top-k one.
    nan = random_probs(10, 2)
    nan[4, 1] = float("nan")
    with pytest.raises(ValueError, match=r"^probs: non-finite routing probability"):
        ops.check_route_reported(idx, 5, nan, "indices")


@pytest.mark.parametrize("call,error,match", [
    (lambda x, i, p: ops.permute_by_indices(x, i.float(), num_experts=5), TypeError, "indices: expected int32"),
    (lambda x, i, p: ops.permute_by_indices(x[0], i, num_experts=5), ValueError, "tokens: expected a 2-D"),
    (lambda x, i, p: ops.permute_by_indices(x, i[:5], num_experts=5), ValueError, "indices: expected 10 rows"),
    (lambda x, i, p: ops.permute_by_indices(x, i, p[:, :1], num_experts=5), ValueError, "probs: expected shape"),
    (lambda x, i, p: ops.permute_by_indices(x, i, p.long(), num_experts=5), TypeError,
     "^probs: expected a floating-point tensor, got torch.int64"),
    (lambda x, i, p: ops.unpermute(*ops.permute_by_indices(x, i, num_experts=5)[::2], p.bool()), TypeError,
     "^probs: expected a floating-point tensor, got torch.bool"),
    (lambda x, i, p: ops.permute_by_indices(x, i, num_experts=0), ValueError, "num_experts"),
    (lambda x, i, p: ops.permute_by_indices(x, i, num_experts=5, pad_multiple=0), ValueError, "pad_multiple"),
    (lambda x, i, p: ops.permute(x, i, None), TypeError, "routing_map: expected torch.bool"),
    (lambda x, i, p: ops.unpermute(x, "map"), TypeError, "row_id_map"),
])
def test_bad_arguments(call, error, match):
    x = random_tokens(10, 4, torch.float32)
    idx = random_indices(10, 5, 2)
    with pytest.raises(error, match=match):
        call(x, idx, random_probs(10, 2))


def test_unpermute_row_count_checked():
    x = random_tokens(10, 4, torch.float32)
    out, _, plan, _ = ops.permute_by_indices(x, random_indices(10, 5, 2), num_experts=5)
    with pytest.raises(ValueError, match=f"expected {out.shape[0]} rows"):
        ops.unpermute(out[1:], plan)


@pytest.mark.gpu
def test_cuda_routing_error_raised_at_next_sync():
    idx = random_indices(64, 8, 2, drop=0.0, device="cuda")
    idx[5, 0] = 99
    probs = random_probs(64, 2, device="cuda")
    ops.indices_to_multihot(idx, probs, 8)  # no sync here
    with pytest.raises(ValueError, match="value 99 at row 5"):
        ops.check_pending_errors()


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [64, 3000])  # one block (the kernel stores the word), several (a store after)
def test_cuda_reported_route_check_raises_at_next_sync(rows):
    """A reported check's error word reaches its pinned slot without a sync, from one block or
    from the store queued after a grid: a clean route raises nothing, and a bad one raises
    its own row at the next sync, over several calls in turn."""
    for call in range(3):
        idx = random_indices(rows, 64, 8, drop=0.1, seed=call, device="cuda")
        probs = random_probs(rows, 8, seed=call, device="cuda")
        ops.check_route_reported(idx, 64, probs, "token_indices")
        ops.check_pending_errors()
        at = rows - 1 - call
        idx[at, 2] = 64 + call
        ops.check_route_reported(idx, 64, probs, "token_indices")
        with pytest.raises(ValueError, match=f"token_indices: .*value {64 + call} at row {at}, slot 2"):
            ops.check_pending_errors()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("rows,experts,topk", [(0, 4, 2), (1, 3, 1), (517, 12, 4), (3000, 64, 8)])
@pytest.mark.parametrize("fault", ["none", "range", "duplicate", "both"])
def test_check_route_matches_dense_rules(device, index_dtype, rows, experts, topk, fault):
    idx = random_indices(rows, experts, topk, seed=rows + topk).to(index_dtype)
    g = torch.Generator().manual_seed(11)
    expected_bits = 0
    if rows and fault in ("range", "both"):
        at = torch.randint(0, rows * topk, (3,), generator=g)
        idx.view(-1)[at] = torch.tensor([experts, -2, experts + 7], dtype=index_dtype)
        expected_bits |= 1
    if rows and topk > 1 and fault in ("duplicate", "both"):
        row = int(torch.randint(0, rows, (1,), generator=g))
        idx[row, :2] = torch.tensor([experts - 1, experts - 1], dtype=index_dtype)
        expected_bits |= 2
    clean, status = ops.check_route(idx.to(device), experts, flag=12345)
    in_range = (idx >= -1) & (idx < experts)
    assert clean.dtype == torch.int64 and status.dtype == torch.int32
    assert torch.equal(clean.cpu(), torch.where(in_range, idx.long(), -1))
    assert status.tolist() == [expected_bits, 12345 if expected_bits else 0]
    assert int(status[0]) == int(index_route_error_bits(idx, experts))


# (rows, experts, topk): group widths of the kernel from 1 lane a row (up to 4 experts) to 32,
# and fewer lanes for a large routing (8192 x 64); one block up to its 512 threads (256 rows of
# 2 lanes) and a grid past it, with groups past the last row in a warp (1001 rows of 4 lanes,
# 1025 of 8); k in every register size of the top-k (the kernel's 8 and 32, the CPU's 8, 16 and
# 32) with entries held above it and without (k = 32), in one block and in a grid; lanes
# holding fewer than k experts (72); no row at all; k = E; the expert and k limits and past
# them (a sort serves).
TOPK_SHAPES = [(0, 4, 2), (1, 3, 3), (100, 4, 2), (256, 8, 2), (257, 8, 2), (1024, 8, 8), (1001, 16, 2),
               (1025, 32, 4), (1024, 64, 8), (8192, 64, 8), (3000, 256, 8), (24, 40, 12), (300, 40, 9),
               (20, 64, 20), (500, 72, 8), (0, 100, 4), (70, 1024, 32), (40, ops.TOPK_MAX_EXPERTS + 1, 4),
               (50, 48, ops.TOPK_MAX + 1)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", TOKEN_DTYPES)
@pytest.mark.parametrize("rows,experts,topk", TOPK_SHAPES)
@pytest.mark.parametrize("values", ["distinct", "ties", "non-finite"])
def test_route_topk_selects_as_the_stable_sort_and_checks(device, dtype, rows, experts, topk, values):
    """The router's top-k and its check in one op: the values (bit for bit) and experts of a
    stable descending sort (NaN first, ties to the lower expert), the check's clean indices and
    status; torch.topk's values."""
    g = torch.Generator().manual_seed(rows + experts + topk)
    probs = torch.softmax(torch.randn(rows, experts, generator=g), -1)
    if values == "ties":  # (a few levels: most rows hold equal values among their top-k)
        probs = (probs * 4 * experts).floor() / (4 * experts)
    bits = 0
    if values == "non-finite" and rows:
        rows_hit = torch.randint(0, rows, (3,), generator=g)
        probs[rows_hit, torch.randint(0, experts, (3,), generator=g)] = torch.tensor([float("nan"), float("inf"),
                                                                                     float("-inf")])
        bits = 8  # (NaN and +inf are selected first; -inf is selected only where k reaches it)
    probs = probs.to(dtype)
    token_probs, indices, clean, status = ops.route_topk_trusted(probs.to(device), topk, 7, None)
    ref_probs, ref_indices = reference.route_topk(probs, topk)
    assert token_probs.dtype == dtype and indices.dtype == clean.dtype == torch.int64
    got = token_probs.cpu()
    assert torch.equal(got.isnan(), ref_probs.isnan())  # (a NaN's bits may change in a sort on the GPU)
    assert torch.equal(got[~got.isnan()].view(torch.uint8), ref_probs[~ref_probs.isnan()].view(torch.uint8))
    assert torch.equal(indices.cpu(), ref_indices)
    finite = torch.isfinite(ref_probs)
    assert torch.equal(clean.cpu(), torch.where(finite, ref_indices, -1))
    expected_bits = bits if not bool(finite.all()) else 0
    assert status.cpu().tolist() == [expected_bits, 7 if expected_bits else 0]
    if values != "non-finite":  # (whatever the order of equal values, torch.topk's values are these)
        assert torch.equal(token_probs.cpu(), torch.topk(probs, topk, dim=-1).values)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", TOKEN_DTYPES)
def test_reference_route_topk_ranks_nan_then_infinity_then_numbers(device, dtype):
    """The rule every route_topk follows, on the reference itself: NaN first (lower expert
    first), +inf above the largest finite value, equal values by expert, -inf last."""
    big = torch.finfo(dtype).max
    probs = torch.tensor([[1.0, float("inf"), big, float("nan"), float("-inf"), float("nan"), 1.0, big]], dtype=dtype)
    values, indices = reference.route_topk(probs.to(device), 8)
    assert indices.tolist() == [[3, 5, 1, 2, 7, 0, 6, 4]]
    assert torch.equal(values.cpu().nan_to_num(0.5), probs[:, [3, 5, 1, 2, 7, 0, 6, 4]].nan_to_num(0.5))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_route_topk_gradient_reaches_the_chosen_probs(device, dtype):
    """token_probs' gradient lands on the dense probs where they were chosen, zero elsewhere
    (torch.topk's), through the op's one backward."""
    g = torch.Generator().manual_seed(3)
    dense = torch.softmax(torch.randn(300, 16, generator=g), -1).to(dtype).to(device).requires_grad_()
    upstream = torch.randn(300, 4, generator=g).to(dtype).to(device)
    token_probs, indices, _, _ = ops.route_topk_trusted(dense, 4, 0, None)
    (token_probs * upstream).sum().backward()
    expected = torch.zeros(300, 16, dtype=dtype, device=device).scatter_(1, indices, upstream)
    assert torch.equal(dense.grad, expected)


# (sizing, pad): the sync-free worst case (a tail), a full route's T * K with its layout copied to
# the host, a size found at a sync
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sizing,pad", [("worst case", None), ("worst case", 4), ("route", None), ("sync", 4)])
@pytest.mark.parametrize("prob_dtype,experts,topk", [(torch.float32, 12, 4), (torch.float64, 12, 4),
                                                     (torch.float32, 40, 33)])  # (top-k past route_topk's kernel)
def test_route_and_permute_is_the_two_ops_in_one_node(device, sizing, pad, prob_dtype, experts, topk):
    """One rank's routing and permutation as one op: route_topk_trusted then
    permute_by_indices_trusted of its clean route and token probs, bit for bit, outputs and
    the gradients of the dense probs and the rows, over three calls, every output of both ops
    feeding the loss (the token probs' own gradient joins the permuted probs')."""
    g = torch.Generator().manual_seed(23)
    rows, hidden = 300, 24
    num_out = {"worst case": rows * topk + experts * ((pad or 1) - 1), "route": rows * topk, "sync": None}[sizing]
    copy_layout = sizing == "route" and device == "cuda"
    nodes = []
    for call in range(3):
        dense = torch.softmax(torch.randn(rows, experts, generator=g, dtype=torch.float64), -1).to(prob_dtype)
        x = torch.randn(rows, hidden, generator=g)
        w_rows, w_probs, w_token = (torch.randn(n, generator=g, dtype=prob_dtype) for n in ((hidden,), 1, 1))
        results = []
        for way in ("one op", "one op through torch.ops", "two ops"):
            p, xi = dense.to(device).requires_grad_(), x.to(device).requires_grad_()
            if way != "two ops":
                with envs.testing_switches(eager_ops="dispatcher" if way.endswith("torch.ops") else "direct"):
                    token_probs, indices, clean, status, out, out_probs, plan = ops.route_and_permute_trusted(
                        p, xi, topk, "probs", num_out, pad, "indices", copy_layout)
                nodes.append(out.grad_fn is out_probs.grad_fn is token_probs.grad_fn)
            else:
                token_probs, indices, clean, status = ops.route_topk_trusted(p, topk, 0, "probs")
                out, out_probs, plan = ops.permute_by_indices_trusted(xi, clean, token_probs, experts, num_out, pad,
                                                                      copy_layout)
            loss = ((out * w_rows.to(device)).sum() + (out_probs * w_probs.to(device)).sum() * out.sum()
                    + (token_probs.square() * w_token.to(device)).sum())
            loss.backward()
            results.append((token_probs.detach(), indices, clean, status, out.detach(), out_probs.detach(), plan.map,
                            plan.tokens_per_expert, p.grad, xi.grad))
        for other in results[1:]:
            for a, b in zip(results[0], other):
                assert a.dtype == b.dtype and torch.equal(a, b)
        assert results[0][-2].abs().sum() > 0 and results[0][-1].abs().sum() > 0
    # (one node where route_topk's kernel serves; the two ops, as they are, where it does not)
    assert nodes == [topk <= ops.TOPK_MAX] * 6


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sizing,pad", [("worst case", None), ("worst case", 4), ("sync", None), ("sync", 4)])
@pytest.mark.parametrize("prob_dtype", [torch.float32, torch.float64])
def test_check_and_permute_is_the_two_ops_in_one(device, sizing, pad, prob_dtype):
    """One rank's given routing and permutation as one op: check_route_trusted then
    permute_by_indices_trusted of its clean route and the probs, bit for bit, outputs and the
    gradients of the probs and the rows, over three calls whose routes have unused slots and
    non-finite probs there (the check leaves those slots out: -1 in the clean route)."""
    rows, hidden, experts, topk = 300, 24, 12, 4
    num_out = rows * topk + experts * ((pad or 1) - 1) if sizing == "worst case" else None
    for call in range(3):
        indices = random_indices(rows, experts, topk, seed=40 + call, device=device)
        probs = random_probs(rows, topk, seed=50 + call, device=device).to(prob_dtype)
        unused = (indices < 0).nonzero()[:2]
        probs[unused[:, 0], unused[:, 1]] = float("nan")  # (only at unused slots: nothing to report)
        x = random_tokens(rows, hidden, torch.float32, seed=60 + call, device=device)
        w_rows = random_tokens(1, hidden, torch.float32, seed=70 + call, device=device)
        results = []
        for way in ("one op", "one op through torch.ops", "two ops"):
            p, xi = probs.clone().requires_grad_(), x.clone().requires_grad_()
            if way != "two ops":
                with envs.testing_switches(eager_ops="dispatcher" if way.endswith("torch.ops") else "direct"):
                    clean, status, out, out_probs, plan = ops.check_and_permute_trusted(
                        xi, indices, p, experts, num_out, pad, "token_indices", "indices")
            else:
                clean, status = ops.check_route_trusted(indices, experts, 0, p, "token_indices")
                out, out_probs, plan = ops.permute_by_indices_trusted(xi, clean, p, experts, num_out, pad)
            ((out * w_rows).sum() + (out_probs * out_probs).sum()).backward()
            results.append((clean, status, out.detach(), out_probs.detach(), plan.map, plan.tokens_per_expert,
                            p.grad, xi.grad))
        for other in results[1:]:
            for a, b in zip(results[0], other):
                assert a.dtype == b.dtype and torch.equal(a, b)
        assert (results[0][0] < 0).any() and results[0][-1].abs().sum() > 0
        assert torch.isfinite(results[0][-2]).all() and results[0][-2].abs().sum() > 0


@pytest.mark.parametrize("device", DEVICES)
def test_route_and_permute_reports_each_error_under_its_name(device):
    """The routing's non-finite prob names ``probs``; a permutation too small for its route
    says so (raised at once on the CPU, at the next sync on CUDA)."""
    probs = torch.softmax(torch.randn(64, 8), -1)
    x = torch.randn(64, 16)
    bad = probs.clone()
    bad[5, 2] = float("nan")
    routing = []  # (the message names the entry while the routing lives)
    with pytest.raises(ValueError, match=r"^probs: non-finite routing probability: .*expert 2 at row 5"):
        routing.append(ops.route_and_permute_trusted(bad.to(device), x.to(device), 2, "probs", 128, None, "indices"))
        ops.check_pending_errors()
    with pytest.raises(ValueError, match=r"^num_out_tokens=100 is smaller than the rows the routing needs"):
        routing.append(ops.route_and_permute_trusted(probs.to(device), x.to(device), 2, "probs", 100, None,
                                                     "indices"))
        ops.check_pending_errors()


# (rows, experts): one block of route_topk (64 rows of 2 lanes) and a grid (1024 rows of 8 lanes)
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("rows,experts", [(64, 8), (1024, 32)])
def test_route_topk_reports_a_non_finite_prob_under_its_name(device, rows, experts):
    probs = torch.softmax(torch.randn(rows, experts), -1)
    probs[rows - 59, 3] = float("nan")
    routing = []  # (the message names the entry while the routing lives)
    with pytest.raises(ValueError, match=rf"^probs: non-finite routing probability: .*expert 3 at row {rows - 59}, slot 0"):
        routing.append(ops.route_topk_trusted(probs.to(device), 2, 0, "probs"))  # (raises on the CPU)
        ops.check_pending_errors()  # (CUDA: at the next sync)


# (what, rows, experts, topk, launches): route_topk in one block (64 rows of 2 lanes) and as a
# grid (1024 rows of 8 lanes, 32 blocks); check_route in one block (8192 entries) and as a
# grid (8196 entries, 33 blocks)
@pytest.mark.gpu
@pytest.mark.parametrize("what,rows,experts,topk,launches", [
    ("route_topk", 64, 8, 2, 1), ("route_topk", 1024, 32, 4, 3),
    ("check_route", 2048, 64, 4, 1), ("check_route", 2049, 64, 4, 3)])
@pytest.mark.parametrize("bad", [False, True])
def test_a_reported_route_check_stores_its_own_error_word(what, rows, experts, topk, launches, bad):
    """A route check reported under a name (route_topk's or check_route's) stores its error word
    to its pinned slot from its own launches, with no copy queued from Python: one launch where
    one block serves (it writes the status and the word), three for a grid (the status zeroed,
    the check, whose blocks OR into it, and a one-thread kernel storing the word). The status
    and the raised error name the bad entry, here in the grid's last block."""
    g = torch.Generator().manual_seed(rows)
    probs = torch.softmax(torch.randn(rows, experts, generator=g), -1)
    if what == "route_topk":
        if bad:
            probs[rows - 1, 5] = float("inf")
        dense = probs.cuda()
        run = lambda: ops.route_topk_trusted(dense, topk, 3, "probs")  # noqa: E731
        expected, match = (8 if bad else 0), rf"expert 5 at row {rows - 1}"
    else:
        idx = random_indices(rows, experts, topk, drop=0.0, seed=rows)
        if bad:
            idx[rows - 1, topk - 1] = experts + 4
        idx = idx.cuda()
        run = lambda: ops.check_route_reported(idx, experts, None, "indices")  # noqa: E731
        expected, match = (1 if bad else 0), rf"value {experts + 4} at row {rows - 1}"
    ops.check_pending_errors()
    if not bad:
        launched = _device_ops(run)
        assert len(launched) == launches, launched
    routing = run()
    with pytest.raises(ValueError, match=match) if bad else contextlib.nullcontext():
        ops.check_pending_errors()
    status = routing[-1].cpu().tolist()
    assert status == [expected, 3 if expected and what == "route_topk" else 0]


def test_check_route_rejects_bad_arguments():
    idx = random_indices(8, 4, 2)
    with pytest.raises(TypeError, match="indices"):
        ops.check_route(idx.float(), 4)
    with pytest.raises(ValueError, match="flag"):
        ops.check_route(idx, 4, flag=-1)
    with pytest.raises(ValueError, match="num_experts"):
        ops.check_route(idx, 0)


@pytest.mark.gpu
def test_cuda_routing_error_raised_by_a_later_op_without_sync():
    idx = random_indices(64, 8, 2, drop=0.0, device="cuda")
    idx[3, 1] = 50
    probs = random_probs(64, 2, device="cuda")
    ops.indices_to_multihot(idx, probs, 8)  # flags the error, no sync
    torch.cuda.synchronize()  # the error word has landed: the next op reads it without waiting
    good = random_indices(64, 8, 2, drop=0.0, device="cuda")
    with pytest.raises(ValueError, match="value 50 at row 3"):
        ops.indices_to_multihot(good, probs, 8)
    ops.check_pending_errors()  # nothing left over


@pytest.mark.gpu
def test_cuda_error_words_reuse_their_pinned_slots():
    """The error words' pinned slots and events are reused in turn (2 * _MAX_PENDING slots):
    many clean calls, some read as they go and some left pending, never raise; a bad call
    after several rounds of the slots raises with its own row and value (by a later op once
    its word has landed, or at the next check), and only once."""
    probs = random_probs(64, 2, device="cuda")
    good = random_indices(64, 8, 2, drop=0.0, device="cuda")
    for i in range(5 * _library.MAX_PENDING + 3):
        ops.indices_to_multihot(good, probs, 8)
        if i % 37 == 0:
            torch.cuda.synchronize()
    bad = good.clone()
    bad[7, 1] = 77
    ops.indices_to_multihot(bad, probs, 8)
    with pytest.raises(ValueError, match="value 77 at row 7"):
        for _ in range(_library.MAX_PENDING // 2):  # queued after the bad one: read later, in order
            ops.indices_to_multihot(good, probs, 8)
        ops.check_pending_errors()
    for _ in range(3 * _library.MAX_PENDING):  # the slots go round again: no stale word raises
        ops.indices_to_multihot(good, probs, 8)
    ops.check_pending_errors()


def test_error_words_fall_back_to_a_copy_where_pinned_memory_is_not_mapped(monkeypatch, caplog):
    """Where the runtime gives the pinned error slots no device address, the slots are written
    by a torch copy (address 0) with a debug record, and no deferred check raises for it."""
    import logging

    class Unmapped:
        def mapped_address(self, words):
            raise RuntimeError("flexdispatch CUDA error: invalid argument")

    monkeypatch.setattr(_library, "_with_cuda", True)
    monkeypatch.setattr(_library, "_C", Unmapped())
    with caplog.at_level(logging.DEBUG, logger="flexdispatch"):
        assert _library._device_mapping(torch.zeros(4, dtype=torch.int64)) == 0
    assert "copied, not stored by a kernel" in caplog.text


def test_python_constants_match_the_kernel_header():
    """rowmap.py reads the error bits and the expert limit from cuda_src/flexdispatch.h and
    writes the layout positions as formulas; both must agree with the header (and the
    agreement header's own bits stay clear)."""
    import re
    from pathlib import Path

    from flexdispatch import rowmap
    from flexdispatch.managers import agreement

    header = (Path(__file__).resolve().parents[1] / "cuda_src" / "flexdispatch.h").read_text()
    bits = {name: int(value) for name, value in re.findall(r"k(\w+)\s*=\s*(\d+),\s*//", header)}
    assert bits["IndexOutOfRange"] == rowmap.INDEX_OUT_OF_RANGE
    assert bits["DuplicateIndex"] == rowmap.DUPLICATE_INDEX
    assert bits["OutputOverflow"] == rowmap.OUTPUT_OVERFLOW
    assert bits["NonFiniteProb"] == rowmap.NONFINITE_PROB
    assert agreement.INPUT_ERROR & sum(v for k, v in bits.items() if k in (
        "IndexOutOfRange", "DuplicateIndex", "OutputOverflow", "NonFiniteProb")) == 0
    assert "layout_error(int32_t e) { return 3 * int64_t(e) + 1; }" in header
    assert rowmap.layout_error_index(7) == 22 and rowmap.layout_total_index(7) == 21
    assert f"constexpr int32_t kMaxExperts = {MAX_EXPERTS};" in header
    with pytest.raises(ValueError, match=f"expected an int in \\[1, {MAX_EXPERTS}\\]"):
        ops.check_route(torch.zeros(1, 1, dtype=torch.long), MAX_EXPERTS + 1)
    assert "layout_offsets(int32_t e) { return 2 * int64_t(e); }" in header


# ---- the agreement of a call --------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("ranks", [1, 2, 5])
@pytest.mark.parametrize("fault", ["none", "route-error", "input-error", "step", "hidden", "rows-only"])
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
def test_agreement_kernels_take_the_hosts_decision(device, ranks, fault, index_dtype):
    """make_header and mask_unless_agreed equal their reference twins, and the device's
    decision (indices kept or emptied) is the host's Agreement.agreed() on the same headers."""
    from flexdispatch.managers import agreement

    g = torch.Generator().manual_seed(ranks * 7 + len(fault))
    hidden = torch.empty(3, 64, dtype=torch.bfloat16)
    rows = torch.randint(0, 100, (ranks,), generator=g).tolist()  # differ across ranks: never a fault
    headers = []
    for rank in range(ranks):
        bad = rank == ranks - 1
        step = 4 if fault == "step" and bad and ranks > 1 else 3
        values = agreement.make_header(agreement.DISPATCH, step, torch.empty(3, 32) if fault == "hidden" and bad else hidden,
                                       4, error=agreement.INPUT_ERROR if fault == "input-error" and bad else 0, rows=rows[rank])
        status = torch.tensor([2 if fault == "route-error" and bad else 0, 0], dtype=torch.int32, device=device)
        like = torch.empty(0, device=device)
        got = ops.make_header(like, values, status)
        assert got.dtype == torch.int64 and got.device.type == device
        assert torch.equal(got, reference.make_header(like.device, values, status))
        headers.append(got)
    gathered = torch.stack(headers)
    indices = random_indices(41, 9, 3, seed=ranks).to(device)
    masked = ops.mask_unless_agreed(gathered, indices, index_dtype)
    assert masked.dtype == index_dtype
    assert torch.equal(masked, reference.mask_unless_agreed(gathered, indices, index_dtype))
    agreed = agreement.Agreement(gathered.cpu()).agreed()
    assert agreed == (fault in ("none", "rows-only") or ranks == 1 and fault in ("step", "hidden"))
    assert torch.equal(masked.long().cpu(), indices.cpu() if agreed else torch.full_like(indices.cpu(), -1))


def test_agreement_fields_are_the_kernel_headers():
    from pathlib import Path

    from flexdispatch.managers import agreement

    header = (Path(__file__).resolve().parents[1] / "cuda_src" / "flexdispatch.h").read_text()
    for name, index in (("Rows", agreement.ROWS), ("Phase", agreement.PHASE), ("Step", agreement.STEP),
                        ("Error", agreement.ERROR), ("Topk", agreement.TOPK), ("Width", agreement.WIDTH)):
        assert f"kHeader{name} = {index}," in header


# ---- FP8 rows --------------------------------------------------------------------------------


def _fp8_rows(dtype, device, rows=24, hidden=384):
    """Rows spanning 11 orders of magnitude, with a zero row, a row with one huge value, a row
    of values far below its group's largest (e4m3 subnormals), and groups whose largest value
    is the e4m3 maximum itself."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(rows, hidden, generator=g) * torch.logspace(-6, 4, rows)[:, None]
    x[0] = 0
    x[1, 7] = 3e4
    x[2] = torch.randn(hidden, generator=g) * 1e-3
    x[2, ::128] = 1.0  # the rest of each group sits near 2^-9 of the group's largest
    x[3] = torch.linspace(-448, 448, hidden)
    return x.to(dtype).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fp8_kernels_equal_the_reference_bit_for_bit(device, dtype):
    x = _fp8_rows(dtype, device)
    q, scales = ops.quantize_fp8(x)
    q_ref, scales_ref = reference.quantize_fp8(x)
    assert q.dtype == torch.float8_e4m3fn and scales.dtype == torch.float32 and scales.shape == (24, 3)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(scales, scales_ref)
    back = ops.dequantize_fp8(q, scales, dtype)
    assert back.dtype == dtype and torch.equal(back, reference.dequantize_fp8(q_ref, scales_ref, dtype))
    # Documented behaviour: zero rows stay zero, a group's largest value comes back within
    # e4m3's half step (1/16), and the e4m3 maximum is exact with scale 1.
    assert torch.count_nonzero(back[0]) == 0
    assert abs(float(back[1, 7]) - 3e4) <= 3e4 / 16
    assert float(scales[3, 0]) == 1.0 and float(back[3, 0]) == -448.0
    err = (back.double() - x.double()).norm() / x.double().norm()
    assert 0 < err < 0.05


@pytest.mark.parametrize("device", DEVICES)
def test_fp8_rounding_is_torchs_on_every_code_and_tie(device):
    """Scale 1 (a group whose largest value is 448): every e4m3 value, every midpoint between
    neighbours (ties to even) and values just beside them convert as torch converts them."""
    codes = torch.arange(0, 0x7f, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # finite, >= 0
    mids = (codes[1:] + codes[:-1]) / 2
    near = torch.cat([mids * (1 + 2 ** -20), mids * (1 - 2 ** -20)])
    # Below the smallest subnormal (2^-9): half of it, just above half, float32 subnormals.
    tiny = torch.tensor([2.0 ** -10, 2.0 ** -10 * (1 + 2 ** -20), 2.0 ** -11, 1e-40, 1e-45, 0.0])
    values = torch.cat([codes, mids, near, tiny, -codes, -mids, -near, -tiny])
    hidden = 128 * ((values.numel() + 126) // 127)
    x = torch.zeros(hidden)
    x[: values.numel()] = values
    x = x.reshape(-1, 128)
    x[:, -1] = 448.0  # every group's largest value: scale exactly 1
    q, scales = ops.quantize_fp8(x.to(device))
    assert torch.all(scales == 1.0)
    assert torch.equal(q.view(torch.uint8).cpu(), x.to(torch.float8_e4m3fn).view(torch.uint8))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_groups_with_nan_or_inf_are_the_references(device, dtype):
    """A group holding NaN or +-inf has a scale that is not finite (documented in
    ops.quantize_fp8); its bytes are the reference's, and the other groups are untouched."""
    x = _fp8_rows(dtype, "cpu", rows=6, hidden=512)
    x[1, 5], x[2, 130], x[3, 300], x[4, 0], x[4, 1] = float("nan"), float("inf"), float("-inf"), float("inf"), -1.0
    x = x.to(device)
    q, scales = ops.quantize_fp8(x)
    q_ref, scales_ref = reference.quantize_fp8(x)
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    assert torch.allclose(scales, scales_ref, rtol=0, atol=0, equal_nan=True)
    assert torch.isnan(scales[1, 0]) and torch.isinf(scales[2, 1]) and torch.isinf(scales[3, 2])
    assert int(torch.isfinite(scales).sum()) == scales.numel() - 4


def test_fp8_bad_arguments():
    with pytest.raises(ValueError, match="x: FP8 needs a hidden size that is a multiple of 128"):
        ops.quantize_fp8(torch.randn(4, 100))
    with pytest.raises(TypeError, match="x: FP8 quantization takes"):
        ops.quantize_fp8(torch.randn(4, 128, dtype=torch.float64))
    q, scales = ops.quantize_fp8(torch.randn(4, 256))
    with pytest.raises(ValueError, match=r"scales: expected float32 \[4, 2\]"):
        ops.dequantize_fp8(q, scales[:, :1])
    with pytest.raises(TypeError, match="dtype: FP8 rows dequantize to"):
        ops.dequantize_fp8(q, scales, torch.float64)
    assert ops.dequantize_fp8(q.view(torch.uint8), scales, torch.float32).shape == (4, 256)


def test_fp8_round_trip_is_straight_through():
    x = torch.randn(3, 128, requires_grad=True)
    y = ops.fp8_round_trip(x)
    assert torch.equal(y.detach(), reference.fp8_round_trip(x.detach()))
    g = torch.randn(3, 128)
    y.backward(g)
    assert torch.equal(x.grad, g)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("pad,sized", [(None, False), (4, False), (3, True)])
@pytest.mark.parametrize("hidden,packed", [(256, False), (256, True), (512, True), (1408, False)])
def test_fp8_permutation_equals_dequantize_then_permute(device, dtype, pad, sized, hidden, packed, poison):
    """The dequantizing permutation against the reference and against the two passes it
    replaces, bit for bit; FP8 rows also read as slices of a packed payload (aligned rows at
    hidden 512, rows copied first at 256), and rows of several blocks' segments, the last
    part-used (1408)."""
    rows, experts, topk = 77, 6, 3
    q, scales = ops.quantize_fp8(_fp8_rows(dtype, device, rows=rows, hidden=hidden))
    if packed:  # the all-to-all manager's payload: FP8 bytes, then the scales' bytes
        payload = torch.cat([q.view(torch.uint8), scales.view(torch.uint8)], dim=1)
        q, scales = payload[:, :hidden], payload[:, hidden:].view(torch.float32)
    idx = random_indices(rows, experts, topk, seed=hidden + rows).to(device)
    probs = random_probs(rows, topk, device=device)
    num_out = rows * topk + experts * 4 if sized else None
    poison(device)  # (the tail and pad rows must be written, not found zero)
    got = ops.permute_fp8_by_indices(q, scales, idx, probs, num_experts=experts, num_out_tokens=num_out,
                                     pad_multiple=pad, dtype=dtype)
    want = reference.permute_fp8_by_indices(q, scales, idx, probs, experts, num_out, pad, dtype)
    two_pass = ops.permute_by_indices(ops.dequantize_fp8(q.contiguous(), scales.contiguous(), dtype), idx, probs,
                                      num_experts=experts, num_out_tokens=num_out, pad_multiple=pad)
    for other in (want, two_pass):
        assert got[0].dtype == dtype and torch.equal(got[0], other[0]) and torch.equal(got[1], other[1])
        assert_plans_equal(got[2], other[2])
        assert torch.equal(got[3].cpu(), other[3].cpu())
    assert got[0].abs().sum() > 0


@pytest.mark.gpu
@pytest.mark.parametrize("rows,experts,topk", ONE_LAUNCH_EDGES[:4] + [(9, 5, 3), (2112, 8, 4), (2113, 8, 4)])
@pytest.mark.parametrize("fault", ["none", "range", "overflow"])
def test_one_launch_fp8_permutation_is_the_planned_one(rows, experts, topk, fault, poison):
    """A small top-k route's dequantizing permutation, its size known, is one launch on CUDA
    (the one-launch permutation reading FP8 rows of a packed payload and dequantizing them), a
    larger one the passes: on both sides of the limits the rows, probs, plan and zero tail are
    the reference's bit for bit, and a bad index or a too small output raises."""
    hidden = 512
    q, scales = ops.quantize_fp8(_fp8_rows(torch.bfloat16, "cuda", rows=rows, hidden=hidden))
    payload = torch.cat([q.view(torch.uint8), scales.view(torch.uint8)], dim=1)  # (rows 528 bytes apart: read in place)
    q, scales = payload[:, :hidden], payload[:, hidden:].view(torch.float32)
    idx = random_indices(rows, experts, topk, seed=rows + experts).to("cuda")
    p = random_probs(rows, topk, device="cuda")
    fits = _one_launch_fits(rows, experts, topk, multihot=False)
    if fault == "range":
        idx[rows // 2, 0] = experts
        with pytest.raises(ValueError, match="out of range"):
            ops.permute_fp8_by_indices(q, scales, idx, p, num_experts=experts, num_out_tokens=rows * topk)
            ops.check_pending_errors()
        return
    want = reference.permute_fp8_by_indices(q, scales, idx, p, experts, None, None, torch.bfloat16)
    used = want[0].shape[0]
    if fault == "overflow":
        with pytest.raises(ValueError, match="num_out_tokens"):
            ops.permute_fp8_by_indices(q, scales, idx, p, num_experts=experts, num_out_tokens=used - 1)
            ops.check_pending_errors()
        return
    launched = _device_ops(lambda: ops.permute_fp8_by_indices(q, scales, idx, p, num_experts=experts,
                                                              num_out_tokens=used + 5))
    assert (len(launched) == 1) == fits, launched
    poison("cuda")
    out, out_p, plan, tpe = ops.permute_fp8_by_indices(q, scales, idx, p, num_experts=experts, num_out_tokens=used + 5)
    assert torch.equal(out[:used], want[0]) and torch.equal(out_p[:used], want[1])
    assert torch.count_nonzero(out[used:]) == 0 and torch.count_nonzero(out_p[used:]) == 0
    assert torch.equal(plan.map.cpu(), want[2].map.cpu()) and torch.equal(tpe.cpu(), want[3].cpu())


@pytest.mark.parametrize("device", DEVICES)
def test_fp8_permutation_gradients_go_to_the_stand_in_rows(device):
    """The gradient of the output reaches ``rows`` (a stand-in for the dequantized rows, as a
    transfer's backward needs) as permute_by_indices' reaches its tokens; probs likewise."""
    rows, hidden, experts, topk, dtype = 40, 256, 5, 2, torch.float32
    q, scales = ops.quantize_fp8(_fp8_rows(dtype, device, rows=rows, hidden=hidden))
    idx = random_indices(rows, experts, topk, seed=5).to(device)
    probs = random_probs(rows, topk, device=device)
    stand_in = torch.zeros(rows, hidden, dtype=dtype, device=device).expand(rows, hidden).requires_grad_()
    p1 = probs.clone().requires_grad_()
    out, pp, _, _ = ops.permute_fp8_by_indices(q, scales, idx, p1, num_experts=experts, pad_multiple=2, dtype=dtype,
                                               rows=stand_in)
    dense = ops.dequantize_fp8(q, scales, dtype).requires_grad_()
    p2 = probs.clone().requires_grad_()
    out2, pp2, _, _ = ops.permute_by_indices(dense, idx, p2, num_experts=experts, pad_multiple=2)
    g, gp = torch.randn_like(out), torch.randn_like(pp)
    torch.autograd.backward([out, pp], [g, gp])
    torch.autograd.backward([out2, pp2], [g, gp])
    assert torch.equal(out, out2) and torch.equal(stand_in.grad, dense.grad) and torch.equal(p1.grad, p2.grad)
    assert dense.grad.abs().sum() > 0


def test_fp8_permutation_without_kernels_is_the_same(monkeypatch):
    """The plain-PyTorch path (FLEXDISPATCH_JIT=0, or no kernels for the device) gives the
    kernels' rows, probs and gradients."""
    rows, hidden, experts, topk, dtype = 30, 256, 4, 2, torch.bfloat16
    q, scales = ops.quantize_fp8(_fp8_rows(dtype, "cpu", rows=rows, hidden=hidden))
    idx = random_indices(rows, experts, topk, seed=8)
    probs = random_probs(rows, topk)
    results = []
    for kernels in (True, False):
        monkeypatch.setattr(_library, "serves", lambda t, k=kernels: k)
        stand_in = torch.zeros(rows, hidden, dtype=dtype).requires_grad_()
        p = probs.clone().requires_grad_()
        out, pp, _, tpe = ops.permute_fp8_by_indices(q, scales, idx, p, num_experts=experts, pad_multiple=2,
                                                     dtype=dtype, rows=stand_in)
        torch.autograd.backward([out, pp], [torch.ones_like(out), torch.ones_like(pp)])
        results.append((out, pp, tpe, stand_in.grad, p.grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)


# ---- rows read through addresses (the NVLink manager's transfers) ---------------------------


def _row_addrs(t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Addresses of rows ``rows`` of the contiguous 2-D ``t`` (0 where ``rows`` is -1)."""
    row_bytes = t.shape[1] * t.element_size()
    return torch.where(rows >= 0, t.data_ptr() + rows * row_bytes, 0).to(t.device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("first_row", [0, 37])
@pytest.mark.parametrize("dtype,width", [(torch.bfloat16, 7168), (torch.float32, 33), (torch.uint8, 7),
                                         (torch.float64, 17), (torch.bfloat16, 64)])
def test_copy_rows_from_addresses_equals_indexing(device, dtype, width, first_row):
    """Rows read through addresses equal indexing, whichever row the pull starts from."""
    from flexdispatch import peer_ops
    from flexdispatch.managers.peer_buffers import row_align

    g = torch.Generator().manual_seed(width)
    # Two "peers": separate tensors, rows picked from either, repeats included.
    peers = [random_tokens(50, width, torch.float32, device="cpu").to(dtype).to(device) for _ in range(2)]
    pick = torch.randint(0, 50, (80,), generator=g)
    which = torch.randint(0, 2, (80,), generator=g)
    addrs = torch.where(which == 0, _row_addrs(peers[0], pick.to(device)).cpu(), _row_addrs(peers[1], pick.to(device)).cpu())
    expected = torch.where((which == 0)[:, None].to(device), peers[0][pick.to(device)], peers[1][pick.to(device)])
    addrs[::7] = 0  # no source row: zeros (or, through a row map, nothing written)
    expected[::7] = 0
    align = row_align(width * peers[0].element_size())
    out = torch.empty(80, width, dtype=dtype, device=device)
    assert torch.equal(peer_ops.copy_rows_from(addrs.to(device), out, align, first_row=first_row), expected)
    with pytest.raises(ValueError, match="first_row"):
        peer_ops.copy_rows_from(addrs.to(device), out, align, first_row=80)
    # Through a row map: row r to rows map[r, :] (-1 none); rows nobody fills keep their values.
    row_map = torch.full((80, 2), -1, dtype=torch.int32)
    row_map[:, 0] = torch.randperm(160, generator=g)[:80].int()
    row_map[::3, 1] = torch.arange(160, 160 + len(range(0, 80, 3)), dtype=torch.int32)
    sentinel = random_tokens(200, width, torch.float32, device="cpu").to(dtype).to(device)
    out = sentinel.clone()
    peer_ops.copy_rows_from(addrs.to(device), out, align, row_map.to(device), first_row=first_row)
    want = sentinel.clone()
    for s in range(2):
        keep = (row_map[:, s] >= 0) & (addrs != 0)
        want[row_map[keep, s].long().to(device)] = expected[keep.to(device)]
    assert torch.equal(out, want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
@pytest.mark.parametrize("slots,width", [(4, 7168), (3, 9), (8, 256), (1, 64)])
def test_sum_rows_from_addresses_is_the_fixed_order_sum(device, dtype, slots, width):
    from flexdispatch import peer_ops
    from flexdispatch.managers.peer_buffers import row_align

    g = torch.Generator().manual_seed(slots * width)
    src = random_tokens(40, width, torch.float32, device="cpu").to(dtype).to(device)
    rows = torch.randint(-1, 40, (25, slots), generator=g)  # -1: no row in that slot
    rows[0] = -1  # a row without any slot is zero
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    expected = torch.zeros(25, width, dtype=acc, device=device)
    for s in range(slots):  # the slot order of the kernels
        r = rows[:, s].to(device)
        expected += torch.where((r >= 0)[:, None], src[r.clamp(min=0)].to(acc), 0)
    out = torch.empty(25, width, dtype=dtype, device=device)
    peer_ops.sum_rows_from(_row_addrs(src, rows.to(device)), out, row_align(width * src.element_size()))
    assert torch.equal(out, expected.to(dtype))
    assert torch.equal(out[0], torch.zeros_like(out[0]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("world,local,tokens", [(1, 4, 50), (4, 3, 700), (8, 1200, 300)])
def test_routing_by_rank_kernel_equals_the_torch_formula(monkeypatch, device, index_dtype, world, local, tokens):
    """Tokens to ranks, tokens per rank and assignments per expert in one kernel (8 x 1200
    experts: counted in global memory, not in a block's histogram), against the plain torch ops
    it replaces and a loop over the tokens, with unused (-1) and out-of-range entries."""
    from flexdispatch.managers import alltoall

    experts, topk = world * local, 4
    idx = random_indices(tokens, experts, min(topk, experts), seed=world, device=device).to(index_dtype)
    idx[::7, 0] = -1
    idx[3::11, -1] = experts + 5
    got = alltoall.routing_by_rank(idx, world, local)
    monkeypatch.setattr(_library, "serves", lambda t: False)
    want = alltoall.routing_by_rank(idx, world, local)
    assert got[0].dtype == torch.bool and got[0].shape == (tokens, world) and got[1].shape == (world, local + 1)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert int(want[1].sum()) > 0 and bool(want[0].any())
    per_rank = [0] * world
    for row in idx.tolist():
        for w in {e // local for e in row if 0 <= e < experts}:
            per_rank[w] += 1
    assert got[1][:, 0].tolist() == per_rank


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kernels", [True, False])
@pytest.mark.parametrize("world,local", [(1, 3), (4, 2)])
def test_all_to_all_header_message_is_the_header_then_the_counts(monkeypatch, device, kernels, world, local):
    """The all-to-all manager's first exchange, built on the device: every row holds the header
    with the route check's bits OR-ed into its error field, then rank w's counts, its ROWS field
    rank w's row count; without counts, zeros after the header. Against a plain nested list,
    with the kernels and without."""
    from types import SimpleNamespace

    from flexdispatch.managers import agreement, alltoall

    if not kernels:
        monkeypatch.setattr(_library, "serves", lambda t: False)
    manager = SimpleNamespace(world_size=world, num_local_experts=local)
    g = torch.Generator().manual_seed(world)
    header = torch.randint(0, 1 << 40, (agreement.WIDTH,), generator=g).tolist()
    header[agreement.ERROR] = 4
    counts = torch.randint(0, 1000, (world, 1 + local), generator=g)
    status = torch.tensor([3, 77], dtype=torch.int32)
    like = torch.empty(0, dtype=torch.int64, device=device)
    for c, st in ((None, None), (counts, None), (counts, status), (None, status)):
        rows = []
        for w in range(world):
            row = list(header)
            if st is not None:
                row[agreement.ERROR] |= int(st[0])
            if c is not None:
                row[agreement.ROWS] = int(c[w, 0])
            rows.append(row + (c[w, 1:].tolist() if c is not None else [0] * local))
        got = alltoall._message(header, manager, like, None if c is None else c.to(device),
                                None if st is None else st.to(device))
        assert got.dtype == torch.int64 and got.device.type == device and got.is_contiguous()
        assert got.tolist() == rows


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("prob_dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("id_column,with_source", [(0, False), (1, True)])
def test_received_routing_kernel_equals_the_formula(device, prob_dtype, id_column, with_source):
    """The received rows' local experts and masked probs in one kernel, against the plain
    formula (experts of other ranks, unused slots and rows without a source give -1 and 0), and
    the probs' gradient reaching only the meta's prob columns of kept slots."""
    rows, topk, local, first = 300, 4, 6, 12
    g = torch.Generator().manual_seed(id_column * 2 + (prob_dtype == torch.float64))
    experts = torch.randint(-1, 4 * local, (rows, topk), generator=g).double()
    probs = torch.rand(rows, topk, generator=g, dtype=torch.float64)
    tokens = torch.arange(rows, dtype=torch.float64)[:, None]
    meta = torch.cat([tokens, experts, probs] if id_column else [experts, probs], dim=1).to(device).requires_grad_()
    has_source = (torch.rand(rows, generator=g) > 0.2).to(device) if with_source else None
    got = ops.received_routing(meta, id_column, topk, first, local, prob_dtype, has_source=has_source)
    want = reference.received_routing(meta, id_column, topk, first, local, prob_dtype, has_source=has_source)
    assert got[0].dtype == torch.int64 and got[1].dtype == prob_dtype
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    kept = got[0] >= 0
    assert 0 < int(kept.sum()) < rows * topk and bool((got[0][kept] < local).all())
    grad = torch.rand(rows, topk, generator=g, dtype=prob_dtype).to(device)
    (got_grad,) = torch.autograd.grad(got[1], meta, grad)
    (want_grad,) = torch.autograd.grad(want[1], meta, grad)
    assert torch.equal(got_grad, want_grad)
    assert bool((got_grad[:, id_column + topk:][~kept] == 0).all()) and bool((got_grad[:, :id_column + topk] == 0).all())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype,first_row,hidden,max_blocks", [
    (torch.bfloat16, 0, 256, 0), (torch.float32, 0, 256, 0), (torch.bfloat16, 77, 256, 0),
    (torch.bfloat16, 5, 1280, 3), (torch.float32, 77, 1280, 2), (torch.float32, 0, 1280, 1)])
@pytest.mark.parametrize("sized", [False, True])
def test_permute_fp8_from_addresses_equals_the_dequantizing_permutation(device, dtype, first_row, hidden,
                                                                        max_blocks, sized, poison):
    """FP8 rows read through addresses as the NVLink manager publishes them (each row's bytes,
    then its scales), some without a source (address 0): the dequantizing permutation's rows,
    probs and plan, bit for bit, and the stand-in gets the permutation's gradient. With a cap
    on the kernel's blocks (the NVLink SM budget), each block walks many (row, segment) pairs
    of rows several segments wide (1280: a payload row of 1320 bytes keeps the 8-byte
    alignment the addresses promise). Sized, the output has a tail to zero: by the scatter's
    own launch when uncapped, by a launch of its own when capped."""
    from flexdispatch import peer_ops

    rows, experts, topk = 200, 6, 3
    q, scales = ops.quantize_fp8(_fp8_rows(dtype, device, rows=rows, hidden=hidden))
    payload = torch.cat([q.view(torch.uint8), scales.view(torch.uint8)], dim=1)  # [R, H + H / 32]
    idx = random_indices(rows, experts, topk, seed=4, device=device)
    idx[::9] = -1  # rows no expert here takes: their address is 0, as for rows without a source
    addrs = _row_addrs(payload, torch.where((idx >= 0).any(1), torch.arange(rows, device=device), -1))
    p = random_probs(rows, topk, device=device)
    stand_in = torch.zeros((), dtype=dtype, device=device).expand(rows, hidden).requires_grad_()
    num_out = rows * topk + 11 if sized else None
    poison(device)
    out, out_p, plan = peer_ops.permute_fp8_from(stand_in, addrs, 8, idx, p, experts, num_out, 2,
                                                 max_blocks=max_blocks, first_row=first_row)
    tpe = plan.tokens_per_expert
    want, want_p, want_plan, want_tpe = ops.permute_fp8_by_indices(q, scales, idx, p, num_experts=experts,
                                                                    num_out_tokens=num_out, pad_multiple=2,
                                                                    dtype=dtype)
    assert torch.equal(out, want) and torch.equal(out_p, want_p) and torch.equal(tpe, want_tpe)
    assert torch.equal(out, reference.permute_fp8_by_indices(q, scales, idx, p, experts, num_out, 2, dtype)[0])
    assert_plans_equal(plan, want_plan)
    grad = random_tokens(out.shape[0], hidden, dtype, device=device)
    out.backward(grad)
    assert torch.equal(stand_in.grad, ops.unpermute(grad, want_plan))
    with pytest.raises(ValueError, match="aligned to"):
        peer_ops.permute_fp8_from(stand_in.detach(), addrs, 2, idx, p, experts)


@pytest.mark.parametrize("device", DEVICES)
def test_pack_parts_places_every_part_at_its_offset(device):
    """An exchange's parts in one launch: aligned ones as 16-byte vectors, a misaligned view
    and an odd size byte by byte, an empty part; bytes outside the parts untouched."""
    g = torch.Generator().manual_seed(5)
    raw = torch.randint(0, 256, (1000,), dtype=torch.uint8, generator=g).to(device)
    parts = [torch.randn(4, 9, generator=g).to(device), raw[1:38], torch.empty(0, 7, device=device),
             torch.arange(24, dtype=torch.int64, device=device).view(2, 12)]
    offsets = [0, 256, 512, 768]
    buffer = torch.full((1024 + 64,), 0xAB, dtype=torch.uint8, device=device)
    ops.load_kernels()
    _library.kernels().pack_parts(buffer, parts, offsets)
    want = torch.full_like(buffer, 0xAB)
    for part, offset in zip(parts, offsets):
        b = part.contiguous().view(torch.uint8).flatten()
        want[offset: offset + b.numel()] = b
    assert torch.equal(buffer, want)
    with pytest.raises(ValueError, match="does not fit"):
        _library.kernels().pack_parts(buffer, [parts[0]], [1024 + 64 - 8])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_peer_addresses_follow_the_block_layout(device, world):
    """The NVLink manager's addresses, one kernel per transfer, against the layout written out
    with torch ops (received rows by source, send lists by destination), on random counts with
    empty blocks, and past the real rows (worst-case sizes: address 0)."""
    from flexdispatch import peer_ops

    g = torch.Generator().manual_seed(world)
    counts = torch.randint(0, 6, (world, world), generator=g) * (torch.rand(world, world, generator=g) > 0.3)
    table = (torch.arange(1, world + 1) << 32) + torch.randint(0, 1 << 20, (world,), generator=g) * 16
    rb, extra = 48, 3
    for rank in range(world):
        recv_from, sent_to = counts[:, rank], counts[rank]
        recv_end, sent_end = torch.cumsum(recv_from, 0), torch.cumsum(sent_to, 0)
        their_off = torch.cumsum(counts, 1)[:, rank] - recv_from
        home_delta = torch.cumsum(counts, 0)[rank] - sent_to - (sent_end - sent_to)
        received, sent = int(recv_from.sum()) + extra, int(sent_to.sum()) + extra
        r = torch.arange(received)
        src = torch.searchsorted(recv_end, r, right=True)
        has, src = src < world, src.clamp(max=world - 1)
        meta_row = r - (recv_end - recv_from)[src] + their_off[src]
        tokens = torch.randint(0, 50, (received, 3), generator=g).double()
        i = torch.arange(sent)
        dest = torch.searchsorted(sent_end, i, right=True)
        real, dest = dest < world, dest.clamp(max=world - 1)
        tok = 7
        plan_map = torch.full((tok, world), -1, dtype=torch.int32)
        for w in range(world):  # tokens sent to w take rows sent_end[w] - sent_to[w] + 0, 1, ...
            chosen = torch.randperm(tok, generator=g)[: min(int(sent_to[w]), tok)].sort().values
            plan_map[chosen, w] = (sent_end[w] - sent_to[w] + torch.arange(len(chosen))).int()
        want = {
            peer_ops.RECEIVED: torch.where(has, table[src] + meta_row * rb, 0),
            peer_ops.RECEIVED_TOKEN: torch.where(has, table[src] + tokens[:, 0].long() * rb, 0),
            peer_ops.SENT: torch.where(real, table[dest] + (i + home_delta[dest]) * rb, 0),
            peer_ops.HOME: torch.where(plan_map >= 0, table + (plan_map.long() + home_delta) * rb, 0).flatten(),
        }
        args = dict(counts=counts.to(device), rank=rank, table=table.to(device), row_bytes=rb)
        got = {
            peer_ops.RECEIVED: peer_ops.peer_addresses(peer_ops.RECEIVED, n=received, **args),
            peer_ops.RECEIVED_TOKEN: peer_ops.peer_addresses(peer_ops.RECEIVED_TOKEN, n=received,
                                                             tokens=tokens.to(device), **args),
            peer_ops.SENT: peer_ops.peer_addresses(peer_ops.SENT, n=sent, **args),
            peer_ops.HOME: peer_ops.peer_addresses(peer_ops.HOME, n=tok * world, map=plan_map.to(device), **args),
        }
        for kind in want:
            assert torch.equal(got[kind].cpu(), want[kind]), (rank, kind)
        assert int((got[peer_ops.RECEIVED] == 0).sum()) == extra + int((table == 0).sum())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("pad,sized,first_row", [(None, False, 0), (4, False, 0), (None, True, 0), (4, True, 123)])
def test_permute_from_addresses_equals_permute_by_indices(device, pad, sized, first_row):
    from flexdispatch import peer_ops

    rows, hidden, experts, topk = 300, 96, 6, 3
    idx = random_indices(rows, experts, topk, seed=3, device=device)
    x = random_tokens(rows, hidden, torch.bfloat16, device=device)
    p = random_probs(rows, topk, device=device)
    num_out = rows * topk + experts * 3 if sized else None
    stand_in = torch.zeros((), dtype=x.dtype, device=device).expand(rows, hidden).requires_grad_()
    addrs = _row_addrs(x, torch.arange(rows, device=device))
    out, out_p, plan = peer_ops.permute_from(stand_in, addrs, 16, idx, p, experts, num_out, pad,
                                             first_row=first_row)
    ref, ref_p, ref_plan, ref_tpe = reference.permute_by_indices(x, idx, p, num_experts=experts,
                                                                 num_out_tokens=num_out, pad_multiple=pad)
    assert torch.equal(out, ref) and torch.equal(out_p, ref_p)
    assert_plans_equal(plan, ref_plan)
    grad = random_tokens(out.shape[0], hidden, torch.bfloat16, device=device)
    out.backward(grad)  # the stand-in gets the permutation's gather of the gradient
    assert torch.equal(stand_in.grad, reference.unpermute(grad, ref_plan))


_TEAM_PROBE = r"""
import os
import sys

import torch

import flexdispatch as fd
from flexdispatch import _library, ops

if _library.kernels() is None:  # (the plain PyTorch ops serve: FLEXDISPATCH_JIT=0)
    print("no kernels")
    sys.exit(0)


def threads():
    return len(os.listdir("/proc/self/task"))


def small_steps(tokens=64, hidden=128, experts=8, topk=2):
    # The local layer's forward and backward, then the FP8 ops, on a small batch. (No
    # torch.softmax: torch's own kernel starts a team for any size.)
    g = torch.Generator().manual_seed(0)
    cfg = fd.MoEConfig(num_moe_experts=experts, moe_router_topk=topk)
    d = fd.MoEFlexTokenDispatcher(experts, list(range(experts)), cfg, None)
    for _ in range(3):
        x = torch.randn(tokens, hidden, generator=g, requires_grad=True)
        weights = torch.rand(tokens, experts, generator=g) + 0.1
        probs = weights / weights.sum(-1, keepdim=True)
        rows, _, permuted_probs = d.token_permutation(x, tokens, probs)
        d.token_unpermutation(rows * permuted_probs[:, None]).sum().backward()
        q, scales = ops.quantize_fp8(x.detach()[:16])
        ops.dequantize_fp8(q, scales, torch.float32)


before = threads()
small_steps()
after_small = threads()
rows, experts = 4096, 8  # 4096 x 2 rows of 128 values: past the grain
tokens = torch.empty(rows, 128)
indices = (torch.arange(rows * 2) % experts).view(rows, 2)
ops.permute_by_indices(tokens, indices, num_experts=experts, num_out_tokens=rows * 2)
print(before, after_small, threads())
"""


def test_cpu_kernels_run_a_small_batch_on_the_calling_thread():
    """A small batch's CPU kernels start no OpenMP team: a team's workers spin after each region,
    and where ranks share a machine's cores (a CPU group) those spins starve the other ranks
    (docs/PERFORMANCE.md, "CPU groups"). A large batch
    still gets its team, which shows that the probe (the process's thread count) sees one."""
    import subprocess
    import sys

    if not Path("/proc/self/task").is_dir():
        pytest.skip("counts threads through /proc")
    # (two threads, on any machine; set before the process starts: torch.set_num_threads makes
    # the team at once, and OpenMP makes one lazily, at the first region that asks for it)
    env = dict(os.environ, OMP_NUM_THREADS="2")
    out = subprocess.run([sys.executable, "-c", _TEAM_PROBE], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    if out.stdout.strip().endswith("no kernels"):
        pytest.skip("the compiled kernels are off (FLEXDISPATCH_JIT=0)")
    before, after_small, after_large = map(int, out.stdout.split()[-3:])
    assert after_small == before, f"a small batch started {after_small - before} OpenMP worker(s)"
    assert after_large > after_small, "a large permutation ran without a team: the probe sees none"
