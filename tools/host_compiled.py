"""Whose host time a compiled one-rank layer spends: flexdispatch's Python or torch's.

    python tools/host_compiled.py [--tokens 1024 --hidden 1024 --experts 32 --topk 4]
        [--mode reduce-overhead|default] [--backend inductor] [--device cuda|cpu]
        [--calls 100] [--top 20]

The sync-free layer of ``bench_compile.py`` (router softmax, ``token_permutation`` on the local
manager, elementwise experts, ``token_unpermutation``), compiled with ``torch.compile(mode=...)``
(``reduce-overhead``, torch's CUDA graphs, needs CUDA; a new step is marked before each call).
Prints, per forward and per forward + backward: the wall ms from a synchronized device (median
of ``--calls``) and, with ``reduce-overhead``, the same layer captured by hand beside it; the
host us a call with the calls queued (``timing.host_us``); then cProfile's own time over
``--calls`` forwards + backwards, all of it and flexdispatch's frames' share, with the
``--top`` frames; on CUDA, the runtime calls that queue work in one forward + backward
(``host_layer.queued_ops``: outside the graphs, input copies and graph launches).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import types
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

import flexdispatch as fd  # noqa: E402
from bench_compile import add_layer_arguments, captured_timings, dispatcher, layer, layer_inputs, median_ms  # noqa: E402
from host_layer import queued_ops  # noqa: E402
from timing import host_us, own_us  # noqa: E402


def own_time(fn, calls: int) -> tuple[float, float, list]:
    """(all frames' own us a call, flexdispatch's frames' own us a call, the frames as
    (us a call, calls a call, where), most own time first) of ``calls`` calls of ``fn``."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    profiler.disable()
    stats = pstats.Stats(profiler).stats
    rows = sorted(((1e6 * tt / calls, nc / calls, f"{path.split('site-packages/')[-1]}:{line} {name}")
                   for (path, line, name), (_, nc, tt, _, _) in stats.items()), reverse=True)
    return own_us(stats, calls), own_us(stats, calls, str(Path(fd.__file__).parent)), rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_layer_arguments(parser)
    parser.add_argument("--mode", choices=("reduce-overhead", "default"), default="reduce-overhead")
    parser.add_argument("--backend", default="inductor")
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args()
    if args.mode == "reduce-overhead" and args.device != "cuda":
        parser.error("--mode reduce-overhead needs --device cuda (torch's CUDA graphs)")
    timed = types.SimpleNamespace(device=args.device, runs=args.calls, warmup=5, clock="wall")
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    inputs, grad = layer_inputs(args, dtype)
    x = inputs[0]
    d = dispatcher(args, True)
    compiled = torch.compile(layer, backend=args.backend, mode=None if args.mode == "default" else args.mode)
    step_begin = torch.compiler.cudagraph_mark_step_begin if args.mode == "reduce-overhead" else (lambda: None)

    def forward():
        step_begin()  # (a forward alone leaves its backward pending: each call is a step of its own)
        return compiled(d, *inputs)

    def forward_backward():
        x.grad = None
        forward().backward(grad)

    for _ in range(4):  # (the first calls compile, and with reduce-overhead record the graphs)
        forward_backward()
    device = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"compiled one-rank layer ({args.mode}, {args.backend}), sync-free: T={args.tokens} H={args.hidden} "
          f"E={args.experts} K={args.topk} {dtype} on {device}, torch {torch.__version__}")
    cells = {"forward": median_ms(forward, timed), "fwd+bwd": median_ms(forward_backward, timed)}
    line = f"wall ms from a synchronized device: forward {cells['forward']:.3f}, forward + backward {cells['fwd+bwd']:.3f}"
    if args.mode == "reduce-overhead":
        hand = captured_timings(dispatcher(args, True), inputs, grad, timed)
        line += (f"; captured by hand {hand['forward']:.3f} / {hand['fwd+bwd']:.3f} "
                 f"({cells['forward'] / hand['forward']:.2f}x / {cells['fwd+bwd'] / hand['fwd+bwd']:.2f}x)")
    print(line)
    print(f"host us a call, queued: forward {host_us(forward, args.device, args.calls):.1f}, "
          f"forward + backward {host_us(forward_backward, args.device, args.calls):.1f}")
    total, ours, rows = own_time(forward_backward, args.calls)
    print(f"cProfile, forward + backward: own time {total:.1f} us a call, of which flexdispatch's frames "
          f"{ours:.1f} us ({100 * ours / total:.1f}%)")
    for us, calls, where in rows[:args.top]:
        print(f"  {us:8.2f} us {calls:5.1f}x  {where}")
    if args.device == "cuda":
        queued = [name for name, _ in queued_ops(forward_backward, "cuda")]
        print(f"CUDA runtime calls that queue work, one forward + backward ({len(queued)}): {', '.join(queued)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
