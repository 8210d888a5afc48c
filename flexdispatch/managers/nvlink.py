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

Limits: one node (the group's hosts are compared at the first call); no sync-free mode yet
(the counts are read on the host); the compiled kernels are required. On CPU process groups
(gloo) the peer buffers are emulated with all-gathers (:class:`.peer_buffers.GatherTransport`):
the same algorithm, for tests and development, not speed. Every rank must use the same
configuration (experts, top-k, FP8); a hidden size or dtype that differs is caught by the
header.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

import torch

from .. import ops, peer_ops
from . import agreement, peer_buffers
from .alltoall import _fp8_payload, routing_by_rank
from .base import Dispatched, _ManagerBase, received_fp8_rows

_META_ALIGN = 8  # float64 rows


@dataclasses.dataclass
class _Route:
    """Where every row of one call goes: host numbers agreed by every rank, and device index
    tensors; what the call's four transfers (two forward, two backward) read."""

    tokens: int  # T: this rank's tokens
    sent: int  # S: rows of this rank's send list (one per token and destination rank)
    received: int  # R: rows this rank receives
    token_cap: int  # the most tokens of any rank (published rows: every rank's regions agree)
    sent_cap: int
    received_cap: int
    plan: object  # the send list's RowIdMap (token -> row of the rank-major send list)
    src_rank: torch.Tensor  # int64 [R]: the source rank of each received row
    meta_row: torch.Tensor  # int64 [R]: its row in the source's send list
    home_row: torch.Tensor  # int64 [T, W]: row of token t in rank w's received rows, -1 if not sent
    consts: torch.Tensor  # int64 [5, W] on the device: per-rank counts and offsets (see _make_route)
    token_row: Optional[torch.Tensor] = None  # int64 [R]: each received row's token on its source

    def send_peer_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(dest [S], row [S])``: each send-list row's destination and its row among the
        destination's received rows (dispatch's backward only: made then, not in forward)."""
        dest = torch.repeat_interleave(torch.arange(len(self.consts[1]), device=self.consts.device), self.consts[1],
                                       output_size=self.sent)
        return dest, torch.arange(self.sent, device=dest.device) + self.consts[3][dest]

    def home_addrs(self, table: torch.Tensor, row_bytes: int) -> torch.Tensor:
        """``[T, W]`` addresses of this rank's tokens' rows in each rank's published rows (0: none)."""
        return torch.where(self.home_row >= 0, table + self.home_row * row_bytes, 0)

    def source_addrs(self, table: torch.Tensor, row_bytes: int) -> torch.Tensor:
        """``[R]`` addresses of the received rows' tokens in their sources' published tokens."""
        return table[self.src_rank] + self.token_row * row_bytes


