"""The communication engines NeMo Automodel's dispatcher module names, with that module's API.

Automodel's ``token_dispatcher`` module exposes, at module level, the fused operations of the
engines it drives (they come from its ``fused_a2a``): DeepEP's ``fused_dispatch`` /
``fused_combine`` / ``set_deepep_num_sms``, UCCL-EP's ``uccl_fused_dispatch`` /
``uccl_fused_combine`` / ``set_uccl_num_sms``, HybridEP's ``hybrid_ep_dispatch`` /
``hybrid_ep_combine``, and HybridEP's initialized-capacity registry. Each is None when its
engine does not import, and code (and tests) read, compare and patch them on the module.
flexdispatch exposes the same names on its package (resolved at first access, so importing
flexdispatch imports no engine), implemented here over flexdispatch's own buffer registries:

* ``fused_dispatch(x [T, H], token_indices [T, K], token_probs [T, K] float32, num_experts, group,
  async_finish=False, allocate_on_comm_stream=False)`` -> ``(recv_x [R, H], recv_indices [R, K]
  (local expert or -1), recv_probs [R, K] float32, tokens_per_expert [E_local] int64 (CPU),
  handle)``, differentiable (its backward is a combine);
* ``fused_combine(x [R, H], group, handle, async_finish=False, allocate_on_comm_stream=False)``
  -> ``(combined [T, H], None)``, differentiable (its backward is a cached dispatch);
* ``hybrid_ep_dispatch(x, routing_map [T, E] bool, probs [T, E], group, num_local_experts, ...)``
  -> ``(rows [N, H] expert-major, probs [N], None, tokens_per_expert [E_local], handle)`` and
  ``hybrid_ep_combine(x [N, H], handle, ...)`` -> ``[T, H]`` (HybridEP permutes inside its
  dispatch; DeepEP's hybrid-ep branch, ``deep_ep.HybridEPBuffer``).

An async transfer is waited for before these functions return (Automodel's semantics; the
managers of :mod:`flexdispatch.managers` drive DeepEP directly and overlap for real).

The DeepEP-API functions run DeepEP's (or UCCL-EP's) ``Buffer`` through
:class:`flexdispatch.managers.deepep.BufferRegistry`; UCCL-EP's DeepEP-compatible ``Buffer`` is
the one NeMo Automodel ships (``nemo_automodel.components.moe.uccl_ep.UCCLBuffer``, over
``uccl.ep``). UCCL-EP and HybridEP are untested on real engines: tests drive these functions
and the managers through stand-ins of the engines' documented APIs.
"""

from __future__ import annotations

import importlib
import importlib.util
import weakref
from typing import Optional

import torch

from .managers import deepep

ENGINE_NAMES = ("fused_dispatch", "fused_combine", "set_deepep_num_sms", "uccl_fused_dispatch",
                 "uccl_fused_combine", "set_uccl_num_sms", "hybrid_ep_dispatch", "hybrid_ep_combine")
"""The module-level names whose value depends on which engines import (None when missing)."""


def _hidden_bytes(x: torch.Tensor) -> int:
    return x.shape[1] * max(x.element_size(), 2)


# ---- DeepEP-API engines (DeepEP, UCCL-EP) ----------------------------------------------------


class _DeepEPAPI:
    """The fused dispatch and combine of one engine with DeepEP's ``Buffer`` API."""

    def __init__(self, registry: "deepep.BufferRegistry"):
        self.registry, self.num_sms = registry, 20

    def set_num_sms(self, num_sms: int) -> None:
        """SMs the engine's normal kernels may use (its ``Buffer.set_num_sms``)."""
        self.num_sms = num_sms
        self.registry.buffer_class().set_num_sms(num_sms)

    def dispatch(self, x, token_indices, token_probs, num_experts, group, async_finish=False,
                 allocate_on_comm_stream=False):
        buffer = self.registry.get(group, _hidden_bytes(x), self.num_sms)
        recv_x, recv_idx, recv_probs, handle, counts, event, _, _ = deepep.DeepepDispatch.apply(
            x.contiguous(), token_indices, token_probs, num_experts, buffer, async_finish,
            allocate_on_comm_stream, 0, False, False)
        if event is not None:
            event.current_stream_wait()
        return recv_x, recv_idx, recv_probs, torch.tensor(counts, dtype=torch.int64), handle

    def combine(self, x, group, handle, async_finish=False, allocate_on_comm_stream=False):
        buffer = self.registry.get(group, _hidden_bytes(x), self.num_sms)
        combined, event = deepep.DeepepCombine.apply(x, buffer, handle, async_finish, allocate_on_comm_stream)
        if event is not None:
            event.current_stream_wait()
        return combined, None


