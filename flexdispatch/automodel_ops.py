"""The permutation helpers NeMo Automodel's dispatcher module exposes at module level (from its
``moe_utils`` and ``fused_indices_converter``), with their signatures, over flexdispatch's ops.

Differences, all on the safe side: sums are deterministic and accumulate in float32 (the
reference's ``scatter_add_`` sums in the tokens' dtype, in an order that varies on GPUs), and
``fused=True`` needs no TransformerEngine (flexdispatch's kernels are the fused path).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import ops


def fused_indices_to_multihot(indices: torch.Tensor, probs_indices: torch.Tensor, num_of_local_experts: int):
    """``(routing_map [T, E] bool, probs [T, E])`` of top-k ``indices [T, K]`` (-1 for none) and
    ``probs_indices [T, K]``; gradients flow to the probs. Out-of-range or repeated indices
    raise ValueError (the reference's kernel reads out of bounds)."""
    return ops.indices_to_multihot(indices, probs_indices, num_of_local_experts)


def _capacity_probs(probs: torch.Tensor, sorted_indices: torch.Tensor, experts: int) -> torch.Tensor:
    """The prob of each row of the capacity layout (``capacity`` rows an expert, expert 0's first):
    row ``e * capacity + j`` carries ``probs[sorted_indices[e * capacity + j], e]``."""
    capacity = sorted_indices.shape[0] // experts
    flat = (torch.arange(experts, device=sorted_indices.device)[:, None] * probs.shape[0]
            + sorted_indices.view(experts, capacity)).view(-1)
    return probs.T.contiguous().view(-1).index_select(0, flat)


def permute(tokens: torch.Tensor, routing_map: torch.Tensor, probs: Optional[torch.Tensor] = None,
            num_out_tokens: Optional[int] = None, fused: bool = False, drop_and_pad: bool = False):
    """Group ``tokens [T, H]`` by expert: ``(permuted [N, H], permuted_probs [N] or None,
    sorted_indices [N] int64)``, expert 0's tokens first, ascending token order inside an
    expert; ``sorted_indices[n]`` is the token of output row ``n``.

    ``routing_map``: bool ``[T, E]``; ``probs``: optional ``[T, E]``. ``drop_and_pad`` (with
    ``num_out_tokens = E * capacity``): every expert gets exactly ``capacity`` rows, its routed
    tokens first and then unrouted ones (the reference's capacity layout, where every column of
    the map holds ``capacity`` tokens). Otherwise ``num_out_tokens`` is not needed (the output
    has one row per set entry of the map); ``fused`` is accepted and changes nothing.
    """
    if not isinstance(routing_map, torch.Tensor) or routing_map.dim() != 2:
        raise ValueError("routing_map: expected a [num_tokens, num_experts] tensor")
    if drop_and_pad and num_out_tokens is not None:
        experts = routing_map.shape[1]
        capacity = num_out_tokens // experts
        by_expert = routing_map.to(torch.int8).T.contiguous()
        sorted_indices = by_expert.argsort(dim=-1, descending=True, stable=True)[:, :capacity].contiguous().view(-1)
        permuted_probs = None if probs is None else _capacity_probs(probs, sorted_indices, experts)
        return tokens.index_select(0, sorted_indices), permuted_probs, sorted_indices
    out, out_probs, plan, _ = ops.permute(tokens, routing_map.bool(), probs)
    slots = plan.map.long()
    used = slots >= 0
    sorted_indices = torch.empty(out.shape[0], dtype=torch.int64, device=tokens.device)
    rows = torch.arange(slots.shape[0], device=tokens.device)[:, None].expand_as(slots)
    sorted_indices[slots[used]] = rows[used]
    return out, out_probs, sorted_indices


def unpermute(permuted_tokens: torch.Tensor, sorted_indices: torch.Tensor, restore_shape, probs=None,
              routing_map=None, fused: bool = False, drop_and_pad: bool = False) -> torch.Tensor:
    """Inverse of :func:`permute`: ``out [restore_shape]``, every token the sum of its rows (each
    multiplied by its prob when ``probs [T, E]`` and ``routing_map`` are given), in the
    permuted tokens' dtype. Deterministic: a token's rows are summed in row order, in float32."""
    num_tokens, hidden = restore_shape
    tokens = permuted_tokens
    if probs is not None:
        if routing_map is None:
            raise ValueError("routing_map: required with probs (it says which probs the permuted rows carry)")
        if drop_and_pad:
            weights = _capacity_probs(probs, sorted_indices, routing_map.shape[1])
        else:
            weights = probs.T.contiguous().masked_select(routing_map.T.contiguous())
        tokens = tokens * weights.unsqueeze(-1)
    # A token's rows in row order: row_map[t, j] = the j-th output row of token t (-1 past its last).
    order = torch.argsort(sorted_indices, stable=True)
    counts = torch.bincount(sorted_indices, minlength=num_tokens)
    width = max(int(counts.max()), 1) if counts.numel() else 1
    starts = torch.cumsum(counts, 0) - counts
    owners = sorted_indices[order]
    row_map = torch.full((num_tokens, width), -1, dtype=torch.int64, device=tokens.device)
    row_map[owners, torch.arange(order.numel(), device=tokens.device) - starts[owners]] = order
    accumulate = torch.float64 if tokens.dtype == torch.float64 else torch.float32
    gathered = tokens.to(accumulate)[row_map.clamp(min=0)] * (row_map >= 0).unsqueeze(-1)
    out = gathered[:, 0]
    for j in range(1, width):  # (fixed order: the same bits on every run)
        out = out + gathered[:, j]
    return out.to(permuted_tokens.dtype).view(tuple(restore_shape))
