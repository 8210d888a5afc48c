"""A real MoE layer on the dispatcher, over several local ranks (python -m flexdispatch demo).

Each rank holds a router and its share of the experts (two-layer SiLU MLPs), runs a few
forward and backward steps through MoEFlexTokenDispatcher, and checks
its outputs and gradients against one dense computation of the whole batch (every rank can
rebuild all inputs and weights from the seed). Rank 0 prints the backend, the time per stage
and the largest errors.

Device auto: one GPU per rank with NCCL when there are enough GPUs (DeepEP when it
imports, in bfloat16; else the NVLink backend), else gloo on the CPU (float32).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import queue
import signal
import socket
import sys
import time
import traceback
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


def _run_rank(rank: int, args: DemoArgs, device_type: str, port: int) -> Optional[dict]:
    """One rank's steps; rank 0 returns the summary of every rank (others None)."""
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
        if rank != 0:
            return None
        values = summary.cpu().tolist()
        return {"backend": layer.dispatcher.backend, "dtype": str(dtype).replace("torch.", ""),
                "device": device_type, "errors": dict(zip(worst, values[:4])),
                "ms_per_step": {s: 1e3 * v / args.steps for s, v in zip(STAGES, values[4:])}}
    finally:
        from . import shutdown

        shutdown()
        dist.destroy_process_group()


def _one_line(exc: BaseException) -> str:
    """'Type: message' on one line (a message's line breaks become spaces)."""
    message = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__


def _worker(rank: int, args: DemoArgs, device_type: str, port: int, results) -> None:
    """A spawned rank: puts ("ok", rank, summary) or ("error", rank, one line, traceback) on
    results; a failed rank exits with code 1 without printing its traceback (the parent prints
    one line per rank)."""
    try:
        summary = _run_rank(rank, args, device_type, port)
    except KeyboardInterrupt:
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - every failure is reported, in one line
        results.put(("error", rank, _one_line(exc), traceback.format_exc()))
        sys.exit(1)
    results.put(("ok", rank, summary))


class DemoFailed(RuntimeError):
    """Some ranks failed. failures: (rank, one line) per failed rank, in rank order;
    tracebacks: rank -> the traceback of the rank's exception, where it raised one."""

    def __init__(self, failures: list, tracebacks: dict):
        self.failures = failures
        self.tracebacks = tracebacks
        super().__init__("; ".join(f"rank {rank}: {line}" for rank, line in failures))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pick_device(requested: str, world_size: int) -> str:
    """'cuda' or 'cpu': auto takes the GPUs when there is one per rank."""
    if requested != "auto":
        return requested
    return "cuda" if torch.cuda.is_available() and torch.cuda.device_count() >= world_size else "cpu"


def _cuda_shortfall(world_size: int) -> Optional[tuple[str, str]]:
    """(what is missing, how to run anyway) when world_size ranks cannot each have a GPU here."""
    if torch.version.cuda is None and getattr(torch.version, "hip", None) is None:
        return (f"this torch ({torch.__version__}) is a CPU-only build, without CUDA",
                "install a CUDA build of torch, or use --device cpu")
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus == 0:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        where = f"CUDA_VISIBLE_DEVICES={visible!r}" if visible is not None else "check the driver with nvidia-smi"
        return f"this torch (CUDA {torch.version.cuda or torch.version.hip}) sees no GPU ({where})", "use --device cpu"
    if gpus < world_size:
        return (f"only {gpus} GPU(s) visible for --world-size {world_size} (one GPU per rank)",
                f"use --world-size {gpus} or less, or --device cpu")
    return None


def cuda_problem(world_size: int) -> Optional[str]:
    """Why world_size ranks cannot each have a GPU here, with the fix (None: they can)."""
    shortfall = _cuda_shortfall(world_size)
    return None if shortfall is None else "; ".join(shortfall)


