"""Every environment variable flexdispatch reads, typed and checked, in one place.

Each is read when it is used (not at import), so a test or a launcher can set it late. A bad
value raises ValueError naming the variable. docs/DESIGN.md lists them with their defaults.

Besides the settings below, ``FLEXDISPATCH_TESTING`` holds the *testing switches*: variants of
an algorithm that give the same results by another path, kept so that benchmarks and tests can
compare the two (``FLEXDISPATCH_TESTING="nvlink_barrier=torch,nvlink_pulls=from_row_0"``, or
:func:`testing_switches` in-process). They are not settings for production runs.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from typing import Callable, Iterator, Optional


def _text(name: str) -> Optional[str]:
    """The variable's value without surrounding blanks; None when unset or empty."""
    value = os.environ.get(name, "").strip()
    return value or None


def _flag(name: str) -> bool:
    return _text(name) == "1"


@functools.lru_cache(maxsize=32)
def _seconds(name: str, text: Optional[str], default: float, low_open: bool) -> float:
    """``text`` parsed as seconds (cached per value: some are read at every collective)."""
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (0 < value <= 1e9 if low_open else 0 <= value <= 1e9):
        raise ValueError(f"{name}: expected seconds in {'(0' if low_open else '[0'}, 1e9], got {text!r}")
    return value


# ---- what runs ------------------------------------------------------------------------------


def backend() -> Optional[str]:
    """``FLEXDISPATCH_BACKEND``: the backend every dispatcher of this process uses, whatever its
    config says (``auto``, ``local``, ``alltoall``, ``nvlink``, ``deepep``, ``hybridep``,
    ``uccl_ep``). For frameworks that build the config themselves (Automodel writes
    ``moe_flex_dispatcher_backend="deepep"``): ``FLEXDISPATCH_BACKEND=auto`` lets flexdispatch
    choose. Unset or empty: the config decides."""
    return _text("FLEXDISPATCH_BACKEND")


def jit_mode() -> str:
    """``FLEXDISPATCH_JIT``: ``auto`` (default: a failed kernel build warns and the plain
    PyTorch ops serve), ``1`` (a failed build raises) or ``0`` (build nothing)."""
    mode = (_text("FLEXDISPATCH_JIT") or "auto").lower()
    if mode not in ("auto", "0", "1"):
        raise ValueError(f"FLEXDISPATCH_JIT: expected auto, 0 or 1, got {mode!r}")
    return mode


def log_level() -> Optional[str]:
    """``FLEXDISPATCH_LOG_LEVEL``: the ``flexdispatch`` logger's level (``DEBUG``, ``INFO``, ...);
    None: the application's."""
    return _text("FLEXDISPATCH_LOG_LEVEL")


# ---- the kernel build -----------------------------------------------------------------------


def cache_dir() -> Optional[str]:
    """``FLEXDISPATCH_CACHE_DIR``: root of the kernel cache (None: ``~/.cache/flexdispatch``)."""
    return _text("FLEXDISPATCH_CACHE_DIR")


def lock_timeout_s() -> float:
    """``FLEXDISPATCH_LOCK_TIMEOUT``: seconds to wait for another process's build (900)."""
    return _seconds("FLEXDISPATCH_LOCK_TIMEOUT", _text("FLEXDISPATCH_LOCK_TIMEOUT"), 900.0, False)


def build_retry_s() -> float:
    """``FLEXDISPATCH_BUILD_RETRY_S``: seconds during which a build that failed is not retried
    by the processes queued behind it (600)."""
    return _seconds("FLEXDISPATCH_BUILD_RETRY_S", _text("FLEXDISPATCH_BUILD_RETRY_S"), 600.0, False)


def keep_cxx() -> bool:
    """``FLEXDISPATCH_KEEP_CXX=1``: build with ``CXX`` even when it can only link a static
    libstdc++."""
    return _flag("FLEXDISPATCH_KEEP_CXX")


def verbose_build() -> bool:
    """``FLEXDISPATCH_VERBOSE_BUILD=1``: show the extension build's compiler output."""
    return _flag("FLEXDISPATCH_VERBOSE_BUILD")


# ---- waiting for peers ----------------------------------------------------------------------


DEFAULT_PEER_TIMEOUT_S = 600.0  # as torch.distributed's default collective timeout


def peer_timeout_s() -> float:
    """``FLEXDISPATCH_PEER_TIMEOUT_S``: how long flexdispatch waits for a peer, 600 s by default,
    as long as torch.distributed's default timeout, so that ranks may drift apart (a
    checkpoint, an evaluation on one rank) as long as they could at an NCCL collective. GPU
    kernels that wait over symmetric memory trap after it; collectives on CPU groups raise
    PeerTimeoutError. Read at every collective: one lookup, parsed once per value."""
    return _seconds("FLEXDISPATCH_PEER_TIMEOUT_S", os.environ.get("FLEXDISPATCH_PEER_TIMEOUT_S"),
                    DEFAULT_PEER_TIMEOUT_S, True)


