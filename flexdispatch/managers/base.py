"""The manager interface and the state machine every manager shares.

A manager moves one layer's tokens between ranks: ``setup_metadata`` (top-k of the router's
probs, capacity) -> ``dispatch`` (tokens to the ranks of their experts) ->
``get_permuted_hidden_states_by_experts`` (expert-major rows) -> experts ->
``get_restored_hidden_states_by_experts`` -> ``combine`` (sums back to the home rank).
Subclasses implement only ``_dispatch`` and ``_combine``; the rest lives here.

All state belongs to one manager instance (one per dispatcher), is released after combine,
and a step called out of order raises RuntimeError naming the step expected.
"""

from __future__ import annotations

import abc
import dataclasses
import sys
from typing import NamedTuple, Optional, Union

import torch
import torch.distributed as dist

from .. import ops
from ..spec import MANAGER_NAMES, LayerSpec, check_floating_tensor, expert_capacity, input_error, int_at_least
from ..reference import FP8_GROUP
from ..rowmap import RowIdMap
from . import agreement, groups
from .sharing import LayerStates

_NEXT_STEP = {
    "idle": "setup_metadata (or the dispatcher's dispatch_preprocess / token_permutation)",
    "routed": "dispatch",
    "dispatched": "get_permuted_hidden_states_by_experts",
    "permuted": "get_restored_hidden_states_by_experts",
    "restored": "combine",
}


class BackwardCheck:
    """The agreement of a call's backward exchanges: each sends the call's header with phase
    "backward" first, so a rank that skipped a backward (or reset between forward and
    backward) and went on to its next call meets its peers' backward with an agreed error on
    every rank, not a mismatched transfer. Made at the forward, from the manager's header then."""

    def __init__(self, manager: "_ManagerBase", hidden: torch.Tensor):
        self.manager, self.key = manager, manager.serving_key
        self.values = manager._header(agreement.BACKWARD, hidden)

    def agreed(self, headers) -> bool:
        """Whether every rank's header ``[W, WIDTH]`` (host) agrees; if not, this call's layer
        is realigned to the step every rank continues from."""
        decision = agreement.Agreement(headers)
        agreed = decision.agreed()
        if not agreed:
            self.manager.set_layer_value(self.key, "_step", decision.next_step())
        return agreed

    def raise_disagreement(self, headers) -> None:
        """Raise the error every rank raises for these headers (they disagree)."""
        agreement.Agreement(headers).check(self.manager.rank, None, None, None, self.manager.num_experts,
                                           "in backward (no gradient moved)")
        raise RuntimeError("dispatcher: the ranks' backward exchanges disagree")  # pragma: no cover


class OutOfOrderError(RuntimeError):
    """A step called out of order; ``stage`` is where the call stands (the dispatcher names its
    own next method from it)."""

    def __init__(self, message: str, stage: str):
        super().__init__(message)
        self.stage = stage


class Routed(NamedTuple):
    """A call's routing as checked (``setup_metadata`` / ``set_routing``); the call keeps it
    until its combine (a named tuple: made at every call, it costs a third of a frozen
    dataclass).

    Attributes:
        num_tokens: T, the routed tokens (dispatch's ``hidden_states`` must have as many rows).
        status: the route check's int32 ``[2]`` on the device (None: not validated), sent in the
            call's first exchange or read at the permutation's sizing sync.
        given: ``(indices, probs)`` as the caller gave them, to describe a routing error.
        names: the arguments a routing error names (the caller's: dense ``probs``, or
            ``token_indices`` / ``token_probs``).
        full: every slot names an expert (the top-K of dense probs, no capacity): T * K
            (row, slot) pairs to permute, or a routing error that the call raises.
    """

    num_tokens: int = 0
    status: Optional[torch.Tensor] = None
    given: Optional[tuple] = None
    names: tuple = ("token_indices", "token_probs")
    full: bool = False


NOT_ROUTED = Routed()
"""The routing of no call (idle, or a call whose rank failed before routing)."""


@dataclasses.dataclass
class Dispatched:
    """What a backend's ``_dispatch`` produces; the call keeps it from dispatch to combine.

    Attributes:
        hidden: ``[R, H]`` the received rows (with ``async_finish``, possibly in flight until
            :meth:`_ManagerBase.wait`).
        indices: int64 ``[R, K]``: the local expert of each slot, -1 for none.
        probs: ``[R, K]``: their probs, 0 where the index is -1 (the local manager's, when the
            permutation follows at once: the routing's probs, which it reads only where assigned).
        held: how the received rows are held (:mod:`.received`): :data:`~.received.LANDED`,
            the rows are ``hidden``; else ``hidden`` is a stand-in of their shape and dtype that
            carries autograd, and the permutation reads the rows where they are held (kept in
            FP8, or in the peers' buffers).
        received_counts: rows per local expert before padding (``E_local`` ints, or an int64
            CPU tensor), when the call's exchange told them (no sync needed to size the
            permutation).
        num_out: rows of the permuted tensor when fixed in advance (sync-free worst case; a
            full route's T * K).
        route_sized: ``num_out`` is exactly the rows the route fills (a full route on one
            rank): the permutation has no tail, and copies its counts to the host as it runs.
        for_combine: what the backend's combine needs of this dispatch (its own record: the
            all-to-all manager's rank plan and splits, the NVLink manager's route, DeepEP's
            buffer).
        fp8_rows: the experts take these rows in FP8 (``dispatch(fp8_rows=True)``); set by the base.
    """

    hidden: torch.Tensor
    indices: torch.Tensor
    probs: torch.Tensor
    held: object  # (no default: a default object would be one torch.compile cannot trace)
    received_counts: Optional[Union[torch.Tensor, list]] = None
    num_out: Optional[int] = None
    route_sized: bool = False
    for_combine: object = None
    fp8_rows: bool = False

    @property
    def stand_in(self) -> Optional[torch.Tensor]:
        """The tensor dispatch returned in place of rows that are not in it (kept in FP8, or
        left where they landed), which the permutation must be given back; else None."""
        return self.hidden if self.held.returns_stand_in else None