def backend_problem(backend: str, device: str, world_size: int) -> Optional[str]:
    """Why --backend cannot run the demo on device here, as far as can be told before the ranks
    start (None: no reason known; the ranks' dispatchers check the rest)."""
    if backend == "auto":
        return None
    if backend == "local" and world_size > 1:
        return (f"--backend local: the local manager serves one rank and moves no tokens between ranks, "
                f"got --world-size {world_size}; use --world-size 1, or --backend auto")
    from .managers import deepep, registry

    why = registry.unavailable_here(backend)
    if why is not None:
        return f"--backend {backend}: {why}; use --backend auto"
    if backend == "deepep":
        if device != "cuda":
            shortfall = _cuda_shortfall(world_size)
            if shortfall is None:
                return ("--backend deepep: DeepEP moves CUDA tensors, and --device cpu was given; use --device "
                        "cuda or auto, or --backend auto or alltoall to run on the CPU")
            return (f"--backend deepep: DeepEP moves CUDA tensors, and {shortfall[0]}; use --backend auto or "
                    f"alltoall to run on the CPU")
        sizes = deepep.supported_group_sizes()
        if world_size not in sizes:
            shown = ", ".join(map(str, sizes[:8])) + (", ..." if len(sizes) > 8 else "")
            return f"--backend deepep: this DeepEP build serves --world-size {shown}, not {world_size}"
    return None


def _exit_reason(code: Optional[int]) -> str:
    if code is not None and code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


def run_demo(args: DemoArgs, timeout_s: float = 600.0, grace_s: float = 10.0) -> dict:
    """Spawn args.world_size ranks, run the layer, return rank 0's summary.

    Raises DemoFailed, with one line per failed rank, when any rank fails or is still running
    after timeout_s; once one rank has failed, the others get grace_s to finish or report
    their own error, then are stopped.
    """
    if args.experts % args.world_size:
        raise ValueError(f"--experts {args.experts} must be divisible by --world-size {args.world_size}")
    if args.tokens % 4:
        raise ValueError(f"--tokens must be a multiple of 4, got {args.tokens}")
    device = pick_device(args.device, args.world_size)
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, args, device, port, results), daemon=True)
             for r in range(args.world_size)]
    for p in procs:
        p.start()
    reports: dict = {}  # rank -> ("ok", rank, summary) or ("error", rank, line, traceback)

    def receive(timeout: float) -> bool:
        try:
            message = results.get(timeout=timeout)
        except queue.Empty:
            return False
        reports[message[1]] = message
        return True

    deadline = time.monotonic() + timeout_s
    first_failure = None
    try:
        while any(p.is_alive() for p in procs):
            now = time.monotonic()
            if now > deadline or (first_failure is not None and now > first_failure + grace_s):
                break
            receive(0.1)
            failed = any(m[0] == "error" for m in reports.values()) or any(
                p.exitcode not in (None, 0) for p in procs)
            if first_failure is None and failed:
                first_failure = time.monotonic()
    finally:
        stopped = [r for r, p in enumerate(procs) if p.is_alive()]
        for r in stopped:
            procs[r].kill()
        for p in procs:
            p.join()
    while receive(0.2 if len(reports) < len(procs) else 0.0):
        pass
    failures = []
    for rank, p in enumerate(procs):
        report = reports.get(rank)
        if report is not None and report[0] == "error":
            failures.append((rank, report[2]))
        elif rank in stopped:
            why = (f"still running after {timeout_s:.0f} s" if first_failure is None
                   else f"still running {grace_s:.0f} s after another rank failed")
            failures.append((rank, f"stopped: {why}"))
        elif p.exitcode != 0:
            after = "after finishing its steps" if report is not None else "without reporting an error"
            failures.append((rank, f"the process {_exit_reason(p.exitcode)} {after}"))
    if failures:
        raise DemoFailed(failures, {r: m[3] for r, m in reports.items() if m[0] == "error"})
    return reports[0][2]


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


