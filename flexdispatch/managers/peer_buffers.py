"""Peer buffers: how the NVLink manager makes each rank's rows readable by its peers.

An *exchange* publishes a few 2-D tensors (its *parts*) from every rank of a group at once and
returns, for each part, a table of W addresses: where row 0 of that part lies on each rank.
Kernels then read any peer's row ``j`` of a part at ``table[w] + j * row_bytes``
(:mod:`flexdispatch.peer_ops`). Every rank passes, for each part, the same capacity in rows
(a number the ranks agreed on); a part may hold fewer rows.

Two transports give the same tables:

* :class:`SymmetricTransport` (CUDA, one node): one buffer from PyTorch's symmetric memory
  (``torch.distributed._symmetric_memory``), mapped into every rank's address space, so a
  kernel reads a peer's rows over NVLink with plain loads. An exchange runs the
  symmetric-memory barrier, copies the parts into this rank's buffer and runs the barrier
  again, on the current stream: no host sync. The first barrier is passed only once every
  peer has finished the reads it queued before it (the previous exchange's), so nobody
  overwrites rows a peer may still read; the second publishes the rows. Two barriers an
  exchange rather than one with alternating halves: the order then holds whatever runs
  between exchanges, CUDA-graph replays included (a captured exchange cannot know which
  exchange ran before it).
* :class:`GatherTransport` (any group, gloo or NCCL): every part is all-gathered into a local
  tensor and the table points into it. It moves W times the bytes and serves the CPU (tests,
  laptops) and cross-checks of the symmetric transport.

Every exchange may carry a header (the call's agreement words, see :mod:`.agreement`), read
by every rank on the host before any part is read: the one host sync of an exchange that has
one. The gather transport exchanges the header first, and the parts only when every header
agrees, so ranks in different phases never meet in collectives of different sizes.

Buffers belong to a group and are shared by every NVLink manager of it; they grow (a collective
rendezvous, decided from numbers every rank knows) and are released by :func:`release`.
"""

from __future__ import annotations

import socket
import weakref
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from .. import _library, envs, peer_ops
from .._log import logger
from . import collectives, groups
from .agreement import PHASE, PHASE_NAMES, STEP, WIDTH, Agreement
from .gather import all_gather_objects

REGION_ALIGN = 256  # bytes between the start of one part's region and the next
MIN_BYTES = 1 << 20  # the smallest buffer (every call's first exchange fits in it)
_MAX_TABLES = 64  # address tables a symmetric transport keeps (one per region offset)


def symmetric_buffer(group, device: torch.device, nbytes: int):
    """``(buffer, handle)``: ``nbytes`` uint8 of PyTorch's symmetric memory on ``device``, mapped
    into every rank of ``group`` (a collective rendezvous: every rank calls it at once)."""
    from torch.distributed import _symmetric_memory as symm_mem

    name = group.group_name
    if hasattr(symm_mem, "is_symm_mem_enabled_for_group") and not symm_mem.is_symm_mem_enabled_for_group(name):
        symm_mem.enable_symm_mem_for_group(name)  # (torch 2.11 needs it; later versions warn)
    buffer = symm_mem.empty(nbytes, dtype=torch.uint8, device=device)
    return buffer, symm_mem.rendezvous(buffer, name)


def row_align(row_bytes: int) -> int:
    """The alignment (bytes, at most 16) every row of a part of ``row_bytes`` shares."""
    return min(16, row_bytes & -row_bytes) if row_bytes else 16


def _as_bytes(part: torch.Tensor) -> torch.Tensor:
    """``[rows, row_bytes]`` uint8 view of a 2-D tensor (contiguous copy if needed)."""
    part = part.contiguous()
    return part.view(torch.uint8).view(part.shape[0], -1) if part.numel() else part.new_empty(
        (part.shape[0], part.shape[1] * part.element_size()), dtype=torch.uint8)


