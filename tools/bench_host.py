"""Python host time of flexdispatch per forward + backward, on CPU: cProfile's own time of every
frame in the package (what the dispatcher's Python costs, kernels and torch ops excluded), per
manager and expert-parallel size, on rank 0.

    python tools/bench_host.py [--repo DIR] [--sizes 1,2,4] [--managers local,alltoall,nvlink]
        [--calls 40] [--tokens 64 --hidden 32 --topk 2] [--clock wall|thread] [--threads 1]

EP 1 runs in this process (the local manager); larger sizes spawn a gloo group on this machine.
``--repo`` measures another checkout of flexdispatch (e.g. an older commit in a git worktree);
``--repos A,B,... --rounds N`` measures several in turn, N rounds (each tree once a round, in a
process of its own), and prints per point the median (range) of each tree and its ratio to the
first, so that trees are compared in one sitting on the same machine. Small shapes keep the
host's share in view: the time that scales with the tokens is the kernels', not the Python's.
Each rank runs torch (and the CPU kernels) on ``--threads`` threads, 1 by default, as
``torchrun`` sets for several ranks a machine; 0 keeps torch's default (a thread a core in
every rank, so ranks that share the cores compete for them).
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import statistics
import sys
from pathlib import Path


def _setup(repo: str) -> None:
    sys.path.insert(0, repo)


def _layer(fd, torch, group, rank, world, manager, args):
    experts = 4 * world
    local = experts // world
    cfg = fd.MoEConfig(num_moe_experts=experts, moe_router_topk=args.topk, moe_flex_backend=manager)
    d = fd.MoEFlexTokenDispatcher(local, list(range(rank * local, (rank + 1) * local)), cfg, group)
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(args.tokens, args.hidden, generator=g, requires_grad=True)
    logits = torch.randn(args.tokens, experts, generator=g, requires_grad=True)

    def step():
        probs = torch.softmax(logits, -1)
        rows, tpe, pp = d.token_permutation(x, args.tokens, probs)
        out = d.token_unpermutation(rows * pp[:, None].to(rows.dtype))
        out.sum().backward()

    return step


def _measure(step, calls: int, package: str, barrier=lambda: None, top: int = 0,
             clock: str = "wall") -> tuple[float, float]:
    """(median wall ms of one forward + backward without the profiler, mean package-own ms of
    one under it, on ``clock``: "wall" or "thread", this thread's CPU time); ``top``: print the
    package's functions with the most own time."""
    import time

    from timing import own_us  # (here: timing imports torch, which _setup must not precede)

    for _ in range(5):
        step()
    walls = []
    for _ in range(calls):
        barrier()
        start = time.perf_counter()
        step()
        walls.append(time.perf_counter() - start)
    # (the thread's CPU time leaves out the time a rank spends descheduled, which the wall clock
    # charges to whatever frame it was in: on a machine with fewer cores than ranks, most of it)
    profile = cProfile.Profile(time.thread_time) if clock == "thread" else cProfile.Profile()
    for _ in range(calls):
        barrier()
        profile.enable()
        step()
        profile.disable()
    stats = pstats.Stats(profile).stats
    ranked = sorted(((tt, nc, f"{Path(path).name}:{line} {name}") for (path, line, name), (_, nc, tt, _, _)
                     in stats.items() if path.startswith(package)), reverse=True)
    for tt, nc, where in ranked[:top]:
        print(f"    {1e3 * tt / calls:7.3f} ms {nc / calls:6.1f} calls  {where}", flush=True)
    return 1e3 * statistics.median(walls), own_us(stats, calls, package) / 1e3


def _rank(rank: int, world: int, port: int, args, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    _setup(args.repo)
    import torch
    import torch.distributed as dist

    import flexdispatch as fd

    _set_threads(torch, args.threads)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    package = str(Path(fd.__file__).parent)
    results = {}
    for manager in args.managers:
        if manager == "local":
            continue
        step = _layer(fd, torch, dist.group.WORLD, rank, world, manager, args)
        results[manager] = _measure(step, args.calls, package, dist.barrier, args.top if rank == 0 else 0, args.clock)
    if rank == 0:
        queue.put(results)
    fd.shutdown()
    dist.destroy_process_group()


def _set_threads(torch, threads: int) -> None:
    if threads > 0:
        torch.set_num_threads(threads)


def comparison_lines(own: dict, repos: list, rounds: int,
                     what: str = "own ms of flexdispatch's Python per forward + backward") -> list:
    """The table of ``--repos``: ``own`` maps (point, repo) to the ms of every round (``what``
    they are); per point, each tree's median (range) and its ratio to the first tree's median."""
    lines = [f"{what}, median (range) of {rounds} rounds; ratio to {repos[0]}"]
    for point in dict.fromkeys(point for point, _ in own):
        base = own.get((point, repos[0]))
        cells = []
        for repo in repos:
            values = own.get((point, repo))
            if not values:
                cells.append(f"{repo}: -")
                continue
            mid = statistics.median(values)
            ratio = f" {mid / statistics.median(base):.2f}x" if base and repo != repos[0] else ""
            cells.append(f"{repo}: {mid:.3f} ({min(values):.3f}-{max(values):.3f}){ratio}")
        lines.append(f"{point:<12} " + " | ".join(cells))
    return lines


def _compare(args, passed: list) -> int:
    """Run this tool on every tree of ``args.repos`` in turn, ``args.rounds`` times, each run in
    a process of its own; print :func:`comparison_lines`."""
    import subprocess

    repos = args.repos.split(",")
    own: dict = {}
    wall: dict = {}
    for _ in range(args.rounds):
        for repo in repos:
            out = subprocess.run([sys.executable, __file__, "--repo", repo, *passed], check=True,
                                 capture_output=True, text=True).stdout
            for line in out.splitlines():
                if line.startswith("EP "):
                    point, fields = " ".join(line.split()[:3]), line.split()
                    own.setdefault((point, repo), []).append(float(fields[-1]))
                    wall.setdefault((point, repo), []).append(float(fields[3]))
    print("\n".join(comparison_lines(own, repos, args.rounds)), flush=True)
    print("\n".join(comparison_lines(wall, repos, args.rounds, "wall ms per forward + backward, unprofiled "
                                                              "(rank 0; on groups, peers' waits included)")), flush=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repo", default=str(Path(__file__).resolve().parents[1]),
                        help="the checkout of flexdispatch to measure (default: this one)")
    parser.add_argument("--sizes", default="1,2,4", help="expert-parallel sizes (1: the local manager, in-process)")
    parser.add_argument("--managers", default="local,alltoall,nvlink")
    parser.add_argument("--calls", type=int, default=40, help="profiled forward + backward calls per point")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--topk", type=int, default=2)
    parser.add_argument("--top", type=int, default=0, help="print the package's functions with the most own time")
    parser.add_argument("--clock", choices=("wall", "thread"), default="wall",
                        help="the profiler's clock: wall time, or each rank's own CPU time (thread)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch's threads in each rank (0: torch's default, a thread a core)")
    parser.add_argument("--repos", help="several checkouts, comma-separated, measured in turn (see --rounds)")
    parser.add_argument("--rounds", type=int, default=5, help="with --repos: rounds over the trees")
    args = parser.parse_args()
    if args.repos:
        return _compare(args, [f"--{name}={getattr(args, name)}"
                               for name in ("sizes", "managers", "calls", "tokens", "hidden", "topk", "clock",
                                            "threads")])
    args.managers = args.managers.split(",")
    _setup(args.repo)
    import torch
    import torch.multiprocessing as mp
    from timing import run_ranks

    import flexdispatch as fd

    _set_threads(torch, args.threads)
    package = str(Path(fd.__file__).parent)
    print(f"flexdispatch at {package}; tokens {args.tokens}, hidden {args.hidden}, top-k {args.topk}, "
          f"{args.calls} calls a point, {torch.get_num_threads()} thread(s) a rank; ms per forward + backward: wall (unprofiled) / flexdispatch's own Python (profiled)")
    for size in (int(s) for s in args.sizes.split(",")):
        if size == 1:
            if "local" in args.managers:
                wall, own = _measure(_layer(fd, torch, None, 0, 1, "local", args), args.calls, package, top=args.top,
                                     clock=args.clock)
                print(f"EP 1 local     {wall:8.3f} / {own:8.3f}", flush=True)
            continue
        queue = mp.get_context("spawn").Queue()
        try:
            run_ranks(_rank, size, args, queue)  # (rank 0's results are a few numbers: the queue holds them)
            exit_error = None
        except mp.ProcessExitedException as exc:  # (an older tree may abort at exit, after measuring)
            exit_error = exc
        results = queue.get(timeout=60)  # (nothing measured: queue.Empty)
        for manager, (wall, own) in results.items():
            print(f"EP {size} {manager:<9} {wall:8.3f} / {own:8.3f}", flush=True)
        if exit_error is not None:
            print(f"  (measured; then a rank exited abnormally: {exit_error})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
