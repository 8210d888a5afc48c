"""The collectives of flexdispatch on CPU (gloo) groups, with a bounded wait for a stuck peer.

A peer that is alive but stuck (sleeping inside a step, blocked on I/O) held its peers in
gloo's collectives for the group's own timeout, 30 minutes by default. Here every collective
on CPU tensors waits at most ``FLEXDISPATCH_PEER_TIMEOUT_S`` seconds (600 by default, as
the GPU waits over symmetric memory; the group's own timeout when that is shorter), then
raises :class:`PeerTimeoutError` naming the call and, where it can be known, the ranks that
did not arrive. The bound travels as the collective's own option (gloo's per-operation
timeout), so nothing is left in flight after it: gloo closes the group's connections, the
group is unusable afterwards, and a peer that arrives later fails at once instead of waiting.

CUDA tensors (NCCL) and code under ``torch.compile`` go through ``torch.distributed`` as
before.
"""

from __future__ import annotations

import datetime
import functools
import weakref
from typing import Callable, Optional, Union

import torch
import torch.distributed as dist

from ..envs import DEFAULT_PEER_TIMEOUT_S, peer_timeout_s  # noqa: F401  (the one reader of the timeout)


class PeerTimeoutError(RuntimeError):
    """A peer of the expert-parallel group did not reach a collective within the peer timeout."""


_GROUP_TIMEOUTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_CPU = torch.device("cpu")


def _group_timeout_s(group) -> Optional[float]:
    """The group's own timeout for CPU collectives, where torch tells it (None: unknown); asked
    once per group."""
    try:
        return _GROUP_TIMEOUTS[group]
    except (KeyError, TypeError):
        pass
    try:
        seconds = group._get_backend(_CPU).options._timeout.total_seconds()
    except Exception:  # noqa: BLE001 - private API: fall back to ours alone
        seconds = None
    try:
        _GROUP_TIMEOUTS[group] = seconds
    except TypeError:  # (not weakly referable)
        pass
    return seconds


def _bound_s(group) -> float:
    ours, theirs = peer_timeout_s(), _group_timeout_s(group)
    return ours if theirs is None or theirs <= 0 else min(ours, theirs)


def _timed_out(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "timed out" in text or "timeout" in text


Call = Union[str, Callable[[], str]]  # what a collective is for, or a function that says it (asked on failure)


def _run(start: Callable, group, what: Call, missing: Optional[Callable[[], list]], seconds: float):
    """Start a collective (``start()`` returns its work) and wait for it, within ``seconds``."""
    try:
        work = start()
        if work is not None:
            work.wait()
    except RuntimeError as exc:
        what = what() if callable(what) else what
        if "close" in str(exc).lower():  # ("Connection closed by peer", "... caused pair closure")
            exc.add_note(f"flexdispatch: {what}: the group's connections were closed: a peer died or gave up "
                         f"waiting for this rank, or this rank gave up on a peer before (FLEXDISPATCH_PEER_TIMEOUT_S)")
            raise
        if not _timed_out(exc):
            raise
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        late = missing() if missing is not None else None
        if not late and world == 2:
            late = [1 - rank]
        who = f"rank(s) {late} of the expert-parallel group" if late else "a peer of the expert-parallel group"
        raise PeerTimeoutError(
            f"{what}: {who} did not arrive within {seconds:g} s (FLEXDISPATCH_PEER_TIMEOUT_S); rank {rank} gives up. "
            f"That peer is stuck or far behind (raise FLEXDISPATCH_PEER_TIMEOUT_S if it may take that long). "
            f"The process group is unusable now: stop every rank ({exc})") from None


def _bounded(tensor: torch.Tensor) -> bool:
    return tensor.device.type == "cpu" and not torch.compiler.is_compiling()


def all_to_all_single(output: torch.Tensor, input_: torch.Tensor, output_splits, input_splits, group, *,
                      async_op: bool = False, what: Call = "an exchange", missing: Optional[Callable[[], list]] = None):
    """``torch.distributed.all_to_all_single``, bounded on CPU tensors (see the module docs).
    ``missing()``: the ranks whose part did not land, asked after a timeout."""
    if async_op or not _bounded(output):
        return dist.all_to_all_single(output, input_, output_splits, input_splits, group=group, async_op=async_op)
    seconds = _bound_s(group)
    opts = _options(dist.AllToAllOptions, seconds)
    start = getattr(group, "all_to_all_single", None) or group.alltoall_base  # (renamed in torch 2.13)
    _run(lambda: start(output, input_, list(output_splits or []), list(input_splits or []), opts), group, what,
         missing, seconds)
    return None


@functools.lru_cache(maxsize=16)
def _options(kind: type, seconds: float):
    """A collective's options with ``seconds`` as its timeout; made once per value (torch copies
    them at the call, so one object serves every call)."""
    opts = kind()
    opts.timeout = datetime.timedelta(seconds=seconds)
    return opts


def all_gather_single(output: torch.Tensor, input_: torch.Tensor, group, *, what: Call = "an exchange") -> None:
    """Every rank's ``input_`` into ``output`` (``[W * rows, ...]``), bounded on CPU tensors."""
    if not _bounded(output):
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # (renamed in torch 2.13)
        gather(output, input_, group=group)
        return
    from torch._C._distributed_c10d import AllgatherOptions

    seconds = _bound_s(group)
    opts = _options(AllgatherOptions, seconds)
    start = getattr(group, "all_gather_single", None) or group._allgather_base  # (renamed in torch 2.13)
    _run(lambda: start(output, input_, opts), group, what, None, seconds)
