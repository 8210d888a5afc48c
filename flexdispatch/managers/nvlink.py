"""The NVLink manager: peers read each other's rows from symmetric memory, no DeepEP needed.

Every transfer is a *pull*: a rank publishes rows in its peer buffer (:mod:`.peer_buffers`)
and the ranks that need them read them over NVLink with this package's kernels
(:mod:`flexdispatch.peer_ops`). One call of a layer, for T local tokens on W ranks:

1. **Counts.** The first exchange carries the call's header (agreement, see
   :mod:`.agreement`: a failed check on any rank raises on every rank here, before any token
   moves) and, per destination rank, the rows this rank sends there and its per-expert
   counts. Its host read is the call's one host sync; it sizes everything after it.
2. **Dispatch.** Each rank publishes its T rows (FP8 bytes and scales with ``fp8_dispatch``)
   and its send list (rank-major: for every destination, the tokens it receives, with their
   experts and probs). Each receiver reads its part of every peer's send list, then reads
   every token it receives once (never once per expert: NVLink bytes stay one row per (token,
   destination rank)). In the dispatcher's one-call entry points (``token_permutation``) the
   rows are read by the permutation itself and land expert-major (padding and capacity
   applied) with no received intermediate tensor; the step-by-step API gets the received
   rows ``[R, H]`` as from the other managers, in the same order (source rank, then token).
3. **Combine.** Each rank publishes its restored rows (one per received token, the copies
   for its local experts already summed) with a header, and every home rank reads, for each
   of its tokens, the rows of the ranks that hold its experts and sums them in rank order in
   float32 (float64 for float64): the all-to-all manager's sums, bit for bit, without a
   received tensor on the home rank.

Backward mirrors it: dispatch's backward is a combine of the gradients (probs' too), and
combine's backward a dispatch. Transfers run stream-ordered on the current stream, so
``async_finish`` returns tensors that are ready in stream order (there is nothing to wait
for); a transfer overlaps with work on other streams only.

Sync-free (``sync_free=True``): nothing is read on the host, so a layer can be captured in a
CUDA graph (forward and backward). Every rank must pass the same number of tokens T; tensors
are sized for the worst case (every rank's tokens received), rows past the real ones have no
source and stay empty. The headers are checked on the device: if they disagree (a check that
failed on a rank, different token counts, hidden sizes, dtypes, top-k, or steps) every rank
empties the call's routing, so no token moves, and counts a fault that
``report_dropped_tokens()`` raises as RuntimeError at the application's next sync. As with
DeepEP's sync-free mode, a rank whose own check fails raises alone (after taking part in the
dispatch's exchanges) while its peers go on: stop the step everywhere, then call ``reset()``
and :func:`flexdispatch.shutdown` on every rank, which realigns the group's exchanges.

Limits: one node (the group's hosts are compared at the first call); the compiled kernels
are required. On CPU process groups (gloo) the peer buffers are emulated with all-gathers
(:class:`.peer_buffers.GatherTransport`): the same algorithm, for tests and development, not
speed. Every rank must use the same configuration (experts, top-k, FP8); a hidden size or
dtype that differs is caught by the header.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from .. import envs, ops, peer_ops
from ..spec import input_error
from . import agreement, gather, groups, peer_buffers
from .alltoall import fp8_payload, fp8_payload_bytes, fp8_payload_rows, routing_by_rank
from .base import BackwardCheck, Dispatched, _ManagerBase
from .received import LANDED, LeftAtPeers, received_fp8_rows, stand_in

_META_ALIGN = 8  # float64 rows


@dataclasses.dataclass
class _Route:
    """Where every row of one call goes, from every rank's counts (read on the host, or, in
    sync-free mode, only on the device): what the call's four transfers (two forward, two
    backward) read. Row counts are exact, or the worst case in sync-free mode, where rows past
    the real ones have no source (address 0). Each transfer's addresses are one kernel
    (:func:`flexdispatch.peer_ops.peer_addresses`) on the counts: no table is built per call."""

    tokens: int  # T: this rank's tokens
    sent: int  # S: rows of this rank's send list (one per token and destination rank)
    received: int  # R: rows this rank receives
    token_cap: int  # the most tokens of any rank (published rows: every rank's regions agree)
    sent_cap: int
    received_cap: int
    plan: object  # the send list's RowIdMap (token -> row of the rank-major send list, map [T, W])
    counts: torch.Tensor  # int64 [W, W] on the device: rows rank s sends rank d
    rank: int
    first_row: int = 0  # where pulls of received rows start: the first row from the next rank
    worst_case: bool = False  # sync-free: the sizes are worst cases
    recv_meta: Optional[torch.Tensor] = None  # float64 [R, 1 + 2K]: received rows' token, experts, probs
    has_source: Optional[torch.Tensor] = None  # bool [R] (worst case only): whether a row is a real one

    def _addresses(self, kind: int, table: torch.Tensor, row_bytes: int, n: int, **rows) -> torch.Tensor:
        return peer_ops.peer_addresses(kind, self.counts, self.rank, table, row_bytes, n, **rows)

    def received_addrs(self, table: torch.Tensor, row_bytes: int) -> torch.Tensor:
        """``[R]`` addresses of the received rows in their sources' send-list parts."""
        return self._addresses(peer_ops.RECEIVED, table, row_bytes, self.received)

    def source_addrs(self, table: torch.Tensor, row_bytes: int) -> torch.Tensor:
        """``[R]`` addresses of the received rows in their sources' token parts."""
        return self._addresses(peer_ops.RECEIVED_TOKEN, table, row_bytes, self.received, tokens=self.recv_meta)

    def home_addrs(self, table: torch.Tensor, row_bytes: int) -> torch.Tensor:
        """``[T, W]`` addresses of this rank's tokens' rows in each rank's received part (0: none)."""
        world = self.counts.shape[0]
        return self._addresses(peer_ops.HOME, table, row_bytes, self.tokens * world,
                               map=self.plan.map).view(self.tokens, world)

    def send_peer_addrs(self, table: torch.Tensor, row_bytes: int) -> torch.Tensor:
        """``[S]`` addresses of the send list's rows among their destinations' received parts."""
        return self._addresses(peer_ops.SENT, table, row_bytes, self.sent)


