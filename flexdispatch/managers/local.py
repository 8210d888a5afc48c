"""One rank: no communication at all. Dispatch and combine are identities, so a notebook on
one GPU or a laptop runs the same code as a cluster."""

from __future__ import annotations

import torch

from .. import ops
from .base import Dispatched, _ManagerBase
from .received import LANDED, received_fp8_rows


class _LocalManager(_ManagerBase):
    """The manager for an expert-parallel group of one rank (or no group at all).

    Routing values are validated by the permutation kernels (at the call's one host sync: the
    one that sizes the permuted tensor, or for a full route, whose T * K rows need no sizing,
    the one that reads the counts; in sync-free mode, at the next sync, see
    :func:`flexdispatch.ops.check_pending_errors`).
    """

    name = "local"
    supports_sync_free = True
    sizes_full_routes = True

    def _dispatch(self, hidden_states: torch.Tensor, async_finish: bool, allocate_on_comm_stream: bool,
                  keep_fp8: bool, permute_next: bool = False, fp8_rows: bool = False) -> Dispatched:
        # With the permutation next (the one-call entry points), the probs go to it unmasked: it
        # reads only assigned slots and gives the others a zero gradient, as the mask would, so
        # the mask's three device operations (one in backward) are spared.
        probs = self.token_probs if permute_next else self._masked_probs(self.token_indices, self.token_probs)
        # Sized for the worst case (sync-free), by a full route (T * K rows), or at the
        # permutation's sync.
        route_sized = self.sized_by_route(self.route_is_full)
        num_out = (self._worst_case_rows(hidden_states.shape[0]) if self.sync_free else
                   hidden_states.shape[0] * self.router_topk if route_sized else None)
        if fp8_rows:  # FP8 experts: the rows a transfer would carry, kept for the permutation
            q, scales = ops.quantize_fp8(hidden_states)
            stand_in, _, held = received_fp8_rows(q, scales, hidden_states.dtype, True, False)
            return Dispatched(stand_in, self.token_indices, probs, num_out=num_out, route_sized=route_sized,
                              held=held)
        if self.fp8_dispatch:  # the same rounding as a transfer, so results do not depend on the backend
            hidden_states = ops.fp8_round_trip(hidden_states)
        return Dispatched(hidden_states, self.token_indices, probs, held=LANDED, num_out=num_out,
                          route_sized=route_sized)

    def _combine(self, hidden_states: torch.Tensor, async_finish: bool,
                 allocate_on_comm_stream: bool) -> torch.Tensor:
        return hidden_states