def _region_offsets(sizes: Sequence[int]) -> tuple[list[int], int]:
    offsets, at = [], 0
    for size in sizes:
        offsets.append(at)
        at += -(-size // REGION_ALIGN) * REGION_ALIGN
    return offsets, at


class Transport:
    """The interface both transports implement."""

    world_size: int
    rank: int
    group = groups.WeakGroup()  # never kept alive by a transport (see groups)

    def _live_group(self):
        groups.require(self, "peer buffer")
        return self.group

    def exchange(self, header: Optional[torch.Tensor], parts: Sequence[tuple[torch.Tensor, int]]):
        """Publish ``parts`` (``(tensor [rows, ...], capacity rows)``, the capacities equal on
        every rank) and return ``(headers, tables)``: ``headers`` every rank's ``header``,
        ``[W, len(header)]`` int64 (None without a header): on the device, not read (symmetric
        memory: the caller syncs to read it, or decides on the device), or on the host after
        a check (the gather transport); ``tables`` one int64 ``[W]`` tensor of addresses per
        part, on the parts' device. When the headers disagree the tables may be None (gather
        transport): the caller raises without reading any part."""
        raise NotImplementedError

    def ensure(self, nbytes: int) -> None:
        """Make room for exchanges of ``nbytes`` (every rank passes the same number)."""

    def capacity(self) -> int:
        """Bytes an exchange may publish now, without :meth:`ensure`."""
        return 1 << 62


class GatherTransport(Transport):
    """Peer rows emulated with all-gathers (any process group; see the module docs)."""

    def __init__(self, group):
        self.group = group
        self.world_size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self._alive: list = []  # the last exchange's gathered tensors (read after it returns)

    def _gather(self, part: torch.Tensor, group, what: collectives.Call) -> torch.Tensor:
        out = part.new_empty((self.world_size * part.shape[0],) + tuple(part.shape[1:]))
        collectives.all_gather_single(out, part, group, what=what)
        return out

    def exchange(self, header, parts):
        def what() -> str:  # (which call, for the message of a peer that never arrives: asked then)
            if header is None or header.device.type != "cpu":
                return "the NVLink manager (CPU emulation): an exchange"
            words = header[:WIDTH].tolist()
            return (f"the NVLink manager (CPU emulation): step {words[STEP]} of this layer, "
                    f"{PHASE_NAMES.get(words[PHASE], 'a call')}")

        group = self._live_group()  # (checked once: the exchange holds the group to its end)
        headers, rest = None, None
        if header is not None:  # the fixed-width words first: ranks in other phases stop here
            header_words = header.numel()
            headers = self._gather(header[:WIDTH].view(1, -1), group, what).cpu()
            if not _headers_agree(headers):
                return headers, None
            if header_words > WIDTH:
                rest = header.view(-1)
        rows, sizes, maxima = [], [], []
        for part, capacity in parts:  # (a loop: no comprehension frames at every exchange)
            part_rows = _as_bytes(part)
            rows.append(part_rows)
            sizes += (max(capacity, 1), part_rows.shape[1])
        if rows or rest is not None:
            # Every rank's capacity should be the same; a sync-free call whose ranks disagree
            # (found on the device, later) may pass others: all-gather the sizes first, so the
            # collectives match (symmetric memory needs no such step: nobody reads then). One
            # all-gather carries every part's sizes, after the whole header when it is longer
            # than its fixed words (the ranks agree on the phase here: the same parts, the same words).
            sent = torch.tensor(sizes, dtype=torch.int64, device=(header if rest is not None else rows[0]).device)
            if rest is not None:
                sent = torch.cat([rest, sent])
            every = self._gather(sent.view(1, -1), group, what)
            if rest is not None:
                headers = every[:, :header_words].cpu()
            # (each size's most over the ranks: the last 2 * len(rows) columns)
            if rows:
                maxima = every[:, every.shape[1] - len(sizes):].amax(0).tolist()
        tables, alive = [], []
        for part_rows, capacity, width in zip(rows, maxima[0::2], maxima[1::2]):
            if part_rows.shape[1] != width:
                part_rows = torch.cat([part_rows, part_rows.new_zeros(part_rows.shape[0], width - part_rows.shape[1])], 1)
            padded = part_rows  # (contiguous: sent as it is when it fills the capacity)
            if part_rows.shape[0] != capacity:
                padded = part_rows.new_zeros(capacity, width)
                padded[:part_rows.shape[0]] = part_rows
            gathered = self._gather(padded, group, what)
            # Where each rank's part starts in ``gathered`` (padded's bytes apart).
            tables.append(gathered.data_ptr() + capacity * width * torch.arange(self.world_size, device=gathered.device))
            alive.append(gathered)
        self._alive = alive  # read until the next exchange (a collective: every reader is done then)
        return headers, tables


class SymmetricTransport(Transport):
    """Peer rows in PyTorch's symmetric memory, read over NVLink (see the module docs)."""

    def __init__(self, group, device: torch.device):
        self.group = group
        self.device = device
        self.world_size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self._size = 0  # bytes of the buffer
        self._buffer: Optional[torch.Tensor] = None
        self._handle = None
        self._bases: Optional[torch.Tensor] = None  # int64 [W]: every rank's buffer address
        self._pads = 0  # device address of the group's signal-pad pointers (our barrier's)
        self._tables: dict = {}  # offset -> int64 [W] addresses of that region on every rank
        # The exchange's barrier: our one-block kernel on the signal pads (channel 1), or
        # symmetric memory's own (testing switch nvlink_barrier=torch; channel 0). Same on every rank.
        self.own_barrier = envs.switch("nvlink_barrier") == "own"
        self._timeout_s = envs.peer_timeout_s()
        self._check_one_node()

    def _check_one_node(self) -> None:
        hosts = all_gather_objects(socket.gethostname(), self.group)
        if len(set(hosts)) > 1:
            raise ValueError(f"config.moe_flex_backend='nvlink': the expert-parallel group spans {len(set(hosts))} "
                             f"hosts ({sorted(set(hosts))}); the NVLink backend serves the ranks of one node. "
                             f"Use 'deepep' or 'alltoall' for groups that span nodes")

    def capacity(self) -> int:
        return self._size

    def ensure(self, nbytes: int) -> None:
        nbytes = max(MIN_BYTES, -(-nbytes // REGION_ALIGN) * REGION_ALIGN)
        if nbytes <= self._size:
            return
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"nvlink peer buffer: {nbytes} bytes needed, {self._size} held, inside a CUDA-graph "
                               f"capture (growing is collective and syncs): run the layer once before capturing")
        size = max(nbytes, 2 * self._size)  # grow geometrically: a few rendezvous per run
        if self._handle is not None:
            # Peers may still read the old buffer (their last exchange's reads): wait for every
            # rank's stream to pass a barrier on it before it is freed. Growth is rare.
            self._handle.barrier(channel=0)
            torch.cuda.current_stream(self.device).synchronize()
        buffer, handle = symmetric_buffer(self._live_group(), self.device, size)
        self._buffer, self._handle, self._size = buffer, handle, size
        self._bases = torch.tensor(list(handle.buffer_ptrs), dtype=torch.int64, device=self.device)
        self._pads = int(handle.signal_pad_ptrs_dev)
        self._tables = {}
        logger.info("nvlink peer buffer: %.1f MiB on %s, %d ranks", size / 2**20, self.device, self.world_size)

    def exchange(self, header, parts):
        entries = ([header.view(1, -1)] if header is not None else []) + [p.contiguous() for p, _ in parts]
        caps = ([1] if header is not None else []) + [c for _, c in parts]
        for entry, cap in zip(entries, caps):
            if entry.shape[0] > cap:
                raise RuntimeError(f"nvlink peer buffer: a part of {entry.shape[0]} rows exceeds its agreed {cap}")
        offsets, total = _region_offsets([c * e.shape[1] * e.element_size() for e, c in zip(entries, caps)])
        if total > self._size:
            raise RuntimeError(f"nvlink peer buffer: an exchange needs {total} bytes, the buffer holds "
                               f"{self._size}; the manager sizes it before each call (please report this)")
        self.barrier()  # every peer is done reading the last exchange's rows
        _library.kernels().pack_parts(self._buffer, entries, offsets)  # every part in one launch
        self.barrier()  # every rank's rows are in place
        tables = [self._table(offset) for offset in offsets]
        headers = None
        if header is not None:  # read into a device tensor: no sync here
            headers = torch.empty(self.world_size, header.numel(), dtype=torch.int64, device=self.device)
            peer_ops.copy_rows_from(tables[0], headers, 8)
            tables = tables[1:]
        return headers, tables

    def _table(self, offset: int) -> torch.Tensor:
        """int64 [W]: where every rank's region at ``offset`` starts (kept per buffer: with steady
        shapes the same offsets recur every call; at most _MAX_TABLES kept, since varying token
        counts make new ones; not kept when made inside a CUDA-graph capture)."""
        table = self._tables.get(offset)
        if table is None:
            table = self._bases + offset
            if not torch.cuda.is_current_stream_capturing():
                if len(self._tables) >= _MAX_TABLES:
                    self._tables.clear()
                self._tables[offset] = table
        return table

    def barrier(self) -> None:
        """Every rank of the group waits here (stream-ordered, on the current stream): ours,
        or symmetric memory's when ``own_barrier`` is False."""
        if self.own_barrier:
            _library.kernels().peer_barrier(self._pads, 1, self.rank, self.world_size, self._bases, self._timeout_s)
        else:
            self._handle.barrier(channel=0)

    def release(self) -> None:
        if self._handle is not None:
            self._handle.barrier(channel=0)
            torch.cuda.current_stream(self.device).synchronize()
        self._buffer = self._handle = self._bases = None
        self._size, self._tables = 0, {}


def _headers_agree(headers: torch.Tensor) -> bool:
    return Agreement(headers).agreed()


# group -> {(kind, device): Transport}; weak keys: an entry goes with its group (and a later
# group that reuses its id() never finds it).
_transports: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def transport_for(group, device: torch.device, emulate: bool = False) -> Transport:
    """The group's transport for tensors on ``device`` (made at the first call; shared)."""
    kind = "gather" if emulate or device.type != "cuda" else "symmetric"
    mine = _transports.setdefault(group, {})
    key = (kind, str(device))
    transport = mine.get(key)
    if transport is None:
        transport = GatherTransport(group) if kind == "gather" else SymmetricTransport(group, device)
        mine[key] = transport
    return transport


def release() -> int:
    """Free every peer buffer of this process (collective: every rank of each group must call
    it, after its last NVLink call; the next call makes new ones). Returns the number freed."""
    freed = 0
    for transport in [t for mine in list(_transports.values()) for t in mine.values()]:
        if isinstance(transport, SymmetricTransport) and transport._handle is not None:
            transport.release()
            freed += 1
    _transports.clear()
    return freed


def drop_at_exit() -> None:
    """Forget every transport without a collective (peers may be gone; the driver frees the memory)."""
    _transports.clear()
