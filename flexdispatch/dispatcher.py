"""MoEFlexTokenDispatcher: the reference's facade, one manager per dispatcher.

Notation: H hidden, B micro batch, S sequence, TP tensor-parallel size (1), EP expert-parallel
size, num_local_tokens = S * B / TP.
"""

from __future__ import annotations

import dataclasses
import socket
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

from . import ops
from ._log import logger
from .config import MoEConfig
from .managers import _ManagerBase, groups, registry
from .managers.base import _group_size_rank
from .managers.gather import all_gather_objects
from .spec import CONFIG_NAMES, LayerSpec

SHARING_DEEPEP_MANAGER = True
"""Dispatchers of one expert-parallel group share the DeepEP communication buffer. Unlike the
reference, they share nothing else: each dispatcher keeps its own per-call state."""

_warned: set = set()


def _warn_once(message: str) -> None:
    """A fallback warning, once per process and reason (not once per layer and rank)."""
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)


def _as_config(config) -> MoEConfig:
    """Accept a MoEConfig or any object with its fields (e.g. the reference's config)."""
    if isinstance(config, MoEConfig):
        return config
    if config is None:
        raise TypeError("config: expected a MoEConfig, got None")
    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(MoEConfig) if hasattr(config, f.name)}
    return MoEConfig(**values)


