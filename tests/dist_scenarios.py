"""Scenarios run on every rank of a process group (see dist_pool.py), or on one process with
``group=None``. Each returns plain data for the test to assert on, or raises."""

import weakref

import torch
import torch.distributed as dist

import flexdispatch as fd
from flexdispatch import ops
from flexdispatch.managers.received import KeptFp8
from moe_math import TOLERANCE, apply_experts, capacity_drop, dense_layer, make_problem, rel_err

DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}


def _group():
    return dist.group.WORLD if dist.is_initialized() else None


def _dispatcher(rank, world, experts, topk, device="cpu", **config):
    local = experts // world
    cfg = fd.MoEConfig(num_moe_experts=experts, moe_router_topk=topk, **config)
    return fd.MoEFlexTokenDispatcher(local, list(range(rank * local, (rank + 1) * local)), cfg, _group())


def _routing(logits, topk, experts, capacity, router_dtype):
    probs = torch.softmax(logits, dim=-1)
    token_probs, token_indices = torch.topk(probs, topk, dim=-1)
    if capacity is not None:
        token_indices = capacity_drop(token_probs, token_indices, experts, capacity)
    return probs, token_probs, token_indices


def moe_matches_dense(rank, world, *, entry="probs", tokens_per_rank=None, hidden=16, experts=12, topk=3,
                      pad=None, capacity=None, router_dtype="fp32", dtype="float32", seed=0, device="cpu",
                      backend="auto", repeat=2, fp8=False, deepep=True):
    """A layer through the dispatcher against the dense formula: outputs and gradients of the
    hidden states, the router logits and the experts' weights. With ``fp8`` the dense formula
    sees every rank's tokens rounded through reference.quantize_fp8 / dequantize_fp8 (in the
    hidden dtype), with the identity as that rounding's gradient."""
    dtype = DTYPES[dtype]
    tokens_per_rank = tokens_per_rank or [20 + 7 * r for r in range(world)]
    xs, logits, weights = make_problem(seed, tokens_per_rank, hidden, experts)
    local = experts // world
    mine = slice(rank * local, (rank + 1) * local)
    d = _dispatcher(rank, world, experts, topk, moe_router_expert_pad_multiple=pad,
                    moe_expert_capacity_factor=capacity, moe_router_dtype=router_dtype, moe_flex_backend=backend,
                    moe_fp8_dispatch=fp8, moe_enable_deepep=deepep)

    outs = []
    for _ in range(repeat):  # the same bits every time
        x = xs[rank].to(dtype).to(device).reshape(-1, 1, hidden).requires_grad_()
        lg = logits[rank].to(device).clone().requires_grad_()
        w = weights[mine].to(dtype).to(device).clone().requires_grad_()
        probs, token_probs, token_indices = _routing(lg, topk, experts, None, router_dtype)
        if entry == "probs":
            tokens, tpe, pprobs = d.token_permutation(x, x.shape[0], probs)
        else:
            if capacity is not None:
                token_indices = capacity_drop(token_probs.detach(), token_indices, experts, capacity)
            tokens, tpe, pprobs = d.token_permutation2(x, x.shape[0], token_probs, token_indices)
        assert tokens.shape[0] == int(tpe.sum()), "rows produced must match tokens_per_expert"
        if pad:
            assert all(int(c) % pad == 0 for c in tpe)
        if router_dtype == "fp64":
            assert pprobs.dtype == torch.float64
        out = d.token_unpermutation(apply_experts(tokens, tpe, pprobs, w))
        assert out.shape == x.shape
        (out.double() * torch.cos(x.detach().double())).sum().backward()
        outs.append((out.detach().clone(), x.grad, lg.grad, w.grad))
    identical = all(torch.equal(a, b) for a, b in zip(outs[0], outs[-1]))

    # Dense: every rank's tokens, capacity applied per rank; loss = sum of every rank's loss.
    xd = [xi.clone().requires_grad_() for xi in xs]
    ld = [li.clone().requires_grad_() for li in logits]
    wd = weights.clone().requires_grad_()
    loss = 0
    dense_out = None
    for r in range(world):
        _, tp, ti = _routing(ld[r], topk, experts, capacity, router_dtype)
        xr = xd[r]
        if fp8:  # what the experts receive: the tokens rounded through FP8 (straight-through)
            xr = xr + (fd.reference.fp8_round_trip(xr.detach().to(dtype)).double() - xr.detach())
        o = dense_layer(xr, tp, ti, wd)
        loss = loss + (o * torch.cos(xd[r].detach())).sum()
        if r == rank:
            dense_out = o
    gx, gl, gw = torch.autograd.grad(loss, [xd[rank], ld[rank], wd])
    out, x_grad, lg_grad, w_grad = outs[-1]
    return {
        "output": rel_err(out.reshape(-1, hidden), dense_out), "grad_x": rel_err(x_grad.reshape(-1, hidden), gx),
        "grad_logits": rel_err(lg_grad, gl), "grad_experts": rel_err(w_grad, gw[mine]),
        "tolerance": TOLERANCE[dtype], "identical_reruns": identical, "backend": d.backend,
    }


def fp8_one_call_equals_steps(rank, world, device="cpu", backend="auto", dtype="float32", hidden=256, tokens=24):
    """FP8 dispatch through the one-call entry (the received FP8 rows dequantized inside the
    permutation) and through the three steps (dequantized first, then permuted): the same
    permuted rows, output and gradients, bit for bit."""
    experts, topk = 4 * world, 3
    dtype = DTYPES[dtype]
    xs, logits, weights = make_problem(11, [tokens] * world, hidden, experts)
    local = experts // world
    w = weights[rank * local:(rank + 1) * local].to(dtype).to(device)
    runs = []
    for one_call in (True, False):
        d = _dispatcher(rank, world, experts, topk, moe_flex_backend=backend, moe_fp8_dispatch=True,
                        moe_router_expert_pad_multiple=2)
        x = xs[rank].to(dtype).to(device).requires_grad_()
        tp, ti = torch.topk(torch.softmax(logits[rank].to(device), -1), topk)
        tp = tp.float().requires_grad_()
        if one_call:
            rows, tpe, pp = d.token_permutation2(x, tokens, tp, ti)
        else:
            h, _ = d.dispatch_preprocess2(x, tokens, tp, ti)
            h, _ = d.dispatch_all_to_all(h)
            rows, tpe, pp = d.dispatch_postprocess(h)
        out = d.token_unpermutation(apply_experts(rows, tpe, pp, w))
        out.float().square().sum().backward()
        runs.append((rows.detach(), out.detach(), x.grad, tp.grad))
    return {"equal": [torch.equal(a, b) for a, b in zip(*runs)], "backend": d.backend,
            "nonzero": all(float(t.abs().sum()) > 0 for t in runs[0] if t.numel())}


def fp8_experts_equal_the_dequantizing_path(rank, world, device="cpu", backend="auto", dtype="bfloat16",
                                           hidden=256, tokens=24, pad=2):
    """moe_fp8_experts: the FP8 rows and scales handed to the experts, dequantized, are the
    rows the dequantizing path gives, bit for bit (counts, probs and the layer's output too);
    hidden states that require a gradient on one rank make every rank raise, and the layer
    works afterwards."""
    experts, topk = 4 * world, 3
    dtype = DTYPES[dtype]
    xs, logits, weights = make_problem(13, [tokens + rank] * world, hidden, experts)
    local = experts // world
    w = weights[rank * local:(rank + 1) * local].to(dtype).to(device)
    x = xs[rank].to(dtype).to(device)
    tp, ti = torch.topk(torch.softmax(logits[rank].to(device), -1), topk)
    tp = tp.float()
    cfg = dict(moe_flex_backend=backend, moe_fp8_dispatch=True, moe_router_expert_pad_multiple=pad)
    plain = _dispatcher(rank, world, experts, topk, **cfg)
    fp8 = _dispatcher(rank, world, experts, topk, moe_fp8_experts=True, **cfg)
    with torch.no_grad():
        rows, tpe, pp = plain.token_permutation2(x, x.shape[0], tp, ti)
        out = plain.token_unpermutation(apply_experts(rows, tpe, pp, w))
        (q, scales), tpe8, pp8 = fp8.token_permutation2(x, x.shape[0], tp, ti)
        deq = ops.dequantize_fp8(q, scales, dtype)
        out8 = fp8.token_unpermutation(apply_experts(deq, tpe8, pp8, w))
    message = None
    try:
        fp8.token_permutation2(x.clone().requires_grad_(rank == world - 1), x.shape[0], tp, ti)
    except ValueError as exc:
        message = str(exc)
    with torch.no_grad():
        (q2, s2), _, pp2 = fp8.token_permutation2(x, x.shape[0], tp, ti)
        fp8.token_unpermutation(apply_experts(ops.dequantize_fp8(q2, s2, dtype), tpe8, pp2, w))
    return {"dtype": str(q.dtype), "shapes": (tuple(q.shape), tuple(scales.shape), tuple(rows.shape)),
            "rows": torch.equal(deq, rows), "tpe": torch.equal(tpe8, tpe), "probs": torch.equal(pp8, pp),
            "out": torch.equal(out8, out), "nonzero": float(out.abs().sum()) > 0, "message": message,
            "recovered": torch.equal(q2.view(torch.uint8), q.view(torch.uint8)), "backend": fp8.backend}


