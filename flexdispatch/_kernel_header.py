"""Constants the kernels define in ``cuda_src/flexdispatch.h``, read from that file, so that
the Python side (routing error bits, the expert limit, the agreement header's fields) cannot
drift from the C++ side."""

from __future__ import annotations

import functools
import re

from . import _jit


@functools.lru_cache(maxsize=None)
def _text() -> str:
    return (_jit.sources_dir() / "flexdispatch.h").read_text()


def enum(name: str) -> dict:
    """``{"Name": value}`` of ``enum <name> ... { kName = value, ... };`` (the ``k`` dropped)."""
    text = _text()
    body = text[text.index(f"enum {name}"):]
    body = body[:body.index("};")]
    return {key: int(value) for key, value in re.findall(r"\bk(\w+)\s*=\s*(\d+)", body)}


def constant(name: str) -> int:
    """The value of ``constexpr int32_t k<name> = value;``."""
    return int(re.search(rf"constexpr int32_t k{name} = (\d+);", _text()).group(1))
