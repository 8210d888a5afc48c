"""flexdispatch: a drop-in, faster and safer MoE flex token dispatcher for PyTorch.

``import flexdispatch as token_dispatcher`` stands in for NeMo Automodel's
``nemo_automodel.components.moe.megatron.token_dispatcher``, both as it is today
(``TokenDispatcherConfig``, HybridEP and UCCL-EP, per-backend shared managers) and as it was
first published (``MoEConfig``, ``shared_comm_manager``, ``get_dispached_metadata``); plus the
permutation ops. Importing builds nothing, imports no communication engine and creates no
CUDA context; the first dispatcher compiles the kernels (once per machine and architecture,
cached; ``python -m flexdispatch build`` does it ahead).

The engines' module-level functions (``fused_dispatch``, ``fused_combine``,
``set_deepep_num_sms``, ``uccl_fused_dispatch``, ``uccl_fused_combine``, ``set_uccl_num_sms``,
``hybrid_ep_dispatch``, ``hybrid_ep_combine``) are resolved at first access: each is None when
its engine does not import, as in Automodel (see :mod:`flexdispatch.engines`).
"""

import logging  # noqa: F401  (names of the reference module's namespace)
import os  # noqa: F401
from abc import ABC, abstractmethod  # noqa: F401
from dataclasses import dataclass  # noqa: F401
from typing import List, Literal, Optional, Tuple  # noqa: F401

import torch  # noqa: F401
from torch import nn  # noqa: F401

from . import _log  # noqa: F401  (configures the "flexdispatch" logger)
from ._log import use_application_logging
from ._version import __version__
from . import ops, reference
from .automodel_ops import fused_indices_to_multihot, permute, unpermute
from .config import MoEConfig, TokenDispatcherConfig, expert_capacity
from .dispatcher import SHARING_DEEPEP_MANAGER, MoEFlexTokenDispatcher, shutdown
from .managers import (_AllToAllManager, _DeepepManager, _DispatchManager, _LocalManager, _NvlinkManager,
                       deepep_available)
from ._jit import CacheNotWritableError
from .managers.collectives import PeerTimeoutError
from .managers.deepep import EngineUnavailableError
from .managers.groups import ConcurrentCallError, GroupDestroyedError
from .managers.hybridep import (_HYBRIDEP_TOKEN_ALIGNMENT, _STATIC_ROUTING_PAD_PIN, HybridEPPipelineRuntimeInitializer,
                                _HybridEPManager, _HybridEPMetadataProcessor)
from .engines import get_hybrid_ep_initialized_capacity, publish_hybrid_ep_initialized_capacity
from .rowmap import RowIdMap
from . import engines as _engines


def __getattr__(name):
    """The engines' functions, resolved at first access (importing flexdispatch imports no engine)."""
    if name in _engines.ENGINE_NAMES:
        return _engines.resolve(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "SHARING_DEEPEP_MANAGER", "TokenDispatcherConfig", "MoEConfig", "MoEFlexTokenDispatcher", "_DispatchManager",
    "_DeepepManager", "_HybridEPManager", "_HybridEPMetadataProcessor", "HybridEPPipelineRuntimeInitializer",
    "_AllToAllManager", "_LocalManager", "_NvlinkManager", "EngineUnavailableError", "PeerTimeoutError",
    "ConcurrentCallError", "GroupDestroyedError", "CacheNotWritableError", "RowIdMap", "ops", "reference",
    "deepep_available", "shutdown", "expert_capacity", "use_application_logging", "permute", "unpermute",
    "fused_indices_to_multihot", "get_hybrid_ep_initialized_capacity", "publish_hybrid_ep_initialized_capacity",
    "__version__", *_engines.ENGINE_NAMES,
]