def fp8_kept_rows_misuse_then_recovery(rank, world, hidden=256, tokens=16, backend="alltoall"):
    """A manager asked to keep_fp8 raises ValueError (naming hidden_states) when its
    permutation gets another tensor than the stand-in dispatch returned, releases the call,
    and the next call runs normally and keeps the FP8 rows again. (The manager is driven
    directly: a backend named, since ``auto`` makes its manager at the first facade call.)"""
    experts, topk = 2 * world, 2
    d = _dispatcher(rank, world, experts, topk, moe_fp8_dispatch=True, moe_flex_backend=backend)
    m = d._comm_manager
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(tokens, hidden, generator=g)
    tp, ti = torch.topk(torch.softmax(torch.randn(tokens, experts, generator=g), -1), topk)
    m.set_routing(tp, ti)
    stand_in = m.dispatch(x, keep_fp8=True)
    kept = isinstance(m._dispatched.held, KeptFp8)
    message = None
    try:
        m.get_permuted_hidden_states_by_experts(stand_in.clone())
    except ValueError as exc:
        message = str(exc)
    m.set_routing(tp, ti)  # the failed call was released: a new one starts
    stand_in = m.dispatch(x, keep_fp8=True)
    rows, _ = m.get_permuted_hidden_states_by_experts(stand_in)
    out = m.combine(m.get_restored_hidden_states_by_experts(rows))
    return {"kept": kept, "message": message, "finite": bool(torch.isfinite(out).all()),
            "nonzero": float(out.abs().sum()) > 0}


def two_dispatchers_interleaved(rank, world, device="cpu", backend="auto", dtype="float32"):
    """Layers A and B in flight at once (dispatch A, dispatch B, combine B, combine A), with
    different E, K and H (B's rows are wider: a DeepEP buffer grows under A), each against
    its dense formula."""
    dtype = DTYPES[dtype]
    wide = 1024 if backend == "deepep" else 16  # DeepEP: rows of its verified widths
    specs = {"A": (4 * world, 2, wide, 1), "B": (3 * world, 3, wide + 16, 2)}
    state = {}
    for name, (experts, topk, hidden, seed) in specs.items():
        xs, logits, weights = make_problem(seed, [9 + 4 * r for r in range(world)], hidden, experts)
        d = _dispatcher(rank, world, experts, topk, moe_flex_backend=backend)
        local = experts // world
        w = weights[rank * local:(rank + 1) * local]
        _, tp, ti = _routing(logits[rank], topk, experts, None, "fp32")
        state[name] = dict(d=d, x=xs[rank].to(dtype).to(device), tp=tp.float().to(device), ti=ti.to(device),
                           w=w.to(dtype).to(device), dense=dense_layer(xs[rank], tp, ti, weights))
    a, b = state["A"], state["B"]
    ta = a["d"].token_permutation2(a["x"], a["x"].shape[0], a["tp"], a["ti"])
    tb = b["d"].token_permutation2(b["x"], b["x"].shape[0], b["tp"], b["ti"])
    out_b = b["d"].token_unpermutation(apply_experts(*tb, b["w"]))
    out_a = a["d"].token_unpermutation(apply_experts(*ta, a["w"]))
    return {"A": rel_err(out_a, a["dense"]), "B": rel_err(out_b, b["dense"])}


def auto_choice_is_voted(rank, world, hosts, refuse_on=-1):
    """``auto`` without DeepEP, with the NVLink backend's CUDA-only rule lifted (its CPU
    emulation runs here) and each rank's host name given by ``hosts``: every rank takes the
    same backend, NVLink only when all share one host and none refuses it (``refuse_on``: the
    rank whose probe says no), and the layer still equals its dense formula."""
    import dataclasses
    from unittest import mock

    from flexdispatch.managers import registry

    nvlink = registry.BACKENDS["nvlink"]
    refuse = (lambda g, **call: "refused by this rank") if rank == refuse_on else None
    patched = dict(registry.BACKENDS, nvlink=dataclasses.replace(nvlink, auto_probe=refuse))
    with mock.patch.dict(registry.BACKENDS, patched), \
            mock.patch("flexdispatch.dispatcher.socket.gethostname", return_value=hosts[rank]):
        experts, topk, hidden = 4 * world, 2, 16
        xs, logits, weights = make_problem(5, [7 + 3 * r for r in range(world)], hidden, experts)
        d = _dispatcher(rank, world, experts, topk, moe_enable_deepep=False)
        local = experts // world
        _, tp, ti = _routing(logits[rank], topk, experts, None, "fp32")
        x = xs[rank].float()
        out = d.token_unpermutation(apply_experts(*d.token_permutation2(x, x.shape[0], tp.float(), ti),
                                                  weights[rank * local:(rank + 1) * local].float()))
        return {"backend": d.backend, "err": rel_err(out, dense_layer(xs[rank], tp, ti, weights))}


def works_without_numpy(rank, world, device="cpu"):
    """The collectives of a layer's first call (auto's vote) and the objects helper work with
    ``Tensor.numpy`` unavailable, as where NumPy is not installed (``pip install flexdispatch``
    does not bring it; ``all_gather_object`` needs it). On NCCL (``device="cuda"``) they
    all-gather CUDA tensors."""
    from unittest import mock

    from flexdispatch.managers.gather import all_gather_objects

    def no_numpy(*args, **kwargs):
        raise RuntimeError("Numpy is not available")

    with mock.patch.object(torch.Tensor, "numpy", no_numpy):
        objects = all_gather_objects({"rank": rank, "name": "x" * (3 * rank + 1)}, _group())
        res = moe_matches_dense(rank, world, repeat=1, device=device)
    return {"objects": objects, "backend": res["backend"], "dense": res}


def invalid_routing_all_ranks_raise(rank, world, bad_rank=0, device="cpu", backend="auto", dtype="float32",
                                    bad="index", fp8=False, widen_first=0):
    """A bad index (or, ``bad="probs_shape"``, probs of a wrong shape: a check on the host) on
    one rank: every rank raises ValueError, nobody hangs, and the dispatcher works again
    afterwards. ``widen_first``: a layer of that hidden size runs once before (on DeepEP it
    widens the group's shared buffer)."""
    experts, topk = 4 * world, 2
    if widen_first:
        w = _dispatcher(rank, world, experts, topk, moe_flex_backend=backend)
        xw = torch.randn(6, widen_first).to(DTYPES[dtype]).to(device)
        pw, iw = torch.topk(torch.rand(6, experts, device=device), topk)
        rows, _, wp = w.token_permutation2(xw, 6, pw, iw)
        w.token_unpermutation((rows * wp[:, None]).to(rows.dtype))
    d = _dispatcher(rank, world, experts, topk, moe_flex_backend=backend, moe_fp8_dispatch=fp8)
    hidden = 1024 if backend == "deepep" else (128 if fp8 else 16)  # DeepEP: rows of its verified widths
    x = torch.randn(6, hidden).to(DTYPES[dtype]).to(device)
    tp, ti = torch.topk(torch.rand(6, experts, device=device), topk)
    bad_probs, bad_indices = tp, ti.clone()
    if rank == bad_rank and bad == "index":
        bad_indices[2, 1] = experts + 3
    elif rank == bad_rank:
        bad_probs = tp[:, :1]
    message = None
    try:
        d.token_permutation2(x, 6, bad_probs, bad_indices)
    except ValueError as exc:
        message = str(exc)
    tokens, tpe, pprobs = d.token_permutation2(x, 6, tp, ti)
    out = d.token_unpermutation((tokens * pprobs[:, None]).to(tokens.dtype))
    return {"message": message, "recovered": tuple(out.shape) == (6, hidden)}


