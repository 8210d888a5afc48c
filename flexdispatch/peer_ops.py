"""Rows read through addresses: the kernels of the NVLink manager's transfers.

A transfer names each source row by its address (int64): on CUDA, a row of a peer's symmetric
buffer, which the kernels read over NVLink; on the CPU, a row of a local tensor
(:mod:`flexdispatch.managers.peer_buffers`). These ops trust the addresses they are given:
they are the manager's internals, not a public API. ``align`` is the alignment (bytes, a power
of two) that every address shares; ``max_blocks`` caps the thread blocks a kernel launches
(0: no cap), so that a transfer can leave SMs to concurrent compute. ``first_row`` is the row a
pull starts from (it goes on round to the start): rows arrive grouped by source rank, and ranks
that all read source 0 first, then source 1, would queue on one peer's links at a time; each
reader starting at a different source spreads the reads over every link. The order changes no
result (each row is written to its own rows).

The plain-PyTorch twins of these ops cannot read raw addresses; the tests compare them with
indexing of the tensors the addresses point into.
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _library, ops


def _kernels():
    kernels = _library.kernels()  # (loads them at the first call; None: the plain PyTorch ops serve)
    if kernels is None:
        raise RuntimeError("the NVLink manager needs flexdispatch's compiled kernels (FLEXDISPATCH_JIT=0 or a "
                           "failed build left only the plain PyTorch ops); see `python -m flexdispatch info`")
    return kernels


def copy_rows_from(addrs: torch.Tensor, out: torch.Tensor, align: int, row_id_map: Optional[torch.Tensor] = None,
                   max_blocks: int = 0, first_row: int = 0) -> torch.Tensor:
    """Fill ``out [N, ...]`` (contiguous) with the rows at ``addrs [N]`` (each of ``out``'s row
    size in bytes); with ``row_id_map [N, S]``, row ``r`` goes to ``out`` rows ``map[r, s]``
    (-1: none) and other rows are left as they are. Address 0: no row (a zero row without a
    map, nothing with one). Returns ``out``."""
    _kernels().copy_rows_from(addrs.contiguous(), align, out, row_id_map, max_blocks, first_row)
    return out


def sum_rows_from(addrs: torch.Tensor, out: torch.Tensor, align: int, max_blocks: int = 0) -> torch.Tensor:
    """``out [T, H]`` (float dtype) = the sum, in slot order, of the rows at ``addrs [T, S]``
    (0: none), accumulated in float32 (float64 for float64); a row without a slot is zero."""
    _kernels().sum_rows_from(addrs.contiguous(), align, out, max_blocks)
    return out


# Transfers whose addresses peer_addresses makes (cuda_src/flexdispatch.h, PeerRows).
RECEIVED, RECEIVED_TOKEN, HOME, SENT = 0, 1, 2, 3


def peer_addresses(kind: int, counts: torch.Tensor, rank: int, table: torch.Tensor, row_bytes: int, n: int,
                   map: Optional[torch.Tensor] = None, tokens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """int64 ``[n]``: where entry ``i`` of one call's transfer of ``kind`` lies (0: no row), for
    ``rank``, from ``counts [W, W]`` int64 (rows rank ``s`` sends rank ``d``; rows received are
    ordered by source, a send list by destination) and ``table [W]`` int64 (where each rank's
    part of the exchange starts), in one kernel (no host sync):

    * ``RECEIVED``: received row ``i``, in its source's send-list part;
    * ``RECEIVED_TOKEN``: received row ``i``, in its source's token part, at row
      ``tokens[i, 0]`` (float64 ``[>= n, C]``: the received routing rows);
    * ``HOME``: entry ``t * W + w``, token ``t``'s row in rank ``w``'s received part, from the
      send list's plan ``map`` (int32 ``[T, W]``, -1: not sent there);
    * ``SENT``: row ``i`` of this rank's send list, in its destination's received part.
    """
    return _kernels().peer_addresses(kind, counts, rank, table, row_bytes, n, map, tokens)


def permute_from(rows: torch.Tensor, addrs: torch.Tensor, align: int, indices: torch.Tensor,
                 probs: Optional[torch.Tensor], num_experts: int, num_out_tokens: Optional[int] = None,
                 pad_multiple: Optional[int] = None, max_blocks: int = 0, first_row: int = 0,
                 report_as: Optional[str] = "indices"):
    """The expert-major permutation (as :func:`flexdispatch.ops.permute_by_indices`) of rows
    that are read at ``addrs [R]`` as they are moved: each row is read once (over NVLink for a
    peer's row) and written to its experts' rows. ``rows`` ``[R, H]`` stands for them in shape,
    dtype and autograd (its values are not read).

    Returns ``(out [N, H], permuted_probs [N], plan)``: the manager reads the counts from the
    plan when it keeps them. ``report_as`` as :func:`flexdispatch.ops.permute_by_indices_trusted`
    takes it."""
    return _permute_through(_library.permute_from, rows, addrs, align, indices, probs, num_experts, num_out_tokens,
                            pad_multiple, max_blocks, first_row, report_as)


def permute_fp8_from(rows: torch.Tensor, addrs: torch.Tensor, align: int, indices: torch.Tensor,
                     probs: Optional[torch.Tensor], num_experts: int, num_out_tokens: Optional[int] = None,
                     pad_multiple: Optional[int] = None, max_blocks: int = 0, first_row: int = 0,
                     report_as: Optional[str] = "indices"):
    """The dequantizing permutation (as :func:`flexdispatch.ops.permute_fp8_by_indices`) of FP8
    rows read at ``addrs [R]``: each row is ``H`` e4m3 bytes followed by its ``H / 128`` float32
    scales (0: no row; addresses aligned to ``align`` bytes, at least 8, or 4 for float32 output),
    read once and written dequantized to its experts' rows. ``rows`` ``[R, H]`` of the output
    dtype stands for them in shape, dtype and autograd (its values are not read).

    Returns as :func:`permute_from`."""
    return _permute_through(_library.permute_fp8_from, rows, addrs, align, indices, probs, num_experts,
                            num_out_tokens, pad_multiple, max_blocks, first_row, report_as)


def _permute_through(op, rows, addrs, align, indices, probs, num_experts, num_out_tokens, pad_multiple, max_blocks,
                     first_row, report_as):
    """A permutation whose op (of :mod:`flexdispatch._library`) reads row ``r`` at ``addrs[r]``."""
    probs = ops.checked_index_args(rows.shape[0], indices, probs, num_experts, num_out_tokens, pad_multiple)
    _kernels()
    return ops.run_permutation(op, rows, probs, indices, num_experts, num_out_tokens, pad_multiple, report_as, addrs,
                               align, max_blocks, first_row)
