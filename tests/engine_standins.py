"""Stand-ins of the communication engines flexdispatch drives but CI cannot run (no GPU, no
DeepEP, UCCL-EP or HybridEP build): each follows its engine's documented API and semantics, over
torch.distributed collectives (gloo on the CPU), so that the managers' engine paths run in CI.

* :func:`fused_dispatch` / :func:`fused_combine`: the DeepEP-API fused functions Automodel's
  module exposes (DeepEP's ``Buffer.get_dispatch_layout`` + ``dispatch`` / ``combine`` as its
  ``fused_a2a`` drives them; UCCL-EP's wrapper has the same API): a token goes once to every
  rank holding one of its experts; received rows are grouped by source rank, then token;
  ``recv_indices`` hold local expert ids (-1 for the slots of other ranks), ``recv_probs``
  their probs (0 there), ``tokens_per_expert`` the received slots per local expert (CPU int64).
  Combine sums a token's rows on its home rank. Differentiable both ways.
* :class:`HybridEPBuffer`: ``deep_ep.HybridEPBuffer``'s ``dispatch_with_permute`` /
  ``combine_with_unpermute`` (DeepEP's hybrid-ep branch): dispatch returns each rank's rows
  expert-major (ascending source rank, then token, inside an expert), padded per expert to
  ``pad_multiple`` with zero rows of prob 0, their probs, and the padded counts; combine sums
  a token's rows (the experts applied the probs); every rank passes the same token count.

Counters (``CALLS``) let tests check that a manager really called the engine.
"""

from __future__ import annotations

import collections
import contextlib
import sys
import types
from typing import Optional

import torch
import torch.distributed as dist

CALLS = collections.Counter()


def _all_gather(t: torch.Tensor, group) -> torch.Tensor:
    """Every rank's ``t`` (same shape on every rank), concatenated in rank order."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    return torch.cat(parts)


def _gather_rows(rows: torch.Tensor, group) -> tuple[torch.Tensor, list]:
    """Every rank's ``rows [n_r, ...]`` (counts may differ), concatenated, and the counts."""
    counts = _all_gather(torch.tensor([rows.shape[0]]), group).tolist()
    padded = rows.new_zeros((max(counts),) + tuple(rows.shape[1:]))
    padded[:rows.shape[0]] = rows
    every = _all_gather(padded, group).view((len(counts), max(counts)) + tuple(rows.shape[1:]))
    return torch.cat([every[r, :n] for r, n in enumerate(counts)]), counts


def _sum_home(rows: torch.Tensor, sources: torch.Tensor, total: int, mine: slice, group) -> torch.Tensor:
    """Add ``rows`` into the global token ``sources`` of every rank, sum over ranks, keep ``mine``."""
    out = rows.new_zeros((total,) + tuple(rows.shape[1:])).index_add(0, sources, rows)
    dist.all_reduce(out, group=group)
    return out[mine]


# ---- DeepEP API ----------------------------------------------------------------------------------


class _Handle:
    def __init__(self, sources, total, mine):
        self.sources, self.total, self.mine = sources, total, mine


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, token_indices, token_probs, num_experts, group):
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        local = num_experts // world
        xs, counts = _gather_rows(x, group)
        idx, _ = _gather_rows(token_indices.long(), group)
        probs, _ = _gather_rows(token_probs.float(), group)
        total = sum(counts)
        first = sum(counts[:rank])
        here = (idx >= rank * local) & (idx < (rank + 1) * local)
        sources = here.any(1).nonzero().flatten()  # source rank then token: ascending global row
        recv_idx = torch.where(here[sources], idx[sources] - rank * local, -1)
        recv_probs = torch.where(recv_idx >= 0, probs[sources], 0.0)
        tokens_per_expert = torch.stack([(recv_idx == e).sum() for e in range(local)]) if local else \
            torch.zeros(0, dtype=torch.int64)
        handle = _Handle(sources, total, slice(first, first + x.shape[0]))
        ctx.handle, ctx.group = handle, group
        ctx.mark_non_differentiable(recv_idx)
        return xs[sources], recv_idx, recv_probs, tokens_per_expert.to(torch.int64), handle

    @staticmethod
    def backward(ctx, grad_x, _grad_idx, grad_probs, _grad_counts, _handle):
        h = ctx.handle
        gx = _sum_home(grad_x, h.sources, h.total, h.mine, ctx.group)
        gp = _sum_home(grad_probs, h.sources, h.total, h.mine, ctx.group)
        return gx, None, gp, None, None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group, handle):
        ctx.handle, ctx.group = handle, group
        return _sum_home(x, handle.sources, handle.total, handle.mine, group)

    @staticmethod
    def backward(ctx, grad):
        h = ctx.handle
        every, _ = _gather_rows(grad, ctx.group)
        return every[h.sources], None, None


def fused_dispatch(x, token_indices, token_probs, num_experts, group, async_finish=False,
                   allocate_on_comm_stream=False):
    CALLS["dispatch"] += 1
    return _Dispatch.apply(x, token_indices, token_probs, num_experts, group)


def fused_combine(x, group, handle, async_finish=False, allocate_on_comm_stream=False):
    CALLS["combine"] += 1
    return _Combine.apply(x, group, handle), None


# ---- HybridEP API --------------------------------------------------------------------------------