def _region(rows: int, row_bytes: int) -> int:
    return -(-rows * row_bytes // peer_buffers.REGION_ALIGN) * peer_buffers.REGION_ALIGN


def _make_route(counts: list, tokens: list, rank: int, in_rank: torch.Tensor) -> _Route:
    """The call's routing from every rank's counts: ``counts[s][d]`` rows rank s sends rank d,
    ``tokens[s]`` the tokens of rank s; ``in_rank [T, W]`` this rank's token-to-rank map."""
    world, device = len(counts), in_rank.device
    sent_to = counts[rank]
    recv_from = [counts[s][rank] for s in range(world)]
    sent, received = sum(sent_to), sum(recv_from)
    # Per-rank constants (host ints): where blocks start in send lists and received lists.
    recv_block = [sum(recv_from[:s]) for s in range(world)]  # my received rows from s start here
    their_send_off = [sum(counts[s][:rank]) for s in range(world)]  # my block in s's send list
    send_off = [sum(sent_to[:d]) for d in range(world)]  # d's block in my send list
    my_recv_start = [sum(counts[s][d] for s in range(rank)) for d in range(world)]  # my block in d's rows
    consts = torch.tensor([recv_from, sent_to, [a - b for a, b in zip(their_send_off, recv_block)],
                           [a - b for a, b in zip(my_recv_start, send_off)], send_off], dtype=torch.int64)
    consts = consts.to(device, non_blocking=True)
    ranks = torch.arange(world, device=device)
    src_rank = torch.repeat_interleave(ranks, consts[0], output_size=received)
    meta_row = torch.arange(received, device=device) + consts[2][src_rank]
    plan = ops.make_plan(in_rank, world, num_out_tokens=sent)
    row_map = plan.map.long()
    home_row = torch.where(row_map >= 0, row_map + consts[3], -1)
    received_by = [sum(counts[s][d] for s in range(world)) for d in range(world)]
    return _Route(tokens=tokens[rank], sent=sent, received=received, token_cap=max(tokens),
                  sent_cap=max(sum(c) for c in counts), received_cap=max(received_by), plan=plan,
                  src_rank=src_rank, meta_row=meta_row, home_row=home_row, consts=consts)


class _NvlinkDispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, send_meta, route, transport, fp8, keep_fp8, pull_later, max_blocks):
        """``(rows, recv_meta, pulled, kept)``: ``pulled`` is ``(addrs [R], align)`` when
        ``pull_later`` (``rows`` is then a stand-in: the permutation reads the rows), else None;
        ``kept`` the FP8 rows ``(q, scales)`` for the dequantizing permutation (``keep_fp8``)."""
        ctx.route, ctx.transport, ctx.max_blocks = route, transport, max_blocks
        payload = _fp8_payload(hidden) if fp8 else hidden.contiguous()
        _, (tokens, meta) = transport.exchange(None, [(payload, route.token_cap), (send_meta, route.sent_cap)])
        meta_bytes = send_meta.shape[1] * send_meta.element_size()
        recv_meta = send_meta.new_empty(route.received, send_meta.shape[1])
        peer_ops.copy_rows_from(meta[route.src_rank] + route.meta_row * meta_bytes, recv_meta, _META_ALIGN,
                                max_blocks=max_blocks)
        route.token_row = recv_meta[:, 0].long()
        row_bytes = payload.shape[1] * payload.element_size()
        addrs = route.source_addrs(tokens, row_bytes)
        align = peer_buffers.row_align(row_bytes)
        if pull_later:  # (not with FP8: the caller asks for one or the other)
            stand_in = torch.zeros((), dtype=hidden.dtype, device=hidden.device).expand(route.received, hidden.shape[1])
            return stand_in, recv_meta, (addrs, align), None
        landing = payload.new_empty(route.received, payload.shape[1])
        peer_ops.copy_rows_from(addrs, landing, align, max_blocks=max_blocks)
        if not fp8:
            return landing, recv_meta, None, None
        width = hidden.shape[1]
        q, scales = landing[:, :width], landing[:, width:].view(torch.float32)
        rows, _, kept = received_fp8_rows(q, scales, hidden.dtype, keep_fp8, False)
        return rows, recv_meta, None, kept

    @staticmethod
    def backward(ctx, grad_rows, grad_meta, _pulled, _kept):
        route, transport = ctx.route, ctx.transport
        # Both exchanges run on every rank, whatever this rank needs (autograd gives zeros).
        _, (rows, meta) = transport.exchange(None, [(grad_rows, route.received_cap), (grad_meta, route.received_cap)])
        grad_hidden = grad_rows.new_empty(route.tokens, grad_rows.shape[1])
        row_bytes = grad_rows.shape[1] * grad_rows.element_size()
        peer_ops.sum_rows_from(route.home_addrs(rows, row_bytes), grad_hidden, peer_buffers.row_align(row_bytes),
                               ctx.max_blocks)
        meta_bytes = grad_meta.shape[1] * grad_meta.element_size()
        grad_send_meta = grad_meta.new_empty(route.sent, grad_meta.shape[1])
        send_dest, send_peer_row = route.send_peer_rows()
        peer_ops.copy_rows_from(meta[send_dest] + send_peer_row * meta_bytes, grad_send_meta,
                                _META_ALIGN, max_blocks=ctx.max_blocks)
        return grad_hidden, grad_send_meta, None, None, None, None, None, None


