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

import atexit
import weakref
from typing import Optional


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


def require(obj, what: str = "dispatcher") -> None:
    """Raise GroupDestroyedError if ``obj`` (with a :class:`WeakGroup` attribute) was given a
    group that no longer exists."""
    ref = obj.__dict__.get("_group_ref")
    if ref is not None and ref() is None:
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


# ---- exit -----------------------------------------------------------------------------------
#
# A gloo process group that the application never destroyed is torn down by torch after the
# interpreter has finished (no Python frame left), where it aborted the process in 3 of 40
# plain-torch jobs, and in 8 of 40 with a dispatcher that held it weakly. Destroyed while
# Python still runs, it does not (0 of 40). So at exit, after the application's own exit
# handlers registered after flexdispatch's import, a default gloo group still alive is
# destroyed here, if flexdispatch used a group at all. NCCL groups are left to torch
# (destroying them can wait on peers).

_met_a_group = False


def _destroy_gloo_group_at_exit() -> None:
    if not _met_a_group:
        return
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and str(dist.get_backend()).lower() == "gloo":
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - at exit, torch may be half torn down: leave it to torch then
        pass


atexit.register(_destroy_gloo_group_at_exit)
