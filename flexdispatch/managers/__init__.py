"""Ways of moving tokens between ranks, behind one interface (:class:`_DispatchManager`)."""

from .alltoall import _AllToAllManager
from .base import _DispatchManager, _ManagerBase
from . import deepep, groups, peer_buffers, peer_headers
from .deepep import _DeepepManager, deepep_available
from .local import _LocalManager
from .nvlink import _NvlinkManager
from . import registry  # noqa: E402  (imports the managers above)



def shutdown() -> int:
    """Free every communication buffer of this process: DeepEP's (and UCCL-EP's), HybridEP's and
    the NVLink manager's peer buffers (collective: call it on every rank, before
    ``torch.distributed.destroy_process_group``), and forget groups found called from two
    threads at once. Returns how many buffers were freed; calling it again is harmless.
    (flexdispatch holds process groups by weak reference only: nothing of it keeps a group
    alive past destroy_process_group, see managers/groups.py.)"""
    from .. import engines  # (it imports this package)

    groups.reset_guards()
    return deepep.shutdown() + engines.hybrid_buffers.release() + peer_buffers.release()


def at_exit() -> None:
    """What interpreter exit undoes, in this order and without a collective (peers may be gone):
    DeepEP-API buffers destroyed, the header slots and NVLink transports forgotten (the driver
    frees their memory), then a gloo group the application left undestroyed destroyed (see
    :mod:`.groups`). Run by flexdispatch's one exit hook, after the shared managers are forgotten."""
    deepep.destroy_buffers()
    peer_headers.drop_at_exit()
    peer_buffers.drop_at_exit()
    groups.destroy_gloo_group_at_exit()


__all__ = ["_DispatchManager", "_ManagerBase", "_LocalManager", "_AllToAllManager", "_DeepepManager",
           "_NvlinkManager", "deepep_available", "shutdown", "registry"]
