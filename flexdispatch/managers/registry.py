"""The backends, one entry each, and the one function that chooses among them.

Adding a backend: write its manager (a :class:`~.base._ManagerBase` subclass with
``_dispatch`` and ``_combine``) in a module of its own, give it a probe (why it cannot serve
a group or a call; None when it can), and add one :class:`Backend` line to ``BACKENDS``.
``moe_flex_backend`` then accepts its name, and ``auto`` considers it in ``AUTO_ORDER``.

``auto`` takes a backend only where the benchmarks show it ahead of the next one: DeepEP where
it can serve; else, for CUDA tensors on an NCCL group of one node, the NVLink backend (ahead of
NCCL's all-to-all at every shape measured on 2 and 4 H200s, docs/PERFORMANCE.md); else the
all-to-all manager (any group, CPU included).
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Callable, Optional

import torch
import torch.distributed as dist

from .. import ops
from .._log import logger
from ..config import sm_setting
from ..spec import LayerSpec
from . import deepep
from .alltoall import _AllToAllManager
from .base import _DispatchManager, group_size_rank
from .hybridep import _HybridEPManager
from .local import _LocalManager
from .nvlink import _NvlinkManager


def _group_size(group) -> int:
    return group_size_rank(group)[0]


def _local_probe(group, **call) -> Optional[str]:
    size = _group_size(group)
    return None if size == 1 else f"the local manager serves a group of one rank, got {size}"


def _alltoall_probe(group, **call) -> Optional[str]:
    if group is None:
        return ("needs an expert-parallel process group (ep_group); with ep_group=None there is one "
                "rank: use 'local' or 'auto'")
    return None


def _deepep_probe(group, *, device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None,
                  hidden: Optional[int] = None, topk: Optional[int] = None) -> Optional[str]:
    return deepep.unusable_reason(group, device, dtype, hidden, topk)


def _nvlink_probe(group, *, device: Optional[torch.device] = None, **call) -> Optional[str]:
    if group is None:
        return ("needs an expert-parallel process group (ep_group); with ep_group=None there is one "
                "rank: use 'local' or 'auto'")
    return None  # one node is checked at the first call (the group's hosts are compared)


def _nvlink_auto_probe(group, *, device: Optional[torch.device] = None, **call) -> Optional[str]:
    """Where ``auto`` does not take the NVLink backend although it could serve: its CPU
    emulation (all-gathers, for tests) and anything but NCCL are slower than the all-to-all."""
    if device is not None and device.type != "cuda":
        return f"it moves CUDA tensors, got {device.type} ones"
    backend = str(dist.get_backend(group)).lower()
    if "nccl" not in backend:
        return f"it needs an NCCL process group, got {backend}"
    if not ops.cuda_kernels_loaded():
        return "flexdispatch's CUDA kernels are not built (see `python -m flexdispatch info`)"
    return None


def _package():
    import flexdispatch  # (the engines' module-level names live there, patchable, as in Automodel)

    return flexdispatch


def _reference_kwargs(group, spec: LayerSpec) -> dict:
    """The keyword arguments Automodel builds its DeepEP-API managers with (tests patch the
    constructor and read them), plus flexdispatch's checked spec."""
    return dict(group=group, router_topk=spec.topk, permute_fusion=spec.permute_fusion,
                capacity_factor=spec.capacity_factor, num_experts=spec.num_experts,
                num_local_experts=spec.num_local_experts, router_dtype=spec.router_dtype,
                moe_router_expert_pad_multiple=spec.pad_multiple, spec=spec)


def _build_deepep(group, spec: LayerSpec, config) -> _DispatchManager:
    """DeepEP named explicitly, as Automodel builds it (ImportError without DeepEP)."""
    set_num_sms = _package().set_deepep_num_sms
    if set_num_sms is not None:
        set_num_sms(sm_setting(config, "moe_deepep_num_sms"))
    return deepep._DeepepManager(**_reference_kwargs(group, spec))


def _build_uccl_ep(group, spec: LayerSpec, config) -> _DispatchManager:
    """The DeepEP manager over UCCL-EP's DeepEP-compatible functions (DeepEP's when UCCL-EP is
    missing, as in Automodel; ImportError when neither imports)."""
    package = _package()
    if package.set_uccl_num_sms is not None:
        package.set_uccl_num_sms(sm_setting(config, "moe_deepep_num_sms"))
    return deepep._DeepepManager(**_reference_kwargs(group, spec), _dispatch_fn=package.uccl_fused_dispatch,
                                 _combine_fn=package.uccl_fused_combine)


