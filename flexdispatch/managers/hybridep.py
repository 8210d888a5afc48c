"""HybridEP (DeepEP's hybrid-ep branch, ``deep_ep.HybridEPBuffer``) as NeMo Automodel drives it.

HybridEP permutes inside its dispatch: ``hybrid_ep_dispatch`` takes a dense routing map
``[T, E]`` bool and probs ``[T, E]`` and returns expert-major rows ``[N, H]``, their probs
``[N]`` and ``tokens_per_expert [E_local]``; ``hybrid_ep_combine`` undoes both. Its buffers are
fixed-extent: every rank must dispatch the same number of tokens, a multiple of 4 (its
metadata all-gather moves 16-byte units of 4-byte entries), so a rank pads its tokens to the
group's aligned maximum with rows routed nowhere, and combine cuts them off.

This module is Automodel's manager (same constructor, methods and attributes; the engine
functions are read from the ``flexdispatch`` package at the call, as Automodel's module reads
its globals) with flexdispatch's additions: the collective that finds the group's maximum
token count is an all-gather of each rank's agreement header (the same one collective), so a
rank whose inputs are invalid, or ranks that disagree on hidden size, dtype, top-k or step,
make every rank raise before HybridEP moves anything; routing is validated (range, repeats,
non-finite probs) without a host sync; several layers may share one manager
(:mod:`.sharing`). Untested on a real HybridEP build: the tests drive it through a stand-in of
HybridEP's documented API.
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from .. import envs, ops
from ..spec import input_error
from . import agreement, gather, groups
from .base import NOT_ROUTED, Routed, _DispatchManager, group_size_rank, check_topk_routing, reported_as
from .deepep import EngineUnavailableError
from .sharing import LayerStates

# Automodel's names, underscores included (its module exports them; so does flexdispatch's).
__all__ = ["_HybridEPManager", "_HybridEPMetadataProcessor", "HybridEPPipelineRuntimeInitializer",
           "_HYBRIDEP_TOKEN_ALIGNMENT", "_STATIC_ROUTING_PAD_PIN"]

_HYBRIDEP_TOKEN_ALIGNMENT = 4
"""Per-rank token counts are padded to a multiple of this (HybridEP's metadata all-gather
asserts 16-byte parts of 4-byte entries)."""
_STATIC_ROUTING_PAD_PIN = envs.static_routing_pad_pin()
"""Automodel's module constant, read at import as there: with ``moe_benchmark_static_routing``
the group's padded token count is exchanged once and pinned (``NEMO_STATIC_ROUTING_PAD_PIN=0``:
exchanged every call)."""


def _engine(name: str):
    import flexdispatch as package  # (patchable there, as Automodel's module globals are)

    return getattr(package, name)


def indices_to_multihot(indices: torch.Tensor, probs: torch.Tensor, num_experts: int):
    """``(routing_map [T, E] bool, multihot_probs [T, E] float32)`` of top-k ``indices [T, K]``
    (-1 for none) and ``probs [T, K]``: flexdispatch's multihot kernel (gradients flow to probs)."""
    return ops.indices_to_multihot(indices, probs.float(), num_experts)