def uccl_buffer_class() -> Optional[type]:
    """UCCL-EP's DeepEP-compatible ``Buffer`` (None when UCCL-EP or that class is missing)."""
    if importlib.util.find_spec("uccl") is None and importlib.util.find_spec("ep") is None:
        return None
    try:
        return importlib.import_module("nemo_automodel.components.moe.uccl_ep").UCCLBuffer
    except Exception:  # noqa: BLE001 - any failure means "not usable"
        return None


_uccl_registry = deepep.BufferRegistry(uccl_buffer_class, name="UCCL-EP")
deepep.REGISTRIES.append(_uccl_registry)


# ---- HybridEP ----------------------------------------------------------------------------------


def hybrid_ep_buffer_class() -> Optional[type]:
    """``deep_ep.HybridEPBuffer`` (DeepEP's hybrid-ep branch), or None."""
    try:
        return importlib.import_module("deep_ep").HybridEPBuffer
    except Exception:  # noqa: BLE001 - any failure means "not usable"
        return None


class _HybridEP:
    """HybridEP's buffers (one per group, hidden size and local expert count) and its
    initialized-capacity registry (Automodel's ``get/publish_hybrid_ep_initialized_capacity``)."""

    def __init__(self):
        self.buffers: dict = {}
        self.signature: Optional[tuple] = None
        self.capacity = 0

    def buffer(self, group, x: torch.Tensor, num_local_experts: int, sms_dispatch: int, sms_combine: int):
        key = (id(group), x.shape[-1], num_local_experts, sms_dispatch, sms_combine)
        entry = self.buffers.get(key)
        if entry is None or entry[0]() is not group:  # (groups by weak reference: see managers/groups.py)
            buffer = hybrid_ep_buffer_class()(
                group=group, hidden_dim=x.shape[-1], max_num_of_tokens_per_rank=max(x.shape[0], 1),
                num_local_experts=num_local_experts, use_fp8=False, num_sms_dispatch_api=sms_dispatch,
                num_sms_combine_api=sms_combine)
            entry = self.buffers[key] = (weakref.ref(group), buffer)
        return entry[1]

    def initialized_capacity(self, signature: tuple) -> int:
        if self.signature is not None and self.signature != signature:
            raise RuntimeError("HybridEP's process-global buffer is already active with an incompatible signature")
        return self.capacity

    def publish_capacity(self, signature: tuple, capacity: int) -> None:
        self.initialized_capacity(signature)
        self.signature, self.capacity = signature, max(self.capacity, capacity)

    def release(self) -> int:
        count = len(self.buffers)
        self.buffers = {}
        return count


hybrid_buffers = _HybridEP()


class _HybridEPHandle:
    """HybridEP's handle of a dispatch, with the buffer that made it (its combine needs it)."""

    def __init__(self, buffer, inner):
        self.buffer, self.inner = buffer, inner


class _HybridEPDispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, routing_map, probs, group, num_local_experts, sms_dispatch, sms_combine,
                num_permuted_tokens, pad_multiple, extra):
        buffer = hybrid_buffers.buffer(group, x, num_local_experts, sms_dispatch, sms_combine)
        rows, out_probs, scaling, tokens_per_expert, inner = buffer.dispatch_with_permute(
            hidden=x, routing_map=routing_map, probs=probs, scaling_factor=None,
            num_of_experts_per_rank=num_local_experts, pad_multiple=pad_multiple,
            num_permuted_tokens=num_permuted_tokens, non_blocking=num_permuted_tokens is not None, **extra)
        handle = _HybridEPHandle(buffer, inner)
        ctx.buffer, ctx.handle, ctx.pad_multiple = buffer, inner, pad_multiple
        ctx.fuse = {k: v for k, v in extra.items() if k == "fuse_permute"}
        ctx.num_permuted_tokens = num_permuted_tokens
        return rows, out_probs, scaling, tokens_per_expert, handle

    @staticmethod
    def backward(ctx, grad_rows, grad_probs, _scaling, _counts, _handle):
        grad_x, grad_p = ctx.buffer.combine_with_unpermute(hidden=grad_rows, probs=grad_probs, handle=ctx.handle,
                                                            pad_multiple=ctx.pad_multiple, **ctx.fuse)
        return grad_x, None, grad_p, None, None, None, None, None, None, None


