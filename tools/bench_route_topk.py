"""Sweep the router's top-k (``ops.route_topk_trusted``: selection and check in one kernel) over
rows, experts and k on one GPU (or the CPU), against ``torch.topk`` alone and ``torch.topk``
followed by ``check_route`` (the steps it replaces).

On CUDA each figure is the device time of one call in microseconds: ``--calls`` calls captured
in one CUDA graph, its replay timed with CUDA events, divided by the calls, the median of
``--replays`` (no host time). On the CPU (``--device cpu``, the CPU build of the same
algorithm) it is the wall time of a call: ``--calls`` calls in a row, the median of 5 such
batches. Probs are a softmax of random logits in float32. The last column is the fused op's
time over topk + check. Every shape is first checked against
``flexdispatch.reference.route_topk`` on tied, NaN and infinite probs (a mismatch is printed
and counted; the exit status is 1 if any).

    python tools/bench_route_topk.py [--rows 128,1024,16384] [--experts 8,64,256] [--topk 2,8]
        [--device cuda|cpu]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from flexdispatch import ops, reference  # noqa: E402
from timing import capture, host_us, median_ms  # noqa: E402


def graph_us(fn, calls: int, replays: int) -> float:
    """Device microseconds of one call of ``fn``, from replays of a graph of ``calls`` calls."""
    (graph,) = capture(lambda: [fn() for _ in range(calls)])
    return median_ms(graph.replay, replays, warmup=1) * 1e3 / calls


def topk_then_check(probs: torch.Tensor, topk: int):
    """What route_topk replaces: ``torch.topk`` of ``probs [R, E]``, then the route check."""
    values, indices = torch.topk(probs, topk, dim=-1)
    return ops.check_route_trusted(indices, probs.shape[1], 0, values, None)


def selects_as_the_reference(rows: int, experts: int, topk: int, device: str) -> bool:
    """route_topk on ``device`` against the reference on the CPU: ties, a NaN and an infinity."""
    probs = torch.softmax(torch.randn(rows, experts, device=device), -1)
    probs = (probs * 4 * experts).floor() / (4 * experts)
    probs[0, : min(3, experts)] = float("nan")
    probs[min(1, rows - 1), 5 % experts] = float("inf")
    values, indices, _, _ = ops.route_topk_trusted(probs, topk, 0, None)
    ref_values, ref_indices = reference.route_topk(probs.cpu(), topk)
    return torch.equal(indices.cpu(), ref_indices) and torch.equal(values.cpu().nan_to_num(7), ref_values.nan_to_num(7))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="128,512,1024,2048,4096,16384")
    parser.add_argument("--experts", default="8,16,32,64,128,256,512,1024")
    parser.add_argument("--topk", default="2,8,20")
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--replays", type=int, default=15)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.device == "cuda":
        print(f"device: {torch.cuda.get_device_name()}; torch {torch.__version__}; device us a call")
        time_us = lambda fn: graph_us(fn, args.calls, args.replays)  # noqa: E731
    else:
        print(f"device: CPU, {torch.get_num_threads()} threads; torch {torch.__version__}; wall us a call")
        time_us = lambda fn: host_us(fn, "cpu", args.calls)  # noqa: E731
    print("| rows | experts | k | route_topk | torch.topk | topk + check | ratio |")
    print("|---|---|---|---|---|---|---|")
    mismatches = 0
    for rows in map(int, args.rows.split(",")):
        for experts in map(int, args.experts.split(",")):
            for topk in map(int, args.topk.split(",")):
                if topk > experts:
                    continue
                if not selects_as_the_reference(rows, experts, topk, args.device):
                    mismatches += 1
                    print(f"MISMATCH at {rows} x {experts}, k {topk}")
                probs = torch.softmax(torch.randn(rows, experts, device=args.device), -1)
                fused = time_us(lambda: ops.route_topk_trusted(probs, topk, 0, None))
                alone = time_us(lambda: torch.topk(probs, topk, dim=-1))
                both = time_us(lambda: topk_then_check(probs, topk))
                print(f"| {rows} | {experts} | {topk} | {fused:.1f} | {alone:.1f} | {both:.1f} | {fused / both:.2f} |",
                      flush=True)
    print(f"mismatches: {mismatches}")
    return 1 if mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
