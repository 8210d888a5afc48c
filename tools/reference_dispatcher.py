"""The reference dispatcher's algorithm, written out for the benchmark: the baseline that
flexdispatch replaces, timed beside it in the same run (``bench_dispatch --managers reference``).

It follows the reference's documented steps (see SPEC.md) with its unfused torch path
(``moe_permute_fusion=False``), so its time and memory stand for what users run today:

- dispatch: DeepEP ``get_dispatch_layout`` + ``dispatch`` in an autograd function whose
  backward is a ``combine`` of the gradients (the probs' too); the host waits for the counts
  and ``tokens_per_expert`` comes back as a CPU tensor; ``async_finish`` is waited at once;
- permute: the received indices become a multihot routing map and probs ``[R, E_l]`` (boolean
  indexing), then rows are gathered expert-major with ``masked_select`` on the transposed map
  and ``index_select``;
- restore: ``scatter_add_`` of the expert rows into zeros ``[R, H]`` in the rows' dtype;
- combine: DeepEP ``combine`` in an autograd function whose backward is a cached dispatch.

No validation, no padding, no capacity, one layer in flight: only what the benchmark needs.
``LocalTransport`` (one rank, no communication) lets the CPU tests check it against the
dense formula, so the baseline is known to compute the layer it is timed on.
"""

from __future__ import annotations

import torch


class _DeepepDispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, token_probs, token_indices, buffer, num_experts, state):
        per_rank, per_rdma, per_expert, in_rank, _ = buffer.get_dispatch_layout(token_indices, num_experts)
        recv_x, recv_idx, recv_probs, counts, handle, _ = buffer.dispatch(
            x, topk_idx=token_indices, topk_weights=token_probs.float(), num_tokens_per_rank=per_rank,
            num_tokens_per_rdma_rank=per_rdma, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
        state["handle"] = handle
        ctx.buffer, ctx.handle = buffer, handle
        tokens_per_expert = torch.tensor(counts, dtype=torch.int64)  # on the CPU, as the reference
        ctx.mark_non_differentiable(recv_idx, tokens_per_expert)
        return recv_x, recv_probs, recv_idx, tokens_per_expert

    @staticmethod
    def backward(ctx, grad_x, grad_probs, _idx, _counts):
        weights = None if grad_probs is None else grad_probs.float()
        gx, gp, _ = ctx.buffer.combine(grad_x.contiguous(), ctx.handle, topk_weights=weights)
        return gx, gp, None, None, None, None


class _DeepepCombine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, buffer, handle):
        ctx.buffer, ctx.handle = buffer, handle
        combined, _, _ = buffer.combine(x, handle)
        return combined

    @staticmethod
    def backward(ctx, grad):
        grad_x, _, _, _, _, _ = ctx.buffer.dispatch(grad.contiguous(), handle=ctx.handle)
        return grad_x, None, None


class DeepepTransport:
    """The reference's DeepEP calls on a DeepEP ``Buffer`` (one per group, made by the caller)."""

    def __init__(self, buffer, num_experts: int):
        self.buffer, self.num_experts = buffer, num_experts

    def dispatch(self, x, token_probs, token_indices, state):
        return _DeepepDispatch.apply(x, token_probs, token_indices, self.buffer, self.num_experts, state)

    def combine(self, x, state):
        return _DeepepCombine.apply(x, self.buffer, state.pop("handle"))


class LocalTransport:
    """One rank: every token stays; ``tokens_per_expert`` counted on the CPU, as DeepEP's list."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts

    def dispatch(self, x, token_probs, token_indices, state):
        valid = token_indices[token_indices >= 0]
        counts = torch.bincount(valid.cpu(), minlength=self.num_experts)
        return x, token_probs.float(), token_indices, counts

    def combine(self, x, state):
        return x


def indices_to_multihot(indices: torch.Tensor, probs: torch.Tensor, num_local_experts: int):
    """``[R, K]`` local indices (-1: elsewhere) and probs -> bool ``[R, E_l]`` and float ``[R, E_l]``,
    by boolean indexing as the reference does (a host sync for the mask's size)."""
    rows = indices.shape[0]
    routing_map = torch.zeros(rows, num_local_experts, dtype=torch.long, device=indices.device)
    dense_probs = torch.zeros(rows, num_local_experts, dtype=probs.dtype, device=indices.device)
    mask = indices != -1
    row_of = torch.arange(rows, device=indices.device).repeat_interleave(mask.sum(dim=1))
    experts = indices[mask]
    routing_map[row_of, experts] = 1
    dense_probs[row_of, experts] = probs[mask]
    return routing_map.bool(), dense_probs


def permute(tokens: torch.Tensor, routing_map: torch.Tensor, probs: torch.Tensor):
    """Expert-major rows (ascending source row within an expert), their probs, and the source row
    of each (``masked_select`` on the transposed map: a host sync)."""
    experts = routing_map.shape[1]
    by_expert = routing_map.T.contiguous()
    source = torch.arange(tokens.shape[0], device=tokens.device).unsqueeze(0).expand(experts, -1)
    sorted_rows = source.masked_select(by_expert)
    permuted_probs = probs.T.contiguous().masked_select(by_expert)
    return tokens.index_select(0, sorted_rows), permuted_probs, sorted_rows


def unpermute(rows: torch.Tensor, sorted_rows: torch.Tensor, restore_shape) -> torch.Tensor:
    """Each source row's expert rows summed back with ``scatter_add_`` (atomics: order not fixed)."""
    out = torch.zeros(restore_shape, dtype=rows.dtype, device=rows.device)
    return out.scatter_add(0, sorted_rows.unsqueeze(1).expand(-1, rows.shape[1]), rows)


class ReferenceDispatcher:
    """The facade methods ``bench_dispatch.Layer`` calls, on the reference's algorithm."""

    def __init__(self, num_local_experts: int, transport):
        self.num_local_experts = num_local_experts
        self.transport = transport
        self.state: dict = {}

    def dispatch_preprocess2(self, hidden, num_local_tokens, token_probs, token_indices):
        self.hidden_shape = hidden.shape
        self.token_probs, self.token_indices = token_probs, token_indices
        return hidden.reshape(-1, hidden.shape[-1]), token_probs

    def dispatch_all_to_all(self, hidden, probs=None, async_finish=True, allocate_on_comm_stream=True):
        recv, recv_probs, recv_idx, self.tokens_per_expert = self.transport.dispatch(
            hidden, self.token_probs, self.token_indices, self.state)
        self.dispatched_probs, self.dispatched_indices = recv_probs, recv_idx
        return recv, recv_probs

    def dispatch_postprocess(self, hidden):
        routing_map, probs = indices_to_multihot(self.dispatched_indices, self.dispatched_probs,
                                                 self.num_local_experts)
        self.restore_shape = hidden.shape
        rows, permuted_probs, self.sorted_rows = permute(hidden, routing_map, probs)
        return rows, self.tokens_per_expert, permuted_probs

    def combine_preprocess(self, hidden):
        return unpermute(hidden, self.sorted_rows, self.restore_shape)

    def combine_all_to_all(self, hidden, async_finish=True, allocate_on_comm_stream=True):
        out = self.transport.combine(hidden, self.state)
        self.sorted_rows = self.dispatched_probs = self.dispatched_indices = None
        return out

    def combine_postprocess(self, hidden):
        return hidden.view(self.hidden_shape)
