"""Model-based, multi-step test of the dispatcher: seeded random programs over several layers.

A *program* is a list of steps generated from one seed, identically on every rank; each rank
runs it on its own dispatchers and checks every step against the dense float64 formula
``out[t] = sum over k with i_k >= 0 of p_k * f_{i_k}(x[t])`` (``f_e(x) = tanh(x @ W_e)``),
computed from every rank's inputs, which every rank can rebuild from the seed:

* the output, ``tokens_per_expert`` (per expert, padded, and its sum equal to the rows),
  the permuted probs (their exact values and order), and, when the step runs backward, the
  gradients of the hidden states, of the routing probs and of the experts' weights;
* injected bad inputs: every rank raises, nobody hangs, and after ``reset()`` the next step
  is right again.

Steps vary the token count (0 included), the routing (every third call's dense probs with
ties), the entry point (dense probs or top-k indices with -1 slots), the one-shot or
step-by-step methods, the async flags, forward only or forward and backward, and two layers
in flight in either order. Layers differ in experts, top-k, hidden size, padding, capacity,
router precision, hidden dtype, sync-free mode and FP8 dispatch (hidden 128, the dense formula
rounding the tokens through FP8).

Replay a failure with the seed its message prints (``FLEXDISPATCH_STATEFUL_SEED``).
"""

from __future__ import annotations

import dataclasses
import math
import os
import random
import time
from typing import Optional

import torch

import flexdispatch as fd
from moe_math import capacity_drop, rel_err

DTYPES = {"float64": torch.float64, "float32": torch.float32, "bfloat16": torch.bfloat16}
TOL = {torch.float64: 1e-9, torch.float32: 5e-5, torch.bfloat16: 4e-2}

# Bad inputs a step may inject on one rank. Every kind must raise ValueError/TypeError on every
# rank of the group (agreed in the call's first exchange), then reset() makes the layer usable.
BAD_KINDS = ("index_out_of_range", "duplicate_index", "probs_transposed", "nan_prob", "int_hidden",
             "hidden_width", "token_count", "topk_width")
# The argument the error must name, on every rank.
NAMED = {"index_out_of_range": ("token_indices",), "duplicate_index": ("token_indices",),
         "probs_transposed": ("probs",), "nan_prob": ("probs",), "int_hidden": ("hidden_states",),
         "hidden_width": ("hidden_states",), "token_count": ("probs", "num_local_tokens"),
         "topk_width": ("token_indices", "token_probs")}


@dataclasses.dataclass
class Layer:
    experts: int
    topk: int
    hidden: int
    pad: Optional[int]
    capacity: Optional[float]
    router_dtype: str
    dtype: str
    sync_free: bool = False
    bound: Optional[int] = None  # moe_max_tokens_per_expert (sync-free layers)
    fp8: bool = False  # moe_fp8_dispatch (hidden a multiple of 128, not float64)
    fp8_experts: bool = False  # moe_fp8_experts (one-shot steps get FP8 rows and scales; no gradient)