def out_of_order_steps(rank, world):
    """Steps called out of order raise RuntimeError naming, in the dispatcher's terms, the method
    called and the one expected (no collective): a combine with no call open, a permutation
    before the transfer, and token_permutation twice without token_unpermutation."""
    d = _dispatcher(rank, world, 2 * world, 2)
    messages = []
    probs = torch.rand(3, 2 * world)
    for call in (lambda: d.combine_preprocess(torch.zeros(1, 4)),
                 lambda: (d.dispatch_preprocess(torch.zeros(3, 4), 3, probs),
                          d.dispatch_postprocess(torch.zeros(3, 4))),
                 lambda: (d.reset(), d.token_permutation(torch.zeros(3, 4), 3, probs),
                          d.token_permutation(torch.zeros(3, 4), 3, probs))):
        try:
            call()
        except RuntimeError as exc:
            messages.append(str(exc))
    d.reset()
    return messages


def metadata_released(rank, world):
    """After combine (and backward) the dispatcher holds no per-call tensor."""
    experts = 2 * world
    d = _dispatcher(rank, world, experts, 2)
    x = torch.randn(10, 8, requires_grad=True)
    probs = torch.softmax(torch.randn(10, experts, requires_grad=True), -1)
    tokens, tpe, pprobs = d.token_permutation(x, 10, probs)
    m = d._comm_manager
    probe = weakref.ref(m.dispatched_probs)
    out = d.token_unpermutation(tokens * pprobs[:, None])
    out.sum().backward()
    del tokens, pprobs, out
    held = {name: getattr(m, name) is not None
            for name in ("token_probs", "token_indices", "dispatched_indices", "dispatched_probs", "handle", "_plan")}
    return {"held": held, "freed": probe() is None}


def constructor_errors(rank, world):
    """Bad constructor arguments raise ValueError naming the argument (no collective)."""
    group = _group()
    messages = {}
    attempts = {
        "num_local_experts": lambda: fd.MoEFlexTokenDispatcher(
            3, [0, 1, 2], fd.MoEConfig(num_moe_experts=4 * world), group),
        "local_expert_indices": lambda: fd.MoEFlexTokenDispatcher(
            4, [100, 101, 102, 103], fd.MoEConfig(num_moe_experts=4 * world), group),
        "divisible": lambda: fd.MoEFlexTokenDispatcher(
            1, [rank], fd.MoEConfig(num_moe_experts=world + 1, moe_router_topk=1), group),
        "local_backend": lambda: _dispatcher(rank, world, 2 * world, 1, moe_flex_backend="local"),
        "sync_free_alltoall": lambda: _dispatcher(rank, world, 2 * world, 1, moe_flex_backend="alltoall",
                                                  moe_sync_free=True),
    }
    for name, make in attempts.items():
        try:
            make()
            messages[name] = None
        except ValueError as exc:
            messages[name] = str(exc)
    return messages


# ---- GPU scenarios ------------------------------------------------------------------------------


def _layer_inputs(rank, world, tokens, hidden, experts, topk, seed=0):
    xs, logits, weights = make_problem(seed, [tokens] * world, hidden, experts)
    probs = torch.softmax(logits[rank], -1)
    tp, ti = torch.topk(probs, topk)
    local = experts // world
    return xs[rank], tp, ti, weights[rank * local:(rank + 1) * local], (xs, logits, weights)


def deepep_matches_alltoall(rank, world, tokens=256, hidden=1024, experts=None, topk=4, pad=None):
    """The same bf16 inputs through DeepEP and through NCCL all-to-all: identical permuted
    rows and counts, outputs and gradients within bf16 rounding."""
    experts = experts or 8 * world
    x0, tp, ti, w0, _ = _layer_inputs(rank, world, tokens, hidden, experts, topk)
    results = {}
    for backend in ("deepep", "alltoall"):
        d = _dispatcher(rank, world, experts, topk, moe_flex_backend=backend, moe_router_expert_pad_multiple=pad)
        x = x0.to(torch.bfloat16).cuda().requires_grad_()
        p = tp.float().cuda().requires_grad_()
        w = w0.to(torch.bfloat16).cuda()
        tokens_, tpe, pprobs = d.token_permutation2(x, tokens, p, ti.cuda())
        out = d.token_unpermutation(apply_experts(tokens_, tpe, pprobs, w))
        out.float().square().sum().backward()
        results[backend] = dict(tokens=tokens_.detach(), tpe=tpe.cpu(), out=out.detach(), gx=x.grad, gp=p.grad,
                                backend=d.backend)
    a, b = results["deepep"], results["alltoall"]
    return {"backends": (a["backend"], b["backend"]), "same_tokens": torch.equal(a["tokens"], b["tokens"]),
            "same_counts": torch.equal(a["tpe"], b["tpe"]), "out": rel_err(a["out"], b["out"]),
            "grad_x": rel_err(a["gx"], b["gx"]), "grad_probs": rel_err(a["gp"], b["gp"])}


def async_overlap(rank, world, backend="deepep", tokens=256, hidden=1024, topk=4):
    """async_finish: work issued between dispatch and the next step overlaps with the
    transfer; the next step waits, so results equal the synchronous run bit for bit."""
    experts = 4 * world
    x0, tp, ti, w0, _ = _layer_inputs(rank, world, tokens, hidden, experts, topk, seed=5)
    x, p, ti, w = x0.to(torch.bfloat16).cuda(), tp.float().cuda(), ti.cuda(), w0.to(torch.bfloat16).cuda()
    shared = torch.randn(hidden, hidden, device="cuda", dtype=torch.bfloat16)
    outs = {}
    for async_finish in (False, True):
        d = _dispatcher(rank, world, experts, topk, moe_flex_backend=backend)
        h, _ = d.dispatch_preprocess2(x, tokens, p, ti)
        h, _ = d.dispatch_all_to_all(h, async_finish=async_finish, allocate_on_comm_stream=async_finish)
        side = (x @ shared).float().sum()  # overlaps with the transfer when async
        t, tpe, pp = d.dispatch_postprocess(h)
        y = d.combine_preprocess(apply_experts(t, tpe, pp, w))
        y = d.combine_all_to_all(y, async_finish=async_finish, allocate_on_comm_stream=async_finish)
        outs[async_finish] = (d.combine_postprocess(y).clone(), float(side))
    return {"identical": torch.equal(outs[False][0], outs[True][0]), "side": outs[True][1] == outs[False][1]}


def _graph_layer(d, x, probs, scale, tokens):
    """A layer with nothing that syncs (per-row expert found on the device, a per-expert
    scale), dispatch and combine async as the reference's defaults are (stream-ordered inside
    a graph capture); returns every stage's tensor, the output last."""
    h, _ = d.dispatch_preprocess(x, tokens, probs)
    recv, _ = d.dispatch_all_to_all(h)
    recv_idx, recv_probs = d._comm_manager.get_dispached_metadata()
    t, tpe, pp = d.dispatch_postprocess(recv)
    ends = torch.cumsum(tpe.to(t.device), 0)  # on the GPU when sync-free, on the host otherwise
    row_expert = torch.searchsorted(ends, torch.arange(t.shape[0], device=t.device), right=True)
    row_scale = scale[row_expert.clamp(max=scale.shape[0] - 1)]
    restored = d.combine_preprocess(t * (row_scale * pp)[:, None].to(t.dtype))
    out = d.combine_postprocess(d.combine_all_to_all(restored))
    return dict(recv=recv, recv_idx=recv_idx, recv_probs=recv_probs, rows=t, tpe=tpe, probs=pp, restored=restored,
                out=out)


def _stage_errors(a, b):
    """Relative error of every stage of two runs of _graph_layer on the same inputs (rows
    compared over the first rows both hold: worst-case sizes differ from exact ones)."""
    errors = {}
    for key, x in a.items():
        y = b[key]
        n = min(x.shape[0], y.shape[0])
        x, y = x[:n], y[:n]
        errors[key] = float((x != y).any()) if not x.is_floating_point() else rel_err(x.float(), y.float())
    return errors


