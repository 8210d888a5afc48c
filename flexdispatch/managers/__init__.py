"""Ways of moving tokens between ranks, behind one interface (:class:`_DispatchManager`)."""

from .alltoall import _AllToAllManager
from .base import _DispatchManager, _ManagerBase
from .deepep import _DeepepManager, deepep_available, shutdown
from .local import _LocalManager
from . import registry  # noqa: E402  (imports the managers above)

__all__ = ["_DispatchManager", "_ManagerBase", "_LocalManager", "_AllToAllManager", "_DeepepManager",
           "deepep_available", "shutdown", "registry"]
