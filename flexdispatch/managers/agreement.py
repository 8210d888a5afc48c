"""What the ranks of a group agree on in the first exchange of every call.

Every manager of a group of several ranks sends, in the first exchange of a dispatch (and the
all-to-all manager also in its combine), a fixed-width header per rank: which phase of which
call it is in, whether its own checks failed (and on which argument), and the call's
signature (hidden size, dtype, top-k). Every rank reads every rank's header and takes the same
decision: go on, or raise the same error. A check that fails on one rank therefore never
leaves its peers blocked in a collective, and ranks that disagree on shapes, dtypes or the
step raise a clear error instead of aborting inside the communication library.
"""

from __future__ import annotations

import functools
import hashlib
import types
from typing import Optional

import torch

from .. import _kernel_header
from ..spec import input_error
from ..rowmap import NONFINITE_PROB, routing_error
from . import collectives

# Header fields, in order, as the kernels define them (cuda_src/flexdispatch.h, HeaderField).
_FIELDS = _kernel_header.enum("HeaderField")
ROWS, PHASE, STEP, ERROR, ARG, HIDDEN, DTYPE, TOPK, LAYER, CONFIG = (
    _FIELDS[f"Header{name}"] for name in ("Rows", "Phase", "Step", "Error", "Arg", "Hidden", "Dtype", "Topk", "Layer",
                                          "Config"))
WIDTH = _FIELDS["HeaderWidth"]

DISPATCH, COMBINE, BACKWARD = 1, 2, 3
PHASE_NAMES = {DISPATCH: "dispatch", COMBINE: "combine", BACKWARD: "backward"}

# Error bits beyond the routing ones of rowmap (1 range, 2 duplicate, 8 non-finite prob).
INPUT_ERROR = 1 << 8  # a local argument check failed; ARG names the argument

ARGUMENTS = ("", "hidden_states", "probs", "token_probs", "token_indices", "num_local_tokens", "config", "threads")
THREADS = ARGUMENTS.index("threads")  # not an argument: two threads called dispatchers of the group at once
DTYPES = (None, torch.float32, torch.float64, torch.bfloat16, torch.float16)
_DTYPE_CODES = types.MappingProxyType({dtype: code for code, dtype in enumerate(DTYPES)})  # (a lookup, not a scan)


def argument_code(exc: BaseException) -> int:
    """Index in ARGUMENTS of the argument ``exc`` names (its ``argument``, set by
    :func:`flexdispatch.spec.input_error`; 0: none of these)."""
    name = getattr(exc, "argument", "")
    return ARGUMENTS.index(name) if name in ARGUMENTS else 0


@functools.lru_cache(maxsize=256)
def config_code(backend: str, spec) -> int:
    """A 56-bit hash of a layer's backend and settings (stable across processes: ranks compare
    it); ``spec`` hashable. Made once per value: a manager whose settings may change after it
    was built (HybridEP's) asks at every call."""
    digest = hashlib.blake2b(repr((backend, spec)).encode(), digest_size=7).digest()
    return int.from_bytes(digest, "little")


def make_header(phase: int, step: int, hidden: Optional[torch.Tensor], topk: int, error: int = 0,
                arg: int = 0, rows: int = 0, layer: int = 0, config: int = 0) -> list[int]:
    """One rank's header; ``hidden`` is the call's ``[T, H]`` tensor (None after a failed check);
    ``layer`` the layer's creation order in its group, ``config`` :func:`config_code`."""
    header = [0] * WIDTH
    header[ROWS], header[PHASE], header[STEP], header[ERROR], header[ARG] = rows, phase, step, error, arg
    if hidden is not None:
        header[HIDDEN], header[DTYPE] = hidden.shape[-1], _DTYPE_CODES.get(hidden.dtype, len(DTYPES))
    header[TOPK], header[LAYER], header[CONFIG] = topk, layer, config
    return header


def gather_headers(header: torch.Tensor, world: int, group, what: str) -> torch.Tensor:
    """Every rank's ``header [WIDTH]`` int64 (:func:`flexdispatch.ops.make_header`) as ``[W,
    WIDTH]`` on the host: one all-gather and one host read, for managers whose engine has no
    room for a header in its own exchange. On CPU groups a peer that does not arrive is waited
    for at most the peer timeout (:mod:`.collectives`; ``what`` names the call)."""
    if world == 1:  # (no group needed: a rank agrees with itself, errors included)
        return header.view(1, -1).cpu()
    every = header.new_empty(world * header.numel())
    collectives.all_gather_single(every, header, group, what=what)
    return every.view(world, -1).cpu()