def _region(rows: int, row_bytes: int) -> int:
    return -(-rows * row_bytes // peer_buffers.REGION_ALIGN) * peer_buffers.REGION_ALIGN


def _make_route(counts: torch.Tensor, rank: int, in_rank: torch.Tensor, sizes: dict, worst_case: bool,
                first_row: int) -> _Route:
    """The call's routing from ``counts [W, W]`` (int64 on the tokens' device: rows rank s
    sends rank d), this rank's token-to-rank map ``in_rank [T, W]``, the row counts ``sizes``
    (tokens, sent, received and the caps; exact, or worst cases) and where pulls of received
    rows start. Device ops only: no host sync, capturable."""
    plan = ops.plan_of_ranks(in_rank, num_out_tokens=sizes["sent"])
    return _Route(plan=plan, counts=counts.contiguous(), rank=rank, worst_case=worst_case, first_row=first_row,
                  **sizes)


def _backward_exchange(ctx, grad: torch.Tensor, parts: list):
    """A backward exchange with the call's header first (see BackwardCheck), so a peer in
    another phase meets it and every rank raises. Returns ``(tables, ok)``: ``ok`` None, or in
    sync-free mode a 0-d bool on the device (no host read: a disagreement is counted as a fault
    and the caller zeroes its gradients), and ``tables`` None when nothing may be read."""
    check = ctx.check
    manager = check.manager
    headers, tables = ctx.transport.exchange(ops.make_header(grad, check.values), parts)
    if manager.sync_free:
        ok = manager._agreed_on_device(headers.to(grad.device))
        manager.count_fault(ok, check.key)
        return tables, ok
    host = headers.cpu()  # ([W, WIDTH]: the header is its fixed words alone)
    if not check.agreed(host) or tables is None:  # (the gather transport stops at disagreeing headers)
        check.raise_disagreement(host)
    return tables, None


class _NvlinkDispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, send_meta, route, transport, fp8, keep_fp8, pull_later, max_blocks, check):
        """``(rows, recv_meta, held)``: how the received rows are held (:mod:`.received`): with
        ``pull_later`` left in the peers' buffers (``rows`` is then a stand-in: the permutation
        reads the rows, FP8 ones dequantized), with ``keep_fp8`` kept in FP8 for the
        dequantizing permutation, else landed in ``rows``."""
        ctx.route, ctx.transport, ctx.max_blocks, ctx.check = route, transport, max_blocks, check
        payload = fp8_payload(hidden) if fp8 else hidden.contiguous()
        _, (tokens, meta) = transport.exchange(None, [(payload, route.token_cap), (send_meta, route.sent_cap)])
        meta_bytes = send_meta.shape[1] * send_meta.element_size()
        recv_meta = send_meta.new_empty(route.received, send_meta.shape[1])
        meta_addrs = route.received_addrs(meta, meta_bytes)
        peer_ops.copy_rows_from(meta_addrs, recv_meta, _META_ALIGN, max_blocks=max_blocks)  # (no source: zeros)
        route.recv_meta = recv_meta
        if route.worst_case:  # rows past the real ones have no source (and zero routing rows)
            route.has_source = meta_addrs != 0
        row_bytes = payload.shape[1] * payload.element_size()
        addrs = route.source_addrs(tokens, row_bytes)
        align = peer_buffers.row_align(row_bytes)
        if pull_later:
            rows = stand_in((route.received, hidden.shape[1]), hidden.dtype, hidden.device)
            return rows, recv_meta, LeftAtPeers(addrs, align, fp8, route.first_row)
        landing = payload.new_empty(route.received, payload.shape[1])
        peer_ops.copy_rows_from(addrs, landing, align, max_blocks=max_blocks, first_row=route.first_row)
        if not fp8:
            return landing, recv_meta, LANDED
        q, scales = fp8_payload_rows(landing, hidden.shape[1])
        rows, _, held = received_fp8_rows(q, scales, hidden.dtype, keep_fp8, False)
        return rows, recv_meta, held

    @staticmethod
    def backward(ctx, grad_rows, grad_meta, _held):
        route = ctx.route
        # Both exchanges run on every rank, whatever this rank needs (autograd gives zeros).
        with groups.holding(ctx.transport.group, "the backward of dispatch"):
            tables, ok = _backward_exchange(ctx, grad_rows, [(grad_rows, route.received_cap),
                                                             (grad_meta, route.received_cap)])
        if tables is None:  # (sync-free, the gather transport: the ranks disagreed, nothing to read)
            return (grad_rows.new_zeros(route.tokens, grad_rows.shape[1]), grad_meta.new_zeros(route.sent,
                    grad_meta.shape[1])) + (None,) * 7
        rows, meta = tables
        grad_hidden = grad_rows.new_empty(route.tokens, grad_rows.shape[1])
        row_bytes = grad_rows.shape[1] * grad_rows.element_size()
        peer_ops.sum_rows_from(route.home_addrs(rows, row_bytes), grad_hidden, peer_buffers.row_align(row_bytes),
                               ctx.max_blocks)
        meta_bytes = grad_meta.shape[1] * grad_meta.element_size()
        grad_send_meta = grad_meta.new_empty(route.sent, grad_meta.shape[1])
        peer_ops.copy_rows_from(route.send_peer_addrs(meta, meta_bytes), grad_send_meta, _META_ALIGN,
                                max_blocks=ctx.max_blocks)
        if ok is not None:  # (sync-free: a disagreement moves no gradient)
            grad_hidden, grad_send_meta = grad_hidden * ok, grad_send_meta * ok
        return grad_hidden, grad_send_meta, None, None, None, None, None, None, None