def _carry_pending(ready: str):
    """For :func:`groups.one_thread_at_a_time` on the steps that run collectives (dispatch:
    ``ready="routed"``; combine: ``"restored"``): two threads at once seen earlier on this rank
    are carried in this call's first exchange, where every rank raises together."""
    def before(manager: "_ManagerBase", guard) -> None:
        error = guard.pending_error()
        if error is not None and manager._deferred is None and manager._stage == ready:
            if ready == "routed":
                manager.defer(error)
            elif manager.exchanges_in_combine:  # (else the next dispatch carries it)
                manager.defer_combine(error)
    return before


def add_to_counter(counter: Optional[torch.Tensor], value: torch.Tensor) -> torch.Tensor:
    """``counter += value`` for a 0-d counter kept on the device across calls (dropped tokens,
    sync-free faults): made once, at its first use, and then updated in place, so compiled
    calls take the same tensor as an input (with a static address for CUDA graphs when Dynamo is
    loaded) instead of keeping a new one. A counter first made inside a compiled graph lives in
    its memory: under torch.compile's reduce-overhead mode, run the layer once eagerly first."""
    if counter is None:
        counter = torch.zeros((), dtype=torch.int64, device=value.device)
        dynamo = sys.modules.get("torch._dynamo")
        if dynamo is not None and not torch.compiler.is_compiling():
            dynamo.mark_static_address(counter)
    return counter.add_(value)