def cuda_graph_sync_free(rank, world, backend="auto", tokens=128, hidden=1024, topk=4):
    """moe_sync_free: one layer forward captured in a CUDA graph and replayed on new inputs
    gives the eager results; every stage is compared, and the eager sync-free run against an
    eager run that sizes exactly."""
    experts = 4 * world
    d = _dispatcher(rank, world, experts, topk, moe_flex_backend=backend, moe_sync_free=True,
                    moe_router_expert_pad_multiple=2)
    exact = _dispatcher(rank, world, experts, topk, moe_flex_backend=backend if world > 1 else "local",
                        moe_router_expert_pad_multiple=2)
    local = experts // world
    scale = torch.linspace(0.5, 1.5, experts, device="cuda")[rank * local:(rank + 1) * local]
    g = torch.Generator(device="cuda").manual_seed(100 + rank)

    def inputs():
        x = torch.randn(tokens, hidden, device="cuda", generator=g).to(torch.bfloat16)
        return x, torch.softmax(torch.randn(tokens, experts, device="cuda", generator=g), -1)

    static_x, static_p = inputs()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm up: buffers, allocator pools
            _graph_layer(d, static_x, static_p, scale, tokens)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = _graph_layer(d, static_x, static_p, scale, tokens)
    errors, stages, eager_vs_exact = [], [], []
    for _ in range(3):
        x, p = inputs()
        static_x.copy_(x)
        static_p.copy_(p)
        graph.replay()
        eager = _graph_layer(d, x, p, scale, tokens)
        sized = _graph_layer(exact, x, p, scale, tokens)
        torch.cuda.synchronize()
        errors.append(rel_err(static["out"], eager["out"]))
        stages.append(_stage_errors(static, eager))
        eager_vs_exact.append(rel_err(eager["out"], sized["out"]))
    return {"errors": errors, "backend": d.backend, "stages": stages, "eager_vs_exact": eager_vs_exact}


def _trained_layer(d, x, logits, scale, tokens, grad_out):
    """Forward and backward of a layer with nothing that syncs: softmax router, dispatch,
    experts ``tanh(row) * scale[expert] * prob`` (the expert found on the device), combine,
    then the gradients of the tokens and the router logits for ``grad_out``."""
    probs = torch.softmax(logits, -1)
    h, _ = d.dispatch_preprocess(x, tokens, probs)
    recv, _ = d.dispatch_all_to_all(h)
    t, tpe, pp = d.dispatch_postprocess(recv)
    ends = torch.cumsum(tpe.to(t.device), 0)
    row_expert = torch.searchsorted(ends, torch.arange(t.shape[0], device=t.device), right=True)
    y = torch.tanh(t.float()) * (scale[row_expert.clamp(max=scale.shape[0] - 1)] * pp)[:, None]
    out = d.combine_postprocess(d.combine_all_to_all(d.combine_preprocess(y.to(t.dtype))))
    grad_x, grad_logits = torch.autograd.grad(out, (x, logits), grad_out)
    return dict(out=out, grad_x=grad_x, grad_logits=grad_logits)


def cuda_graph_fwd_bwd(rank, world, backend="auto", tokens=128, hidden=1024, topk=4, bound=None, fp8=False,
                       replays=3):
    """moe_sync_free: forward and backward of a layer captured in one CUDA graph, replayed on
    new inputs, equal bit for bit to the eager run of the same dispatcher on those inputs
    (optionally with ``moe_max_tokens_per_expert=bound`` and FP8 dispatch)."""
    experts = 4 * world
    d = _dispatcher(rank, world, experts, topk, moe_flex_backend=backend, moe_sync_free=True,
                    moe_router_expert_pad_multiple=2, moe_max_tokens_per_expert=bound, moe_fp8_dispatch=fp8,
                    moe_dropped_tokens="ignore")
    local = experts // world
    scale = torch.linspace(0.5, 1.5, experts, device="cuda")[rank * local:(rank + 1) * local]
    g = torch.Generator(device="cuda").manual_seed(300 + rank)

    def inputs():
        x = torch.randn(tokens, hidden, device="cuda", generator=g).to(torch.bfloat16)
        logits = torch.randn(tokens, experts, device="cuda", generator=g) * 2
        return x, logits, torch.randn(tokens, hidden, device="cuda", generator=g).to(torch.bfloat16)

    sx, sl, sg = inputs()
    sx.requires_grad_()
    sl.requires_grad_()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm up: buffers, allocator pools, autograd's streams
            _trained_layer(d, sx, sl, scale, tokens, sg)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static = _trained_layer(d, sx, sl, scale, tokens, sg)
    same, norms, dropped = [], [], []
    for _ in range(replays):
        x, logits, grad = inputs()
        with torch.no_grad():
            sx.copy_(x)
            sl.copy_(logits)
            sg.copy_(grad)
        before = d.report_dropped_tokens() if bound else 0  # noqa: F841 - clears the count
        graph.replay()
        replayed = d.report_dropped_tokens() if bound else 0
        eager = _trained_layer(d, x.requires_grad_(), logits.requires_grad_(), scale, tokens, grad)
        torch.cuda.synchronize()
        same.append({k: torch.equal(static[k], eager[k]) for k in static})
        norms.append({k: float(v.float().norm()) for k, v in eager.items()})
        dropped.append((replayed, d.report_dropped_tokens() if bound else 0))
    return {"same": same, "norms": norms, "dropped": dropped, "backend": d.backend}


def deepep_stage_diff(rank, world, tokens=512, hidden=128, topk=4, async_finish=False):  # noqa: PLR0913
    """DeepEP against NCCL all-to-all stage by stage on the same bf16 inputs (experts: rows
    times probs), and both against ``x[t] * sum of its probs``: where do they part?"""
    experts = 4 * world
    x0, tp, ti, _, _ = _layer_inputs(rank, world, tokens, hidden, experts, topk, seed=9)
    x, p, ti = x0.to(torch.bfloat16).cuda(), tp.float().cuda(), ti.cuda()
    stages = {}
    for backend in ("deepep", "alltoall"):
        d = _dispatcher(rank, world, experts, topk, moe_flex_backend=backend)
        h, _ = d.dispatch_preprocess2(x, tokens, p, ti)
        recv, _ = d.dispatch_all_to_all(h, async_finish=async_finish, allocate_on_comm_stream=async_finish)
        rows, tpe, pp = d.dispatch_postprocess(recv)
        restored = d.combine_preprocess((rows * pp[:, None]).to(rows.dtype))
        combined = d.combine_all_to_all(restored, async_finish=async_finish, allocate_on_comm_stream=async_finish)
        out = d.combine_postprocess(combined)
        torch.cuda.synchronize()
        stages[backend] = dict(recv=recv.clone(), rows=rows.clone(), tpe=tpe.clone(), restored=restored.clone(),
                               out=out.clone())
    a, b = stages["deepep"], stages["alltoall"]
    expected = (x.float() * p.sum(1, keepdim=True))
    return {"tokens": tokens, "hidden": hidden, "async": async_finish,
            "recv_equal": torch.equal(a["recv"], b["recv"]), "rows_equal": torch.equal(a["rows"], b["rows"]),
            "tpe_equal": torch.equal(a["tpe"], b["tpe"]), "restored_equal": torch.equal(a["restored"], b["restored"]),
            "deepep_out_err": rel_err(a["out"].float(), expected), "alltoall_out_err": rel_err(b["out"].float(), expected),
            "nan_rows_deepep": int(torch.isnan(a["out"].float()).any(1).sum())}


def stateful_programs(rank, world, seeds, steps, device="cpu", backend="auto", **options):
    """Run the stateful programs of ``seeds`` (tests/stateful.py) on this rank; returns, per
    program, the steps and checks done, the steps at which this rank raised and, with an
    engine stand-in (``options["engine"]``), how often it was called."""
    import engine_standins
    import stateful

    results = []
    with engine_standins.installed(options.get("engine")):
        for seed in seeds:
            engine_standins.CALLS.clear()
            program = stateful.generate_program(seed, world, steps, **options)
            res = stateful.Runner(program, rank, _group(), device=device, backend=backend).run()
            results.append({"seed": seed, "steps": res["steps"], "checks": res["checks"],
                            "raised_at": [s for s, _ in res["raised"]], "engine_calls": dict(engine_standins.CALLS)})
    return results


def _scaled_experts(rows, tokens_per_expert, probs, scale):
    """Cheap experts for wide rows: each row times its expert's scale and its prob."""
    ends = torch.cumsum(tokens_per_expert.to(rows.device), 0)
    expert = torch.searchsorted(ends, torch.arange(rows.shape[0], device=rows.device), right=True)
    return rows * (scale[expert.clamp(max=scale.shape[0] - 1)] * probs).to(rows.dtype)[:, None]


