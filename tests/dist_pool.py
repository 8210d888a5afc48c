"""A pool of spawned processes forming one gloo (CPU) or NCCL (one GPU a rank) group, reused across tests. Each call runs a
function of dist_scenarios.py on every rank and returns the per-rank results; a call that
does not finish in time kills the pool and fails the test (a hang is a failure)."""

import datetime
import faulthandler
import os
import queue
import socket
import time
import traceback
from typing import Optional

import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, backend: str, inbox, outbox) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    device_id = None
    if backend == "nccl":  # one GPU per rank
        torch.cuda.set_device(rank)
        device_id = torch.device("cuda", rank)
    dist.init_process_group(backend, rank=rank, world_size=world, timeout=datetime.timedelta(seconds=120),
                            device_id=device_id)
    import dist_scenarios

    hang_dump = float(os.environ.get("FLEXDISPATCH_HANG_DUMP", "0"))  # seconds: print every stack of a hung call
    while True:
        item = inbox.get()
        if item is None:
            break
        name, kwargs = item
        if hang_dump:
            faulthandler.dump_traceback_later(hang_dump, exit=False)
        try:
            outbox.put((rank, "ok", getattr(dist_scenarios, name)(rank, world, **kwargs)))
        except BaseException:  # noqa: BLE001 - reported to the test
            outbox.put((rank, "error", traceback.format_exc()))
        if hang_dump:
            faulthandler.cancel_dump_traceback_later()
    import flexdispatch

    flexdispatch.shutdown()
    dist.destroy_process_group()


class DistPool:
    def __init__(self, world: int, backend: str = "gloo"):
        ctx = mp.get_context("spawn")
        self.world = world
        port = _free_port()
        self.inboxes = [ctx.Queue() for _ in range(world)]
        self.outbox = ctx.Queue()
        self.procs = [ctx.Process(target=_worker, args=(r, world, port, backend, self.inboxes[r], self.outbox),
                                  daemon=True)
                      for r in range(world)]
        for p in self.procs:
            p.start()
        self.closed_by: Optional[str] = None  # the call after which the pool was closed

    @property
    def alive(self) -> bool:
        return all(p.is_alive() for p in self.procs)

    def run(self, name: str, timeout: float = 180.0, **kwargs) -> list:
        if self.closed_by is not None:  # no waiting on ranks that are gone: say why at once
            raise RuntimeError(f"{name}: not run, this pool of ranks was closed after {self.closed_by}")
        for inbox in self.inboxes:
            inbox.put((name, kwargs))
        results = {}
        deadline = time.monotonic() + timeout
        while len(results) < self.world:
            try:
                rank, status, payload = self.outbox.get(timeout=min(5.0, max(deadline - time.monotonic(), 0.01)))
            except queue.Empty:
                missing = sorted(set(range(self.world)) - set(results))
                dead = {r: self.procs[r].exitcode for r in missing if not self.procs[r].is_alive()}
                if dead:  # a rank died (a crash or an abort inside a library): say so, not "hang"
                    self.close(f"{name} (rank(s) died)")
                    raise RuntimeError(f"{name}: rank(s) {sorted(dead)} died, exit code(s) {dead} (negative: "
                                       f"the signal); rank(s) {[r for r in missing if r not in dead]} were waiting")
                if time.monotonic() < deadline:
                    continue
                self.close(f"{name} (hang)")
                raise TimeoutError(f"{name}: rank(s) {missing} did not finish within {timeout:.0f} s (hang)")
            results[rank] = (status, payload)
        errors = [f"rank {r}:\n{p}" for r, (s, p) in sorted(results.items()) if s == "error"]
        if errors:
            raise AssertionError(f"{name} failed\n" + "\n".join(errors))
        return [results[r][1] for r in range(self.world)]

    def close(self, reason: str = "close()") -> None:
        if self.closed_by is None:
            self.closed_by = reason
        for inbox in self.inboxes:
            try:
                inbox.put(None)
            except (OSError, ValueError):
                pass
        for p in self.procs:
            p.join(timeout=10)
            if p.is_alive():
                p.kill()


def check_dense_results(results) -> None:
    """Assert every rank's moe_matches_dense result: reruns bit-identical, errors in tolerance."""
    for r, res in enumerate(results):
        res = dict(res)
        tol = res.pop("tolerance")
        assert res.pop("identical_reruns"), f"rank {r}: two identical runs gave different bits"
        res.pop("backend")
        bad = {k: v for k, v in res.items() if not v <= tol}
        assert not bad, f"rank {r}: relative errors above {tol:g}: {bad}"
