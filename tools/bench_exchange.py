"""Host and GPU time of the NVLink manager's exchange and its parts, on W local GPUs.

    python tools/bench_exchange.py --world-size 2

For each item: host microseconds a call (Python included; calls queued back to back, then
one sync) and GPU microseconds a call (CUDA events around a batch). Items: symmetric memory's
own barrier, our signal-pad barrier (``peer_barrier``), a 1 KiB device copy, an empty kernel
launch for scale, and a whole exchange (header and a 64 KiB part) with either barrier.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

sys.path[:0] = [str(Path(__file__).resolve().parents[1])]

from flexdispatch import ops  # noqa: E402
from flexdispatch.managers import peer_buffers  # noqa: E402
from timing import init_rank, run_ranks  # noqa: E402


def _time(fn, iters: int) -> tuple[float, float]:
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    dist.barrier()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0 = time.perf_counter()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    host = (time.perf_counter() - t0) / iters * 1e6
    torch.cuda.synchronize()
    return host, start.elapsed_time(end) / iters * 1e3


def _worker(rank, world, port, args):
    init_rank(rank, world, port)
    ops.load_kernels()
    device = torch.device("cuda", rank)
    transport = peer_buffers.transport_for(dist.group.WORLD, device)
    transport.ensure(1 << 22)
    header = torch.arange(16, dtype=torch.int64, device=device)
    part = torch.randn(128, 256, device=device)  # 128 KiB
    small = torch.randn(256, device=device)
    dst = torch.empty_like(small)
    scratch = torch.empty(1, device=device)

    def exchange(own: bool):
        def run():
            transport.own_barrier = own
            transport.exchange(header, [(part, 128)])
        return run

    def barrier(own: bool):
        def run():
            transport.own_barrier = own
            transport.barrier()
        return run

    items = [("symmetric memory barrier", barrier(False)),
             ("peer_barrier (ours)", barrier(True)),
             ("1 KiB device copy", lambda: dst.copy_(small)),
             ("empty kernel (zero_ of 1 value)", lambda: scratch.zero_()),
             ("exchange, symmetric memory barrier", exchange(False)),
             ("exchange, our barrier", exchange(True))]
    rows = [(name, *_time(fn, args.iters)) for name, fn in items]
    if rank == 0:
        print(f"{world} x {torch.cuda.get_device_name()}, {args.iters} calls each")
        print("| item | host us a call | GPU us a call |\n|---|---|---|")
        for name, host, gpu in rows:
            print(f"| {name} | {host:.1f} | {gpu:.1f} |", flush=True)
    torch.cuda.synchronize()
    peer_buffers.release()
    dist.destroy_process_group()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--iters", type=int, default=200)
    args = parser.parse_args()
    run_ranks(_worker, args.world_size, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
