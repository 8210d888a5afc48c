"""flexdispatch: a drop-in, faster and safer MoE flex token dispatcher for PyTorch."""

from . import _log  # noqa: F401  (configures the "flexdispatch" logger)
from ._version import __version__
from . import ops, reference
from .rowmap import RowIdMap
