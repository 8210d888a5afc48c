"""Where a small batch's permute + unpermute spends its time: the host, layer by layer.

    python tools/host_small_batch.py [--rows 1024 --hidden 1024 --experts 8 --topk 4]
        [--route index|map|fp8] [--device cuda|cpu] [--calls 300] [--top 20]

A 1024 x 1024 permutation moves 8 MB, microseconds of bandwidth, yet takes about 0.1 ms back to
back: the host's time per call, not the GPU's. This prints, per call (wall time of many calls
queued with one sync at the end, median of 5 batches):

  pair            the permutation (output size known) + ops.unpermute, as the managers call them:
                  ops.permute_by_indices (--route index), ops.permute of the same routing as a
                  multihot map (map), or ops.permute_fp8_by_indices of the rows quantized (fp8)
  permute         the permutation alone
  unpermute       the restore alone
  kernels only    (index) the two extension calls the ops end in (flexdispatch_C.permute,
                  .gather_rows): the C++ side, allocations and launches, without the Python around
  launch floor    one ``add_`` on a one-element tensor (torch's cheapest device op)

and, on CUDA, the pair's device time without the host: one pair captured in a CUDA graph,
replayed back to back (microseconds a replay); the host time of one permutation (and of the
launch floor) queued behind about a millisecond of device work (``torch.cuda._sleep``): a
launch that waits for the device to drain, as a cooperative one might, takes that long here,
while its time among calls queued back to back hides it;

then the device operations one pair queues (kernels, copies, fills: torch.profiler) with the
host time of each CUDA runtime call, and cProfile's top functions of the pair by own time
(the extension calls' rows hold the C++ side). On ``--device cpu`` the same runs with the CPU
kernels (a smoke test of the tool; the numbers are not the question there).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from flexdispatch import _library, ops, reference  # noqa: E402
from timing import back_to_back_ms, capture, device_ops, host_us, one_call_events, own_time_top  # noqa: E402


def host_us_behind_work(fn, cycles: int = 2_000_000, repeats: int = 7) -> float:
    """Median host microseconds of one call of ``fn`` queued behind ``torch.cuda._sleep(cycles)``
    (about a millisecond of device work on an H100), from a synchronized device each time."""
    import statistics
    import time

    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        torch.cuda._sleep(cycles)
        start = time.perf_counter()
        fn()
        times.append(1e6 * (time.perf_counter() - start))
    torch.cuda.synchronize()
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--topk", type=int, default=4)
    parser.add_argument("--route", choices=("index", "map", "fp8"), default="index")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args()
    dev, rows, experts, topk = args.device, args.rows, args.experts, args.topk
    if not ops.load_kernels():
        print("flexdispatch's kernels did not build here", file=sys.stderr)
        return 1
    g = torch.Generator().manual_seed(0)
    idx = torch.rand(rows, experts, generator=g).argsort(dim=1)[:, :topk].contiguous().to(dev)
    probs = torch.rand(rows, topk, generator=g).to(dev)
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    x = torch.randn(rows, args.hidden, generator=g).to(dev, dtype)
    n = rows * topk
    routing_map, map_probs = (t.contiguous() for t in reference.indices_to_multihot(idx, probs, experts))
    q, scales = ops.quantize_fp8(x)

    def permute():
        if args.route == "map":
            return ops.permute(x, routing_map, map_probs, num_out_tokens=n)
        if args.route == "fp8":
            return ops.permute_fp8_by_indices(q, scales, idx, probs, num_experts=experts, num_out_tokens=n,
                                              dtype=dtype)
        return ops.permute_by_indices(x, idx, probs, num_experts=experts, num_out_tokens=n)

    route_probs = map_probs if args.route == "map" else probs
    out, _, plan, _ = permute()
    C = _library.kernels()

    def pair():
        permuted, _, p, _ = permute()
        return ops.unpermute(permuted, p, route_probs)

    try:  # (the binding's last argument, the error word's address, is new: A/B runs time older trees too)
        C.permute(idx, experts, 1, n, x, probs, 0)
        no_word = (0,)
    except TypeError:
        no_word = ()

    def kernels_only():
        permuted, _, row_map, _, _ = C.permute(idx, experts, 1, n, x, probs, *no_word)
        return C.gather_rows(permuted, row_map, probs)

    if args.route == "index" and not torch.equal(pair(), kernels_only()):  # (the two must time the same work)
        print("the extension calls alone do not give the ops' result", file=sys.stderr)
        return 1
    one = torch.ones(1, device=dev)
    print(f"R x H = {rows} x {args.hidden}, E = {experts}, K = {topk}, {args.route} route, {dtype}, on {dev} "
          f"({torch.cuda.get_device_name() if dev == 'cuda' else 'CPU'}), torch {torch.__version__}")
    restore = lambda: ops.unpermute(out, plan, route_probs)  # noqa: E731
    for label, fn in [("pair", pair), ("permute", permute), ("unpermute", restore),
                      ("kernels only", kernels_only if args.route == "index" else None),
                      ("launch floor", lambda: one.add_(1))]:
        if fn is not None:
            print(f"host us per call, {label}: {host_us(fn, dev, args.calls):.1f}")

    if dev == "cuda":
        (graph,) = capture(pair)
        print(f"device us per pair, captured in a CUDA graph: {back_to_back_ms(graph.replay, 200) * 1000:.1f}")
        print(f"host us of one call queued behind ~1 ms of device work: permute {host_us_behind_work(permute):.1f}, "
              f"launch floor {host_us_behind_work(lambda: one.add_(1)):.1f}")
        events = one_call_events(pair)
        queued = device_ops(events)
        print(f"device operations one pair queues: {len(queued)}")
        for name, _ in queued:
            print(f"  {name[:90]}")
        runtime = [e for e in events if e.name.startswith("cuda") and e.device_type != torch.autograd.DeviceType.CUDA]
        print("CUDA runtime calls of one pair, host us: " + ", ".join(f"{e.name} {e.cpu_time_total:.1f}" for e in runtime))

    print(f"cProfile of {args.calls} pairs, by own time:\n{own_time_top(pair, dev, args.calls, args.top)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
