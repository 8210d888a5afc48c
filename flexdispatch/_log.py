"""The package logger, ``logging.getLogger("flexdispatch")``.

It prints to stderr by itself (a kernel build that takes a minute should not be silent), at
the level named by ``FLEXDISPATCH_LOG_LEVEL`` (default ``INFO``). Applications that configure
logging themselves can remove that handler with :func:`use_application_logging`.
"""

import logging
import os
import sys

logger = logging.getLogger("flexdispatch")

_handler = logging.StreamHandler(sys.stderr)
_handler.setFormatter(logging.Formatter("[flexdispatch] %(message)s"))


def _configure() -> None:
    if _handler not in logger.handlers:
        logger.addHandler(_handler)
    level = os.environ.get("FLEXDISPATCH_LOG_LEVEL", "INFO").upper()
    logger.setLevel(getattr(logging, level, logging.INFO))
    logger.propagate = False


def use_application_logging() -> None:
    """Hand flexdispatch's records to the application's handlers instead of stderr."""
    logger.removeHandler(_handler)
    logger.propagate = True
    logger.setLevel(logging.NOTSET)


_configure()