def backends_bitwise_equal(rank, world, backends=("alltoall", "nvlink"), device="cpu", dtype="float32", tokens=48,
                           hidden=64, topk=3, pad=None, fp8=False, steps=3, transport=None, max_blocks=0):
    """The same inputs through two backends, in the one-call entry points and in the step-by-step
    API, for a few calls: the same bits everywhere (received rows, permuted rows, counts, probs,
    output, gradients of the tokens, the probs and the experts' scales). Tokens differ per rank
    and call (rank 0 has none at the second call). ``max_blocks``: moe_nvlink_max_blocks (the
    transfer kernels then stride over the rows). Returns the names of what differed (empty:
    none)."""
    import os

    if transport == "gather":  # the NVLink manager's gather transport, also on NCCL
        os.environ["FLEXDISPATCH_TESTING"] = "nvlink_transport=gather"
    else:
        os.environ.pop("FLEXDISPATCH_TESTING", None)
    dtype_ = DTYPES[dtype]
    experts = 4 * world if topk <= 4 else 8 * world
    local = experts // world
    dev = torch.device(device)
    runs = {}
    for backend in backends:
        d = _dispatcher(rank, world, experts, topk, moe_flex_backend=backend, moe_router_expert_pad_multiple=pad,
                        moe_fp8_dispatch=fp8, moe_nvlink_max_blocks=max_blocks)
        seen = []
        for step in range(steps):
            count = 0 if (rank == 0 and step == 1) else tokens + 5 * rank + step
            g = torch.Generator().manual_seed(1000 * step + rank)
            x = torch.randn(count, hidden, generator=g).to(dtype_).to(dev).requires_grad_()
            tp, ti = torch.topk(torch.softmax(torch.randn(count, experts, generator=g) * 2, -1), topk)
            p = tp.float().to(dev).requires_grad_()
            scale = torch.linspace(0.5, 1.5, local).to(dev).requires_grad_()
            if step % 2 == 0:  # one call each way (the NVLink manager reads rows in the permutation)
                rows, tpe, pp = d.token_permutation2(x, count, p, ti.to(dev))
                recv = rows.new_zeros(0)
            else:  # the steps
                h, _ = d.dispatch_preprocess2(x, count, p, ti.to(dev))
                recv, _ = d.dispatch_all_to_all(h)
                rows, tpe, pp = d.dispatch_postprocess(recv)
            y = _scaled_experts(rows, tpe, pp, scale)
            if step % 2 == 0:
                out = d.token_unpermutation(y)
            else:
                out = d.combine_postprocess(d.combine_all_to_all(d.combine_preprocess(y)))
            (out.double() * torch.cos(x.detach().double())).sum().backward()
            seen.append({"recv": recv.detach(), "rows": rows.detach(), "tpe": tpe.cpu(), "probs": pp.detach(),
                         "out": out.detach(), "gx": x.grad, "gp": p.grad, "gw": scale.grad})
        runs[backend] = (d.backend, seen)
    (name_a, a), (name_b, b) = runs[backends[0]], runs[backends[1]]
    differ = [f"step {s}: {k}" for s, (ra, rb) in enumerate(zip(a, b)) for k in ra
              if not torch.equal(ra[k].cpu(), rb[k].cpu())]
    nonzero = all(float(r["out"].float().abs().sum()) > 0 for r in a if r["out"].numel())
    return {"backends": (name_a, name_b), "differ": differ, "nonzero": nonzero}


def _report_then_recover(d) -> "str | None":
    """What report_dropped_tokens raises (None: nothing), then reset() and shutdown(), as its
    message asks every rank to do."""
    try:
        d.report_dropped_tokens()
        message = None
    except RuntimeError as exc:
        message = str(exc)
    d.reset()
    fd.shutdown()
    return message


def nvlink_sync_free_fault(rank, world, device="cpu", hidden=32, topk=2):
    """Sync-free NVLink layer: a call whose ranks pass different token counts moves no token
    (found on the device, no sync), report_dropped_tokens then raises on every rank; after
    reset() and shutdown() on every rank the next calls are right again (checked against the
    step-by-step all-to-all results of the same inputs)."""
    experts = 2 * world
    d = _dispatcher(rank, world, experts, topk, moe_flex_backend="nvlink", moe_sync_free=True)
    exact = _dispatcher(rank, world, experts, topk, moe_flex_backend="alltoall")
    dev = torch.device(device)

    def call(disp, tokens, seed):
        x0, tp, ti, w0, _ = _layer_inputs(rank, world, tokens, hidden, experts, topk, seed=seed)
        rows, _, pp = disp.token_permutation2(x0.to(dev), tokens, tp.float().to(dev), ti.to(dev))
        return disp.token_unpermutation(rows * pp[:, None].to(rows.dtype))  # (worst-case rows: no counts)

    out_bad = call(d, 12 + rank, 1)  # different T on every rank
    message = _report_then_recover(d)
    errors = []
    for seed in (2, 3):
        out, want = call(d, 16, seed), call(exact, 16, seed)
        errors.append(float((out - want).abs().max()))
    d.report_dropped_tokens()  # nothing to report now
    return {"message": message, "bad_is_zero": bool((out_bad == 0).all()), "errors": errors}


def die_on(rank, world, dying_rank=1, code=3):
    """One rank exits at once (as a crash would); the others wait in a collective."""
    import os

    if rank == dying_rank:
        os._exit(code)
    dist.barrier()
    return "unreachable"


def peer_headers_equal_all_gather(rank, world, steps=60, seed=0):
    """The DeepEP manager's header exchange through symmetric memory (one kernel) against the
    NCCL path it replaces (header kernel, all-gather, mask), over many exchanges of one group:
    random headers that agree, disagree or carry error bits on one rank, route status words,
    both index dtypes, index counts from none to more than the kernel's 128 blocks cover in one
    pass. Returns the steps whose masked indices or gathered headers differed."""
    from flexdispatch.managers import agreement, peer_headers

    device = torch.device("cuda", torch.cuda.current_device())
    slots = peer_headers.PeerHeaders(dist.group.WORLD, device)
    g = torch.Generator().manual_seed(seed)  # the same draws on every rank
    differ, kinds = [], set()
    gathered = torch.zeros(world, agreement.WIDTH, dtype=torch.int64, pin_memory=True)
    for step in range(steps):
        kind = int(torch.randint(0, 4, (1,), generator=g))  # 0 agree, 1 field differs, 2 error bit, 3 route status
        odd = int(torch.randint(0, world, (1,), generator=g))
        n = [0, 7, 4096, 128 * 256 * 3 + 5][int(torch.randint(0, 4, (1,), generator=g))]
        values = [int(v) for v in torch.randint(0, 1 << 40, (agreement.WIDTH,), generator=g)]
        values[agreement.ERROR] = 0
        if rank == odd and kind == 1:
            values[int(torch.randint(agreement.PHASE, agreement.WIDTH, (1,), generator=g))] += 1
        if rank == odd and kind == 2:
            values[agreement.ERROR] = agreement.INPUT_ERROR
        status = torch.zeros(2, dtype=torch.int32, device=device)
        if rank == odd and kind == 3:
            status[0] = 8
        indices = torch.randint(-1, 64, (n,), device=device, generator=torch.Generator(device).manual_seed(step))
        dtype = (torch.int32, torch.int64)[step % 2]
        got = slots.exchange(values, status, indices, dtype, gathered)
        want_headers = torch.empty(world, agreement.WIDTH, dtype=torch.int64, device=device)
        dist.all_gather_into_tensor(want_headers, ops.make_header(indices, values, status))
        want = ops.mask_unless_agreed(want_headers, indices, dtype)
        torch.cuda.synchronize()
        same = got.dtype == dtype and torch.equal(got, want) and torch.equal(gathered, want_headers.cpu())
        if not same:
            differ.append(step)
        kinds.add((kind, bool((want < 0).all()) if n else None))
    slots.release()
    return {"differ": differ, "kinds": sorted(kinds, key=str), "steps": steps}


def peer_header_wait_traps(rank, world, timeout_s=2.0):
    """Rank 0 exchanges a header its peers never send: its kernel must trap once the peer
    timeout has passed (a CUDA error on rank 0, not a hang). The peers return at once. Rank 0's
    CUDA context is unusable afterwards: run this in a pool of its own."""
    import os
    import time

    from flexdispatch.managers import agreement, peer_headers

    os.environ["FLEXDISPATCH_PEER_TIMEOUT_S"] = str(timeout_s)
    device = torch.device("cuda", torch.cuda.current_device())
    slots = peer_headers.PeerHeaders(dist.group.WORLD, device)  # (collective; not in the registry)
    torch.cuda.synchronize()
    dist.barrier()
    if rank != 0:
        return {"error": None, "waited": 0.0}
    gathered = torch.zeros(world, agreement.WIDTH, dtype=torch.int64, pin_memory=True)
    start = time.monotonic()
    try:
        slots.exchange([0] * agreement.WIDTH, None, torch.zeros(4, dtype=torch.int64, device=device), torch.int64,
                       gathered)
        torch.cuda.synchronize()
        error = None
    except RuntimeError as exc:
        error = str(exc)
    return {"error": error, "waited": time.monotonic() - start}


