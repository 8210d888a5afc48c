"""Where the host time of one eager layer call goes: cProfile of rank 0 over a few forwards
(the layer of ``bench_dispatch.py``, the same variants), on W local GPUs.

    python tools/profile_host.py --world-size 2 --manager nvlink --shape 2 --calls 20

Prints the functions with the most own time and the most cumulative time, and the mean host
time of one forward (GPU idle at the start: the calls are timed one by one after a sync).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

import flexdispatch as fd  # noqa: E402
from bench_dispatch import SHAPES, Layer  # noqa: E402
from timing import init_rank, run_ranks  # noqa: E402


def _worker(rank, world, port, args):
    init_rank(rank, world, port)
    layer = Layer(rank, world, *SHAPES[args.shape], args.manager)
    for _ in range(5):  # warm up: buffers, kernels, allocator
        layer.forward(layer.x, layer.probs)
    torch.cuda.synchronize()
    profile, spent = cProfile.Profile(), 0.0
    for _ in range(args.calls):
        dist.barrier()
        torch.cuda.synchronize()
        start = time.perf_counter()
        profile.enable()
        layer.forward(layer.x, layer.probs)
        profile.disable()
        spent += time.perf_counter() - start
    if rank == 0:
        out = io.StringIO()
        stats = pstats.Stats(profile, stream=out)
        stats.sort_stats("tottime").print_stats(args.top)
        stats.sort_stats("cumulative").print_stats(args.top)
        print(f"{args.manager} shape {SHAPES[args.shape]} on {world} GPUs: host ms per forward "
              f"{1e3 * spent / args.calls:.3f} (profiled)\n{out.getvalue()}", flush=True)
    if args.torch_profile:  # host time per op (self CPU) and the kernels a forward launches
        from torch.profiler import ProfilerActivity, profile as torch_profile

        with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(args.calls):
                layer.forward(layer.x, layer.probs)
            torch.cuda.synchronize()
        if rank == 0:
            events = prof.key_averages()
            kernels = sum(e.count for e in events if e.device_type.name == "CUDA")
            print(f"torch profiler, {args.calls} forwards: {kernels / args.calls:.1f} GPU activities a forward\n"
                  + events.table(sort_by="self_cpu_time_total", row_limit=args.top), flush=True)
    torch.cuda.synchronize()
    fd.shutdown()
    dist.destroy_process_group()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--manager", default="nvlink")
    parser.add_argument("--shape", type=int, default=2, help="index into bench_dispatch.SHAPES")
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--torch-profile", action="store_true", help="also the torch profiler's host time per op")
    args = parser.parse_args()
    run_ranks(_worker, args.world_size, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
