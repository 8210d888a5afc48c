"""An MoE layer two ways: through a dispatcher, and as the dense formula
``out[t] = sum over k with i_k >= 0 of p_k * f_{i_k}(x[t])`` with ``f_e(x) = tanh(x @ W_e)``."""

import math

import torch


def make_problem(seed: int, tokens_per_rank, hidden: int, experts: int):
    """Every rank's tokens ``x_r [T_r, H]`` and router logits ``[T_r, E]``, and all experts'
    weights ``[E, H, H]``, in float64, identical on every rank."""
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(t, hidden, generator=g, dtype=torch.float64) for t in tokens_per_rank]
    logits = [torch.randn(t, experts, generator=g, dtype=torch.float64) * 2 for t in tokens_per_rank]
    weights = torch.randn(experts, hidden, hidden, generator=g, dtype=torch.float64) / math.sqrt(hidden)
    return xs, logits, weights


def capacity_drop(probs: torch.Tensor, indices: torch.Tensor, experts: int, factor: float) -> torch.Tensor:
    """The documented capacity rule, written out plainly: per expert keep the
    ``ceil(T * K / E * factor)`` highest-probability assignments (ties: earlier token); an
    assignment of probability 0 is dropped too."""
    tokens, topk = indices.shape
    probs = probs.detach()
    capacity = math.ceil(tokens * topk / experts * factor)
    out = indices.clone()
    for e in range(experts):
        cands = [(-float(probs[t, k]), t, k) for t in range(tokens) for k in range(topk)
                 if int(indices[t, k]) == e]
        dropped = [c for c in cands if c[0] == 0] + sorted(c for c in cands if c[0] != 0)[capacity:]
        for _, t, k in dropped:
            out[t, k] = -1
    return out


def dense_layer(x: torch.Tensor, token_probs: torch.Tensor, token_indices: torch.Tensor,
                weights: torch.Tensor) -> torch.Tensor:
    out = torch.zeros_like(x)
    for k in range(token_indices.shape[1]):
        valid = token_indices[:, k] >= 0
        w = weights[token_indices[:, k].clamp(min=0)]  # [T, H, H]
        y = torch.tanh(torch.einsum("th,thg->tg", x, w))
        out = out + torch.where(valid[:, None], token_probs[:, k, None] * y, 0)
    return out


def apply_experts(tokens: torch.Tensor, tokens_per_expert, permuted_probs: torch.Tensor,
                  local_weights: torch.Tensor) -> torch.Tensor:
    """The experts on the permuted rows, grouped by ``tokens_per_expert``, times the probs."""
    counts = [int(c) for c in tokens_per_expert.tolist()]
    assert sum(counts) == tokens.shape[0], "tokens_per_expert must count the rows produced"
    chunks = torch.split(tokens, counts)
    ys = [torch.tanh(c @ local_weights[e]) for e, c in enumerate(chunks)]
    y = torch.cat(ys) if ys else tokens
    return y * permuted_probs[:, None].to(y.dtype)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if b.numel() == 0:
        return 0.0 if a.numel() == 0 else float("inf")
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 3e-2}
