"""The permutation ops in plain PyTorch: the test oracle, and the fallback when the kernels
are not built (``FLEXDISPATCH_JIT=0`` or a failed build).

Same signatures and results as :mod:`flexdispatch.ops`; gradients come from PyTorch's
autograd. These functions may synchronise with the GPU (validation, output sizes); the
kernels do not, beyond the one sync that sizes an output when ``num_out_tokens`` is None.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import _kernel_header
from .rowmap import RowIdMap, check_index_route


def _experts_of(route: torch.Tensor, num_experts: int) -> torch.Tensor:
    """int64 ``[R, S]`` expert of every slot (-1 unused) of an index or multihot route."""
    if route.dtype == torch.bool:
        ids = torch.arange(num_experts, device=route.device)
        return torch.where(route, ids, -1)
    return route.long()


def _acc_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def route_topk(probs: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values [R, K], indices [R, K] int64)``: the ``topk`` largest of ``probs [R, E]`` per row
    in descending order, NaN above every number (as ``torch.topk``), and between equal values
    the lower expert first (a stable sort), which ``torch.topk`` leaves unspecified."""
    # (NaN placed first by a second stable sort rather than by the sort of the values: CUDA's
    # sort does not place a NaN read from bfloat16 as the CPU's does)
    nan = probs.isnan()
    by_value = torch.sort(probs.masked_fill(nan, float("inf")), dim=-1, descending=True, stable=True).indices
    nan_first = torch.sort(nan.gather(1, by_value).byte(), dim=-1, descending=True, stable=True).indices
    indices = by_value.gather(1, nan_first[:, :topk]).contiguous()
    return probs.gather(1, indices), indices


def indices_to_multihot(indices: torch.Tensor, probs: torch.Tensor, num_experts: int):
    """``[R, K]`` indices and probs -> bool ``[R, E]`` map and ``[R, E]`` probs (-1 skipped)."""
    check_index_route(indices, num_experts)
    rows = indices.shape[0]
    column = torch.where(indices >= 0, indices.long(), num_experts)  # unused slots -> spare column
    routing_map = torch.zeros(rows, num_experts + 1, dtype=torch.bool, device=indices.device)
    routing_map = routing_map.scatter(1, column, True)[:, :num_experts]
    multihot = probs.new_zeros(rows, num_experts + 1).scatter(1, column, probs)[:, :num_experts]
    return routing_map, multihot


def make_plan(route: torch.Tensor, num_experts: int, num_out_tokens: Optional[int] = None,
              pad_multiple: Optional[int] = None) -> RowIdMap:
    """The stable expert-major plan of an index ``[R, K]`` or multihot ``[R, E]`` route."""
    if route.dtype != torch.bool:
        check_index_route(route, num_experts)
    pad = pad_multiple or 1
    experts = _experts_of(route, num_experts)
    rows, slots = experts.shape
    device = route.device
    flat = torch.where(experts >= 0, experts, num_experts).flatten()  # spare expert E = unused
    counts = torch.bincount(flat, minlength=num_experts + 1)[:num_experts]
    padded = (counts + pad - 1) // pad * pad
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=device)
    offsets[1:] = torch.cumsum(padded, 0)
    # Rows of one route name distinct experts, so (expert, row) orders the slots stably.
    row_of = torch.arange(rows, device=device).repeat_interleave(slots)
    order = torch.argsort(flat * max(rows, 1) + row_of, stable=True)
    first = torch.cumsum(counts, 0) - counts
    sorted_experts = flat[order]
    used = sorted_experts < num_experts
    position = torch.arange(flat.numel(), device=device)
    safe = sorted_experts.clamp(max=num_experts - 1)
    dest_sorted = torch.where(used, offsets[safe] + position - first[safe], -1)
    dest = torch.empty_like(dest_sorted)
    dest[order] = dest_sorted
    total = int(offsets[-1])
    num_out = total if num_out_tokens is None else int(num_out_tokens)
    if total > num_out:
        raise ValueError(f"num_out_tokens={num_out} is smaller than the {total} rows the routing needs; "
                         f"nothing was dropped silently: pass None to size the output exactly")
    layout = torch.cat([counts, padded, offsets, torch.zeros(1, dtype=torch.int64, device=device)])
    return RowIdMap(map=dest.view(rows, slots).to(torch.int32), layout=layout, num_experts=num_experts,
                    num_out=num_out, pad_multiple=pad, has_tail=num_out_tokens is not None,
                    host_layout=layout.cpu())


