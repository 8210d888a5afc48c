"""MoEConfig: the reference's fields with its defaults, plus flexdispatch's own, validated."""

from __future__ import annotations

import dataclasses
from typing import Optional

from .spec import CONFIG_NAMES, DROPPED_TOKEN_ACTIONS, ROUTER_DTYPES, check_fields, expert_capacity, int_at_least  # noqa: F401



@dataclasses.dataclass
class MoEConfig:
    """Configuration of the flex token dispatcher.

    The first seven fields are the reference's, with its defaults. The rest are flexdispatch's,
    with defaults that keep existing configs working.

    Capacity: with ``moe_expert_capacity_factor = c``, each expert keeps at most
    ``ceil(num_local_tokens * moe_router_topk / num_moe_experts * c)`` of a rank's
    (token, expert) assignments; the lowest-probability ones are dropped first (ties: the later
    token), deterministically. Assignments whose probability is 0 are dropped too.

    Precision: routing probabilities travel in float64 through the local and all-to-all
    managers when ``moe_router_dtype="fp64"``, float32 otherwise; DeepEP carries them in
    float32 (its kernels require it) and the permuted probs are returned in float64.
    """

    moe_enable_deepep: bool = True
    """Prefer DeepEP where it is usable (``moe_flex_backend="auto"`` falls back with one warning)."""
    moe_permute_fusion: bool = False
    """Accepted for compatibility; flexdispatch always uses its fused kernels when they are built."""
    moe_expert_capacity_factor: Optional[float] = None
    """Per-expert capacity factor; None drops nothing."""
    moe_router_topk: int = 2
    """Experts per token (K)."""
    moe_router_expert_pad_multiple: Optional[int] = None
    """Pad every local expert's rows to a multiple of this; pad rows are zero with prob 0."""
    num_moe_experts: int = 64
    """Experts in the layer (E), across all expert-parallel ranks."""
    moe_router_dtype: Optional[str] = "fp32"
    """Precision of routing probabilities: "fp32", "fp64" or None (keep the router's dtype)."""

    moe_flex_backend: str = "auto"
    """"auto" (DeepEP where usable; else, for CUDA tensors on an NCCL group of one node, the
    NVLink backend; else all-to-all; local for one rank), "deepep", "alltoall", "nvlink" (one
    node, symmetric memory, no DeepEP needed; see README) or "local". An explicit choice that
    cannot be met raises ValueError."""
    moe_deepep_num_sms: int = 20
    """SMs DeepEP's normal kernels may use (even)."""
    moe_sync_free: bool = False
    """No host sync in dispatch or permutation: outputs sized for the worst case,
    tokens_per_expert stays on the GPU; lets a layer be captured in a CUDA graph. For one rank
    (local manager), DeepEP and the NVLink backend on one node (every rank must pass the same
    number of tokens); impossible with all-to-all, which needs host-side counts. Routing values
    are then not validated by DeepEP (shapes and dtypes still are); the NVLink backend checks
    them on the device and reports a failed call at report_dropped_tokens()."""
    moe_max_tokens_per_expert: Optional[int] = None
    """Sync-free mode only: at most this many rows per local expert (before padding) in the
    permuted tensor, which then has ``E_local * round_up(bound, pad multiple)`` rows instead of
    the worst case (received rows x min(K, E_local)). Assignments past the bound are dropped,
    keeping each expert's first rows in expert-major order (ascending dispatched row: source
    rank, then token), and counted on the device: :meth:`MoEFlexTokenDispatcher.dropped_tokens`
    (no sync) and :meth:`MoEFlexTokenDispatcher.report_dropped_tokens` (one sync). Every rank
    of a group must use the same bound."""
    moe_dropped_tokens: str = "warn"
    """What :meth:`MoEFlexTokenDispatcher.report_dropped_tokens` does when the bound dropped
    assignments: "warn" (one warning a report), "raise" (ValueError) or "ignore"."""
    moe_fp8_dispatch: bool = False
    """Send hidden states to the experts' ranks as float8 e4m3fn with one float32 scale per
    128 values of a row (DeepEP's and DeepSeek-V3's format: half the bytes of bf16 on the
    wire). The hidden size must be a multiple of 128 and the hidden states float32, float16
    or bfloat16. The receiver dequantizes to the hidden dtype, so experts see what they saw
    before, rounded through FP8 (relative error about 2-3% per value, see README); every
    manager applies the same rounding (one rank too), so results do not depend on the
    backend. Combine and every backward transfer stay in the hidden dtype; gradients pass
    the rounding unchanged (straight-through). Experimental; tested on H200s (NCCL and DeepEP
    at EP 2 and 4)."""
    moe_fp8_fused_permutation: bool = True
    """With ``moe_fp8_dispatch``, in the one-call entry points (``token_permutation``,
    ``token_permutation2``) on the all-to-all and DeepEP managers: keep the received rows in
    FP8 and dequantize them inside the permutation (one pass over them instead of two, and no
    dequantized copy of the received rows). Bit for bit the same results; on an H200 0.70 ms
    against 0.78 ms for the two passes at 16384 rows, H = 7168, K = 8 (docs/PERFORMANCE.md).
    False: dequantize the received rows first, then permute them."""
    moe_fp8_experts: bool = False
    """With ``moe_fp8_dispatch``, for FP8 experts at inference: the one-call entry points
    (``token_permutation``, ``token_permutation2``) return the expert-major rows still in FP8,
    as a pair ``(rows [N, H] torch.float8_e4m3fn, scales [N, H / 128] float32)`` (one scale per
    128 values of a row, ``value = float(row) * scale``; pad and unused rows are zero with
    scale 0) in place of the ``[N, H]`` tensor; tokens_per_expert and permuted_probs are as
    before, and the experts' output ``[N, H]`` in the hidden dtype goes to
    ``token_unpermutation`` as before. FP8 rows carry no gradient: hidden states that require
    one raise ValueError on every rank (run under ``torch.no_grad()``; to train, leave this off
    and the experts get the rows dequantized). The three-step API (``dispatch_postprocess``)
    still returns dequantized rows."""
    moe_nvlink_max_blocks: int = 0
    """The NVLink backend (``moe_flex_backend="nvlink"``): thread blocks each of its transfer
    kernels may launch (0: as many as the rows need). A cap leaves SMs to compute that runs
    concurrently on other streams; the transfers then take longer."""
    moe_validate_routing: bool = True
    """Check routing indices (range, duplicates) before tokens move; every rank raises
    together. One small kernel; no extra collective or host sync on DeepEP within a node."""

    def __post_init__(self) -> None:
        check_fields(names=CONFIG_NAMES, num_experts=self.num_moe_experts, topk=self.moe_router_topk,
                     capacity_factor=self.moe_expert_capacity_factor, router_dtype=self.moe_router_dtype,
                     pad_multiple=self.moe_router_expert_pad_multiple, sync_free=self.moe_sync_free,
                     max_tokens_per_expert=self.moe_max_tokens_per_expert, num_sms=self.moe_deepep_num_sms,
                     fp8_dispatch=self.moe_fp8_dispatch, nvlink_max_blocks=self.moe_nvlink_max_blocks)
        from .managers.registry import backend_names  # (the registry imports the managers, which import this)

        if self.moe_flex_backend not in backend_names():
            raise ValueError(f"moe_flex_backend: expected one of {backend_names()}, got {self.moe_flex_backend!r}")
        if not isinstance(self.moe_fp8_experts, bool):
            raise ValueError(f"moe_fp8_experts: expected a bool, got {self.moe_fp8_experts!r}")
        if self.moe_fp8_experts and not self.moe_fp8_dispatch:
            raise ValueError("moe_fp8_experts: hands the experts the FP8 rows of moe_fp8_dispatch; set "
                             "moe_fp8_dispatch=True")
        if not isinstance(self.moe_fp8_fused_permutation, bool):
            raise ValueError(f"moe_fp8_fused_permutation: expected a bool, got {self.moe_fp8_fused_permutation!r}")
        if self.moe_dropped_tokens not in DROPPED_TOKEN_ACTIONS:
            raise ValueError(f"moe_dropped_tokens: expected one of {DROPPED_TOKEN_ACTIONS}, "
                             f"got {self.moe_dropped_tokens!r}")