class Agreement:
    """The decision every rank takes from all headers ``[W, WIDTH]`` (the same on every rank)."""

    def __init__(self, headers):
        """``headers``: ``[W, WIDTH]`` int64 (a CPU tensor, or nested sequences of ints), or
        wider rows whose columns past WIDTH (a dispatch's counts) are not read."""
        # (rows may run past WIDTH, the counts of a dispatch's exchange: every rule reads fields < WIDTH)
        self.rows = headers.tolist() if isinstance(headers, torch.Tensor) else [list(map(int, h)) for h in headers]

    def agreed(self) -> bool:
        """Whether every rank may go on: no error bits, and every field from PHASE on equal to
        rank 0's (the rule the kernels apply on the device: header_breaks_agreement)."""
        first = self.rows[0][PHASE:WIDTH]
        for h in self.rows:  # (a loop, not all() of a generator: this runs at every exchange)
            if h[ERROR] or h[PHASE:WIDTH] != first:
                return False
        return True

    def threads_ranks(self) -> list[int]:
        """Ranks that report dispatchers of this group called from two threads at once."""
        return [w for w, h in enumerate(self.rows) if h[ERROR] & INPUT_ERROR and h[ARG] == THREADS]

    def next_step(self) -> int:
        """The step every rank continues from after a failed call (the same on every rank)."""
        return max(h[STEP] for h in self.rows) + 1

    def check(self, rank: int, deferred: Optional[BaseException], route: Optional[torch.Tensor],
              probs: Optional[torch.Tensor], num_experts: int, when: str,
              names: tuple = ("token_indices", "token_probs")) -> None:
        """Return if every rank may go on; else raise the error every rank raises.

        ``deferred``: this rank's own failed check, raised as it is (its message names the
        argument). ``route``/``probs``: this rank's routing, to describe a routing error.
        """
        if self.agreed():
            return
        rows = self.rows
        where = lambda ranks: f"rank(s) {ranks} of the expert-parallel group"  # noqa: E731
        if len({h[LAYER] for h in rows}) > 1:
            layers = ", ".join(f"rank {w}: layer {h[LAYER]}" for w, h in enumerate(rows))
            raise RuntimeError(f"dispatcher: the ranks of the expert-parallel group are calling different layers "
                               f"({layers}; a layer is numbered by the order its dispatcher was built in the group): "
                               f"the layers run in a different order on different ranks. Every rank raises {when}")
        if len({h[CONFIG] for h in rows}) > 1:
            raise input_error(ValueError, "config",
                              f"the ranks of the expert-parallel group built this layer with different settings "
                              f"(backend, experts, FP8 dispatch, sync-free mode, bound, ...); every rank raises {when}")
        if len({(h[PHASE], h[STEP]) for h in rows}) > 1:
            states = ", ".join(f"rank {w}: step {h[STEP]} {PHASE_NAMES.get(h[PHASE], '?')}" for w, h in enumerate(rows))
            raise RuntimeError(f"dispatcher: the ranks of the expert-parallel group are at different steps of this "
                               f"layer ({states}): a rank abandoned a call (reset() after an exception) while its "
                               f"peers went on. Every rank raises {when}; call reset() on every rank, and the layer's "
                               f"next call realigns the steps")
        bad = [w for w, h in enumerate(rows) if h[ERROR]]
        if bad:
            mine = rows[rank][ERROR]
            if deferred is not None:
                again = type(deferred)(f"{deferred} (every rank of the expert-parallel group raises {when})")
                again.argument = getattr(deferred, "argument", None)
                raise again
            if mine:
                detail = routing_error(mine, route, num_experts, names[0], probs=probs, probs_name=names[1])
                raise input_error(ValueError, getattr(detail, "argument", names[0]),
                                  f"invalid routing on {where(bad)}; every rank raises {when}: {detail}")
            first, threads = rows[bad[0]], self.threads_ranks()
            if threads:
                from .groups import ConcurrentCallError

                raise ConcurrentCallError(f"threads: dispatchers of this expert-parallel group were called from two "
                                          f"threads at once on {where(threads)}; every rank raises "
                                          f"{when} (that rank's error says more). The group's calls raise on every "
                                          f"rank until flexdispatch.shutdown() is called on every rank")
            if first[ERROR] & INPUT_ERROR:
                kind, arg = "invalid input", ARGUMENTS[first[ARG]] or "inputs"
            else:
                kind = "invalid routing"
                arg = names[1] if first[ERROR] == NONFINITE_PROB else names[0]
            raise input_error(ValueError, arg,
                              f"{kind} on {where(bad)}; every rank raises {when} (that rank's error says "
                              f"what is wrong)")
        for field, name, arg in ((HIDDEN, "hidden size", "hidden_states"), (DTYPE, "dtype", "hidden_states"),
                                 (TOPK, "top-k", "config")):
            values = [h[field] for h in rows]
            if len(set(values)) > 1:
                shown = [str(DTYPES[v]).replace("torch.", "") if field == DTYPE and v < len(DTYPES) else v
                         for v in values]
                raise input_error(ValueError, arg,
                                  f"the ranks of the expert-parallel group disagree on the {name} of this "
                                  f"call (per rank: {shown}); every rank raises {when}")
