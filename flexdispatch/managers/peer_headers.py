"""The first exchange of a DeepEP call through symmetric memory, on one node.

A DeepEP dispatch starts with every rank's agreement header (:mod:`.agreement`). Sent with an
NCCL all-gather, that exchange cost about 0.2 ms of host time a call (the collective's launch
path, then the header, copy and mask launches around it), more than a small dispatch's whole
transfer. Here the ranks of one node instead write their headers straight into each other's
slots in a small buffer of PyTorch's symmetric memory, and one kernel
(``exchange_headers``: build the header, write it to every peer, wait for every peer's,
decide, mask the indices DeepEP will read, copy every header to pinned host memory) replaces
the five steps: one launch, no collective, no host sync. The host reads the headers after
DeepEP's own host wait, as before.

Slots: ``int64 [2][W][1 + WIDTH]`` per rank, zeroed once before the first exchange; word 0
of a slot is the number of the exchange that wrote it (``seq``, counted per group on every
rank alike: every DeepEP dispatch of the group exchanges once, in the same order on every
rank, as DeepEP itself requires). The two halves alternate by ``seq``'s parity, so a peer that
is one exchange ahead never overwrites a header still to be read (it cannot be two ahead: it
would need this rank's next header). A peer that never arrives makes the kernel trap after
``FLEXDISPATCH_PEER_TIMEOUT_S`` seconds (600 by default: a CUDA error, not a hang).

The testing switch ``deepep_agreement=nccl`` keeps the all-gather (the same decision and errors);
groups that span nodes always use it.
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch
import torch.distributed as dist

from .. import _library, envs, ops
from .._log import logger
from . import agreement, groups
from ..envs import peer_timeout_s
from .peer_buffers import symmetric_buffer

_SLOT_WORDS = agreement.WIDTH + 1
NODE_RANKS = 8  # ranks of one NVLink domain (DeepEP's intranode kernels serve as many)


def wanted(world_size: int) -> bool:
    """Whether a DeepEP group of ``world_size`` ranks (CUDA) exchanges its headers here: the
    same answer on every rank of a group (it depends on the environment and the size). Asked
    once per manager, when it is made."""
    return envs.switch("deepep_agreement") == "peer" and 1 < world_size <= NODE_RANKS


class PeerHeaders:
    """One group's header slots (see the module docs); shared by every DeepEP manager of it."""

    group = groups.WeakGroup()  # never kept alive by the slots (see groups)

    def __init__(self, group, device: torch.device):
        if not ops.cuda_kernels_loaded():  # (the exchange is a kernel of ours)
            raise RuntimeError("DeepEP agreement through symmetric memory needs flexdispatch's CUDA kernels, which "
                               "are not built here; set FLEXDISPATCH_TESTING=deepep_agreement=nccl")
        self.group, self.device = group, device
        self.world_size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        buffer, handle = symmetric_buffer(group, device, 2 * self.world_size * _SLOT_WORDS * 8)
        buffer.zero_()
        handle.barrier(channel=0)  # stream-ordered: no peer writes before every rank has zeroed
        self._buffer, self._handle = buffer, handle
        self._bases = torch.tensor(list(handle.buffer_ptrs), dtype=torch.int64, device=device)
        self._seq = 0
        self._timeout_s = peer_timeout_s()
        logger.info("DeepEP agreement through symmetric memory: %d ranks on %s", self.world_size, device)

    def exchange(self, values: list, status: Optional[torch.Tensor], indices: torch.Tensor,
                 index_dtype: torch.dtype, gathered: torch.Tensor) -> torch.Tensor:
        """This rank's header ``values`` (with ``status[0]`` OR-ed into its error field) to
        every rank; returns ``indices`` (int64) as ``index_dtype``, all -1 unless every header
        agrees; every header lands in ``gathered`` (pinned ``[W, WIDTH]`` int64) once the
        stream has passed the kernel."""
        masked = _library.kernels().exchange_headers(self._bases, self.rank, self._seq + 1, values, status,
                                                     indices.contiguous(), index_dtype, gathered, self._timeout_s)
        self._seq += 1  # (only once queued: a call that raised here has not written its header)
        return masked

    def release(self) -> None:
        self._handle.barrier(channel=0)  # every peer is done with its last exchange
        torch.cuda.current_stream(self.device).synchronize()
        self._buffer = self._handle = self._bases = None


_slots: list = []  # (weak reference to the group, device, PeerHeaders), groups compared by identity


def for_group(group, device: torch.device) -> PeerHeaders:
    """The group's header slots on ``device``, made at the group's first DeepEP dispatch (a
    collective: every rank of the group gets here at the same call)."""
    for g, dev, slots in _slots:
        if g() is group and dev == device:
            return slots
    slots = PeerHeaders(group, device)
    _slots.append((weakref.ref(group), device, slots))
    return slots


def release() -> int:
    """Free every group's slots (collective, as DeepEP's buffers); returns how many."""
    freed = [s for _, _, s in _slots]
    _slots.clear()
    for slots in freed:
        slots.release()
    return len(freed)


def drop_at_exit() -> None:
    """Forget every group's slots without a collective (peers may be gone; the driver frees the memory)."""
    _slots.clear()
