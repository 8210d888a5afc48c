"""The dispatcher's configuration: both generations of the reference's config class, checked.

* :class:`TokenDispatcherConfig`: NeMo Automodel's current config (its 18 fields in its order,
  with its defaults), followed by flexdispatch's own fields.
* :class:`MoEConfig`: the first generation's name. The same fields; its defaults keep what the
  first generation did where the two differ: no engine named (``moe_flex_dispatcher_backend``
  None: flexdispatch chooses) and asynchronous dispatch and combine in the one-call methods.

Which backend a dispatcher uses is decided by one rule, :func:`requested_backend`.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Optional

from . import envs
from .spec import CONFIG_NAMES, DROPPED_TOKEN_ACTIONS, ROUTER_DTYPES, check_fields, expert_capacity, int_at_least  # noqa: F401

ENGINES = ("deepep", "hybridep", "uccl_ep")
"""The engines Automodel's ``moe_flex_dispatcher_backend`` names, taken as named (ImportError when
one does not import here). flexdispatch's own backends are listed by
:func:`flexdispatch.managers.registry.backend_names`."""


def backend_choices() -> tuple[str, ...]:
    """Every backend name a config (or ``FLEXDISPATCH_BACKEND``) accepts."""
    from .managers.registry import backend_names  # (the registry imports the managers, which import this)

    return backend_names() + tuple(e for e in ENGINES if e not in backend_names())


def requested_backend(config) -> tuple[str, str]:
    """``(backend, where it was set)`` for ``config``: the one rule.

    1. ``FLEXDISPATCH_BACKEND``, when set (for frameworks that build the config themselves);
    2. ``moe_flex_backend`` (flexdispatch's field), when it is not ``"auto"``;
    3. ``moe_flex_dispatcher_backend`` (Automodel's field), when it is set
       (:class:`TokenDispatcherConfig` defaults it to ``"deepep"``, as Automodel does;
       :class:`MoEConfig` leaves it None);
    4. else ``"auto"``: DeepEP where it serves the call, else flexdispatch's NVLink backend on
       one node of CUDA tensors over NCCL, else all-to-all; local for one rank.
    """
    env = envs.backend()
    if env is not None:
        return env, "FLEXDISPATCH_BACKEND"
    own = getattr(config, "moe_flex_backend", "auto")
    if own != "auto":
        return own, "config.moe_flex_backend"
    named = getattr(config, "moe_flex_dispatcher_backend", None)
    if named is not None:
        return named, "config.moe_flex_dispatcher_backend"
    return "auto", "config.moe_flex_backend"


SM_FIELDS = ("moe_deepep_num_sms", "moe_hybridep_num_sms", "moe_nvlink_max_blocks")
"""The backends' own SM (or thread-block) fields, which ``moe_comm_sms`` sets all at once."""


def sm_setting(config, name: str):
    """The value that applies of ``config``'s field ``name``: for one of :data:`SM_FIELDS`, the
    count ``moe_comm_sms`` gives it when set (DeepEP's rounded down to an even count, as its
    kernels need), else the field itself; any other field as it is."""
    budget = getattr(config, "moe_comm_sms", None)
    if budget is None or name not in SM_FIELDS:
        return getattr(config, name)
    return budget // 2 * 2 if name == "moe_deepep_num_sms" else budget


@dataclasses.dataclass
class TokenDispatcherConfig:
    """Configuration of the flex token dispatcher (NeMo Automodel's current name).

    The first 18 fields are Automodel's, in its order and with its defaults; the rest are
    flexdispatch's, with defaults that change nothing. Every field is checked when the config
    is built (ValueError naming the field).

    Capacity: with ``moe_expert_capacity_factor = c``, each expert keeps at most
    ``ceil(num_local_tokens * moe_router_topk / num_moe_experts * c)`` of a rank's
    (token, expert) assignments; the lowest-probability ones are dropped first (ties: the later
    token), deterministically. Assignments whose probability is 0 are dropped too. (HybridEP,
    which routes inside its own kernels, ignores it, as in Automodel.)

    Precision: routing probabilities travel in float64 through the local and all-to-all
    managers when ``moe_router_dtype="fp64"``, float32 otherwise; DeepEP carries them in
    float32 (its kernels require it) and the permuted probs are returned in float64.
    """

    moe_enable_deepep: bool = True
    """``auto`` considers DeepEP only when True (Automodel reads no more of it)."""
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
    moe_flex_dispatcher_backend: Optional[str] = "deepep"
    """The engine, as Automodel names it: "deepep" (DeepEP), "hybridep" (DeepEP's hybrid-ep
    branch), "uccl_ep" (UCCL-EP's DeepEP-compatible buffer; DeepEP when UCCL-EP is missing, as
    in Automodel); each raises ImportError when it does not import. flexdispatch's own names
    ("auto", "local", "alltoall", "nvlink") are accepted too. See :func:`requested_backend`
    for how it combines with ``moe_flex_backend`` and ``FLEXDISPATCH_BACKEND``."""
    moe_deepep_num_sms: int = 20
    """SMs DeepEP's (and UCCL-EP's) normal kernels may use (even)."""
    moe_hybridep_num_sms: int = 24
    """SMs of HybridEP's dispatch and combine."""
    moe_hybridep_permute_fusion: bool = False
    """HybridEP: fuse the permutation into its dispatch kernel (and the unpermutation into combine)."""
    moe_hybridep_compact_routing: bool = False
    """HybridEP: send the top-k indices instead of a dense routing map."""
    moe_hybridep_num_sms_preprocessing: Optional[int] = None
    """HybridEP: SMs of its routing preprocessing (None: its default)."""
    moe_hybridep_num_blocks_permute: Optional[int] = None
    """HybridEP: thread blocks of its dispatch permutation (None: its default)."""
    moe_hybridep_num_blocks_unpermute: Optional[int] = None
    """HybridEP: thread blocks of its combine unpermutation (None: its default)."""
    moe_share_token_dispatcher: bool = True
    """Dispatchers of one backend, group and settings share one manager object, as in Automodel
    (``MoEFlexTokenDispatcher.shared_*_manager``). Unlike Automodel's, a shared manager keeps
    each layer's call state apart, so layers may interleave their calls in any order. Under
    torch.compile the switch from one layer to another breaks the graph: set False there."""
    moe_deepep_async_dispatch: bool = False
    """The one-call methods (``token_permutation``, ``token_permutation2``,
    ``token_unpermutation``) dispatch and combine asynchronously; False: synchronously. The
    step-by-step methods take their own flags."""
    moe_benchmark_static_routing: bool = False
    """HybridEP, benchmarks only: every call permutes the same count, so the padded token count
    and the permuted size are exchanged once and reused."""

    moe_flex_backend: str = "auto"
    """flexdispatch's backend field: "auto" (DeepEP where usable; else, for CUDA tensors on an
    NCCL group of one node, the NVLink backend; else all-to-all; local for one rank), "deepep",
    "alltoall", "nvlink" (one node, symmetric memory, no DeepEP needed; see README), "local",
    or one of Automodel's engines. Anything but "auto" wins over ``moe_flex_dispatcher_backend``
    (:func:`requested_backend`). An explicit choice that cannot be met raises ValueError
    (ImportError too for an engine that does not import)."""
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
    moe_fp8_fused_permutation: Optional[bool] = None
    """Deprecated, no effect. With ``moe_fp8_dispatch`` the one-call entry points always keep the
    received rows in FP8 and dequantize them inside the permutation: bit for bit what two
    passes give, one pass over the rows fewer (docs/PERFORMANCE.md). Setting it warns."""
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
    concurrently on other streams; the transfers then take longer. ``moe_comm_sms`` wins when set."""
    moe_comm_sms: Optional[int] = None
    """SMs the token exchanges may occupy, on whichever backend serves: DeepEP's and UCCL-EP's
    kernels (rounded down to an even count), HybridEP's dispatch and combine, the NVLink
    backend's transfer kernels (one thread block per SM). None: each backend's own field
    (``moe_deepep_num_sms``, ``moe_hybridep_num_sms``, ``moe_nvlink_max_blocks``), which this one
    wins over when set. See :func:`sm_setting`."""
    moe_validate_routing: bool = True
    """Check routing indices (range, duplicates) before tokens move; every rank raises
    together. One small kernel; no extra collective or host sync on DeepEP within a node."""

    def __post_init__(self) -> None:
        check_fields(names=CONFIG_NAMES, num_experts=self.num_moe_experts, topk=self.moe_router_topk,
                     capacity_factor=self.moe_expert_capacity_factor, router_dtype=self.moe_router_dtype,
                     pad_multiple=self.moe_router_expert_pad_multiple, sync_free=self.moe_sync_free,
                     max_tokens_per_expert=self.moe_max_tokens_per_expert, num_sms=self.moe_deepep_num_sms,
                     fp8_dispatch=self.moe_fp8_dispatch, nvlink_max_blocks=self.moe_nvlink_max_blocks,
                     validate_routing=self.moe_validate_routing)
        choices = backend_choices()
        if self.moe_flex_backend not in choices:
            raise ValueError(f"moe_flex_backend: expected one of {choices}, got {self.moe_flex_backend!r}")
        if self.moe_flex_dispatcher_backend is not None and self.moe_flex_dispatcher_backend not in choices:
            raise ValueError(f"moe_flex_dispatcher_backend: expected one of {choices} or None, got "
                             f"{self.moe_flex_dispatcher_backend!r}")
        for name in ("moe_share_token_dispatcher", "moe_deepep_async_dispatch", "moe_benchmark_static_routing",
                     "moe_hybridep_permute_fusion", "moe_hybridep_compact_routing"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: expected a bool, got {getattr(self, name)!r}")
        int_at_least("moe_hybridep_num_sms", self.moe_hybridep_num_sms, 1)
        for name in ("moe_hybridep_num_sms_preprocessing", "moe_hybridep_num_blocks_permute",
                     "moe_hybridep_num_blocks_unpermute"):
            if getattr(self, name) is not None:
                int_at_least(name, getattr(self, name), 1)
        if not isinstance(self.moe_fp8_experts, bool):
            raise ValueError(f"moe_fp8_experts: expected a bool, got {self.moe_fp8_experts!r}")
        if self.moe_fp8_experts and not self.moe_fp8_dispatch:
            raise ValueError("moe_fp8_experts: hands the experts the FP8 rows of moe_fp8_dispatch; set "
                             "moe_fp8_dispatch=True")
        if self.moe_comm_sms is not None:
            int_at_least("moe_comm_sms", self.moe_comm_sms, 2)
        if self.moe_fp8_fused_permutation is not None:
            warnings.warn("moe_fp8_fused_permutation has no effect (the FP8 rows are always dequantized inside "
                          "the permutation, bit for bit the same result); leave it unset", DeprecationWarning,
                          stacklevel=3)
        if self.moe_dropped_tokens not in DROPPED_TOKEN_ACTIONS:
            raise ValueError(f"moe_dropped_tokens: expected one of {DROPPED_TOKEN_ACTIONS}, "
                             f"got {self.moe_dropped_tokens!r}")


@dataclasses.dataclass
class MoEConfig(TokenDispatcherConfig):
    """The first generation's config class: :class:`TokenDispatcherConfig`'s fields, with the
    first generation's behaviour where the two differ: no engine named
    (``moe_flex_dispatcher_backend=None``: ``moe_flex_backend``, "auto" by default, decides),
    asynchronous dispatch and combine in the one-call methods
    (``moe_deepep_async_dispatch=True``), and one manager per dispatcher
    (``moe_share_token_dispatcher=False``; dispatchers of a group share DeepEP's buffer)."""

    moe_flex_dispatcher_backend: Optional[str] = None
    moe_share_token_dispatcher: bool = False
    moe_deepep_async_dispatch: bool = True
