"""Token permutation ops on the fused kernels, as autograd functions.

Every op has the same signature and result as its plain-PyTorch twin in
:mod:`flexdispatch.reference`, which serves whenever the kernels are not built for the
tensors' device. Shapes: ``R`` input rows, ``K`` top-k, ``E`` experts, ``N`` output rows,
``H`` hidden. Tokens may be float32, float16, bfloat16 or float64 (permutation moves bytes,
so any dtype works there); probs float32 or float64 (others are converted to float32).

Host syncs: :func:`permute` and :func:`permute_by_indices` make exactly one, to size their
output, when ``num_out_tokens`` is None; none otherwise. On CUDA, invalid routing found by a
kernel without a sync is raised as ValueError by a later op once its error word has landed in
pinned memory, or by :func:`check_pending_errors` (which waits for that small copy only).
"""

from __future__ import annotations

import ctypes
import dataclasses
from typing import Optional, Sequence

import torch

from . import _jit, reference
from .rowmap import (MAX_EXPERTS, RowIdMap, index_route_error_bits, layout_error_index, layout_total_index,
                     routing_error)

# The compiled kernels, loaded (built on a cold cache) at the first op that needs them, or by
# load_kernels(): importing flexdispatch builds nothing, so commands that need no kernels
# (``python -m flexdispatch info``, ``clear-cache``) answer at once.
_C = None
_loaded = False
_with_cuda = False  # whether _C has CUDA kernels (a plain bool: torch.compile reads it while tracing)

@dataclasses.dataclass
class _PendingError:
    """A CUDA error word on its way to pinned memory, with what its message needs."""

    words: "ctypes.Array"  # the pinned slots of _ErrorSlots; the word's slot holds -1 until it lands
    slot: int
    route: torch.Tensor
    num_experts: int
    name: str
    num_out: Optional[int]
    probs: Optional[torch.Tensor]
    device: int  # the CUDA device whose stream copies the word

    def landed(self) -> bool:
        return int(self.words[self.slot]) != _NOT_LANDED

    def error(self) -> Optional[ValueError]:
        bits = int(self.words[self.slot])
        return routing_error(bits, self.route, self.num_experts, self.name, self.num_out, self.probs) if bits else None


# CUDA error words not yet read, oldest first (process-wide: a later op of any layer reads them).
_pending: list[_PendingError] = []
_MAX_PENDING = 64
_NOT_LANDED = -1  # (error words are bit sets: never negative)


class _ErrorSlots:
    """Pinned words the error words are copied to, reused in turn: no pinned allocation, no
    event and no torch op per call (the host marks a slot -1, a copy queued on the stream
    overwrites it; the word has landed once the slot is not -1). A slot comes back after
    2 * _MAX_PENDING others, by when its entry has been read (at most _MAX_PENDING + 1 are
    pending at once)."""

    def __init__(self):
        self._words: dict = {}  # dtype -> (pinned tensor [2 * _MAX_PENDING], a ctypes view of it)
        self._next: dict = {}

    def take(self, dtype: torch.dtype):
        """``(pinned tensor, ctypes view, slot)``: the next slot for a word of ``dtype``
        (int32 or int64), marked not landed."""
        entry = self._words.get(dtype)
        if entry is None:
            words = torch.zeros(2 * _MAX_PENDING, dtype=dtype, pin_memory=True)
            word_type = ctypes.c_int64 if dtype == torch.int64 else ctypes.c_int32
            # (plain memory reads and writes from the host: no torch op per access)
            entry = self._words[dtype] = (words, (word_type * words.numel()).from_address(words.data_ptr()))
        slot = self._next.get(dtype, 0)
        self._next[dtype] = (slot + 1) % entry[0].numel()
        entry[1][slot] = _NOT_LANDED
        return entry[0], entry[1], slot


_slots = _ErrorSlots()


def load_kernels() -> bool:
    """Load the kernels now (building them on a cold cache, once per machine); True when the
    compiled kernels are in use, False when the plain PyTorch ops serve (FLEXDISPATCH_JIT=0, or
    a failed build in ``auto`` mode). The first op calls this; a dispatcher's constructor does
    too, so the build happens when a model is built rather than inside its first step."""
    global _C, _loaded, _with_cuda
    if not _loaded:
        _C = _jit.load_kernels()  # raises with FLEXDISPATCH_JIT=1; then the next call tries again
        _with_cuda = _C is not None and bool(_C.with_cuda())
        _loaded = True
    return _C is not None


def kernels_loaded() -> bool:
    """Whether the compiled kernels are loaded and in use, as of now; builds and loads nothing.
    False before the first op, dispatcher or :func:`load_kernels` call of this process, and
    when the plain PyTorch ops serve (FLEXDISPATCH_JIT=0, or a failed build in ``auto`` mode).
    To load (and on a cold cache build) them, call :func:`load_kernels`."""
    return _loaded and _C is not None


def cuda_kernels_loaded() -> bool:
    """True when the compiled kernels serve CUDA tensors (built with CUDA); loads them."""
    return load_kernels() and _with_cuda


def _use_kernels(t: torch.Tensor) -> bool:
    if not load_kernels():
        return False
    return t.device.type == "cpu" or (t.device.type == "cuda" and _with_cuda)


