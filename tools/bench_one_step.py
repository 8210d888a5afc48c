"""Host time of the one-rank dispatcher's call with its steps run as one step (the one-call
entry points' path: ``route_and_permute``, ``restore_and_combine``) against one by one (the
path those entry points take for a manager whose steps are replaced on the instance), the two in
one process, alternating.

    python tools/bench_one_step.py [--device cpu|cuda] [--tokens 1024 --hidden 1024 --experts 32
        --topk 4] [--mode sync-free|default] [--route dense|given] [--calls 200] [--rounds 3]

Rows (the layer of ``bench_compile.py``: local manager, routing probs differentiable; host
microseconds a call, ``timing.host_us``):

  one step, forward       ``token_permutation`` (``--route given``: ``token_permutation2`` of
                          the top-k of the probs, as Automodel's layers call it) +
                          ``token_unpermutation``
  steps, forward          the same with the manager's steps replaced by themselves on the
                          instance, so the entry points call them one by one
  one step, fwd+bwd       the forward, then the backward of its output's sum
  steps, fwd+bwd

Both give the same rows, counts, permuted probs, output and gradients, bit for bit: checked
first.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from bench_compile import add_layer_arguments, dispatcher, layer_inputs  # noqa: E402
from timing import print_host_rounds  # noqa: E402


def step_by_step(d):
    """``d`` with every step of its manager replaced on the instance by itself: the dispatcher's
    one-call entry points then run them one by one (``managers.base.runs_own_steps``)."""
    from flexdispatch.managers.base import PERMUTING_STEPS, RESTORING_STEPS

    manager = d._comm_manager
    for name in PERMUTING_STEPS + RESTORING_STEPS:
        setattr(manager, name, getattr(manager, name))
    return d


def call(d, x, probs, backward: bool, given: bool = False):
    """One layer call (``x * permuted probs`` as the experts; ``given``: the routing given as the
    top-k of ``probs``); its results, gradients taken."""
    if given:
        token_probs, token_indices = torch.topk(probs, d.config.moe_router_topk)
        tokens, counts, permuted_probs = d.token_permutation2(x, x.shape[0], token_probs, token_indices)
    else:
        tokens, counts, permuted_probs = d.token_permutation(x, x.shape[0], probs)
    out = d.token_unpermutation(tokens * permuted_probs[:, None].to(tokens.dtype))
    if backward:
        out.sum().backward()
    return tokens, counts, permuted_probs, out


def check(one_step, steps, x, logits, given: bool = False) -> None:
    """Both dispatchers give the same results and gradients, bit for bit (else AssertionError)."""
    results = []
    for d in (one_step, steps):
        xi, li = x.detach().clone().requires_grad_(), logits.detach().clone().requires_grad_()
        results.append((*call(d, xi, torch.softmax(li, -1), True, given), xi.grad, li.grad))
    for what, a, b in zip(("tokens", "counts", "probs", "output", "x's gradient", "logits' gradient"), *results):
        if not torch.equal(a, b):
            raise AssertionError(f"one step and steps differ: {what}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_layer_arguments(parser)
    parser.add_argument("--mode", choices=["sync-free", "default"], default="sync-free")
    parser.add_argument("--route", choices=["dense", "given"], default="dense")
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    sync_free = args.mode == "sync-free"
    one_step, steps = dispatcher(args, sync_free), step_by_step(dispatcher(args, sync_free))
    (x, logits, _), _ = layer_inputs(args, dtype)
    given = args.route == "given"
    check(one_step, steps, x, logits, given)
    probs = torch.softmax(logits.requires_grad_(), -1)
    rows = []
    for backward in (False, True):
        for label, d in (("one step", one_step), ("steps", steps)):
            if backward:  # (a graph of its own each call: the router's softmax is part of it)
                fn = (lambda d=d: call(d, x, torch.softmax(logits, -1), True, given))
            else:
                fn = (lambda d=d: call(d, x, probs, False, given))
            rows.append((f"{label}, {'fwd+bwd' if backward else 'forward'}", fn))
    print_host_rounds(f"one-rank layer ({args.mode}, {args.route} routing), T={args.tokens} H={args.hidden} E={args.experts} K={args.topk} "
                      f"{dtype}", rows, args.device, args.calls, args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
