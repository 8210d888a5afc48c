"""Small Python objects gathered from every rank of a group, without NumPy.

``torch.distributed.all_gather_object`` decodes through ``Tensor.numpy()``, so it fails where
NumPy is not installed (``pip install flexdispatch`` does not bring it). The first call of a
layer gathers a few short strings (``auto``'s vote, the NVLink backend's host check): two small
all-gathers of bytes do it here.
"""

from __future__ import annotations

import pickle
from typing import Any

import torch
import torch.distributed as dist


def group_device(group) -> torch.device:
    """Where a group's collectives take tensors: the current CUDA device for NCCL, else CPU."""
    if "nccl" in str(dist.get_backend(group)).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_objects(obj: Any, group) -> list:
    """Every rank's ``obj`` (picklable), in rank order. A collective: every rank of ``group``
    calls it."""
    device = group_device(group)
    world = dist.get_world_size(group)
    data = pickle.dumps(obj)
    size = torch.tensor([len(data)], dtype=torch.int64, device=device)
    sizes = [torch.empty_like(size) for _ in range(world)]
    dist.all_gather(sizes, size, group=group)
    sizes = torch.cat(sizes).tolist()  # (one host read)
    longest = max(sizes)
    mine = torch.zeros(longest, dtype=torch.uint8)
    mine[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    mine = mine.to(device)
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine, group=group)
    return [pickle.loads(bytes(t[:n].tolist())) for t, n in zip(every, sizes)]