class _NvlinkCombine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, route, transport, manager, max_blocks):
        ctx.route, ctx.transport, ctx.max_blocks = route, transport, max_blocks
        hidden = hidden.contiguous()
        row_bytes = hidden.shape[1] * hidden.element_size()
        need = _region(1, agreement.WIDTH * 8) + _region(route.received_cap, row_bytes)
        fits = need <= transport.capacity()
        part = hidden if fits else hidden[:0]
        header = manager._header_tensor(agreement.COMBINE, hidden, hidden.device)
        headers, tables = transport.exchange(header, [(part, route.received_cap)])
        manager._agree(headers, "before any row moved back")
        if not fits:  # the same on every rank once the headers agree: grow, then send the rows
            transport.ensure(need)
            _, tables = transport.exchange(None, [(hidden, route.received_cap)])
        out = hidden.new_empty(route.tokens, hidden.shape[1])
        peer_ops.sum_rows_from(route.home_addrs(tables[0], row_bytes), out, peer_buffers.row_align(row_bytes),
                               max_blocks)
        transport.ensure(_region(route.token_cap, row_bytes))  # the backward's exchange
        return out

    @staticmethod
    def backward(ctx, grad):
        route = ctx.route
        grad = grad.contiguous()
        _, (rows,) = ctx.transport.exchange(None, [(grad, route.token_cap)])
        row_bytes = grad.shape[1] * grad.element_size()
        out = grad.new_empty(route.received, grad.shape[1])
        peer_ops.copy_rows_from(route.source_addrs(rows, row_bytes), out, peer_buffers.row_align(row_bytes),
                                max_blocks=ctx.max_blocks)
        return out, None, None, None, None