class _HybridEPMetadataProcessor(nn.Module):
    """Top-k routing to what HybridEP's dispatch takes, with fixed shapes (capturable).

    Args:
        num_experts: E, the global expert count.
        permute_fusion: accepted (flexdispatch's multihot kernel is always used).
        compact_routing: return the top-k indices themselves (HybridEP's compact routing)
            instead of a dense map; the probs are dense ``[T, E]`` either way.
    """

    def __init__(self, *, num_experts: int, permute_fusion: bool, compact_routing: bool = False) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.permute_fusion = permute_fusion
        self.compact_routing = compact_routing

    def forward(self, token_indices: torch.Tensor, token_probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``token_indices [T, K]`` (-1 for none), ``token_probs [T, K]`` -> ``(routing [T, E]
        bool, or token_indices [T, K] when compact; probs [T, E] float32)``."""
        routing_map, probs = indices_to_multihot(token_indices, token_probs, self.num_experts)
        return (token_indices if self.compact_routing else routing_map), probs


class _HybridEPManager(LayerStates, _DispatchManager):
    """HybridEP's manager: dispatch permutes, combine unpermutes (see the module docstring).

    Args are Automodel's: the expert-parallel ``group``, ``num_local_experts``, ``num_experts``
    (E), ``router_topk`` (K), ``permute_fusion`` (accepted), ``moe_hybridep_num_sms`` (SMs of
    dispatch and combine), the HybridEP kernel options (permute fusion, compact routing, SMs of
    preprocessing, blocks of permute and unpermute) and ``benchmark_static_routing``.

    Raises:
        ImportError: HybridEP does not import here (``flexdispatch.hybrid_ep_dispatch`` is None).
    """

    name = "hybridep"
    group = groups.WeakGroup()  # never kept alive by a manager (see groups)
    LAYER_STATE = ("token_probs", "token_indices", "routing_map", "handle", "num_permuted_tokens",
                   "num_unpadded_tokens", "tokens_per_expert", "dispatched_probs", "_routed", "_deferred",
                   "_step", "_static_target_tokens", "_static_num_permuted_tokens",
                   "layer_id")

    def __init__(self, group, num_local_experts: int, num_experts: int, router_topk: int, permute_fusion: bool = False,
                 moe_hybridep_num_sms: int = 24, moe_hybridep_permute_fusion: bool = False,
                 moe_hybridep_compact_routing: bool = False, moe_hybridep_num_sms_preprocessing: Optional[int] = None,
                 moe_hybridep_num_blocks_permute: Optional[int] = None,
                 moe_hybridep_num_blocks_unpermute: Optional[int] = None, benchmark_static_routing: bool = False) -> None:
        self.group = group
        self.world_size, self.rank = group_size_rank(group)
        self.num_local_experts = num_local_experts
        self.num_experts = num_experts
        self.router_topk = router_topk
        self.permute_fusion = permute_fusion
        self.moe_hybridep_num_sms = moe_hybridep_num_sms
        self.moe_hybridep_permute_fusion = moe_hybridep_permute_fusion
        self.moe_hybridep_compact_routing = moe_hybridep_compact_routing
        self.moe_hybridep_num_sms_preprocessing = moe_hybridep_num_sms_preprocessing
        self.moe_hybridep_num_blocks_permute = moe_hybridep_num_blocks_permute
        self.moe_hybridep_num_blocks_unpermute = moe_hybridep_num_blocks_unpermute
        self.benchmark_static_routing = benchmark_static_routing
        self.pad_multiple: Optional[int] = None  # rows of each expert rounded up to this (set by the dispatcher)
        self.router_dtype: Optional[str] = None  # "fp64": permuted probs returned as float64 (set by the dispatcher)
        self._new_layer_state()
        if _engine("hybrid_ep_dispatch") is None:
            raise EngineUnavailableError(
                "HybridEP is not installed. Please install HybridEP package from "
                "https://github.com/deepseek-ai/DeepEP/tree/hybrid-ep (or let flexdispatch choose one of its own "
                "backends: moe_flex_backend='auto', or FLEXDISPATCH_BACKEND=auto)")

    def _options(self) -> tuple:
        return (self.num_experts, self.num_local_experts, self.router_topk, self.pad_multiple,
                self.moe_hybridep_compact_routing, self.moe_hybridep_permute_fusion)

    def _new_layer_state(self) -> None:
        self.layer_id = 0  # the layer's creation order in its group, in every header (see _ManagerBase)
        self._step = 0
        self._static_target_tokens: Optional[int] = None  # the pinned padded count (static routing)
        self._static_num_permuted_tokens = None
        self.tokens_per_expert = None
        self._release()

    def _release(self) -> None:
        """Drop the call in flight (autograd keeps what backward needs).

        Owners: the call, from routing to combine: the reference's attributes (``token_probs``,
        ``token_indices``, ``routing_map``, ``handle``, ``num_permuted_tokens``,
        ``num_unpadded_tokens``, ``dispatched_probs``) and ``_routed``; ``_deferred``, from this
        rank's failed check to the dispatch's exchange. The layer keeps ``_step``,
        ``tokens_per_expert`` (until the next call) and the static-routing pins."""
        self.token_probs: Optional[torch.Tensor] = None
        self.token_indices: Optional[torch.Tensor] = None
        self.routing_map: Optional[torch.Tensor] = None
        self.handle = None
        self.num_permuted_tokens = None
        self.num_unpadded_tokens: Optional[int] = None
        self.dispatched_probs: Optional[torch.Tensor] = None
        self._routed = NOT_ROUTED
        self._deferred: Optional[BaseException] = None

    def reset(self) -> None:
        """Forget a half-finished call (after an exception, say); the next call's header tells
        the peers, which raise if they went on."""
        if self.handle is not None or self._deferred is not None:
            self._step += 1 if self.world_size > 1 else 0
        self._release()

    def defer(self, error: BaseException) -> None:
        """Hold this rank's failed check until the dispatch's exchange (a group of one raises now)."""
        if self.world_size == 1:
            raise error
        self._release()
        self._deferred = error

    # ---- routing ------------------------------------------------------------------------------

    def setup_metadata(self, routing_map: torch.Tensor, probs: torch.Tensor):
        """A dense routing map ``[T, E]`` bool and probs ``[T, E]`` (any shape of T * E)."""
        num_tokens = routing_map.shape[0]
        self.token_indices = None
        self.routing_map = routing_map.reshape(num_tokens, self.num_experts)
        self.token_probs = probs.reshape(num_tokens, self.num_experts)

    def _indices_to_multihot(self, indices: torch.Tensor, probs: torch.Tensor):
        """``(routing_map [T, E] bool, probs [T, E] float32)`` of top-k ``indices`` and ``probs``."""
        return indices_to_multihot(indices, probs, self.num_experts)

    def setup_metadata_from_indices(self, token_indices: torch.Tensor, token_probs: torch.Tensor):
        """Top-k routing ``token_indices [T, K]`` (-1 for none) and ``token_probs [T, K]``."""
        self.token_indices = None
        self.routing_map, self.token_probs = self._indices_to_multihot(token_indices, token_probs)

    def set_routing(self, token_probs: torch.Tensor, token_indices: torch.Tensor,
                    num_local_tokens: Optional[int] = None, names: tuple = ("token_indices", "token_probs"),
                    checked: Optional[tuple] = None) -> None:
        """flexdispatch's routing entry (the dispatcher's): checked top-k routing, validated on
        the device (bad entries dropped here, reported in the dispatch's exchange); ``names``:
        the arguments an error names (``("probs", "probs")`` for top-k taken of dense probs);
        ``checked``: the route check's ``(clean, status)`` when the top-k selection made it
        (:func:`flexdispatch.ops.route_topk_trusted`, reported under ``names[0]``)."""
        check_topk_routing(token_probs, token_indices, self.router_topk, num_local_tokens)
        indices, status = checked or ops.check_route_trusted(token_indices.long(), self.num_experts, 0, token_probs,
                                                             reported_as(self.world_size, names[0]))
        # Invalid routing is reported by the status (in the dispatch's exchange on a group): route
        # nothing meanwhile, so the multihot conversion never meets a repeated expert.
        indices = torch.where(status[0] != 0, -1, indices)
        routing, probs = indices_to_multihot(indices, token_probs, self.num_experts)
        self.routing_map, self.token_probs = (None, probs) if self.moe_hybridep_compact_routing else (routing, probs)
        self.token_indices = indices if self.moe_hybridep_compact_routing else None
        self._routed = Routed(token_indices.shape[0], status, (token_indices, token_probs.detach()), names)

    # ---- the steps ----------------------------------------------------------------------------

    def _padded_token_count(self, hidden_states: Optional[torch.Tensor], num_tokens: int) -> int:
        """The group's largest token count, rounded up to the alignment; the one exchange of a
        call, which carries every rank's header, so a failed check or a disagreement raises on
        every rank before HybridEP's collectives."""
        if self.benchmark_static_routing and _STATIC_ROUTING_PAD_PIN and self._static_target_tokens is not None \
                and self._static_target_tokens >= num_tokens:
            return self._static_target_tokens
        arg, error = 0, 0
        if self._deferred is not None:
            error, arg = agreement.INPUT_ERROR, agreement.argument_code(self._deferred)
        values = agreement.make_header(agreement.DISPATCH, self._step, None if self._deferred else hidden_states,
                                       self.router_topk, error, arg, num_tokens, self.layer_id,
                                       agreement.config_code(self.name, self._options()))
        device = gather.group_device(self.group)
        like = torch.empty(0, 1, dtype=torch.int64, device=device)
        status = self._routed.status
        header = ops.make_header(like, values, None if status is None else status.to(device))
        headers = agreement.gather_headers(header, self.world_size, self.group,
                                           f"step {self._step} of this layer, dispatch (the header exchange)")
        decision = agreement.Agreement(headers)
        try:
            route, probs = self._routed.given or (None, None)
            decision.check(self.rank, self._deferred, route, probs, self.num_experts, "(no token moved)",
                           self._routed.names)
        except Exception:
            self._step = decision.next_step()
            self._release()
            raise
        largest = int(headers[:, agreement.ROWS].max())
        target = -(-largest // _HYBRIDEP_TOKEN_ALIGNMENT) * _HYBRIDEP_TOKEN_ALIGNMENT
        if self.benchmark_static_routing and _STATIC_ROUTING_PAD_PIN:
            self._static_target_tokens = target
            logging.getLogger("flexdispatch").info("benchmark_static_routing: HybridEP pad size pinned at %d tokens",
                                                  target)
        return target

    def dispatch(self, hidden_states: torch.Tensor, async_finish: bool = True,
                 allocate_on_comm_stream: bool = True) -> torch.Tensor:
        """Send tokens to their experts' ranks and permute them there: ``[T, H] -> [N, H]``
        expert-major (``async_finish`` / ``allocate_on_comm_stream``: not offered by HybridEP)."""
        self.num_permuted_tokens = (self._static_num_permuted_tokens if self.benchmark_static_routing else None)
        if self._deferred is None and (not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 2):
            self.defer(input_error(ValueError, "hidden_states", "expected a 2-D tensor [num_tokens, hidden]"))
        num_tokens = hidden_states.shape[0] if self._deferred is None else 0
        if self.token_probs is not None and self.token_probs.dtype != torch.float32:
            self.token_probs = self.token_probs.float()
        self.num_unpadded_tokens = None
        if self.world_size > 1:
            target = self._padded_token_count(hidden_states, num_tokens)
            pad = target - num_tokens
            if pad > 0:
                self.num_unpadded_tokens = num_tokens
                hidden_states = nn.functional.pad(hidden_states, (0, 0, 0, pad))
                if self.routing_map is not None:
                    self.routing_map = nn.functional.pad(self.routing_map, (0, 0, 0, pad))
                if self.token_indices is not None:
                    self.token_indices = nn.functional.pad(self.token_indices, (0, 0, 0, pad), value=-1)
                self.token_probs = nn.functional.pad(self.token_probs, (0, 0, 0, pad))
        options = dict(topk_idx=self.token_indices, num_experts=self.num_experts if self.token_indices is not None else None,
                       fuse_permute=self.moe_hybridep_permute_fusion or None,
                       num_sms_preprocessing_api=self.moe_hybridep_num_sms_preprocessing,
                       num_blocks_permute=self.moe_hybridep_num_blocks_permute,
                       num_blocks_unpermute=self.moe_hybridep_num_blocks_unpermute)
        rows, self.dispatched_probs, _, tokens_per_expert, self.handle = _engine("hybrid_ep_dispatch")(
            x=hidden_states, routing_map=self.routing_map, probs=self.token_probs, group=self.group,
            num_local_experts=self.num_local_experts, num_sms_dispatch_api=self.moe_hybridep_num_sms,
            num_sms_combine_api=self.moe_hybridep_num_sms, num_permuted_tokens=self.num_permuted_tokens,
            pad_multiple=self.pad_multiple, **{k: v for k, v in options.items() if v is not None})
        self.tokens_per_expert = tokens_per_expert
        self.num_permuted_tokens = tokens_per_expert.sum()
        if self.benchmark_static_routing and self._static_num_permuted_tokens is None:
            self._static_num_permuted_tokens = self.num_permuted_tokens
        return rows

    def combine(self, hidden_states: torch.Tensor, async_finish: bool = True,
                allocate_on_comm_stream: bool = True) -> torch.Tensor:
        """Unpermute and return rows home, summed: ``[N, H] -> [T, H]`` (padding cut off)."""
        extra = {"fuse_permute": True} if self.moe_hybridep_permute_fusion else {}
        out = _engine("hybrid_ep_combine")(x=hidden_states, handle=self.handle,
                                           num_permuted_tokens=self.num_permuted_tokens,
                                           pad_multiple=self.pad_multiple, **extra)
        if self.num_unpadded_tokens is not None:
            out = out[:self.num_unpadded_tokens]
        tokens_per_expert = self.tokens_per_expert
        self._release()
        self.tokens_per_expert = tokens_per_expert
        if self.world_size > 1:
            self._step += 1
        return out

    def wait(self) -> None:
        """HybridEP's calls return when their results are usable: nothing to wait for."""

    def get_dispatched_metadata(self):
        """``(None, dispatched_probs [N])``: HybridEP returns no per-slot indices."""
        return None, self.dispatched_probs

    def get_permuted_hidden_states_by_experts(self, hidden_states: torch.Tensor):
        """The dispatch already permuted: ``(hidden_states, dispatched_probs)`` (float64 probs
        when the router's dtype is "fp64", as the other managers return them)."""
        probs = self.dispatched_probs
        return hidden_states, (probs.double() if self.router_dtype == "fp64" and probs is not None else probs)

    def get_restored_hidden_states_by_experts(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The combine unpermutes: identity."""
        return hidden_states

    def get_number_of_tokens_per_expert(self) -> torch.Tensor:
        return self.tokens_per_expert

    def initialize_runtime(self, *, num_tokens: int, hidden_dim: int, dtype: torch.dtype, device: torch.device) -> None:
        """Run one synthetic dispatch, combine and backward of ``num_tokens`` tokens, so that
        HybridEP compiles its kernels and sizes its buffer before a pipeline schedule starts.
        The manager's state is as it was afterwards, also when this fails."""
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens <= 0:
            raise ValueError(f"num_tokens must be positive, got {num_tokens}")
        if isinstance(hidden_dim, bool) or not isinstance(hidden_dim, int) or hidden_dim <= 0:
            raise ValueError(f"hidden_dim must be positive, got {hidden_dim}")
        if not dtype.is_floating_point:
            raise TypeError(f"HybridEP hidden dtype must be floating point, got {dtype}")
        names = self.LAYER_STATE + ("pad_multiple",)
        saved = {name: getattr(self, name) for name in names}
        try:
            with torch.inference_mode(False), torch.enable_grad():
                experts = (torch.arange(num_tokens, device=device)[:, None] * self.router_topk
                           + torch.arange(self.router_topk, device=device)[None, :]) % self.num_experts
                probs = torch.full((num_tokens, self.router_topk), 1.0 / self.router_topk, device=device,
                                   requires_grad=True)
                routing, dense = indices_to_multihot(experts, probs, self.num_experts)
                self._release()
                self.routing_map = None if self.moe_hybridep_compact_routing else routing
                self.token_indices = experts if self.moe_hybridep_compact_routing else None
                self.token_probs = dense
                hidden = torch.ones((num_tokens, hidden_dim), dtype=dtype, device=device, requires_grad=True)
                rows = self.dispatch(hidden)
                if self.dispatched_probs is None or self.dispatched_probs.numel() != rows.shape[0]:
                    raise RuntimeError("HybridEP runtime initialization expected one routing probability per "
                                       "dispatched token")
                weights = self.dispatched_probs.reshape((rows.shape[0],) + (1,) * (rows.dim() - 1)).to(rows.dtype)
                self.combine(rows * weights).float().sum().backward()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        finally:
            for name, value in saved.items():
                setattr(self, name, value)


class HybridEPPipelineRuntimeInitializer:
    """Prepares HybridEP's process-global buffer for a pipeline stage before its schedule runs
    (Automodel's pipeline runtime asks each module for these).

    Args:
        manager: the layer's :class:`_HybridEPManager`.
        hidden_dim: the hidden size it dispatches.
        dtype: the hidden states' dtype.
    """

    def __init__(self, manager: _HybridEPManager, hidden_dim: int, dtype: torch.dtype) -> None:
        self.manager = manager
        self.hidden_dim = hidden_dim
        self.dtype = dtype

    @property
    def resource_key(self) -> tuple:
        """The one HybridEP buffer of this process."""
        return (HybridEPPipelineRuntimeInitializer, "process_global_buffer")

    @property
    def signature(self) -> tuple:
        """The configuration the global buffer serves."""
        m = self.manager
        return (id(m.group), self.hidden_dim, self.dtype, m.num_local_experts, m.num_experts, m.router_topk,
                m.moe_hybridep_num_sms, m.moe_hybridep_compact_routing, m.moe_hybridep_permute_fusion,
                m.moe_hybridep_num_sms_preprocessing, m.moe_hybridep_num_blocks_permute,
                m.moe_hybridep_num_blocks_unpermute, m.pad_multiple,
                envs.hybridep_combine_chunk())

    @staticmethod
    def required_capacity(num_tokens: int) -> int:
        """HybridEP's token capacity for ``num_tokens``: rounded up to 16, at least 512, then
        to its combine chunk (``NUM_OF_TOKENS_PER_CHUNK_COMBINE_API``, 64 by default)."""
        capacity = max(-(-num_tokens // 16) * 16, 512)
        chunk = envs.hybridep_combine_chunk()
        return capacity if chunk <= 0 else -(-capacity // chunk) * chunk

    def _resolve_group_capacity(self, *, num_tokens: int, device: torch.device) -> int:
        capacity = self.required_capacity(num_tokens)
        if not dist.is_initialized() or self.manager.world_size == 1:
            return capacity
        largest = torch.tensor(capacity, dtype=torch.int64, device=device)
        dist.all_reduce(largest, op=dist.ReduceOp.MAX, group=self.manager.group)
        return int(largest.item())

    def prepare(self, *, num_tokens: int, device: torch.device) -> None:
        """Initialize HybridEP for the group's largest capacity when it grows (a collective).

        Raises:
            ValueError: ``num_tokens`` is not positive.
            RuntimeError: the global buffer serves another signature, or initialization failed.
        """
        if num_tokens <= 0:
            raise ValueError(f"HybridEP runtime preparation requires a positive token capacity, got {num_tokens}")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        signature = (*self.signature, device)
        capacity = self._resolve_group_capacity(num_tokens=num_tokens, device=device)
        if capacity <= _engine("get_hybrid_ep_initialized_capacity")(signature):
            return
        self.manager.initialize_runtime(num_tokens=capacity, hidden_dim=self.hidden_dim, dtype=self.dtype,
                                        device=device)
        _engine("publish_hybrid_ep_initialized_capacity")(signature, capacity)
        logging.getLogger("flexdispatch").info("initialized HybridEP for %d tokens (hidden %d, %s)", capacity,
                                               self.hidden_dim, self.dtype)