class _DispatchManager(abc.ABC):
    """A manager class to handle dispatch and combine processes for MoE models (the
    reference's abstract interface).

    The metadata getter has two spellings: ``get_dispached_metadata`` (the first generation's)
    and ``get_dispatched_metadata`` (the current one). A subclass implements either; the other
    then calls it. A subclass that implements neither cannot be instantiated, as before.
    """

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        old, new = cls.__dict__.get("get_dispached_metadata"), cls.__dict__.get("get_dispatched_metadata")
        implemented = lambda f: f is not None and not getattr(f, "__isabstractmethod__", False)  # noqa: E731
        if implemented(new) and not implemented(old):
            cls.get_dispached_metadata = lambda self: self.get_dispatched_metadata()
        elif implemented(old) and not implemented(new):
            cls.get_dispatched_metadata = lambda self: self.get_dispached_metadata()

    @abc.abstractmethod
    def setup_metadata(self, routing_map: torch.Tensor, probs: torch.Tensor):
        """Set up metadata of routing_map and probs (the managers' own signatures differ: the
        DeepEP-like ones take ``(num_local_tokens, probs)``, HybridEP's a routing map)."""

    @abc.abstractmethod
    def dispatch(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Dispatch the hidden_states according to the routing (managers add the async flags)."""

    @abc.abstractmethod
    def combine(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Combine the hidden_states after expert processing (managers add the async flags)."""

    @abc.abstractmethod
    def get_dispatched_metadata(self):
        """Get the metadata of the dispatched hidden_states."""

    @abc.abstractmethod
    def get_dispached_metadata(self):
        """The first generation's spelling of :meth:`get_dispatched_metadata`."""

    @abc.abstractmethod
    def get_permuted_hidden_states_by_experts(self, hidden_states: torch.Tensor):
        """Get the permuted hidden states by experts."""

    @abc.abstractmethod
    def get_restored_hidden_states_by_experts(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Get the restored hidden states by experts."""


def check_topk_routing(token_probs, token_indices, topk: int, num_local_tokens: Optional[int] = None) -> None:
    """The argument checks of top-K routing ``token_probs [T, K]`` float and ``token_indices
    [T, K]`` int32/int64 (-1 = none): TypeError or ValueError naming the argument."""
    check_floating_tensor("token_probs", token_probs)
    if not isinstance(token_indices, torch.Tensor) or token_indices.dtype not in (torch.int32, torch.int64):
        raise input_error(TypeError, "token_indices",
                          f"expected an int32 or int64 tensor, got "
                          f"{getattr(token_indices, 'dtype', type(token_indices).__name__)}")
    if token_indices.ndim != 2 or token_indices.shape[1] != topk:
        raise input_error(ValueError, "token_indices",
                          f"expected [num_tokens, topk={topk}], got {tuple(token_indices.shape)}")
    if token_probs.shape != token_indices.shape:
        raise input_error(ValueError, "token_probs",
                          f"expected the shape of token_indices {tuple(token_indices.shape)}, "
                          f"got {tuple(token_probs.shape)}")
    if token_probs.device != token_indices.device:
        raise input_error(ValueError, "token_indices",
                          f"expected token_probs' device {token_probs.device}, got {token_indices.device}")
    if num_local_tokens is not None and token_indices.shape[0] != num_local_tokens:
        raise input_error(ValueError, "num_local_tokens",
                          f"{num_local_tokens} does not match the {token_indices.shape[0]} "
                          f"rows of token_indices")


def reported_as(world_size: int, name: str) -> Optional[str]:
    """The name a route check of a group of ``world_size`` ranks reports its errors under at
    once (raised on the CPU, at the next sync on CUDA): a group of one's; a larger group's
    status travels in its first exchange instead (None)."""
    return name if world_size == 1 else None


PERMUTING_STEPS = ("route_dense", "set_routing", "dispatch", "get_permuted_hidden_states_by_experts")
RESTORING_STEPS = ("get_restored_hidden_states_by_experts", "combine")


def runs_own_steps(manager: "_ManagerBase", steps: tuple = PERMUTING_STEPS) -> bool:
    """Whether ``manager`` runs the base class's ``steps``: none overridden by its class or
    replaced on the instance (as tests that spy on a step do). Only then may the dispatcher's
    one-call entry points run them as one step (:meth:`_ManagerBase.route_and_permute`,
    :meth:`_ManagerBase.set_routing_and_permute`, :meth:`_ManagerBase.dispatch_and_permute` for
    :data:`PERMUTING_STEPS`,
    :meth:`_ManagerBase.restore_and_combine` for :data:`RESTORING_STEPS`); a compiled call
    always does (torch.compile traces the step it is given)."""
    if torch.compiler.is_compiling():
        return True
    cls, own = type(manager), manager.__dict__
    for name in steps:
        if name in own or getattr(cls, name) is not _BASE_STEPS[name]:
            return False
    return True


def group_size_rank(group) -> tuple[int, Optional[int]]:
    """``(size, rank)`` of an expert-parallel group: ``(1, 0)`` for None. A group object that is
    not a live process group (a stand-in with ``size()``, or any group before
    ``torch.distributed`` is initialized) reports its ``size()``, and its rank as None (unknown:
    collectives on it fail at the first call, with a clear error)."""
    if group is None:
        return 1, 0
    if dist.is_available() and dist.is_initialized() and isinstance(group, dist.ProcessGroup):
        return dist.get_world_size(group), dist.get_rank(group)
    size = getattr(group, "size", None)
    size = size() if callable(size) else None
    if isinstance(size, bool) or not isinstance(size, int):
        raise ValueError("group: a process group was given but torch.distributed is not initialized; "
                         "pass None to run on one rank without torch.distributed")
    return size, None


class _ManagerBase(LayerStates, _DispatchManager):
    """Shared state machine. Subclasses implement ``_dispatch`` and ``_combine``.

    Args:
        group: expert-parallel process group, or None for one rank.
        router_topk: K.
        permute_fusion: accepted for compatibility (the fused kernels are always used).
        capacity_factor: per-expert capacity factor (see :class:`~flexdispatch.MoEConfig`).
        num_experts: E across the group.
        num_local_experts: E / W.
        router_dtype: "fp32", "fp64" or None.
        moe_router_expert_pad_multiple: pad every local expert's rows to this multiple.
        sync_free: worst-case sized outputs, no host sync (managers that support it).
        validate_routing: check routing values before the first collective.
        max_tokens_per_expert: the sync-free mode's bound on rows per local expert.
        num_sms: SMs for DeepEP's kernels (the DeepEP manager).
        fp8_dispatch: hidden states travel as FP8 (see ``MoEConfig.moe_fp8_dispatch``).
        spec: the settings above already checked (:class:`~flexdispatch.spec.LayerSpec`, as the
            dispatcher passes them); the other arguments are then ignored.
    """

    name = "base"
    supports_sync_free = False
    exchanges_in_combine = False  # whether combine starts with a header exchange (see agreement)
    group = groups.WeakGroup()  # never kept alive by a manager (see groups)

    def __init__(self, group, router_topk: Optional[int] = None, permute_fusion: bool = False,
                 capacity_factor: Optional[float] = None, num_experts: Optional[int] = None,
                 num_local_experts: Optional[int] = None, router_dtype: Optional[str] = None,
                 moe_router_expert_pad_multiple: Optional[int] = None, *, sync_free: bool = False,
                 validate_routing: bool = True, max_tokens_per_expert: Optional[int] = None,
                 num_sms: int = 20, fp8_dispatch: bool = False, spec: Optional[LayerSpec] = None):
        self.group = group
        self.world_size, self.rank = group_size_rank(group)
        if spec is None and num_experts is None:
            # The reference builds managers with only a group and top-k (tests, subclasses that
            # set the rest later): allowed, but no step runs until the expert count is known.
            self.spec = None
            self.router_topk, self.num_experts, self.num_local_experts = router_topk, None, num_local_experts
            self.capacity_factor, self.router_dtype = capacity_factor, router_dtype
            self.moe_router_expert_pad_multiple, self.permute_fusion = moe_router_expert_pad_multiple, permute_fusion
            self.sync_free, self.max_tokens_per_expert = sync_free, max_tokens_per_expert
            self.validate_routing, self.fp8_dispatch = validate_routing, fp8_dispatch
            self._config_code = 0
            self._new_layer_state()
            return
        if spec is None:  # built directly with the reference's arguments: check them here
            spec = LayerSpec.checked(
                names=MANAGER_NAMES, num_experts=num_experts, world_size=self.world_size,
                num_local_experts=(num_experts // self.world_size
                                   if num_local_experts is None and isinstance(num_experts, int) else num_local_experts),
                topk=router_topk, capacity_factor=capacity_factor, router_dtype=router_dtype,
                pad_multiple=moe_router_expert_pad_multiple, sync_free=sync_free,
                max_tokens_per_expert=max_tokens_per_expert, validate_routing=validate_routing, num_sms=num_sms,
                permute_fusion=permute_fusion, fp8_dispatch=fp8_dispatch)
        elif spec.world_size != self.world_size:
            raise ValueError(f"spec: made for a group of {spec.world_size}, got a group of {self.world_size}")
        if spec.sync_free and not self.supports_sync_free:
            raise ValueError(f"sync_free: the {self.name} manager needs host-side counts for its "
                             f"collectives; use the DeepEP or NVLink manager (one node) or one rank")
        self.spec = spec
        self._config_code = agreement.config_code(self.name, spec)  # (in every header: ranks compare it)
        # The reference's attribute names, read from the spec (never changed after this).
        self.router_topk = spec.topk
        self.num_experts = spec.num_experts
        self.num_local_experts = spec.num_local_experts
        self.capacity_factor = spec.capacity_factor
        self.router_dtype = spec.router_dtype
        self.moe_router_expert_pad_multiple = spec.pad_multiple
        self.permute_fusion = spec.permute_fusion
        self.sync_free = spec.sync_free
        self.max_tokens_per_expert = spec.max_tokens_per_expert
        self.validate_routing = spec.validate_routing
        self.fp8_dispatch = spec.fp8_dispatch
        self._new_layer_state()

    # ---- state ------------------------------------------------------------------------------

    LAYER_STATE = ("token_probs", "token_indices", "dispatched_indices", "dispatched_probs", "handle", "_routed",
                   "_dispatched", "_plan", "_deferred", "_stage", "_step", "tokens_per_expert", "dropped_tokens",
                   "sync_free_faults", "layer_id")
    """Every attribute that belongs to the layer a manager serves: its call in flight (set by
    :meth:`_release`) and what outlives a call (below). A manager shared by several dispatchers
    keeps one set per layer (:mod:`.sharing`)."""

    def _new_layer_state(self) -> None:
        """A new layer's state: no call in flight, no step counted, nothing dropped."""
        # Which layer of the group the calls are for (its dispatcher's creation order; the
        # dispatcher sets it): in every header, so layers called in a different order on
        # different ranks raise instead of exchanging each other's tokens.
        self.layer_id = 0
        # Assignments the bound dropped, summed on the device over calls (no sync to add one);
        # read and cleared by the dispatcher's report_dropped_tokens.
        self.dropped_tokens: Optional[torch.Tensor] = None
        # Sync-free calls of this layer that failed (invalid routing on a rank, or ranks that
        # disagreed), found on the device and summed there; such calls move no token. Read and
        # cleared (raised) by the dispatcher's report_dropped_tokens.
        self.sync_free_faults: Optional[torch.Tensor] = None
        # Calls of this layer finished or abandoned: carried in every header, so ranks that are
        # at different calls of this layer raise instead of mixing their exchanges.
        self._step = 0
        # The last permutation's counts: readable after combine (the reference's API), and
        # cleared by the next call's routing, so no call ever reports another's counts.
        self.tokens_per_expert: Optional[torch.Tensor] = None
        self._release()

    # ---- state ------------------------------------------------------------------------------

    _offered: Optional[torch.Tensor] = None  # dispatch's hidden_states while _dispatch runs, never longer

    def _release(self) -> None:
        """Drop the call in flight (autograd keeps what backward needs).

        Owners: the call, from routing to combine: the reference's attributes ``token_probs``,
        ``token_indices`` (routing), ``dispatched_indices``, ``dispatched_probs``, ``handle``
        (dispatch) and the records ``_routed`` (:class:`Routed`) and ``_dispatched``
        (:class:`Dispatched`); ``_plan``, from the permutation to the restore; ``_deferred``, from
        this rank's failed check to the call's first exchange. ``tokens_per_expert`` is set by
        the call's permutation and cleared by the next call's routing (:meth:`_set_routing`).
        """
        self.token_probs: Optional[torch.Tensor] = None
        self.token_indices: Optional[torch.Tensor] = None
        self.dispatched_indices: Optional[torch.Tensor] = None
        self.dispatched_probs: Optional[torch.Tensor] = None
        self.handle = None
        self._routed = NOT_ROUTED
        self._dispatched: Optional[Dispatched] = None
        self._plan: Optional[RowIdMap] = None
        self._deferred: Optional[BaseException] = None
        self._stage = "idle"

    def reset(self) -> None:
        """Forget a half-finished call (for example after an exception in the experts).

        Within a group, reset() is local: if this rank abandons a call that its peers go on
        with, the next exchange of this layer on every rank sees ranks at different steps and
        raises RuntimeError on every rank (no hang, no mixed data; the DeepEP manager's combine
        is the exception, see its docs); after every rank has called reset(), the layer's next
        call realigns the steps and runs normally.
        """
        self.wait()
        if self._stage != "idle":
            self._advance_step()
        self._release()
        self.tokens_per_expert = None

    def _advance_step(self) -> None:
        """Count a finished or abandoned call, for the headers of groups. A group of one has no
        exchange and does not count (torch.compile would specialize on the count and compile
        the layer again at every step)."""
        if self.world_size > 1:
            self._step += 1

    def defer(self, error: BaseException) -> None:
        """Hold this rank's failed check of the current call until the call's first exchange,
        where every rank of the group learns of it and raises (groups of one raise at once)."""
        if self.world_size == 1:
            raise error
        self._release()
        self.tokens_per_expert = None
        self._deferred = error
        self._stage = "routed"

    def _header(self, phase: int, hidden: Optional[torch.Tensor], error: int = 0, rows: int = 0) -> list[int]:
        arg = 0
        if self._deferred is not None:
            error |= agreement.INPUT_ERROR
            arg = agreement.argument_code(self._deferred)
        return agreement.make_header(phase, self._step, hidden if self._deferred is None else None,
                                     self.router_topk, error, arg, rows, self.layer_id, self._config_code)

    def agree(self, headers, when: str) -> None:
        """Go on if every rank's header agrees; else every rank releases the call, realigns its
        step and raises the same error."""
        decision = agreement.Agreement(headers)
        try:
            route, probs = self._routed.given or (self.token_indices, self.token_probs)
            decision.check(self.rank, self._deferred, route, probs, self.num_experts, when, self._routed.names)
        except Exception:
            self._step = decision.next_step()
            self.wait()
            self._release()
            if decision.threads_ranks():  # every rank saw it: the group's next calls raise at once
                groups.announce(self)
            raise

    def count_fault(self, ok: torch.Tensor, key: Optional[int] = None) -> None:
        """Add a failed sync-free call (``ok``: 0-d bool on the device, False when it failed) to
        the layer of dispatcher ``key`` (None: the layer served now; a backward may run while
        a shared manager serves another layer)."""
        counter = add_to_counter(self.layer_value(key, "sync_free_faults"), (~ok).long())
        self.set_layer_value(key, "sync_free_faults", counter)

    def _expect(self, step: str, *stages: str) -> None:
        # (A destroyed group is found by the steps that run collectives: see one_thread_at_a_time.)
        if self.spec is None:
            raise ValueError(f"num_experts: {step} needs the layer's expert count; this manager was built without "
                             f"num_experts (pass num_experts=E, or build it through MoEFlexTokenDispatcher)")
        if self._stage not in stages:
            raise OutOfOrderError(f"{step} called out of order: the next step of this manager is "
                                  f"{_NEXT_STEP[self._stage]} (call reset() to abandon a call in progress)",
                                  self._stage)

    def wait(self) -> None:
        """Block the current stream until an async dispatch or combine has landed (no-op here)."""

    # ---- routing ----------------------------------------------------------------------------

    def setup_metadata(self, num_local_tokens: int, probs: torch.Tensor):
        """Top-K of the router's dense ``probs`` (``[T, E]`` after reshape).

        Sets ``token_probs [T, K]`` (router dtype) and ``token_indices [T, K]`` int64, with -1
        for assignments dropped by capacity.
        """
        self._expect("setup_metadata", "idle", "routed")
        tokens = int_at_least("num_local_tokens", num_local_tokens, 0)
        check_floating_tensor("probs", probs)
        if probs.numel() != tokens * self.num_experts:
            raise input_error(ValueError, "probs",
                              f"expected num_local_tokens * num_experts = {tokens} * {self.num_experts} "
                              f"elements, got shape {tuple(probs.shape)}")
        experts = self.num_experts
        self.route_dense(probs if probs.ndim == 2 and probs.shape[1] == experts else probs.reshape(tokens, experts))

    def route_dense(self, dense: torch.Tensor) -> None:
        """:meth:`setup_metadata` of the router's ``probs [T, E]`` (float, 2-D, this layer's E)
        as checked by the caller: the dispatcher's routing step, which has checked them against
        its own arguments."""
        self._expect("setup_metadata", "idle", "routed")
        # The selection and its check in one pass (ties to the lower expert: ops.route_topk_trusted).
        token_probs, token_indices, clean, status = ops.route_topk_trusted(
            dense, self.router_topk, 0, reported_as(self.world_size, "probs") if self.validate_routing else None)
        self._set_routing(token_probs, token_indices, names=("probs", "probs"), checked=(clean, status), full=True)

    def set_routing(self, token_probs: torch.Tensor, token_indices: torch.Tensor,
                    num_local_tokens: Optional[int] = None) -> None:
        """Routing given as top-K ``token_probs [T, K]`` and ``token_indices [T, K]`` (-1 = none)."""
        self._expect("set_routing", "idle", "routed")
        check_topk_routing(token_probs, token_indices, self.router_topk, num_local_tokens)
        self._set_routing(token_probs, token_indices)

    def _set_routing(self, token_probs: torch.Tensor, token_indices: torch.Tensor,
                     names: tuple = ("token_indices", "token_probs"), checked: Optional[tuple] = None,
                     full: bool = False) -> None:
        """``names``: the arguments a routing error names (the caller's: dense ``probs``, whose
        top-k indices cannot be wrong, or ``token_indices`` / ``token_probs``); ``checked``: the
        route check's ``(clean, status)`` when the top-k selection made it (see setup_metadata);
        ``full``: the top-k selection made the indices, so every slot names an expert until
        capacity drops some (:attr:`Routed.full`)."""
        indices = token_indices if token_indices.dtype == torch.int64 else token_indices.long()
        status = given = None
        if self.validate_routing:
            # Before capacity, which could drop a repeated expert's copy or rank a NaN first.
            # (Sync-free groups agree on the status on the device, or count it as a fault.)
            given = (indices, token_probs)
            indices, status = checked or self._check_route(indices, token_probs, names[0])
        if self.capacity_factor is not None:
            indices = self._apply_capacity(token_probs, indices)
        dtype = self.token_probs_dtype(token_probs.dtype)
        if token_probs.dtype != dtype:
            token_probs = token_probs.to(dtype)
        self.tokens_per_expert = None  # the previous call's counts must never leak into this one
        self.token_probs = token_probs
        self.token_indices = indices.contiguous()
        self._routed = Routed(indices.shape[0], status, given, names, full and self.dense_routes_stay_full)
        self._stage = "routed"

    def token_probs_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """The dtype the call keeps routing probs of ``dtype`` in (``token_probs``, and the
        permuted probs): float64 for ``router_dtype="fp64"``, else float32, or float64 probs
        kept as they are unless ``router_dtype="fp32"``."""
        if self.router_dtype == "fp64":
            return torch.float64
        return torch.float64 if dtype == torch.float64 and self.router_dtype != "fp32" else torch.float32

    def _check_route(self, indices: torch.Tensor, probs: torch.Tensor, name: str):
        """``(indices with bad entries -1, status)``: one kernel, no host sync. Groups of one on
        the CPU raise here (naming ``name``); elsewhere the status travels in the first exchange
        (or, on one GPU, is read at the permutation's sizing sync)."""
        # (arguments checked by the routing step that calls this: not checked again)
        return ops.check_route_trusted(indices, self.num_experts, 0, probs, reported_as(self.world_size, name))

    def _apply_capacity(self, probs: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Drop (index -> -1) zero-probability assignments and, per expert, those past its
        capacity, lowest probability first (ties: the later token). No host sync."""
        tokens, k = indices.shape
        experts = self.num_experts
        capacity = expert_capacity(tokens, k, experts, self.capacity_factor)
        p = probs.detach().float().flatten()
        valid = (indices >= 0) & (indices < experts) & (probs.detach() != 0)
        flat = torch.where(valid, indices, experts).flatten()
        by_prob = torch.argsort(p, descending=True, stable=True)  # ties keep token order
        order = by_prob[torch.argsort(flat[by_prob], stable=True)]
        sorted_experts = flat[order]
        # (not bincount, whose output size depends on the values: torch.compile would break there)
        counts = torch.zeros(experts + 1, dtype=torch.int64, device=flat.device).scatter_add_(
            0, flat, torch.ones_like(flat))
        rank = torch.arange(flat.numel(), device=flat.device) - (torch.cumsum(counts, 0) - counts)[sorted_experts]
        keep = torch.empty_like(valid.flatten())
        keep[order] = (rank < capacity) & (sorted_experts < experts)
        # Out-of-range indices stay as they are, for validation to report.
        bad = (indices < -1) | (indices >= experts)
        return torch.where(keep.view(tokens, k) | bad, indices, -1)

    def _padded_counts(self, counts, device: torch.device) -> tuple[torch.Tensor, int]:
        """``(tokens_per_expert, permuted rows)`` from per-local-expert counts known on the host
        (a list of ints or a CPU tensor): padded, on the host (pinned where a GPU will read it).
        Plain Python arithmetic: a handful of ints, no tensor ops."""
        pad = self.moe_router_expert_pad_multiple or 1
        counts = counts.tolist() if isinstance(counts, torch.Tensor) else counts
        padded = [(int(c) + pad - 1) // pad * pad for c in counts]
        return torch.tensor(padded, dtype=torch.int64, pin_memory=device.type == "cuda"), sum(padded)

    def _indices_to_multihot(self, indices: torch.Tensor, probs: torch.Tensor):
        """The reference's conversion of dispatched ``indices [R, K]`` (local experts, -1 for
        none) and ``probs [R, K]``: ``(routing_map [R, E_local] bool, probs [R, E_local]
        float32)`` (flexdispatch's kernel; the permutation itself needs no multihot form)."""
        return ops.indices_to_multihot(indices, probs.float(), self.num_local_experts)

    @staticmethod
    def _masked_probs(indices: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """``probs`` with 0 where ``indices`` is -1 (the reference's dispatched probs): a compare,
        the zero's fill and a select on CUDA, one operation in backward (out-of-place
        ``masked_fill`` copies the probs first: three device operations, two in backward). A
        0-dim CPU zero would be copied to the device instead, which graph capture refuses."""
        return torch.where(indices >= 0, probs, 0.0)

    # ---- the steps --------------------------------------------------------------------------

    def route_and_permute(self, dense: torch.Tensor, hidden_states: torch.Tensor, async_finish: bool = False, *,
                          fp8_rows: bool = False):
        """:meth:`route_dense` of ``dense [T, E]`` then :meth:`dispatch_and_permute` of
        ``hidden_states [T, H]``: a one-rank dispatcher's ``token_permutation``, its arguments
        checked (a group's ranks hold a failed check until the call's first exchange: they run
        the steps). A manager may run the routing and the permutation as one operation."""
        self.route_dense(dense)
        return self.dispatch_and_permute(hidden_states, async_finish, fp8_rows=fp8_rows)

    def set_routing_and_permute(self, token_probs: torch.Tensor, token_indices: torch.Tensor, num_local_tokens: int,
                                hidden_states: torch.Tensor, async_finish: bool = False, *, fp8_rows: bool = False):
        """:meth:`set_routing` then :meth:`dispatch_and_permute`, as :meth:`route_and_permute`
        for routing given as top-K ``token_probs`` and ``token_indices`` (a one-rank
        dispatcher's ``token_permutation2``)."""
        self.set_routing(token_probs, token_indices, num_local_tokens)
        return self.dispatch_and_permute(hidden_states, async_finish, fp8_rows=fp8_rows)

    @groups.one_thread_at_a_time(before=_carry_pending("routed"))
    def dispatch(self, hidden_states: torch.Tensor, async_finish: bool = False,
                 allocate_on_comm_stream: bool = False, *, keep_fp8: bool = False,
                 permute_next: bool = False, fp8_rows: bool = False) -> torch.Tensor:
        """Send every token to each rank that holds one of its experts.

        Args:
            hidden_states: ``[T, H]``.
            async_finish: return before the transfer lands where the manager supports it; the
                next step (or :meth:`wait`) waits for it.
            allocate_on_comm_stream: DeepEP only (allocate outputs on its stream).
            keep_fp8: with FP8 dispatch, leave the received rows in FP8 and dequantize them in
                the permutation, one pass instead of two (the all-to-all and DeepEP managers).
                The returned tensor is then a stand-in (zeros, no memory of its own) that must
                be passed on to :meth:`get_permuted_hidden_states_by_experts` unread. The
                dispatcher's one-call entry points (``token_permutation``) use it.
            permute_next: the permutation follows at once, with nothing in between (the
                dispatcher's one-call entry points): a manager may then leave the rows where
                they landed and let the permutation read them (the NVLink manager's rows stay
                in its peers' buffers). The same contract as ``keep_fp8`` for the returned
                tensor. On one rank ``dispatched_probs`` then keeps the probs of unassigned slots.

        Returns:
            ``[R, H]``, one row per (token, destination rank). Sets ``dispatched_indices [R, K]``
            (local expert or -1), ``dispatched_probs [R, K]`` (0 where -1) and, unless
            sync-free, ``tokens_per_expert [E_local]`` int64 on the CPU.
        """
        self._expect("dispatch", "routed")
        return self._dispatch_step(hidden_states, async_finish, allocate_on_comm_stream, keep_fp8, permute_next,
                                   fp8_rows).hidden

    @groups.one_thread_at_a_time("dispatch", before=_carry_pending("routed"))
    def dispatch_and_permute(self, hidden_states: torch.Tensor, async_finish: bool = False, *,
                             fp8_rows: bool = False):
        """:meth:`dispatch` with ``keep_fp8`` and ``permute_next`` (allocating on the
        communication stream when ``async_finish``), then
        :meth:`get_permuted_hidden_states_by_experts` of the tensor it returned, as one step:
        the dispatcher's one-call entry points (``token_permutation``), which hand the one to
        the other unread. Each check runs once.

        Returns:
            ``(tokens [N, H], tokens_per_expert [E_local] int64, permuted_probs [N])`` as the
            two steps return them.
        """
        self._expect("dispatch", "routed")
        received = self._dispatch_step(hidden_states, async_finish, async_finish, True, True, fp8_rows)
        self.wait()
        out, probs = self._permute_received(received.hidden, fp8_rows)
        return out, self.tokens_per_expert, probs

    def _dispatch_step(self, hidden_states, async_finish: bool, allocate_on_comm_stream: bool, keep_fp8: bool,
                       permute_next: bool, fp8_rows: bool) -> Dispatched:
        """The body of :meth:`dispatch` (stage checked by the caller): the call's
        :class:`Dispatched` record."""
        if self._deferred is None:
            try:
                self._check_dispatch_input(hidden_states, self._routed.num_tokens, self.token_indices.device)
            except (ValueError, TypeError) as exc:
                self.defer(exc)  # groups of one raise here
        # fp8_rows: the permutation hands FP8 rows to the experts (the dispatcher's
        # moe_fp8_experts); every manager then keeps the received rows in FP8.
        fp8 = self.fp8_dispatch and not torch.compiler.is_compiling()
        fp8_rows = fp8_rows and fp8
        keep_fp8 = (keep_fp8 or fp8_rows) and fp8
        self._offered = hidden_states  # (a rank whose check failed still sizes its part by it)
        try:
            result = self._dispatch(None if self._deferred is not None else hidden_states, async_finish,
                                    allocate_on_comm_stream, keep_fp8, permute_next, fp8_rows)
        finally:
            self._offered = None
        return self._record_dispatch(result, fp8_rows)

    def _record_dispatch(self, result: Dispatched, fp8_rows: bool) -> Dispatched:
        """Keep a dispatch's record for the call (``fp8_rows``: the experts take FP8 rows)."""
        result.fp8_rows = fp8_rows
        self._dispatched = result
        self.dispatched_indices, self.dispatched_probs = result.indices, result.probs
        self._stage = "dispatched"
        return result

    def _check_dispatch_input(self, hidden_states, num_tokens: int, device: torch.device) -> None:
        """Raise unless ``hidden_states`` are the rows of the ``num_tokens`` routed tokens on the
        routing's ``device`` (and rows FP8 dispatch can carry)."""
        if not isinstance(hidden_states, torch.Tensor) or hidden_states.ndim != 2:
            raise input_error(ValueError, "hidden_states",
                              f"expected a 2-D tensor [num_tokens, hidden], got "
                              f"{tuple(hidden_states.shape) if isinstance(hidden_states, torch.Tensor) else type(hidden_states).__name__}")
        check_floating_tensor("hidden_states", hidden_states)
        if hidden_states.shape[0] != num_tokens:
            raise input_error(ValueError, "hidden_states",
                              f"expected {num_tokens} rows (the routed tokens), got {hidden_states.shape[0]}")
        if hidden_states.device != device:
            raise input_error(ValueError, "hidden_states",
                              f"expected the routing's device {device}, got {hidden_states.device}")
        if self.fp8_dispatch:
            if hidden_states.dtype not in ops.FP8_DTYPES:
                raise input_error(TypeError, "hidden_states",
                                  f"FP8 dispatch takes float32, float16 or bfloat16, got "
                                  f"{hidden_states.dtype}")
            if hidden_states.shape[1] % FP8_GROUP:
                raise input_error(ValueError, "hidden_states",
                                  f"FP8 dispatch needs a hidden size that is a multiple of {FP8_GROUP}, "
                                  f"got {hidden_states.shape[1]}")

    def get_permuted_hidden_states_by_experts(self, hidden_states: torch.Tensor, *, fp8_rows: bool = False):
        """Expert-major rows of the dispatched tokens.

        Returns:
            ``(tokens [N, H], permuted_probs [N])``: expert 0's rows first, ascending dispatched
            row inside an expert; ``permuted_probs`` float64 when ``router_dtype="fp64"``. With
            a pad multiple, pad rows are zero with prob 0 and ``tokens_per_expert`` counts them.
            ``fp8_rows`` (after ``dispatch(fp8_rows=True)``): ``tokens`` is the pair ``(rows
            [N, H] float8_e4m3fn, scales [N, H / 128] float32)``, moved without conversion (pad
            and unused rows: zero bytes, scale 0); not differentiable.
        """
        self._expect("get_permuted_hidden_states_by_experts", "dispatched")
        self.wait()
        received = self._dispatched
        self._check_rows(hidden_states, received.indices.shape[0], "the dispatched rows")
        stand_in = received.stand_in
        if stand_in is not None and hidden_states is not stand_in:
            self._release()
            raise input_error(ValueError, "hidden_states",
                              "expected the tensor this call's dispatch returned (with "
                              "keep_fp8 or permute_next its rows stay where they landed until the permutation)")
        return self._permute_received(hidden_states, fp8_rows)

    def _permute_received(self, hidden_states: torch.Tensor, fp8_rows: bool):
        """The body of :meth:`get_permuted_hidden_states_by_experts`, ``hidden_states`` being
        what this call's dispatch returned: ``(tokens, permuted_probs)``."""
        received = self._dispatched
        indices, num_out, host_counts = self.dispatched_indices, received.num_out, None
        if received.received_counts is not None:  # known from this call's exchange: no sync
            host_counts, padded_rows = self._padded_counts(received.received_counts, indices.device)
            num_out = padded_rows if num_out is None else num_out
        if self.max_tokens_per_expert is not None:
            indices = self._apply_bound(indices)
            pad = self.moe_router_expert_pad_multiple or 1
            num_out = self.num_local_experts * (-(-self.max_tokens_per_expert // pad) * pad)
        try:
            out, probs, plan = received.held.permute(
                hidden_states, indices, self.dispatched_probs, num_experts=self.num_local_experts,
                num_out_tokens=num_out, pad_multiple=self.moe_router_expert_pad_multiple,
                max_blocks=self.spec.nvlink_max_blocks, fp8_out=fp8_rows and received.fp8_rows,
                counts_to_host=received.route_sized, report_as=self._permutation_reports_as())
            return self._take_permutation(out, probs, plan, received.route_sized, host_counts)
        except ValueError:
            self._release()  # bad routing found by the kernels: the dispatcher stays usable
            raise

    def _permutation_reports_as(self) -> Optional[str]:
        """The argument the permutation's routing errors name; None where there is nothing left
        to find: one rank's route was checked at the call's routing (bad entries -1 since) and,
        sized sync-free (the worst case or the bound), the permutation takes no error word. (A
        sync's sizing or a route-sized host copy reads the pending ones.)"""
        return None if self.world_size == 1 and self.validate_routing and self.sync_free else "indices"

    def _take_permutation(self, out, probs: torch.Tensor, plan: RowIdMap, route_sized: bool, host_counts):
        """Keep a permutation's plan and counts for the call, and return ``(tokens,
        permuted_probs)`` as :meth:`get_permuted_hidden_states_by_experts` does; ``host_counts``:
        padded counts the call's exchange told (None: read from the plan)."""
        if route_sized:  # (every row used: no tail for the restore to skip)
            plan.has_tail = False
        if self.sync_free:
            tokens_per_expert = plan.tokens_per_expert
        elif host_counts is not None:
            tokens_per_expert = host_counts
        else:  # (the host copy that sized the permutation, or that a route-sized one made)
            tokens_per_expert = plan.host_tokens_per_expert()
        self.tokens_per_expert = tokens_per_expert
        if self.router_dtype == "fp64":
            probs = probs.double()
        self._plan = plan
        self._stage = "permuted"
        return out, probs

    def get_restored_hidden_states_by_experts(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Inverse permutation: ``[N, H] -> [R, H]``, the copies of a row summed in a fixed order
        (unweighted: the experts applied the probs); pad rows dropped."""
        self._expect("get_restored_hidden_states_by_experts", "permuted")
        self._check_rows(hidden_states, self._plan.num_out, "the permuted rows")
        check_floating_tensor("hidden_states", hidden_states)
        out = ops.unpermute_trusted(hidden_states, self._plan)
        self._plan = None
        self._stage = "restored"
        return out

    @groups.one_thread_at_a_time(before=_carry_pending("restored"))
    def combine(self, hidden_states: torch.Tensor, async_finish: bool = False,
                allocate_on_comm_stream: bool = False) -> torch.Tensor:
        """Sum every token's rows back on its home rank: ``[R, H] -> [T, H]``; releases the
        call's metadata."""
        self._expect("combine", "restored")
        try:
            self._check_rows(hidden_states, self._dispatched.indices.shape[0], "the dispatched rows")
        except ValueError as exc:
            self.defer_combine(exc)
        return self._combine_step(hidden_states, async_finish, allocate_on_comm_stream)

    @groups.one_thread_at_a_time("combine", before=_carry_pending("permuted"))
    def restore_and_combine(self, hidden_states: torch.Tensor, async_finish: bool = False) -> torch.Tensor:
        """:meth:`get_restored_hidden_states_by_experts` of the experts' rows ``[N, H]``, then
        :meth:`combine` of what it returned (allocating on the communication stream when
        ``async_finish``), as one step: the dispatcher's ``token_unpermutation``. ``[T, H]``."""
        return self._combine_step(self.get_restored_hidden_states_by_experts(hidden_states), async_finish,
                                  async_finish)

    def _combine_step(self, hidden_states: torch.Tensor, async_finish: bool,
                      allocate_on_comm_stream: bool) -> torch.Tensor:
        """The body of :meth:`combine`, its input checked."""
        out = self._combine(hidden_states, async_finish, allocate_on_comm_stream)
        tokens_per_expert = self.tokens_per_expert
        self._release()
        self._advance_step()
        self.tokens_per_expert = tokens_per_expert
        return out

    def defer_first(self, error: BaseException) -> None:
        """:meth:`defer` ``error`` unless this call already holds a failed check (the first one
        found is the one every rank raises)."""
        if self._deferred is None:
            self.defer(error)

    def defer_combine(self, error: BaseException) -> None:
        """A failed check of combine's input: raised at once by a group of one, else carried in
        the combine's first exchange (managers that have one) so that every rank raises."""
        if self.world_size == 1 or not self.exchanges_in_combine:
            self.reset()
            raise error
        self._deferred = error

    def get_dispatched_metadata(self):
        """``(dispatched_indices [R, K], dispatched_probs [R, K])``."""
        return self.dispatched_indices, self.dispatched_probs

    def get_number_of_tokens_per_expert(self) -> Optional[torch.Tensor]:
        """int64 ``[E_local]`` rows per local expert, padding included (CPU; GPU when sync-free)."""
        return self.tokens_per_expert

    @staticmethod
    def _check_rows(hidden_states, rows: int, what: str) -> None:
        if not isinstance(hidden_states, torch.Tensor) or hidden_states.ndim != 2:
            raise input_error(ValueError, "hidden_states", "expected a 2-D tensor [rows, hidden]")
        if hidden_states.shape[0] != rows:
            raise input_error(ValueError, "hidden_states",
                              f"expected {rows} rows ({what}), got {hidden_states.shape[0]}")

    # ---- for subclasses ---------------------------------------------------------------------

    @abc.abstractmethod
    def _dispatch(self, hidden_states: Optional[torch.Tensor], async_finish: bool,
                  allocate_on_comm_stream: bool, keep_fp8: bool, permute_next: bool,
                  fp8_rows: bool) -> Dispatched:
        """Move this call's routed tokens (``hidden_states`` None: this rank's check failed;
        take part in the first exchange, where every rank raises). ``keep_fp8``: FP8 rows may
        be held undequantized (``Dispatched.held``, see :func:`.received.received_fp8_rows`);
        ``permute_next``: rows may be left where they landed (held :class:`.received.LeftAtPeers`);
        ``fp8_rows``: the experts take the rows in FP8 (``keep_fp8`` is then set too)."""

    @abc.abstractmethod
    def _combine(self, hidden_states: torch.Tensor, async_finish: bool,
                 allocate_on_comm_stream: bool) -> torch.Tensor:
        """Move rows home and sum them."""

    def _apply_bound(self, indices: torch.Tensor) -> torch.Tensor:
        """``indices [R, K]`` (local experts, -1 unused) with every expert's assignments past
        ``max_tokens_per_expert`` set to -1, keeping each expert's first rows in ascending row
        order (the permutation's order); the count dropped is added to ``dropped_tokens``.
        Stream-ordered torch ops only: no host sync, capturable in a CUDA graph."""
        experts, bound = self.num_local_experts, self.max_tokens_per_expert
        key = torch.where(indices >= 0, indices, experts).flatten()
        order = torch.argsort(key, stable=True)  # a row's slots name distinct experts: row order
        counts = torch.zeros(experts + 1, dtype=torch.int64, device=key.device).scatter_add_(
            0, key, torch.ones_like(key))
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.empty_like(key)
        rank[order] = torch.arange(key.numel(), device=key.device) - starts[key[order]]
        drop = (rank >= bound) & (key < experts)
        dropped = drop.sum()
        self.dropped_tokens = add_to_counter(self.dropped_tokens, dropped)
        return torch.where(drop.view_as(indices), -1, indices)

    @property
    def dense_routes_stay_full(self) -> bool:
        """Whether the top-K of dense probs stays a full route (:attr:`Routed.full`): no
        capacity drops a slot."""
        return self.capacity_factor is None

    @property
    def route_is_full(self) -> bool:
        """Whether the call's routing names an expert in every slot (:attr:`Routed.full`)."""
        return self._routed.full

    sizes_full_routes = False
    """Whether a full route's permuted rows are known without a sync (T * K: the local manager,
    which receives every routed row)."""

    def sized_by_route(self, full: bool) -> bool:
        """Whether this call's permutation is sized by the route's shape rather than a sync: a
        full route (:attr:`Routed.full`) on a manager that :attr:`sizes_full_routes`, without a
        pad multiple (whose padded counts are data), and not sync-free (sized for the worst
        case). The counts the call returns on the host then cost one wait, for a copy of the
        plan's layout queued before the rows move (``counts_to_host``), and torch.compile
        traces the step."""
        return (full and self.sizes_full_routes and not self.sync_free
                and (self.moe_router_expert_pad_multiple or 1) == 1)

    def _worst_case_rows(self, received_rows: int) -> int:
        """Rows of the permuted tensor that no routing can exceed (sync-free sizing)."""
        pad = self.moe_router_expert_pad_multiple or 1
        per_row = min(self.router_topk, self.num_local_experts)
        return received_rows * per_row + self.num_local_experts * (pad - 1)


_BASE_STEPS = {name: getattr(_ManagerBase, name) for name in PERMUTING_STEPS + RESTORING_STEPS}
"""The base class's steps, as :func:`runs_own_steps` compares a manager's with them."""
