"""A real MoE layer on the dispatcher, over several local ranks (``python -m flexdispatch demo``).

Each rank holds a router and its share of the experts (two-layer SiLU MLPs), runs a few
forward and backward steps through :class:`~flexdispatch.MoEFlexTokenDispatcher`, and checks
its outputs and gradients against one dense computation of the whole batch (every rank can
rebuild all inputs and weights from the seed). Rank 0 prints the backend, the time per stage
and the largest errors.

Device ``auto``: one GPU per rank with NCCL when there are enough GPUs (DeepEP when it
imports, in bfloat16; else the NVLink backend), else gloo on the CPU (float32).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import time
from typing import Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from .config import MoEConfig
from .dispatcher import MoEFlexTokenDispatcher

STAGES = ("route", "dispatch", "permute", "experts", "restore", "combine", "backward")


@dataclasses.dataclass
class DemoArgs:
    world_size: int = 4
    device: str = "auto"
    backend: str = "auto"
    steps: int = 3
    tokens: int = 512
    hidden: int = 128
    ffn: int = 256
    experts: int = 16
    topk: int = 4
    seed: int = 0


def expert_weights(args: DemoArgs, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """All experts' weights, identical on every rank: ``w1 [E, H, F]``, ``w2 [E, F, H]``."""
    g = torch.Generator().manual_seed(args.seed + 1)
    w1 = torch.randn(args.experts, args.hidden, args.ffn, generator=g) / args.hidden ** 0.5
    w2 = torch.randn(args.experts, args.ffn, args.hidden, generator=g) / args.ffn ** 0.5
    return w1.to(dtype), w2.to(dtype)


def batch(args: DemoArgs, rank: int, step: int, dtype: torch.dtype) -> torch.Tensor:
    """Rank ``rank``'s tokens for ``step``: ``[S, B, H]`` with S * B = tokens."""
    g = torch.Generator().manual_seed(args.seed + 1000 * step + rank)
    return torch.randn(args.tokens // 4, 4, args.hidden, generator=g).to(dtype)


class MoELayer(torch.nn.Module):
    """Router + top-k + this rank's experts, on a flex token dispatcher."""

    def __init__(self, args: DemoArgs, group, rank: int, world: int, dtype: torch.dtype, device: torch.device):
        super().__init__()
        local = args.experts // world
        g = torch.Generator().manual_seed(args.seed)
        self.router = torch.nn.Parameter((torch.randn(args.hidden, args.experts, generator=g) * 0.1).to(dtype).to(device))
        w1, w2 = expert_weights(args, dtype)
        self.w1 = torch.nn.Parameter(w1[rank * local:(rank + 1) * local].clone().to(device))
        self.w2 = torch.nn.Parameter(w2[rank * local:(rank + 1) * local].clone().to(device))
        config = MoEConfig(num_moe_experts=args.experts, moe_router_topk=args.topk, moe_flex_backend=args.backend)
        self.dispatcher = MoEFlexTokenDispatcher(local, list(range(rank * local, (rank + 1) * local)), config, group)
        self.times = {s: 0.0 for s in STAGES}

    def _mark(self, stage: str, start: float) -> float:
        if self.w1.is_cuda:
            torch.cuda.synchronize()
        now = time.perf_counter()
        self.times[stage] += now - start
        return now

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = time.perf_counter()
        tokens = x.shape[0] * x.shape[1]
        probs = torch.softmax(x.reshape(tokens, -1).float() @ self.router.float(), dim=-1)
        d = self.dispatcher
        hidden, _ = d.dispatch_preprocess(x, tokens, probs)
        t = self._mark("route", t)
        hidden, _ = d.dispatch_all_to_all(hidden)
        t = self._mark("dispatch", t)
        rows, tokens_per_expert, permuted_probs = d.dispatch_postprocess(hidden)
        t = self._mark("permute", t)
        outs = []
        for e, chunk in enumerate(torch.split(rows, tokens_per_expert.tolist())):
            outs.append(F.silu(chunk @ self.w1[e]) @ self.w2[e])
        y = (torch.cat(outs) if outs else rows) * permuted_probs[:, None].to(rows.dtype)
        t = self._mark("experts", t)
        y = d.combine_preprocess(y)
        t = self._mark("restore", t)
        y = d.combine_postprocess(d.combine_all_to_all(y))
        self._mark("combine", t)
        return y


def dense_forward(x: torch.Tensor, router: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, topk: int) -> torch.Tensor:
    """``out[t] = sum_k p_k * expert_{i_k}(x[t])`` for every token at once, no dispatcher."""
    flat = x.reshape(-1, x.shape[-1])
    probs = torch.softmax(flat @ router, dim=-1)
    top_p, top_i = torch.topk(probs, topk, dim=-1)
    every = torch.einsum("th,ehf->etf", flat, w1)
    every = torch.einsum("etf,efh->eth", F.silu(every), w2)  # [E, T, H]
    picked = every[top_i, torch.arange(flat.shape[0])[:, None]]  # [T, K, H]
    return (top_p[..., None] * picked).sum(1).reshape(x.shape)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _worker(rank: int, args: DemoArgs, device_type: str, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    device = torch.device(device_type, rank) if device_type == "cuda" else torch.device("cpu")
    if device_type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo", rank=rank, world_size=args.world_size,
                            device_id=device if device_type == "cuda" else None)
    try:
        world = args.world_size
        dtype = torch.bfloat16 if device_type == "cuda" else torch.float32
        layer = MoELayer(args, dist.group.WORLD, rank, world, dtype, device)
        w1, w2 = expert_weights(args, torch.float64)
        router = layer.router.detach().double().cpu().requires_grad_()
        w1.requires_grad_()
        w2.requires_grad_()
        worst = {"output": 0.0, "grad_x": 0.0, "grad_router": 0.0, "grad_experts": 0.0}
        local = args.experts // world
        for step in range(args.steps):
            layer.zero_grad()
            xs = [batch(args, r, step, torch.float64) for r in range(world)]
            x = xs[rank].to(dtype).to(device).requires_grad_()
            out = layer(x)
            t = time.perf_counter()
            (out.float() * torch.cos(x.detach().float())).sum().backward()
            layer._mark("backward", t)
            # Dense reference of the global batch; the loss is the sum of every rank's loss.
            x_all = [xi.clone().requires_grad_() for xi in xs]
            dense = [dense_forward(xi, router, w1, w2, args.topk) for xi in x_all]
            loss = sum((d * torch.cos(xi.detach())).sum() for d, xi in zip(dense, x_all))
            grads = torch.autograd.grad(loss, [x_all[rank], router, w1, w2])
            router_grad = layer.router.grad.double()
            dist.all_reduce(router_grad, group=dist.group.WORLD)  # routers are replicated
            mine = slice(rank * local, (rank + 1) * local)
            errors = {
                "output": _rel(out.cpu(), dense[rank]), "grad_x": _rel(x.grad.cpu(), grads[0]),
                "grad_router": _rel(router_grad.cpu(), grads[1]),
                "grad_experts": max(_rel(layer.w1.grad.cpu(), grads[2][mine]), _rel(layer.w2.grad.cpu(), grads[3][mine])),
            }
            worst = {k: v if v != v else max(worst[k], v) for k, v in errors.items()}  # keep a NaN
        summary = torch.tensor([worst[k] for k in worst] + [layer.times[s] for s in STAGES], dtype=torch.float64,
                               device=device).nan_to_num(nan=float("inf"))  # a NaN must not hide in MAX
        dist.all_reduce(summary, op=dist.ReduceOp.MAX, group=dist.group.WORLD)
        if rank == 0:
            values = summary.cpu().tolist()
            results.put({"backend": layer.dispatcher.backend, "dtype": str(dtype).replace("torch.", ""),
                         "device": device_type, "errors": dict(zip(worst, values[:4])),
                         "ms_per_step": {s: 1e3 * v / args.steps for s, v in zip(STAGES, values[4:])}})
    finally:
        from . import shutdown

        shutdown()
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pick_device(requested: str, world_size: int) -> str:
    if requested != "auto":
        return requested
    return "cuda" if torch.cuda.is_available() and torch.cuda.device_count() >= world_size else "cpu"


def run_demo(args: DemoArgs, timeout_s: float = 600.0) -> dict:
    """Spawn ``args.world_size`` ranks, run the layer, return rank 0's summary (raises on failure)."""
    if args.experts % args.world_size:
        raise ValueError(f"--experts {args.experts} must be divisible by --world-size {args.world_size}")
    if args.tokens % 4:
        raise ValueError(f"--tokens must be a multiple of 4, got {args.tokens}")
    device = pick_device(args.device, args.world_size)
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, args, device, port, results), daemon=True)
             for r in range(args.world_size)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout_s
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    if alive:
        raise TimeoutError(f"demo: {len(alive)} rank(s) still running after {timeout_s:.0f} s")
    failed = [(i, p.exitcode) for i, p in enumerate(procs) if p.exitcode != 0]
    if failed:
        raise RuntimeError(f"demo: rank(s) failed with exit codes {failed}")
    return results.get()


