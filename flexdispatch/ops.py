"""Token permutation ops on the fused kernels: the public op API.

Every op has the same signature and result as its plain-PyTorch twin in
:mod:`flexdispatch.reference`, which serves whenever the kernels are not built for the
tensors' device. Shapes: ``R`` input rows, ``K`` top-k, ``E`` experts, ``N`` output rows,
``H`` hidden. Tokens may be float32, float16, bfloat16 or float64 (permutation moves bytes,
so any dtype works there); probs float32 or float64 (others are converted to float32).

The kernels are called through their one binding each, the torch.library ops of
:mod:`flexdispatch._library` (eager and compiled code alike); this module checks arguments,
picks the kernels or the reference, and wraps the plans.

Host syncs: :func:`permute` and :func:`permute_by_indices` make exactly one, to size their
output, when ``num_out_tokens`` is None; none otherwise. On CUDA, invalid routing found by a
kernel without a sync is raised as ValueError by a later op once its error word has landed in
pinned memory, or by :func:`check_pending_errors` (which waits for that small copy only).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import _kernel_header, _library, reference
from .spec import MAX_EXPERTS, check_floating_tensor, input_error
from ._library import check_pending_errors, cuda_kernels_loaded, defer_routing_error, kernels_loaded, load_kernels
from .rowmap import RowIdMap, host_readable_layout, index_route_error_bits, layout_total_index, plan_of

__all__ = ["load_kernels", "kernels_loaded", "cuda_kernels_loaded", "check_pending_errors", "defer_routing_error",
           "indices_to_multihot", "check_route", "check_route_reported", "permute", "permute_by_indices", "make_plan",
           "plan_of_ranks", "apply_permutation", "unpermute", "FP8_DTYPES", "quantize_fp8", "dequantize_fp8",
           "permute_fp8_by_indices", "fp8_round_trip", "received_routing", "make_header", "mask_unless_agreed"]


# ---- argument checks (host side, no sync) ------------------------------------------------


def _check_tensor(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise input_error(TypeError, name, f"expected a torch.Tensor, got {type(t).__name__}")


def _check_rows(tokens: torch.Tensor, name: str = "tokens") -> None:
    if type(tokens) is not torch.Tensor:  # (plain tensors pass at once: this runs at every op)
        _check_tensor(tokens, name)
    if tokens.ndim != 2:
        raise input_error(ValueError, name, f"expected a 2-D tensor [rows, hidden], got shape {tuple(tokens.shape)}")


_KERNEL_PROBS = (torch.float32, torch.float64)


def _check_probs(probs, like: torch.Tensor, name: str = "probs") -> Optional[torch.Tensor]:
    if probs is None:
        return None
    if type(probs) is not torch.Tensor:
        _check_tensor(probs, name)
    if probs.shape != like.shape:
        raise input_error(ValueError, name, f"expected shape {tuple(like.shape)}, got {tuple(probs.shape)}")
    if probs.dtype not in _KERNEL_PROBS:  # (the kernels' dtypes pass at once: this runs at every op)
        check_floating_tensor(name, probs)
    if probs.device != like.device:
        raise input_error(ValueError, name, f"expected device {like.device}, got {probs.device}")
    return kernel_probs(probs)


def kernel_probs(probs: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """Probs as the kernels take them: float32 or float64 kept, other float dtypes as float32."""
    return probs if probs is None or probs.dtype in _KERNEL_PROBS else probs.float()


def _check_index_route(indices, num_experts, rows: Optional[int], name: str = "indices") -> None:
    if type(indices) is not torch.Tensor:
        _check_tensor(indices, name)
    if indices.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name}: expected int32 or int64, got {indices.dtype}")
    if indices.ndim != 2:
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


def checked_index_args(rows: int, indices, probs, num_experts, num_out_tokens, pad_multiple):
    """The argument checks of :func:`permute_by_indices` (for ``rows`` rows), for the ops that
    permute as it does (:mod:`flexdispatch.peer_ops`); returns the probs as the kernels take them."""
    _check_index_route(indices, num_experts, rows)
    probs = _check_probs(probs, indices)
    _check_sizes(num_out_tokens, pad_multiple)
    return probs


def _size(num_out_tokens: Optional[int]) -> int:
    return -1 if num_out_tokens is None else num_out_tokens


def run_permutation(op, rows, probs, route, num_experts: int, num_out_tokens: Optional[int],
                    pad_multiple: Optional[int], name: str, *extra):
    """Run a permutation op of :mod:`flexdispatch._library` (arguments ``rows, probs, route,
    num_experts, pad_multiple, num_out, name, *extra``): ``(out [N, H], permuted_probs [N] or
    None, plan)``. The public ops add the plan's device counts (:func:`with_counts`); a manager
    reads them only when it keeps them (sync-free), so its calls make no view of them."""
    out, out_probs, plan = _planned(op(rows, probs, route, num_experts, pad_multiple or 1, _size(num_out_tokens),
                                       name, *extra), num_experts, num_out_tokens, pad_multiple)
    return out, (None if probs is None else out_probs), plan


def _planned(outputs, num_experts: int, num_out_tokens: Optional[int], pad_multiple: Optional[int]):
    """``(out, permuted_probs, plan)`` of a permutation op's five outputs (``out, out_probs,
    map, layout, host layout``)."""
    out, out_probs, row_map, layout, host = outputs
    return out, out_probs, plan_of(row_map, layout, host, num_experts, out.shape[0], num_out_tokens, pad_multiple)


def with_counts(permuted: tuple) -> tuple:
    """A permutation's ``(out, permuted_probs, plan)`` with the plan's ``tokens_per_expert [E]``
    (padded counts, on the tokens' device) appended: what the public permutation ops return."""
    return (*permuted, permuted[2].tokens_per_expert)


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
    if not _library.serves(indices):
        return reference.indices_to_multihot(indices, probs, num_experts)
    return _library.indices_to_multihot(indices, probs, num_experts)


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
    return check_route_trusted(indices, num_experts, flag, _check_probs(probs, indices), report_as)


def check_route_trusted(indices: torch.Tensor, num_experts: int, flag: int, probs: Optional[torch.Tensor],
                        report_as: Optional[str]):
    """:func:`check_route` (``report_as`` a name: :func:`check_route_reported`) of arguments its
    caller has already checked: int32/int64 ``indices [R, K]``, float ``probs [R, K]`` or None
    on their device, ``num_experts`` and ``flag`` in range. A manager's routing step, whose
    arguments its own checks have passed, calls it without checking them again."""
    p = None if probs is None else kernel_probs(probs.detach() if probs.requires_grad else probs)
    if _library.serves(indices):
        return _library.check_route(indices, num_experts, flag, p, report_as)  # reports inside the op
    bits = index_route_error_bits(indices, num_experts, p).to(torch.int32)
    clean = torch.where((indices >= -1) & (indices < num_experts), indices.long(), -1)
    if p is not None:
        clean = torch.where(torch.isfinite(p), clean, -1)
    status = torch.stack([bits, (bits != 0).to(torch.int32) * flag])
    if report_as is not None:
        defer_routing_error(status, indices, num_experts, report_as, p)
    return clean, status


# The routings route_topk's kernels take (cuda_src/flexdispatch.h); larger ones sort.
TOPK_MAX = _kernel_header.constant("RouteTopkMax")
TOPK_MAX_EXPERTS = _kernel_header.constant("RouteTopkMaxExperts")


def route_topk_trusted(probs: torch.Tensor, topk: int, flag: int, report_as: Optional[str]):
    """The router's top-k of dense ``probs [T, E]`` (a float dtype, ``1 <= topk <= E``, checked by
    the caller), and its check (:func:`check_route`) in the same pass: ``(token_probs [T, K] in
    the probs' dtype, indices [T, K] int64 as selected, clean [T, K] int64 (-1 where the prob is
    not finite), status [2] int32)``, differentiable in ``token_probs``. The K largest per row in
    descending order, NaN above every number, ties to the lower expert
    (:func:`flexdispatch.reference.route_topk`), so that every device and run selects the same.
    One kernel where the kernels serve and ``E <= TOPK_MAX_EXPERTS``, ``K <= TOPK_MAX``; else a
    stable sort and the check. ``report_as`` as in :func:`check_route_trusted`."""
    if _library.serves(probs) and topk <= TOPK_MAX and probs.shape[1] <= TOPK_MAX_EXPERTS:
        return _library.route_topk(probs, topk, flag, report_as)
    values, indices = reference.route_topk(probs, topk)
    return (values, indices, *check_route_trusted(indices, probs.shape[1], flag, values, report_as))


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
    if not _library.serves(tokens):
        return reference.permute(tokens, routing_map, probs, num_out_tokens, pad_multiple)
    return with_counts(run_permutation(_library.permute, tokens, probs, routing_map, routing_map.shape[1],
                                       num_out_tokens, pad_multiple, "routing_map"))


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
    probs = checked_index_args(tokens.shape[0], indices, probs, num_experts, num_out_tokens, pad_multiple)
    return with_counts(permute_by_indices_trusted(tokens, indices, probs, num_experts, num_out_tokens, pad_multiple))


def permute_by_indices_trusted(tokens: torch.Tensor, indices: torch.Tensor, probs: Optional[torch.Tensor],
                               num_experts: int, num_out_tokens: Optional[int], pad_multiple: Optional[int],
                               copy_layout: bool = False, report_as: Optional[str] = "indices"):
    """:func:`permute_by_indices` of arguments its caller has already checked (``tokens [R, H]``,
    ``indices [R, K]`` int32/int64 of R rows, ``probs [R, K]`` float32/float64 or None, sizes
    in range), without the counts: ``(out, permuted_probs, plan)``, a manager's permutation of
    the routing its routing step checked. ``copy_layout`` (``num_out_tokens`` given, CUDA): the
    plan's ``host_layout`` is a copy of its layout made before the rows move, the call waiting
    for that copy alone, and the routing errors are raised from it (no error word deferred).
    ``report_as``: the argument the routing errors name; None for a route checked already and
    ``num_out_tokens`` given without ``copy_layout``: the permutation then neither stores nor
    reads an error word."""
    if not _library.serves(tokens):
        return reference.permute_by_indices(tokens, indices, probs, num_experts, num_out_tokens, pad_multiple)[:3]
    return run_permutation(_library.permute, tokens, probs, indices, num_experts, num_out_tokens, pad_multiple,
                           report_as, copy_layout)


def route_and_permute_trusted(probs: torch.Tensor, tokens: torch.Tensor, topk: int, report_as: Optional[str],
                              num_out_tokens: Optional[int], pad_multiple: Optional[int],
                              permutation_reports_as: Optional[str], copy_layout: bool = False):
    """:func:`route_topk_trusted` of the router's ``probs [T, E]`` (float32 or float64), then
    :func:`permute_by_indices_trusted` of ``tokens [T, H]`` by its clean route and its token
    probs over ``E`` experts, as one op with one autograd node where the kernels serve: one
    rank's routing and permutation, with nothing between them (arguments checked by the
    caller; ``permutation_reports_as`` is the permutation's ``report_as``). Returns
    ``(token_probs, indices, clean, status, out, permuted_probs, plan)``, each as the two ops
    return it."""
    num_experts = probs.shape[1]
    if _library.serves(probs) and topk <= TOPK_MAX and num_experts <= TOPK_MAX_EXPERTS:
        outputs = _library.route_and_permute(probs, tokens, topk, report_as, pad_multiple or 1, _size(num_out_tokens),
                                             permutation_reports_as, copy_layout)
        return (*outputs[:4], *_planned(outputs[4:], num_experts, num_out_tokens, pad_multiple))
    routed = route_topk_trusted(probs, topk, 0, report_as)
    return (*routed, *permute_by_indices_trusted(tokens, routed[2], routed[0], num_experts, num_out_tokens,
                                                 pad_multiple, copy_layout, permutation_reports_as))


def check_and_permute_trusted(tokens: torch.Tensor, indices: torch.Tensor, probs: torch.Tensor, num_experts: int,
                              num_out_tokens: Optional[int], pad_multiple: Optional[int], check_as: Optional[str],
                              permutation_reports_as: Optional[str], copy_layout: bool = False):
    """:func:`check_route_trusted` of the given ``indices [T, K]`` (int64) and ``probs [T, K]``
    (float32 or float64), then :func:`permute_by_indices_trusted` of ``tokens [T, H]`` by the
    clean route, moving ``probs``, as one op where the kernels serve: one rank's given routing
    and permutation, with nothing between them (arguments checked by the caller; ``check_as``
    is the check's ``report_as``, ``permutation_reports_as`` the permutation's). Returns
    ``(clean, status, out, permuted_probs, plan)``, each as the two ops return it."""
    if _library.serves(tokens):
        outputs = _library.check_and_permute(tokens, probs, indices, num_experts, pad_multiple or 1,
                                             _size(num_out_tokens), permutation_reports_as, copy_layout, check_as)
        return (*outputs[5:], *_planned(outputs[:5], num_experts, num_out_tokens, pad_multiple))
    clean, status = check_route_trusted(indices, num_experts, 0, probs, check_as)
    return (clean, status, *permute_by_indices_trusted(tokens, clean, probs, num_experts, num_out_tokens, pad_multiple,
                                                       copy_layout, permutation_reports_as))


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
    if not _library.serves(route):
        return reference.make_plan(route, num_experts, num_out_tokens, pad_multiple)
    return _plan(route, num_experts, num_out_tokens, pad_multiple, "route")


def _plan(route, num_experts, num_out_tokens, pad_multiple, name) -> RowIdMap:
    row_map, layout, host = _library.plan(route, num_experts, pad_multiple or 1, _size(num_out_tokens), name)
    num_out = num_out_tokens
    if num_out is None:  # the rows used, read from the host copy the op's one sync made (a CPU layout itself)
        num_out = host_readable_layout(layout, host)[layout_total_index(num_experts)].item()
    return plan_of(row_map, layout, host, num_experts, num_out, num_out_tokens, pad_multiple)


def plan_of_ranks(in_rank: torch.Tensor, num_out_tokens: int) -> RowIdMap:
    """The send list's plan (rank-major rows) of ``in_rank [T, W]`` bool, as made by
    :func:`flexdispatch.managers.alltoall.routing_by_rank`, whose rows it has counted
    (``num_out_tokens``). A multihot map that this package built has nothing to validate, so no
    error word is queued for it (one device-to-host copy less a call)."""
    if not _library.serves(in_rank):
        return make_plan(in_rank, in_rank.shape[1], num_out_tokens=num_out_tokens)
    return _plan(in_rank, in_rank.shape[1], num_out_tokens, None, None)


def apply_permutation(tokens: torch.Tensor, row_id_map: RowIdMap) -> torch.Tensor:
    """Move ``tokens [R, H]`` to the rows of an existing plan: ``[N, H]``, differentiable."""
    _check_rows(tokens)
    if tokens.shape[0] != row_id_map.map.shape[0]:  # (its num_rows, read without the property's call)
        raise ValueError(f"tokens: expected {row_id_map.num_rows} rows (the plan's), got {tokens.shape[0]}")
    if not _library.serves(tokens):
        return reference.apply_permutation(tokens, row_id_map)
    p = row_id_map
    return _library.scatter_rows(tokens, p.map, p.num_out, p.layout, p.num_experts, p.pad_multiple > 1, p.has_tail)


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
    check_floating_tensor("permuted", permuted)
    out = unpermute_trusted(permuted, row_id_map, probs)
    return out.view(tuple(restore_shape)) if restore_shape is not None else out


def unpermute_trusted(permuted: torch.Tensor, row_id_map: RowIdMap, probs: Optional[torch.Tensor] = None):
    """:func:`unpermute` of arguments its caller has already checked (float ``permuted [N, H]``
    with the plan's ``N``, ``probs`` None or float32/float64 of the map's shape): a manager's
    restore of the rows its own permutation made, ``[R, H]``."""
    if not _library.serves(permuted):
        return reference.unpermute(permuted, row_id_map, probs)
    p = row_id_map
    return _library.gather_rows(permuted, p.map, probs, p.layout, p.num_experts, p.pad_multiple > 1, p.has_tail)


# ---- FP8 rows ------------------------------------------------------------------------------

FP8_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_fp8_rows(x, name: str) -> None:
    _check_rows(x, name)
    if x.shape[1] % reference.FP8_GROUP:
        raise ValueError(f"{name}: FP8 needs a hidden size that is a multiple of {reference.FP8_GROUP}, "
                         f"got {x.shape[1]}")


def _check_quantizable(x) -> None:
    _check_fp8_rows(x, "x")
    if x.dtype not in FP8_DTYPES:
        raise TypeError(f"x: FP8 quantization takes float32, float16 or bfloat16, got {x.dtype}")


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
    _check_quantizable(x)
    x = x.detach()
    if not _library.serves(x):
        return reference.quantize_fp8(x.contiguous())
    q, scales = _library.quantize_fp8(x)
    return q.view(torch.float8_e4m3fn), scales


def dequantize_fp8(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Inverse of :func:`quantize_fp8`: ``q [R, H]`` float8_e4m3fn (or its uint8 bits) and
    ``scales [R, H / 128]`` float32 -> ``[R, H]`` of ``dtype`` (float32, float16 or bfloat16),
    ``q * scale`` computed in float32 and rounded to nearest even."""
    _check_fp8_input(q, scales, dtype)
    if not _library.serves(q):
        return reference.dequantize_fp8(q.view(torch.float8_e4m3fn), scales, dtype)
    return _library.dequantize_fp8(q.view(torch.uint8), scales, dtype)


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
    probs = checked_index_args(q.shape[0], indices, probs, num_experts, num_out_tokens, pad_multiple)
    return with_counts(permute_fp8_by_indices_trusted(q, scales, indices, probs, num_experts, num_out_tokens,
                                                      pad_multiple, dtype, rows))


def permute_fp8_by_indices_trusted(q: torch.Tensor, scales: torch.Tensor, indices: torch.Tensor,
                                   probs: Optional[torch.Tensor], num_experts: int, num_out_tokens: Optional[int],
                                   pad_multiple: Optional[int], dtype: torch.dtype, rows: Optional[torch.Tensor],
                                   report_as: Optional[str] = "indices"):
    """:func:`permute_fp8_by_indices` of arguments its caller has already checked, without the
    counts: ``(out, permuted_probs, plan)``, a manager's permutation of the FP8 rows it kept;
    ``report_as`` as :func:`permute_by_indices_trusted` takes it."""
    if not _library.serves(q):
        dense = dequantize_fp8(q, scales, dtype)
        if rows is not None:  # the dequantized values, with the stand-in's gradient path
            dense = _StandIn.apply(rows, dense)
        return permute_by_indices_trusted(dense, indices, probs, num_experts, num_out_tokens, pad_multiple)
    return run_permutation(_library.permute_fp8, rows, probs, indices, num_experts, num_out_tokens, pad_multiple,
                           report_as, q.view(torch.uint8), scales, dtype)


def fp8_round_trip(x: torch.Tensor) -> torch.Tensor:
    """``dequantize_fp8(quantize_fp8(x))`` in ``x``'s dtype, with the identity as its gradient
    (straight-through): what a row looks like after an FP8 dispatch."""
    _check_quantizable(x)
    if _library.serves(x):
        return _library.fp8_round_trip(x)
    return _StandIn.apply(x, reference.fp8_round_trip(x.detach()))


# ---- the received rows' routing (the all-to-all and NVLink managers) --------------------------


def received_routing(meta: torch.Tensor, id_column: int, topk: int, first_expert: int, local: int,
                     prob_dtype: torch.dtype, has_source: Optional[torch.Tensor] = None):
    """The received rows' routing from their routing rows, in one kernel: ``meta [R, C]``
    float64 holds each row's ``topk`` global experts from column ``id_column`` (-1: unused) and
    their probs in the next ``topk`` columns. Returns ``(indices [R, K] int64, probs [R, K]
    prob_dtype)``: the local expert ``global - first_expert`` where it lies in ``[0, local)``,
    else -1; the prob, 0 where the index is -1 (differentiable with respect to ``meta``'s prob
    columns). Rows whose ``has_source [R]`` (bool, optional) is False get -1 everywhere."""
    if _library.serves(meta):
        return _library.received_routing(meta, id_column, topk, first_expert, local, prob_dtype, has_source)
    return reference.received_routing(meta, id_column, topk, first_expert, local, prob_dtype, has_source)


# ---- the agreement of a call (flexdispatch/managers/agreement.py) ----------------------------


def make_header(like: torch.Tensor, values: Sequence[int], status: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One rank's agreement header: int64 ``[WIDTH]`` on ``like``'s device holding ``values``,
    with ``status[0]`` (:func:`check_route`'s int32 ``[2]``, optional) OR-ed into the error
    field. One small kernel on CUDA: no host-to-device copy, no sync."""
    if _library.serves(like):
        return _library.kernels().make_header(like, list(values), status)
    return reference.make_header(like.device, values, status)


def mask_unless_agreed(headers: torch.Tensor, indices: torch.Tensor, index_dtype: torch.dtype = torch.int64):
    """``indices`` (int64) as ``index_dtype`` (int32 or int64), or -1 everywhere unless every
    rank's header in ``headers [W, WIDTH]`` (int64, gathered on ``indices``' device) has no
    error bits and equals rank 0's from the phase field on: the device side of
    :class:`~flexdispatch.managers.agreement.Agreement`, so that a transfer started before
    the host has read the headers moves nothing when the call must fail. One kernel, no sync."""
    if _library.serves(indices):
        return _library.kernels().mask_unless_agreed(headers.contiguous(), indices.contiguous(), index_dtype)
    return reference.mask_unless_agreed(headers, indices, index_dtype)
