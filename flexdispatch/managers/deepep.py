"""DeepEP on NVLink nodes: fused dispatch/combine kernels, one communication buffer per group.

* Buffers: created lazily at the first dispatch, sized from the hidden size in bytes and the
  group size with DeepEP's own size hints (dispatch and combine configs; the RDMA hint when
  the group spans nodes), grown when a larger hidden size arrives (the outgrown one is kept
  until shutdown, since calls in flight may hold it), shared by every dispatcher of one group
  (only the buffer is shared: per-call state stays with each dispatcher), and destroyed
  explicitly and once (``explicitly_destroy=True``): at interpreter exit, or by
  :func:`shutdown`, which every rank of the group must call (DeepEP's destroy is collective).
* Async (``async_finish=True``): dispatch and combine return as soon as DeepEP's kernels are
  queued on its communication stream; the event is kept and the current stream waits on it at
  the next step of the manager (or at :meth:`_DeepepManager.wait`). Work issued in between
  overlaps with the transfer. Do not read the returned tensors before that wait.
* Agreement without an added host sync: every call starts with an exchange of each rank's
  header (step, failed checks and routing error bits, hidden size, dtype, top-k; see
  :mod:`.agreement`), stream-ordered before DeepEP's layout: on one node one kernel through
  symmetric memory (:mod:`.peer_headers`), else an NCCL all-gather. If any rank's header shows an
  error or disagrees, every rank empties its routing on the device, so DeepEP moves no token,
  and after DeepEP's own host wait for its counts (when the gathered headers have landed in
  pinned memory) every rank raises the same error. Routing is validated by one kernel (range,
  duplicates, non-finite probs) that also drops bad entries, so DeepEP never sees them.
  Limits: DeepEP's combine has no header (a rank that abandons a call while its peers combine
  leaves them in DeepEP's kernels until its timeout); a hidden size that differs across ranks
  is caught unless one rank's DeepEP buffer must also grow for it (buffer growth is collective).
* Sync-free (``sync_free=True``, one node): DeepEP's ``num_worst_tokens`` sizes the received
  tensor for the worst case (every rank's tokens; all ranks must pass the same number of
  tokens), and the permutation is sized for the worst case too, so no host sync happens and
  a layer can be captured in a CUDA graph (inside capture, dispatch and combine run
  stream-ordered whatever ``async_finish`` says). Routing values are then not validated. The
  padding rows' probs are zeroed at the wait, after the transfer has landed.

DeepEP's limits are checked before any collective: bfloat16 hidden states, rows of a multiple
of 32 bytes and at most 16368 bytes (its SM90 build; 16 bytes otherwise), a group size its
config tables know (2, 4, 8 on one node), top-k <= 128, an even SM count.
"""

from __future__ import annotations

import importlib
import importlib.util
import weakref
from typing import Optional

import torch
import torch.distributed as dist

from .. import envs, ops
from ..spec import input_error
from ..reference import FP8_GROUP
from .._log import logger
from . import agreement, gather, peer_headers
from .base import Dispatched, _ManagerBase
from .received import LANDED, received_fp8_rows


class EngineUnavailableError(ImportError, ValueError):
    """A communication engine that was asked for by name does not import here. An ImportError,
    as Automodel raises (code that falls back on ImportError keeps working), and a ValueError,
    as flexdispatch raised for an explicit backend it cannot serve."""

MAX_TOPK = 128  # DeepEP's buffer-size assumption (csrc/config.hpp)
# DeepEP v1.2.1's intranode combine returned wrong sums for 256-byte rows (hidden 128, bf16)
# from 512 tokens a rank on 4 x H200, whatever the buffer size, while its dispatch and our
# steps matched the all-to-all manager bit for bit; 2048- and 4096-byte rows were right up
# to 4096 tokens (docs/PERFORMANCE.md). DeepEP fixed it after v1.2.1 (PR #413, commit abba6ad,
# "Fix hidden_size % 128 != 0 in intranode kernels"); builds with the defect get no rows
# narrower than verified. Its version string did not change (still 1.2.1), so the fix is
# recognised by a feature that arrived a week after it: the configurable index type
# ``topk_idx_t`` (commit da6ca24), or the 2.x package layout (``deep_ep._C``). A build between
# the two commits is treated as defective (narrow rows go to all-to-all: safe, slower).
MIN_VERIFIED_ROW_BYTES = 2048
NVL_MAX_RANKS = peer_headers.NODE_RANKS  # ranks of one NVLink domain DeepEP's intranode kernels serve