HYBRIDEP_OPTIONS = ("moe_hybridep_num_sms", "moe_hybridep_permute_fusion", "moe_hybridep_compact_routing",
                    "moe_hybridep_num_sms_preprocessing", "moe_hybridep_num_blocks_permute",
                    "moe_hybridep_num_blocks_unpermute")


def _build_hybridep(group, spec: LayerSpec, config) -> _DispatchManager:
    """HybridEP, as Automodel builds it (ImportError without HybridEP); the pad multiple of the
    config applies (Automodel leaves HybridEP's unset)."""
    manager = _HybridEPManager(
        group=group, num_local_experts=spec.num_local_experts, num_experts=spec.num_experts, router_topk=spec.topk,
        permute_fusion=spec.permute_fusion, benchmark_static_routing=config.moe_benchmark_static_routing,
        **{name: sm_setting(config, name) for name in HYBRIDEP_OPTIONS})
    manager.pad_multiple, manager.router_dtype = spec.pad_multiple, spec.router_dtype
    return manager


def _engine_probe(group, **call) -> Optional[str]:
    return None  # (an engine that does not import raises ImportError when its manager is built)


@dataclasses.dataclass(frozen=True)
class Backend:
    """A way of moving tokens.

    Attributes:
        name: the ``moe_flex_backend`` value.
        manager: its manager class.
        probe: ``probe(group, *, device, dtype, hidden, topk)``: why it cannot serve (None: it
            can); arguments left out are not judged.
        needs_tensors: whether ``auto`` must see a call's tensors before it can choose this one.
        auto_probe: why ``auto`` passes it over where it could serve (slower there), with the
            same arguments as ``probe``; None: ``probe`` alone decides.
        one_node: ``auto`` takes it only when the group's ranks share one host (compared in the
            first call's vote).
        build: ``build(group, spec, config)``, how a dispatcher that names this backend builds
            its manager (None: ``manager(group=group, spec=spec)``, as ``auto`` builds them).
        options: the config fields besides the spec that make two of its managers differ
            (dispatchers share a manager only when these agree too).
    """

    name: str
    manager: type
    probe: Callable[..., Optional[str]]
    needs_tensors: bool = False
    auto_probe: Optional[Callable[..., Optional[str]]] = None
    one_node: bool = False
    build: Optional[Callable[..., _DispatchManager]] = None
    options: tuple = ()


BACKENDS = {b.name: b for b in (
    Backend("local", _LocalManager, _local_probe),
    Backend("alltoall", _AllToAllManager, _alltoall_probe),
    Backend("deepep", deepep._DeepepManager, _deepep_probe, needs_tensors=True, build=_build_deepep,
            options=("moe_deepep_num_sms",)),
    Backend("nvlink", _NvlinkManager, _nvlink_probe, needs_tensors=True, auto_probe=_nvlink_auto_probe,
            one_node=True),
    Backend("hybridep", _HybridEPManager, _engine_probe, build=_build_hybridep,
            options=HYBRIDEP_OPTIONS + ("moe_benchmark_static_routing",)),
    Backend("uccl_ep", deepep._DeepepManager, _engine_probe, build=_build_uccl_ep, options=("moe_deepep_num_sms",)),
)}
AUTO_ORDER = ("deepep", "nvlink", "alltoall")
"""What ``auto`` tries for a group of several ranks, best first (one rank: always local)."""


def unavailable_here(name: str) -> Optional[str]:
    """Why backend ``name`` cannot run on this machine whatever the group (None: it can, for
    some group); what ``python -m flexdispatch info`` and the demo report before any group exists."""
    from .. import engines  # (it imports this package)

    if name in ("local", "alltoall"):
        return None
    if name == "nvlink":
        return None if torch.cuda.is_available() else "no CUDA GPU here (its CPU emulation runs on gloo, for tests)"
    if name == "deepep":
        ok, why = deepep.deepep_available()
        return None if ok else why
    if name == "hybridep":
        return None if engines.hybrid_ep_buffer_class() is not None else "deep_ep.HybridEPBuffer does not import"
    if name == "uccl_ep":
        if engines.uccl_buffer_class() is not None:
            return None
        ok, _ = deepep.deepep_available()
        return None if ok else "neither UCCL-EP nor DeepEP imports (Automodel's uccl_ep falls back to DeepEP)"
    raise ValueError(f"backend: expected one of {backend_names()}, got {name!r}")


