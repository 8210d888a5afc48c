"""Host microseconds a call of the one-rank dispatcher's kernels at each layer of the stack.

    python tools/host_stack.py [--tokens 1024 --hidden 1024 --experts 32 --topk 4]
        [--device cuda|cpu] [--calls 200] [--rounds 2]

The layer is ``bench_compile.py``'s (local manager, sync-free). Its three kernels (the router's
top-k with its check, the permutation, the restore) are called four ways, and each row is the
host time of one call (``--calls`` calls queued, one sync at the end, median of 5 batches):

  raw          the extension's functions directly (``_library.kernels()``): launches only
  ops          the registered ops of ``flexdispatch._library`` (the binding every caller uses:
               autograd function, error words, fakes for torch.compile)
  public       ``flexdispatch.ops`` (``route_topk_trusted``, ``permute_by_indices_trusted``,
               ``unpermute``: plans and their records)
  dispatcher   ``token_permutation`` + ``token_unpermutation`` (the state machine, its checks)

Each kernel's raw and op rows are printed too (with and without a gradient), beside torch's
cheapest device op. Rows are bf16 on CUDA (float32 on the CPU), routing probs float32 and
differentiable. On ``--device cpu`` (the CPU kernels, a smoke test) the launch cost is absent.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from flexdispatch import _library, ops  # noqa: E402
from bench_compile import add_layer_arguments, dispatcher, layer_inputs  # noqa: E402
from timing import print_host_rounds  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_layer_arguments(parser)
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    dev, tokens, experts, topk = args.device, args.tokens, args.experts, args.topk
    ops.load_kernels()
    kernels = _library.kernels()
    d = dispatcher(args, True)
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    (x, logits, _), _ = layer_inputs(args, dtype)
    probs = torch.softmax(logits.requires_grad_(), -1)
    x_plain, probs_plain = x.detach(), probs.detach()
    values, _, clean, _ = kernels.route_topk(probs_plain, topk, 0, 0)
    values = values.float()
    num_out = tokens * topk  # (the sync-free worst case of one rank)

    def raw():
        v, _, c, _ = kernels.route_topk(probs_plain, topk, 0, 0)
        out, _, row_map, _, _ = kernels.permute(c, experts, 1, num_out, x_plain, v.float(), 0)
        return kernels.gather_rows(out, row_map, None)

    def registered():
        v, _, c, _ = _library.route_topk(probs, topk, 0, "probs")
        out, _, row_map, layout, _ = _library.permute(x, v.float(), c, experts, 1, num_out, "indices")
        return _library.gather_rows(out, row_map, None, layout, experts, False, True)

    def public():
        v, _, c, _ = ops.route_topk_trusted(probs, topk, 0, "probs")
        out, _, plan = ops.permute_by_indices_trusted(x, c, v.float(), experts, num_out, None)
        return ops.unpermute(out, plan)

    def through_dispatcher():
        rows, _, _ = d.token_permutation(x, tokens, probs)
        return d.token_unpermutation(rows)

    one = torch.ones(1, device=dev)
    rows = [("torch's cheapest op (add_)", lambda: one.add_(1)),
            ("route_topk raw", lambda: kernels.route_topk(probs_plain, topk, 0, 0)),
            ("route_topk op, reported, no grad", lambda: _library.route_topk(probs_plain, topk, 0, "probs")),
            ("route_topk op, reported, grad", lambda: _library.route_topk(probs, topk, 0, "probs")),
            ("permute raw", lambda: kernels.permute(clean, experts, 1, num_out, x_plain, values, 0)),
            ("permute op, no grad", lambda: _library.permute(x_plain, values, clean, experts, 1, num_out, "indices")),
            ("permute op, grad", lambda: _library.permute(x, values, clean, experts, 1, num_out, "indices")),
            ("three kernels: raw", raw), ("three kernels: ops", registered), ("three kernels: public", public),
            ("three kernels: dispatcher", through_dispatcher)]
    print_host_rounds(f"one-rank stack, T={tokens} H={args.hidden} E={experts} K={topk} {dtype}", rows, dev,
                      args.calls, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