def generate_program(seed: int, world: int, steps: int, *, dtypes=("float32", "float64"), hidden_sizes=(4, 8, 12),
                     max_tokens: int = 24, sync_free: bool = False, bad_kinds=BAD_KINDS, expert_error: bool = True,
                     num_layers: int = 3, fp8: bool = True, engine: Optional[str] = None,
                     shared: bool = False) -> dict:
    """The program of ``seed``: its layers and steps (plain data, the same on every rank).

    ``engine``: the layers run on an engine stand-in (tests/engine_standins.py) named as
    Automodel names it ("deepep", "uccl_ep", "hybridep"): float32 layers, float32 routing (the
    engines carry probs in float32), no sync-free mode, FP8 or mid-call resets (their combine
    has no header to agree at), and for HybridEP no capacity (it routes inside its kernels).
    ``shared``: layers 0 and 1 have the same settings, so their dispatchers share one manager
    (``moe_share_token_dispatcher``), and "pair" steps keep both in flight."""
    if engine is not None:
        dtypes, sync_free, fp8, expert_error = ("float32",), False, False, False
    rng = random.Random(seed)
    if world == 1:  # a hidden size differing "across ranks" needs two ranks
        bad_kinds = tuple(k for k in bad_kinds if k != "hidden_width")
    layers = []
    for _ in range(num_layers):
        experts = world * rng.choice([1, 2, 3])
        topk = rng.randint(1, min(3, experts))
        layers.append(Layer(experts=experts, topk=topk, hidden=rng.choice(hidden_sizes),
                            pad=rng.choice([None, None, 2, 3]), capacity=rng.choice([None, None, 0.75, 1.5]),
                            router_dtype=rng.choice(["fp32", "fp32", "fp64"]), dtype=rng.choice(dtypes),
                            sync_free=sync_free and rng.random() < 0.5))
        if layers[-1].sync_free and rng.random() < 0.6:
            layers[-1].bound = rng.choice([1, 2, 3, 5, 8])
        if engine is not None:  # (no draw: the other programs stay as they were)
            layers[-1].router_dtype = "fp32"
            if engine == "hybridep":
                layers[-1].capacity = None
        if fp8 and rng.random() < 0.3:  # FP8 dispatch: rows of whole 128-value groups
            layers[-1].fp8 = True
            layers[-1].fp8_experts = len(layers) == 2  # FP8 rows to the experts (no draw either)
            layers[-1].hidden = layers[-1].hidden if layers[-1].hidden % 128 == 0 else 128
            layers[-1].dtype = "float32" if layers[-1].dtype == "float64" else layers[-1].dtype
    if shared and num_layers > 1:
        layers[1] = dataclasses.replace(layers[0])
    program = []
    for s in range(steps):
        r = rng.random()
        tokens = [rng.choice([0, 1, rng.randint(2, max_tokens), rng.randint(2, max_tokens)]) for _ in range(world)]
        base = dict(step=s, seed=rng.randrange(1 << 30), tokens=tokens, layer=rng.randrange(num_layers),
                    entry=rng.choice(["probs", "indices"]), backward=rng.random() < 0.6)
        if r < 0.35:
            program.append(dict(base, kind="oneshot"))
        elif r < 0.65:
            program.append(dict(base, kind="stepwise", async_dispatch=rng.random() < 0.5,
                                async_combine=rng.random() < 0.5))
        elif r < 0.85 and num_layers > 1:
            other = rng.choice([i for i in range(num_layers) if i != base["layer"]])
            program.append(dict(base, kind="pair", other=other, other_entry=rng.choice(["probs", "indices"]),
                                other_seed=rng.randrange(1 << 30),
                                other_tokens=[rng.randint(0, max_tokens) for _ in range(world)],
                                reverse=rng.random() < 0.5))
        elif r < 0.95 and bad_kinds:
            program.append(dict(base, kind="bad", bad=rng.choice(list(bad_kinds)), bad_rank=rng.randrange(world)))
        elif expert_error:
            program.append(dict(base, kind="expert_error", bad_rank=rng.randrange(world)))
        else:
            program.append(dict(base, kind="oneshot"))
        if world > 1:  # (no draw: programs without sync-free layers stay as they were)
            _sync_free_on_a_group(program[-1], layers)
    return {"seed": seed, "world": world, "layers": [dataclasses.asdict(l) for l in layers], "steps": program,
            "engine": engine, "shared": shared}


def _sync_free_on_a_group(step: dict, layers: list) -> None:
    """A sync-free layer on a group (the NVLink manager) takes the same token count on every
    rank and has no per-call agreement on the host (a check failing on one rank raises there
    only, as with DeepEP): its steps pass rank 0's count everywhere, and its bad or failing
    steps become plain ones."""
    touched = [step["layer"]] + ([step["other"]] if step["kind"] == "pair" else [])
    if not any(layers[i].sync_free for i in touched):
        return
    if step["kind"] in ("bad", "expert_error"):
        step["kind"] = "oneshot"
    step["tokens"] = [step["tokens"][0]] * len(step["tokens"])
    if step["kind"] == "pair":
        step["other_tokens"] = [step["other_tokens"][0]] * len(step["other_tokens"])


