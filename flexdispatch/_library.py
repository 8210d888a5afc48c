"""The kernels as ``torch.library`` custom ops (namespace ``flexdispatch``), for torch.compile.

Dynamo cannot trace into a pybind11 function, so a compiled model that called the kernels
directly broke its graph at every call. Under ``torch.compile`` the public ops of
:mod:`flexdispatch.ops` call these registered ops instead; each has a fake (meta)
implementation that gives its output shapes, and the differentiable ones register their
backward, so a layer compiles into whole graphs:

* the permutation's size is data-dependent unless ``num_out`` is given (sync-free mode): its
  fake gives an unbacked size, and the real op makes the one host sync at run time, as eager
  does (no graph break);
* routing errors are raised (CPU) or queued for the next sync point (CUDA) inside the real
  ops at run time, exactly as in eager mode.

Eager calls skip the op dispatcher (a custom op costs several microseconds of host time per
call) and run the same implementations through :mod:`flexdispatch.ops`' autograd functions.
Optional tensor results travel as empty tensors (custom ops cannot return None) and are
mapped back to None by the callers in :mod:`flexdispatch.ops`.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import ops

_LIB = "flexdispatch"


def _host_copy(plan) -> torch.Tensor:
    """The plan's host layout as an op output: [0] when none was made, and a copy when it is
    the layout itself (CPU tensors), since an op's outputs may not alias each other."""
    host = plan.host_layout
    if host is None:
        return torch.empty(0, dtype=torch.int64)
    return host.clone() if host.data_ptr() == plan.layout.data_ptr() else host


# ---- routing -------------------------------------------------------------------------------


@torch.library.custom_op(f"{_LIB}::check_route", mutates_args=())
def check_route(indices: torch.Tensor, num_experts: int, flag: int, probs: Optional[torch.Tensor],
                report_as: Optional[str]) -> tuple[torch.Tensor, torch.Tensor]:
    clean, status = ops._C.check_route(indices.contiguous(), num_experts, flag,
                                       None if probs is None else probs.contiguous())
    if report_as is not None:
        ops.defer_routing_error(status, indices, num_experts, report_as, probs)
    return clean, status


@check_route.register_fake
def _(indices, num_experts, flag, probs, report_as):
    return (indices.new_empty(indices.shape, dtype=torch.int64), indices.new_empty(2, dtype=torch.int32))


