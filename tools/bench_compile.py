"""Eager against torch.compile on the one-rank layer: time per call, measured in one run.

    python tools/bench_compile.py [--tokens 1024 --hidden 1024 --experts 32 --topk 4]
        [--device cpu|cuda] [--modes default,sizes-in-graph,sync-free] [--runs 50 --warmup 5]
        [--backend inductor] [--threads N] [--clock wall|process] [--dispatcher]

The layer (as a model calls the dispatcher): softmax of router logits, ``token_permutation`` on
one rank (the local manager), experts ``f_e(x) = silu(x * a_e)`` on the permuted rows (a row's
expert found from the counts, with no host read), ``token_unpermutation``. First it prints one
compiled graph's fixed cost on this host (the router softmax alone, eager and compiled). Per
mode (``default``:
sized on the host, which for this layer's full route (the top-K of dense probs, one rank) is by
its T * K rows, one graph; ``sizes-in-graph``: the same with Dynamo set to keep
data-dependent sizes in its graphs, ``capture_dynamic_output_shape_ops`` and
``capture_scalar_outputs``; ``sync-free``: worst-case sized), it prints torch._dynamo's
graph and break counts for the layer, then the median time of one call after a warm-up, forward
and forward + backward, eager and compiled (separate dispatchers, same inputs); on CUDA the
sync-free layer also captured by hand in CUDA graphs and compiled with
``mode="reduce-overhead"`` (torch.compile's CUDA graphs; inductor's CUDA-graph counters are
printed with it, so a graph that ran without one shows). ``--dispatcher``
also times eager calls with every kernel op through the torch op dispatcher (the path compiled
graphs take) instead of the direct calls eager code makes. Elementwise experts keep the
dispatcher's own cost in view; on CUDA every call is timed from a synchronized device to its
end. Runs on any checkout of flexdispatch (the one above this file), so that two commits can
be compared back to back on the same machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

import flexdispatch as fd  # noqa: E402
from flexdispatch import envs  # noqa: E402
from timing import capture  # noqa: E402


def layer(d, x, logits, scales):
    probs = torch.softmax(logits, dim=-1)
    rows, tokens_per_expert, permuted_probs = d.token_permutation(x, x.shape[0], probs)
    ends = torch.cumsum(tokens_per_expert.to(rows.device), 0)
    position = torch.arange(rows.shape[0], device=rows.device)
    expert = torch.searchsorted(ends, position, right=True).clamp(max=scales.shape[0] - 1)
    y = torch.nn.functional.silu(rows * scales[expert]) * permuted_probs[:, None].to(rows.dtype)
    return d.token_unpermutation(y)


def graph_floor(logits: torch.Tensor, args) -> None:
    """What one compiled graph costs on this host, whatever it holds: the layer's router
    softmax alone, eager and compiled, forward and forward + backward. A layer that sizes its
    permutation at a sync (given indices, a pad multiple or capacity) compiles to two graphs
    (the break at the sizing step), so at host-bound shapes its compiled form pays about twice
    this against the eager ops the graphs replace."""
    logits = logits.detach().clone().requires_grad_()
    softmax_grad = torch.randn_like(logits)

    def softmax(d, logits):
        return torch.softmax(logits, dim=-1)

    compiled = torch.compile(softmax, backend=args.backend)
    compiled(None, logits).backward(softmax_grad)
    cells = []
    for name, fn in (("eager", softmax), ("compiled", compiled)):
        measured = timings(fn, None, (logits,), softmax_grad, args)
        cells.append(f"{name} {measured['forward']:.3f} / {measured['fwd+bwd']:.3f} ms")
    print("one graph's floor (the router softmax alone, forward / fwd+bwd): " + " | ".join(cells))


def add_layer_arguments(parser: argparse.ArgumentParser) -> None:
    """The layer's shape and device, as every tool that runs this layer takes them."""
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--topk", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")


def dispatcher(args, sync_free: bool):
    cfg = fd.MoEConfig(num_moe_experts=args.experts, moe_router_topk=args.topk, moe_sync_free=sync_free,
                       moe_share_token_dispatcher=False)
    return fd.MoEFlexTokenDispatcher(args.experts, list(range(args.experts)), cfg)


def median_ms(fn, args) -> float:
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    clock = time.process_time if args.clock == "process" else time.perf_counter
    for _ in range(args.warmup):
        fn()
    times = []
    for _ in range(args.runs):
        sync()
        start = clock()
        fn()
        sync()
        times.append(clock() - start)
    return 1e3 * statistics.median(times)


def timings(fn, d, inputs, grad, args) -> dict:
    x = inputs[0]

    def forward():
        fn(d, *inputs)

    def forward_backward():
        x.grad = None
        fn(d, *inputs).backward(grad)

    return {"forward": median_ms(forward, args), "fwd+bwd": median_ms(forward_backward, args)}