_deep_ep = None
_import_error: Optional[str] = None


def _import_deep_ep():
    """Import ``deep_ep`` once; remember why it failed."""
    global _deep_ep, _import_error
    if _deep_ep is None and _import_error is None:
        try:
            _deep_ep = importlib.import_module("deep_ep")
            _deep_ep.Buffer  # noqa: B018 - DeepEP 1.x and 2.x both export Buffer
        except Exception as exc:  # noqa: BLE001 - any import failure means "not usable"
            _deep_ep, _import_error = None, f"deep_ep does not import ({type(exc).__name__}: {exc})"
    return _deep_ep


def deepep_available() -> tuple[bool, str]:
    """``(True, version)`` when ``deep_ep`` imports, else ``(False, reason)``."""
    module = _import_deep_ep()
    if module is None:
        return False, _import_error or "deep_ep does not import"
    return True, getattr(module, "__version__", "unknown version")


def narrow_rows_fixed() -> bool:
    """Whether this DeepEP build has the fix for narrow rows (see MIN_VERIFIED_ROW_BYTES)."""
    module = _import_deep_ep()
    if module is None:
        return False
    if hasattr(module, "topk_idx_t"):
        return True
    try:
        if importlib.util.find_spec("deep_ep._C") is not None:
            return True
        return hasattr(importlib.import_module("deep_ep_cpp"), "topk_idx_t")
    except (ImportError, ValueError, AttributeError):
        return False


def topk_index_dtype() -> torch.dtype:
    """The index dtype this DeepEP build takes (``deep_ep.topk_idx_t``; int64 before it existed)."""
    module = _import_deep_ep()
    dtype = getattr(module, "topk_idx_t", torch.int64)
    return dtype if isinstance(dtype, torch.dtype) else torch.int64


def _sm90_build() -> bool:
    module = _import_deep_ep()
    try:
        return bool(module.Buffer.is_sm90_compiled())
    except AttributeError:
        return False


_group_sizes: dict = {}  # id(deep_ep module) -> its sizes (asked once per module)


def supported_group_sizes() -> tuple[int, ...]:
    """Group sizes this DeepEP build has dispatch and combine configs for (DeepEP is asked:
    its tables differ across versions); beyond one node only with its NVSHMEM (SM90) build."""
    module = _import_deep_ep()
    if module is None:
        return ()
    if id(module) not in _group_sizes:
        sizes = []
        for size in range(2, 1025):
            if size > NVL_MAX_RANKS and (size % NVL_MAX_RANKS or not _sm90_build()):
                continue
            try:
                module.Buffer.get_dispatch_config(size)
                module.Buffer.get_combine_config(size)
            except Exception:  # noqa: BLE001 - DeepEP asserts on sizes it has no config for
                continue
            sizes.append(size)
        _group_sizes[id(module)] = tuple(sizes)
    return _group_sizes[id(module)]


