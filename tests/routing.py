"""Random routing for tests: every row names distinct experts, some slots unused (-1)."""

import torch


def random_indices(rows: int, experts: int, topk: int, *, drop: float = 0.2, seed: int = 0,
                   dtype=torch.int64, device="cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    idx = torch.rand(rows, experts, generator=g).argsort(dim=1)[:, :topk]
    idx = torch.where(torch.rand(rows, topk, generator=g) < drop, -1, idx)
    return idx.to(dtype).to(device)


def random_tokens(rows: int, hidden: int, dtype, *, seed: int = 1, device="cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, hidden, generator=g).to(dtype).to(device)


def random_probs(rows: int, cols: int, dtype=torch.float32, *, seed: int = 2, device="cpu") -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(rows, cols, generator=g).to(dtype).to(device)
