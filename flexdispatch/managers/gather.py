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


def all_gather_objects(obj: Any, group, what: str = "the first call of a layer") -> list:
    """Every rank's ``obj`` (picklable), in rank order. A collective: every rank of ``group``
    calls it (on CPU groups a peer that does not arrive is waited for at most the peer
    timeout, see :mod:`.collectives`; ``what`` names the call in that error)."""
    from .collectives import all_gather_single

    device = group_device(group)
    world = dist.get_world_size(group)
    data = pickle.dumps(obj)
    size = torch.tensor([len(data)], dtype=torch.int64, device=device)
    sizes = torch.empty(world, dtype=torch.int64, device=device)
    all_gather_single(sizes, size, group, what=what)
    sizes = sizes.tolist()  # (one host read)
    longest = max(sizes)
    mine = torch.zeros(longest, dtype=torch.uint8)
    mine[:len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    mine = mine.to(device)
    every = torch.empty(world * longest, dtype=torch.uint8, device=device)
    all_gather_single(every, mine, group, what=what)
    every = every.view(world, longest)
    return [pickle.loads(bytes(t[:n].tolist())) for t, n in zip(every, sizes)]
