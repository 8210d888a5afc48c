"""Shared by the GPU tools: CUDA-event timing (warm up, then the median of many runs), host time
per call and cProfile's top functions, and one process per local GPU on an NCCL group."""

import cProfile
import io
import os
import pstats
import socket
import statistics
import time
from typing import Callable, Optional

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def run_ranks(worker: Callable, world: int, *args) -> None:
    """``worker(rank, world, port, *args)`` in ``world`` spawned processes (a free local port
    for their rendezvous); returns when every one has."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(worker, args=(world, port, *args), nprocs=world, start_method="spawn")


def init_rank(rank: int, world: int, port: int) -> None:
    """This process's GPU and its NCCL process group (the rank launched by :func:`run_ranks`)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=torch.device("cuda", rank))


def median_ms(fn: Callable[[], object], iters: int, warmup: int = 3,
              before_each: Optional[Callable[[], object]] = None) -> float:
    """Median milliseconds of ``fn`` over ``iters`` runs after ``warmup`` runs, timed with CUDA
    events; ``before_each`` (e.g. a barrier) runs, untimed, before every timed run."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        if before_each is not None:
            before_each()
            torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def one_call_events(fn: Callable[[], object]) -> list:
    """torch.profiler's events, host and device, of one call of ``fn`` after a warm-up call."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return list(prof.events())


def device_ops(events: list) -> list:
    """The device operations (kernels, copies, fills) among profiler ``events``: (name, device
    microseconds) each, in queue order."""
    return [(e.name, e.device_time_total) for e in events if e.device_type == torch.autograd.DeviceType.CUDA]


def host_us(fn: Callable[[], object], device: str, calls: int, warmup: int = 20) -> float:
    """Host microseconds a call of ``fn``: ``calls`` calls queued with one sync after them, the
    median of 5 such batches (on a GPU, the host's pace whenever it is slower than the device's)."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    batches = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        batches.append((time.perf_counter() - start) / calls * 1e6)
        sync()
    return statistics.median(batches)


def print_host_rounds(title: str, rows: list, device: str, calls: int, rounds: int) -> None:
    """``title``, then ``rounds`` rounds of ``round R  LABEL  US`` lines: :func:`host_us` of every
    ``(label, fn)`` of ``rows`` in turn (the format the host tools print and their tests read)."""
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"{title} on {device} ({name}), torch {torch.__version__}; host us a call")
    for r in range(rounds):
        for label, fn in rows:
            print(f"round {r + 1}  {label:36s} {host_us(fn, device, calls):7.1f}")


def own_us(stats: dict, calls: int, under: str = "") -> float:
    """Own microseconds a call of the frames in cProfile's ``stats`` (``pstats.Stats(...).stats``
    of ``calls`` calls) whose file lies under the folder ``under`` (every frame: "")."""
    return 1e6 * sum(tt for (path, _, _), (_, _, tt, _, _) in stats.items() if path.startswith(under)) / calls


def own_time_top(fn: Callable[[], object], device: str, calls: int, top: int) -> str:
    """cProfile's ``top`` functions by own time over ``calls`` calls of ``fn`` (the extension's
    rows hold its C++ side), as text."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    profiler.disable()
    if device == "cuda":
        torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
    return text.getvalue()


def capture(*fns: Callable[[], object], warmup: int = 3) -> list:
    """One CUDA graph per function of ``fns``, captured in order after ``warmup`` calls of each
    on a side stream (as ``torch.cuda.graph`` asks)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            for fn in fns:
                fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graphs = []
    for fn in fns:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        graphs.append(graph)
    return graphs


def back_to_back_ms(fn: Callable[[], object], iters: int, repeats: int = 5, warmup: int = 3) -> float:
    """Milliseconds of one call of ``fn`` queued back to back with the others: CUDA events
    around ``iters`` calls, divided by ``iters``, the median of ``repeats`` such batches. The
    host's time per call is hidden whenever it is shorter than the GPU's, so this is the
    kernels' own time (their throughput); :func:`median_ms` times a call from an idle GPU,
    host time before its first launch included."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / iters)
    return statistics.median(times)