class MoEFlexTokenDispatcher:
    """Flex token dispatcher: DeepEP on NVLink nodes, torch.distributed all-to-all elsewhere,
    no communication for one rank.

    Args:
        num_local_experts: experts on this rank, ``num_moe_experts / EP``.
        local_expert_indices: their global ids, ``range(rank * E_local, (rank + 1) * E_local)``.
        config: :class:`~flexdispatch.MoEConfig` (or an object with its fields).
        ep_group: the expert-parallel process group; None (or a group of one) runs on one rank
            without torch.distributed.

    Backend (``config.moe_flex_backend``): ``auto`` picks DeepEP when ``deep_ep`` imports, the
    tensors are CUDA bfloat16 and the group size is one DeepEP supports (decided at the first
    dispatch, identically on every rank), else all-to-all, or local for one rank; the choice is
    logged once per group. ``moe_enable_deepep=True`` without a usable DeepEP falls back with
    one warning. An explicit backend that cannot be met raises ValueError saying why.
    """

    shared_comm_manager = None
    """Kept for compatibility with the reference; flexdispatch shares no manager."""
    group = groups.WeakGroup()
    """``ep_group``, held by weak reference: None once destroyed (see managers/groups.py)."""

    def __init__(self, num_local_experts: int, local_expert_indices: List[int], config: MoEConfig,
                 ep_group: Optional[dist.ProcessGroup] = None):
        self.config = cfg = _as_config(config)  # its fields were checked when it was built
        ops.load_kernels()  # build them (cold cache) with the model, not inside its first step
        self.group = ep_group
        self.ep_size, self.ep_rank = _group_size_rank(ep_group)
        self.tp_size = 1
        # What depends on the group is checked here, once; managers get the frozen result.
        self.spec = LayerSpec.checked(
            names=dict(CONFIG_NAMES, num_experts="config.num_moe_experts"), world_size=self.ep_size,
            num_experts=self.tp_size * cfg.num_moe_experts, num_local_experts=num_local_experts,
            topk=self.tp_size * cfg.moe_router_topk, capacity_factor=cfg.moe_expert_capacity_factor,
            router_dtype=cfg.moe_router_dtype, pad_multiple=cfg.moe_router_expert_pad_multiple,
            sync_free=cfg.moe_sync_free, max_tokens_per_expert=cfg.moe_max_tokens_per_expert,
            validate_routing=cfg.moe_validate_routing, num_sms=cfg.moe_deepep_num_sms,
            permute_fusion=cfg.moe_permute_fusion, fp8_dispatch=cfg.moe_fp8_dispatch,
            nvlink_max_blocks=cfg.moe_nvlink_max_blocks)
        local = self.spec.num_local_experts
        expected_ids = list(range(self.ep_rank * local, (self.ep_rank + 1) * local))
        if [int(i) for i in local_expert_indices] != expected_ids:
            raise ValueError(f"local_expert_indices: rank {self.ep_rank} of {self.ep_size} holds experts "
                             f"{expected_ids[0]}..{expected_ids[-1]}, got {list(local_expert_indices)}")
        self.num_local_experts = num_local_experts
        self.local_expert_indices = list(local_expert_indices)
        # Owners: everything above is the constructor's and never changes.
        self.shared_experts = None  # the reference's attribute; unused
        self.hidden_shape: Optional[torch.Size] = None  # each call's preprocess; read by its combine_postprocess
        self._manager: Optional[_ManagerBase] = None  # the constructor's, or the first dispatch's (auto)
        # The constructor's choice: a backend, or the candidate auto probes at the first dispatch,
        # and why auto passed a better one over (said at the first CUDA dispatch).
        self._choice = registry.choose(cfg.moe_flex_backend, ep_group, cfg.moe_router_topk, cfg.moe_enable_deepep)
        self._fallback_reason: Optional[str] = self._choice.passed_over
        if self._choice.name is not None:
            self._manager = registry.make_manager(self._choice.name, ep_group, self.spec)

    # ---- manager choice ---------------------------------------------------------------------

    @groups.one_thread_at_a_time("dispatch_preprocess")  # (the first call's vote is a collective)
    def _manager_for(self, hidden: Optional[torch.Tensor], error: Optional[BaseException]) -> _ManagerBase:
        """The manager, chosen at the first dispatch when ``auto`` depends on the tensors.

        That choice is the call's first exchange: every rank says whether the candidate backend
        can serve its tensors (and its host, for backends of one node) and whether its own checks
        failed; all take the same choice, or all raise. A candidate passed over by any rank gives
        way to the next of ``AUTO_ORDER``, voted on the same way when it too needs the tensors.
        """
        if self._manager is not None:
            return self._manager
        groups.require(self)
        candidate, host = self._choice.candidate, socket.gethostname()
        while True:
            reason = error and "this rank's inputs were invalid"
            if reason is None:
                reason = registry.auto_passes_over(candidate, self.group, device=hidden.device, dtype=hidden.dtype,
                                                   hidden=hidden.shape[-1], topk=self.config.moe_router_topk)
            votes = all_gather_objects((reason, None if error is None else str(error), host), self.group)
            failed = [r for r, (_, message, _) in enumerate(votes) if message is not None]
            if failed:
                if error is not None:
                    raise type(error)(f"{error} (every rank of the expert-parallel group raises before any token "
                                      f"moved)")
                raise ValueError(f"hidden_states: invalid input on rank(s) {failed} of the expert-parallel group; "
                                 f"every rank raises before any token moved ({votes[failed[0]][1]})")
            reasons = [r for r, _, _ in votes if r is not None]
            hosts = sorted({h for _, _, h in votes})
            if not reasons and registry.BACKENDS[candidate].one_node and len(hosts) > 1:
                reasons = [f"the expert-parallel group spans {len(hosts)} hosts"]
            if not reasons:
                self._manager = registry.make_manager(candidate, self.group, self.spec)
                return self._manager
            chosen = registry.fallback(candidate, self.group)
            settled = not registry.BACKENDS[chosen].needs_tensors
            if hidden.is_cuda:  # (CPU tensors go to the all-to-all manager: nothing to warn about)
                _warn_once(f"the {candidate} manager cannot serve this layer ({reasons[0]}); "
                           f"{'using' if settled else 'trying'} the {chosen} manager")
            if settled:
                self._manager = registry.make_manager(chosen, self.group, self.spec)
                return self._manager
            candidate = chosen

    @property
    def _comm_manager(self) -> Optional[_ManagerBase]:
        """The manager (None until the first dispatch when ``auto`` still has to choose)."""
        return self._manager

    @property
    def backend(self) -> Optional[str]:
        """"local", "alltoall", "deepep" or "nvlink" (None until chosen)."""
        return None if self._manager is None else self._manager.name

    # ---- the reference's API ----------------------------------------------------------------

    def _initialize_metadata(self, num_local_tokens: int, probs: torch.Tensor) -> torch.Tensor:
        """Routing probs in the unified ``[T, TP * EP, E_local]`` layout (each expert block
        repeated for every TP rank), so the communication is agnostic of TP and EP sizes."""
        world = self.tp_size * self.ep_size
        experts = self.config.num_moe_experts
        if not isinstance(probs, torch.Tensor) or not probs.is_floating_point():
            raise TypeError(f"probs: expected a floating-point tensor, got "
                            f"{probs.dtype if isinstance(probs, torch.Tensor) else type(probs).__name__}")
        # [T, E], or [..., E] with leading dims of T tokens; a transposed [E, T] or flat
        # [T * E] tensor has the right element count but would be misread.
        if probs.dim() < 1 or probs.shape[-1] != experts or probs.numel() != num_local_tokens * experts:
            raise ValueError(f"probs: expected shape [num_local_tokens, num_moe_experts] = [{num_local_tokens}, "
                             f"{experts}] (or [..., {experts}] with {num_local_tokens} tokens), got "
                             f"{tuple(probs.shape)}")
        return (probs.reshape(num_local_tokens, self.ep_size, 1, self.num_local_experts)
                .expand(-1, -1, self.tp_size, -1)
                .reshape(num_local_tokens, world, self.num_local_experts)).contiguous()

    def _flatten_hidden(self, hidden_states: torch.Tensor, num_local_tokens: int) -> torch.Tensor:
        if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() < 2:
            raise ValueError("hidden_states: expected a tensor [..., hidden] with at least 2 dims")
        if not hidden_states.is_floating_point():
            raise TypeError(f"hidden_states: expected a floating-point tensor, got {hidden_states.dtype}")
        if hidden_states.shape[-1] == 0:
            raise ValueError(f"hidden_states: expected a hidden size >= 1, got shape {tuple(hidden_states.shape)}")
        if isinstance(num_local_tokens, bool) or not isinstance(num_local_tokens, int) or num_local_tokens < 0:
            raise ValueError(f"num_local_tokens: expected an int >= 0, got {num_local_tokens!r}")
        rows = hidden_states.numel() // hidden_states.shape[-1]
        if rows != num_local_tokens:
            raise ValueError(f"num_local_tokens: {num_local_tokens} does not match hidden_states "
                             f"{tuple(hidden_states.shape)} ({rows} tokens)")
        self.hidden_shape = hidden_states.shape
        return hidden_states.reshape(-1, hidden_states.shape[-1])

    def dispatch_preprocess(self, hidden_states: torch.Tensor, num_local_tokens: int, probs: torch.Tensor):
        """Flatten ``hidden_states [..., H]`` to ``[T, H]`` and take the top-K of ``probs [T, E]``.

        Returns:
            ``(hidden [T, H], token_probs [T, K])``.
        """
        return self._preprocess(hidden_states, num_local_tokens, lambda manager: manager.setup_metadata(
            num_local_tokens, self._initialize_metadata(num_local_tokens, probs)))

    def _preprocess(self, hidden_states, num_local_tokens, route):
        """Flatten and route. On a group, a failed check is held until the call's first exchange
        (:meth:`dispatch_all_to_all`), where every rank raises it together; alone, it raises here."""
        hidden = error = None
        try:
            hidden = self._flatten_hidden(hidden_states, num_local_tokens)
        except (ValueError, TypeError) as exc:
            if self.ep_size == 1:
                raise
            error = exc
        manager = self._manager_for(hidden, error)
        if self._fallback_reason is not None and hidden is not None and hidden.is_cuda:
            _warn_once(f"DeepEP is not usable here ({self._fallback_reason}); using the {manager.name} manager")
            self._fallback_reason = None
        if error is None:
            try:
                route(manager)
            except (ValueError, TypeError) as exc:
                error = exc
        if error is not None:
            manager.defer(error)  # raises at once for a group of one
            return hidden_states, None
        return hidden, manager.token_probs

    def dispatch_preprocess2(self, hidden_states: torch.Tensor, num_local_tokens: int, token_probs: torch.Tensor,
                             token_indices: torch.Tensor):
        """As :meth:`dispatch_preprocess`, with routing given as top-K ``token_probs [T, K]`` and
        ``token_indices [T, K]`` (global expert ids, -1 for none)."""
        return self._preprocess(hidden_states, num_local_tokens, lambda manager: manager.set_routing(
            token_probs, token_indices, num_local_tokens))

    def dispatch_all_to_all(self, hidden_states: torch.Tensor, probs: torch.Tensor = None, async_finish: bool = True,
                            allocate_on_comm_stream: bool = True):
        """Send tokens to their experts' ranks: ``(hidden [R, H], dispatched_probs [R, K])``.

        With ``async_finish`` the transfer may still be in flight: :meth:`dispatch_postprocess`
        waits for it; any other use of the results needs :meth:`wait` first.
        """
        manager = self._comm_manager
        if manager is None:
            raise RuntimeError("dispatch_all_to_all called out of order: the next step of this dispatcher is "
                               "dispatch_preprocess")
        out = manager.dispatch(hidden_states, async_finish, allocate_on_comm_stream)
        return out, manager.dispatched_probs

    def dispatch_postprocess(self, hidden_states: torch.Tensor):
        """Expert-major permutation: ``(tokens [N, H], tokens_per_expert [E_local] int64 (CPU;
        GPU when sync-free), permuted_probs [N])``."""
        manager = self._require_manager("dispatch_postprocess")
        tokens, permuted_probs = manager.get_permuted_hidden_states_by_experts(hidden_states)
        return tokens, manager.get_number_of_tokens_per_expert(), permuted_probs

    def token_permutation(self, hidden_states: torch.Tensor, num_local_tokens: int,
                          probs: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Preprocess, dispatch and permute: ``(tokens [N, H], tokens_per_expert [E_local], permuted_probs [N])``."""
        hidden, _ = self.dispatch_preprocess(hidden_states, num_local_tokens, probs)
        return self._permute_dispatched(hidden)

    def token_permutation2(self, hidden_states: torch.Tensor, num_local_tokens: int, token_probs: torch.Tensor,
                           token_indices: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """As :meth:`token_permutation`, with top-K ``token_probs`` and ``token_indices``."""
        hidden, _ = self.dispatch_preprocess2(hidden_states, num_local_tokens, token_probs, token_indices)
        return self._permute_dispatched(hidden)

    def _permute_dispatched(self, hidden: torch.Tensor):
        """Dispatch and permute for the one-call entry points: with ``moe_fp8_experts`` the
        tokens come back as ``(rows [N, H] float8_e4m3fn, scales [N, H / 128])``."""
        if not self.config.moe_fp8_experts:
            return self.dispatch_postprocess(self._dispatch_for_permutation(hidden))
        manager = self._comm_manager
        if manager is not None and manager._deferred is None and isinstance(hidden, torch.Tensor) and \
                hidden.requires_grad and torch.is_grad_enabled():
            manager.defer(ValueError(
                "hidden_states: moe_fp8_experts hands the experts FP8 rows, which carry no gradient; call the layer "
                "under torch.no_grad() (inference), or set moe_fp8_experts=False to train (the experts then get "
                "the rows dequantized)"))
        dispatched = self._dispatch_for_permutation(hidden, fp8_rows=True)
        manager = self._require_manager("token_permutation")
        rows, permuted_probs = manager.get_permuted_hidden_states_by_experts(dispatched, fp8_rows=True)
        return rows, manager.get_number_of_tokens_per_expert(), permuted_probs

    def _dispatch_for_permutation(self, hidden: torch.Tensor, fp8_rows: bool = False) -> torch.Tensor:
        """dispatch_all_to_all's transfer (async, as its defaults) for a permutation that follows
        at once: with ``moe_fp8_fused_permutation`` the received FP8 rows stay in FP8 and the
        permutation dequantizes them as it moves them (``keep_fp8``); ``fp8_rows``: they stay in
        FP8 for the experts (the manager keeps them whatever ``keep_fp8`` says, the local one too)."""
        manager = self._comm_manager
        if manager is None:
            raise RuntimeError("token_permutation called out of order: the next step of this dispatcher is "
                               "dispatch_preprocess")
        return manager.dispatch(hidden, True, True, keep_fp8=self.config.moe_fp8_fused_permutation,
                                permute_next=True, fp8_rows=fp8_rows)

    def combine_preprocess(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Undo the expert-major permutation: ``[N, H] -> [R, H]``."""
        return self._require_manager("combine_preprocess").get_restored_hidden_states_by_experts(hidden_states)

    def combine_all_to_all(self, hidden_states: torch.Tensor, async_finish: bool = True,
                           allocate_on_comm_stream: bool = True) -> torch.Tensor:
        """Return rows to their home ranks and sum them: ``[R, H] -> [T, H]``; with
        ``async_finish``, :meth:`combine_postprocess` (or :meth:`wait`) waits for it."""
        return self._require_manager("combine_all_to_all").combine(hidden_states, async_finish,
                                                                   allocate_on_comm_stream)

    def combine_postprocess(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Wait for an async combine and restore the input's leading dims: ``[T, H] -> [..., H]``."""
        self._require_manager("combine_postprocess").wait()
        return hidden_states.view(tuple(self.hidden_shape[:-1]) + (hidden_states.shape[-1],))

    def token_unpermutation(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Restore, combine and reshape: ``[N, H] -> [..., H]``."""
        hidden = self.combine_preprocess(hidden_states)
        hidden = self.combine_all_to_all(hidden)
        return self.combine_postprocess(hidden)

    def wait(self) -> None:
        """Make the current stream wait for an async dispatch or combine of this dispatcher."""
        if self._manager is not None:
            self._manager.wait()

    def dropped_tokens(self) -> Optional[torch.Tensor]:
        """Assignments dropped by ``moe_max_tokens_per_expert`` since the last report: a 0-d
        int64 tensor on the tokens' device (reading it needs no sync until you ask for its value),
        or None before any bounded permutation."""
        return None if self._manager is None else self._manager.dropped_tokens

    def report_dropped_tokens(self) -> int:
        """Read (one host sync) and clear the count of assignments the bound dropped, and warn
        or raise as ``config.moe_dropped_tokens`` says. Call it where a sync is cheap (after the
        optimizer step, say), outside a CUDA-graph capture. Returns the count. Also raises
        RuntimeError if, in sync-free mode on a group (NVLink manager), the ranks disagreed in a
        call since the last report (found on the device; such calls move no token)."""
        faults = getattr(self._manager, "sync_free_faults", None)
        if faults is not None and int(faults):
            calls = int(faults)
            faults.zero_()
            raise RuntimeError(f"config.moe_sync_free: in {calls} call(s) since the last report the ranks of the "
                               f"expert-parallel group disagreed (a check failed on a rank, or they passed different "
                               f"token counts, hidden sizes, dtypes or top-k, or were at different steps); those calls "
                               f"moved no token and their results are invalid. Call reset() and "
                               f"flexdispatch.shutdown() on every rank before the next call")
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
        if self._manager is not None:
            self._manager.reset()

    def _require_manager(self, step: str) -> _ManagerBase:
        if self._manager is None:
            raise RuntimeError(f"{step} called out of order: the next step of this dispatcher is dispatch_preprocess")
        return self._manager