def automodel_moe_module(rank, world, backend="auto", steps=4, tokens=12, dim=16, inter=8, experts=8, topk=2):
    """NeMo Automodel's expert-parallel MoE module (``GroupedExpertsDeepEP``, its own code) with
    its ``token_dispatcher`` module aliased to flexdispatch, forward and backward over ``steps``
    steps of changing token counts and masks, against the dense float64 layer on every rank's
    inputs. Only the expert math (``_torch_mm_experts_fwd``: torch._grouped_mm, which has no CPU
    backward, and a torch.compile'd activation) is replaced, by the same formula in a loop;
    the dispatch path is Automodel's module calling flexdispatch. ``backend`` is what Automodel
    passes as ``dispatcher_backend``: flexdispatch's names, or "uccl_ep" / "hybridep" on their
    stand-ins (tests/engine_standins.py)."""
    import os
    import sys
    from unittest import mock

    import engine_standins
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard
    from torch.nn import functional as F

    sys.modules["nemo_automodel.components.moe.megatron.token_dispatcher"] = fd
    from nemo_automodel.components.moe import experts as am_experts
    from nemo_automodel.components.moe.config import MoEConfig as AutomodelMoEConfig

    assert am_experts.MoEFlexTokenDispatcher is fd.MoEFlexTokenDispatcher  # (the alias took)

    def experts_fwd(hidden, gate_up, down, tokens_per_expert, probs, activation, use_mxfp8=False):
        outs, start = [], 0
        for e, n in enumerate(tokens_per_expert.tolist()):
            h = hidden[start:start + n] @ gate_up[e]
            a, b = h.chunk(2, -1)
            outs.append(((F.silu(a) * b) * probs[start:start + n]) @ down[e])
            start += n
        return torch.cat(outs) if outs else hidden.new_zeros(0, down.shape[-1])

    am_experts._torch_mm_experts_fwd = experts_fwd
    cfg = AutomodelMoEConfig(n_routed_experts=experts, n_shared_experts=0, n_activated_experts=topk,
                             n_expert_groups=1, n_limited_groups=1, train_gate=True, gate_bias_update_factor=0.0,
                             aux_loss_coeff=0.0, score_func="softmax", route_scale=1.0, dim=dim, inter_dim=2 * inter,
                             moe_inter_dim=inter, norm_topk_prob=False, dtype=torch.float32)
    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("ep",))
    g = torch.Generator().manual_seed(11)
    gate_up = torch.randn(experts, dim, 2 * inter, generator=g, dtype=torch.float64) / dim ** 0.5
    down = torch.randn(experts, inter, dim, generator=g, dtype=torch.float64) / inter ** 0.5
    local = experts // world
    mine = slice(rank * local, (rank + 1) * local)
    # "uccl_ep+env": the README's recipe without any engine: dispatcher uccl_ep, FLEXDISPATCH_BACKEND=auto.
    recipe = backend == "uccl_ep+env"
    engine = backend if backend in ("uccl_ep", "hybridep") else None
    errors = {}
    fd.dispatcher.forget_shared_managers()  # (a pool runs several of these)
    env = {"FLEXDISPATCH_BACKEND": "auto"} if recipe else {}
    with mock.patch.dict(os.environ, env), engine_standins.installed(engine):  # (restored on errors too)
        engine_standins.CALLS.clear()
        module = am_experts.GroupedExpertsDeepEP(cfg, backend=None, dispatcher_backend="uccl_ep" if recipe else backend)
        module.gate_and_up_projs = torch.nn.Parameter(DTensor.from_local(gate_up[mine].float().clone(), mesh, [Shard(0)]))
        module.down_projs = torch.nn.Parameter(DTensor.from_local(down[mine].float().clone(), mesh, [Shard(0)]))
        module.init_token_dispatcher(mesh)
        for step in range(steps):
            gs = torch.Generator().manual_seed(100 + step)
            counts = [tokens + 3 * ((r + step) % 3) - (4 if step == 2 and r == 0 else 0) for r in range(world)]
            inputs = []
            for t in counts:
                x = torch.randn(t, dim, generator=gs, dtype=torch.float64)
                w, i = torch.topk(torch.softmax(torch.randn(t, experts, generator=gs, dtype=torch.float64), -1), topk)
                mask = torch.rand(t, generator=gs) > 0.15
                inputs.append((x, w, i, mask, torch.randn(t, dim, generator=gs, dtype=torch.float64)))
            x, w, i, mask, grad = inputs[rank]
            xl, wl = x.float().requires_grad_(), w.float().requires_grad_()
            module.gate_and_up_projs.grad = module.down_projs.grad = None
            out = module(xl, mask, wl, i)
            (out * grad.float()).sum().backward()
            # The dense layer on every rank's tokens, float64.
            gu, dn = gate_up.clone().requires_grad_(), down.clone().requires_grad_()
            loss, leaves = 0, None
            for r, (xr, wr, ir, mr, gr) in enumerate(inputs):
                xr, wr = xr.clone().requires_grad_(), wr.clone().requires_grad_()
                y = torch.zeros_like(xr)
                for k in range(topk):
                    h = torch.einsum("th,thi->ti", xr, gu[ir[:, k]])
                    a, b = h.chunk(2, -1)
                    act = F.silu(a) * b * wr[:, k, None]
                    y = y + torch.where(mr[:, None], torch.einsum("ti,tih->th", act, dn[ir[:, k]]), 0)
                loss = loss + (y * gr).sum()
                if r == rank:
                    leaves, want = (xr, wr), y.detach()
            gx, gw, ggu, gdn = torch.autograd.grad(loss, [*leaves, gu, dn])
            errors[step] = max(rel_err(out.detach(), want), rel_err(xl.grad, gx), rel_err(wl.grad, gw),
                               rel_err(module.gate_and_up_projs.grad.to_local(), ggu[mine]),
                               rel_err(module.down_projs.grad.to_local(), gdn[mine]))
        calls = sum(engine_standins.CALLS.values())
    return {"steps": steps, "errors": errors, "dispatcher": module.token_dispatcher.backend, "engine_calls": calls}


def sync_free_bad_routing(rank, world, kind, bad_rank=0, hidden=16, topk=2, tokens=12, device="cpu"):
    """Sync-free NVLink layer: one rank passes invalid routing (``kind``). No rank may raise
    inside the call (no host sync to agree at) nor exchange garbage: the call moves no token on
    any rank and report_dropped_tokens raises on every rank; then the layer is right again."""
    experts = 2 * world
    d = _dispatcher(rank, world, experts, topk, moe_flex_backend="nvlink", moe_sync_free=True)
    exact = _dispatcher(rank, world, experts, topk, moe_flex_backend="alltoall")

    def call(disp, seed, corrupt=False):
        x0, tp, ti, _, _ = _layer_inputs(rank, world, tokens, hidden, experts, topk, seed=seed)
        tp, ti = tp.float().clone(), ti.clone()
        if corrupt:
            if kind == "nan":
                tp[1, 0] = float("nan")
            elif kind == "inf":
                tp[1, 0] = float("inf")
            elif kind == "duplicate":
                ti[1, 1] = ti[1, 0]
            else:
                ti[1, 0] = {"above": experts + 3, "negative": -7, "huge": 2 ** 40}[kind]
        rows, _, pp = disp.token_permutation2(x0.to(device), tokens, tp.to(device), ti.to(device))
        return disp.token_unpermutation(rows * pp[:, None].to(rows.dtype))

    out_bad = call(d, 1, corrupt=rank == bad_rank)
    message = _report_then_recover(d)
    out, want = call(d, 2), call(exact, 2)
    return {"message": message, "bad_is_zero": bool((out_bad == 0).all()), "error": float((out - want).abs().max())}


def layers_called_out_of_order(rank, world, backend="alltoall", hidden=8, topk=2, tokens=10, device="cpu",
                               dtype=None):
    """Two layers of the same settings; rank 0 calls A then B, the others B then A. Each rank's
    first call must raise on every rank (the header names the layer), not exchange the other
    layer's tokens; in the same order again, both layers are right (``dtype``: the tokens'
    dtype, float64 when None)."""
    experts = 2 * world
    a = _dispatcher(rank, world, experts, topk, moe_flex_backend=backend)
    b = _dispatcher(rank, world, experts, topk, moe_flex_backend=backend)
    exact = _dispatcher(rank, world, experts, topk, moe_flex_backend="alltoall")

    def call(disp, seed):
        x0, tp, ti, _, _ = _layer_inputs(rank, world, tokens, hidden, experts, topk, seed=seed)
        x0 = x0.to(DTYPES[dtype]) if dtype else x0
        rows, tpe, pp = disp.token_permutation2(x0.to(device), tokens, tp.float().to(device), ti.to(device))
        return disp.token_unpermutation(rows * pp[:, None].to(rows.dtype))

    call(a, 1), call(b, 2)  # (both layers agreed once: the first call's check is behind them)
    messages = []
    for disp in ((a, b) if rank == 0 else (b, a)):
        try:
            call(disp, 3)
            messages.append(None)
        except (RuntimeError, ValueError) as exc:
            messages.append(str(exc))
        disp.reset()
    errors = [float((call(disp, 4).double() - call(exact, 4).double()).abs().max()) for disp in (a, b)]
    return {"messages": messages, "errors": errors}


