"""flexdispatch: a drop-in, faster and safer MoE flex token dispatcher for PyTorch.

The public names of the reference module (NeMo Automodel's port of Megatron-Core's flex
token dispatcher) plus the permutation ops. Importing builds nothing and creates no CUDA
context; the first use of the kernels compiles them (once per machine and architecture,
cached; :func:`flexdispatch.ops.load_kernels` does it on request).
"""

from . import _log  # noqa: F401  (configures the "flexdispatch" logger)
from ._log import use_application_logging
from ._version import __version__
from . import ops, reference
from .config import MoEConfig, expert_capacity
from .dispatcher import SHARING_DEEPEP_MANAGER, MoEFlexTokenDispatcher
from .managers import (_AllToAllManager, _DeepepManager, _DispatchManager, _LocalManager, _NvlinkManager,
                       deepep_available, shutdown)
from .rowmap import RowIdMap

__all__ = [
    "SHARING_DEEPEP_MANAGER", "MoEConfig", "MoEFlexTokenDispatcher", "_DispatchManager", "_DeepepManager",
    "_AllToAllManager", "_LocalManager", "_NvlinkManager", "RowIdMap", "ops", "reference", "deepep_available", "shutdown",
    "expert_capacity", "use_application_logging", "__version__",
]
