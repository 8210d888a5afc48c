"""The package logger, ``logging.getLogger("flexdispatch")``.

flexdispatch attaches no handler: where records go is the application's choice (a library
that prints by itself cannot be silenced or redirected properly). Warnings still reach stderr
when nothing is configured (Python's last-resort handler). Long work that must not look like
a hang, the first kernel build (tens of seconds) and the wait for another process's build, is
said by :func:`progress`: through the logger at INFO when the application configured logging,
else as one line on stderr. ``FLEXDISPATCH_LOG_LEVEL`` sets the logger's level (default: the
application's).
"""

import logging
import sys

from . import envs

logger = logging.getLogger("flexdispatch")
_level = envs.log_level()
if _level:
    logger.setLevel(getattr(logging, _level.upper(), logging.INFO))


def progress(message: str, *args) -> None:
    """Say what long work is under way: an INFO record when logging is configured, else one
    stderr line (so a cold kernel build is never silent)."""
    if logger.hasHandlers():
        logger.info(message, *args)
    elif logger.isEnabledFor(logging.INFO) or not _level:
        print("[flexdispatch] " + (message % args if args else message), file=sys.stderr, flush=True)


def use_application_logging() -> None:
    """Kept for compatibility: flexdispatch's records always go to the application's handlers."""
