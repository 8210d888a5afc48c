"""Any number of ranks over ``torch.distributed.all_to_all_single`` (NCCL on GPUs, gloo on
the CPU): for EP sizes DeepEP lacks, clusters without DeepEP, and CPU-only runs.

Dispatch, for T local tokens on W ranks:

1. Each token goes once to every rank holding one of its experts (not once per expert):
   a bool ``[T, W]`` token-to-rank map and its stable rank-major plan.
2. One small collective exchanges, per destination rank, the call's header (row count, phase
   and step, this rank's failed checks and routing error bits, hidden size, dtype, top-k; see
   :mod:`.agreement`) and the per-expert counts. It is the only host sync; it sizes every
   buffer (tokens_per_expert is known on the host without another sync), and if any rank's
   inputs are invalid, or the ranks disagree on the call, every rank raises here, before the
   payload, so no rank hangs or aborts.
3. The routing (global expert ids and probs, packed as float64) and the hidden rows follow
   (with ``fp8_dispatch``, as one uint8 row each: the FP8 bytes and the float32 scales of
   every 128 values, dequantized to the hidden dtype on arrival; backward stays in the
   hidden dtype).
   With ``async_finish=True`` and CUDA tensors the hidden rows' transfer is left in flight;
   the next step of the manager (or :meth:`wait`) makes the current stream wait for it, so
   work issued in between (shared experts, say) overlaps with it. CPU tensors (gloo) move
   synchronously whatever the flag says (gloo's async work made clean runs abort at exit).

Combine first exchanges a header of the same width (phase "combine"), so a rank that abandoned
a call and started the next one meets its peers' combine with an agreed error rather than a
mismatched transfer; then it sends every row back and sums a token's copies in rank order with
the deterministic unpermute kernel. Backward of dispatch is a combine (probs' gradients included), backward of
combine is a dispatch with the cached plan. Every collective runs on every rank, also for
T = 0, in backward too, so an empty rank never leaves the others waiting.
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch

from .. import _library, ops
from ..reference import FP8_GROUP
from . import agreement, collectives, gather, groups
from .base import BackwardCheck, Dispatched, _ManagerBase
from .received import LANDED, received_fp8_rows


def _drain(pending: list) -> None:
    """Wait for async transfers nobody waited for. A gloo work still in flight when its
    manager is collected or the interpreter exits aborts the process ("terminate called
    without an active exception", at every such exit here), so each manager's list is drained
    by a finalizer, which also runs at exit."""
    while pending:
        work = pending.pop()[0]
        try:
            work.wait()
        except Exception:  # noqa: BLE001 - a peer that is gone: nothing left to wait for
            pass


_exchange = collectives.all_to_all_single  # (bounded on CPU groups; "what" names the call in errors)


def fp8_payload(hidden: torch.Tensor) -> torch.Tensor:
    """``[T, fp8_payload_bytes(H)]`` uint8 rows: the FP8 bytes, then the float32 scales' bytes
    (one transfer carries both)."""
    q, scales = ops.quantize_fp8(hidden)
    return torch.cat([q.view(torch.uint8), scales.view(torch.uint8)], dim=1)


def fp8_payload_rows(payload: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of :func:`fp8_payload` on received rows: ``(q [R, width] e4m3 bytes,
    scales [R, width / FP8_GROUP] float32)``, views of ``payload``."""
    return payload[:, :width], payload[:, width:].view(torch.float32)


def fp8_payload_bytes(width: int) -> int:
    """Bytes of an :func:`fp8_payload` row of ``width`` values: one byte a value and a float32
    scale per FP8_GROUP values."""
    return width + width // FP8_GROUP * 4


def routing_by_rank(indices: torch.Tensor, world: int, local: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(in_rank [T, W] bool, counts [W, 1 + E_local] int64)`` of top-k ``indices [T, K]``
    (-1 unused): whether token t goes to rank w (once, whatever its experts there), and per
    rank ``w`` the tokens it receives (column 0: the rows a send list holds for it) then the
    assignments per local expert. No host sync; one kernel where flexdispatch's kernels are
    built."""
    if _library.serves(indices) and not torch.compiler.is_compiling() and indices.dtype in (torch.int32,
                                                                                            torch.int64):
        return _library.kernels().route_by_rank(indices.contiguous(), world, local)
    tokens, topk = indices.shape
    experts, device = world * local, indices.device
    valid = (indices >= 0) & (indices < experts)
    rank_of = torch.where(valid, indices // local, world)
    in_rank = torch.zeros(tokens, world + 1, dtype=torch.bool, device=device)
    in_rank = in_rank.scatter_(1, rank_of, True)[:, :world].contiguous()
    expert_counts = torch.zeros(experts + 1, dtype=torch.int64, device=device).scatter_add_(
        0, torch.where(valid, indices, experts).flatten(),
        torch.ones(tokens * topk, dtype=torch.int64, device=device))[:experts].view(world, local)
    return in_rank, torch.cat([in_rank.sum(0, dtype=torch.int64)[:, None], expert_counts], dim=1)


def _message(header: list, manager: "_AllToAllManager", like: torch.Tensor,
             counts: Optional[torch.Tensor] = None, status: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``[W, WIDTH + E_local]`` int64 on ``like``'s device: ``header`` in every row, with
    ``status[0]`` (the route check's, optional) OR-ed into its error field; then per row ``w``
    the counts of ``counts [W, 1 + E_local]`` (:func:`routing_by_rank`'s: column 0 as the row's
    ROWS field, the rest after the header), or zeros. Made on the device (``ops.make_header``):
    a tensor built from a Python list would be copied from pageable memory, which on CUDA
    waits for the stream."""
    row = ops.make_header(like, header, status).expand(manager.world_size, agreement.WIDTH)
    if counts is None:
        return torch.nn.functional.pad(row, (0, manager.num_local_experts))
    message = torch.cat([row, counts[:, 1:]], dim=1)
    message[:, agreement.ROWS] = counts[:, 0]
    return message


def _agree_in_backward(check, grad: torch.Tensor, group, what: str) -> None:
    """A backward's first exchange: every rank's header in the shape of a dispatch's first
    exchange (``[W, WIDTH + E_local]``), so a peer that went on to its next call meets it and
    every rank raises; realigns this call's layer on disagreement (see BackwardCheck)."""
    message = _message(check.values, check.manager, grad)
    received = torch.empty_like(message)
    _exchange(received, message, None, None, group, what)
    headers = received.cpu()  # (the agreement reads each row's header words, not the counts after them)
    if not check.agreed(headers):
        check.raise_disagreement(headers)


class _AllToAllDispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, meta, plan, send_splits, recv_splits, group, async_finish, fp8, keep_fp8, check, call):
        """``(recv, recv_meta, in_flight, held)``: ``in_flight`` is ``(work, send, finish)`` for an
        async transfer (the caller waits, then calls ``finish`` if it is not None; ``send`` must
        live until then), else None. With ``fp8`` the rows travel as FP8 bytes and scales and
        are dequantized into ``recv`` once they have landed, unless ``keep_fp8``: then ``held``
        is a :class:`.received.KeptFp8` of views of the landing payload, and ``recv`` a
        zero-stride stand-in (the permutation dequantizes them); else ``held`` is LANDED."""
        # (the group by weak reference: a graph kept past destroy_process_group must not keep it)
        ctx.plan, ctx.send_splits, ctx.recv_splits, ctx.group_ref = plan, send_splits, recv_splits, groups.ref(group)
        ctx.check, ctx.call = check, call  # (the backward's agreement; "step S of this layer" for a peer timeout)
        received = sum(recv_splits)
        send_meta = ops.apply_permutation(meta, plan)
        recv_meta = meta.new_empty(received, meta.shape[1])
        _exchange(recv_meta, send_meta, recv_splits, send_splits, group, f"{call}, dispatch (routing)")
        rows = fp8_payload(hidden) if fp8 else hidden
        send = ops.apply_permutation(rows, plan)
        landing = rows.new_empty(received, rows.shape[1])
        # CPU tensors (gloo) move synchronously: with gloo's async work, processes aborted at
        # exit after clean runs (1 of 8 in CI, about 13% in the count; 0 of 30 sync).
        async_finish = async_finish and hidden.is_cuda
        work = _exchange(landing, send, recv_splits, send_splits, group, f"{call}, dispatch (rows)",
                         async_op=async_finish)
        recv, finish, held = landing, None, LANDED
        if fp8:  # (an async finish runs stream-ordered after the transfer: work.wait() on NCCL)
            q, scales = fp8_payload_rows(landing, hidden.shape[1])
            recv, finish, held = received_fp8_rows(q, scales, hidden.dtype, keep_fp8, async_finish)
        return recv, recv_meta, ((work, (send, landing), finish) if async_finish else None), held

    @staticmethod
    def backward(ctx, grad_recv, grad_recv_meta, _in_flight, _held):
        # Both collectives run on every rank, whatever this rank needs.
        group, grads, rows = groups.deref(ctx.group_ref), [], sum(ctx.send_splits)
        with groups.holding(group, "the backward of dispatch"):
            _agree_in_backward(ctx.check, grad_recv, group, f"{ctx.call}, backward of dispatch")
            for grad in (grad_recv, grad_recv_meta):
                back = grad.new_empty(rows, grad.shape[1])
                _exchange(back, grad, ctx.send_splits, ctx.recv_splits, group, f"{ctx.call}, backward of dispatch")
                grads.append(ops.unpermute(back, ctx.plan))
        return grads[0], grads[1], None, None, None, None, None, None, None, None, None


class _AllToAllCombine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, plan, send_splits, recv_splits, group, check, call):
        ctx.plan, ctx.send_splits, ctx.recv_splits, ctx.group_ref = plan, send_splits, recv_splits, groups.ref(group)
        ctx.check, ctx.call = check, call
        back = hidden.new_empty(sum(send_splits), hidden.shape[1])
        _exchange(back, hidden, send_splits, recv_splits, group, f"{call}, combine (rows)")
        return ops.unpermute(back, plan)

    @staticmethod
    def backward(ctx, grad_out):
        send = ops.apply_permutation(grad_out.contiguous(), ctx.plan)
        grad = grad_out.new_empty(sum(ctx.recv_splits), grad_out.shape[1])
        group = groups.deref(ctx.group_ref)
        with groups.holding(group, "the backward of combine"):
            _agree_in_backward(ctx.check, grad_out, group, f"{ctx.call}, backward of combine")
            _exchange(grad, send, ctx.recv_splits, ctx.send_splits, group, f"{ctx.call}, backward of combine")
        return grad, None, None, None, None, None, None


