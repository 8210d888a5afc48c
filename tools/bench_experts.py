"""The benchmark's stand-in experts: every permuted row times a per-row factor
(its expert's scale times its permuted prob), differentiable in both.

Two implementations of the same function: ``torch`` (a broadcast multiply, three passes
in backward) and ``triton`` (one fused kernel each way, about the memory floor: forward
reads and writes every row once, backward reads the gradient and the rows and writes one
gradient). The benchmark uses Triton where it imports, so that the layer's time is the
dispatcher's; the torch version stays for machines without Triton and for comparison.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the machine
    triton = None

if triton is not None:

    @triton.jit
    def _scale_rows(x_ptr, f_ptr, y_ptr, hidden, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < hidden
        f = tl.load(f_ptr + row)
        x = tl.load(x_ptr + row * hidden + cols, mask=mask)
        tl.store(y_ptr + row * hidden + cols, (x.to(tl.float32) * f).to(y_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _scale_rows_backward(g_ptr, x_ptr, f_ptr, gx_ptr, gf_ptr, hidden: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        f = tl.load(f_ptr + row)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, hidden, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            mask = cols < hidden
            g = tl.load(g_ptr + row * hidden + cols, mask=mask, other=0.0).to(tl.float32)
            x = tl.load(x_ptr + row * hidden + cols, mask=mask, other=0.0).to(tl.float32)
            tl.store(gx_ptr + row * hidden + cols, (g * f).to(gx_ptr.dtype.element_ty), mask=mask)
            acc += g * x
        tl.store(gf_ptr + row, tl.sum(acc, 0))


class _ScaleRowsTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, factor):
        rows, factor = rows.contiguous(), factor.float().contiguous()
        out = torch.empty_like(rows)
        n, hidden = rows.shape
        if n and hidden:
            block = 1024
            _scale_rows[(n, triton.cdiv(hidden, block))](rows, factor, out, hidden, BLOCK=block, num_warps=4)
        ctx.save_for_backward(rows, factor)
        return out

    @staticmethod
    def backward(ctx, grad):
        rows, factor = ctx.saved_tensors
        grad = grad.contiguous()
        grad_rows = torch.empty_like(rows)
        grad_factor = torch.empty_like(factor)
        n, hidden = rows.shape
        if n and hidden:
            _scale_rows_backward[(n,)](grad, rows, factor, grad_rows, grad_factor, hidden, BLOCK=1024, num_warps=4)
        return grad_rows, grad_factor


def scale_rows(rows: torch.Tensor, factor: torch.Tensor, impl: str = "triton") -> torch.Tensor:
    """``rows [N, H] * factor [N]`` in the rows' dtype (factor applied in float32 by Triton, in
    the rows' dtype by torch). ``impl``: "triton" (falls back to "torch" without Triton or
    off CUDA) or "torch"."""
    if impl == "triton" and triton is not None and rows.is_cuda:
        return _ScaleRowsTriton.apply(rows, factor)
    return rows * factor[:, None].to(rows.dtype)


def triton_available() -> bool:
    return triton is not None