def backend_names() -> tuple[str, ...]:
    """Every backend name a config accepts (``moe_flex_backend``, ``moe_flex_dispatcher_backend``)."""
    return ("auto",) + tuple(BACKENDS)


def unusable_reason(name: str, group, **call) -> Optional[str]:
    """Why backend ``name`` cannot serve ``group`` (and the call described by ``call``)."""
    return BACKENDS[name].probe(group, **call)


def auto_passes_over(name: str, group, **call) -> Optional[str]:
    """Why ``auto`` does not take backend ``name`` for this rank's call: it cannot serve it, or
    is slower there than the next one (``Backend.auto_probe``); None: it takes it."""
    backend = BACKENDS[name]
    reason = backend.probe(group, **call)
    if reason is None and backend.auto_probe is not None:
        reason = backend.auto_probe(group, **call)
    return reason


@dataclasses.dataclass(frozen=True)
class Choice:
    """What :func:`choose` decided.

    Attributes:
        name: the backend, or None when ``auto`` must first see a call's tensors
            (``candidate`` names the one it will probe then).
        candidate: the backend to probe at the first dispatch (with ``name`` None).
        passed_over: why ``auto`` did not take a better backend (said once, at the first
            dispatch of CUDA tensors), or None.
    """

    name: Optional[str]
    candidate: Optional[str] = None
    passed_over: Optional[str] = None


def choose(requested: str, group, topk: int, prefer_deepep: bool = True,
           source: str = "config.moe_flex_backend") -> Choice:
    """The backend of a layer from what is known before its first call.

    An explicit backend that cannot serve raises ValueError saying why (naming ``source``, the
    setting that asked for it); an engine (a backend with a ``build``) is taken as named, and its
    manager's constructor raises ImportError when it does not import. ``auto``: local for one
    rank; else the first of ``AUTO_ORDER`` whose probe passes (DeepEP only when
    ``prefer_deepep``), deferred to the first dispatch when that one needs the tensors.
    """
    if requested not in BACKENDS and requested != "auto":
        raise ValueError(f"{source}: expected one of {backend_names()}, got {requested!r}")
    if requested != "auto":
        reason = None if BACKENDS[requested].build is not None else unusable_reason(requested, group, topk=topk)
        if reason is not None:
            raise ValueError(f"{source}={requested!r}: {reason}")
        return Choice(requested)
    if _group_size(group) == 1:
        return Choice("local")
    passed_over = None
    for name in AUTO_ORDER:
        if name == "deepep" and not prefer_deepep:
            continue
        reason = unusable_reason(name, group)
        if reason is None:
            if BACKENDS[name].needs_tensors:
                return Choice(None, candidate=name, passed_over=passed_over)
            return Choice(name, passed_over=passed_over)
        passed_over = passed_over or reason
    raise ValueError(f"config.moe_flex_backend='auto': no backend can serve this group ({passed_over})")


def fallback(name: str, group) -> str:
    """The backend ``auto`` takes when ``name`` (its candidate) cannot serve a call: the next
    of ``AUTO_ORDER`` whose probe passes for the group."""
    for other in AUTO_ORDER[AUTO_ORDER.index(name) + 1:]:
        if unusable_reason(other, group) is None:
            return other
    raise ValueError(f"config.moe_flex_backend='auto': no backend after {name!r} can serve this group")


# Backends logged, per group (weak keys: a group is never kept alive for a log line) and
# without one.
_logged: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_logged_without_group: set = set()


def make_manager(name: str, group, spec: LayerSpec, config=None) -> _DispatchManager:
    """A new manager of backend ``name`` for ``group``: as the backend's ``build`` makes it when a
    config named it, else from the spec (the choice is logged once per group)."""
    backend = BACKENDS[name]
    if backend.build is not None and config is not None:
        manager = backend.build(group, spec, config)
    else:
        manager = backend.manager(group=group, spec=spec)
    logged = _logged_without_group if group is None else _logged.setdefault(group, set())
    if name not in logged:
        logged.add(name)
        logger.info("expert-parallel group of %d rank(s): %s manager", _group_size(group), name)
    return manager