DESCRIPTION = """\
A real MoE layer on the flex token dispatcher, over several local ranks. Each rank holds a
router and its share of the experts, runs forward and backward steps, and checks its outputs
and gradients against one dense computation of the whole batch. Rank 0 prints the backend,
the time per stage and the largest errors; the command exits with 1 when an error is above
the tolerance or a rank fails."""

HELP = {
    "world_size": "ranks (processes) to start; the experts are split evenly among them",
    "device": "where the ranks run: cuda (one GPU per rank, NCCL, bfloat16), cpu (gloo, float32), or auto "
              "(cuda when there is a GPU per rank, else cpu)",
    "backend": "how tokens move between ranks: auto takes the best that can serve (DeepEP, else NVLink for "
               "GPUs on one node, else all-to-all; local for one rank)",
    "steps": "forward and backward steps, each checked against the dense computation",
    "tokens": "tokens per rank (a multiple of 4)",
    "hidden": "hidden size of a token",
    "ffn": "inner size of each expert's MLP",
    "experts": "experts in the layer, across all ranks (a multiple of --world-size)",
    "topk": "experts each token goes to (at most --experts)",
    "seed": "seed of the weights and tokens (every rank rebuilds the same ones from it)",
}


def _at_least(low: int, multiple: int = 1):
    """An argparse type: a whole number of at least low (and a multiple of multiple)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < low or value % multiple:
            what = f"a positive multiple of {multiple}" if multiple > 1 else f"at least {low}"
            raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
        return value

    parse.__name__ = "count"
    return parse


def _parser() -> argparse.ArgumentParser:
    from .managers.registry import backend_names

    parser = argparse.ArgumentParser(prog="python -m flexdispatch demo", description=DESCRIPTION,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    defaults = DemoArgs()
    special = {"device": {"choices": ("auto", "cpu", "cuda")}, "backend": {"choices": backend_names()},
               "tokens": {"type": _at_least(4, 4)}, "seed": {"type": int}}
    for field in dataclasses.fields(DemoArgs):
        options = {"type": _at_least(1), "metavar": "N"}
        if field.type == "str":  # (annotations are strings here: from __future__ import annotations)
            options = {"metavar": None}
        options.update(special.get(field.name, {}))
        parser.add_argument("--" + field.name.replace("_", "-"), default=getattr(defaults, field.name),
                            help=HELP[field.name], **options)
    parser.add_argument("--traceback", action="store_true",
                        help="print each failed rank's full traceback, not only its error")
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    parser = _parser()
    ns = vars(parser.parse_args(argv))
    show_tracebacks = ns.pop("traceback")
    args = DemoArgs(**ns)
    if args.experts % args.world_size:
        parser.error(f"--experts {args.experts} must be a multiple of --world-size {args.world_size} "
                     f"(each rank holds the same number of experts)")
    if args.topk > args.experts:
        parser.error(f"--topk {args.topk} is more than --experts {args.experts}")
    if args.device == "cuda":
        problem = cuda_problem(args.world_size)
        if problem:
            parser.exit(2, f"{parser.prog}: error: --device cuda: {problem}\n")
    device = pick_device(args.device, args.world_size)
    problem = backend_problem(args.backend, device, args.world_size)
    if problem:
        parser.exit(2, f"{parser.prog}: error: {problem}\n")
    try:
        result = run_demo(args)
    except DemoFailed as exc:
        for rank, line in exc.failures:
            if show_tracebacks and rank in exc.tracebacks:
                print(exc.tracebacks[rank].rstrip(), file=sys.stderr)
            print(f"rank {rank}: {line}", file=sys.stderr)
        if exc.tracebacks and not show_tracebacks:
            print("(--traceback prints where each error was raised)", file=sys.stderr)
        return 1
    print(format_report(args, result))
    worst = max(result["errors"].values())
    if worst > tolerance(result):
        print(f"FAILED: error {worst:.2e} above tolerance {tolerance(result):.0e}")
        return 1
    print(f"OK: every error below {tolerance(result):.0e}")
    return 0
