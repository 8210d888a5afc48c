"""How flexdispatch holds process groups: by weak reference only.

torch's gloo process group aborts the process at interpreter exit ("terminate called without
an active exception", SIGABRT) when something other than torch still holds it after
``destroy_process_group()``: 7 of 40 plain torch jobs that kept such a reference aborted, and
73 of 200 two-rank flexdispatch jobs while dispatchers held theirs (tests/exit_jobs.py). So
every object of flexdispatch that needs a group (dispatchers, managers, transports, per-group
registries, autograd contexts) holds a weak reference: the group lives exactly as long as
torch (and the application) keep it, whatever flexdispatch objects are still alive at exit.

A dispatcher whose group was destroyed raises :class:`GroupDestroyedError` at its next call,
before any collective, instead of falling back to whatever group is the default then.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import weakref
from typing import Optional

import torch


class GroupDestroyedError(RuntimeError):
    """A call on a process group that ``torch.distributed.destroy_process_group`` destroyed."""


_GONE = ("the expert-parallel process group of this {what} was destroyed (torch.distributed."
         "destroy_process_group()); build a new one on a live group")


class WeakGroup:
    """A class attribute holding a process group by weak reference.

    ``obj.group = group`` stores a weak reference (None stays None); ``obj.group`` gives the
    group, or None when none was given or it no longer exists. :func:`require` raises instead
    of the latter. The weak reference lives in ``obj.__dict__["_group_ref"]``.
    """

    def __get__(self, obj, owner=None):
        if obj is None:
            return self
        ref = obj.__dict__.get("_group_ref")
        return None if ref is None else ref()

    def __set__(self, obj, group) -> None:
        global _met_a_group
        _met_a_group = _met_a_group or group is not None
        obj.__dict__["_group_ref"] = None if group is None else weakref.ref(group)
        obj.__dict__["_group_guard"] = call_guard(group)  # (no lookup per call)


def require(obj, what: str = "dispatcher") -> None:
    """Raise GroupDestroyedError if ``obj`` (with a :class:`WeakGroup` attribute) was given a
    group that no longer exists (not checked while torch.compile traces: eager calls check)."""
    ref = obj.__dict__.get("_group_ref")
    if ref is not None and ref() is None and not torch.compiler.is_compiling():
        raise GroupDestroyedError(_GONE.format(what=what))


def ref(group) -> Optional[weakref.ref]:
    """A weak reference to ``group`` (None for None), for objects that are not classes of
    ours (autograd contexts)."""
    return None if group is None else weakref.ref(group)


def deref(group_ref: Optional[weakref.ref], what: str = "dispatcher's backward"):
    """The group of :func:`ref`; raises GroupDestroyedError if it was destroyed."""
    if group_ref is None:
        return None
    group = group_ref()
    if group is None:
        raise GroupDestroyedError(_GONE.format(what=what))
    return group


# ---- one thread at a time per group ---------------------------------------------------------
#
# torch.distributed runs a group's collectives in the order each rank issues them; two threads
# calling dispatchers of one group give each rank its own interleaving, which hung or crashed
# (1 hang and 1 crash in 2 runs at EP 2). Whether two threads overlap is timing, seen by each
# rank alone, so the decision is made in three steps that keep every rank's collectives matched:
#
# 1. A thread that calls while another thread of this rank is inside a call on the same group
#    raises at once, before any collective (it never entered one; the other thread goes on).
# 2. The group is then marked on this rank: its next call (from any thread) carries the error
#    in its first exchange, as a failed argument check does, so every rank raises there together.
# 3. Every rank that saw that exchange marks the group as announced: from then on each call on
#    it raises at once, on every rank alike, until flexdispatch.shutdown().


class ConcurrentCallError(RuntimeError):
    """Dispatchers of one process group called from two threads at once."""

    argument = "threads"  # (what a group's agreement sends for it: see agreement.ARGUMENTS)


def _name(thread: Optional[threading.Thread]) -> str:
    return f"thread {thread.name!r}" if thread is not None else "another thread"


_ADVICE = ("The collectives of one process group must come from one thread at a time (otherwise each rank "
           "issues them in its own order, which hangs or crashes): drive a group's layers from one thread, or give "
           "each thread its own process group")


class CallGuard:
    """One group's record of which thread is inside a call on it (see above)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._owner: Optional[threading.Thread] = None  # the thread inside a call
        self._depth = 0
        self.seen: Optional[str] = None  # what this rank saw (step 2 pending), or None
        self.announced = False  # step 3: every rank knows

    def enter(self, step: str) -> None:
        """Hold the group for this thread during ``step`` (re-entrant; :meth:`leave` after);
        raises ConcurrentCallError if another thread holds it, or once the group is announced."""
        me = threading.current_thread()
        if self._owner is me:  # (only this thread ever sets it to itself)
            self._depth += 1
            return
        if not self._lock.acquire(blocking=False):
            seen = (f"{_name(me)} called {step} while {_name(self._owner)} was inside a call on the same "
                    f"expert-parallel group")
            self.seen = self.seen or seen
            raise ConcurrentCallError(f"threads: {seen}. {_ADVICE}. This thread raises before any collective; the "
                                      f"group's next call raises on every rank")
        if self.announced:
            self._lock.release()
            raise ConcurrentCallError(f"threads: dispatchers of this expert-parallel group were called from two "
                                      f"threads at once ({self.seen or 'seen on another rank'}); its calls raise on "
                                      f"every rank until flexdispatch.shutdown() is called on every rank (a layer's "
                                      f"first call after it may raise once more on every rank, to realign its steps "
                                      f"across ranks). {_ADVICE}")
        self._owner, self._depth = me, 1

    def leave(self) -> None:
        self._depth -= 1
        if self._depth == 0:
            self._owner = None
            self._lock.release()

    def held(self, step: str) -> "_Held":
        """:meth:`enter` and :meth:`leave` around a block."""
        return _Held(self, step)

    def pending_error(self) -> Optional[ConcurrentCallError]:
        """Step 2: the error this rank's next call carries in its first exchange, or None."""
        if self.seen is None or self.announced:
            return None
        return ConcurrentCallError(f"threads: on this rank {self.seen}. {_ADVICE}")

    def announce(self, seen: Optional[str] = None) -> None:
        """Step 3 (every rank, at the exchange that carried the error)."""
        self.seen = self.seen or seen
        self.announced = True