# ---- inputs every rank can rebuild ---------------------------------------------------------------


def layer_weights(program_seed: int, index: int, layer: Layer) -> torch.Tensor:
    g = torch.Generator().manual_seed(program_seed * 31 + index)
    return torch.randn(layer.experts, layer.hidden, layer.hidden, generator=g, dtype=torch.float64) / math.sqrt(layer.hidden)


def step_inputs(seed: int, tokens: list, layer: Layer, entry: str):
    """Every rank's inputs of one layer call, float64: ``[(x, router, grad_out)]``; ``router``
    is dense probs ``[T, E]`` or ``(token_probs [T, K], token_indices [T, K])``."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in tokens:
        x = torch.randn(t, layer.hidden, generator=g, dtype=torch.float64)
        probs = torch.softmax(torch.randn(t, layer.experts, generator=g, dtype=torch.float64) * 2, -1)
        if seed % 3 == 0:  # (every third call's router holds ties: quarters, zeros among them)
            probs = (probs * 4).round() / 4
        grad = torch.randn(t, layer.hidden, generator=g, dtype=torch.float64)
        if entry == "indices":
            tp, ti = torch.topk(probs, layer.topk, dim=-1)
            ti = torch.where(torch.rand(t, layer.topk, generator=g) < 0.2, -1, ti)
            out.append((x, (tp, ti), grad))
        else:
            out.append((x, probs, grad))
    return out


def _router_dtype(layer: Layer):
    return torch.float64 if layer.router_dtype == "fp64" else torch.float32


def bounded(layer: Layer, routes: list, world: int) -> list:
    """``routes`` (every rank's (token_probs, token_indices)) with each expert's assignments
    past ``layer.bound`` dropped: an expert keeps its first rows in dispatched order (source
    rank, then token), as ``moe_max_tokens_per_expert`` documents."""
    if layer.bound is None:
        return routes
    seen = {}
    out = []
    for tp, ti in routes:
        device, ti = ti.device, ti.cpu().clone()  # element by element: no GPU sync per entry
        for t in range(ti.shape[0]):
            for k in range(ti.shape[1]):
                e = int(ti[t, k])
                if e >= 0:
                    seen[e] = seen.get(e, 0) + 1
                    if seen[e] > layer.bound:
                        ti[t, k] = -1
        out.append((tp, ti.to(device)))
    return out


def _routing(layer: Layer, router, entry: str):
    """Top-k routing of one rank, as the dispatcher sees it (router precision, capacity)."""
    if entry == "probs":  # (the documented selection: ties to the lower expert, which torch.topk leaves open)
        tp, ti = fd.reference.route_topk(router.to(_router_dtype(layer)), layer.topk)
    else:
        tp, ti = router[0].to(_router_dtype(layer)), router[1]
    if layer.capacity is not None:
        ti = capacity_drop(tp.detach().cpu(), ti.cpu(), layer.experts, layer.capacity).to(ti.device)
    return tp, ti


# ---- the dense model -----------------------------------------------------------------------------


def expected(layer: Layer, weights: torch.Tensor, inputs, entry: str, rank: int, world: int, backward: bool):
    """The dense float64 results of this rank: output, counts, permuted probs and gradients
    (on the CPU). The math runs where ``weights`` live: on the GPU for GPU runs, whose wide
    layers would take seconds a step on one CPU thread."""
    local = layer.experts // world
    mine = slice(rank * local, (rank + 1) * local)
    device = weights.device
    wd = weights.clone().requires_grad_()
    loss = loss_abs = 0
    res = {}
    leaves, routes = [], []
    for x, router, _ in inputs:
        xd = x.to(device).clone().requires_grad_()
        rd = (router.to(_router_dtype(layer)).double().to(device).clone().requires_grad_() if entry == "probs"
              else router[0].to(_router_dtype(layer)).double().to(device).clone().requires_grad_())
        leaves.append((xd, rd))
        routes.append(_routing(layer, rd if entry == "probs" else (rd, router[1].to(device)), entry))
    routes = bounded(layer, routes, world)
    received = []  # per source rank: (token_probs, token_indices) after capacity and bound
    for r, ((xd, rd), (tp, ti), (_, _, grad)) in enumerate(zip(leaves, routes, inputs)):
        out = torch.zeros_like(xd)
        out_abs = torch.zeros_like(xd)
        xe = xd
        if layer.fp8:  # the experts see the tokens rounded through FP8; its gradient is the identity
            rounded = fd.reference.fp8_round_trip(xd.detach().to(DTYPES[layer.dtype]))
            xe = xd + (rounded.double() - xd.detach())
        every = torch.tanh(torch.einsum("th,ehg->etg", xe, wd))  # every expert on every token
        rows = torch.arange(xd.shape[0], device=device)
        for k in range(ti.shape[1]):
            valid = ti[:, k] >= 0
            y = every[ti[:, k].clamp(min=0), rows]
            out = out + torch.where(valid[:, None], tp[:, k, None] * y, 0)
            out_abs = out_abs + torch.where(valid[:, None], tp[:, k, None] * y.detach().abs(), 0)
        grad = grad.to(device)
        loss = loss + (out * grad).sum()
        loss_abs = loss_abs + (out_abs * grad.abs()).sum()
        received.append((tp.detach().cpu(), ti.cpu()))
        if r == rank:
            res["out"], res["x"], res["router"] = out.detach().cpu(), xd, rd
    if backward:
        gx, gr, gw = torch.autograd.grad(loss, [res["x"], res["router"], wd], allow_unused=True, retain_graph=True)
        res["grad_x"], res["grad_router"], res["grad_w"] = (None if g is None else g.cpu() for g in (gx, gr, gw[mine]))
        # A router gradient is a dot product over the hidden size; its size before cancellation
        # (the same sums of |terms|) bounds what rounding in a narrow dtype can do to it.
        scale = torch.autograd.grad(loss_abs, [res["router"]], allow_unused=True)[0]
        res["scale_router"] = None if scale is None else scale.cpu()
    # Expert-major order: local expert, then source rank, then token; pad rows prob 0.
    counts, probs = [], []
    for e in range(rank * local, (rank + 1) * local):
        column = []
        for tp, ti in received:
            hit = (ti == e)
            column += [float(tp[t, k]) for t, k in hit.nonzero().tolist()]
        pad = layer.pad or 1
        padded = -(-len(column) // pad) * pad
        counts.append(padded)
        probs += column + [0.0] * (padded - len(column))
    res["counts"], res["probs"] = counts, probs
    return res


# ---- running a program ---------------------------------------------------------------------------


class StepFailure(AssertionError):
    pass


class Runner:
    """Runs one program on one rank of ``group`` (None: one process, no torch.distributed)."""

    def __init__(self, program: dict, rank: int, group, device: str = "cpu", backend: str = "auto"):
        self.program, self.rank, self.group, self.device = program, rank, group, device
        self.world = program["world"]
        self.layers = [Layer(**l) for l in program["layers"]]
        self.dispatchers = []
        self.weights = []
        engine, shared = program.get("engine"), program.get("shared", False)
        for i, layer in enumerate(self.layers):
            local = layer.experts // self.world
            fields = dict(num_moe_experts=layer.experts, moe_router_topk=layer.topk,
                          moe_router_expert_pad_multiple=layer.pad, moe_expert_capacity_factor=layer.capacity,
                          moe_router_dtype=layer.router_dtype, moe_sync_free=layer.sync_free,
                          moe_max_tokens_per_expert=layer.bound, moe_fp8_dispatch=layer.fp8,
                          moe_fp8_experts=layer.fp8_experts)
            if engine is not None or shared:  # the current generation's config, as Automodel writes it
                cfg = fd.TokenDispatcherConfig(moe_flex_dispatcher_backend=engine or backend,
                                               moe_share_token_dispatcher=True, **fields)
            else:
                cfg = fd.MoEConfig(moe_flex_backend=backend, **fields)
            self.dispatchers.append(fd.MoEFlexTokenDispatcher(
                local, list(range(rank * local, (rank + 1) * local)), cfg, group))
            self.weights.append(layer_weights(program["seed"], i, layer).to(device))
        if shared and len(self.dispatchers) > 1 and self.dispatchers[0]._comm_manager is not None and \
                self.dispatchers[0]._comm_manager is not self.dispatchers[1]._comm_manager:
            raise StepFailure(f"stateful program seed={program['seed']}: layers 0 and 1 have the same settings but "
                              f"do not share their manager")
        self.checks = 0
        self.raised = []  # (step, message) of every agreed error this rank saw

    def fail(self, step: dict, what: str) -> None:
        raise StepFailure(f"stateful program seed={self.program['seed']} world={self.world} rank={self.rank} "
                          f"step {step['step']} ({step['kind']}, layer {step['layer']}): {what}. Replay: "
                          f"FLEXDISPATCH_STATEFUL_SEED={self.program['seed']}")

    # -- one layer call, in pieces ----------------------------------------------------------------

    def _prepare(self, index: int, seed: int, tokens: list, entry: str):
        layer = self.layers[index]
        inputs = step_inputs(seed, tokens, layer, entry)
        x, router, _ = inputs[self.rank]
        dtype = DTYPES[layer.dtype]
        xl = x.to(dtype).to(self.device).reshape(-1, 1, layer.hidden).requires_grad_()
        local = layer.experts // self.world
        w = self.weights[index][self.rank * local:(self.rank + 1) * local].to(dtype).to(self.device).requires_grad_()
        if entry == "probs":
            rl = router.to(_router_dtype(layer)).to(self.device).requires_grad_()
        else:
            rl = (router[0].to(_router_dtype(layer)).to(self.device).requires_grad_(), router[1].to(self.device))
        return dict(index=index, layer=layer, inputs=inputs, x=xl, router=rl, w=w, entry=entry)

    def _permute(self, call: dict, stepwise: bool = False, async_dispatch: bool = True):
        d = self.dispatchers[call["index"]]
        x, router = call["x"], call["router"]
        tokens = x.shape[0]
        if not stepwise and call["layer"].fp8_experts:  # FP8 rows and scales: inference only
            with torch.no_grad():
                if call["entry"] == "probs":
                    (q, scales), tpe, probs = d.token_permutation(x.detach(), tokens, router)
                else:
                    (q, scales), tpe, probs = d.token_permutation2(x.detach(), tokens, router[0], router[1])
            if q.dtype != torch.float8_e4m3fn or scales.shape != (q.shape[0], q.shape[1] // 128):
                raise StepFailure(f"moe_fp8_experts returned {q.dtype} rows {tuple(q.shape)}, scales "
                                  f"{tuple(scales.shape)}")
            return fd.ops.dequantize_fp8(q, scales, x.dtype), tpe, probs
        if not stepwise:
            if call["entry"] == "probs":
                return d.token_permutation(x, tokens, router)
            return d.token_permutation2(x, tokens, router[0], router[1])
        if call["entry"] == "probs":
            h, _ = d.dispatch_preprocess(x, tokens, router)
        else:
            h, _ = d.dispatch_preprocess2(x, tokens, router[0], router[1])
        h, _ = d.dispatch_all_to_all(h, async_finish=async_dispatch, allocate_on_comm_stream=async_dispatch)
        return d.dispatch_postprocess(h)

    def _experts(self, call: dict, rows: torch.Tensor, tpe: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        counts = [int(c) for c in tpe.tolist()]
        used = sum(counts)
        chunks = torch.split(rows[:used], counts)
        ys = [torch.tanh(c @ call["w"][e]) for e, c in enumerate(chunks)]
        y = torch.cat(ys + [rows[used:]]) if ys else rows
        return y * probs[:, None].to(y.dtype)

    def _unpermute(self, call: dict, y: torch.Tensor, stepwise: bool = False, async_combine: bool = True):
        d = self.dispatchers[call["index"]]
        if not stepwise:
            return d.token_unpermutation(y)
        h = d.combine_preprocess(y)
        h = d.combine_all_to_all(h, async_finish=async_combine, allocate_on_comm_stream=async_combine)
        return d.combine_postprocess(h)

    def _check_permuted(self, step, call, want, tokens, tpe, probs) -> None:
        layer = call["layer"]
        counts = [int(c) for c in tpe.tolist()]
        if layer.sync_free:
            if tokens.shape[0] < sum(counts):
                self.fail(step, f"sync-free rows {tokens.shape[0]} < counted {sum(counts)}")
        elif sum(counts) != tokens.shape[0]:
            self.fail(step, f"sum(tokens_per_expert)={sum(counts)} != rows {tokens.shape[0]}")
        if counts != want["counts"]:
            self.fail(step, f"tokens_per_expert {counts} != expected {want['counts']}")
        got = probs.detach().double().cpu()[:sum(counts)]
        if layer.sync_free and not bool((probs.detach()[sum(counts):] == 0).all()):
            self.fail(step, "sync-free tail rows have non-zero probs")
        exp = torch.tensor(want["probs"], dtype=torch.float64)
        if got.shape != exp.shape or not torch.allclose(got, exp, rtol=1e-6, atol=0):
            self.fail(step, f"permuted probs differ from the expert-major order: {got.tolist()[:8]} vs "
                            f"{exp.tolist()[:8]}")
        if layer.router_dtype == "fp64" and probs.dtype != torch.float64:
            self.fail(step, f"fp64 routing returned {probs.dtype} permuted probs")
        self.checks += 3

    def _check_result(self, step, call, want, out, backward: bool) -> None:
        layer = call["layer"]
        tol = TOL[DTYPES[layer.dtype]]
        if tuple(out.shape) != tuple(call["x"].shape):
            self.fail(step, f"output shape {tuple(out.shape)} != input shape {tuple(call['x'].shape)}")
        err = rel_err(out.reshape(-1, layer.hidden), want["out"])
        if not err <= tol:
            self.fail(step, f"output relative error {err:.3g} > {tol:g}")
        self.checks += 1
        if not backward:
            return
        router_grad = call["router"].grad if call["entry"] == "probs" else call["router"][0].grad
        pairs = {"grad_x": (call["x"].grad, want["grad_x"]), "grad_router": (router_grad, want["grad_router"]),
                 "grad_experts": (call["w"].grad, want["grad_w"])}
        for name, (got, exp) in pairs.items():
            if exp is None or exp.numel() == 0:
                continue
            if got is None:
                got = torch.zeros_like(exp)
            e = rel_err(got.reshape(exp.shape), exp)
            if name == "grad_router" and DTYPES[layer.dtype] != torch.float64:
                # bf16 and float32: a router gradient that cancels to near zero keeps the absolute
                # rounding error of its terms (~ eps * |terms| / sqrt(H)); measure against that
                # floor. A misrouted row is off by ~ |terms| / sqrt(H) and still fails. (float32
                # met it at seed 4009, EP 4, step 4: a rank of one top-1 token, 6.3e-5 on the
                # all-to-all and NVLink managers alike.)
                floor = float(want["scale_router"].norm()) / math.sqrt(layer.hidden)
                diff = float((got.reshape(exp.shape).double().cpu() - exp).norm())
                e = diff / max(float(exp.norm()), floor, 1e-12)
            if not e <= tol:
                self.fail(step, f"{name} relative error {e:.3g} > {tol:g}")
            self.checks += 1

    def _want(self, call: dict, backward: bool):
        return expected(call["layer"], self.weights[call["index"]], call["inputs"], call["entry"], self.rank,
                        self.world, backward)

    def _loss(self, call: dict, out: torch.Tensor) -> torch.Tensor:
        grad = call["inputs"][self.rank][2].to(out.dtype).to(self.device)
        return (out.reshape(grad.shape) * grad).sum()

    # -- steps ------------------------------------------------------------------------------------

    def run(self) -> dict:
        # FLEXDISPATCH_STATEFUL_TRACE=<folder>: one line per step and rank, written before the
        # step runs, so that a run killed by a timeout shows where each rank stood.
        trace = os.environ.get("FLEXDISPATCH_STATEFUL_TRACE")
        if trace:
            os.makedirs(trace, exist_ok=True)
        log = open(os.path.join(trace, f"rank{self.rank}.txt"), "a", buffering=1) if trace else None
        start = time.monotonic()
        try:
            for step in self.program["steps"]:
                if log:
                    log.write(f"{time.monotonic() - start:8.2f}s seed={self.program['seed']} step={step['step']} "
                              f"{step['kind']} {step.get('bad', '')} layer={step['layer']} tokens={step['tokens']}\n")
                getattr(self, "_step_" + step["kind"])(step)
        finally:
            if log:
                log.close()
        return {"steps": len(self.program["steps"]), "checks": self.checks, "raised": self.raised}

    def _step_oneshot(self, step: dict, stepwise: bool = False) -> None:
        call = self._prepare(step["layer"], step["seed"], step["tokens"], step["entry"])
        backward = step["backward"] and (stepwise or not call["layer"].fp8_experts)  # (FP8 rows: no gradient)
        tokens, tpe, probs = self._permute(call, stepwise, step.get("async_dispatch", True))
        want = self._want(call, backward)
        self._check_permuted(step, call, want, tokens, tpe, probs)
        out = self._unpermute(call, self._experts(call, tokens, tpe, probs), stepwise, step.get("async_combine", True))
        if backward:
            self._loss(call, out).backward()
        self._check_result(step, call, want, out, backward)

    def _step_stepwise(self, step: dict) -> None:
        self._step_oneshot(step, stepwise=True)

    def _step_pair(self, step: dict) -> None:
        a = self._prepare(step["layer"], step["seed"], step["tokens"], step["entry"])
        b = self._prepare(step["other"], step["other_seed"], step["other_tokens"], step["other_entry"])
        backward = step["backward"] and not (a["layer"].fp8_experts or b["layer"].fp8_experts)
        permuted = [self._permute(a), self._permute(b)]
        wants = [self._want(a, backward), self._want(b, backward)]
        for call, want, (tokens, tpe, probs) in zip((a, b), wants, permuted):
            self._check_permuted(step, call, want, tokens, tpe, probs)
        ys = [self._experts(call, *p) for call, p in zip((a, b), permuted)]
        order = (1, 0) if step["reverse"] else (0, 1)
        outs = [None, None]
        for i in order:
            outs[i] = self._unpermute((a, b)[i], ys[i])
        if backward:
            (self._loss(a, outs[0]) + self._loss(b, outs[1])).backward()
        for call, want, out in zip((a, b), wants, outs):
            self._check_result(step, call, want, out, backward)

    def _expect_raise(self, step: dict, action, what: str, errors=(ValueError, TypeError), names=()) -> str:
        try:
            action()
        except errors as exc:
            message = str(exc)
            if names and not any(message.startswith(n + ":") or f" {n}:" in message for n in names):
                self.fail(step, f"{what}: the error does not name {' or '.join(names)}: {message}")
            self.raised.append((step["step"], message))
            return message
        self.fail(step, f"{what}: no error raised")

    def _step_bad(self, step: dict) -> None:
        call = self._prepare(step["layer"], step["seed"], step["tokens"], "indices" if step["bad"] in (
            "index_out_of_range", "duplicate_index", "topk_width") else "probs")
        if self.rank == step["bad_rank"]:
            corrupt(call, step["bad"], self.layers[call["index"]])
        d = self.dispatchers[call["index"]]

        def bad_call():
            self._permute(call)
            if self.device == "cuda":  # (a sync-free call's routing error is raised at the next sync point)
                fd.ops.check_pending_errors()

        self._expect_raise(step, bad_call, f"bad input {step['bad']} on rank {step['bad_rank']}",
                           names=NAMED[step["bad"]])
        d.reset()
        self._step_oneshot(dict(step, kind="oneshot", backward=False))  # usable again at once

    def _step_expert_error(self, step: dict) -> None:
        """An expert raises on one rank, which resets and starts its next call while its peers
        finish this one: every rank raises once (at that exchange), all reset, all recover."""
        call = self._prepare(step["layer"], step["seed"], step["tokens"], step["entry"])
        d = self.dispatchers[call["index"]]
        tokens, tpe, probs = self._permute(call)
        if self.rank == step["bad_rank"]:
            d.reset()  # the expert raised here
            if self.world > 1:
                again = self._prepare(step["layer"], step["seed"] + 1, step["tokens"], step["entry"])
                self._expect_raise(step, lambda: self._permute(again), "next call after a peer's mid-call reset",
                                   errors=(RuntimeError,), names=("dispatcher",))
        elif self.world > 1:
            y = self._experts(call, tokens, tpe, probs)
            self._expect_raise(step, lambda: self._unpermute(call, y), "combine while a peer reset mid-call",
                               errors=(RuntimeError,), names=("dispatcher",))
        d.reset()
        self._step_oneshot(dict(step, kind="oneshot", backward=False))


def corrupt(call: dict, kind: str, layer: Layer) -> None:
    """Make one rank's inputs of a call bad in the way ``kind`` names (in place)."""
    x, router = call["x"], call["router"]
    t = x.shape[0]
    if kind == "index_out_of_range":
        tp, ti = router
        ti = (torch.cat([ti, torch.full((1, layer.topk), layer.experts + 2, dtype=ti.dtype, device=ti.device)])
              if t == 0 else ti.clone())
        ti[-1, 0] = layer.experts + 2
        if t == 0:
            tp = torch.cat([tp.detach(), tp.new_ones(1, layer.topk)]).requires_grad_()
            call["x"] = torch.cat([x.detach(), x.new_zeros(1, 1, layer.hidden)]).requires_grad_()
        call["router"] = (tp, ti)
    elif kind == "duplicate_index":
        tp, ti = router
        if layer.topk == 1:  # no duplicate possible: fall back to a negative index below -1
            ti = ti.clone() if t else torch.full((1, 1), -5, dtype=ti.dtype, device=ti.device)
            if t:
                ti[0, 0] = -5
        else:
            ti = ti.clone() if t else torch.arange(layer.topk, device=ti.device).reshape(1, -1)
            ti[0, 1] = ti[0, 0] = 0
        if t == 0:
            tp = tp.new_ones(1, layer.topk).requires_grad_()
            call["x"] = x.new_zeros(1, 1, layer.hidden).requires_grad_()
        call["router"] = (tp, ti)
    elif kind == "topk_width":
        tp, ti = router
        call["router"] = (torch.cat([tp.detach(), tp.detach()[:, :1]], 1), torch.cat([ti, ti[:, :1]], 1))
    elif kind == "probs_transposed":
        flipped = router.detach().t().contiguous()
        call["router"] = flipped if flipped.shape != router.shape else router.detach()[:, :-1]
    elif kind == "nan_prob":
        p = router.detach().clone()
        if t == 0:
            p = p.new_full((1, layer.experts), 1.0 / layer.experts)
            call["x"] = x.new_zeros(1, 1, layer.hidden).requires_grad_()
        p[0] = float("nan")
        call["router"] = p
    elif kind == "int_hidden":
        call["x"] = x.detach().round().long()
    elif kind == "hidden_width":
        call["x"] = torch.cat([x.detach(), x.detach()[..., :1]], -1)
    elif kind == "token_count":  # probs for one token more than the hidden states hold
        call["router"] = torch.cat([router.detach(), router.new_full((1, layer.experts), 1.0 / layer.experts)])
    else:
        raise ValueError(kind)