def format_report(args: DemoArgs, result: dict) -> str:
    lines = [
        f"flexdispatch demo: {args.world_size} ranks on {result['device']} ({result['dtype']}), "
        f"{result['backend']} manager",
        f"layer: {args.tokens} tokens/rank, hidden {args.hidden}, ffn {args.ffn}, {args.experts} experts, "
        f"top-{args.topk}; {args.steps} forward+backward steps",
        "time per step (ms, slowest rank): " + ", ".join(f"{s} {v:.2f}" for s, v in result["ms_per_step"].items()),
        "largest relative error vs the dense computation: " + ", ".join(
            f"{k} {v:.2e}" for k, v in result["errors"].items()),
    ]
    return "\n".join(lines)


def tolerance(result: dict) -> float:
    """bf16 expert matmuls against a float64 reference land near 3e-2; routing mistakes give O(1)."""
    return 6e-2 if result["dtype"] == "bfloat16" else 1e-4


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flexdispatch demo", description=__doc__.splitlines()[0])
    defaults = DemoArgs()
    for field in dataclasses.fields(DemoArgs):
        parser.add_argument("--" + field.name.replace("_", "-"), type=type(getattr(defaults, field.name)),
                            default=getattr(defaults, field.name))
    ns = parser.parse_args(argv)
    args = DemoArgs(**vars(ns))
    if args.world_size < 1 or args.experts % args.world_size:
        parser.error(f"--experts {args.experts} must be divisible by --world-size {args.world_size}")
    if args.tokens < 4 or args.tokens % 4 or not 1 <= args.topk <= args.experts:
        parser.error("--tokens must be a positive multiple of 4 and --topk in [1, --experts]")
    if args.device not in ("auto", "cpu", "cuda"):
        parser.error(f"--device must be auto, cpu or cuda, got {args.device!r}")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if args.device == "cuda" and gpus < args.world_size:
        parser.error(f"--device cuda needs one GPU per rank ({args.world_size}); this machine has {gpus}. "
                     f"Use --device cpu, or a smaller --world-size")
    result = run_demo(args)
    print(format_report(args, result))
    worst = max(result["errors"].values())
    if worst > tolerance(result):
        print(f"FAILED: error {worst:.2e} above tolerance {tolerance(result):.0e}")
        return 1
    print(f"OK: every error below {tolerance(result):.0e}")
    return 0
