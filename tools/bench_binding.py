"""Host time of one kernel call through each way of binding a kernel for autograd and
torch.compile: why flexdispatch's ops are a Python autograd function around a pybind11 call,
called directly in eager code (``flexdispatch/_library.py``).

    python tools/bench_binding.py [--device cuda|cpu] [--rows 1024 --hidden 1024]
        [--calls 200] [--rounds 2]

A stand-in kernel (a row gather, ``index_select``; its backward an ``index_add`` into zeros) is
built (``load_inline``, about a minute on a cold cache) and bound four ways:

  raw                  its pybind11 function: the launch alone
  python function      a ``torch.autograd.Function`` around that call, its C++ ``apply`` called
                       directly, skipped without a gradient (what ``_library`` does eagerly)
  C++ op               the kernel registered as a torch op in C++ with a C++ autograd kernel
                       (``torch::autograd::Function``, the backward a second op), called through
                       ``torch.ops`` from Python, the path a compiled graph would take too
  C++ autograd         the same C++ autograd function reached through pybind11 (no op dispatch)

each with and without a gradient needed, beside flexdispatch's own ``gather_rows`` op (direct
eager call) and torch's cheapest device op. Host microseconds a call: ``--calls`` calls queued,
one sync at the end, median of 5 batches (``timing.host_us``). The four bindings are checked to
give the same rows and gradient first.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from timing import print_host_rounds  # noqa: E402

_SOURCE = r"""
#include <torch/extension.h>
#include <torch/library.h>

using torch::Tensor;

Tensor gather(const Tensor& src, const Tensor& index) { return src.index_select(0, index); }

Tensor scatter(const Tensor& grad, const Tensor& index, int64_t rows) {
  return torch::zeros({rows, grad.size(1)}, grad.options()).index_add_(0, index, grad);
}

static const auto& gather_op() {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("fd_binding::gather", "")
                             .typed<Tensor(const Tensor&, const Tensor&)>();
  return op;
}

static const auto& scatter_op() {
  static const auto op = c10::Dispatcher::singleton().findSchemaOrThrow("fd_binding::scatter", "")
                             .typed<Tensor(const Tensor&, const Tensor&, int64_t)>();
  return op;
}

struct Gather : public torch::autograd::Function<Gather> {
  static Tensor forward(torch::autograd::AutogradContext* ctx, const Tensor& src, const Tensor& index) {
    at::AutoDispatchBelowADInplaceOrView below;
    ctx->save_for_backward({index});
    ctx->saved_data["rows"] = src.size(0);
    return gather_op().call(src, index);
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const Tensor index = ctx->get_saved_variables()[0];
    return {scatter_op().call(grads[0], index, ctx->saved_data["rows"].toInt()), Tensor()};
  }
};

// The op's autograd kernel: the autograd function when a gradient is needed, else straight below.
Tensor gather_autograd(const Tensor& src, const Tensor& index) {
  if (at::GradMode::is_enabled() && src.requires_grad()) return Gather::apply(src, index);
  at::AutoDispatchBelowADInplaceOrView below;
  return gather_op().call(src, index);
}

TORCH_LIBRARY(fd_binding, m) {
  m.def("gather(Tensor src, Tensor index) -> Tensor");
  m.def("scatter(Tensor grad, Tensor index, int rows) -> Tensor");
}

TORCH_LIBRARY_IMPL(fd_binding, CompositeExplicitAutograd, m) {
  m.impl("gather", gather);
  m.impl("scatter", scatter);
}

TORCH_LIBRARY_IMPL(fd_binding, Autograd, m) { m.impl("gather", gather_autograd); }
"""

_BINDINGS = """
m.def("gather", &gather);
m.def("scatter", &scatter);
m.def("gather_autograd", &gather_autograd);
"""


def build():
    """The stand-in's extension (its pybind11 module; its ops in ``torch.ops.fd_binding``)."""
    from torch.utils.cpp_extension import load_inline

    return load_inline("fd_binding", cpp_sources=_SOURCE + "\nPYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {"
                       + _BINDINGS + "}\n", verbose=False)


def bindings(ext) -> dict:
    """name -> f(src, index): the stand-in kernel's four bindings."""

    class Gather(torch.autograd.Function):
        @staticmethod
        def forward(ctx, src, index):
            ctx.set_materialize_grads(False)
            ctx.save_for_backward(index)
            ctx.rows = src.shape[0]
            return ext.gather(src, index)

        @staticmethod
        def backward(ctx, grad):
            (index,) = ctx.saved_tensors
            return ext.scatter(grad, index, ctx.rows), None

    apply = super(torch.autograd.Function, Gather).apply  # (as _library calls it)

    def python_function(src, index):
        if torch.is_grad_enabled() and src.requires_grad:
            return apply(src, index)
        return ext.gather(src, index)

    return {"raw": ext.gather, "python function": python_function,
            "C++ op": torch.ops.fd_binding.gather.default, "C++ autograd": ext.gather_autograd}


def check(ways: dict, src: torch.Tensor, index: torch.Tensor) -> None:
    """Every binding gives the same rows, and every differentiable one the same gradient."""
    want = src.detach().index_select(0, index)
    grad = torch.randn_like(want)
    want_grad = torch.zeros_like(src).index_add_(0, index, grad)
    for name, fn in ways.items():
        leaf = src.detach().clone().requires_grad_()
        out = fn(leaf, index)
        if not torch.equal(out.detach(), want):
            raise AssertionError(f"{name}: rows differ")
        if name != "raw":
            (got,) = torch.autograd.grad(out, leaf, grad)
            if not torch.equal(got, want_grad):
                raise AssertionError(f"{name}: gradient differs")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", type=int, default=1024)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    dev = args.device
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    g = torch.Generator().manual_seed(0)
    src = torch.randn(args.rows, args.hidden, generator=g).to(dev, dtype).requires_grad_()
    index = torch.randperm(args.rows, generator=g).to(dev)
    plain = src.detach()
    ways = bindings(build())
    check(ways, src, index)

    from flexdispatch import _library, ops
    ops.load_kernels()
    row_map = index.to(torch.int32)[:, None].contiguous()  # (a one-slot plan: row r takes src[index[r]])
    layout = torch.zeros(5, dtype=torch.int64, device=dev)

    def ours(x):
        return _library.gather_rows(x, row_map, None, layout, 1, False, False)

    one = torch.ones(1, device=dev)
    rows = [("torch's cheapest op (add_)", lambda: one.add_(1))]
    for name, fn in ways.items():
        rows.append((f"{name}, no grad", lambda fn=fn: fn(plain, index)))
        if name != "raw":
            rows.append((f"{name}, grad", lambda fn=fn: fn(src, index)))
    rows += [("flexdispatch gather_rows, no grad", lambda: ours(plain)),
             ("flexdispatch gather_rows, grad", lambda: ours(src))]
    print_host_rounds(f"bindings of a row gather, {args.rows} x {args.hidden} {dtype}", rows, dev, args.calls,
                      args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