def deepep_min_nvl_bytes() -> int:
    """``FLEXDISPATCH_DEEPEP_MIN_NVL_BYTES`` (diagnostics): a floor on the NVLink bytes of the
    DeepEP buffers flexdispatch makes, a multiple of 128 (0: DeepEP's own size hints)."""
    text = _text("FLEXDISPATCH_DEEPEP_MIN_NVL_BYTES")
    try:
        value = int(float(text)) if text is not None else 0
    except ValueError:
        value = -1
    if value < 0:
        raise ValueError(f"FLEXDISPATCH_DEEPEP_MIN_NVL_BYTES: expected a byte count >= 0, got {text!r}")
    return value // 128 * 128


# ---- other projects' variables, honoured as they do ------------------------------------------


def static_routing_pad_pin() -> bool:
    """``NEMO_STATIC_ROUTING_PAD_PIN`` (Automodel's): with ``moe_benchmark_static_routing`` the
    group's padded token count is exchanged once and pinned; ``0`` exchanges it every call."""
    return _text("NEMO_STATIC_ROUTING_PAD_PIN") != "0"


def hybridep_combine_chunk() -> int:
    """``NUM_OF_TOKENS_PER_CHUNK_COMBINE_API`` (HybridEP's): tokens per chunk of its combine, 64
    by default; HybridEP's token capacity is a multiple of it."""
    text = _text("NUM_OF_TOKENS_PER_CHUNK_COMBINE_API")
    try:
        return int(text) if text is not None else 64
    except ValueError:
        raise ValueError(f"NUM_OF_TOKENS_PER_CHUNK_COMBINE_API: expected an int, got {text!r}") from None


# ---- testing switches -----------------------------------------------------------------------


SWITCHES = {
    "deepep_agreement": ("peer", "nccl"),
    "nvlink_barrier": ("own", "torch"),
    "nvlink_transport": ("symmetric_memory", "gather"),
    "nvlink_pulls": ("staggered", "from_row_0"),
    "eager_ops": ("direct", "dispatcher"),
}
"""Each testing switch's values, the default first:

* ``deepep_agreement``: how the DeepEP manager's ranks agree on a call on one node: ``peer``
  (a kernel over symmetric memory) or ``nccl`` (an NCCL all-gather, as across nodes).
* ``nvlink_barrier``: the NVLink exchanges' barrier: ``own`` (flexdispatch's one-block
  kernel) or ``torch`` (symmetric memory's own).
* ``nvlink_transport``: the NVLink manager's transport: ``symmetric_memory``, or ``gather``
  (its all-gather emulation, which gloo groups always use) on NCCL too.
* ``nvlink_pulls``: where each rank's pulls of received rows start: ``staggered`` (at the next
  rank's rows, so that readers and sources pair up) or ``from_row_0``.
* ``eager_ops``: eager calls of the kernels' ops: ``direct`` (the implementation, around the
  op dispatcher's host cost) or ``dispatcher`` (through ``torch.ops.flexdispatch``).

A manager reads the switches when it is made (every rank of a group must set the same);
``eager_ops`` applies from the next op call."""

_overrides: dict = {}
_watchers: dict = {}  # switch name -> callbacks told its value when it changes (watch_switch)


@functools.lru_cache(maxsize=8)
def _parsed_switches(text: Optional[str]) -> dict:
    values = {}
    for item in filter(None, (part.strip() for part in (text or "").split(","))):
        name, _, value = (s.strip() for s in item.partition("="))
        _check_switch(name, value, "FLEXDISPATCH_TESTING")
        values[name] = value
    return values


def _check_switch(name: str, value: str, where: str) -> None:
    if name not in SWITCHES:
        raise ValueError(f"{where}: unknown testing switch {name!r}; expected one of {tuple(SWITCHES)}")
    if value not in SWITCHES[name]:
        raise ValueError(f"{where}: {name} is one of {SWITCHES[name]}, got {value!r}")


def switch(name: str) -> str:
    """The testing switch ``name``'s value: set by :func:`testing_switches`, else by
    ``FLEXDISPATCH_TESTING``, else its default."""
    if name in _overrides:
        return _overrides[name]
    return _parsed_switches(_text("FLEXDISPATCH_TESTING")).get(name, SWITCHES[name][0])


def watch_switch(name: str, callback: Callable[[str], None]) -> None:
    """Call ``callback(value)`` with the switch's value now and whenever :func:`testing_switches`
    changes it (for a switch read on a hot path: its reader keeps a plain variable)."""
    _watchers.setdefault(name, []).append(callback)
    try:
        value = switch(name)
    except ValueError as exc:  # (at import: a bad FLEXDISPATCH_TESTING must not stop the package loading;
        # managers made later raise it, as every reader of a switch does)
        logging.getLogger("flexdispatch").warning("%s; %s stays %s", exc, name, SWITCHES[name][0])
        value = SWITCHES[name][0]
    callback(value)


@contextlib.contextmanager
def testing_switches(**values: str) -> Iterator[None]:
    """Set testing switches in this process for the managers made inside the block (see
    :data:`SWITCHES`); for tests and benchmarks that compare two paths."""
    for name, value in values.items():
        _check_switch(name, value, "testing_switches")
    saved = dict(_overrides)
    _overrides.update(values)
    _tell_watchers(values)
    try:
        yield
    finally:
        _overrides.clear()
        _overrides.update(saved)
        _tell_watchers(values)


def _tell_watchers(names) -> None:
    for name in names:
        for callback in _watchers.get(name, ()):
            callback(switch(name))