class _HybridEPCombine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, handle, num_permuted_tokens, pad_multiple, extra):
        buffer, handle = handle.buffer, handle.inner
        combined, _ = buffer.combine_with_unpermute(hidden=x, handle=handle, pad_multiple=pad_multiple, **extra)
        ctx.buffer, ctx.handle, ctx.pad_multiple, ctx.extra = buffer, handle, pad_multiple, extra
        ctx.num_permuted_tokens = num_permuted_tokens
        return combined

    @staticmethod
    def backward(ctx, grad):
        rows = ctx.buffer.dispatch_with_permute(hidden=grad, scaling_factor=None, handle=ctx.handle,
                                                pad_multiple=ctx.pad_multiple,
                                                num_permuted_tokens=ctx.num_permuted_tokens, **ctx.extra)[0]
        return rows, None, None, None, None


def _hybrid_ep_dispatch(x, routing_map, probs, group, num_local_experts, num_sms_dispatch_api=24,
                        num_sms_combine_api=24, num_permuted_tokens=None, pad_multiple=None, *, topk_idx=None,
                        num_experts=None, fuse_permute=False, num_sms_preprocessing_api=None,
                        num_blocks_permute=None, num_blocks_unpermute=None):
    """HybridEP's fused permute + dispatch (see the module docstring). The keyword-only options
    are passed to ``HybridEPBuffer.dispatch_with_permute`` only when set (newer HybridEP)."""
    extra = {k: v for k, v in dict(topk_idx=topk_idx, num_experts=num_experts, fuse_permute=fuse_permute or None,
                                   num_sms_preprocessing_api=num_sms_preprocessing_api,
                                   num_blocks_permute=num_blocks_permute,
                                   num_blocks_unpermute=num_blocks_unpermute).items() if v is not None}
    return _HybridEPDispatch.apply(x, routing_map, probs, group, num_local_experts, num_sms_dispatch_api,
                                   num_sms_combine_api, num_permuted_tokens, pad_multiple, extra)


def _hybrid_ep_combine(x, handle, num_permuted_tokens=None, pad_multiple=None, *, fuse_permute=False):
    """HybridEP's fused unpermute + combine of the rows ``x [N, H]`` its dispatch returned with
    ``handle``."""
    if not isinstance(handle, _HybridEPHandle):
        raise TypeError(f"handle: expected the handle hybrid_ep_dispatch returned, got {type(handle).__name__}")
    extra = {"fuse_permute": True} if fuse_permute else {}
    return _HybridEPCombine.apply(x, handle, num_permuted_tokens, pad_multiple, extra)


def get_hybrid_ep_initialized_capacity(signature: tuple) -> int:
    """The largest token capacity HybridEP's process-global buffer was initialized for under
    ``signature`` (0 before any); RuntimeError when a buffer with another signature is active."""
    return hybrid_buffers.initialized_capacity(signature)


def publish_hybrid_ep_initialized_capacity(signature: tuple, capacity: int) -> None:
    """Record that HybridEP's buffer is initialized for ``capacity`` tokens under ``signature``."""
    hybrid_buffers.publish_capacity(signature, capacity)


# ---- resolution ----------------------------------------------------------------------------------

_resolved: dict = {}


def _resolve_all() -> dict:
    """Each engine name's value: its function, or None when the engine does not import."""
    deep_ep = deepep.deepep_available()[0]
    api = _DeepEPAPI(deepep.buffers)
    uccl = _DeepEPAPI(_uccl_registry) if uccl_buffer_class() is not None else None
    hybrid = hybrid_ep_buffer_class() is not None
    return {
        "fused_dispatch": api.dispatch if deep_ep else None,
        "fused_combine": api.combine if deep_ep else None,
        "set_deepep_num_sms": api.set_num_sms if deep_ep else None,
        "uccl_fused_dispatch": uccl.dispatch if uccl else None,
        "uccl_fused_combine": uccl.combine if uccl else None,
        "set_uccl_num_sms": uccl.set_num_sms if uccl else None,
        "hybrid_ep_dispatch": _hybrid_ep_dispatch if hybrid else None,
        "hybrid_ep_combine": _hybrid_ep_combine if hybrid else None,
    }


def forget() -> None:
    """Resolve the engine names again at their next access (after an engine was installed or
    removed in a running process; tests use it)."""
    _resolved.clear()


def resolve(name: str):
    """The value of engine name ``name`` (decided once per process, at first access)."""
    if not _resolved:
        _resolved.update(_resolve_all())
    return _resolved[name]


def is_native_deepep(dispatch_fn) -> bool:
    """Whether ``dispatch_fn`` is flexdispatch's own DeepEP ``fused_dispatch`` (the DeepEP manager
    then drives DeepEP directly: in-kernel agreement, FP8, sync-free) rather than an engine
    plugged in through ``_dispatch_fn``."""
    return dispatch_fn is not None and dispatch_fn is resolve("fused_dispatch")