def unusable_reason(group, device: Optional[torch.device] = None, hidden_dtype: Optional[torch.dtype] = None,
                    hidden_size: Optional[int] = None, topk: Optional[int] = None) -> Optional[str]:
    """Why DeepEP cannot serve this call (None when it can)."""
    ok, reason = deepep_available()
    if not ok:
        return reason
    size = 1 if group is None else dist.get_world_size(group)
    if size not in supported_group_sizes():
        return f"DeepEP supports expert-parallel group sizes {supported_group_sizes()}, not {size}"
    if device is not None and device.type != "cuda":
        return f"DeepEP needs CUDA tensors, got {device}"
    if hidden_dtype is not None and hidden_dtype != torch.bfloat16:
        return f"DeepEP's combine needs bfloat16 hidden states, got {hidden_dtype}"
    if hidden_size is not None:
        row_bytes = hidden_size * 2
        # Its SM90 kernels move half rows through 8 KiB TMA slots: an even count of 16-byte
        # vectors, at most 16 KiB - 16 bytes a row (a device assertion otherwise).
        multiple, largest = (32, 16368) if _sm90_build() else (16, None)
        if row_bytes % multiple or (largest is not None and row_bytes > largest):
            limit = f" and at most {largest} bytes" if largest else ""
            return (f"DeepEP needs bf16 rows of a multiple of {multiple} bytes{limit}; hidden size {hidden_size} "
                    f"gives {row_bytes}")
        if row_bytes < MIN_VERIFIED_ROW_BYTES and not narrow_rows_fixed():
            return (f"this DeepEP build predates its fix for narrow rows (wrong combine sums, fixed in DeepEP "
                    f"commit abba6ad); rows of {row_bytes} bytes (hidden {hidden_size}) are below the "
                    f"{MIN_VERIFIED_ROW_BYTES} verified")
    if topk is not None and topk > MAX_TOPK:
        return f"DeepEP supports top-k <= {MAX_TOPK}, got {topk}"
    return None


# ---- the buffer registry ------------------------------------------------------------------


class BufferRegistry:
    """One buffer of a DeepEP-API engine per process group, grown on demand, destroyed once.

    ``buffer_class()`` returns the engine's ``Buffer`` class (DeepEP's, or another engine's with
    DeepEP's API, such as UCCL-EP's). A buffer outgrown by a larger hidden size is retired, not
    destroyed: a call in flight or an autograd graph may still hold its handle. Retired buffers
    are destroyed with the rest at :func:`shutdown` (growth happens a few times per run at most).
    """

    def __init__(self, buffer_class, name: str = "DeepEP"):
        # Groups by weak reference, compared by identity (the engine's Buffer holds its group
        # until destroyed: shutdown() before destroy_process_group drops both).
        self.buffer_class, self._name = buffer_class, name
        self._entries: list[tuple[object, object]] = []  # (weakref to the group, Buffer)
        self._widths: dict = {}  # id(Buffer) -> the bf16 row width it was sized for
        self._retired: list[object] = []
        self._recent: dict = {}  # (id(group), hidden_bytes, num_sms) -> (weakref, Buffer): no size hints per call

    def get(self, group, hidden_bytes: int, num_sms: int):
        buffer_cls = self.buffer_class()
        if buffer_cls.num_sms != num_sms:  # class-wide: the default configs of every call read it
            buffer_cls.set_num_sms(num_sms)
        hit = self._recent.get((id(group), hidden_bytes, num_sms))
        if hit is not None and hit[0]() is group:
            return hit[1]
        buffer = self._get(buffer_cls, group, hidden_bytes)
        self._recent = {k: v for k, v in self._recent.items() if v[0]() is not group}
        self._recent[(id(group), hidden_bytes, num_sms)] = (weakref.ref(group), buffer)
        return buffer

    def _get(self, buffer_cls, group, hidden_bytes: int):
        size = dist.get_world_size(group)
        nvl_bytes = rdma_bytes = 0
        for config in (buffer_cls.get_dispatch_config(size), buffer_cls.get_combine_config(size)):
            nvl_bytes = max(nvl_bytes, config.get_nvl_buffer_size_hint(hidden_bytes, size))
            if size > NVL_MAX_RANKS:
                rdma_bytes = max(rdma_bytes, config.get_rdma_buffer_size_hint(hidden_bytes, size))
        # Diagnostics: a floor on the NVLink buffer, to rule its size in or out of a problem.
        nvl_bytes = max(nvl_bytes, envs.deepep_min_nvl_bytes())
        for i, (g, buffer) in enumerate(self._entries):
            if g() is group:
                if buffer.num_nvl_bytes >= nvl_bytes and buffer.num_rdma_bytes >= rdma_bytes:
                    return buffer
                logger.info("growing the %s buffer of a group of %d for %d-byte rows", self._name, size, hidden_bytes)
                self._retired.append(buffer)
                del self._entries[i]
                break
        else:
            logger.info("creating a %s buffer for a group of %d (%.1f MiB NVLink)", self._name, size, nvl_bytes / 2**20)
        buffer = buffer_cls(group, nvl_bytes, rdma_bytes, explicitly_destroy=True)
        self._entries.append((weakref.ref(group), buffer))
        self._widths[id(buffer)] = hidden_bytes // 2
        return buffer

    def width(self, group) -> Optional[int]:
        """The bf16 row width the group's current buffer was sized for (None: no buffer yet)."""
        for g, buffer in self._entries:
            if g() is group:
                return self._widths.get(id(buffer))
        return None

    def destroy_all(self) -> int:
        buffers = [b for _, b in self._entries] + self._retired
        self._entries, self._retired, self._recent = [], [], {}
        if buffers and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        for buffer in buffers:
            buffer.destroy()
        return len(buffers)