class _HybridHandle:
    def __init__(self, rows, experts, total, mine):
        self.rows, self.experts, self.total, self.mine = rows, experts, total, mine


class HybridEPBuffer:
    """``deep_ep.HybridEPBuffer``'s constructor and the two calls its users make."""

    def __init__(self, group, hidden_dim, max_num_of_tokens_per_rank, num_local_experts, use_fp8=False,
                 num_sms_dispatch_api=24, num_sms_combine_api=24):
        self.group, self.hidden_dim, self.num_local_experts = group, hidden_dim, num_local_experts
        CALLS["hybrid_buffer"] += 1

    def dispatch_with_permute(self, hidden, routing_map=None, probs=None, scaling_factor=None,
                              num_of_experts_per_rank=None, pad_multiple=None, num_permuted_tokens=None,
                              non_blocking=False, handle=None, topk_idx=None, num_experts=None, **_options):
        group = self.group
        rank = dist.get_rank(group)
        if handle is not None:  # backward of a combine: the same rows, from the cached layout
            every, _ = _gather_rows(hidden, group)
            rows = handle.rows
            out = torch.where((rows >= 0)[:, None], every[rows.clamp(min=0)], 0)
            return out, None, None, None, handle
        CALLS["hybrid_dispatch"] += 1
        local = num_of_experts_per_rank
        if routing_map is None:  # compact routing: top-k indices
            routing_map = torch.zeros(topk_idx.shape[0], num_experts, dtype=torch.bool)
            valid = topk_idx >= 0
            routing_map[torch.arange(topk_idx.shape[0])[:, None].expand_as(topk_idx)[valid], topk_idx[valid]] = True
        maps, counts = _gather_rows(routing_map, group)
        if len(set(counts)) != 1:
            raise RuntimeError(f"HybridEP needs the same token count on every rank, got {counts}")
        xs, _ = _gather_rows(hidden, group)
        ps, _ = _gather_rows(probs, group)
        pad = pad_multiple or 1
        rows, row_probs, row_experts, per_expert = [], [], [], []
        for e in range(rank * local, (rank + 1) * local):
            hit = maps[:, e].nonzero().flatten()
            n = -(-hit.numel() // pad) * pad
            rows.append(torch.cat([hit, hit.new_full((n - hit.numel(),), -1)]))
            row_probs.append(torch.cat([ps[hit, e], ps.new_zeros(n - hit.numel())]))
            row_experts.append(torch.full((n,), e, dtype=torch.int64))
            per_expert.append(n)
        rows = torch.cat(rows)
        out = torch.where((rows >= 0)[:, None], xs[rows.clamp(min=0)], 0)
        first = rank * counts[0]
        handle = _HybridHandle(rows, torch.cat(row_experts), sum(counts), slice(first, first + counts[0]))
        return out, torch.cat(row_probs).float(), None, torch.tensor(per_expert, dtype=torch.int64), handle

    def combine_with_unpermute(self, hidden, probs=None, handle=None, pad_multiple=None, **_options):
        CALLS["hybrid_combine"] += 1
        rows = handle.rows
        keep = rows >= 0
        combined = _sum_home(hidden[keep], rows[keep], handle.total, handle.mine, self.group)
        combined_probs = None
        if probs is not None:  # backward of a dispatch: each row's prob gradient to its (token, expert)
            experts = self.num_local_experts * dist.get_world_size(self.group)
            flat = torch.zeros(handle.total * experts, dtype=probs.dtype)
            flat.index_add_(0, rows[keep] * experts + handle.experts[keep], probs[keep])
            dist.all_reduce(flat, group=self.group)
            combined_probs = flat.view(handle.total, experts)[handle.mine]
        return combined, combined_probs


@contextlib.contextmanager
def installed(engine: Optional[str]):
    """Install the stand-in of ``engine`` ("deepep", "uccl_ep", "hybridep"; None: nothing) where
    flexdispatch looks for that engine, and remove it afterwards: the DeepEP-API functions as
    the package's module-level ``fused_*`` / ``uccl_fused_*`` (where code patches them), and
    HybridEP as ``deep_ep.HybridEPBuffer`` (a ``deep_ep`` module holding only it)."""
    import flexdispatch as fd
    from flexdispatch import engines
    from flexdispatch.managers import deepep

    names = {"deepep": ("fused_dispatch", "fused_combine"), "uccl_ep": ("uccl_fused_dispatch", "uccl_fused_combine")}
    previous = sys.modules.get("deep_ep")
    if engine in names:
        vars(fd)[names[engine][0]], vars(fd)[names[engine][1]] = fused_dispatch, fused_combine
    elif engine == "hybridep":
        module = types.ModuleType("deep_ep")
        module.HybridEPBuffer = HybridEPBuffer
        sys.modules["deep_ep"] = module
    elif engine is not None:
        raise ValueError(engine)
    engines.forget()
    try:
        yield
    finally:
        for name in names.get(engine, ()):
            vars(fd).pop(name, None)
        if engine == "hybridep":
            if previous is None:
                sys.modules.pop("deep_ep", None)
            else:
                sys.modules["deep_ep"] = previous
            deepep._deep_ep, deepep._import_error = None, None  # (it may have seen the stand-in)
        engines.forget()