def captured_timings(d, inputs, grad, args) -> dict:
    """The sync-free layer captured by hand in two CUDA graphs (forward; forward + backward,
    gradients by torch.autograd.grad into the graph's pool) and timed as replays."""
    x, logits, scales = inputs
    leaf = x.detach().clone().requires_grad_()

    def forward():
        return layer(d, x, logits, scales)

    def forward_backward():
        return torch.autograd.grad(layer(d, leaf, logits, scales), leaf, grad)

    graphs = zip(("forward", "fwd+bwd"), capture(forward, forward_backward))
    return {phase: median_ms(graph.replay, args) for phase, graph in graphs}


def layer_inputs(args, dtype: torch.dtype):
    """The layer's inputs ``(x [T, H] needing a gradient, router logits [T, E], the experts'
    scales [E, H])`` and the output's gradient ``[T, H]``, seeded, on ``args.device``."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.tokens, args.hidden, generator=g).to(args.device, dtype).requires_grad_()
    logits = torch.randn(args.tokens, args.experts, generator=g).to(args.device)
    scales = (1 + torch.rand(args.experts, args.hidden, generator=g)).to(args.device, dtype)
    grad = torch.randn(args.tokens, args.hidden, generator=g).to(args.device, dtype)
    return (x, logits, scales), grad


def run_mode(mode: str, args) -> None:
    inputs, grad = layer_inputs(args, getattr(torch, args.dtype))
    x, sync_free = inputs[0], mode == "sync-free"

    torch._dynamo.reset()
    explained = torch._dynamo.explain(layer)(dispatcher(args, sync_free), *inputs)
    torch._dynamo.reset()
    print(f"{mode}: {explained.graph_count} graph(s), {explained.graph_break_count} break(s) (torch._dynamo.explain)")
    for reason in explained.break_reasons:
        print(f"  break: {reason.reason.splitlines()[0][:120]}")

    results = {"eager": timings(layer, dispatcher(args, sync_free), inputs, grad, args)}
    if args.dispatcher:
        if "eager_ops" not in getattr(envs, "SWITCHES", {}):
            print("  (--dispatcher: this checkout has no direct eager path to compare)")
        else:
            with envs.testing_switches(eager_ops="dispatcher"):
                results["eager, op dispatcher"] = timings(layer, dispatcher(args, sync_free), inputs, grad, args)
    compiled = torch.compile(layer, backend=args.backend)
    start = time.perf_counter()
    compiled(dispatcher(args, sync_free), *inputs).backward(grad)
    print(f"  first compiled call (compiles forward and backward): {time.perf_counter() - start:.1f} s")
    results[f"compiled ({args.backend})"] = timings(compiled, dispatcher(args, sync_free), inputs, grad, args)
    if sync_free and args.device == "cuda":  # (graphs need static sizes: the sync-free layer's)
        results["captured by hand"] = captured_timings(dispatcher(args, True), inputs, grad, args)
        from torch._dynamo.utils import counters

        counters["inductor"].clear()
        overhead = torch.compile(layer, backend=args.backend, mode="reduce-overhead")
        d = dispatcher(args, True)
        for _ in range(3):  # (its first calls compile and record the graphs)
            x.grad = None
            overhead(d, *inputs).backward(grad)
        def stepped(*call):  # (a new step per call: a forward alone leaves its backward pending)
            torch.compiler.cudagraph_mark_step_begin()
            return overhead(*call)

        results["compiled (reduce-overhead)"] = timings(stepped, d, inputs, grad, args)
        graphs = {k: v for k, v in counters["inductor"].items() if k.startswith("cudagraph")}
        print(f"  reduce-overhead's CUDA-graph counters (cudagraph_skips: graphs run without one): {graphs}")
    for phase in ("forward", "fwd+bwd"):
        eager = results["eager"][phase]
        cells = [f"{name} {r[phase]:8.3f} ms ({r[phase] / eager:.2f}x)" for name, r in results.items()]
        print(f"  {phase:8s} " + " | ".join(cells))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_layer_arguments(parser)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--modes", default="default,sizes-in-graph,sync-free")
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument("--clock", choices=("wall", "process"), default="wall",
                        help="process: this process's CPU time (CPU runs on a machine others load)")
    parser.add_argument("--dispatcher", action="store_true", help="also time eager calls through the op dispatcher")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    fd.ops.load_kernels()
    print(f"flexdispatch {Path(fd.__file__).parent.parent}: T={args.tokens} H={args.hidden} E={args.experts} "
          f"K={args.topk} on {args.device} ({args.dtype}), torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads; median {args.clock} time of {args.runs} calls after {args.warmup}")
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(args.tokens, args.experts, generator=g).to(args.device)
    graph_floor(logits, args)
    for mode in args.modes.split(","):
        sizes_in_graph = mode == "sizes-in-graph"
        with torch._dynamo.config.patch(capture_dynamic_output_shape_ops=sizes_in_graph,
                                        capture_scalar_outputs=sizes_in_graph):
            run_mode(mode, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
