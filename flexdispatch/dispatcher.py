"""MoEFlexTokenDispatcher: the reference's facade, for both generations of its API.

Notation: H hidden, B micro batch, S sequence, TP tensor-parallel size (1), EP expert-parallel
size, num_local_tokens = S * B / TP.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import socket
import weakref
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

from . import ops
from ._log import logger
from .config import MoEConfig, TokenDispatcherConfig, requested_backend, sm_setting
from . import managers
from .managers import groups, registry
from .managers.base import (RESTORING_STEPS, OutOfOrderError, group_size_rank, reported_as, runs_own_steps,
                            _ManagerBase)
from .managers.gather import all_gather_objects
from .managers.hybridep import HybridEPPipelineRuntimeInitializer, _HybridEPManager, _HybridEPMetadataProcessor
from .managers.sharing import LayerStates
from .spec import CONFIG_NAMES, LayerSpec, check_floating_tensor, input_error

SHARING_DEEPEP_MANAGER = True
"""Dispatchers of one expert-parallel group share their manager (and DeepEP's buffer) when
their settings agree (``moe_share_token_dispatcher``). Unlike the reference, a shared manager
keeps each dispatcher's call state apart."""

_warned: set = set()
_SHARED_SLOTS = {"deepep": "shared_deepep_manager", "hybridep": "shared_hybridep_manager",
                 "uccl_ep": "shared_uccl_manager"}
"""The class attribute each engine's shared manager is published on (Automodel's names); the
first generation's ``shared_comm_manager`` holds flexdispatch's own backends', and, for a
first-generation config (MoEConfig), the last manager published."""
_LAYERS_BUILT: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
"""group -> dispatchers built on it so far: the next one's layer number (weakly keyed: a group
destroyed and a new one at the same address must not share a count)."""
_SHARED: dict = {}
"""(slot, backend, id(group), spec, backend options) -> (manager, weak reference to the group):
every manager shared so far; a slot holds the last one published there. A slot found None
drops its entries."""


def forget_shared_managers() -> None:
    """Unpublish every shared manager (``shared_*_manager``): the class attributes must not keep
    a manager, and with it its process group, alive past :func:`flexdispatch.shutdown` or
    interpreter exit (torch's gloo group aborts the process when it outlives Python)."""
    for slot in ("shared_comm_manager", *_SHARED_SLOTS.values()):
        setattr(MoEFlexTokenDispatcher, slot, None)
    _SHARED.clear()


def shutdown() -> int:
    """Free every communication buffer of this process and forget the shared managers
    (collective: call it on every rank, before ``torch.distributed.destroy_process_group``).
    Returns how many buffers were freed; calling it again is harmless."""
    forget_shared_managers()
    return managers.shutdown()


def _warn_once(message: str) -> None:
    """A fallback warning, once per process and reason (not once per layer and rank)."""
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)


def _as_config(config) -> TokenDispatcherConfig:
    """Accept either config class, or any object with their field names (e.g. Automodel's own
    config): one with ``moe_flex_dispatcher_backend`` reads as the current generation."""
    if isinstance(config, TokenDispatcherConfig):
        return config
    if config is None:
        raise input_error(TypeError, "config", "expected a TokenDispatcherConfig or MoEConfig, got None")
    cls = TokenDispatcherConfig if hasattr(config, "moe_flex_dispatcher_backend") else MoEConfig
    return cls(**{f.name: getattr(config, f.name) for f in dataclasses.fields(cls) if hasattr(config, f.name)})


_DISPATCHER_STEPS = {
    "idle": "dispatch_preprocess (or token_permutation / token_permutation2)",
    "routed": "dispatch_all_to_all",
    "dispatched": "dispatch_postprocess",
    "permuted": "combine_preprocess (or token_unpermutation)",
    "restored": "combine_all_to_all",
}


def _in_dispatcher_terms(method):
    """A manager step called out of order is reported with the dispatcher's method names."""
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except OutOfOrderError as exc:  # (an outer method's wrapper names the method the user called)
            raise OutOfOrderError(f"{method.__name__} called out of order: the next step of this dispatcher is "
                                  f"{_DISPATCHER_STEPS[exc.stage]} (call reset() to abandon a call in progress)",
                                  exc.stage) from None
    return wrapper


def graphs_hold_data_dependent_sizes() -> bool:
    """Whether Dynamo is set to keep a data-dependent output size and the host reads of it in
    its graphs (``torch._dynamo.config.capture_dynamic_output_shape_ops`` and
    ``capture_scalar_outputs`` both on): then a one-rank layer that sizes its permutation on
    the host compiles to one graph."""
    config = torch._dynamo.config
    return bool(config.capture_dynamic_output_shape_ops and config.capture_scalar_outputs)


