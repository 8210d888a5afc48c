"""Two-rank gloo jobs that end as applications end, to count the ones that abort at exit.

A job is two fresh interpreters (as a launcher starts them) joined by
``init_process_group("gloo", init_method="tcp://127.0.0.1:PORT")``; each runs one pattern of
use and exits. An abort at exit ("terminate called without an active exception", SIGABRT)
marks the job failed, as a launcher would.

    python tests/exit_jobs.py [--jobs N] [--parallel P] [pattern ...]

counts aborts over N jobs of every pattern named (all by default). ``tests/test_exit.py``
runs a few of them in CI. ``python tests/exit_jobs.py --rank R --port P pattern`` is one rank.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from dist_pool import _free_port

REPO = Path(__file__).resolve().parents[1]

PATTERNS = ("alltoall", "nvlink", "steps", "no_teardown", "after_error", "abandoned", "torch_control",
            "torch_no_teardown")
"""alltoall / nvlink: the one-call API (forward and backward) on that backend, then
flexdispatch.shutdown() and destroy_process_group(); steps: the step-by-step API, then the
same teardown; no_teardown: the one-call API, and the script just ends; after_error: a call
that raises on every rank (a bad index on rank 0), a recovered call, then the teardown;
abandoned: the one-call API, then a dispatch given up half-way with reset(), then the teardown;
torch_control: plain torch keeping a reference to the group past destroy_process_group (what
flexdispatch must not do; aborts without any flexdispatch code); torch_no_teardown: plain torch's
all-to-all, and the script just ends (no destroy_process_group)."""


def _rank_main(rank: int, world: int, port: int, pattern: str) -> None:
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    if pattern == "torch_no_teardown":
        t = torch.ones(4)
        dist.all_to_all_single(torch.empty(4), t)
        return
    if pattern == "torch_control":
        held = dist.group.WORLD
        t = torch.ones(4)
        dist.all_reduce(t, group=held)
        dist.destroy_process_group()
        _keep.append(held)  # kept past destroy_process_group on purpose
        return
    import flexdispatch as fd

    experts, topk, tokens, hidden = 2 * world, 2, 8, 4
    backend = "nvlink" if pattern == "nvlink" else "alltoall"
    d = fd.MoEFlexTokenDispatcher(2, [2 * rank, 2 * rank + 1],
                                  fd.MoEConfig(num_moe_experts=experts, moe_router_topk=topk,
                                               moe_flex_backend=backend), dist.group.WORLD)
    x = torch.randn(tokens, hidden, requires_grad=True)
    probs = torch.softmax(torch.randn(tokens, experts), -1).requires_grad_()
    if pattern == "after_error":
        indices = torch.topk(probs.detach(), topk).indices
        if rank == 0:
            indices[1, 0] = experts + 5
        try:
            d.token_permutation2(x, tokens, probs.detach()[:, :topk], indices)
        except ValueError:
            pass
        else:
            raise AssertionError("the bad index did not raise")
    if pattern == "steps":
        h, _ = d.dispatch_preprocess(x, tokens, probs)
        h, _ = d.dispatch_all_to_all(h)
        rows, tpe, pp = d.dispatch_postprocess(h)
        out = d.combine_postprocess(d.combine_all_to_all(d.combine_preprocess(rows * pp[:, None])))
    else:
        rows, tpe, pp = d.token_permutation(x, tokens, probs)
        out = d.token_unpermutation(rows * pp[:, None])
    out.sum().backward()
    if pattern == "abandoned":  # (an exception in the experts, say)
        h, _ = d.dispatch_preprocess(torch.randn(64, hidden), 64, torch.rand(64, experts))
        d.dispatch_all_to_all(h)
        d.reset()
    if pattern != "no_teardown":
        fd.shutdown()
        dist.destroy_process_group()
    # the interpreter exits here, with the dispatcher and its outputs still alive (as
    # module-level layers of an application are)
    _keep.extend([d, rows, out])


_keep: list = []


def run_job(pattern: str, env: dict | None = None, timeout: float = 120.0) -> tuple[bool, str]:
    """One two-rank job: ``(aborted, what)``; ``what`` describes a failed rank."""
    port = _free_port()
    env = dict(os.environ if env is None else env, PYTHONPATH=str(REPO), FLEXDISPATCH_LOG_LEVEL="WARNING",
               OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, __file__, "--rank", str(r), "--port", str(port), pattern],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
             for r in range(2)]
    failed = []
    for r, p in enumerate(procs):
        try:
            _, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            return True, f"rank {r} hung"
        if p.returncode != 0 or "terminate called" in err:
            failed.append(f"rank {r}: exit code {p.returncode}: {(err.strip().splitlines() or [''])[-1]}")
    return bool(failed), "; ".join(failed)


def count(patterns, jobs: int, parallel: int = 1) -> dict:
    """Aborted jobs per pattern, ``{pattern: (aborted, jobs, [what, ...])}``."""
    from concurrent.futures import ThreadPoolExecutor

    results = {}
    with ThreadPoolExecutor(parallel) as pool:
        for pattern in patterns:
            outcomes = list(pool.map(lambda _: run_job(pattern), range(jobs)))
            whats = [w for a, w in outcomes if a]
            results[pattern] = (len(whats), jobs, whats)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("patterns", nargs="*", help=f"of {PATTERNS} (default: all)")
    parser.add_argument("--rank", type=int)
    parser.add_argument("--port", type=int)
    parser.add_argument("--jobs", type=int, default=40)
    parser.add_argument("--parallel", type=int, default=1)
    args = parser.parse_args()
    if args.rank is not None:
        _rank_main(args.rank, 2, args.port, args.patterns[0])
        return
    unknown = set(args.patterns) - set(PATTERNS)
    if unknown:
        parser.error(f"unknown pattern(s) {sorted(unknown)}; expected some of {PATTERNS}")
    start = time.monotonic()
    for pattern, (aborted, jobs, whats) in count(args.patterns or PATTERNS, args.jobs, args.parallel).items():
        print(f"{pattern}: {aborted} of {jobs} jobs aborted" + (f" (first: {whats[0]})" if whats else ""),
              flush=True)
    print(f"{time.monotonic() - start:.0f} s")


if __name__ == "__main__":
    main()
