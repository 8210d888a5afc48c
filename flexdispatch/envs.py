"""Every ``FLEXDISPATCH_*`` environment variable flexdispatch reads, typed, in one place.

Each is read when it is used (not at import), so a test or a launcher can set it late.
"""

from __future__ import annotations

import os
from typing import Optional


def backend() -> Optional[str]:
    """``FLEXDISPATCH_BACKEND``: the backend every dispatcher of this process uses, whatever its
    config says (``auto``, ``local``, ``alltoall``, ``nvlink``, ``deepep``, ``hybridep``,
    ``uccl_ep``). For frameworks that build the config themselves (Automodel writes
    ``moe_flex_dispatcher_backend="deepep"``): ``FLEXDISPATCH_BACKEND=auto`` lets flexdispatch
    choose. Unset or empty: the config decides."""
    value = os.environ.get("FLEXDISPATCH_BACKEND", "").strip()
    return value or None