def _move(tokens: torch.Tensor, row_id_map: RowIdMap, probs: Optional[torch.Tensor] = None):
    """Move ``tokens [R, H]`` (and ``probs [R, S]``) to their planned rows: ``([N, H], [N] or None)``;
    rows no slot fills are zero."""
    dest = row_id_map.map.long()
    valid = dest >= 0
    src_rows = torch.arange(dest.shape[0], device=dest.device)[:, None].expand_as(dest)
    out = tokens.new_zeros((row_id_map.num_out,) + tuple(tokens.shape[1:]))
    out = out.index_put((dest[valid],), tokens[src_rows[valid]])
    out_probs = None
    if probs is not None:
        out_probs = probs.new_zeros(row_id_map.num_out).index_put((dest[valid],), probs[valid])
    return out, out_probs


def permute(tokens: torch.Tensor, routing_map: torch.Tensor, probs: Optional[torch.Tensor] = None,
            num_out_tokens: Optional[int] = None, pad_multiple: Optional[int] = None):
    """Expert-major permutation by a multihot ``[R, E]`` map; see :func:`flexdispatch.ops.permute`."""
    plan = make_plan(routing_map, routing_map.shape[1], num_out_tokens, pad_multiple)
    out, out_probs = _move(tokens, plan, probs)
    return out, out_probs, plan, plan.tokens_per_expert


def apply_permutation(tokens: torch.Tensor, row_id_map: RowIdMap) -> torch.Tensor:
    """Move ``tokens [R, H]`` to the rows of an existing plan: ``[N, H]``."""
    return _move(tokens, row_id_map)[0]


def permute_by_indices(tokens: torch.Tensor, indices: torch.Tensor, probs: Optional[torch.Tensor] = None,
                       num_experts: Optional[int] = None, num_out_tokens: Optional[int] = None,
                       pad_multiple: Optional[int] = None):
    """Expert-major permutation by top-k ``indices [R, K]``; see :func:`flexdispatch.ops.permute_by_indices`."""
    if num_experts is None:
        raise ValueError("num_experts: required for an index route")
    plan = make_plan(indices, num_experts, num_out_tokens, pad_multiple)
    out, out_probs = _move(tokens, plan, probs)
    return out, out_probs, plan, plan.tokens_per_expert


def unpermute(permuted: torch.Tensor, row_id_map: RowIdMap, probs: Optional[torch.Tensor] = None,
              restore_shape: Optional[Sequence[int]] = None) -> torch.Tensor:
    """``out[r] = sum over slots s (in order) of probs[r, s] * permuted[map[r, s]]``, float32
    accumulation (float64 for float64 operands)."""
    acc = _acc_dtype(permuted, probs)
    dest = row_id_map.map.long()
    spare = permuted.shape[0]  # unused slots read an appended zero row
    padded_src = torch.cat([permuted, permuted.new_zeros((1,) + tuple(permuted.shape[1:]))]).to(acc)
    out = torch.zeros((dest.shape[0],) + tuple(permuted.shape[1:]), dtype=acc, device=permuted.device)
    for s in range(dest.shape[1]):
        term = padded_src[torch.where(dest[:, s] >= 0, dest[:, s], spare)]
        if probs is not None:
            term = term * probs[:, s, None].to(acc)
        out = out + term
    out = out.to(permuted.dtype)
    return out.view(tuple(restore_shape)) if restore_shape is not None else out


# ---- FP8 rows --------------------------------------------------------------------------------

FP8_GROUP = 128  # values per scale (cuda_src/flexdispatch.h: kFp8Group)
FP8_MAX = 448.0  # the largest finite float8 e4m3fn value
FP8_MIN_AMAX = 1e-4  # a group's amax is clamped up to this, so an all-zero group stays zero