class _SizedOnHost:
    """A step that sizes the permutation on the host (in every mode but sync-free). Under
    torch.compile it runs whole as one eager call, so a layer's graph breaks once, where the
    layer calls it, and not again in each frame between the layer and the permutation (Dynamo
    cannot resume a graph inside them). It is traced like the rest, and the layer is one graph,
    in sync-free mode; on one rank where the route is full (the top-K of dense probs: T * K
    rows, known without a sync; ``route``: ``"dense"`` for a step that routes the dense probs
    itself, ``"set"`` for one that permutes the routing set before it, None for one given
    indices, which may leave slots unused); and on one rank where Dynamo keeps data-dependent
    sizes in its graphs (:func:`graphs_hold_data_dependent_sizes`). Never with FP8 dispatch,
    which a traced step would run without. Eager code gets the plain method.
    (torch._disable_dynamo is torch.compiler.disable without importing Dynamo before it is
    used.)"""

    def __init__(self, method, route: Optional[str] = None):
        self.method, self.eager, self.route = method, torch._disable_dynamo(method), route
        functools.update_wrapper(self, method)

    def __get__(self, dispatcher, owner=None):
        if dispatcher is None or not torch.compiler.is_compiling():
            return self.method.__get__(dispatcher, owner)
        spec = getattr(dispatcher, "spec", None)
        # Never with FP8 dispatch: traced, the managers' FP8 paths are off (moe_fp8_experts would
        # get dequantized rows, a group's rows would travel unquantized). Else sync-free, or on
        # one rank where the size is the route's or Dynamo keeps it (a group's step reads its
        # exchanges' headers on the host and branches on them).
        fp8, sync_free = (False, False) if spec is None else (spec.fp8_dispatch, spec.sync_free)
        one_rank = dispatcher.ep_size == 1 and (graphs_hold_data_dependent_sizes() or self._sized_by_route(dispatcher))
        return functools.partial(self.method if not fp8 and (sync_free or one_rank) else self.eager, dispatcher)

    def _sized_by_route(self, dispatcher) -> bool:
        """Whether the step's permutation is sized by its route (:meth:`_ManagerBase.sized_by_route`)."""
        manager = getattr(dispatcher, "_comm_manager", None)
        if self.route is None or not isinstance(manager, _ManagerBase):
            return False
        full = manager.dense_routes_stay_full if self.route == "dense" else manager.route_is_full
        return manager.sized_by_route(full)


def _sized_on_host(route: Optional[str] = None):
    """:class:`_SizedOnHost` of a step whose route is ``route``."""
    return lambda method: _SizedOnHost(method, route)


