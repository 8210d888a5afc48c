"""How a dispatch's received rows reach the permutation.

A backend's ``_dispatch`` returns the received rows themselves (:data:`LANDED`), or leaves them
where a single pass can read them and returns a stand-in of their shape and dtype (zero-stride,
no memory) that carries autograd: rows kept in FP8 (:class:`KeptFp8`, dequantized by the
permutation as it moves them) or rows left in the peers' buffers (:class:`LeftAtPeers`, read
there by the permutation). Each kind permutes itself, with one signature, so the manager's
permutation step makes one call whatever the backend delivered.

``permute(hidden, indices, probs, *, num_experts, num_out_tokens, pad_multiple, max_blocks,
fp8_out, counts_to_host)`` takes the dispatch's returned tensor ``hidden [R, H]`` (rows or
stand-in), the received routing ``indices [R, K]`` (local experts, -1 for none) and ``probs
[R, K]``, and returns as :func:`flexdispatch.ops.permute_by_indices` without the counts (the
manager reads them from the plan when it keeps them): ``(out [N, H], permuted_probs [N],
plan)``; ``out`` is the pair ``(rows [N, H] float8_e4m3fn, scales [N, H / 128] float32)`` when
``fp8_out`` and the rows were kept in FP8 (FP8 experts). ``counts_to_host`` (a size given):
the plan should bring its layout to the host as it runs (``copy_layout`` of
:func:`flexdispatch.ops.permute_by_indices_trusted`); the rows a one-rank manager keeps do,
the others' plans read it with a sync when asked (``RowIdMap.host_tokens_per_expert``).
``report_as``: the argument the permutation's routing errors name, None for a route the manager
checked already (:func:`flexdispatch.ops.permute_by_indices_trusted`).
"""

from __future__ import annotations

import dataclasses

import torch

from .. import ops, peer_ops


class Landed:
    """The received rows are the tensor dispatch returned."""

    returns_stand_in = False

    @staticmethod
    def permute(hidden, indices, probs, *, num_experts, num_out_tokens, pad_multiple, max_blocks, fp8_out,
                counts_to_host=False, report_as="indices"):
        # (the manager checked the rows and its routing: not checked again)
        return ops.permute_by_indices_trusted(hidden, indices, probs, num_experts, num_out_tokens, pad_multiple,
                                              copy_layout=counts_to_host, report_as=report_as)


LANDED = Landed()


@dataclasses.dataclass(frozen=True)
class KeptFp8:
    """Received rows kept in FP8 (``keep_fp8``): ``q [R, H]`` e4m3 bytes and ``scales
    [R, H / 128]`` float32, views of where they landed."""

    q: torch.Tensor
    scales: torch.Tensor
    returns_stand_in = True  # (a class attribute, not a field)

    def permute(self, hidden, indices, probs, *, num_experts, num_out_tokens, pad_multiple, max_blocks, fp8_out,
                counts_to_host=False, report_as="indices"):
        if fp8_out:  # FP8 rows for FP8 experts: bytes and scales moved without conversion
            out_q, out_probs, plan = ops.permute_by_indices_trusted(
                self.q.contiguous().view(torch.uint8), indices, probs, num_experts, num_out_tokens, pad_multiple,
                copy_layout=counts_to_host, report_as=report_as)
            return ((out_q.view(torch.float8_e4m3fn), ops.apply_permutation(self.scales.contiguous(), plan)),
                    out_probs, plan)
        return ops.permute_fp8_by_indices_trusted(self.q, self.scales, indices, probs, num_experts, num_out_tokens,
                                                  pad_multiple, hidden.dtype, hidden, report_as)


@dataclasses.dataclass(frozen=True)
class LeftAtPeers:
    """Received rows not moved yet but readable where they landed (``permute_next``):
    ``addrs [R]`` int64 row addresses in the peers' buffers, aligned to ``align`` bytes;
    ``fp8``: rows of FP8 bytes followed by their scales, dequantized as they are moved;
    ``first_row``: the row the pulls start at (see :func:`flexdispatch.peer_ops.permute_from`)."""

    addrs: torch.Tensor
    align: int
    fp8: bool
    first_row: int
    returns_stand_in = True

    def permute(self, hidden, indices, probs, *, num_experts, num_out_tokens, pad_multiple, max_blocks, fp8_out,
                counts_to_host=False, report_as="indices"):
        permute = peer_ops.permute_fp8_from if self.fp8 else peer_ops.permute_from
        return permute(hidden, self.addrs, self.align, indices, probs, num_experts=num_experts,
                       num_out_tokens=num_out_tokens, pad_multiple=pad_multiple, max_blocks=max_blocks,
                       first_row=self.first_row, report_as=report_as)


def stand_in(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """What dispatch returns for rows it leaves where a single pass can read them: zeros of
    ``shape`` and ``dtype`` with stride 0 (no memory), carrying autograd."""
    return torch.zeros((), dtype=dtype, device=device).expand(shape)


def received_fp8_rows(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype, keep: bool, later: bool):
    """What a dispatch returns for received FP8 rows ``q [R, H]`` and ``scales [R, H / 128]``:
    ``(rows, finish, held)``. ``keep``: ``rows`` is a zero-stride stand-in of dtype ``dtype``
    and ``held`` a :class:`KeptFp8`. Else ``held`` is :data:`LANDED` and ``rows`` are
    dequantized to ``dtype``: now, or, when the transfer lands ``later``, by ``finish()`` (to
    call once it has landed; ``rows`` is allocated now and filled then)."""
    if keep:
        return stand_in(q.shape, dtype, q.device), None, KeptFp8(q, scales)
    if not later:
        return ops.dequantize_fp8(q, scales, dtype), None, LANDED
    rows = torch.empty(q.shape, dtype=dtype, device=q.device)

    def finish():
        rows.copy_(ops.dequantize_fp8(q, scales, dtype))

    return rows, finish, LANDED
