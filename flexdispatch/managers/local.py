"""One rank: no communication at all. Dispatch and combine are identities, so a notebook on
one GPU or a laptop runs the same code as a cluster."""

from __future__ import annotations

from typing import Optional

import torch

from .. import ops
from .base import Dispatched, _ManagerBase, check_topk_routing, reported_as
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
        runs between them (:meth:`_permutes_as_routed`, and dense probs already of the dtype the
        call keeps its token probs in). The call's records are the steps' own."""
        if not (self._permutes_as_routed() and self.token_probs_dtype(dense.dtype) == dense.dtype):
            return super().route_and_permute(dense, hidden_states, async_finish, fp8_rows=fp8_rows)
        self._expect("setup_metadata", "idle", "routed")
        num_out, route_sized = self._checked_rows(hidden_states, dense, True)
        try:
            token_probs, indices, clean, status, out, probs, plan = ops.route_and_permute_trusted(
                dense, hidden_states, self.router_topk, reported_as(1, "probs"), num_out,
                self.moe_router_expert_pad_multiple, self._permutation_reports_as(), route_sized)
        except ValueError:
            self._release()  # bad routing found by the kernels: the dispatcher stays usable
            raise
        self._set_routing(token_probs, indices, names=("probs", "probs"), checked=(clean, status), full=True)
        return self._permuted_in_one_step(hidden_states, out, probs, plan, num_out, route_sized)

    def set_routing_and_permute(self, token_probs: torch.Tensor, token_indices: torch.Tensor, num_local_tokens: int,
                                hidden_states: torch.Tensor, async_finish: bool = False, *, fp8_rows: bool = False):
        """As the base class's, with the route check and the permutation in one operation
        (:func:`flexdispatch.ops.check_and_permute_trusted`) where nothing runs between them
        (:meth:`_permutes_as_routed`; probs of another dtype than the call keeps are converted
        first, as the routing step converts them). The call's records are the steps' own."""
        if not self._permutes_as_routed():
            return super().set_routing_and_permute(token_probs, token_indices, num_local_tokens, hidden_states,
                                                   async_finish, fp8_rows=fp8_rows)
        self._expect("set_routing", "idle", "routed")
        check_topk_routing(token_probs, token_indices, self.router_topk, num_local_tokens)
        dtype = self.token_probs_dtype(token_probs.dtype)
        token_probs = token_probs if token_probs.dtype == dtype else token_probs.to(dtype)
        indices = token_indices if token_indices.dtype == torch.int64 else token_indices.long()
        num_out, route_sized = self._checked_rows(hidden_states, indices, False)
        try:
            clean, status, out, probs, plan = ops.check_and_permute_trusted(
                hidden_states, indices, token_probs, self.num_experts, num_out, self.moe_router_expert_pad_multiple,
                reported_as(1, "token_indices"), self._permutation_reports_as(), route_sized)
        except ValueError:
            self._release()
            raise
        self._set_routing(token_probs, indices, checked=(clean, status))
        return self._permuted_in_one_step(hidden_states, out, probs, plan, num_out, route_sized)

    def _permutes_as_routed(self) -> bool:
        """Whether nothing runs between the routing and the permutation: routing validated (its
        clean route is what is permuted), no capacity, no bound, no FP8."""
        return (self.validate_routing and self.capacity_factor is None and self.max_tokens_per_expert is None
                and not self.fp8_dispatch)

    def _checked_rows(self, hidden_states, route: torch.Tensor, full: bool) -> tuple:
        """Check ``hidden_states`` as dispatch would for ``route``'s tokens, and return the
        permutation's ``(rows or None, sized by the route)`` (:meth:`_permuted_rows`)."""
        self._check_dispatch_input(hidden_states, route.shape[0], route.device)
        return self._permuted_rows(route.shape[0], full)

    def _permuted_in_one_step(self, hidden_states, out, probs, plan, num_out: Optional[int], route_sized: bool):
        """The dispatch and permutation records of a call routed and permuted in one operation
        (its rows landed as given, as :meth:`_dispatch` hands them to a permutation that
        follows at once), and its ``(tokens, tokens_per_expert, permuted_probs)``."""
        self._record_dispatch(Dispatched(hidden_states, self.token_indices, self.token_probs, held=LANDED,
                                         num_out=num_out, route_sized=route_sized), fp8_rows=False)
        out, probs = self._take_permutation(out, probs, plan, route_sized, None)
        return out, self.tokens_per_expert, probs

    def _combine(self, hidden_states: torch.Tensor, async_finish: bool,
                 allocate_on_comm_stream: bool) -> torch.Tensor:
        return hidden_states
