"""CUDA-event timing shared by the benchmarks: warm up, then the median of many runs."""

import statistics
from typing import Callable, Optional

import torch


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
