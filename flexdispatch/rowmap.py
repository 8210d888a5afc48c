"""The permutation plan shared by the kernels (:mod:`flexdispatch.ops`) and the plain
PyTorch ops (:mod:`flexdispatch.reference`), and the routing errors both report."""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch

from . import _kernel_header
from .spec import input_error

_ERROR_BITS = _kernel_header.enum("ErrorBits")  # read from cuda_src/flexdispatch.h
INDEX_OUT_OF_RANGE = _ERROR_BITS["IndexOutOfRange"]  # an index < -1 or >= E
DUPLICATE_INDEX = _ERROR_BITS["DuplicateIndex"]  # the same expert twice in one row
OUTPUT_OVERFLOW = _ERROR_BITS["OutputOverflow"]  # more rows than num_out_tokens allowed
NONFINITE_PROB = _ERROR_BITS["NonFiniteProb"]  # a NaN or infinite prob of a selected expert


# Where things sit in a layout of 3E + 2 entries, as in cuda_src/flexdispatch.h.
def layout_total_index(num_experts: int) -> int:
    """Index of the number of rows used (the last expert offset)."""
    return 3 * num_experts


def layout_error_index(num_experts: int) -> int:
    """Index of the error bits."""
    return 3 * num_experts + 1


@dataclasses.dataclass
class RowIdMap:
    """Where every (row, slot) of a permutation went.

    Attributes:
        map: int32 ``[R, S]``, the output row of slot ``s`` of input row ``r``, or -1 (unused
            slot). ``S`` is the top-k for index routes, ``E`` for multihot routes.
        layout: int64 ``[3E + 2]`` on the tokens' device: counts ``[E]``, padded counts ``[E]``,
            expert offsets ``[E + 1]`` (the last is the number of rows used) and error bits.
        num_experts: ``E``.
        num_out: ``N``, the rows of the permuted tensor (rows used, or the caller's
            ``num_out_tokens``; rows past those used are zero).
        pad_multiple: every expert's rows were padded to a multiple of this (1: no padding).
        host_layout: ``layout`` as the host reads it, when it can without a sync: a CPU
            layout itself, or the CPU copy the op made to size its output (see
            :func:`host_readable_layout`).
    """

    map: torch.Tensor
    layout: torch.Tensor
    num_experts: int
    num_out: int
    pad_multiple: int = 1
    has_tail: bool = False
    host_layout: Optional[torch.Tensor] = None

    @property
    def num_rows(self) -> int:
        return self.map.shape[0]

    @property
    def tokens_per_expert(self) -> torch.Tensor:
        """int64 ``[E]`` on the tokens' device: rows per expert, padding included."""
        e = self.num_experts
        return self.layout[e:2 * e]

    def host_tokens_per_expert(self) -> torch.Tensor:
        """int64 ``[E]`` on the CPU (one device sync unless a host copy exists): a view of the
        host copy of a device layout, which nothing writes; a copy of a CPU layout, which the
        plan's kernels read."""
        e = self.num_experts
        host = self._host()
        return host[e:2 * e] if host is not self.layout else host[e:2 * e].clone()

    def _host(self) -> torch.Tensor:
        if self.host_layout is None:  # (a device layout no op copied: one sync)
            self.host_layout = self.layout.cpu()
        return self.host_layout

    def error_bits(self) -> int:
        return int(self._host()[layout_error_index(self.num_experts)])

    def check(self, route: Optional[torch.Tensor] = None, name: str = "indices") -> None:
        """Raise ValueError if the kernels flagged bad routing or an output overflow (syncs)."""
        bits = self.error_bits()
        if bits:
            raise routing_error(bits, route, self.num_experts, name, self.num_out)


def host_readable_layout(layout: torch.Tensor, host: torch.Tensor) -> Optional[torch.Tensor]:
    """A kernel op's ``layout`` as the host reads it without a sync, from the op's host layout
    output ``host`` (:mod:`flexdispatch._library`): the CPU copy the op made to size a device
    layout's output, a CPU layout itself (read in place: ``host`` is then ``[0]``), or None (a
    device layout the op did not copy: its caller sized the output)."""
    if host.numel():
        return host
    return layout if layout.is_cpu else None