class _NvlinkManager(_ManagerBase):
    """The manager over peer buffers (symmetric memory on one node; all-gathers on CPU groups)."""

    name = "nvlink"
    exchanges_in_combine = True  # combine's exchange carries a header (see _NvlinkCombine)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_blocks = self.spec.nvlink_max_blocks  # blocks a transfer kernel may launch (0: no cap)
        self._emulate = os.environ.get("FLEXDISPATCH_NVLINK_TRANSPORT", "") == "gather"
        self._route: Optional[_Route] = None  # the call's routing (set by dispatch, read by combine)

    def _release(self) -> None:
        super()._release()
        self._route = None

    def _transport(self, device: torch.device) -> peer_buffers.Transport:
        return peer_buffers.transport_for(self.group, device, self._emulate)

    def _header_tensor(self, phase: int, hidden: Optional[torch.Tensor], device: torch.device,
                       extra: Optional[torch.Tensor] = None, rows: int = 0) -> torch.Tensor:
        """This rank's header (and ``extra`` words after it) as an int64 device tensor, with the
        route check's error bits OR-ed in on the device (one small kernel: no copy, no sync)."""
        status = self._route_status if phase == agreement.DISPATCH and self._deferred is None else None
        like = extra if extra is not None else torch.empty(0, device=device)
        header = ops.make_header(like, self._header(phase, hidden, rows=rows), status)
        return header if extra is None else torch.cat([header, extra.flatten()])

    def _dispatch(self, hidden_states, async_finish: bool, allocate_on_comm_stream: bool, keep_fp8: bool,
                  permute_next: bool = False) -> Dispatched:
        world, local = self.world_size, self.num_local_experts
        when = "before any token moved"
        indices = self.token_indices
        device = indices.device if indices is not None else (
            hidden_states.device if hidden_states is not None else self._fallback_device())
        transport = self._transport(device)
        first = _region(1, (agreement.WIDTH + world * (local + 1)) * 8)
        if first > peer_buffers.MIN_BYTES:
            raise ValueError(f"config: {world} ranks x {local} local experts need {first} bytes of counts; the "
                             f"nvlink backend supports up to {peer_buffers.MIN_BYTES}")
        transport.ensure(first)
        if hidden_states is None or indices is None:  # this rank's check failed: every rank raises below
            extra = torch.zeros(world, local + 1, dtype=torch.int64, device=device)
            headers, _ = transport.exchange(self._header_tensor(agreement.DISPATCH, None, device, extra), [])
            self._agree(headers[:, :agreement.WIDTH], when)
            raise AssertionError("unreachable: the agreement raises on every rank")  # pragma: no cover
        tokens = indices.shape[0]
        in_rank, expert_counts = routing_by_rank(indices, world, local)
        extra = torch.cat([in_rank.sum(0, dtype=torch.int64)[:, None], expert_counts], dim=1)  # [W, 1 + E_local]
        header = self._header_tensor(agreement.DISPATCH, hidden_states, device, extra, rows=tokens)
        headers, _ = transport.exchange(header, [])
        self._agree(headers[:, :agreement.WIDTH], when)
        ops.check_pending_errors()  # earlier calls' flags are ready now, for free

        every = headers[:, agreement.WIDTH:].view(world, world, local + 1)  # [source, destination, ...]
        counts = every[:, :, 0].tolist()
        route = _make_route(counts, headers[:, agreement.ROWS].tolist(), self.rank, in_rank)
        self._route = route
        fp8 = self.fp8_dispatch
        width = hidden_states.shape[1]
        row_bytes = width * hidden_states.element_size()
        payload_bytes = width + width // 32 if fp8 else row_bytes
        meta_bytes = (1 + 2 * indices.shape[1]) * 8
        transport.ensure(max(
            _region(route.token_cap, payload_bytes) + _region(route.sent_cap, meta_bytes),  # dispatch
            _region(route.received_cap, row_bytes) + _region(route.received_cap, meta_bytes),  # its backward
            _region(1, agreement.WIDTH * 8) + _region(route.received_cap, row_bytes),  # combine
            _region(route.token_cap, row_bytes)))  # combine's backward

        meta = torch.cat([torch.arange(tokens, device=device, dtype=torch.float64)[:, None],
                          indices.to(torch.float64), self.token_probs.to(torch.float64)], dim=1)
        send_meta = ops.apply_permutation(meta, route.plan)
        pull_later = permute_next and not fp8 and not torch.compiler.is_compiling()
        rows, recv_meta, pulled, kept = _NvlinkDispatch.apply(hidden_states, send_meta, route, transport, fp8,
                                                              keep_fp8, pull_later, self.max_blocks)
        topk = indices.shape[1]
        global_ids = recv_meta[:, 1:1 + topk].detach().long()
        local_ids = global_ids - self.rank * local
        mine = (global_ids >= 0) & (local_ids >= 0) & (local_ids < local)
        dispatched = torch.where(mine, local_ids, -1)
        prob_dtype = torch.float64 if self.router_dtype == "fp64" else torch.float32
        probs = self._masked_probs(dispatched, recv_meta[:, 1 + topk:].to(prob_dtype))
        return Dispatched(rows, dispatched, probs, received_counts=every[:, self.rank, 1:].sum(0), fp8=kept,
                          pulled=pulled)

    def _fallback_device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() and \
            "nccl" in str(torch.distributed.get_backend(self.group)).lower() else torch.device("cpu")

    def _combine(self, hidden_states: torch.Tensor, async_finish: bool,
                 allocate_on_comm_stream: bool) -> torch.Tensor:
        if self._deferred is not None:  # this rank's input is wrong: a header alone, every rank raises
            device = self.token_indices.device if self.token_indices is not None else self._fallback_device()
            headers, _ = self._transport(device).exchange(self._header_tensor(agreement.COMBINE, None, device), [])
            self._agree(headers, "before any row moved back")
            raise AssertionError("unreachable: the agreement raises on every rank")  # pragma: no cover
        transport = self._transport(hidden_states.device)
        return _NvlinkCombine.apply(hidden_states, self._route, transport, self, self.max_blocks)