buffers = BufferRegistry(lambda: _import_deep_ep().Buffer)
REGISTRIES = [buffers]
"""The buffer registry of every DeepEP-API engine in use (DeepEP's; UCCL-EP's joins it)."""


def destroy_buffers() -> int:
    """Destroy every DeepEP-API buffer (after a device sync); how many. Also at exit."""
    return sum(registry.destroy_all() for registry in REGISTRIES)


def shutdown() -> int:
    """Destroy every DeepEP-API buffer of this process, and free the header slots of its groups
    (collective: call it on every rank, before ``torch.distributed.destroy_process_group``).
    Returns how many buffers were destroyed; calling it again is harmless."""
    peer_headers.release()
    return destroy_buffers()


# ---- autograd functions ---------------------------------------------------------------------


def _previous_event(buffer, allocate_on_comm_stream: bool):
    """DeepEP allocates on its stream only after an event of the current stream (its contract)."""
    return buffer.capture() if allocate_on_comm_stream else None


class DeepepDispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, token_indices, token_probs, num_experts, buffer, async_finish, allocate_on_comm_stream,
                num_worst_tokens, fp8, keep_fp8):
        """``(recv_x, recv_idx, recv_probs, handle, counts, event, finish, held)``: DeepEP's handle
        (for the combine), its received counts per local expert (a list), the event of an async
        transfer (None otherwise), with ``fp8`` of an async transfer the call that dequantizes
        the received FP8 rows into ``recv_x`` once the event has been waited on (None
        otherwise), and how the received rows are held: with ``keep_fp8`` in FP8, a
        :class:`.received.KeptFp8` (``recv_x`` is then a zero-stride stand-in: the permutation
        dequantizes them), else LANDED."""
        # Stream-ordered layout (a 30 us kernel, no host wait).
        per_rank, per_rdma_rank, per_expert, in_rank, _ = buffer.get_dispatch_layout(token_indices, num_experts)
        event = _previous_event(buffer, allocate_on_comm_stream)
        sent = ops.quantize_fp8(x) if fp8 else x  # DeepEP's FP8 input: (e4m3fn rows, scales [T, H / 128])
        recv_x, recv_idx, recv_probs, counts, handle, after = buffer.dispatch(
            sent, topk_idx=token_indices, topk_weights=token_probs, num_tokens_per_rank=per_rank,
            num_tokens_per_rdma_rank=per_rdma_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
            num_worst_tokens=num_worst_tokens, previous_event=event, async_finish=async_finish,
            allocate_on_comm_stream=allocate_on_comm_stream)
        ctx.buffer, ctx.handle = buffer, handle
        ctx.mark_non_differentiable(recv_idx)
        finish, held = None, LANDED
        if fp8:
            recv_x, finish, held = received_fp8_rows(*recv_x, x.dtype, keep_fp8, async_finish)
        return recv_x, recv_idx, recv_probs, handle, counts, (after if async_finish else None), finish, held

    @staticmethod
    def backward(ctx, grad_x, grad_idx, grad_probs, _handle, _counts, _event, _finish, _held):
        grad_x, grad_probs, _ = ctx.buffer.combine(grad_x.contiguous(), ctx.handle,
                                                   topk_weights=grad_probs.float().contiguous())
        return grad_x, None, grad_probs, None, None, None, None, None, None, None


