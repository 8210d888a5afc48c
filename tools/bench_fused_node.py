"""Host time of the one-rank routing and permutation with gradients, by how many autograd nodes
and Python layers they take: what merging ``route_topk`` and ``permute`` into one node would
save the one-call path (a design question of the host path; nothing here is in the package).

    python tools/bench_fused_node.py [--device cpu|cuda] [--tokens 64 --hidden 128 --experts 32
        --topk 4] [--calls 2000] [--rounds 3]

Rows (the router's top-k of dense probs ``[T, E]``, then the permutation of ``x [T, H]`` by it,
``T * K`` rows, every slot used; host microseconds a call, ``timing.host_us``):

  registered ops      ``_library.route_topk`` then ``_library.permute``, as the local manager's
                      sync-free call runs them (two autograd nodes, error words reported)
  two raw nodes       two ``torch.autograd.Function`` around the extension's calls alone
  one raw node        one Function around both calls, whose backward makes both gradients
  raw, no gradient    the two extension calls alone

The raw rows report no error word. All four give the same rows and permuted probs, and the three
with gradients the same gradients of ``x`` and of the dense probs, bit for bit: checked first.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from timing import print_host_rounds  # noqa: E402


def variants(C, tokens: int, experts: int, topk: int) -> dict:
    """The ways of running route + permute, each ``fn(x, probs) -> (rows, permuted_probs)``."""
    from flexdispatch import _library

    rows_out = tokens * topk
    # (each way calls the extension inline, not through shared helpers, so that no way pays a
    # Python frame the others do not)

    def scatter_probs(grad_values, indices, like):
        return torch.zeros_like(like).scatter_(1, indices, grad_values.to(like.dtype))

    class TopK(torch.autograd.Function):
        @staticmethod
        def forward(ctx, probs):
            values, indices, clean, _ = C.route_topk(probs.contiguous(), topk, 0, 0)
            ctx.save_for_backward(indices, probs)
            ctx.mark_non_differentiable(clean)
            return values, clean

        @staticmethod
        def backward(ctx, grad_values, _):
            indices, probs = ctx.saved_tensors
            return scatter_probs(grad_values, indices, probs)

    class Permute(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, values, clean):
            out, out_probs, row_map, _, _ = C.permute(clean, experts, 1, rows_out, x.contiguous(),
                                                      values.float(), 0, False)
            ctx.save_for_backward(row_map)
            return out, out_probs

        @staticmethod
        def backward(ctx, grad_out, grad_probs):
            (row_map,) = ctx.saved_tensors
            return C.gather_rows(grad_out.contiguous(), row_map, None), C.gather_slots(grad_probs, row_map), None

    class Both(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, probs):
            values, indices, clean, _ = C.route_topk(probs.contiguous(), topk, 0, 0)
            out, out_probs, row_map, _, _ = C.permute(clean, experts, 1, rows_out, x.contiguous(),
                                                      values.float(), 0, False)
            ctx.save_for_backward(indices, row_map, probs)
            return out, out_probs

        @staticmethod
        def backward(ctx, grad_out, grad_probs):
            indices, row_map, probs = ctx.saved_tensors
            grad_x = C.gather_rows(grad_out.contiguous(), row_map, None)
            return grad_x, scatter_probs(C.gather_slots(grad_probs, row_map), indices, probs)

    # (the C++ apply, called directly as _library does: Function.apply's Python side binds
    # default arguments and serves functorch, neither needed here)
    topk_apply, permute_apply, both_apply = (super(torch.autograd.Function, f).apply for f in (TopK, Permute, Both))

    def registered(x, probs):
        values, _, clean, _ = _library.route_topk(probs, topk, 0, "probs")
        out, out_probs, _, _, _ = _library.permute(x, values.float(), clean, experts, 1, rows_out, "indices")
        return out, out_probs

    def two_nodes(x, probs):
        values, clean = topk_apply(probs)
        return permute_apply(x, values, clean)

    def raw(x, probs):
        values, _, clean, _ = C.route_topk(probs.detach(), topk, 0, 0)
        out, out_probs, _, _, _ = C.permute(clean, experts, 1, rows_out, x.detach(), values.float(), 0, False)
        return out, out_probs

    return {"registered ops": registered, "two raw nodes": two_nodes, "one raw node": both_apply,
            "raw, no gradient": raw}


def check(ways: dict, x: torch.Tensor, probs: torch.Tensor) -> None:
    """Every way gives the registered ops' rows and permuted probs, and its gradients."""
    expected = None
    for name, fn in ways.items():
        xi, pi = x.detach().clone().requires_grad_(), probs.detach().clone().requires_grad_()
        out, out_probs = fn(xi, pi)
        grads = None
        if out.requires_grad:  # (the same random upstream gradients for every way)
            upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(out)
            weights = torch.randn(out_probs.shape, generator=torch.Generator().manual_seed(4)).to(out_probs)
            (out * upstream).sum().add((out_probs * weights).sum()).backward()
            grads = (xi.grad, pi.grad)
        if expected is None:
            expected = (out.detach(), out_probs.detach(), grads)
            continue
        if not (torch.equal(out, expected[0]) and torch.equal(out_probs, expected[1])):
            raise AssertionError(f"{name}: rows or permuted probs differ from the registered ops'")
        if grads is not None and not all(torch.equal(a, b) for a, b in zip(grads, expected[2])):
            raise AssertionError(f"{name}: gradients differ from the registered ops'")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--topk", type=int, default=4)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    from flexdispatch import _library, ops

    ops.load_kernels()
    dev = args.device
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.tokens, args.hidden, generator=g).to(dev, dtype).requires_grad_()
    probs = torch.softmax(torch.randn(args.tokens, args.experts, generator=g), -1).to(dev).requires_grad_()
    ways = variants(_library.kernels(), args.tokens, args.experts, args.topk)
    check(ways, x, probs)
    rows = [(name, lambda fn=fn: fn(x, probs)) for name, fn in ways.items()]
    print_host_rounds(f"route_topk + permute, T={args.tokens} H={args.hidden} E={args.experts} K={args.topk} {dtype}",
                      rows, dev, args.calls, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
