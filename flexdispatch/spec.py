"""One layer's checked, frozen settings: what a manager needs to know, validated in one place.

Three doors lead to a manager: :class:`~flexdispatch.MoEConfig` (checked when it is built),
the dispatcher's constructor (which adds what depends on the group: the expert split and this
rank's expert ids), and a manager built directly with the reference's constructor arguments.
All three run the checks below, and managers receive a :class:`LayerSpec` they never check
again.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import torch

from . import _kernel_header

ROUTER_DTYPES = (None, "fp32", "fp64")
MAX_EXPERTS = _kernel_header.constant("MaxExperts")  # the most experts one permutation serves
DROPPED_TOKEN_ACTIONS = ("warn", "raise", "ignore")


def input_error(kind: type, argument: str, message: str) -> Exception:
    """``kind(f"{argument}: {message}")`` carrying ``argument`` as an attribute: the argument a
    bad input names, which a group's agreement sends to every rank as a code (so every rank's
    error names it) without reading it back out of the message."""
    error = kind(f"{argument}: {message}")
    error.argument = argument
    return error


def check_floating_tensor(name: str, value) -> None:
    """TypeError naming the argument ``name`` unless ``value`` is a floating-point tensor."""
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        got = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
        raise input_error(TypeError, name, f"expected a floating-point tensor, got {got}")


def int_at_least(name: str, value, low: int) -> int:
    """``value`` if it is an int >= ``low`` (bools excluded), else ValueError naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise input_error(ValueError, name, f"expected an int >= {low}, got {value!r}")
    return value


def expert_capacity(num_tokens: int, topk: int, num_experts: int, capacity_factor: float) -> int:
    """Assignments one expert keeps: ``ceil(num_tokens * topk / num_experts * capacity_factor)``."""
    return math.ceil(num_tokens * topk / num_experts * capacity_factor)


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """A layer's routing and sizing settings, checked (see :meth:`checked`).

    Attributes:
        num_experts: E across the group.
        num_local_experts: E / W.
        world_size: W, the expert-parallel group size.
        topk: K.
        capacity_factor: per-expert capacity factor, or None.
        router_dtype: "fp32", "fp64" or None.
        pad_multiple: pad every local expert's rows to this multiple, or None.
        sync_free: worst-case sized outputs, no host sync.
        max_tokens_per_expert: the sync-free bound, or None.
        validate_routing: check routing values before the first collective.
        num_sms: SMs DeepEP's kernels may use.
        permute_fusion: the reference's flag (accepted, unused).
        fp8_dispatch: hidden states travel as float8 e4m3fn with per-128 scales.
        nvlink_max_blocks: thread blocks each NVLink transfer kernel may launch (0: no cap).
    """

    num_experts: int
    num_local_experts: int
    world_size: int
    topk: int
    capacity_factor: Optional[float] = None
    router_dtype: Optional[str] = "fp32"
    pad_multiple: Optional[int] = None
    sync_free: bool = False
    max_tokens_per_expert: Optional[int] = None
    validate_routing: bool = True
    num_sms: int = 20
    permute_fusion: bool = False
    fp8_dispatch: bool = False
    nvlink_max_blocks: int = 0

    @classmethod
    def checked(cls, *, names: Optional[dict] = None, **fields) -> "LayerSpec":
        """Build a spec, raising ValueError naming the first bad field. ``names`` maps a field
        to the name the caller knows it by (``moe_router_topk`` for a config, say)."""
        check_fields(names=names, **fields)
        return cls(**fields)


CONFIG_NAMES = {"num_experts": "num_moe_experts", "topk": "moe_router_topk",
                 "capacity_factor": "moe_expert_capacity_factor", "router_dtype": "moe_router_dtype",
                 "pad_multiple": "moe_router_expert_pad_multiple", "sync_free": "moe_sync_free",
                 "max_tokens_per_expert": "moe_max_tokens_per_expert", "num_sms": "moe_deepep_num_sms",
                 "fp8_dispatch": "moe_fp8_dispatch", "nvlink_max_blocks": "moe_nvlink_max_blocks"}
"""The MoEConfig field of every spec field (error messages name what the user wrote)."""

MANAGER_NAMES = {"topk": "router_topk", "pad_multiple": "moe_router_expert_pad_multiple"}
"""The reference manager constructor's argument of every spec field that it names differently."""


def check_fields(*, names: Optional[dict] = None, num_experts=None, topk=None, world_size: int = 1,
                 num_local_experts=None, capacity_factor=None, router_dtype="fp32", pad_multiple=None,
                 sync_free: bool = False, max_tokens_per_expert=None, num_sms: int = 20, fp8_dispatch: bool = False,
                 nvlink_max_blocks: int = 0, validate_routing: bool = True, **_ignored) -> None:
    """Every check of a layer's settings, in one place. ``names`` maps field names to the
    caller's (config fields, the reference's manager arguments)."""
    names = names or {}

    def name(field: str) -> str:
        return names.get(field, field)

    if num_experts is None:
        raise ValueError(f"{name('num_experts')}: required")
    int_at_least(name("num_experts"), num_experts, 1)
    if validate_routing and num_experts > MAX_EXPERTS:  # (the kernels' limit on a checked route)
        raise ValueError(f"{name('num_experts')}: routing validation serves at most {MAX_EXPERTS} experts, got "
                         f"{num_experts}")
    int_at_least(name("topk"), topk, 1)
    if topk > num_experts:
        raise ValueError(f"{name('topk')}: expected at most {name('num_experts')}={num_experts}, got {topk}")
    if num_experts % world_size:
        raise ValueError(f"{name('num_experts')}: {num_experts} experts cannot be split evenly over "
                         f"{world_size} expert-parallel ranks")
    if num_local_experts is not None and num_local_experts != num_experts // world_size:
        raise ValueError(f"{name('num_local_experts')}: expected {name('num_experts')} / EP size = {num_experts} / "
                         f"{world_size} = {num_experts // world_size}, got {num_local_experts!r}")
    if capacity_factor is not None:
        cf = capacity_factor
        if isinstance(cf, bool) or not isinstance(cf, (int, float)) or not (cf > 0 and math.isfinite(cf)):
            raise ValueError(f"{name('capacity_factor')}: expected None or a finite number > 0, got {cf!r}")
    if pad_multiple is not None:
        int_at_least(name("pad_multiple"), pad_multiple, 1)
    if router_dtype not in ROUTER_DTYPES:
        raise ValueError(f"{name('router_dtype')}: expected one of {ROUTER_DTYPES}, got {router_dtype!r}")
    if max_tokens_per_expert is not None:
        int_at_least(name("max_tokens_per_expert"), max_tokens_per_expert, 1)
        if not sync_free:
            raise ValueError(f"{name('max_tokens_per_expert')}: bounds the sync-free mode's permuted tensor; set "
                             f"{name('sync_free')}=True (outside it the permuted tensor is sized exactly; use "
                             f"{name('capacity_factor')} to drop tokens there)")
    if not isinstance(fp8_dispatch, bool):
        raise ValueError(f"{name('fp8_dispatch')}: expected a bool, got {fp8_dispatch!r}")
    int_at_least(name("nvlink_max_blocks"), nvlink_max_blocks, 0)
    int_at_least(name("num_sms"), num_sms, 2)
    if num_sms % 2:
        raise ValueError(f"{name('num_sms')}: DeepEP needs an even SM count, got {num_sms}")