class _AllToAllManager(_ManagerBase):
    """The manager over ``torch.distributed`` all-to-all; any group size, GPU or CPU."""

    name = "alltoall"
    exchanges_in_combine = True

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        # Owner: the manager: async transfers of any layer it serves, drained by the next wait().
        self._pending: list = []
        weakref.finalize(self, _drain, self._pending)  # also at exit: no gloo work outlives Python

    def wait(self) -> None:
        while self._pending:
            work, _, finish = self._pending.pop()
            work.wait()
            if finish is not None:
                with torch.no_grad():
                    finish()

    def _exchange_headers(self, message: torch.Tensor, when: str) -> torch.Tensor:
        """Send row w of ``message [W, WIDTH + E_local]`` to rank w; every rank checks every
        rank's header (see :mod:`.agreement`) and raises together. Returns ``[2, W, ...]`` on
        the host: what this rank sent and what it received."""
        received = torch.full_like(message, -1)  # (-1: no phase; rows of peers that never sent stay so)
        step = self._step

        def what():
            phase = agreement.PHASE_NAMES.get(int(message[0, agreement.PHASE]), "a call")
            return f"step {step} of this layer, {phase} (the header exchange)"

        def missing():
            return [r for r, p in enumerate(received[:, agreement.PHASE].tolist()) if p == -1 and r != self.rank]

        _exchange(received, message, None, None, self.group, what, missing=missing)
        host = torch.stack([message, received]).cpu()  # the one host sync of the call's first exchange
        self.agree(host[1], when)
        return host

    def _blank_message(self, phase: int, hidden) -> torch.Tensor:
        """``[W, WIDTH + E_local]`` int64 where this group's tensors live (NCCL needs CUDA, gloo
        takes the CPU): this rank's header in every row, the counts zero."""
        like = self.token_indices
        if like is None:  # (this rank's check failed before routing)
            like = torch.empty(0, device=gather.group_device(self.group))
        return _message(self._header(phase, hidden), self, like)

    def _dispatch(self, hidden_states, async_finish: bool, allocate_on_comm_stream: bool,
                  keep_fp8: bool, permute_next: bool = False, fp8_rows: bool = False) -> Dispatched:
        when = "before any token moved"
        if hidden_states is None or self.token_indices is None:  # a failed check on this rank
            self._exchange_headers(self._blank_message(agreement.DISPATCH, None), when)
            raise AssertionError("unreachable: the agreement raises on every rank")  # pragma: no cover
        world, local = self.world_size, self.num_local_experts
        indices = self.token_indices
        topk = indices.shape[1]
        in_rank, counts = routing_by_rank(indices, world, local)
        message = _message(self._header(agreement.DISPATCH, hidden_states), self, indices, counts,
                           self._routed.status)
        host = self._exchange_headers(message, when)
        ops.check_pending_errors()  # earlier calls' flags are ready now, for free

        send_splits, recv_splits = host[:, :, agreement.ROWS].tolist()  # (what this rank sent, and received)

        plan = ops.plan_of_ranks(in_rank, num_out_tokens=sum(send_splits))
        meta = torch.cat([indices, self.token_probs.double()], dim=1)  # (float64: cat promotes the indices)
        recv, recv_meta, in_flight, held = _AllToAllDispatch.apply(hidden_states, meta, plan, send_splits,
                                                                   recv_splits, self.group, async_finish,
                                                                   self.fp8_dispatch, keep_fp8,
                                                                   BackwardCheck(self, hidden_states),
                                                                   f"step {self._step} of this layer")
        if in_flight is not None:
            self._pending.append(in_flight)
        prob_dtype = torch.float64 if self.router_dtype == "fp64" else torch.float32
        dispatched, probs = ops.received_routing(recv_meta, 0, topk, self.rank * local, local, prob_dtype)
        return Dispatched(recv, dispatched, probs, received_counts=host[1, :, agreement.WIDTH:].sum(0), held=held,
                          for_combine=(plan, send_splits, recv_splits))

    def _combine(self, hidden_states: torch.Tensor, async_finish: bool,
                 allocate_on_comm_stream: bool) -> torch.Tensor:
        self._exchange_headers(self._blank_message(agreement.COMBINE, None if self._deferred else hidden_states),
                               "before any row moved back")
        plan, send_splits, recv_splits = self._dispatched.for_combine
        return _AllToAllCombine.apply(hidden_states, plan, send_splits, recv_splits, self.group,
                                      BackwardCheck(self, hidden_states), f"step {self._step} of this layer")