def _sum_home_rows(route: _Route, table: torch.Tensor, hidden: torch.Tensor, max_blocks: int) -> torch.Tensor:
    """``[T, H]``: each of this rank's tokens, its rows in the ranks' published parts summed in
    rank order (float32 accumulation; float64 for float64)."""
    row_bytes = hidden.shape[1] * hidden.element_size()
    out = hidden.new_empty(route.tokens, hidden.shape[1])
    peer_ops.sum_rows_from(route.home_addrs(table, row_bytes), out, peer_buffers.row_align(row_bytes), max_blocks)
    return out


class _NvlinkCombine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, route, transport, manager, max_blocks, check):
        ctx.route, ctx.transport, ctx.max_blocks, ctx.check = route, transport, max_blocks, check
        hidden = hidden.contiguous()
        row_bytes = hidden.shape[1] * hidden.element_size()
        if manager.sync_free:  # the header checked on the device only (sized at dispatch)
            transport.ensure(_region(1, agreement.WIDTH * 8) + _region(route.received_cap, row_bytes))
            header = manager._header_tensor(agreement.COMBINE, hidden, hidden.device)
            headers, tables = transport.exchange(header, [(hidden, route.received_cap)])
            manager.count_fault(manager._agreed_on_device(headers.to(hidden.device)))
            if tables is None:  # (the gather transport stops at disagreeing headers: nothing to read)
                return hidden.new_zeros(route.tokens, hidden.shape[1])
        else:
            need = _region(1, agreement.WIDTH * 8) + _region(route.received_cap, row_bytes)
            fits = need <= transport.capacity()
            header = manager._header_tensor(agreement.COMBINE, hidden, hidden.device)
            headers, tables = transport.exchange(header, [(hidden if fits else hidden[:0], route.received_cap)])
            if fits and tables is not None:  # (the gather transport stops at disagreeing headers)
                # The sum is queued before the host waits for the headers (the combine's one
                # host sync), so the GPU goes on while the host reads them. If they disagree,
                # it summed rows its peers did not send (inside their parts: every rank's
                # buffer has the same size) and every rank raises before ``out`` is returned.
                landed = manager._on_host(headers)
                out = _sum_home_rows(route, tables[0], hidden, max_blocks)
                manager.agree(landed(), "before any row moved back")
            else:  # the same on every rank once the headers agree: grow, then send the rows
                manager.agree(headers.cpu(), "before any row moved back")  # (raises on disagreement)
                transport.ensure(need)
                _, tables = transport.exchange(None, [(hidden, route.received_cap)])
                out = _sum_home_rows(route, tables[0], hidden, max_blocks)
            transport.ensure(_region(1, agreement.WIDTH * 8) + _region(route.token_cap, row_bytes))  # its backward
            return out
        return _sum_home_rows(route, tables[0], hidden, max_blocks)

    @staticmethod
    def backward(ctx, grad):
        route = ctx.route
        grad = grad.contiguous()
        with groups.holding(ctx.transport.group, "the backward of combine"):
            tables, ok = _backward_exchange(ctx, grad, [(grad, route.token_cap)])
        if tables is None:  # (sync-free, the gather transport: the ranks disagreed, nothing to read)
            return (grad.new_zeros(route.received, grad.shape[1]),) + (None,) * 5
        row_bytes = grad.shape[1] * grad.element_size()
        out = grad.new_empty(route.received, grad.shape[1])
        peer_ops.copy_rows_from(route.source_addrs(tables[0], row_bytes), out, peer_buffers.row_align(row_bytes),
                                max_blocks=ctx.max_blocks, first_row=route.first_row)
        return (out if ok is None else out * ok), None, None, None, None, None