@torch.library.custom_op(f"{_LIB}::indices_to_multihot", mutates_args=())
def indices_to_multihot(indices: torch.Tensor, probs: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    return ops._multihot_impl(indices.contiguous(), probs.contiguous(), num_experts)


@indices_to_multihot.register_fake
def _(indices, probs, num_experts):
    rows = indices.shape[0]
    return (indices.new_empty(rows, num_experts, dtype=torch.bool), probs.new_empty(rows, num_experts))


def _multihot_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def _multihot_backward(ctx, grad_map, grad_multihot):
    (idx,) = ctx.saved_tensors
    return None, ops._multihot_grad(idx, grad_multihot), None


indices_to_multihot.register_autograd(_multihot_backward, setup_context=_multihot_setup)


# ---- the permutation -------------------------------------------------------------------------


@torch.library.custom_op(f"{_LIB}::permute", mutates_args=())
def permute(route: torch.Tensor, num_experts: int, pad_multiple: int, num_out: int, tokens: torch.Tensor,
            probs: Optional[torch.Tensor], name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor,
                                                                 torch.Tensor, torch.Tensor]:
    """(out [N, H], out_probs [N] or [0], map [R, S], layout [3E + 2], host layout or [0])."""
    out, out_probs, plan = ops._permute(tokens, probs, route.contiguous(), num_experts,
                                        None if num_out < 0 else num_out, pad_multiple, name)
    host = _host_copy(plan)
    return (out, tokens.new_empty(0, dtype=torch.float32) if out_probs is None else out_probs, plan.map,
            plan.layout, host)


@permute.register_fake
def _(route, num_experts, pad_multiple, num_out, tokens, probs, name):
    rows = num_out if num_out >= 0 else torch.library.get_ctx().new_dynamic_size()
    slots = route.shape[1]
    layout = 3 * num_experts + 2
    out_probs = probs.new_empty(rows) if probs is not None else tokens.new_empty(0, dtype=torch.float32)
    host = torch.empty(layout if num_out < 0 else 0, dtype=torch.int64)
    return (tokens.new_empty(rows, tokens.shape[1]), out_probs, route.new_empty(route.shape[0], slots,
            dtype=torch.int32), route.new_empty(layout, dtype=torch.int64), host)


def _permute_setup(ctx, inputs, output):
    ctx.save_for_backward(output[2])


def _permute_backward(ctx, grad_out, grad_out_probs, _map, _layout, _host):
    (row_map,) = ctx.saved_tensors
    grad_tokens = grad_probs = None
    if ctx.needs_input_grad[4] and grad_out is not None:
        grad_tokens = gather_rows(grad_out.contiguous(), row_map, None)
    if ctx.needs_input_grad[5] and grad_out_probs is not None:
        grad_probs = ops._gather_slots_by_map(grad_out_probs, row_map)
    return None, None, None, None, grad_tokens, grad_probs, None


permute.register_autograd(_permute_backward, setup_context=_permute_setup)


@torch.library.custom_op(f"{_LIB}::plan", mutates_args=())
def plan(route: torch.Tensor, num_experts: int, pad_multiple: int, num_out: int,
         name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(map [R, S], layout [3E + 2], host layout or [0]); rows used = layout[3E]."""
    p = ops._plan_impl(route.contiguous(), num_experts, None if num_out < 0 else num_out, pad_multiple, name)
    host = _host_copy(p)
    return p.map, p.layout, host


@plan.register_fake
def _(route, num_experts, pad_multiple, num_out, name):
    layout = 3 * num_experts + 2
    return (route.new_empty(route.shape[0], route.shape[1], dtype=torch.int32),
            route.new_empty(layout, dtype=torch.int64), torch.empty(layout if num_out < 0 else 0, dtype=torch.int64))


# ---- row movers ------------------------------------------------------------------------------


@torch.library.custom_op(f"{_LIB}::gather_rows", mutates_args=())
def gather_rows(src: torch.Tensor, row_map: torch.Tensor, probs: Optional[torch.Tensor]) -> torch.Tensor:
    return ops._C.gather_rows(src.contiguous(), row_map, None if probs is None else probs.contiguous())


@gather_rows.register_fake
def _(src, row_map, probs):
    return src.new_empty(row_map.shape[0], src.shape[1])


@torch.library.custom_op(f"{_LIB}::scatter_rows", mutates_args=())
def scatter_rows(src: torch.Tensor, row_map: torch.Tensor, num_out: int, layout: torch.Tensor, num_experts: int,
                 padded: bool, has_tail: bool) -> torch.Tensor:
    return ops._C.scatter_rows(src.contiguous(), row_map, num_out, layout, num_experts, padded, has_tail)


@scatter_rows.register_fake
def _(src, row_map, num_out, layout, num_experts, padded, has_tail):
    return src.new_empty(num_out, src.shape[1])


def _scatter_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1])


def _scatter_backward(ctx, grad):
    (row_map,) = ctx.saved_tensors
    return gather_rows(grad.contiguous(), row_map, None), None, None, None, None, None, None


scatter_rows.register_autograd(_scatter_backward, setup_context=_scatter_setup)


@torch.library.custom_op(f"{_LIB}::gather_rows_backward", mutates_args=())
def gather_rows_backward(grad: torch.Tensor, src: torch.Tensor, row_map: torch.Tensor, probs: torch.Tensor,
                         layout: torch.Tensor, num_experts: int, padded: bool,
                         has_tail: bool) -> tuple[torch.Tensor, torch.Tensor]:
    return ops._C.gather_rows_backward(grad.contiguous(), src.contiguous(), row_map, probs.contiguous(), layout,
                                       num_experts, padded, has_tail)


@gather_rows_backward.register_fake
def _(grad, src, row_map, probs, layout, num_experts, padded, has_tail):
    return src.new_empty(src.shape), probs.new_empty(probs.shape)


@torch.library.custom_op(f"{_LIB}::unpermute", mutates_args=())
def unpermute(permuted: torch.Tensor, probs: Optional[torch.Tensor], row_map: torch.Tensor, layout: torch.Tensor,
              num_experts: int, padded: bool, has_tail: bool) -> torch.Tensor:
    return ops._C.gather_rows(permuted.contiguous(), row_map, None if probs is None else probs.contiguous())


@unpermute.register_fake
def _(permuted, probs, row_map, layout, num_experts, padded, has_tail):
    return permuted.new_empty(row_map.shape[0], permuted.shape[1])


def _unpermute_setup(ctx, inputs, output):
    permuted, probs, row_map, layout, num_experts, padded, has_tail = inputs
    ctx.save_for_backward(permuted if probs is not None else None, probs, row_map, layout)
    ctx.shape = (permuted.shape[0], num_experts, padded, has_tail)


def _unpermute_backward(ctx, grad):
    permuted, probs, row_map, layout = ctx.saved_tensors
    num_out, num_experts, padded, has_tail = ctx.shape
    if probs is None:
        return scatter_rows(grad.contiguous(), row_map, num_out, layout, num_experts, padded, has_tail), \
            None, None, None, None, None, None
    grad_x, grad_p = gather_rows_backward(grad.contiguous(), permuted, row_map, probs, layout, num_experts, padded,
                                          has_tail)
    return grad_x, (grad_p if ctx.needs_input_grad[1] else None), None, None, None, None, None


unpermute.register_autograd(_unpermute_backward, setup_context=_unpermute_setup)


# ---- FP8 rows --------------------------------------------------------------------------------


@torch.library.custom_op(f"{_LIB}::fp8_round_trip", mutates_args=())
def fp8_round_trip(x: torch.Tensor) -> torch.Tensor:
    """Rows rounded through FP8 (the kernels); straight-through gradient."""
    return ops.dequantize_fp8(*ops.quantize_fp8(x), dtype=x.dtype)


@fp8_round_trip.register_fake
def _(x):
    return torch.empty_like(x)


def _fp8_round_trip_backward(ctx, grad):
    return grad


fp8_round_trip.register_autograd(_fp8_round_trip_backward)