def _needs_grad(*tensors: Optional[torch.Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def check_pending_errors() -> None:
    """Raise the first routing error flagged by earlier CUDA calls. Waits only for their small
    error-word copies to land (not for the whole device), so it costs nothing once the GPU
    has passed them."""
    _read_pending_errors(wait=True)


def _read_pending_errors(wait: bool) -> None:
    """Read the queued error words in order (all of them, or without waiting only those that
    have landed); raise the first error and forget the rest."""
    while _pending and (wait or _pending[0].landed()):
        entry = _pending.pop(0)
        if not entry.landed():  # (rare: the callers wait after a host sync, when it has landed)
            torch.cuda.synchronize(entry.device)
        error = entry.error()
        if error is not None:
            _pending.clear()
            raise error


def defer_routing_error(status: torch.Tensor, route: torch.Tensor, num_experts: int, name: str,
                        probs: Optional[torch.Tensor] = None) -> None:
    """Raise the error bits of :func:`check_route`'s ``status`` now on the CPU; on CUDA read
    them once they have landed (at the next sync point), without adding a sync."""
    _defer_or_raise(status, 0, route, num_experts, name, probs=probs)


def _defer_or_raise(flags: torch.Tensor, index: int, route: torch.Tensor, num_experts: int, name: str,
                    num_out: Optional[int] = None, probs: Optional[torch.Tensor] = None) -> None:
    """Raise now for CPU tensors (reading the flag costs nothing); on CUDA, queue a copy of the
    error word to pinned memory and read it once it has landed (at a later call, or at
    :func:`check_pending_errors`) instead of adding a host sync."""
    if flags.device.type == "cpu":
        bits = int(flags[index])
        if bits:
            raise routing_error(bits, route, num_experts, name, num_out, probs)
        return
    if torch.cuda.is_current_stream_capturing():
        return  # a graph being captured may not sync; its sizes are the caller's (sync-free mode)
    _read_pending_errors(wait=False)
    pinned, words, slot = _slots.take(flags.dtype)
    if _use_kernels(flags):
        _C.queue_word_copy(flags, index, pinned, slot)
    else:  # (kernels not built for CUDA: the plain ops made the flags)
        pinned[slot:slot + 1].copy_(flags[index:index + 1], non_blocking=True)
    _pending.append(_PendingError(words, slot, route, num_experts, name, num_out, probs, flags.device.index))
    if len(_pending) > _MAX_PENDING:
        check_pending_errors()


def _finish_plan(row_id_map, layout, host, route, num_experts, num_out, pad_multiple, sized, name) -> RowIdMap:
    """Wrap the kernels' outputs; raise (or defer) the error bits they found."""
    error_index = layout_error_index(num_experts)
    if host is not None:
        check_pending_errors()  # a sync just happened: read the earlier flags too
        bits = int(host[error_index])
        if bits:
            raise routing_error(bits, route, num_experts, name)
    else:
        _defer_or_raise(layout, error_index, route, num_experts, name, num_out)
    return RowIdMap(map=row_id_map, layout=layout, num_experts=num_experts, num_out=num_out,
                    pad_multiple=pad_multiple or 1, has_tail=sized, host_layout=host)


# ---- argument checks (host side, no sync) ------------------------------------------------


def _check_tensor(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")


def _check_rows(tokens: torch.Tensor, name: str = "tokens") -> None:
    _check_tensor(tokens, name)
    if tokens.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D tensor [rows, hidden], got shape {tuple(tokens.shape)}")


def _check_probs(probs, like: torch.Tensor, name: str = "probs") -> Optional[torch.Tensor]:
    if probs is None:
        return None
    _check_tensor(probs, name)
    if tuple(probs.shape) != tuple(like.shape):
        raise ValueError(f"{name}: expected shape {tuple(like.shape)}, got {tuple(probs.shape)}")
    if not probs.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {probs.dtype}")
    if probs.device != like.device:
        raise ValueError(f"{name}: expected device {like.device}, got {probs.device}")
    return probs if probs.dtype in (torch.float32, torch.float64) else probs.float()


def _check_index_route(indices, num_experts, rows: Optional[int], name: str = "indices") -> None:
    _check_tensor(indices, name)
    if indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name}: expected int32 or int64, got {indices.dtype}")
    if indices.dim() != 2:
        raise ValueError(f"{name}: expected a 2-D tensor [rows, topk], got shape {tuple(indices.shape)}")
    if rows is not None and indices.shape[0] != rows:
        raise ValueError(f"{name}: expected {rows} rows (one per token), got {indices.shape[0]}")
    if not isinstance(num_experts, int) or isinstance(num_experts, bool) or not 1 <= num_experts <= MAX_EXPERTS:
        raise ValueError(f"num_experts: expected an int in [1, {MAX_EXPERTS}], got {num_experts!r}")


def _check_sizes(num_out_tokens, pad_multiple) -> None:
    if num_out_tokens is not None and (not isinstance(num_out_tokens, int) or num_out_tokens < 0):
        raise ValueError(f"num_out_tokens: expected None or an int >= 0, got {num_out_tokens!r}")
    if pad_multiple is not None and (not isinstance(pad_multiple, int) or pad_multiple < 1):
        raise ValueError(f"pad_multiple: expected None or an int >= 1, got {pad_multiple!r}")


# ---- kernel-backed primitives --------------------------------------------------------------


def _scatter(src: torch.Tensor, plan: RowIdMap) -> torch.Tensor:
    """``[N, H]`` with every source row at its planned rows; pad and tail rows zero."""
    return _C.scatter_rows(src.contiguous(), plan.map, plan.num_out, plan.layout, plan.num_experts,
                           plan.pad_multiple > 1, plan.has_tail)


def _gather_slots(values: torch.Tensor, plan: RowIdMap) -> torch.Tensor:
    return _gather_slots_by_map(values, plan.map)


def _gather_slots_by_map(values: torch.Tensor, row_map: torch.Tensor) -> torch.Tensor:
    """``[R, S]``: values[map[r, s]] (0 for unused slots) for a per-output-row vector ``[N]``."""
    spare = values.shape[0]
    padded = torch.cat([values, values.new_zeros(1)])
    index = torch.where(row_map >= 0, row_map.long(), spare)
    return padded[index]


def _multihot_impl(indices: torch.Tensor, probs: torch.Tensor, num_experts: int):
    """``(routing_map, multihot)`` of contiguous ``indices`` and detached ``probs``; routing
    errors raised (CPU) or queued (CUDA)."""
    routing_map, multihot, error = _C.indices_to_multihot(indices, probs, num_experts)
    _defer_or_raise(error, 0, indices, num_experts, "indices")
    return routing_map, multihot


def _multihot_grad(indices: torch.Tensor, grad_multihot: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The gradient of the top-k probs: ``grad_multihot`` read back at the chosen experts."""
    if grad_multihot is None:
        return None
    column = torch.where(indices >= 0, indices.long(), grad_multihot.shape[1])
    padded = torch.cat([grad_multihot, grad_multihot.new_zeros(grad_multihot.shape[0], 1)], dim=1)
    return padded.gather(1, column)


def _plan_impl(route, num_experts, num_out_tokens, pad_multiple, name) -> RowIdMap:
    row_id_map, layout, host = _C.plan(route, num_experts, pad_multiple or 1,
                                       -1 if num_out_tokens is None else num_out_tokens)
    num_out = num_out_tokens if host is None else int(host[layout_total_index(num_experts)])
    return _finish_plan(row_id_map, layout, host, route, num_experts, num_out, pad_multiple,
                        num_out_tokens is not None, name)


def _kernel_plan(kernel, probs, route, num_experts, num_out_tokens, pad_multiple, name):
    """Run one permutation kernel, ``kernel(probs) -> (out, out_probs, row_id_map, layout,
    host)``, and wrap its plan: ``(out, out_probs, plan)``."""
    p = probs.detach().contiguous() if probs is not None else None
    out, out_probs, row_id_map, layout, host = kernel(p)
    plan = _finish_plan(row_id_map, layout, host, route, num_experts, out.shape[0], pad_multiple,
                        num_out_tokens is not None, name)
    return out, out_probs, plan


def _permute_kernel(tokens, route, num_experts, num_out_tokens, pad_multiple):
    """The whole permutation in one kernel call: plan, size (one sync when num_out_tokens is
    None), map, rows."""
    rows = tokens.detach().contiguous()
    return lambda p: _C.permute(route, num_experts, pad_multiple or 1,
                                -1 if num_out_tokens is None else num_out_tokens, rows, p)


def _permute(tokens, probs, route, num_experts, num_out_tokens, pad_multiple, name):
    """``(out, out_probs, plan)`` without autograd."""
    return _kernel_plan(_permute_kernel(tokens, route, num_experts, num_out_tokens, pad_multiple), probs, route,
                        num_experts, num_out_tokens, pad_multiple, name)


def _permutation_grads(ctx, grad_out, grad_out_probs):
    """Gradients of a permutation's first two inputs (rows, probs) from its outputs': a
    gather along ``ctx.plan`` each (None where not needed)."""
    grad_rows = grad_probs = None
    if ctx.needs_input_grad[0] and grad_out is not None:
        grad_rows = _C.gather_rows(grad_out.contiguous(), ctx.plan.map, None)
    if ctx.needs_input_grad[1] and grad_out_probs is not None:
        grad_probs = _gather_slots(grad_out_probs, ctx.plan)
    return grad_rows, grad_probs


class _ApplyPermutation(torch.autograd.Function):
    @staticmethod
    def forward(ctx, tokens, plan):
        ctx.plan = plan
        return _scatter(tokens, plan)

    @staticmethod
    def backward(ctx, grad_out):
        return _C.gather_rows(grad_out.contiguous(), ctx.plan.map, None), None


class _Unpermute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, permuted, probs, plan):
        x = permuted.contiguous()
        p = probs.detach().contiguous() if probs is not None else None
        ctx.plan = plan
        ctx.save_for_backward(x if p is not None else None, p)
        return _C.gather_rows(x, plan.map, p)

    @staticmethod
    def backward(ctx, grad_out):
        plan = ctx.plan
        x, p = ctx.saved_tensors
        g = grad_out.contiguous()
        if p is None:
            return _scatter(g, plan), None, None
        grad_x, grad_p = _C.gather_rows_backward(g, x, plan.map, p, plan.layout, plan.num_experts,
                                                 plan.pad_multiple > 1, plan.has_tail)
        return grad_x, (grad_p if ctx.needs_input_grad[1] else None), None


class _IndicesToMultihot(torch.autograd.Function):
    @staticmethod
    def forward(ctx, indices, probs, num_experts):
        idx = indices.contiguous()
        routing_map, multihot = _multihot_impl(idx, probs.detach().contiguous(), num_experts)
        ctx.save_for_backward(idx)
        ctx.mark_non_differentiable(routing_map)
        return routing_map, multihot

    @staticmethod
    def backward(ctx, grad_map, grad_multihot):
        (idx,) = ctx.saved_tensors
        return None, _multihot_grad(idx, grad_multihot), None


# ---- public ops ----------------------------------------------------------------------------


def indices_to_multihot(indices: torch.Tensor, probs: torch.Tensor, num_experts: int):
    """Top-k routing to multihot form.

    Args:
        indices: int32/int64 ``[R, K]`` expert ids; -1 marks an unused slot.
        probs: float ``[R, K]``.
        num_experts: ``E``.

    Returns:
        ``(routing_map, multihot_probs)``: bool ``[R, E]`` and ``[R, E]`` in probs' dtype (zero
        where unset). Gradients flow to ``probs``.

    Raises:
        ValueError: an index >= E or < -1, or one expert twice in a row (at once on the CPU;
            on CUDA at the next sync point, see :func:`check_pending_errors`).
    """
    _check_index_route(indices, num_experts, None)
    probs = _check_probs(probs, indices)
    if not _use_kernels(indices):
        return reference.indices_to_multihot(indices, probs, num_experts)
    if torch.compiler.is_compiling():
        return _library.indices_to_multihot(indices, probs, num_experts)
    return _IndicesToMultihot.apply(indices, probs, num_experts)


def check_route(indices: torch.Tensor, num_experts: int, flag: int = 0, probs: Optional[torch.Tensor] = None):
    """Validate top-k routing on its device in one pass, without a host sync.

    Args:
        indices: int32/int64 ``[R, K]`` expert ids, -1 for an unused slot.
        num_experts: ``E``.
        flag: an int32 value reported in ``status[1]`` when anything is wrong (0 otherwise),
            for a caller that adds it to a later computation without asking the host.
        probs: optional float ``[R, K]``: a NaN or infinite prob of a selected expert is an error.

    Returns:
        ``(clean, status)``: int64 ``[R, K]`` with out-of-range entries and entries whose prob
        is not finite replaced by -1 (a repeated expert is kept), and int32 ``[2]``: the error
        bits (1 out of range, 2 repeated expert in a row, 8 non-finite prob; see
        :mod:`flexdispatch.rowmap`) and ``flag`` or 0.
    """
    return _check_route(indices, num_experts, flag, probs, None)


def check_route_reported(indices: torch.Tensor, num_experts: int, probs: Optional[torch.Tensor], name: str):
    """:func:`check_route`, with its error bits raised at once (CPU) or at the next sync point
    (CUDA) under the argument name ``name``: the check of a group of one, which has no
    exchange to agree at. Returns ``(clean, status)``."""
    return _check_route(indices, num_experts, 0, probs, name)


def _check_route(indices, num_experts, flag, probs, report_as: Optional[str]):
    _check_index_route(indices, num_experts, None)
    if isinstance(flag, bool) or not isinstance(flag, int) or not 0 <= flag < 2**31:
        raise ValueError(f"flag: expected an int in [0, 2**31), got {flag!r}")
    probs = _check_probs(probs, indices)
    p = None if probs is None else probs.detach().contiguous()
    if _use_kernels(indices) and torch.compiler.is_compiling():
        return _library.check_route(indices, num_experts, flag, p, report_as)  # reports inside the op
    if _use_kernels(indices):
        clean, status = _C.check_route(indices.contiguous(), num_experts, flag, p)
    else:
        bits = index_route_error_bits(indices, num_experts, p).to(torch.int32)
        clean = torch.where((indices >= -1) & (indices < num_experts), indices.long(), -1)
        if p is not None:
            clean = torch.where(torch.isfinite(p), clean, -1)
        status = torch.stack([bits, (bits != 0).to(torch.int32) * flag])
    if report_as is not None:
        defer_routing_error(status, indices, num_experts, report_as, p)
    return clean, status


def permute(tokens: torch.Tensor, routing_map: torch.Tensor, probs: Optional[torch.Tensor] = None,
            num_out_tokens: Optional[int] = None, pad_multiple: Optional[int] = None):
    """Expert-major permutation by a multihot map.

    Args:
        tokens: ``[R, H]``.
        routing_map: bool ``[R, E]``.
        probs: optional float ``[R, E]``, moved along with the rows.
        num_out_tokens: rows of the output; None sizes it exactly (one host sync). Rows past
            those used are zero; too few rows raise ValueError (never a silent drop).
        pad_multiple: round every expert's rows up to a multiple of this; pad rows are zero
            with prob 0.

    Returns:
        ``(out [N, H], out_probs [N] or None, row_id_map, tokens_per_expert [E] int64)``:
        expert 0's rows first, ascending source row inside an expert; ``row_id_map`` is a
        :class:`~flexdispatch.rowmap.RowIdMap` for :func:`unpermute`; ``tokens_per_expert``
        (padded counts) is on the tokens' device.
    """
    _check_rows(tokens)
    _check_tensor(routing_map, "routing_map")
    if routing_map.dtype != torch.bool:
        raise TypeError(f"routing_map: expected torch.bool, got {routing_map.dtype}")
    if routing_map.dim() != 2 or routing_map.shape[0] != tokens.shape[0]:
        raise ValueError(f"routing_map: expected [{tokens.shape[0]}, num_experts], got {tuple(routing_map.shape)}")
    probs = _check_probs(probs, routing_map)
    _check_sizes(num_out_tokens, pad_multiple)
    if not _use_kernels(tokens):
        return reference.permute(tokens, routing_map, probs, num_out_tokens, pad_multiple)
    return _permute_public(tokens, routing_map.contiguous(), probs, routing_map.shape[1], num_out_tokens,
                           pad_multiple, "routing_map")


def permute_by_indices(tokens: torch.Tensor, indices: torch.Tensor, probs: Optional[torch.Tensor] = None,
                       num_experts: Optional[int] = None, num_out_tokens: Optional[int] = None,
                       pad_multiple: Optional[int] = None):
    """Expert-major permutation read straight from top-k routing (no multihot map in memory).

    Args:
        tokens: ``[R, H]``.
        indices: int32/int64 ``[R, K]``, -1 for an unused slot.
        probs: optional float ``[R, K]``.
        num_experts: ``E`` (required).
        num_out_tokens, pad_multiple: as in :func:`permute`.

    Returns:
        As :func:`permute`; ``row_id_map.map`` is ``[R, K]``.
    """
    _check_rows(tokens)
    _check_index_route(indices, num_experts, tokens.shape[0])
    probs = _check_probs(probs, indices)
    _check_sizes(num_out_tokens, pad_multiple)
    if not _use_kernels(tokens):
        return reference.permute_by_indices(tokens, indices, probs, num_experts, num_out_tokens, pad_multiple)
    return _permute_public(tokens, indices.contiguous(), probs, num_experts, num_out_tokens, pad_multiple, "indices")


def _compiled_plan(row_map, layout, host, num_experts, num_out, num_out_tokens, pad_multiple) -> RowIdMap:
    """The plan of a registered op's outputs (under torch.compile); ``host`` is the op's host
    layout, which exists only when the op sized its output (``num_out_tokens`` None)."""
    return RowIdMap(map=row_map, layout=layout, num_experts=num_experts, num_out=num_out,
                    pad_multiple=pad_multiple or 1, has_tail=num_out_tokens is not None,
                    host_layout=None if num_out_tokens is not None else host)


def _permute_public(tokens, route, probs, num_experts, num_out_tokens, pad_multiple, name):
    if torch.compiler.is_compiling():
        out, out_probs, row_map, layout, host = _library.permute(
            route, num_experts, pad_multiple or 1, -1 if num_out_tokens is None else num_out_tokens, tokens, probs,
            name)
        plan = _compiled_plan(row_map, layout, host, num_experts, out.shape[0], num_out_tokens, pad_multiple)
        return out, (None if probs is None else out_probs), plan, plan.tokens_per_expert
    if _needs_grad(tokens, probs):
        out, out_probs, plan = kernel_permutation(
            tokens, probs, _permute_kernel(tokens, route, num_experts, num_out_tokens, pad_multiple), route,
            num_experts, num_out_tokens, pad_multiple, name)
    else:
        out, out_probs, plan = _permute(tokens, probs, route, num_experts, num_out_tokens, pad_multiple, name)
    return out, out_probs, plan, plan.tokens_per_expert


def make_plan(route: torch.Tensor, num_experts: int, num_out_tokens: Optional[int] = None,
              pad_multiple: Optional[int] = None) -> RowIdMap:
    """The permutation plan of a route without moving any rows (for :func:`apply_permutation`).

    Args:
        route: bool ``[R, E]`` multihot map, or int32/int64 ``[R, K]`` indices (-1 unused).
        num_experts, num_out_tokens, pad_multiple: as in :func:`permute_by_indices`.
    """
    _check_tensor(route, "route")
    if route.dtype == torch.bool:
        if route.dim() != 2 or route.shape[1] != num_experts:
            raise ValueError(f"route: expected a bool [rows, num_experts={num_experts}] map, got {tuple(route.shape)}")
    else:
        _check_index_route(route, num_experts, None, "route")
    _check_sizes(num_out_tokens, pad_multiple)
    if not _use_kernels(route):
        return reference.make_plan(route, num_experts, num_out_tokens, pad_multiple)
    if torch.compiler.is_compiling():
        row_map, layout, host = _library.plan(route, num_experts, pad_multiple or 1,
                                              -1 if num_out_tokens is None else num_out_tokens, "route")
        num_out = num_out_tokens
        if num_out is None:  # the rows used, read from the host copy the op's one sync made
            num_out = host[layout_total_index(num_experts)].item()
        return _compiled_plan(row_map, layout, host, num_experts, num_out, num_out_tokens, pad_multiple)
    return _plan_impl(route.contiguous(), num_experts, num_out_tokens, pad_multiple, "route")


def plan_of_ranks(in_rank: torch.Tensor, num_out_tokens: int) -> RowIdMap:
    """The send list's plan (rank-major rows) of ``in_rank [T, W]`` bool, as made by
    :func:`flexdispatch.managers.alltoall.routing_by_rank`, whose rows it has counted
    (``num_out_tokens``). A multihot map that this package built has nothing to validate, so no
    error word is queued for it (one device-to-host copy less a call)."""
    if not _use_kernels(in_rank) or torch.compiler.is_compiling():
        return make_plan(in_rank, in_rank.shape[1], num_out_tokens=num_out_tokens)
    row_id_map, layout, host = _C.plan(in_rank.contiguous(), in_rank.shape[1], 1, num_out_tokens)
    return RowIdMap(map=row_id_map, layout=layout, num_experts=in_rank.shape[1], num_out=num_out_tokens,
                    pad_multiple=1, has_tail=True, host_layout=host)


def apply_permutation(tokens: torch.Tensor, row_id_map: RowIdMap) -> torch.Tensor:
    """Move ``tokens [R, H]`` to the rows of an existing plan: ``[N, H]``, differentiable."""
    _check_rows(tokens)
    if tokens.shape[0] != row_id_map.num_rows:
        raise ValueError(f"tokens: expected {row_id_map.num_rows} rows (the plan's), got {tokens.shape[0]}")
    if not _use_kernels(tokens):
        return reference.apply_permutation(tokens, row_id_map)
    if torch.compiler.is_compiling():
        p = row_id_map
        return _library.scatter_rows(tokens, p.map, p.num_out, p.layout, p.num_experts, p.pad_multiple > 1, p.has_tail)
    if _needs_grad(tokens):
        return _ApplyPermutation.apply(tokens, row_id_map)
    return _scatter(tokens, row_id_map)


def unpermute(permuted: torch.Tensor, row_id_map: RowIdMap, probs: Optional[torch.Tensor] = None,
              restore_shape: Optional[Sequence[int]] = None) -> torch.Tensor:
    """Inverse of :func:`permute`: every input row sums its copies.

    ``out[r] = sum over slots s, in slot order, of probs[r, s] * permuted[map[r, s]]`` (weight 1
    without probs), accumulated in float32 (float64 for float64 operands), with no atomics:
    the same bits on every run. Pad rows are ignored.

    Args:
        permuted: ``[N, H]`` with the plan's ``N``.
        row_id_map: the plan returned by :func:`permute` / :func:`permute_by_indices`.
        probs: optional float ``[R, S]`` merging weights (shape of ``row_id_map.map``).
        restore_shape: optional shape to view the ``[R, H]`` result as.

    Returns:
        ``[R, H]`` (or ``restore_shape``) in ``permuted``'s dtype.
    """
    _check_rows(permuted, "permuted")
    if not isinstance(row_id_map, RowIdMap):
        raise TypeError(f"row_id_map: expected the RowIdMap returned by permute, got {type(row_id_map).__name__}")
    if permuted.shape[0] != row_id_map.num_out:
        raise ValueError(f"permuted: expected {row_id_map.num_out} rows (the permutation's output), "
                         f"got {permuted.shape[0]}")
    probs = _check_probs(probs, row_id_map.map) if probs is not None else None
    if not permuted.is_floating_point():
        raise TypeError(f"permuted: expected a floating-point tensor, got {permuted.dtype}")
    if not _use_kernels(permuted):
        return reference.unpermute(permuted, row_id_map, probs, restore_shape)
    if torch.compiler.is_compiling():
        p = row_id_map
        out = _library.unpermute(permuted, probs, p.map, p.layout, p.num_experts, p.pad_multiple > 1, p.has_tail)
    elif _needs_grad(permuted, probs):
        out = _Unpermute.apply(permuted, probs, row_id_map)
    else:
        out = _C.gather_rows(permuted.contiguous(), row_id_map.map,
                             probs.contiguous() if probs is not None else None)
    return out.view(tuple(restore_shape)) if restore_shape is not None else out


# ---- FP8 rows ------------------------------------------------------------------------------

FP8_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_fp8_rows(x, name: str) -> None:
    _check_rows(x, name)
    if x.shape[1] % reference.FP8_GROUP:
        raise ValueError(f"{name}: FP8 needs a hidden size that is a multiple of {reference.FP8_GROUP}, "
                         f"got {x.shape[1]}")


def _check_fp8_input(q, scales, dtype) -> None:
    """FP8 rows to dequantize: ``q [R, H]`` e4m3 (or uint8 bits), ``scales [R, H / 128]``
    float32, and a target dtype of FP8_DTYPES."""
    _check_fp8_rows(q, "q")
    if q.dtype not in (torch.float8_e4m3fn, torch.uint8):
        raise TypeError(f"q: expected torch.float8_e4m3fn (or uint8 bits), got {q.dtype}")
    _check_tensor(scales, "scales")
    if scales.dtype != torch.float32 or tuple(scales.shape) != (q.shape[0], q.shape[1] // reference.FP8_GROUP):
        raise ValueError(f"scales: expected float32 [{q.shape[0]}, {q.shape[1] // reference.FP8_GROUP}], "
                         f"got {scales.dtype} {tuple(scales.shape)}")
    if dtype not in FP8_DTYPES:
        raise TypeError(f"dtype: FP8 rows dequantize to float32, float16 or bfloat16, got {dtype}")


def quantize_fp8(x: torch.Tensor):
    """Quantize rows to float8 e4m3fn with one float32 scale per 128 values (DeepEP's and
    DeepSeek-V3's format), in one kernel pass.

    Args:
        x: ``[R, H]`` float32, float16 or bfloat16, ``H`` a multiple of 128.

    Returns:
        ``(q [R, H] torch.float8_e4m3fn, scales [R, H / 128] float32)``: per group of 128
        values ``scale = max(amax, 1e-4) / 448`` and ``q = x / scale`` rounded to nearest even
        (so the group's largest magnitude becomes 448 and an all-zero group stays zero).
        Values below the e4m3 subnormal step (2^-9 of the scale) round to zero. A group holding
        NaN gets a NaN scale and NaN values; one holding inf gets an inf scale (its finite
        values become 0, the inf NaN). Not differentiable (see :func:`fp8_round_trip`).
    """
    _check_fp8_rows(x, "x")
    if x.dtype not in FP8_DTYPES:
        raise TypeError(f"x: FP8 quantization takes float32, float16 or bfloat16, got {x.dtype}")
    x = x.detach().contiguous()
    if not _use_kernels(x) or torch.compiler.is_compiling():
        return reference.quantize_fp8(x)
    q, scales = _C.quantize_fp8(x)
    return q.view(torch.float8_e4m3fn), scales


def dequantize_fp8(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Inverse of :func:`quantize_fp8`: ``q [R, H]`` float8_e4m3fn (or its uint8 bits) and
    ``scales [R, H / 128]`` float32 -> ``[R, H]`` of ``dtype`` (float32, float16 or bfloat16),
    ``q * scale`` computed in float32 and rounded to nearest even."""
    _check_fp8_input(q, scales, dtype)
    if not _use_kernels(q) or torch.compiler.is_compiling():
        return reference.dequantize_fp8(q.view(torch.float8_e4m3fn), scales, dtype)
    return _C.dequantize_fp8(q.contiguous().view(torch.uint8), scales.contiguous(), torch.empty(0, dtype=dtype))


class _KernelPermutation(torch.autograd.Function):
    """A permutation made by one kernel call, ``kernel(probs) -> (out, out_probs, row_id_map,
    layout, host)`` (the permutation, the dequantizing one, the one that reads rows through
    addresses);
    differentiable in ``rows`` (a stand-in ``[R, H]`` of the rows it reads, whose values are not
    read: its gradient is the permutation's gather, as for :func:`permute_by_indices`) and in
    ``probs``."""

    @staticmethod
    def forward(ctx, rows, probs, kernel, route, num_experts, num_out_tokens, pad_multiple, name):
        out, out_probs, plan = _kernel_plan(kernel, probs, route, num_experts, num_out_tokens, pad_multiple, name)
        ctx.plan = plan
        ctx.set_materialize_grads(False)
        return out, out_probs, plan

    @staticmethod
    def backward(ctx, grad_out, grad_out_probs, _grad_plan):
        return (*_permutation_grads(ctx, grad_out, grad_out_probs), None, None, None, None, None, None)


def kernel_permutation(rows, probs, kernel, route, num_experts, num_out_tokens, pad_multiple, name="indices"):
    """``(out, out_probs, plan)`` of :class:`_KernelPermutation`."""
    return _KernelPermutation.apply(rows, probs, kernel, route, num_experts, num_out_tokens, pad_multiple, name)


class _StandIn(torch.autograd.Function):
    """``values``, with the gradient going to ``rows`` (whose values are not read)."""

    @staticmethod
    def forward(ctx, rows, values):
        return values.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def permute_fp8_by_indices(q: torch.Tensor, scales: torch.Tensor, indices: torch.Tensor,
                           probs: Optional[torch.Tensor] = None, num_experts: Optional[int] = None,
                           num_out_tokens: Optional[int] = None, pad_multiple: Optional[int] = None,
                           dtype: torch.dtype = torch.bfloat16, rows: Optional[torch.Tensor] = None):
    """The expert-major permutation of FP8 rows, dequantized in the same pass: each FP8 row is
    read once and written to its experts' rows in ``dtype``; no dequantized copy of the input
    is made. Equal bit for bit to ``permute_by_indices(dequantize_fp8(q, scales, dtype), ...)``.

    Args:
        q: ``[R, H]`` float8_e4m3fn (or its uint8 bits); rows may be a strided view (a slice
            of a packed buffer).
        scales: ``[R, H / 128]`` float32.
        indices, probs, num_experts, num_out_tokens, pad_multiple: as in
            :func:`permute_by_indices`.
        dtype: float32, float16 or bfloat16.
        rows: optional ``[R, H]`` tensor of ``dtype`` that stands for the dequantized rows in
            autograd (its values are not read): the gradient of the output flows to it as it
            would to the tokens of :func:`permute_by_indices` (a transfer's backward, say).

    Returns:
        As :func:`permute_by_indices`: ``(out [N, H] dtype, permuted_probs, plan,
        tokens_per_expert)``. ``q`` and ``scales`` get no gradient.
    """
    _check_fp8_input(q, scales, dtype)
    if rows is not None and (tuple(rows.shape) != tuple(q.shape) or rows.dtype != dtype):
        raise ValueError(f"rows: expected {dtype} {tuple(q.shape)}, got {rows.dtype} {tuple(rows.shape)}")
    _check_index_route(indices, num_experts, q.shape[0])
    probs = _check_probs(probs, indices)
    _check_sizes(num_out_tokens, pad_multiple)
    if not _use_kernels(q) or torch.compiler.is_compiling():
        dense = dequantize_fp8(q, scales, dtype)
        if rows is not None:  # the dequantized values, with the stand-in's gradient path
            dense = _StandIn.apply(rows, dense)
        return permute_by_indices(dense, indices, probs, num_experts, num_out_tokens, pad_multiple)
    route = indices.contiguous()
    like = torch.empty(0, dtype=dtype)
    out, out_probs, plan = kernel_permutation(
        rows, probs, lambda p: _C.permute_fp8(route, num_experts, pad_multiple or 1,
                                              -1 if num_out_tokens is None else num_out_tokens,
                                              q.view(torch.uint8), scales, p, like),
        route, num_experts, num_out_tokens, pad_multiple)
    return out, out_probs, plan, plan.tokens_per_expert


class _Fp8RoundTrip(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return dequantize_fp8(*quantize_fp8(x), dtype=x.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad


def fp8_round_trip(x: torch.Tensor) -> torch.Tensor:
    """``dequantize_fp8(quantize_fp8(x))`` in ``x``'s dtype, with the identity as its gradient
    (straight-through): what a row looks like after an FP8 dispatch."""
    if _use_kernels(x) and torch.compiler.is_compiling():
        return _library.fp8_round_trip(x)  # an op with its own backward (Dynamo keeps it whole)
    return _Fp8RoundTrip.apply(x)


from . import _library  # noqa: E402  (registers the custom ops, which call back into this module)


# ---- the received rows' routing (the all-to-all and NVLink managers) --------------------------


class _ReceivedRouting(torch.autograd.Function):
    @staticmethod
    def forward(ctx, meta, id_column, topk, first_expert, local, prob_dtype, has_source):
        indices, probs = _C.received_routing(meta.detach().contiguous(), id_column, topk, first_expert, local,
                                             has_source, prob_dtype)
        ctx.mark_non_differentiable(indices)
        ctx.save_for_backward(indices)
        ctx.shape, ctx.dtype, ctx.id_column, ctx.topk = meta.shape, meta.dtype, id_column, topk
        return indices, probs

    @staticmethod
    def backward(ctx, _grad_indices, grad_probs):
        (indices,) = ctx.saved_tensors
        grad = grad_probs.new_zeros(ctx.shape, dtype=ctx.dtype)
        start = ctx.id_column + ctx.topk
        grad[:, start:start + ctx.topk] = torch.where(indices >= 0, grad_probs, 0)
        return grad, None, None, None, None, None, None


def received_routing(meta: torch.Tensor, id_column: int, topk: int, first_expert: int, local: int,
                     prob_dtype: torch.dtype, has_source: Optional[torch.Tensor] = None):
    """The received rows' routing from their routing rows, in one kernel: ``meta [R, C]``
    float64 holds each row's ``topk`` global experts from column ``id_column`` (-1: unused) and
    their probs in the next ``topk`` columns. Returns ``(indices [R, K] int64, probs [R, K]
    prob_dtype)``: the local expert ``global - first_expert`` where it lies in ``[0, local)``,
    else -1; the prob, 0 where the index is -1 (differentiable with respect to ``meta``'s prob
    columns). Rows whose ``has_source [R]`` (bool, optional) is False get -1 everywhere."""
    if _use_kernels(meta) and not torch.compiler.is_compiling():
        return _ReceivedRouting.apply(meta, id_column, topk, first_expert, local, prob_dtype, has_source)
    return reference.received_routing(meta, id_column, topk, first_expert, local, prob_dtype, has_source)


# ---- the agreement of a call (flexdispatch/managers/agreement.py) ----------------------------


def make_header(like: torch.Tensor, values: Sequence[int], status: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One rank's agreement header: int64 ``[WIDTH]`` on ``like``'s device holding ``values``,
    with ``status[0]`` (:func:`check_route`'s int32 ``[2]``, optional) OR-ed into the error
    field. One small kernel on CUDA: no host-to-device copy, no sync."""
    if _use_kernels(like):
        return _C.make_header(like, list(values), status)
    return reference.make_header(like.device, values, status)


def mask_unless_agreed(headers: torch.Tensor, indices: torch.Tensor, index_dtype: torch.dtype = torch.int64):
    """``indices`` (int64) as ``index_dtype`` (int32 or int64), or -1 everywhere unless every
    rank's header in ``headers [W, WIDTH]`` (int64, gathered on ``indices``' device) has no
    error bits and equals rank 0's from the phase field on: the device side of
    :class:`~flexdispatch.managers.agreement.Agreement`, so that a transfer started before
    the host has read the headers moves nothing when the call must fail. One kernel, no sync."""
    if _use_kernels(indices):
        return _C.mask_unless_agreed(headers.contiguous(), indices.contiguous(), index_dtype)
    return reference.mask_unless_agreed(headers, indices, index_dtype)