def plan_of(row_map, layout, host, num_experts, num_out, num_out_tokens, pad_multiple) -> RowIdMap:
    """The plan of a kernel op's outputs (:mod:`flexdispatch._library`); ``host`` is the op's
    host layout output (see :func:`host_readable_layout`)."""
    return RowIdMap(map=row_map, layout=layout, num_experts=num_experts, num_out=num_out,
                    pad_multiple=pad_multiple or 1, has_tail=num_out_tokens is not None,
                    host_layout=host_readable_layout(layout, host))


def first_bad_slot(route: torch.Tensor, num_experts: int, probs: Optional[torch.Tensor] = None) -> str:
    """Describe the first invalid entry of an index route ``[R, K]`` (for error messages)."""
    r = route.detach().to("cpu", torch.int64)
    bad = (r < -1) | (r >= num_experts)
    if bad.any():
        row, slot = (int(v) for v in bad.nonzero()[0])
        return (f"value {int(r[row, slot])} at row {row}, slot {slot} is out of range; expected -1 "
                f"(unused) or an expert id in [0, {num_experts})")
    srt = r.sort(dim=1).values
    dup = (srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)
    if dup.any():
        row = int(dup.nonzero()[0, 0])
        return f"row {row} names an expert twice ({r[row].tolist()}); each row must name distinct experts"
    if probs is not None:
        p = probs.detach().to("cpu", torch.float64)
        nonfinite = ~torch.isfinite(p) & (r >= 0)
        if nonfinite.any():
            row, slot = (int(v) for v in nonfinite.nonzero()[0])
            return (f"the probability of expert {int(r[row, slot])} at row {row}, slot {slot} is "
                    f"{float(p[row, slot])}; routing probabilities must be finite")
    return "no invalid entry found"


PROBS_NAMES = {"token_indices": "token_probs"}
"""The name of the probs argument that goes with an index argument's (the dispatcher's top-k
entry); every other entry (the ops' ``indices``, the dispatcher's dense ``probs``) calls its
probs ``probs``."""


def routing_error(bits: int, route: Optional[torch.Tensor], num_experts: int, name: str = "indices",
                  num_out: Optional[int] = None, probs: Optional[torch.Tensor] = None,
                  probs_name: Optional[str] = None) -> ValueError:
    """The ValueError of a kernel's routing error ``bits``, naming the argument: ``name`` for
    the indices, ``probs_name`` (default: :data:`PROBS_NAMES`) for a non-finite probability."""
    if bits & (INDEX_OUT_OF_RANGE | DUPLICATE_INDEX):
        detail = first_bad_slot(route, num_experts) if route is not None and route.dtype != torch.bool else ""
        return input_error(ValueError, name, f"invalid routing: {detail}".rstrip(": "))
    if bits & NONFINITE_PROB:
        probs_name = probs_name or PROBS_NAMES.get(name, "probs")
        detail = first_bad_slot(route, num_experts, probs) if route is not None and probs is not None else ""
        return input_error(ValueError, probs_name, f"non-finite routing probability: {detail}".rstrip(": "))
    if bits & OUTPUT_OVERFLOW:
        return ValueError(f"num_out_tokens={num_out} is smaller than the rows the routing needs; nothing "
                          f"was dropped silently: pass None to size the output exactly")
    return input_error(ValueError, name, f"kernel reported error bits {bits}")


def check_index_route(indices: torch.Tensor, num_experts: int, name: str = "indices") -> None:
    """Raise ValueError for an out-of-range or repeated index (syncs on GPUs)."""
    bits = index_route_error_bits(indices, num_experts)
    if int(bits):
        raise routing_error(int(bits), indices, num_experts, name)


def index_route_error_bits(indices: torch.Tensor, num_experts: int,
                           probs: Optional[torch.Tensor] = None) -> torch.Tensor:
    """0-d int64 tensor of error bits for an index route (and its probs), on its device (no sync)."""
    if indices.numel() == 0:
        return torch.zeros((), dtype=torch.int64, device=indices.device)
    out_of_range = ((indices < -1) | (indices >= num_experts)).any()
    srt = indices.sort(dim=1).values
    duplicate = ((srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)).any()
    bits = out_of_range.long() * INDEX_OUT_OF_RANGE + duplicate.long() * DUPLICATE_INDEX
    if probs is not None:
        in_range = (indices >= 0) & (indices < num_experts)
        bits = bits + (in_range & ~torch.isfinite(probs.detach())).any().long() * NONFINITE_PROB
    return bits