def layer_settings_differ(rank, world, field, hidden=8, topk=2, tokens=10, device="cpu"):
    """The ranks build one layer with different settings (``field``: the backend, FP8 dispatch,
    the expert count): the first call raises on every rank, naming the setting and each rank's
    value, before any token moves (no hang, no abort)."""
    experts = 4 * world
    options = {"backend": dict(moe_flex_backend="alltoall" if rank == 0 else "nvlink"),
               "fp8": dict(moe_fp8_dispatch=rank == 0),
               "experts": dict(num_moe_experts=experts * (1 + (rank == 0)))}[field]
    options.setdefault("moe_flex_backend", "alltoall")
    experts = options.pop("num_moe_experts", experts)
    d = _dispatcher(rank, world, experts, topk, **options)
    x = torch.randn(tokens, 128 if field == "fp8" else hidden, device=device)
    tp, ti = torch.topk(torch.softmax(torch.randn(tokens, experts, device=device), -1), topk)
    try:
        d.token_permutation2(x, tokens, tp, ti)
        return None
    except (ValueError, RuntimeError) as exc:
        return str(exc)


def backward_skipped_on_one_rank(rank, world, backend="alltoall", skipping_rank=1, hidden=8, topk=2, tokens=10,
                                 device="cpu"):
    """Rank ``skipping_rank`` skips a call's backward and goes on to its next call while its
    peers run that backward: every rank raises (the backward's first exchange carries the call's
    header), nobody hangs or aborts; after reset() on every rank the next forward and backward
    are right. Then a reset() between forward and backward on one rank changes nothing."""
    experts = 2 * world
    d = _dispatcher(rank, world, experts, topk, moe_flex_backend=backend)
    exact = _dispatcher(rank, world, experts, topk, moe_flex_backend="alltoall")

    def forward(disp, seed):
        x0, tp, ti, _, _ = _layer_inputs(rank, world, tokens, hidden, experts, topk, seed=seed)
        x = x0.to(device).clone().requires_grad_()
        rows, _, pp = disp.token_permutation2(x, tokens, tp.float().to(device), ti.to(device))
        return x, disp.token_unpermutation(rows * pp[:, None].to(rows.dtype) * 2.0)

    _, out = forward(d, 1)
    message = None
    try:
        if rank == skipping_rank:
            forward(d, 2)  # (its next call, while its peers run the backward of the first)
        else:
            out.sum().backward()
    except (RuntimeError, ValueError) as exc:
        message = str(exc)
    d.reset()
    grads = []
    for disp in (d, exact):
        x, out = forward(disp, 3)
        if disp is d and rank == skipping_rank:
            d.reset()  # between forward and backward: harmless
        out.square().sum().backward()
        grads.append(x.grad)
    return {"message": message, "grad_error": float((grads[0] - grads[1]).abs().max())}


def empty_gather_exchange(rank, world):
    """The gather transport's exchange of nothing (no header, no parts: what a sync-free NVLink
    dispatch whose own input check failed sends on CPU groups): every rank returns (None, [])."""
    from flexdispatch.managers.peer_buffers import GatherTransport

    try:
        headers, tables = GatherTransport(dist.group.WORLD).exchange(None, [])
        return {"headers": headers, "tables": tables, "error": None}
    except Exception as exc:  # noqa: BLE001 (the test reports what any rank raised)
        return {"headers": None, "tables": None, "error": f"{type(exc).__name__}: {exc}"}


def stuck_peer_times_out(rank, world, backend="alltoall", timeout_s=2.0, stuck_rank=1):
    """``stuck_rank`` sleeps inside a step (between dispatch and combine: in its experts, say)
    for longer than FLEXDISPATCH_PEER_TIMEOUT_S; its peers' combine must raise once the timeout
    has passed, naming it, and the stuck rank's own late combine must fail at once (the group
    is unusable then). Runs on a group of its own, so the pool's group stays usable."""
    import os
    import time

    group = dist.new_group(list(range(world)))
    experts = 2 * world
    d = fd.MoEFlexTokenDispatcher(2, [2 * rank, 2 * rank + 1], fd.MoEConfig(
        num_moe_experts=experts, moe_router_topk=2, moe_flex_backend=backend), group)
    x = torch.randn(8, 4)
    probs = torch.softmax(torch.randn(8, experts), -1)
    rows, _, pp = d.token_permutation(x, 8, probs)
    saved = os.environ.get("FLEXDISPATCH_PEER_TIMEOUT_S")
    os.environ["FLEXDISPATCH_PEER_TIMEOUT_S"] = str(timeout_s)  # (read at every collective)
    try:
        if rank == stuck_rank:
            time.sleep(timeout_s + 2)
        start, error = time.monotonic(), None
        try:
            d.token_unpermutation(rows * pp[:, None])
        except RuntimeError as exc:
            error = f"{type(exc).__name__}: {exc}" + "".join(getattr(exc, "__notes__", []))
        waited = time.monotonic() - start
    finally:
        if saved is None:
            os.environ.pop("FLEXDISPATCH_PEER_TIMEOUT_S", None)
        else:
            os.environ["FLEXDISPATCH_PEER_TIMEOUT_S"] = saved
    dist.destroy_process_group(group)
    return {"error": error, "waited": waited}


def two_threads_one_group(rank, world, backend="alltoall", forced=True, device="cpu"):
    """Two threads drive two layers of one group at once (without a guard: a hang or a crash),
    made deterministic: thread A's first collective waits until thread B has tried its
    call, so on every rank B calls while A is inside a call. B must raise before any collective
    (ConcurrentCallError), A's next exchange carries the error so that every rank raises there,
    later calls raise at once, and after flexdispatch.shutdown() one thread may use the group
    again. Runs on a group of its own. ``forced=False``: the threads start together and
    overlap as timing has it (outcomes vary)."""
    import threading

    group = dist.new_group(list(range(world)))
    experts = 2 * world
    if device == "cuda":  # (a thread starts on GPU 0: each sets this rank's GPU)
        device = torch.device("cuda", torch.cuda.current_device())
    cfg = fd.MoEConfig(num_moe_experts=experts, moe_router_topk=2, moe_flex_backend=backend)
    layers = {name: fd.MoEFlexTokenDispatcher(2, [2 * rank, 2 * rank + 1], cfg, group) for name in ("a", "b")}
    inside, tried = threading.Event(), threading.Event()

    def gate(original):
        def collective(self, *args, **kwargs):
            if forced:
                name = threading.current_thread().name
                if name == "layer-a" and not tried.is_set():
                    inside.set()
                    tried.wait(timeout=60)  # (B has raised, or, without the guard, is in a collective too)
                elif name == "layer-b":
                    tried.set()
            return original(self, *args, **kwargs)
        return collective

    names = [n for n in ("all_to_all_single", "alltoall_base", "all_gather_single", "_allgather_base", "allgather")
             if hasattr(dist.ProcessGroup, n)]
    originals = {n: getattr(dist.ProcessGroup, n) for n in names}  # (to call, with self)
    raw = {n: dist.ProcessGroup.__dict__.get(n) for n in names}  # (to restore: the binding descriptors)
    errors = {"a": [], "b": []}

    def drive(name):
        if isinstance(device, torch.device):
            torch.cuda.set_device(device)
        if name == "b" and forced:
            inside.wait(timeout=60)
        for _ in range(3):
            x, probs = torch.randn(8, 4, device=device), torch.softmax(torch.randn(8, experts, device=device), -1)
            try:
                rows, _, pp = layers[name].token_permutation(x, 8, probs)
                layers[name].token_unpermutation(rows * pp[:, None])
                errors[name].append(None)
            except RuntimeError as exc:
                errors[name].append(f"{type(exc).__name__}: {exc}")
                layers[name].reset()
            finally:
                if name == "b":
                    tried.set()

    for n in names:
        setattr(dist.ProcessGroup, n, gate(originals[n]))
    try:
        threads = [threading.Thread(target=drive, args=(n,), name=f"layer-{n}") for n in ("a", "b")]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        for n in names:
            if raw[n] is None:
                delattr(dist.ProcessGroup, n)
            else:
                setattr(dist.ProcessGroup, n, raw[n])
    fd.shutdown()  # (every rank) forgets what it saw: one thread may use the group again
    realigned = False
    for _ in range(2):  # (unforced, a call of layer a may have met one of layer b on the other rank, both
        try:             # raising: the layer's steps differ then, and its next call realigns them)
            rows, _, pp = layers["a"].token_permutation(torch.randn(8, 4, device=device), 8,
                                                        torch.softmax(torch.randn(8, experts, device=device), -1))
            break
        except RuntimeError as exc:
            if forced or realigned or "different steps" not in str(exc):
                raise
            realigned = True
    recovered = tuple(layers["a"].token_unpermutation(rows * pp[:, None]).shape) == (8, 4)
    dist.destroy_process_group(group)
    return {"errors": errors, "recovered": recovered, "realigned": realigned}