class _Held:
    """The context of :meth:`CallGuard.held` (a plain class: a generator's context manager
    costs several calls more, at every backward exchange)."""

    __slots__ = ("guard", "step")

    def __init__(self, guard: CallGuard, step: str):
        self.guard, self.step = guard, step

    def __enter__(self) -> CallGuard:
        self.guard.enter(self.step)
        return self.guard

    def __exit__(self, *exc) -> None:
        self.guard.leave()


_guards: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_guards_lock = threading.Lock()


def call_guard(group) -> Optional[CallGuard]:
    """The group's guard (None for no group: one rank, no collective)."""
    if group is None:
        return None
    guard = _guards.get(group)
    if guard is None:
        with _guards_lock:  # (two threads may make the first call at once)
            guard = _guards.setdefault(group, CallGuard())
    return guard


def announce(obj) -> None:
    """Step 3 for the group of ``obj`` (with a :class:`WeakGroup` attribute)."""
    guard = obj.__dict__.get("_group_guard")
    if guard is not None:
        guard.announce()


def one_thread_at_a_time(step: Optional[str] = None, before=None):
    """Decorate a method of an object with a :class:`WeakGroup` ``group`` whose calls may run
    collectives: another thread raises before any collective (see above), and so does a call
    on a destroyed group (GroupDestroyedError, as :func:`require`). ``step``: what the
    user called, for the message (default: the method's name); ``before(obj, guard)``: runs
    once the guard is held, before the method."""
    def wrap(method):
        name = step or method.__name__

        @functools.wraps(method)
        def guarded(self, *args, **kwargs):
            # The group's guard (WeakGroup keeps it beside the group); none without a group, or
            # while torch.compile traces (a host lock has no place in a graph; eager calls hold it).
            guard = None if torch.compiler.is_compiling() else self.__dict__.get("_group_guard")
            if guard is None:
                return method(self, *args, **kwargs)
            require(self)  # (no collective on a destroyed group)
            guard.enter(name)
            try:
                if before is not None:
                    before(self, guard)
                return method(self, *args, **kwargs)
            finally:
                guard.leave()
        return guarded
    return wrap


def reset_guards() -> None:
    """Forget what the guards saw (flexdispatch.shutdown(), on every rank)."""
    for guard in list(_guards.values()):
        guard.seen, guard.announced = None, False


def holding(group, step: str):
    """``call_guard(group).held(step)``; nothing to hold without a group or while torch.compile
    traces (autograd's backward of a transfer, which runs collectives outside the managers'
    steps)."""
    guard = None if torch.compiler.is_compiling() else call_guard(group)
    return contextlib.nullcontext() if guard is None else guard.held(step)


# ---- exit -----------------------------------------------------------------------------------
#
# A gloo process group that the application never destroyed is torn down by torch after the
# interpreter has finished (no Python frame left), where it aborted the process in 3 of 40
# plain-torch jobs, and in 8 of 40 with a dispatcher that held it weakly. Destroyed while
# Python still runs, it does not (0 of 40). So at exit, after the application's own exit
# handlers registered after flexdispatch's import, a default gloo group still alive is
# destroyed here (the last step of flexdispatch's one exit hook, managers.at_exit), if
# flexdispatch used a group at all. NCCL groups are left to torch (destroying them can wait on
# peers).

_met_a_group = False


def destroy_gloo_group_at_exit() -> None:
    if not _met_a_group:
        return
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and str(dist.get_backend()).lower() == "gloo":
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - at exit, torch may be half torn down: leave it to torch then
        pass