class _NvlinkManager(_ManagerBase):
    """The manager over peer buffers (symmetric memory on one node; all-gathers on CPU groups)."""

    name = "nvlink"
    exchanges_in_combine = True  # combine's exchange carries a header (see _NvlinkCombine)
    supports_sync_free = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_blocks = self.spec.nvlink_max_blocks  # blocks a transfer kernel may launch (0: no cap)
        self.stagger_pulls = envs.switch("nvlink_pulls") == "staggered"  # (else every pull starts at row 0)
        self._emulate = envs.switch("nvlink_transport") == "gather"
        self._pinned: Optional[torch.Tensor] = None  # host copy of a combine's headers

    def _on_host(self, headers: torch.Tensor):
        """Start copying ``headers`` to pinned host memory without waiting; returns the call
        that waits for the copy alone (not for later work on the stream) and gives the CPU copy."""
        if headers.device.type == "cpu":
            return lambda: headers
        if self._pinned is None or self._pinned.shape != headers.shape:
            self._pinned = torch.empty(headers.shape, dtype=headers.dtype, pin_memory=True)
        pinned, landed = self._pinned, torch.cuda.Event()
        pinned.copy_(headers, non_blocking=True)
        landed.record()
        return lambda: (landed.synchronize(), pinned)[1]

    def _transport(self, device: torch.device) -> peer_buffers.Transport:
        return peer_buffers.transport_for(self.group, device, self._emulate)

    def _header_tensor(self, phase: int, hidden: Optional[torch.Tensor], device: torch.device,
                       extra: Optional[torch.Tensor] = None, rows: int = 0) -> torch.Tensor:
        """This rank's header (and ``extra`` words after it) as an int64 device tensor, with the
        route check's error bits OR-ed in on the device (one small kernel: no copy, no sync)."""
        status = self._routed.status if phase == agreement.DISPATCH and self._deferred is None else None
        like = extra if extra is not None else torch.empty(0, device=device)
        header = ops.make_header(like, self._header(phase, hidden, rows=rows), status)
        return header if extra is None else torch.cat([header, extra.flatten()])

    def _dispatch(self, hidden_states, async_finish: bool, allocate_on_comm_stream: bool, keep_fp8: bool,
                  permute_next: bool = False, fp8_rows: bool = False) -> Dispatched:
        world, local = self.world_size, self.num_local_experts
        when = "before any token moved"
        indices = self.token_indices
        failed = hidden_states is None or indices is None  # this rank's own check failed
        device = indices.device if indices is not None else (
            hidden_states.device if hidden_states is not None else self._fallback_device())
        transport = self._transport(device)
        first = _region(1, (agreement.WIDTH + world * (local + 1)) * 8)
        if first > peer_buffers.MIN_BYTES:
            raise input_error(ValueError, "config",
                              f"{world} ranks x {local} local experts need {first} bytes of counts; the "
                              f"nvlink backend supports up to {peer_buffers.MIN_BYTES}")
        transport.ensure(first)
        if failed:
            if self.sync_free:  # peers decide on the device: take part in both exchanges, then raise
                return self._sync_free_failed_dispatch(transport, device)
            extra = torch.zeros(world, local + 1, dtype=torch.int64, device=device)
            headers, _ = transport.exchange(self._header_tensor(agreement.DISPATCH, None, device, extra), [])
            self.agree(headers[:, :agreement.WIDTH].cpu(), when)
            raise AssertionError("unreachable: the agreement raises on every rank")  # pragma: no cover
        tokens, topk = indices.shape
        in_rank, extra = routing_by_rank(indices, world, local)  # extra: [W, 1 + E_local]
        header = self._header_tensor(agreement.DISPATCH, hidden_states, device, extra, rows=tokens)
        headers, _ = transport.exchange(header, [])
        # Each token's routing row (its index, experts, probs), made while the exchange runs.
        # (one cat: the float64 token numbers promote the indices and probs)
        meta = torch.cat([torch.arange(tokens, device=indices.device, dtype=torch.float64)[:, None], indices,
                          self.token_probs], dim=1)
        if self.sync_free:
            if headers.shape[1] < header.numel():  # the gather transport stopped at disagreeing headers
                headers = torch.cat([headers, headers.new_zeros(world, header.numel() - headers.shape[1])], 1)
            every = headers[:, agreement.WIDTH:].view(world, world, local + 1).to(device)  # [source, dest, ...]
            counts, sizes, received_counts = self._agree_on_device(headers, every, in_rank, tokens, topk)
            rows = None  # (known on the device only)
        else:
            host = headers.cpu()  # the call's one host sync
            self.agree(host, when)  # (the agreement reads each row's header words, not the counts after them)
            ops.check_pending_errors()  # earlier calls' flags are ready now, for free
            every = headers[:, agreement.WIDTH:].view(world, world, local + 1).to(device)  # [source, dest, ...]
            host_counts = host[:, agreement.WIDTH:].view(world, world, local + 1)
            rows = host_counts[:, :, 0].tolist()  # [source][dest] (plain ints: a few host ops, not dozens)
            received = list(map(sum, zip(*rows)))  # per destination (builtins: no generator frames)
            sizes = dict(tokens=tokens, sent=sum(rows[self.rank]), received=received[self.rank],
                         token_cap=max(host[:, agreement.ROWS].tolist()),
                         sent_cap=max(map(sum, rows)), received_cap=max(received))
            counts, received_counts = every[:, :, 0], host_counts[:, self.rank, 1:].sum(0)
        route = _make_route(counts, self.rank, in_rank, sizes, self.sync_free, self._first_row(sizes, rows))
        self._ensure_for_call(transport, route, hidden_states, topk)
        return self._move(hidden_states, meta, route, transport, keep_fp8, permute_next, fp8_rows, received_counts)

    def _first_row(self, sizes: dict, rows: Optional[list]) -> int:
        """Where this rank's pulls of received rows start: the first row from the next rank.
        Received rows are grouped by source rank, so readers that all started at source 0
        would queue on one peer's links at a time; rank r starting at source r + 1 makes the
        readers and sources a one-to-one match throughout. Exact from the host's counts
        ``rows[source][dest]``; in sync-free mode (counts on the device only) the next
        rank's share of the worst-case rows."""
        if not self.stagger_pulls:
            return 0
        source = (self.rank + 1) % self.world_size
        if rows is None:
            return sizes["received"] * source // self.world_size
        first = sum(r[self.rank] for r in rows[:source])
        return first if first < sizes["received"] else 0

    def _agreed_on_device(self, headers: torch.Tensor, tokens: Optional[int] = None) -> torch.Tensor:
        """0-d bool on the device: the rule of :class:`.agreement.Agreement` on every rank's
        header (and, given ``tokens``, every rank passing that many). No sync."""
        head = headers[:, :agreement.WIDTH]
        breaks = (head[:, agreement.ERROR] != 0) | (head[:, agreement.PHASE:] != head[:1, agreement.PHASE:]).any(1)
        ok = ~breaks.any()
        return ok if tokens is None else ok & (head[:, agreement.ROWS] == tokens).all()

    def _agree_on_device(self, headers, every, in_rank, tokens: int, topk: int):
        """Sync-free: the headers checked on the device; if they disagree, every rank's
        routing is emptied (no token moves) and the call counted in ``sync_free_faults``.
        Returns ``(counts, sizes, None)`` with worst-case sizes (every rank passes the same T)."""
        ok = self._agreed_on_device(headers.to(every.device), tokens)
        self.count_fault(ok)
        counts = every[:, :, 0] * ok
        in_rank.mul_(ok)
        per_token = min(topk, self.world_size)
        sizes = dict(tokens=tokens, sent=tokens * per_token, received=tokens * self.world_size, token_cap=tokens,
                     sent_cap=tokens * per_token, received_cap=tokens * self.world_size)
        return counts, sizes, None

    def _sync_free_failed_dispatch(self, transport, device):
        """A sync-free rank whose own check failed: both exchanges of the dispatch with an error
        header and no tokens (its peers' device check then empties the call everywhere), then
        this rank raises. Its peers go on with the call; reset every rank (see the module docs)."""
        world, local = self.world_size, self.num_local_experts
        extra = torch.zeros(world, local + 1, dtype=torch.int64, device=device)
        transport.exchange(self._header_tensor(agreement.DISPATCH, None, device, extra), [])
        transport.exchange(None, [])
        error, self._deferred = self._deferred, None
        self._release()
        self._advance_step()  # as its peers will when their call ends
        raise error

    def _ensure_for_call(self, transport, route: _Route, hidden: torch.Tensor, topk: int) -> None:
        """Room for the call's four exchanges, from numbers every rank has (one size: all ranks
        grow together)."""
        width = hidden.shape[1]
        row_bytes = width * hidden.element_size()
        payload_bytes = fp8_payload_bytes(width) if self.fp8_dispatch else row_bytes
        meta_bytes = (1 + 2 * topk) * 8
        header = _region(1, agreement.WIDTH * 8)  # (every exchange but the dispatch's second starts with one)
        transport.ensure(max(
            _region(route.token_cap, payload_bytes) + _region(route.sent_cap, meta_bytes),  # dispatch
            header + _region(route.received_cap, row_bytes) + _region(route.received_cap, meta_bytes),  # its backward
            header + _region(route.received_cap, row_bytes),  # combine
            header + _region(route.token_cap, row_bytes)))  # combine's backward

    def _move(self, hidden_states, meta, route: _Route, transport, keep_fp8: bool, permute_next: bool,
              fp8_rows: bool, received_counts) -> Dispatched:
        """The dispatch's transfer and the received rows' routing (local experts, probs):
        ``meta [T, 1 + 2K]`` float64, each token's index, experts and probs."""
        topk = (meta.shape[1] - 1) // 2
        send_meta = ops.apply_permutation(meta, route.plan)
        fp8 = self.fp8_dispatch
        # The permutation reads the rows where they landed; FP8 ones (bytes, then scales) only
        # when dequantized there (keep_fp8, not for FP8 experts) and aligned for its loads.
        width = hidden_states.shape[1]
        fp8_align = 4 if hidden_states.dtype == torch.float32 else 8
        pull_later = permute_next and not torch.compiler.is_compiling() and (not fp8 or (
            keep_fp8 and not fp8_rows and peer_buffers.row_align(fp8_payload_bytes(width)) >= fp8_align))
        rows, recv_meta, held = _NvlinkDispatch.apply(hidden_states, send_meta, route, transport, fp8,
                                                      keep_fp8, pull_later, self.max_blocks,
                                                      BackwardCheck(self, hidden_states))
        local = self.num_local_experts
        prob_dtype = torch.float64 if self.router_dtype == "fp64" else torch.float32
        dispatched, probs = ops.received_routing(recv_meta, 1, topk, self.rank * local, local, prob_dtype,
                                                 has_source=route.has_source)
        num_out = self._worst_case_rows(route.received) if self.sync_free else None
        return Dispatched(rows, dispatched, probs, received_counts=received_counts, num_out=num_out, held=held,
                          for_combine=route)

    def _fallback_device(self) -> torch.device:
        return gather.group_device(self.group)

    def _combine(self, hidden_states: torch.Tensor, async_finish: bool,
                 allocate_on_comm_stream: bool) -> torch.Tensor:
        if self._deferred is not None:  # this rank's input is wrong: a header alone, every rank raises
            device = self.token_indices.device if self.token_indices is not None else self._fallback_device()
            headers, _ = self._transport(device).exchange(self._header_tensor(agreement.COMBINE, None, device), [])
            if self.sync_free:  # its peers count a fault on the device (see the module docs)
                error, self._deferred = self._deferred, None
                self.reset()
                raise error
            self.agree(headers.cpu(), "before any row moved back")
            raise AssertionError("unreachable: the agreement raises on every rank")  # pragma: no cover
        transport = self._transport(hidden_states.device)
        return _NvlinkCombine.apply(hidden_states, self._dispatched.for_combine, transport, self, self.max_blocks,
                                    BackwardCheck(self, hidden_states))
