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

from ..envs import peer_timeout_s


class PeerTimeoutError(RuntimeError):
    """A peer of the expert-parallel group did not reach a collective within the peer timeout."""


_CPU = torch.device("cpu")


def _group_timeout_s(group) -> Optional[float]:
    """The group's own timeout for CPU collectives, where torch tells it (None: unknown)."""
    try:
        return group._get_backend(_CPU).options._timeout.total_seconds()
    except Exception:  # noqa: BLE001 - private API: fall back to ours alone
        return None


@functools.lru_cache(maxsize=16)
def _options(kind: type, seconds: float):
    """A collective's options with ``seconds`` as its timeout; made once per value (torch copies
    them at the call, so one object serves every call)."""
    opts = kind()
    opts.timeout = datetime.timedelta(seconds=seconds)
    return opts


def _all_gather_options():
    from torch._C._distributed_c10d import AllgatherOptions

    return AllgatherOptions


class _Bounded:
    """What one group's bounded collectives need, made once per group and peer timeout: the
    bound (ours, or the group's own timeout when shorter), the options carrying it, and the
    names of the group's collective methods (renamed in torch 2.13; names, not bound methods,
    which would keep the group alive from this weakly keyed cache)."""

    __slots__ = ("ours", "seconds", "to_all", "to_all_opts", "gather", "gather_opts")

    def __init__(self, group, ours: float):
        theirs = _group_timeout_s(group)
        self.ours = ours
        self.seconds = ours if theirs is None or theirs <= 0 else min(ours, theirs)
        self.to_all = "all_to_all_single" if hasattr(group, "all_to_all_single") else "alltoall_base"
        self.to_all_opts = _options(dist.AllToAllOptions, self.seconds)
        self.gather = "all_gather_single" if hasattr(group, "all_gather_single") else "_allgather_base"
        self.gather_opts = _options(_all_gather_options(), self.seconds)


_BOUNDED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _bounded_for(group) -> _Bounded:
    ours = peer_timeout_s()
    try:
        bounded = _BOUNDED[group]
        if bounded.ours == ours:
            return bounded
    except (KeyError, TypeError):
        pass
    bounded = _Bounded(group, ours)
    try:
        _BOUNDED[group] = bounded
    except TypeError:  # (not weakly referable: made again at the next call)
        pass
    return bounded


def _timed_out(exc: BaseException) -> bool:
    text = str(exc).lower()
    return "timed out" in text or "timeout" in text


Call = Union[str, Callable[[], str]]  # what a collective is for, or a function that says it (asked on failure)


def _failed(exc: RuntimeError, group, what: Call, missing: Optional[Callable[[], list]], seconds: float):
    """Re-raise a failed collective's error as what it is: a closed group (with a note), or a
    peer that did not arrive within ``seconds`` (PeerTimeoutError naming the rank and the call)."""
    what = what() if callable(what) else what
    if "close" in str(exc).lower():  # ("Connection closed by peer", "... caused pair closure")
        exc.add_note(f"flexdispatch: {what}: the group's connections were closed: a peer died or gave up "
                     f"waiting for this rank, or this rank gave up on a peer before (FLEXDISPATCH_PEER_TIMEOUT_S)")
        raise exc
    if not _timed_out(exc):
        raise exc
    world, rank = dist.get_world_size(group), dist.get_rank(group)
    late = missing() if missing is not None else None
    if not late and world == 2:
        late = [1 - rank]
    who = f"rank(s) {late} of the expert-parallel group" if late else "a peer of the expert-parallel group"
    raise PeerTimeoutError(
        f"{what}: {who} did not arrive within {seconds:g} s (FLEXDISPATCH_PEER_TIMEOUT_S); rank {rank} gives up. "
        f"That peer is stuck or far behind (raise FLEXDISPATCH_PEER_TIMEOUT_S if it may take that long). "
        f"The process group is unusable now: stop every rank ({exc})") from None


def all_to_all_single(output: torch.Tensor, input_: torch.Tensor, output_splits, input_splits, group,
                      what: Call = "an exchange", *, async_op: bool = False,
                      missing: Optional[Callable[[], list]] = None):
    """``torch.distributed.all_to_all_single`` of ``input_`` (made contiguous), bounded on CPU
    tensors (see the module docs); ``what`` names the call in errors, ``missing()`` the ranks
    whose part did not land, asked after a timeout."""
    input_ = input_.contiguous()
    if async_op or not output.is_cpu or torch.compiler.is_compiling():
        return dist.all_to_all_single(output, input_, output_splits, input_splits, group=group, async_op=async_op)
    bounded = _bounded_for(group)
    try:
        start = getattr(group, bounded.to_all)
        start(output, input_, list(output_splits or ()), list(input_splits or ()), bounded.to_all_opts).wait()
    except RuntimeError as exc:
        _failed(exc, group, what, missing, bounded.seconds)
    return None


def all_gather_single(output: torch.Tensor, input_: torch.Tensor, group, *, what: Call = "an exchange") -> None:
    """Every rank's ``input_`` into ``output`` (``[W * rows, ...]``), bounded on CPU tensors."""
    if not output.is_cpu or torch.compiler.is_compiling():
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # (renamed in torch 2.13)
        gather(output, input_, group=group)
        return
    bounded = _bounded_for(group)
    try:
        getattr(group, bounded.gather)(output, input_, bounded.gather_opts).wait()
    except RuntimeError as exc:
        _failed(exc, group, what, None, bounded.seconds)