class MoEFlexTokenDispatcher:
    """Flex token dispatcher: DeepEP (or HybridEP, UCCL-EP) on NVLink nodes, flexdispatch's
    NVLink backend, torch.distributed all-to-all anywhere, no communication for one rank.

    Args:
        num_local_experts: experts on this rank, ``num_moe_experts / EP``.
        local_expert_indices: their global ids, ``range(rank * E_local, (rank + 1) * E_local)``.
        config: :class:`~flexdispatch.TokenDispatcherConfig` or :class:`~flexdispatch.MoEConfig`
            (or an object with their fields).
        ep_group: the expert-parallel process group; None (or a group of one) runs on one rank
            without torch.distributed.

    Backend: :func:`flexdispatch.config.requested_backend` says which setting decides.
    ``auto`` picks DeepEP when ``deep_ep`` imports, the tensors are CUDA bfloat16 and the group
    size is one DeepEP supports (decided at the first dispatch, identically on every rank),
    else the NVLink backend for CUDA tensors on an NCCL group of one node, else all-to-all, or
    local for one rank; the choice is logged once per group. An engine named explicitly
    (``deepep``, ``hybridep``, ``uccl_ep``) that does not import raises ImportError, as
    Automodel does; another explicit backend that cannot serve raises ValueError saying why.

    Sharing (``config.moe_share_token_dispatcher``): dispatchers of one backend, group and
    settings use one manager, published on ``shared_deepep_manager`` /
    ``shared_hybridep_manager`` / ``shared_uccl_manager`` (engines) or ``shared_comm_manager``
    (the first generation's name; flexdispatch's backends). Each dispatcher's call state stays
    its own: layers may run their calls interleaved in any order.
    """

    shared_comm_manager = None
    shared_deepep_manager = None
    shared_hybridep_manager = None
    shared_uccl_manager = None
    # Defaults for an instance built without __init__ (the reference's tests do that).
    _comm_manager = None
    _shared = False
    _vetted = False
    hybridep_metadata_processor: Optional[_HybridEPMetadataProcessor] = None
    hidden_shape: Optional[torch.Size] = None
    group = groups.WeakGroup()
    """``ep_group``, held by weak reference: None once destroyed (see managers/groups.py)."""

    def __init__(self, num_local_experts: int, local_expert_indices: List[int], config: TokenDispatcherConfig,
                 ep_group: Optional[dist.ProcessGroup] = None):
        self.config = cfg = _as_config(config)  # its fields were checked when it was built
        ops.load_kernels()  # build them (cold cache) with the model, not inside its first step
        self.group = ep_group
        self.ep_size, self.ep_rank = group_size_rank(ep_group)
        self.tp_size = 1
        # What depends on the group is checked here, once; managers get the frozen result.
        self.spec = LayerSpec.checked(
            names=dict(CONFIG_NAMES, num_experts="config.num_moe_experts"), world_size=self.ep_size,
            num_experts=self.tp_size * cfg.num_moe_experts, num_local_experts=num_local_experts,
            topk=self.tp_size * cfg.moe_router_topk, capacity_factor=cfg.moe_expert_capacity_factor,
            router_dtype=cfg.moe_router_dtype, pad_multiple=cfg.moe_router_expert_pad_multiple,
            sync_free=cfg.moe_sync_free, max_tokens_per_expert=cfg.moe_max_tokens_per_expert,
            validate_routing=cfg.moe_validate_routing, num_sms=sm_setting(cfg, "moe_deepep_num_sms"),
            permute_fusion=cfg.moe_permute_fusion, fp8_dispatch=cfg.moe_fp8_dispatch,
            nvlink_max_blocks=sm_setting(cfg, "moe_nvlink_max_blocks"))
        local = self.spec.num_local_experts
        if self.ep_rank is not None:  # (unknown for a group object that is not a live process group)
            expected_ids = list(range(self.ep_rank * local, (self.ep_rank + 1) * local))
            if [int(i) for i in local_expert_indices] != expected_ids:
                raise ValueError(f"local_expert_indices: rank {self.ep_rank} of {self.ep_size} holds experts "
                                 f"{expected_ids[0]}..{expected_ids[-1]}, got {list(local_expert_indices)}")
        self.num_local_experts = num_local_experts
        self.local_expert_indices = list(local_expert_indices)
        # Owners: everything above is the constructor's and never changes.
        self.shared_experts = None  # the reference's attribute; unused
        self.hidden_shape = None  # each call's preprocess; read by its combine_postprocess
        self._comm_manager = None  # the constructor's, or the first dispatch's (auto); assignable
        self._shared = False  # whether the manager may serve other dispatchers too (see .managers.sharing)
        self._id = id(self)  # (what a shared manager knows its current dispatcher by)
        self._vetted = False  # the first call has checked the group (and settled auto's choice)
        self._combine_async = False  # the last combine_all_to_all left its transfer in flight
        # The constructor's choice: a backend, or the candidate auto probes at the first dispatch,
        # and why auto passed a better one over (said at the first CUDA dispatch).
        requested, self._requested_by = requested_backend(cfg)
        self._choice = registry.choose(requested, ep_group, cfg.moe_router_topk, cfg.moe_enable_deepep,
                                       source=self._requested_by)
        self._fallback_reason: Optional[str] = self._choice.passed_over
        if self._choice.name is not None:
            self._comm_manager = self._obtain_manager(self._choice.name)
        # The layer's number in its group (creation order), sent in every header, and what its
        # ranks must agree on at the first call.
        self._layer_id = 0 if ep_group is None else _LAYERS_BUILT.get(ep_group, 0)
        if ep_group is not None and self.ep_rank is not None:  # (a live process group: weakly keyed)
            _LAYERS_BUILT[ep_group] = self._layer_id + 1
        self._settings = dict(backend=requested, layer=self._layer_id, moe_fp8_experts=cfg.moe_fp8_experts,
                              **{CONFIG_NAMES.get(f.name, f.name): getattr(self.spec, f.name)
                                 for f in dataclasses.fields(self.spec)})
        if self._comm_manager is not None:
            self._introduce(self._comm_manager)
        if isinstance(self._comm_manager, _HybridEPManager):
            self.hybridep_metadata_processor = _HybridEPMetadataProcessor(
                num_experts=self.spec.num_experts, permute_fusion=cfg.moe_permute_fusion,
                compact_routing=cfg.moe_hybridep_compact_routing)

    # ---- the manager ------------------------------------------------------------------------

    def _obtain_manager(self, name: str):
        """This layer's manager of backend ``name``: the shared one when the config shares and
        one of the same backend, group and settings exists, else a new one (published for the
        next layers when sharing)."""
        backend = registry.BACKENDS[name]
        explicit = self._choice.name is not None and backend.build is not None

        def build():
            try:
                return registry.make_manager(name, self.group, self.spec, self.config if explicit else None)
            except ImportError as exc:  # an engine named but missing: say which setting named it
                raise type(exc)(f"{self._requested_by}={name!r}: {exc}") from exc

        if not self.config.moe_share_token_dispatcher:
            return build()
        slot = _SHARED_SLOTS.get(name, "shared_comm_manager")
        published = getattr(MoEFlexTokenDispatcher, slot)
        if published is None:  # nothing published there (or the user cleared it): start afresh
            for key in [k for k in _SHARED if k[0] == slot]:
                del _SHARED[key]
        elif all(published is not m for m, _ in _SHARED.values()):
            return self._share(published)  # a manager the user published: theirs to share
        key = (slot, name, id(self.group), self.spec, tuple(sm_setting(self.config, o) for o in backend.options))
        manager, group_ref = _SHARED.get(key, (None, None))
        if manager is None or (None if group_ref is None else group_ref()) is not self.group:
            manager = build()
            _SHARED[key] = (manager, groups.ref(self.group))
            if isinstance(manager, LayerStates):
                manager.adopt(self)
        setattr(MoEFlexTokenDispatcher, slot, manager)
        if isinstance(self.config, MoEConfig):  # the first generation reads its one name
            MoEFlexTokenDispatcher.shared_comm_manager = manager
        return self._share(manager)

    def _share(self, manager):
        """Take a manager other dispatchers may share (it keeps this layer's state apart)."""
        self._shared = True
        if isinstance(manager, LayerStates):
            manager.watch(self)
        return manager

    def _manager(self):
        """The manager, holding this dispatcher's layer state (a shared manager swaps it in)."""
        manager = self._comm_manager
        if self._shared and isinstance(manager, LayerStates) and manager.serving_key != self._id:
            manager.serve(self)
            self._name_layer(manager)
        return manager

    def _introduce(self, manager) -> None:
        """Name this layer to a manager it owns, or that serves it now (a shared manager learns
        it when it next serves this layer)."""
        if not self._shared or getattr(manager, "serving_key", None) == self._id:
            self._name_layer(manager)

    def _name_layer(self, manager) -> None:
        """Tell the manager which layer its calls are for (it sends the number in its headers)."""
        if isinstance(manager, LayerStates):
            manager.layer_id = self._layer_id

    @groups.one_thread_at_a_time("dispatch_preprocess")  # (the first call's vote is a collective)
    def _manager_for(self, hidden: Optional[torch.Tensor], error: Optional[BaseException]):
        """The manager, after the layer's first call has checked the group (and chosen the
        backend when ``auto`` depends on the tensors).

        That check is the first call's first exchange: every rank sends its layer's settings
        (backend asked for, experts, top-k, FP8, sync-free, bound, ..., and the layer's number
        in the group), whether its own checks failed, its host and, for ``auto``, whether the
        candidate backend can serve its tensors. Ranks that built the layer differently, or a
        failed check, make every rank raise; a candidate passed over by any rank (or a one-node
        backend on several hosts) gives way to the next of ``AUTO_ORDER``, voted on the same way.
        """
        if self._vetted or self.ep_size == 1:
            return self._manager()
        candidate, host = self._choice.candidate, socket.gethostname()
        while True:
            reason = error and "this rank's inputs were invalid"
            if reason is None and candidate is not None:
                reason = registry.auto_passes_over(candidate, self.group, device=hidden.device, dtype=hidden.dtype,
                                                   hidden=hidden.shape[-1], topk=self.config.moe_router_topk)
            votes = all_gather_objects((reason, None if error is None else str(error), host, self._settings),
                                       self.group)
            self._agree_on_settings([v[3] for v in votes])
            failed = [r for r, (_, message, _, _) in enumerate(votes) if message is not None]
            if failed:
                if error is not None:
                    raise type(error)(f"{error} (every rank of the expert-parallel group raises before any token "
                                      f"moved)")
                raise input_error(ValueError, "hidden_states",
                                  f"invalid input on rank(s) {failed} of the expert-parallel group; "
                                  f"every rank raises before any token moved ({votes[failed[0]][1]})")
            if candidate is None:  # (a backend named: nothing to choose)
                self._vetted = True
                return self._manager()
            reasons = [r for r, _, _, _ in votes if r is not None]
            hosts = sorted({h for _, _, h, _ in votes})
            if not reasons and registry.BACKENDS[candidate].one_node and len(hosts) > 1:
                reasons = [f"the expert-parallel group spans {len(hosts)} hosts"]
            if not reasons:
                return self._settle(candidate)
            chosen = registry.fallback(candidate, self.group)
            settled = not registry.BACKENDS[chosen].needs_tensors
            if hidden.is_cuda:  # (CPU tensors go to the all-to-all manager: nothing to warn about)
                _warn_once(f"the {candidate} manager cannot serve this layer ({reasons[0]}); "
                           f"{'using' if settled else 'trying'} the {chosen} manager")
            if settled:
                return self._settle(chosen)
            candidate = chosen

    def _settle(self, name: str):
        self._comm_manager = self._obtain_manager(name)
        self._introduce(self._comm_manager)
        self._vetted = True
        return self._manager()

    def _agree_on_settings(self, every: list) -> None:
        """Raise on every rank, naming the settings and their values per rank, if the ranks
        built this layer differently."""
        differing = [key for key in every[0] if len({repr(s.get(key)) for s in every}) > 1]
        if differing:
            shown = "; ".join(f"{key}: " + ", ".join(f"rank {r}: {s.get(key)!r}" for r, s in enumerate(every))
                              for key in differing)
            what = ("the layers run in a different order on different ranks, or a rank built a layer its peers did "
                    "not (a layer is numbered by the order its dispatcher was built in the group)"
                    if differing == ["layer"] else "the ranks built this layer with different settings")
            raise input_error(ValueError, "config", f"{what} ({shown}); every rank raises before any token moved")

    @property
    def backend(self) -> Optional[str]:
        """"local", "alltoall", "deepep", "nvlink", "hybridep" or "uccl_ep" (None until chosen)."""
        manager = self._comm_manager
        if manager is None:
            return None
        if self._choice.name == "uccl_ep":
            return "uccl_ep"
        return getattr(manager, "name", type(manager).__name__)

    def get_pipeline_runtime_initializers(self, *, hidden_dim: int,
                                          dtype: torch.dtype) -> tuple[HybridEPPipelineRuntimeInitializer, ...]:
        """What must run before a pipeline schedule starts: HybridEP's buffer initialization for
        a HybridEP layer, nothing for the other backends (an empty tuple)."""
        if not isinstance(self._comm_manager, _HybridEPManager):
            return ()
        return (HybridEPPipelineRuntimeInitializer(self._comm_manager, hidden_dim, dtype),)

    # ---- the reference's API ----------------------------------------------------------------

    def _initialize_metadata(self, num_local_tokens: int, probs: torch.Tensor) -> torch.Tensor:
        """Routing probs in the unified ``[T, TP * EP, E_local]`` layout (each expert block
        repeated for every TP rank), so the communication is agnostic of TP and EP sizes."""
        self._check_router_probs(num_local_tokens, probs)
        world = self.tp_size * self.ep_size
        if self.tp_size == 1:  # (the layout is the probs' own)
            return probs.reshape(num_local_tokens, world, self.num_local_experts)
        return (probs.reshape(num_local_tokens, self.ep_size, 1, self.num_local_experts)
                .expand(-1, -1, self.tp_size, -1)
                .reshape(num_local_tokens, world, self.num_local_experts)).contiguous()

    def _check_router_probs(self, num_local_tokens: int, probs: torch.Tensor) -> None:
        """Raise unless ``probs`` holds the router's ``[num_local_tokens, num_moe_experts]`` values."""
        experts = self.config.num_moe_experts
        check_floating_tensor("probs", probs)
        # [T, E], or [..., E] with leading dims of T tokens; a transposed [E, T] or flat
        # [T * E] tensor has the right element count but would be misread.
        if probs.ndim < 1 or probs.shape[-1] != experts or probs.numel() != num_local_tokens * experts:
            raise input_error(ValueError, "probs",
                              f"expected shape [num_local_tokens, num_moe_experts] = [{num_local_tokens}, "
                              f"{experts}] (or [..., {experts}] with {num_local_tokens} tokens), got "
                              f"{tuple(probs.shape)}")

    def _flatten_hidden(self, hidden_states: torch.Tensor, num_local_tokens: int) -> torch.Tensor:
        if not isinstance(hidden_states, torch.Tensor) or hidden_states.ndim < 2:
            raise input_error(ValueError, "hidden_states", "expected a tensor [..., hidden] with at least 2 dims")
        check_floating_tensor("hidden_states", hidden_states)
        if hidden_states.shape[-1] == 0:
            raise input_error(ValueError, "hidden_states",
                              f"expected a hidden size >= 1, got shape {tuple(hidden_states.shape)}")
        if isinstance(num_local_tokens, bool) or not isinstance(num_local_tokens, int) or num_local_tokens < 0:
            raise input_error(ValueError, "num_local_tokens", f"expected an int >= 0, got {num_local_tokens!r}")
        rows = hidden_states.numel() // hidden_states.shape[-1]
        if rows != num_local_tokens:
            raise input_error(ValueError, "num_local_tokens",
                              f"{num_local_tokens} does not match hidden_states "
                              f"{tuple(hidden_states.shape)} ({rows} tokens)")
        self.hidden_shape = hidden_states.shape
        # (a [T, H] input is its own flat form: a reshape would cost a view op a call)
        return hidden_states if hidden_states.ndim == 2 else hidden_states.reshape(-1, hidden_states.shape[-1])

    @_in_dispatcher_terms
    def dispatch_preprocess(self, hidden_states: torch.Tensor, num_local_tokens: int, probs: torch.Tensor):
        """Flatten ``hidden_states [..., H]`` to ``[T, H]`` and take the top-K of ``probs [T, E]``.

        Returns:
            ``(hidden [T, H], token_probs [T, K])``.
        """
        hidden, manager = self._preprocess(hidden_states, num_local_tokens, probs)
        return hidden, manager.token_probs

    @_in_dispatcher_terms
    def dispatch_preprocess2(self, hidden_states: torch.Tensor, num_local_tokens: int, token_probs: torch.Tensor,
                             token_indices: torch.Tensor):
        """As :meth:`dispatch_preprocess`, with routing given as top-K ``token_probs [T, K]`` and
        ``token_indices [T, K]`` (global expert ids, -1 for none)."""
        hidden, manager = self._preprocess(hidden_states, num_local_tokens, token_probs, token_indices)
        return hidden, manager.token_probs

    def _preprocess(self, hidden_states, num_local_tokens, probs, token_indices=None):
        """Flatten and route (dense ``probs [T, E]``, or top-K ``probs`` with ``token_indices``):
        ``(hidden [T, H], manager)``, the manager holding the routing. On a group, a failed check
        is held until the call's first exchange, where every rank raises it together (the hidden
        states are then returned as given, the routing None); alone, it raises here. The one
        body of the preprocess steps and of the one-call entry points."""
        hidden = error = None
        try:
            hidden = self._flatten_hidden(hidden_states, num_local_tokens)
        except (ValueError, TypeError) as exc:
            if self.ep_size == 1:
                raise
            error = exc
        # (a group of one has nothing to vet, and no group to guard)
        manager = self._manager() if self.ep_size == 1 else self._manager_for(hidden, error)
        self._warn_of_fallback(hidden)
        if error is None:
            try:
                self._route(manager, num_local_tokens, probs, token_indices)
            except (ValueError, TypeError) as exc:
                if not hasattr(manager, "defer"):
                    raise
                error = exc
        if error is not None:
            manager.defer(error)  # raises at once for a group of one
            return hidden_states, manager
        return hidden, manager

    def _warn_of_fallback(self, hidden: Optional[torch.Tensor]) -> None:
        """Say once, at the first CUDA call, why auto passed DeepEP over."""
        if self._fallback_reason is not None and hidden is not None and hidden.is_cuda:
            _warn_once(f"DeepEP is not usable here ({self._fallback_reason}); using the {self.backend} manager")
            self._fallback_reason = None

    def _dense_probs(self, num_local_tokens: int, probs: torch.Tensor) -> torch.Tensor:
        """The router's ``probs`` checked and as ``[T, E]`` (for one TP rank the unified layout
        is the probs' own, which a flexdispatch manager takes as they are: no reshape there and
        back)."""
        self._check_router_probs(num_local_tokens, probs)
        return probs if probs.ndim == 2 else probs.reshape(num_local_tokens, probs.shape[-1])

    def _route(self, manager, num_local_tokens: int, probs: torch.Tensor, token_indices) -> None:
        """Give ``manager`` this call's routing (see :meth:`_preprocess`)."""
        if token_indices is not None:
            if hasattr(manager, "set_routing"):
                manager.set_routing(probs, token_indices, num_local_tokens)
            else:  # a manager of the reference's kind: its attributes, as the reference sets them
                manager.token_probs, manager.token_indices = probs, token_indices
            return
        if self.tp_size == 1 and isinstance(manager, _ManagerBase):
            manager.route_dense(self._dense_probs(num_local_tokens, probs))
            return
        dense = self._initialize_metadata(num_local_tokens, probs)
        if isinstance(manager, _ManagerBase) or not hasattr(manager, "set_routing"):
            manager.setup_metadata(num_local_tokens=num_local_tokens, probs=dense)
        else:  # HybridEP: the top-K of the dense probs, selected and checked as by the other managers
            token_probs, token_indices, clean, status = ops.route_topk_trusted(
                dense.reshape(num_local_tokens, self.spec.num_experts), self.spec.topk, 0,
                reported_as(self.ep_size, "probs"))
            manager.set_routing(token_probs, token_indices, num_local_tokens, names=("probs", "probs"),
                                checked=(clean, status))

    @_in_dispatcher_terms
    def dispatch_all_to_all(self, hidden_states: torch.Tensor, probs: torch.Tensor = None, async_finish: bool = True,
                            allocate_on_comm_stream: bool = True):
        """Send tokens to their experts' ranks: ``(hidden [R, H], dispatched_probs [R, K])``.

        With ``async_finish`` the transfer may still be in flight: :meth:`dispatch_postprocess`
        waits for it; any other use of the results needs :meth:`wait` first.
        """
        manager = self._require_manager("dispatch_all_to_all")
        out = manager.dispatch(hidden_states, async_finish, allocate_on_comm_stream)
        return out, manager.dispatched_probs

    @_sized_on_host("set")
    @_in_dispatcher_terms
    def dispatch_postprocess(self, hidden_states: torch.Tensor):
        """Expert-major permutation: ``(tokens [N, H], tokens_per_expert [E_local] int64 (CPU;
        GPU when sync-free), permuted_probs [N])``."""
        return self._postprocess(self._require_manager("dispatch_postprocess"), hidden_states)

    @staticmethod
    def _postprocess(manager, hidden_states: torch.Tensor, fp8_rows: bool = False):
        """The permutation's result in the dispatcher's order (see :meth:`dispatch_postprocess`)."""
        if fp8_rows:  # (a keyword of flexdispatch's managers only)
            tokens, permuted_probs = manager.get_permuted_hidden_states_by_experts(hidden_states, fp8_rows=True)
        else:
            tokens, permuted_probs = manager.get_permuted_hidden_states_by_experts(hidden_states)
        return tokens, manager.get_number_of_tokens_per_expert(), permuted_probs

    @_sized_on_host("dense")
    @_in_dispatcher_terms
    def token_permutation(self, hidden_states: torch.Tensor, num_local_tokens: int,
                          probs: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Preprocess, dispatch and permute: ``(tokens [N, H], tokens_per_expert [E_local], permuted_probs [N])``.
        Dispatch is asynchronous when ``config.moe_deepep_async_dispatch`` says so."""
        manager = self._one_step_manager()
        if manager is None:
            return self._permute_dispatched(*self._preprocess(hidden_states, num_local_tokens, probs))
        # One rank, whose checks raise at once: the manager routes and permutes in one step.
        hidden = self._one_step_rows(hidden_states, num_local_tokens)
        dense = self._dense_probs(num_local_tokens, probs)
        return manager.route_and_permute(dense, hidden, bool(self.config.moe_deepep_async_dispatch),
                                         fp8_rows=self._fp8_rows(manager, hidden))

    def _one_step_rows(self, hidden_states: torch.Tensor, num_local_tokens: int) -> torch.Tensor:
        """The flat ``[T, H]`` rows of a one-step call (:meth:`_one_step_manager`), checked."""
        hidden = self._flatten_hidden(hidden_states, num_local_tokens)
        self._warn_of_fallback(hidden)
        return hidden

    def _one_step_manager(self):
        """The manager, when it routes, dispatches and permutes a call in one step
        (:meth:`_ManagerBase.route_and_permute`, :meth:`_ManagerBase.set_routing_and_permute`):
        one rank and one TP rank, a flexdispatch
        manager running its own steps (see :func:`~.managers.base.runs_own_steps`); else None."""
        if self.ep_size != 1 or self.tp_size != 1:
            return None
        manager = self._manager()
        return manager if isinstance(manager, _ManagerBase) and runs_own_steps(manager) else None

    @_sized_on_host()
    @_in_dispatcher_terms
    def token_permutation2(self, hidden_states: torch.Tensor, num_local_tokens: int, token_probs: torch.Tensor,
                           token_indices: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """As :meth:`token_permutation`, with top-K ``token_probs`` and ``token_indices``."""
        manager = self._one_step_manager()
        if manager is None:
            return self._permute_dispatched(*self._preprocess(hidden_states, num_local_tokens, token_probs,
                                                              token_indices))
        hidden = self._one_step_rows(hidden_states, num_local_tokens)
        return manager.set_routing_and_permute(token_probs, token_indices, num_local_tokens, hidden,
                                               bool(self.config.moe_deepep_async_dispatch),
                                               fp8_rows=self._fp8_rows(manager, hidden))

    def _permute_dispatched(self, hidden: torch.Tensor, manager):
        """Dispatch and permute for the one-call entry points: with ``moe_fp8_experts`` the
        tokens come back as ``(rows [N, H] float8_e4m3fn, scales [N, H / 128])``.

        The transfer is one whose permutation follows at once: received FP8 rows stay in FP8
        and the permutation dequantizes them as it moves them (``keep_fp8``), and a manager
        may leave rows where they landed (``permute_next``); with ``moe_fp8_experts`` they
        stay in FP8 for the experts (``fp8_rows``; the local manager keeps them too)."""
        async_ = bool(self.config.moe_deepep_async_dispatch)
        if not isinstance(manager, _ManagerBase):  # the reference's steps, as the reference runs them
            dispatched, _ = self.dispatch_all_to_all(hidden, async_finish=async_, allocate_on_comm_stream=async_)
            return self.dispatch_postprocess(dispatched)
        fp8_rows = self._fp8_rows(manager, hidden)
        if not runs_own_steps(manager):  # (a step replaced: the steps one by one, as given)
            dispatched = manager.dispatch(hidden, async_, async_, keep_fp8=True, permute_next=True, fp8_rows=fp8_rows)
            return self._postprocess(manager, dispatched, fp8_rows)
        return manager.dispatch_and_permute(hidden, async_, fp8_rows=fp8_rows)

    def _fp8_rows(self, manager, hidden) -> bool:
        """Whether the experts take FP8 rows (``moe_fp8_experts``); differentiable rows are a
        failed check (held until a group's first exchange, raised at once on one rank)."""
        fp8_rows = bool(self.config.moe_fp8_experts)
        if fp8_rows and isinstance(hidden, torch.Tensor) and hidden.requires_grad and torch.is_grad_enabled():
            manager.defer_first(input_error(
                ValueError, "hidden_states",
                "moe_fp8_experts hands the experts FP8 rows, which carry no gradient; call the layer "
                "under torch.no_grad() (inference), or set moe_fp8_experts=False to train (the experts then get "
                "the rows dequantized)"))
        return fp8_rows

    @_in_dispatcher_terms
    def combine_preprocess(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Undo the expert-major permutation: ``[N, H] -> [R, H]``."""
        return self._require_manager("combine_preprocess").get_restored_hidden_states_by_experts(hidden_states)

    @_in_dispatcher_terms
    def combine_all_to_all(self, hidden_states: torch.Tensor, async_finish: bool = True,
                           allocate_on_comm_stream: bool = True) -> torch.Tensor:
        """Return rows to their home ranks and sum them: ``[R, H] -> [T, H]``; with
        ``async_finish``, :meth:`combine_postprocess` (or :meth:`wait`) waits for it."""
        return self._combine(self._require_manager("combine_all_to_all"), hidden_states, async_finish,
                             allocate_on_comm_stream)

    def _combine(self, manager, hidden_states: torch.Tensor, async_finish: bool, allocate_on_comm_stream: bool):
        """The body of :meth:`combine_all_to_all`: a combine left in flight is waited for by
        :meth:`_restore_shape`."""
        self._combine_async = async_finish and manager_waits(manager)
        return manager.combine(hidden_states, async_finish, allocate_on_comm_stream)

    @_in_dispatcher_terms
    def combine_postprocess(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Wait for an async combine and restore the input's leading dims: ``[T, H] -> [..., H]``."""
        return self._restore_shape(hidden_states)

    def _restore_shape(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The body of :meth:`combine_postprocess`."""
        if self._combine_async:
            self._combine_async = False
            self.wait()
        shape = self.hidden_shape
        if len(shape) == 2 and hidden_states.shape[0] == shape[0]:  # (the input was flat: nothing to restore)
            return hidden_states
        return hidden_states.view(tuple(shape[:-1]) + (hidden_states.shape[-1],))

    @_in_dispatcher_terms
    def token_unpermutation(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Restore, combine and reshape: ``[N, H] -> [..., H]``. Combine is asynchronous when
        ``config.moe_deepep_async_dispatch`` says so."""
        async_ = bool(self.config.moe_deepep_async_dispatch)
        manager = self._require_manager("token_unpermutation")
        if isinstance(manager, _ManagerBase) and runs_own_steps(manager, RESTORING_STEPS):
            combined = manager.restore_and_combine(hidden_states, async_)
            self._combine_async = async_ and manager_waits(manager)
            return self._restore_shape(combined)
        hidden = manager.get_restored_hidden_states_by_experts(hidden_states)
        return self._restore_shape(self._combine(manager, hidden, async_, async_))

    def wait(self) -> None:
        """Make the current stream wait for an async dispatch or combine of this dispatcher."""
        if self._comm_manager is not None and hasattr(self._comm_manager, "wait"):
            self._manager().wait()

    def dropped_tokens(self) -> Optional[torch.Tensor]:
        """Assignments dropped by ``moe_max_tokens_per_expert`` since the last report: a 0-d
        int64 tensor on the tokens' device (reading it needs no sync until you ask for its value),
        or None before any bounded permutation."""
        return None if self._comm_manager is None else getattr(self._manager(), "dropped_tokens", None)

    def report_dropped_tokens(self) -> int:
        """Read (one host sync) and clear the count of assignments the bound dropped, and warn
        or raise as ``config.moe_dropped_tokens`` says. Call it where a sync is cheap (after the
        optimizer step, say), outside a CUDA-graph capture. Returns the count. Also raises
        RuntimeError if, in sync-free mode on a group (NVLink manager), the ranks disagreed in a
        call since the last report (found on the device; such calls move no token)."""
        manager = self._manager() if self._comm_manager is not None else None
        faults = getattr(manager, "sync_free_faults", None)
        calls = 0 if faults is None else int(faults)  # (one host read)
        if calls:
            faults.zero_()
            raise RuntimeError(f"config.moe_sync_free: {calls} call(s) since the last report failed: invalid routing "
                               f"on a rank (an expert id out of range or repeated in a row, a non-finite probability), "
                               f"or the ranks of the expert-parallel group disagreed (a check failed on a rank, or "
                               f"they passed different token counts, hidden sizes, dtypes or top-k, or were at "
                               f"different steps); those calls moved no token and their results are invalid. Call "
                               f"reset() and flexdispatch.shutdown() on every rank before the next call")
        counted = self.dropped_tokens()
        if counted is None:
            return 0
        dropped = int(counted)
        counted.zero_()
        if dropped and self.config.moe_dropped_tokens == "raise":
            raise ValueError(f"config.moe_max_tokens_per_expert: {dropped} assignment(s) exceeded the bound of "
                             f"{self.config.moe_max_tokens_per_expert} rows per expert and were dropped")
        if dropped and self.config.moe_dropped_tokens == "warn":
            logger.warning("moe_max_tokens_per_expert=%d dropped %d assignment(s) since the last report",
                           self.config.moe_max_tokens_per_expert, dropped)
        return dropped

    def reset(self) -> None:
        """Abandon a half-finished call (after an exception, say)."""
        self._combine_async = False
        if self._comm_manager is not None and hasattr(self._comm_manager, "reset"):
            self._manager().reset()

    def _require_manager(self, step: str):
        if self._comm_manager is None:
            raise OutOfOrderError(f"{step} called out of order", "idle")
        return self._manager()


def manager_waits(manager) -> bool:
    """Whether ``manager`` may leave a transfer in flight (a manager whose ``wait()`` is the base
    class's no-op never does)."""
    return getattr(type(manager), "wait", _ManagerBase.wait) is not _ManagerBase.wait


def _at_exit() -> None:
    """flexdispatch's one exit hook (registered at import, so it runs after the handlers the
    application registers later): the shared managers forgotten, then :func:`managers.at_exit`."""
    forget_shared_managers()
    managers.at_exit()


atexit.register(_at_exit)