class DeepepCombine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, buffer, handle, async_finish, allocate_on_comm_stream):
        """``(combined, event)``: the event of an async transfer (None otherwise)."""
        combined, _, event = buffer.combine(x.contiguous(), handle,
                                            previous_event=_previous_event(buffer, allocate_on_comm_stream),
                                            async_finish=async_finish, allocate_on_comm_stream=allocate_on_comm_stream)
        ctx.buffer, ctx.handle = buffer, handle
        return combined, (event if async_finish else None)

    @staticmethod
    def backward(ctx, grad, _event):
        grad_x, _, _, _, _, _ = ctx.buffer.dispatch(grad.contiguous(), handle=ctx.handle)
        return grad_x, None, None, None, None


class _DeepepManager(_ManagerBase):
    """The DeepEP implementation of the manager: :class:`_ManagerBase`'s arguments (the
    reference's constructor, plus ``sync_free`` and ``validate_routing``) and ``num_sms``."""

    name = "deepep"
    supports_sync_free = True
    LAYER_STATE = _ManagerBase.LAYER_STATE + ("_finish", "_mask_after_wait")
    # Nothing pending (also for an instance whose constructor never ran, as tests of the
    # reference build them): wait() is then a no-op.
    _events: tuple = ()
    _finish: tuple = ()
    _mask_after_wait = False

    def __init__(self, group, router_topk: Optional[int] = None, permute_fusion: bool = False,
                 capacity_factor: Optional[float] = None, num_experts: Optional[int] = None,
                 num_local_experts: Optional[int] = None, router_dtype: Optional[str] = None,
                 moe_router_expert_pad_multiple: Optional[int] = None, _dispatch_fn=None, _combine_fn=None, **kwargs):
        super().__init__(group, router_topk, permute_fusion, capacity_factor, num_experts, num_local_experts,
                         router_dtype, moe_router_expert_pad_multiple, **kwargs)
        # The engine, as Automodel's module has it: the functions given, else the package's
        # module-level fused_dispatch / fused_combine (DeepEP's; None without DeepEP), read from
        # the package now, so that code which patches flexdispatch.fused_dispatch reaches it.
        import flexdispatch as package  # (the package imports this module first)
        from .. import engines

        self._fused_dispatch = _dispatch_fn if _dispatch_fn is not None else package.fused_dispatch
        self._fused_combine = _combine_fn if _combine_fn is not None else package.fused_combine
        if self._fused_dispatch is None or self._fused_combine is None:
            raise EngineUnavailableError(
                f"DeepEP manager: {_import_error or 'deep_ep does not import'}, and no DeepEP-compatible engine was "
                f"given (_dispatch_fn / _combine_fn). Install DeepEP (https://github.com/deepseek-ai/DeepEP) or "
                f"UCCL-EP, or let flexdispatch choose one of its own backends (moe_flex_backend='auto', or "
                f"FLEXDISPATCH_BACKEND=auto for configs a framework builds)")
        # flexdispatch's own DeepEP functions: drive DeepEP directly (agreement in the same kernel
        # as the layout, FP8, sync-free). Any other engine: through its two functions.
        self._native = engines.is_native_deepep(self._fused_dispatch)
        if self._native:
            reason = unusable_reason(group, topk=self.router_topk)
            if reason is not None:
                raise ValueError(f"DeepEP manager: {reason}")
        elif self.sync_free or self.fp8_dispatch:
            raise ValueError(f"{'sync_free' if self.sync_free else 'fp8_dispatch'}: not available through an engine "
                             f"plugged in with _dispatch_fn / _combine_fn (its API has no worst-case sizing or FP8 "
                             f"payload); use flexdispatch's DeepEP, NVLink or local manager")
        if self.sync_free and self.world_size > NVL_MAX_RANKS:
            raise ValueError("sync_free: DeepEP's worst-case mode works on one node (group size <= 8)")
        self.num_sms = getattr(self.spec, "num_sms", 20)
        # Owners: _events belongs to the manager (wait() drains any layer's transfers; waiting
        # early is harmless); _finish and _mask_after_wait to the call in flight (wait()
        # consumes them, _release clears them); _hidden_ok and _headers are per-manager caches (a
        # checked signature; a pinned buffer each call's dispatch overwrites before reading it).
        self._events: list = []
        self._finish: list = []  # FP8 dequantization of an async dispatch, run by wait()
        self._mask_after_wait = False
        self._hidden_ok = None  # (device, dtype, hidden) that passed _check_hidden
        self._headers = None  # pinned host copy of the gathered headers [W, WIDTH]
        self._index_dtype = topk_index_dtype() if self._native else torch.int64  # asked of DeepEP once
        # Headers through symmetric memory: a kernel of ours (with the plain-PyTorch fallback of a
        # failed build, the all-gather; a build fails or succeeds alike on every rank of a node).
        self._peer_agreement = self._native and peer_headers.wanted(self.world_size) and ops.cuda_kernels_loaded()

    def wait(self) -> None:
        while self._events:
            self._events.pop().current_stream_wait()
        while self._finish:  # FP8 rows of an async dispatch: dequantize now that they have landed
            with torch.no_grad():
                self._finish.pop()()
        if self._mask_after_wait:
            # Sync-free: the worst-case padding rows' probs are whatever DeepEP's buffer held;
            # zero them only now that the (possibly async) transfer has landed.
            self._mask_after_wait = False
            self.dispatched_probs = self._masked_probs(self.dispatched_indices, self.dispatched_probs)

    def get_dispatched_metadata(self):
        """``(dispatched_indices [R, K], dispatched_probs [R, K])``, after waiting for an async
        dispatch to land."""
        self.wait()
        return super().get_dispatched_metadata()

    def _check_hidden(self, hidden_states: torch.Tensor) -> None:
        key = (hidden_states.device, hidden_states.dtype, hidden_states.shape[1])
        if key == self._hidden_ok:
            return  # checked before: keep the host path to DeepEP's notify short
        if hidden_states.dtype != torch.bfloat16:
            raise input_error(TypeError, "hidden_states",
                              f"DeepEP's combine needs bfloat16 hidden states, got {hidden_states.dtype}")
        reason = unusable_reason(self.group, *key)
        if reason is None and self.fp8_dispatch and key[2] < MIN_VERIFIED_ROW_BYTES and not narrow_rows_fixed():
            reason = (f"FP8 rows of {key[2]} bytes are below the {MIN_VERIFIED_ROW_BYTES} verified on this DeepEP "
                      f"build, which predates its fix for narrow rows (commit abba6ad)")
        if reason is not None:
            raise input_error(ValueError, "hidden_states", reason)
        self._hidden_ok = key

    def _gather_headers(self, hidden_states: Optional[torch.Tensor], indices: torch.Tensor) -> torch.Tensor:
        """Exchange every rank's header on the device (stream-ordered, no host sync), with
        its copy in pinned memory, and return ``indices`` in DeepEP's index dtype, emptied (all
        -1) if any rank's header shows an error or disagrees, so that DeepEP then moves nothing.
        On one node one kernel through symmetric memory (:mod:`.peer_headers`); else a header
        kernel, an NCCL all-gather, a copy and a kernel that decides and masks."""
        values = self._header(agreement.DISPATCH, hidden_states)
        if self._headers is None:
            self._headers = torch.zeros(self.world_size, agreement.WIDTH, dtype=torch.int64, pin_memory=True)
        # Landed once DeepEP's host wait returns; the previous call read it after its own wait.
        if self._peer_agreement and indices.is_cuda:  # one kernel, no collective
            slots = peer_headers.for_group(self.group, indices.device)
            return slots.exchange(values, self._routed.status, indices, self._index_dtype, self._headers)
        header = ops.make_header(indices, values, self._routed.status)
        gathered = torch.empty(self.world_size, agreement.WIDTH, dtype=torch.int64, device=indices.device)
        dist.all_gather_into_tensor(gathered, header, group=self.group)
        self._headers.copy_(gathered, non_blocking=True)
        return ops.mask_unless_agreed(gathered, indices, self._index_dtype)

    def _placeholder(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Zero tokens for a rank whose own check failed: it still takes part in DeepEP's
        exchange (its peers wait for it there; the agreed headers make every rank move nothing).

        Its row width is the one it was offered when that width passes DeepEP's checks (a
        failed check on probs or indices: its peers, offered the same width, grow the shared
        buffer the same way, and growth is collective); else the group's buffer width, which
        grows nothing, cut to whole 128-value groups under FP8 dispatch (the quantizer takes
        no other width; a buffer of another layer may be, say, 1040 wide)."""
        device = torch.device("cuda", torch.cuda.current_device())
        offered, width = self._offered, None
        if isinstance(offered, torch.Tensor) and offered.dim() == 2 and offered.shape[1] > 0:
            try:
                self._check_hidden(offered)
                width = offered.shape[1]
            except (ValueError, TypeError):
                pass
        if width is None:
            width = buffers.width(self.group) or MIN_VERIFIED_ROW_BYTES // 2
        if self.fp8_dispatch and width % FP8_GROUP:
            width = max(width // FP8_GROUP * FP8_GROUP, FP8_GROUP)
        return (torch.empty(0, width, dtype=torch.bfloat16, device=device),
                torch.empty(0, self.router_topk, dtype=torch.int64, device=device),
                torch.empty(0, self.router_topk, dtype=torch.float32, device=device))

    @staticmethod
    def _stream_ordered(async_finish: bool, allocate_on_comm_stream: bool) -> tuple[bool, bool]:
        """Inside CUDA-graph capture the graph orders the work: no async events, no
        allocations on DeepEP's stream. DeepEP allocates on its stream only for async calls."""
        if torch.cuda.is_available() and torch.cuda.is_current_stream_capturing():  # (CPU builds have no CUDA)
            return False, False
        return async_finish, allocate_on_comm_stream and async_finish

    def _dispatch(self, hidden_states: Optional[torch.Tensor], async_finish: bool,
                  allocate_on_comm_stream: bool, keep_fp8: bool, permute_next: bool = False,
                  fp8_rows: bool = False) -> Dispatched:
        async_finish, allocate_on_comm_stream = self._stream_ordered(async_finish, allocate_on_comm_stream)
        if not self._native:
            return self._dispatch_through_engine(hidden_states, async_finish, allocate_on_comm_stream)
        if hidden_states is not None:
            try:
                self._check_hidden(hidden_states)
            except (ValueError, TypeError) as exc:
                self.defer(exc)
                hidden_states = None
        if self.sync_free and self._routed.status is not None:
            # No exchange to agree at: invalid routing (already dropped by the check, so DeepEP
            # never sees it) is counted on this rank and raised by report_dropped_tokens.
            self.count_fault(self._routed.status[0] == 0)
        if self.sync_free and hidden_states is None:
            # No host wait to agree at: a rank's failed check cannot reach its peers here.
            error, self._deferred = self._deferred, None
            self.reset()
            raise error
        if hidden_states is None:
            x, indices, probs = self._placeholder()
        else:
            x, indices, probs = hidden_states.contiguous(), self.token_indices, self.token_probs.float().contiguous()
        agree = not self.sync_free  # needs DeepEP's host wait
        routed = self._gather_headers(hidden_states, indices) if agree else indices.to(self._index_dtype)
        buffer = buffers.get(self.group, x.shape[1] * x.element_size(), self.num_sms)
        worst = x.shape[0] * self.world_size if self.sync_free else 0
        recv_x, recv_idx, recv_probs, handle, counts, event, finish, held = DeepepDispatch.apply(
            x, routed, probs, self.num_experts, buffer, async_finish, allocate_on_comm_stream, worst,
            self.fp8_dispatch, keep_fp8)
        if event is not None:
            self._events.append(event)
        if finish is not None:
            self._finish.append(finish)
        if agree:
            ops.check_pending_errors()  # earlier calls' flags have landed too: DeepEP just waited
            self.agree(self._headers, "(DeepEP moved no token)")  # read at once (Agreement copies it)
        self.handle = handle
        # No op may read the received tensors before wait(): an async transfer is still in
        # flight. DeepEP already zeroes the probs of slots whose expert lives elsewhere; only the
        # worst-case padding rows of sync-free mode need masking, which wait() does.
        self._mask_after_wait = self.sync_free
        if self.sync_free:
            return Dispatched(recv_x, recv_idx, recv_probs, num_out=self._worst_case_rows(worst), held=held,
                              for_combine=buffer)
        return Dispatched(recv_x, recv_idx, recv_probs, received_counts=counts, held=held, for_combine=buffer)

    def _dispatch_through_engine(self, hidden_states: Optional[torch.Tensor], async_finish: bool,
                                 allocate_on_comm_stream: bool) -> Dispatched:
        """Dispatch through the engine's ``fused_dispatch``. Its API has no room for a header, so
        the ranks agree first, in one all-gather read on the host: a failed check on one rank
        makes every rank raise before any of them enters the engine's collective."""
        like = self.token_indices
        if like is None:  # (this rank's check failed before routing)
            like = torch.empty(0, 1, dtype=torch.int64, device=gather.group_device(self.group))
        header = ops.make_header(like, self._header(agreement.DISPATCH, hidden_states), self._routed.status)
        self.agree(agreement.gather_headers(header, self.world_size, self.group,
                                             f"step {self._step} of this layer, dispatch (the header exchange)"),
                    "(no token moved)")
        recv_x, recv_idx, recv_probs, tokens_per_expert, handle = self._fused_dispatch(
            hidden_states, self.token_indices, self.token_probs.float(), self.num_experts, self.group,
            async_finish=async_finish, allocate_on_comm_stream=allocate_on_comm_stream)
        self.handle = handle
        return Dispatched(recv_x, recv_idx, self._masked_probs(recv_idx, recv_probs), held=LANDED,
                          received_counts=tokens_per_expert)

    def _combine(self, hidden_states: torch.Tensor, async_finish: bool,
                 allocate_on_comm_stream: bool) -> torch.Tensor:
        if not self._native:
            combined, _ = self._fused_combine(hidden_states, self.group, self.handle, async_finish=async_finish,
                                              allocate_on_comm_stream=allocate_on_comm_stream)
            return combined
        if hidden_states.dtype != torch.bfloat16:
            raise input_error(TypeError, "hidden_states", f"DeepEP's combine needs bfloat16, got {hidden_states.dtype}")
        async_finish, allocate_on_comm_stream = self._stream_ordered(async_finish, allocate_on_comm_stream)
        combined, event = DeepepCombine.apply(hidden_states, self._dispatched.for_combine, self.handle, async_finish,
                                               allocate_on_comm_stream)
        if event is not None:
            self._events.append(event)
        return combined

    def _release(self) -> None:
        super()._release()
        self._mask_after_wait = False
        self._finish = []