def quantize_fp8(x: torch.Tensor):
    """``x [R, H]`` (float32/16, bfloat16; H a multiple of 128) -> ``(q [R, H]
    float8_e4m3fn, scales [R, H / 128] float32)`` with ``scale = max(amax, 1e-4) / 448`` per
    group of 128 values and ``q = x / scale`` rounded to nearest even."""
    rows, hidden = x.shape
    g = x.float().reshape(rows, hidden // FP8_GROUP, FP8_GROUP)
    amax = g.abs().amax(-1).clamp(min=FP8_MIN_AMAX)
    # A tensor divisor: torch on CUDA turns division by a Python number into a multiplication
    # by its reciprocal, which differs in the last bit from the kernels' IEEE division.
    scales = amax / torch.full_like(amax, FP8_MAX)
    q = (g / scales[..., None]).to(torch.float8_e4m3fn)
    return q.reshape(rows, hidden), scales


def dequantize_fp8(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``q [R, H]`` float8_e4m3fn and ``scales [R, H / 128]`` -> ``[R, H]`` of ``dtype``:
    ``q * scale`` in float32, rounded to ``dtype``."""
    rows, hidden = q.shape
    g = q.float().reshape(rows, hidden // FP8_GROUP, FP8_GROUP) * scales[..., None]
    return g.reshape(rows, hidden).to(dtype)


def fp8_round_trip(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded through FP8 (quantize, then dequantize to ``x``'s dtype): what the experts
    receive under ``moe_fp8_dispatch``. Plain values, no straight-through gradient."""
    return dequantize_fp8(*quantize_fp8(x), dtype=x.dtype)


# ---- the agreement of a call (flexdispatch/managers/agreement.py) ----------------------------

_HEADER = _kernel_header.enum("HeaderField")  # the header's fields, as the kernels define them


def make_header(device, values, status: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One rank's header ``[WIDTH]`` int64 on ``device``: ``values``, with ``status[0]`` (the
    error bits of :func:`flexdispatch.ops.check_route`) OR-ed into the error field."""
    header = torch.tensor(list(values), dtype=torch.int64, device=device)
    if status is not None:
        header[_HEADER["HeaderError"]] |= status[0].long()
    return header


def mask_unless_agreed(headers: torch.Tensor, indices: torch.Tensor, index_dtype=torch.int64) -> torch.Tensor:
    """``indices`` as ``index_dtype``, or all -1 unless every row of ``headers [W, WIDTH]`` has
    no error bits and equals row 0 from the phase field on."""
    phase = _HEADER["HeaderPhase"]
    breaks = (headers[:, _HEADER["HeaderError"]] != 0).any() | (headers[:, phase:] != headers[:1, phase:]).any()
    return torch.where(breaks, -1, indices).to(index_dtype)


def received_routing(meta: torch.Tensor, id_column: int, topk: int, first_expert: int, local: int,
                     prob_dtype: torch.dtype, has_source: Optional[torch.Tensor] = None):
    """Received routing rows ``meta [R, C]`` float64 (global experts in ``topk`` columns from
    ``id_column``, their probs in the next ``topk``) as ``(indices [R, K] int64, probs [R, K])``:
    the local expert (global - first_expert, when in [0, local)) or -1, and the prob in
    ``prob_dtype``, 0 where the index is -1; rows where ``has_source [R]`` is False get -1."""
    experts = meta[:, id_column:id_column + topk].long()
    mine = experts - first_expert
    kept = (experts >= 0) & (mine >= 0) & (mine < local)
    if has_source is not None:
        kept &= has_source[:, None]
    probs = meta[:, id_column + topk:id_column + 2 * topk].to(prob_dtype)
    return torch.where(kept, mine, -1), torch.where(kept, probs, torch.zeros((), dtype=prob_dtype, device=meta.device))


def permute_fp8_by_indices(q: torch.Tensor, scales: torch.Tensor, indices: torch.Tensor,
                           probs: Optional[torch.Tensor] = None, num_experts: Optional[int] = None,
                           num_out_tokens: Optional[int] = None, pad_multiple: Optional[int] = None,
                           dtype: torch.dtype = torch.bfloat16):
    """The expert-major permutation of FP8 rows ``q [R, H]`` with ``scales [R, H / 128]``, in
    ``dtype``: :func:`permute_by_indices` of :func:`dequantize_fp8`."""
    return permute_by_indices(dequantize_fp8(q.view(torch.float8_e4m3fn), scales, dtype), indices, probs,
                              num_experts, num_out_tokens, pad_multiple)