def nothing_holds_a_destroyed_group(rank, world, backend="alltoall", device="cpu"):
    """Every way flexdispatch met a group (dispatchers, managers, transports, registries, an
    autograd graph kept alive, a call that raised on every rank), then shutdown() and
    destroy_process_group(): the group must be gone at once, not kept until the interpreter's
    exit (where gloo aborted the process). Then the dispatcher says its group was destroyed."""
    import gc

    group = dist.new_group(list(range(world)))
    probe = weakref.ref(group)
    experts = 2 * world
    d = fd.MoEFlexTokenDispatcher(2, [2 * rank, 2 * rank + 1], fd.MoEConfig(
        num_moe_experts=experts, moe_router_topk=2, moe_flex_backend=backend), group)
    kept = []
    for backward in (True, False):  # a graph used by backward, and one kept alive without it
        x = torch.randn(8, 4, device=device, requires_grad=True)
        probs = torch.softmax(torch.randn(8, experts, device=device), -1).requires_grad_()
        rows, tpe, pp = d.token_permutation(x, 8, probs)
        out = d.token_unpermutation(rows * pp[:, None])
        if backward:
            out.sum().backward()
        kept.append((rows, out))
    bad = torch.topk(torch.rand(8, experts), 2).indices
    if rank == 0:
        bad[1, 0] = experts + 3
    try:
        d.token_permutation2(torch.randn(8, 4, device=device), 8, torch.rand(8, 2, device=device), bad.to(device))
    except ValueError:
        pass
    fd.shutdown()
    dist.destroy_process_group(group)
    del group
    alive = probe() is not None
    holders = sorted({type(r).__name__ for r in gc.get_referrers(probe())}) if alive else []
    try:
        d.token_permutation(torch.randn(8, 4, device=device), 8,
                            torch.softmax(torch.randn(8, experts, device=device), -1))
        after = None
    except RuntimeError as exc:
        after = f"{type(exc).__name__}: {exc}"
    return {"alive": alive, "holders": holders, "group_attr_none": d.group is None, "after": after}


FAULTS = ("none", "none", "none", "above", "negative", "huge", "nan", "inf", "duplicate", "hidden_width", "dtype")
"""What a fuzzed call may break on one rank (``none``: nothing)."""


def fuzz_calls(rank, world, seed, calls, backend="alltoall"):
    """Random calls (shapes, dtypes, top-k, padding, capacity, sync-free, entry point) with, at
    random, one rank's input broken in one of ``FAULTS`` ways. A call either returns a result
    that every rank checks against the dense float64 formula (outputs and input gradients), or
    raises on every rank (sync-free: report_dropped_tokens raises on every rank and the call's
    output is zero). Returns per call what happened on this rank: "ok", "raised", "reported"
    or a description of a silent wrong result."""
    import random

    rng = random.Random(seed)  # (the same draws on every rank)
    outcomes = []
    for call in range(calls):
        experts = world * rng.choice([1, 2, 4])
        topk = rng.randint(1, min(3, experts))
        hidden = rng.choice([3, 8, 16])
        dtype = rng.choice([torch.float32, torch.float64])
        sync_free = backend in ("nvlink", "local") and rng.random() < 0.4
        pad = rng.choice([None, None, 2])
        capacity = None if sync_free else rng.choice([None, None, 1.5])
        entry = rng.choice(["probs", "indices"])
        tokens = rng.randint(1, 12) if sync_free else None
        counts = [tokens] * world if sync_free else [rng.randint(0, 12) for _ in range(world)]
        fault, bad_rank = (rng.choice(FAULTS[3:]) if rng.random() < 0.4 else "none"), rng.randrange(world)
        if world == 1 and fault in ("hidden_width", "dtype"):
            fault = "none"  # (one rank cannot disagree with itself)
        if entry == "probs" and fault in ("above", "negative", "huge", "duplicate"):
            fault = "nan"  # (dense probs name no index)
        if sync_free and fault in ("hidden_width", "dtype"):
            fault = "none"  # (sync-free checks routing on the device; shapes raise on the bad rank alone)
        if counts[bad_rank] == 0 and fault != "none":
            counts[bad_rank] = 1
        local = experts // world
        router_dtype = "fp64" if dtype == torch.float64 else "fp32"
        d = _dispatcher(rank, world, experts, topk, moe_flex_backend=backend, moe_sync_free=sync_free,
                        moe_router_expert_pad_multiple=pad, moe_expert_capacity_factor=capacity,
                        moe_router_dtype=router_dtype)
        xs, logits, weights = make_problem(seed * 1000 + call, counts, hidden, experts)
        x = xs[rank].to(dtype)
        probs, token_probs, token_indices = _routing(logits[rank], topk, experts, capacity, router_dtype)
        mine = fault != "none" and rank == bad_rank
        if mine and fault in ("above", "negative", "huge", "duplicate"):
            token_indices = token_indices.clone()
            if fault == "duplicate" and topk > 1:
                token_indices[0, 1] = token_indices[0, 0] if token_indices[0, 0] >= 0 else 0
                token_indices[0, 0] = token_indices[0, 1]
            else:
                token_indices[0, 0] = {"above": experts + 3, "negative": -7, "huge": 2 ** 40, "duplicate": -5}[fault]
        if mine and fault in ("nan", "inf"):  # (in a slot the routing uses: unused slots' probs are free)
            probs, token_probs = probs.clone(), token_probs.clone()
            probs[0] = float(fault)
            token_probs[0, int((token_indices[0] >= 0).long().argmax())] = float(fault)
            if entry == "indices" and not bool((token_indices[0] >= 0).any()):
                token_indices = token_indices.clone()
                token_indices[0, 0] = 0
        if mine and fault == "hidden_width":
            x = torch.cat([x, x[:, :1]], 1)
        if mine and fault == "dtype":
            x = x.to(torch.float32 if dtype == torch.float64 else torch.float64)
        xl = x.clone().requires_grad_()
        try:
            if entry == "probs":
                rows, tpe, pp = d.token_permutation(xl, xl.shape[0], probs.to(torch.float64 if dtype == torch.float64
                                                                               else torch.float32))
            else:
                rows, tpe, pp = d.token_permutation2(xl, xl.shape[0], token_probs.to(dtype), token_indices)
            if sync_free:
                used = int(tpe.sum())
                y = torch.cat([apply_experts(rows[:used], tpe, pp[:used], weights[rank * local:(rank + 1) * local]
                                             .to(dtype)), rows[used:]])
            else:
                y = apply_experts(rows, tpe, pp, weights[rank * local:(rank + 1) * local].to(dtype))
            out = d.token_unpermutation(y)
            out.sum().backward()
        except (ValueError, TypeError, RuntimeError) as exc:
            outcomes.append("raised" if fault != "none" else f"call {call}: raised without a fault: {exc}")
            d.reset()
            continue
        if sync_free:
            try:
                d.report_dropped_tokens()
                reported = False
            except RuntimeError:
                reported = True
            if fault != "none" and fault not in ("hidden_width", "dtype"):
                ok = reported and bool((out == 0).all())
                outcomes.append("reported" if ok else f"call {call}: {fault} on rank {bad_rank} not reported")
                d.reset()
                fd.shutdown()
                continue
        if fault != "none":
            outcomes.append(f"call {call}: {fault} on rank {bad_rank} returned a result without an error")
            continue
        # The dense formula on this rank's tokens, float64, with this call's routing (a rank's
        # output and input gradient depend on its own tokens alone).
        want_x = xs[rank].clone().requires_grad_()
        _, tp, ti = _routing(logits[rank], topk, experts, capacity, router_dtype)
        want = dense_layer(want_x, tp, ti, weights)
        want.sum().backward()
        tol = TOLERANCE[dtype]
        err = max(rel_err(out, want), rel_err(xl.grad, want_x.grad))
        outcomes.append("ok" if err <= tol else f"call {call}: relative error {err:.3g} > {tol:g}")
    return outcomes
