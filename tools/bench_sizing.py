"""A one-rank layer's full route sized by its shape against sized at a sync, eager and compiled.

    python tools/bench_sizing.py [--shapes 1024,1024,32,4 8192,2048,128,8 ...] [--calls 100]
        [--device cuda|cpu] [--dtype bfloat16] [--kernels N]

The layer is ``bench_compile.py``'s (router softmax, ``token_permutation`` on the local manager,
elementwise experts, ``token_unpermutation``), sized on the host (not sync-free). Routed from
dense probs, its route is full and the manager sizes the permutation by its T * K rows
(``sized_by_route``: one wait, for the layout copied before the rows move; the step traced by
torch.compile, one graph); the baseline is the same dispatcher with its manager's
``sizes_full_routes`` off, which sizes at a sync as every other route does (count, wait, map and
scatter; the step run eagerly under torch.compile, two graphs around one break). Four
variants (route or sync sizing, eager or compiled, each compiled one from its own code object)
are called in turn, the order reversed every round, each call timed from a synchronized device
to its end: the host's drift within the run falls on all four alike. Prints per shape and
phase (forward; forward + backward) the median ms with the quartiles, and the ratios. Exits 1
when the two eager sizings' outputs differ (they must move the same rows). ``--kernels N`` (CUDA)
then lists each compiled variant's N longest device operations of one forward (torch.profiler),
which shows where the two compiled forwards differ; ``TORCH_LOGS=output_code`` before the command
prints inductor's generated code for both.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import types
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

import flexdispatch as fd  # noqa: E402
from bench_compile import dispatcher, layer, layer_inputs  # noqa: E402
from timing import device_ops, one_call_events  # noqa: E402


def _own_code(fn, name: str):
    """``fn`` under a code object of its own: torch.compile caches per code object, so two
    compiled copies keep apart the entries (and guards) of their dispatchers."""
    return types.FunctionType(fn.__code__.replace(co_name=name), fn.__globals__, name)


def _variants(args) -> dict:
    """(sizing, kind) -> (layer function, its dispatcher)."""
    variants = {}
    for sizing in ("route", "sync"):
        for kind in ("eager", "compiled"):
            d = dispatcher(args, False)
            if sizing == "sync":
                d._comm_manager.sizes_full_routes = False  # (as every route but a full one is sized)
            fn = layer if kind == "eager" else torch.compile(_own_code(layer, f"layer_{sizing}"))
            variants[(sizing, kind)] = (fn, d)
    return variants


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["1024,1024,32,4", "8192,2048,128,8", "4096,7168,256,8"],
                        help="T,H,E,K each")
    parser.add_argument("--calls", type=int, default=100, help="timed calls of each variant a phase")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--kernels", type=int, default=0,
                        help="CUDA: list each compiled variant's N longest device operations of one forward")
    args = parser.parse_args()
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    fd.ops.load_kernels()
    card = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(f"flexdispatch {Path(fd.__file__).parent.parent} on {card}, torch {torch.__version__}, {args.dtype}")
    for shape in args.shapes:
        args.tokens, args.hidden, args.experts, args.topk = map(int, shape.split(","))
        (x, logits, scales), grad = layer_inputs(args, getattr(torch, args.dtype))
        torch._dynamo.reset()
        variants = _variants(args)
        outputs = [fn(d, x, logits, scales) for key, (fn, d) in variants.items() if key[1] == "eager"]
        if not torch.equal(*outputs):
            print("the two sizings' eager outputs differ", file=sys.stderr)
            return 1
        print(f"T={args.tokens} H={args.hidden} E={args.experts} K={args.topk}: median ms of {args.calls} calls "
              f"each, interleaved (quartiles)")
        for phase in ("forward", "fwd+bwd"):
            def call(fn, d):
                if phase == "forward":
                    return fn(d, x, logits, scales)
                x.grad = None
                return fn(d, x, logits, scales).backward(grad)

            for fn, d in variants.values():  # (warm-up; the compiled ones compile here)
                for _ in range(5):
                    call(fn, d)
            keys, times = list(variants), {key: [] for key in variants}
            for i in range(args.calls):
                for key in keys if i % 2 == 0 else keys[::-1]:
                    sync()
                    start = time.perf_counter()
                    call(*variants[key])
                    sync()
                    times[key].append(1e3 * (time.perf_counter() - start))
            med = {key: statistics.median(v) for key, v in times.items()}
            cells = []
            for key, v in times.items():
                low, _, high = statistics.quantiles(v, n=4)
                cells.append(f"{key[0]} {key[1]} {med[key]:.3f} ({low:.3f}-{high:.3f})")
            print(f"  {phase}: " + " | ".join(cells))
            print(f"  {phase}: route / sync eager {med[('route', 'eager')] / med[('sync', 'eager')]:.2f}x, "
                  f"compiled {med[('route', 'compiled')] / med[('sync', 'compiled')]:.2f}x; compiled / eager "
                  f"route {med[('route', 'compiled')] / med[('route', 'eager')]:.2f}x, "
                  f"sync {med[('sync', 'compiled')] / med[('sync', 'eager')]:.2f}x")
        if args.kernels and args.device == "cuda":
            for (sizing, kind), (fn, d) in variants.items():
                if kind == "compiled":
                    ops = sorted(device_ops(one_call_events(lambda: fn(d, x, logits, scales))), key=lambda o: -o[1])
                    print(f"  compiled forward, {sizing}: the {args.kernels} longest device operations, us: " +
                          "; ".join(f"{name[:60]} {us:.1f}" for name, us in ops[:args.kernels]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
