"""One rank: no communication at all. Dispatch and combine are identities, so a notebook on
one GPU or a laptop runs the same code as a cluster."""

from __future__ import annotations

import torch

from .. import ops
from .base import Dispatched, _ManagerBase, reported_as
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
        num_out, route_sized = self._permuted_rows(hidden_states.shape[0], self.route_is_full)
        if fp8_rows:  # FP8 experts: the rows a transfer would carry, kept for the permutation
            q, scales = ops.quantize_fp8(hidden_states)
            stand_in, _, held = received_fp8_rows(q, scales, hidden_states.dtype, True, False)
            return Dispatched(stand_in, self.token_indices, probs, num_out=num_out, route_sized=route_sized,
                              held=held)
        if self.fp8_dispatch:  # the same rounding as a transfer, so results do not depend on the backend
            hidden_states = ops.fp8_round_trip(hidden_states)
        return Dispatched(hidden_states, self.token_indices, probs, held=LANDED, num_out=num_out,
                          route_sized=route_sized)

    def _permuted_rows(self, num_tokens: int, full: bool) -> tuple:
        """``(rows of the permuted tensor or None, sized by the route)`` for ``num_tokens``
        routed tokens (``full``: :attr:`Routed.full`): the worst case (sync-free), a full
        route's T * K (:meth:`sized_by_route`), or None, sized at the permutation's sync."""
        route_sized = self.sized_by_route(full)
        return (self._worst_case_rows(num_tokens) if self.sync_free else
                num_tokens * self.router_topk if route_sized else None), route_sized

    def route_and_permute(self, dense: torch.Tensor, hidden_states: torch.Tensor, async_finish: bool = False, *,
                          fp8_rows: bool = False):
        """As the base class's, with the top-k selection and the permutation in one operation
        (one autograd node: :func:`flexdispatch.ops.route_and_permute_trusted`) where nothing
        runs between them: routing validated, no capacity, no bound, no FP8, and probs already
        of the dtype the call keeps them in. The call's records are the steps' own."""
        if (not self.validate_routing or self.capacity_factor is not None or self.max_tokens_per_expert is not None
                or self.fp8_dispatch or self.token_probs_dtype(dense.dtype) != dense.dtype):
            return super().route_and_permute(dense, hidden_states, async_finish, fp8_rows=fp8_rows)
        self._expect("setup_metadata", "idle", "routed")
        num_tokens = dense.shape[0]
        self._check_dispatch_input(hidden_states, num_tokens, dense.device)
        num_out, route_sized = self._permuted_rows(num_tokens, True)
        try:
            token_probs, indices, clean, status, out, probs, plan = ops.route_and_permute_trusted(
                dense, hidden_states, self.router_topk, reported_as(1, "probs"), num_out,
                self.moe_router_expert_pad_multiple, self._permutation_reports_as(), route_sized)
        except ValueError:
            self._release()  # bad routing found by the kernels: the dispatcher stays usable
            raise
        self._set_routing(token_probs, indices, names=("probs", "probs"), checked=(clean, status), full=True)
        received = self._dispatch_step(hidden_states, async_finish, async_finish, True, True, False, checked=True)
        out, probs = self._take_permutation(out, probs, plan, received.route_sized, None)
        return out, self.tokens_per_expert, probs

    def _combine(self, hidden_states: torch.Tensor, async_finish: bool,
                 allocate_on_comm_stream: bool) -> torch.Tensor:
        return hidden_states
