"""The one binding of every kernel: the compiled kernels (loaded at first use), each kernel-backed
op registered once in the ``torch.library`` namespace ``flexdispatch`` with its fake and, when
differentiable, its one backward, and the queue of CUDA error words the ops defer.

:mod:`flexdispatch.ops` (the public API) and :mod:`flexdispatch.peer_ops` call these ops, in
eager and compiled code alike (TransformerEngine's permutation ops are built the same way):

* under torch.compile (or any tracing: fake or functional tensors) the registered op runs, so
  Dynamo puts it in the graph; its fake gives the output shapes (an unbacked size for the
  permutation unless ``num_out`` is given, as in sync-free mode) and AOT autograd takes its
  backward;
* an eager call with plain tensors skips the op dispatcher, which costs more host time than
  the kernel launch (``tools/bench_compile.py --dispatcher`` measures both in one run), and
  runs the same implementation, with the same setup and backward when autograd needs them.

Routing errors are raised (CPU) or queued for the next sync point (CUDA) inside the ops'
implementations, so eager and compiled code report them alike. Optional tensor results travel
as empty tensors (an op cannot return None). Kernels that are not ops (the agreement's,
the NVLink manager's transfers and barrier) are called through :func:`kernels`.
"""

from __future__ import annotations

import ctypes
import weakref
from typing import NamedTuple, Optional

import torch

from . import _jit, envs
from ._log import logger
from .reference import FP8_GROUP
from .rowmap import layout_error_index, routing_error

# The compiled kernels, loaded (built on a cold cache) at the first op that needs them, or by
# load_kernels(): importing flexdispatch builds nothing, so commands that need no kernels
# (``python -m flexdispatch info``, ``clear-cache``) answer at once.
_C = None
_loaded = False
_with_cuda = False  # whether _C has CUDA kernels (a plain bool: torch.compile reads it while tracing)


def load_kernels() -> bool:
    """Load the kernels now (building them on a cold cache, once per machine); True when the
    compiled kernels are in use, False when the plain PyTorch ops serve (FLEXDISPATCH_JIT=0, or
    a failed build in ``auto`` mode). The first op calls this; a dispatcher's constructor does
    too, so the build happens when a model is built rather than inside its first step."""
    global _C, _loaded, _with_cuda
    if not _loaded:
        _C = _jit.load_kernels()  # raises with FLEXDISPATCH_JIT=1; then the next call tries again
        _with_cuda = _C is not None and bool(_C.with_cuda())
        _loaded = True
    return _C is not None


def kernels_loaded() -> bool:
    """Whether the compiled kernels are loaded and in use, as of now; builds and loads nothing.
    False before the first op, dispatcher or :func:`load_kernels` call of this process, and
    when the plain PyTorch ops serve (FLEXDISPATCH_JIT=0, or a failed build in ``auto`` mode).
    To load (and on a cold cache build) them, call :func:`load_kernels`."""
    return _loaded and _C is not None


def cuda_kernels_loaded() -> bool:
    """True when the compiled kernels serve CUDA tensors (built with CUDA); loads them."""
    return load_kernels() and _with_cuda


def serves(t: torch.Tensor) -> bool:
    """Whether the kernels serve ``t``'s device (loads them)."""
    if not (_C is not None or load_kernels()):
        return False
    return t.is_cpu or (_with_cuda and t.is_cuda)


def kernels():
    """The compiled kernels' module (loads it; None when the plain PyTorch ops serve)."""
    if _C is None:
        load_kernels()
    return _C


# ---- CUDA error words read at a later sync point ------------------------------------------------


class _PendingError(NamedTuple):
    """A CUDA error word on its way to pinned memory, with what its message needs (a tuple: one
    is made per reported CUDA op). The routing tensors are held weakly: an entry must not keep a
    call's tensors alive (a CUDA-graph pool must find every tensor a call made either returned
    or freed); a message whose routing is gone names the argument without the entry."""

    words: "ctypes.Array"  # the pinned slots of _ErrorSlots; the word's slot holds -1 until it lands
    slot: int
    route: weakref.ref
    num_experts: int
    name: str
    num_out: Optional[int]
    probs: Optional[weakref.ref]
    device: int  # the CUDA device whose stream copies the word

    def error(self, bits: int) -> ValueError:
        """The error of the word's (nonzero) ``bits``."""
        probs = self.probs and self.probs()
        return routing_error(bits, self.route(), self.num_experts, self.name, self.num_out, probs)


# CUDA error words not yet read, oldest first (process-wide: a later op of any layer reads them).
_pending: list[_PendingError] = []
MAX_PENDING = 64
_NOT_LANDED = -1  # (error words are bit sets: never negative)


class _ErrorSlots:
    """Pinned words the error words are copied to, reused in turn: no pinned allocation, no
    event and no torch op per call (the host marks a slot -1; a one-thread kernel queued on the
    stream writes the word through the slot's device mapping, which costs the host a launch
    where a device-to-host copy cost two to three; the word has landed once the slot is not
    -1). A slot comes back after 2 * MAX_PENDING others, by when its entry has been read (at
    most MAX_PENDING + 1 are pending at once)."""

    def __init__(self):
        # dtype -> (pinned tensor [2 * MAX_PENDING], a ctypes view of it, its device mapping's
        # address or 0 where the kernels are not built for CUDA)
        self._words: dict = {}
        self._next: dict = {}

    def take(self, dtype: torch.dtype):
        """``(pinned tensor, ctypes view, slot, device address of the slot or 0)``: the next
        slot for a word of ``dtype`` (int32 or int64), marked not landed."""
        entry = self._words.get(dtype)
        if entry is None:
            words = torch.zeros(2 * MAX_PENDING, dtype=dtype, pin_memory=True)
            word_type = ctypes.c_int64 if dtype == torch.int64 else ctypes.c_int32
            # (plain memory reads and writes from the host: no torch op per access)
            view = (word_type * words.numel()).from_address(words.data_ptr())
            mapped = _device_mapping(words)
            entry = self._words[dtype] = (words, view, mapped)
        slot = self._next.get(dtype, 0)
        self._next[dtype] = (slot + 1) % entry[0].numel()
        entry[1][slot] = _NOT_LANDED
        return entry[0], entry[1], slot, entry[2] and entry[2] + slot * entry[0].element_size()


def _device_mapping(words: torch.Tensor) -> int:
    """The device address of the pinned ``words`` for the store kernel; 0 where there is none
    (kernels without CUDA, or pinned memory the runtime does not map: a torch copy serves)."""
    if not _with_cuda:
        return 0
    try:
        return _C.mapped_address(words)
    except RuntimeError as exc:
        logger.debug("error words copied, not stored by a kernel: %s", exc)
        return 0


_slots = _ErrorSlots()


def check_pending_errors() -> None:
    """Raise the first routing error flagged by earlier CUDA calls. Waits only for their small
    error-word copies to land (not for the whole device), so it costs nothing once the GPU
    has passed them."""
    if _pending:  # (none on the CPU, which raises at once: no call there)
        _read_pending_errors(wait=True)


def _read_pending_errors(wait: bool) -> None:
    """Read the queued error words in order (all of them, or without waiting only those that
    have landed); raise the first error and forget the rest."""
    while _pending:
        entry = _pending[0]
        bits = entry.words[entry.slot]  # (a ctypes read: a plain int)
        if bits == _NOT_LANDED:
            if not wait:
                return
            torch.cuda.synchronize(entry.device)  # (rare: the callers wait after a host sync, when it has landed)
            bits = entry.words[entry.slot]
        del _pending[0]
        if bits:
            _pending.clear()
            raise entry.error(bits)


def defer_routing_error(status: torch.Tensor, route: torch.Tensor, num_experts: int, name: str,
                        probs: Optional[torch.Tensor] = None) -> None:
    """Raise the error bits of :func:`check_route`'s ``status`` now on the CPU; on CUDA read
    them once they have landed (at the next sync point), without adding a sync."""
    _defer_or_raise(status, 0, route, num_experts, name, probs=probs)


_WORD_TYPES = {torch.int32: ctypes.c_int32, torch.int64: ctypes.c_int64}


def _host_word(words: torch.Tensor, index: int) -> int:
    """``int(words[index])`` of a contiguous CPU int32 or int64 tensor (an error word or a
    layout), read from its memory: indexing and ``int`` would cost two torch ops a read."""
    return _WORD_TYPES[words.dtype].from_address(words.data_ptr() + index * words.element_size()).value


def _defer_or_raise(flags: torch.Tensor, index: int, route: torch.Tensor, num_experts: int, name: str,
                    num_out: Optional[int] = None, probs: Optional[torch.Tensor] = None, word=None) -> None:
    """Raise now for CPU tensors (reading the flag costs nothing); on CUDA, read the error word
    ``flags[index]`` once it has landed in pinned memory (at a later call, or at
    :func:`check_pending_errors`) instead of adding a host sync. ``word``: the
    :func:`error_word` slot taken before the op, which its kernel stored the word to when the
    slot has a device address; else the word is copied to a slot here."""
    if flags.is_cpu:
        bits = _host_word(flags, index)
        if bits:
            raise routing_error(bits, route, num_experts, name, num_out, probs)
        return
    stored = word is not None and bool(word[3])
    word = word or error_word(flags, flags.dtype)
    if word is None:  # (a graph being captured: nothing is queued)
        return
    pinned, words, slot, mapped = word
    if not stored and mapped:  # (a mapping exists only where the kernels are built for CUDA)
        _C.queue_word_copy(flags, index, mapped)
    elif not stored:  # (kernels not built for CUDA, or no mapping: a torch copy)
        pinned[slot:slot + 1].copy_(flags[index:index + 1], non_blocking=True)
    _pending.append(_PendingError(words, slot, weakref.ref(route), num_experts, name, num_out,
                                  None if probs is None else weakref.ref(probs), flags.get_device()))
    if len(_pending) > MAX_PENDING:
        check_pending_errors()


def error_word(like: torch.Tensor, dtype: torch.dtype):
    """The pinned slot that a CUDA op's error word of ``dtype`` goes to (``(pinned, ctypes view,
    slot, device address or 0)``, see :class:`_ErrorSlots`), for an op that stores it itself
    (given the address) before :func:`_defer_or_raise`; None where nothing is queued: a CPU op
    raises at once, and a graph being captured may not sync (its sizes are the caller's,
    sync-free)."""
    if like.is_cpu or torch.cuda.is_current_stream_capturing():
        return None
    _read_pending_errors(wait=False)
    return _slots.take(dtype)


def _check_layout(layout, host, route, num_experts, num_out, name, word=None) -> None:
    """Raise a plan's error bits from its host copy (made when the kernel sized a device
    layout's output), else raise them from a CPU layout or defer them (``word``: the
    :func:`error_word` slot the op stored them to itself, if any); nothing for ``name`` None
    (a route this package built)."""
    if name is None:
        return
    if not host.numel():
        _defer_or_raise(layout, layout_error_index(num_experts), route, num_experts, name, num_out, word=word)
        return
    check_pending_errors()  # a sync just happened: read the earlier flags too
    bits = _host_word(host, layout_error_index(num_experts))
    if bits:
        raise routing_error(bits, route, num_experts, name, num_out)


# ---- the binding ------------------------------------------------------------------------------

eager_direct = True  # eager calls skip the op dispatcher (the testing switch eager_ops=dispatcher: not)


def _set_eager_direct(value: str) -> None:
    global eager_direct
    eager_direct = value == "direct"


envs.watch_switch("eager_ops", _set_eager_direct)


_MAYBE_TENSOR = torch._C.OptionalType.ofTensor()  # (a Tensor argument's type is a subtype of it)


_LIB = torch.library.Library("flexdispatch", "DEF")  # (lives with the module: the ops' registrations)
_BELOW_AUTOGRAD = torch._C._after_autograd_keyset
_BACKEND_KEYS = frozenset((torch._C.DispatchKey.CPU, torch._C.DispatchKey.CUDA))  # (no mode, no subclass)


def _op(fake, backward=None, setup=None):
    """Register the decorated kernel call ``impl`` as the op ``flexdispatch::<name>`` with its
    fake, and its backward (with ``setup``, as ``register_autograd`` takes them); returns the
    function that calls it: the op under torch.compile or for tensors other than plain ones
    (the fake and functional tensors of AOT autograd's tracing, subclasses), else ``impl``
    directly, through the op's own autograd function when a gradient is needed.

    The op is defined on a ``Library`` rather than by ``torch.library.custom_op``, whose checks
    and wrappers cost a compiled graph several Python frames per op call: its autograd kernel
    runs one autograd function (gradient needed) or goes straight below autograd (not), and an
    op without a backward passes autograd by (its outputs need no gradient, as called
    directly)."""
    def register(impl):
        name = impl.__name__
        _LIB.define(name + torch.library.infer_schema(impl, mutates_args=()), tags=(torch.Tag.pt2_compliant_tag,))
        op = getattr(torch.ops.flexdispatch, name).default
        # (the positions of the tensor arguments, from the schema: a direct call inspects only these)
        tensor_at = tuple(i for i, arg in enumerate(op._schema.arguments) if arg.type.isSubtypeOf(_MAYBE_TENSOR))
        _LIB.impl(name, impl, "CompositeExplicitAutograd")
        torch.library.register_fake(f"flexdispatch::{name}", fake, lib=_LIB)

        def run(keys, args):  # below autograd: impl itself for plain tensors on a backend, no mode
            if keys is None:
                return impl(*args)
            keys = keys & _BELOW_AUTOGRAD
            if keys.highestPriorityTypeId() in _BACKEND_KEYS:
                return impl(*args)
            with torch._C._AutoDispatchBelowAutograd():
                return op.redispatch(keys, *args)

        function = None
        if backward is None:
            _LIB.impl(name, torch.library.fallthrough_kernel, "Autograd")
        else:
            def forward(ctx, *args):  # (args end with the op's dispatch keys, None: called directly)
                keys, inputs = args[-1], args[:-1]
                out = impl(*inputs) if keys is None else run(keys, inputs)
                setup(ctx, inputs, out)
                return out

            def backward_of_all(ctx, *grads):
                return (*backward(ctx, *grads), None)

            function = type(name, (torch.autograd.Function,),
                            {"forward": staticmethod(forward), "backward": staticmethod(backward_of_all)})

            def autograd_kernel(keys, *args):
                if torch.is_grad_enabled() and torch._C._any_requires_grad(*args):
                    return function.apply(*args, keys)
                return run(keys, args)

            _LIB.impl(name, autograd_kernel, "Autograd", with_keyset=True)
            # (Function.apply's Python side binds default arguments, which these have none of,
            # and serves functorch transforms; outside those its C++ apply is called directly,
            # which spares an eager call a few microseconds of host time)
            apply_directly = super(torch.autograd.Function, function).apply

        def call(*args):
            if eager_direct and not torch.compiler.is_compiling():
                needs_grad = False
                for i in tensor_at:
                    a = args[i]
                    if type(a) is torch.Tensor:
                        needs_grad = needs_grad or a.requires_grad
                    elif a is not None:  # a tensor subclass (fake, functional, a Parameter): the op
                        return op(*args)
                if function is not None and needs_grad and torch.is_grad_enabled():
                    if torch._C._are_functorch_transforms_active():
                        return function.apply(*args, None)
                    return apply_directly(*args, None)
                return impl(*args)
            return op(*args)

        call.__doc__, call.__name__ = impl.__doc__, name
        return call
    return register


def _contiguous(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if t is None else t.contiguous()


def _no_grads_made(ctx):
    ctx.set_materialize_grads(False)  # (no zero tensors for the gradients of unused outputs)


# ---- routing ----------------------------------------------------------------------------------


@_op(lambda indices, num_experts, flag, probs, report_as: (indices.new_empty(indices.shape, dtype=torch.int64),
                                                           indices.new_empty(2, dtype=torch.int32)))
def check_route(indices: torch.Tensor, num_experts: int, flag: int, probs: Optional[torch.Tensor],
                report_as: Optional[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(clean [R, K] int64, status [2] int32)``; the error bits raised or deferred under the
    name ``report_as`` (None: left to the caller). Deferred, the kernel stores the word to the
    pinned slot taken for it here, so no further launch queues the copy."""
    return _checked(indices, num_experts, flag, probs, report_as)


def _checked(indices: torch.Tensor, num_experts: int, flag: int, probs: Optional[torch.Tensor],
             report_as: Optional[str]):
    """The body of :func:`check_route` (and of :func:`check_and_permute`'s check)."""
    word = None if report_as is None else error_word(indices, torch.int32)
    clean, status = _C.check_route(indices.contiguous(), num_experts, flag, _contiguous(probs),
                                   0 if word is None else word[3])
    if report_as is not None:
        _defer_or_raise(status, 0, indices, num_experts, report_as, probs=probs, word=word)
    return clean, status


def _topk_setup(ctx, inputs, output):
    _no_grads_made(ctx)
    ctx.save_for_backward(output[1])
    ctx.shape = inputs[0].shape


def _dense_grad(grad_values: Optional[torch.Tensor], indices: torch.Tensor, shape) -> Optional[torch.Tensor]:
    """The dense probs' gradient of the top-k's ``grad_values [T, K]``: each at its chosen
    expert (``indices [T, K]``), 0 elsewhere (None for no gradient)."""
    return None if grad_values is None else grad_values.new_zeros(shape).scatter_(1, indices, grad_values)


def _topk_backward(ctx, grad_values, *_):
    (indices,) = ctx.saved_tensors
    return _dense_grad(grad_values, indices, ctx.shape), None, None, None


def _selected(probs: torch.Tensor, topk: int, flag: int, report_as: Optional[str]):
    """The body of :func:`route_topk` (and of :func:`route_and_permute`'s routing)."""
    word = None if report_as is None else error_word(probs, torch.int32)
    values, indices, clean, status = _C.route_topk(probs.contiguous(), topk, flag, 0 if word is None else word[3])
    if report_as is not None:
        _defer_or_raise(status, 0, indices, probs.shape[1], report_as, probs=values, word=word)
    return values, indices, clean, status


@_op(lambda probs, topk, flag, report_as: (probs.new_empty(probs.shape[0], topk),
                                           probs.new_empty(probs.shape[0], topk, dtype=torch.int64),
                                           probs.new_empty(probs.shape[0], topk, dtype=torch.int64),
                                           probs.new_empty(2, dtype=torch.int32)),
     _topk_backward, _topk_setup)
def route_topk(probs: torch.Tensor, topk: int, flag: int,
               report_as: Optional[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(values [R, K], indices [R, K] int64, clean [R, K] int64, status [2] int32)``: the
    router's top-k of ``probs [R, E]`` checked in the same pass (as :func:`check_route` checks
    given indices), the error bits raised or deferred under the name ``report_as`` (None: left
    to the caller)."""
    return _selected(probs, topk, flag, report_as)


def _multihot_setup(ctx, inputs, output):
    _no_grads_made(ctx)
    ctx.save_for_backward(inputs[0])


def _multihot_backward(ctx, grad_map, grad_multihot):
    """The top-k probs' gradient: ``grad_multihot`` read back at the chosen experts."""
    if grad_multihot is None:
        return None, None, None
    (indices,) = ctx.saved_tensors
    column = torch.where(indices >= 0, indices.long(), grad_multihot.shape[1])
    padded = torch.cat([grad_multihot, grad_multihot.new_zeros(grad_multihot.shape[0], 1)], dim=1)
    return None, padded.gather(1, column), None


@_op(lambda indices, probs, num_experts: (indices.new_empty(indices.shape[0], num_experts, dtype=torch.bool),
                                          probs.new_empty(indices.shape[0], num_experts)),
     _multihot_backward, _multihot_setup)
def indices_to_multihot(indices: torch.Tensor, probs: torch.Tensor,
                        num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(routing_map [R, E] bool, multihot [R, E])``; routing errors raised or deferred."""
    routing_map, multihot, error = _C.indices_to_multihot(indices.contiguous(), probs.contiguous(), num_experts)
    _defer_or_raise(error, 0, indices, num_experts, "indices")
    return routing_map, multihot


def _received_setup(ctx, inputs, output):
    _no_grads_made(ctx)
    ctx.save_for_backward(output[0])
    ctx.shape, ctx.dtype, ctx.columns = inputs[0].shape, inputs[0].dtype, (inputs[1], inputs[2])


def _received_backward(ctx, _grad_indices, grad_probs):
    """The routing rows' gradient: the probs' in their prob columns, 0 where the index is -1."""
    if grad_probs is None:
        return (None,) * 7
    (indices,) = ctx.saved_tensors
    id_column, topk = ctx.columns
    grad = grad_probs.new_zeros(ctx.shape, dtype=ctx.dtype)
    grad[:, id_column + topk:id_column + 2 * topk] = torch.where(indices >= 0, grad_probs, 0)
    return grad, None, None, None, None, None, None


@_op(lambda meta, id_column, topk, first_expert, local, prob_dtype, has_source: (
        meta.new_empty(meta.shape[0], topk, dtype=torch.int64), meta.new_empty(meta.shape[0], topk, dtype=prob_dtype)),
     _received_backward, _received_setup)
def received_routing(meta: torch.Tensor, id_column: int, topk: int, first_expert: int, local: int,
                     prob_dtype: torch.dtype, has_source: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(indices [R, K] int64, probs [R, K])`` of the received routing rows ``meta``."""
    return _C.received_routing(meta.contiguous(), id_column, topk, first_expert, local, has_source, prob_dtype)


# ---- the permutation ----------------------------------------------------------------------------


def _plan_fake(route, num_experts, num_out, copy_layout=False):
    layout = 3 * num_experts + 2
    # The host layout exists only when the op copies a device layout to the host (num_out < 0,
    # a sync to size the output; or copy_layout: never in a CUDA graph; a CPU layout is read in
    # place); its [0] stand-in stays on the route's device, since a CPU tensor in a CUDA graph
    # splits it (inductor partitions CUDA graphs around CPU nodes).
    host = (torch.empty(layout, dtype=torch.int64) if (num_out < 0 or copy_layout) and route.device.type != "cpu"
            else route.new_empty(0, dtype=torch.int64))
    return route.new_empty(route.shape, dtype=torch.int32), route.new_empty(layout, dtype=torch.int64), host


@_op(lambda route, num_experts, pad_multiple, num_out, name: _plan_fake(route, num_experts, num_out))
def plan(route: torch.Tensor, num_experts: int, pad_multiple: int, num_out: int,
         name: Optional[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(map [R, S] int32, layout [3E + 2], host layout or [0])``, sized on the host when
    ``num_out`` < 0 (one sync; the host layout is a copy of a device layout, [0] for a CPU one,
    which is read in place); ``name`` None: a route this package built (nothing to check)."""
    row_map, layout, host = _C.plan(route.contiguous(), num_experts, pad_multiple, num_out)
    _check_layout(layout, host, route, num_experts, None if num_out < 0 else num_out, name)
    return row_map, layout, host


def _permuted_fake(rows, probs, route, num_experts, num_out, hidden=None, dtype=None, copy_layout=False):
    """The fake of a permutation (its size unbacked unless ``num_out`` >= 0)."""
    n = num_out if num_out >= 0 else torch.library.get_ctx().new_dynamic_size()
    out_probs = route.new_empty(0, dtype=torch.float32) if probs is None else probs.new_empty(n)
    return (route.new_empty(n, rows.shape[1] if hidden is None else hidden, dtype=rows.dtype if dtype is None else dtype),
            out_probs, *_plan_fake(route, num_experts, num_out, copy_layout))


def _permuted(kernel, args, route, num_experts, num_out, name, copy_layout=None):
    """Run a permutation binding, ``kernel(*args, error_address[, copy_layout])``, which returns
    the op outputs (see below), and return them, its routing errors raised or deferred. With the
    output size known, the kernel stores its error word to the pinned slot taken for it here
    (``error_address``; 0: none), so no further call queues the copy; with ``copy_layout`` (the
    binding's flag, ``permute`` only) the host layout it returns serves instead."""
    word = (error_word(route, torch.int64) if num_out >= 0 and name is not None and not copy_layout
            else None)  # (the layout's word)
    outputs = kernel(*args, 0 if word is None else word[3], *(() if copy_layout is None else (copy_layout,)))
    _check_layout(outputs[3], outputs[4], route, num_experts, outputs[0].shape[0], name, word)
    return outputs


def _permutation_setup(ctx, inputs, output):
    _no_grads_made(ctx)
    ctx.save_for_backward(output[2], output[3])
    ctx.plan = (inputs[3], inputs[4] > 1, inputs[5] >= 0, len(inputs))  # experts, padded, has tail, inputs


def _permutation_grads(grad_out, grad_out_probs, row_map, layout, plan, rows_need: bool, probs_need: bool):
    """``(grad_rows [R, H], grad_probs [R, S])`` of a permutation's output gradients (None where
    not needed or not given): a gather of each along the plan (``plan``: experts, padded, has
    tail)."""
    grad_rows = grad_probs = None
    if rows_need and grad_out is not None:
        grad_rows = gather_rows(grad_out, row_map, None, layout, *plan)
    if probs_need and grad_out_probs is not None:
        grad_probs = gather_slots(grad_out_probs, row_map)
    return grad_rows, grad_probs


def _permutation_backward(ctx, grad_out, grad_out_probs, *_):
    """The one backward of every permutation op (inputs ``rows, probs, route, ...``)."""
    row_map, layout = ctx.saved_tensors
    *plan, inputs = ctx.plan
    grads = _permutation_grads(grad_out, grad_out_probs, row_map, layout, plan, *ctx.needs_input_grad[:2])
    return grads + (None,) * (inputs - 2)


# Every permutation op takes (rows, probs, route, num_experts, pad_multiple, num_out, name, ...)
# (name None, with num_out given: a route checked already, its errors neither stored nor read)
# and returns (out [N, H], out_probs [N] or [0], map [R, S] int32, layout [3E + 2], host layout or
# [0], as plan's); one host sync sizes it when num_out < 0. ``rows`` is differentiable, and is
# read by permute only: the others read their rows elsewhere and take ``rows`` for their shape,
# dtype and autograd.


@_op(lambda rows, probs, route, num_experts, pad_multiple, num_out, name, copy_layout=False: _permuted_fake(
    rows, probs, route, num_experts, num_out, copy_layout=copy_layout), _permutation_backward, _permutation_setup)
def permute(rows: torch.Tensor, probs: Optional[torch.Tensor], route: torch.Tensor, num_experts: int,
            pad_multiple: int, num_out: int, name: Optional[str],
            copy_layout: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The expert-major permutation of ``rows [R, H]`` by ``route`` (indices or multihot map);
    ``copy_layout`` (``num_out`` given): the host layout output is a copy of the final layout,
    queued before the rows move and waited for alone, from which the routing errors are raised."""
    return _permuted(_C.permute, (route.contiguous(), num_experts, pad_multiple, num_out, rows.contiguous(),
                                  _contiguous(probs)), route, num_experts, num_out, name, copy_layout)


@_op(lambda rows, probs, route, num_experts, pad_multiple, num_out, name, copy_layout, check_as: (
    *_permuted_fake(rows, probs, route, num_experts, num_out, copy_layout=copy_layout),
    route.new_empty(route.shape, dtype=torch.int64), route.new_empty(2, dtype=torch.int32)),
    _permutation_backward, _permutation_setup)
def check_and_permute(rows: torch.Tensor, probs: torch.Tensor, route: torch.Tensor, num_experts: int,
                      pad_multiple: int, num_out: int, name: Optional[str], copy_layout: bool,
                      check_as: Optional[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                        torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`check_route` of the given ``route [R, K]`` (int64) and ``probs [R, K]`` (float32
    or float64; its errors under ``check_as``), then :func:`permute` of ``rows`` by the clean
    route, moving ``probs``, as one op (one rank's given routing and permutation, with nothing
    between them): ``permute``'s five outputs, then ``check_route``'s two. A permutation op:
    the permutations' one backward."""
    clean, status = _checked(route, num_experts, 0, probs, check_as)
    return (*_permuted(_C.permute, (clean, num_experts, pad_multiple, num_out, rows.contiguous(), probs.contiguous()),
                       clean, num_experts, num_out, name, copy_layout), clean, status)


def _routed_permutation_setup(ctx, inputs, output):
    _no_grads_made(ctx)
    ctx.save_for_backward(output[1], output[6], output[7])  # indices, map, layout
    ctx.shape = inputs[0].shape
    ctx.plan = (inputs[0].shape[1], inputs[4] > 1, inputs[5] >= 0)  # experts, padded, has tail


def _routed_permutation_backward(ctx, grad_values, _indices, _clean, _status, grad_out, grad_out_probs, *_):
    """Both ops' backwards in one: the permuted probs' gradient joins the top-k's own, then
    goes to the dense probs."""
    indices, row_map, layout = ctx.saved_tensors
    probs_need, rows_need = ctx.needs_input_grad[:2]
    grad_rows, grad_slots = _permutation_grads(grad_out, grad_out_probs, row_map, layout, ctx.plan, rows_need,
                                               probs_need)
    if grad_slots is not None:
        grad_values = grad_slots if grad_values is None else grad_values + grad_slots
    grad_probs = _dense_grad(grad_values, indices, ctx.shape) if probs_need else None
    return (grad_probs, grad_rows) + (None,) * 6


@_op(lambda probs, rows, topk, report_as, pad_multiple, num_out, name, copy_layout: (
    probs.new_empty(probs.shape[0], topk), probs.new_empty(probs.shape[0], topk, dtype=torch.int64),
    probs.new_empty(probs.shape[0], topk, dtype=torch.int64), probs.new_empty(2, dtype=torch.int32),
    *_permuted_fake(rows, probs, probs.new_empty(probs.shape[0], topk, dtype=torch.int64), probs.shape[1], num_out,
                    copy_layout=copy_layout)),
    _routed_permutation_backward, _routed_permutation_setup)
def route_and_permute(probs: torch.Tensor, rows: torch.Tensor, topk: int, report_as: Optional[str], pad_multiple: int,
                      num_out: int, name: Optional[str], copy_layout: bool) -> tuple[
        torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
        torch.Tensor]:
    """:func:`route_topk` of ``probs [T, E]`` (float32 or float64) and :func:`permute` of ``rows
    [T, H]`` by its clean route, moving its values as the probs, in one autograd node (one
    rank's routing and permutation, with nothing between them): ``route_topk``'s four outputs,
    then ``permute``'s five, under the same arguments (``name`` and ``copy_layout`` the
    permutation's)."""
    values, indices, clean, status = _selected(probs, topk, 0, report_as)
    num_experts = probs.shape[1]
    return (values, indices, clean, status,
            *_permuted(_C.permute, (clean, num_experts, pad_multiple, num_out, rows.contiguous(), values),
                       clean, num_experts, num_out, name, copy_layout))


@_op(lambda rows, probs, route, num_experts, pad_multiple, num_out, name, q, scales, dtype: _permuted_fake(
    q, probs, route, num_experts, num_out, dtype=dtype), _permutation_backward, _permutation_setup)
def permute_fp8(rows: Optional[torch.Tensor], probs: Optional[torch.Tensor], route: torch.Tensor, num_experts: int,
                pad_multiple: int, num_out: int, name: Optional[str], q: torch.Tensor, scales: torch.Tensor,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The permutation of FP8 rows ``q [R, H]`` (uint8 bits) and ``scales``, dequantized to
    ``dtype`` as they are moved."""
    return _permuted(_C.permute_fp8, (route.contiguous(), num_experts, pad_multiple, num_out, q, scales,
                                      _contiguous(probs), torch.empty(0, dtype=dtype)), route, num_experts, num_out, name)


@_op(lambda rows, probs, route, num_experts, pad_multiple, num_out, name, addrs, align, max_blocks, first_row:
     _permuted_fake(rows, probs, route, num_experts, num_out), _permutation_backward, _permutation_setup)
def permute_from(rows: torch.Tensor, probs: Optional[torch.Tensor], route: torch.Tensor, num_experts: int,
                 pad_multiple: int, num_out: int, name: Optional[str],
                 addrs: torch.Tensor, align: int, max_blocks: int,
                 first_row: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The permutation of the rows at ``addrs [R]`` (see :mod:`flexdispatch.peer_ops`)."""
    return _permuted(_C.permute_from, (route.contiguous(), num_experts, pad_multiple, num_out, addrs.contiguous(),
                                       align, rows, _contiguous(probs), max_blocks, first_row),
                     route, num_experts, num_out, name)


@_op(lambda rows, probs, route, num_experts, pad_multiple, num_out, name, addrs, align, max_blocks, first_row:
     _permuted_fake(rows, probs, route, num_experts, num_out), _permutation_backward, _permutation_setup)
def permute_fp8_from(rows: torch.Tensor, probs: Optional[torch.Tensor], route: torch.Tensor, num_experts: int,
                     pad_multiple: int, num_out: int, name: Optional[str],
                     addrs: torch.Tensor, align: int, max_blocks: int,
                     first_row: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The dequantizing permutation of the FP8 rows at ``addrs [R]`` (see :mod:`flexdispatch.peer_ops`)."""
    return _permuted(_C.permute_fp8_from, (route.contiguous(), num_experts, pad_multiple, num_out, addrs.contiguous(),
                                           align, rows, _contiguous(probs), max_blocks, first_row),
                     route, num_experts, num_out, name)


# ---- row movers along a plan (map, layout, experts, padded, has tail) -----------------------------


def _scatter_setup(ctx, inputs, output):
    ctx.save_for_backward(inputs[1], inputs[3])
    ctx.plan = inputs[4:]


def _scatter_backward(ctx, grad):
    row_map, layout = ctx.saved_tensors
    return (gather_rows(grad, row_map, None, layout, *ctx.plan),) + (None,) * 6


@_op(lambda src, row_map, num_out, layout, num_experts, padded, has_tail: src.new_empty(num_out, src.shape[1]),
     _scatter_backward, _scatter_setup)
def scatter_rows(src: torch.Tensor, row_map: torch.Tensor, num_out: int, layout: torch.Tensor, num_experts: int,
                 padded: bool, has_tail: bool) -> torch.Tensor:
    """``[N, H]`` with every source row at its planned rows; pad and tail rows zero."""
    return _C.scatter_rows(src.contiguous(), row_map, num_out, layout, num_experts, padded, has_tail)


def _gather_setup(ctx, inputs, output):
    src, row_map, probs, layout, num_experts, padded, has_tail = inputs
    ctx.save_for_backward(None if probs is None else src, row_map, probs, layout)
    ctx.plan = (src.shape[0], num_experts, padded, has_tail)


def _gather_backward(ctx, grad):
    src, row_map, probs, layout = ctx.saved_tensors
    num_out, num_experts, padded, has_tail = ctx.plan
    if probs is None:
        return (scatter_rows(grad, row_map, num_out, layout, num_experts, padded, has_tail),) + (None,) * 6
    grad_src, grad_probs = gather_rows_backward(grad, src, row_map, probs, layout, num_experts, padded, has_tail)
    return grad_src, None, (grad_probs if ctx.needs_input_grad[2] else None), None, None, None, None


@_op(lambda src, row_map, probs, layout, num_experts, padded, has_tail: src.new_empty(row_map.shape[0], src.shape[1]),
     _gather_backward, _gather_setup)
def gather_rows(src: torch.Tensor, row_map: torch.Tensor, probs: Optional[torch.Tensor], layout: torch.Tensor,
                num_experts: int, padded: bool, has_tail: bool) -> torch.Tensor:
    """``[R, H]``: row ``r`` sums ``src[map[r, s]]`` (times ``probs[r, s]``) in slot order."""
    return _C.gather_rows(src.contiguous(), row_map, _contiguous(probs))


@_op(lambda values, row_map: values.new_empty(row_map.shape))
def gather_slots(values: torch.Tensor, row_map: torch.Tensor) -> torch.Tensor:
    """``[R, S]``: ``values [N]`` (float32 or float64) at each slot's output row, 0 at an unused
    slot; the permuted probs' gradient to the route's probs, one kernel."""
    return _C.gather_slots(values.contiguous(), row_map)


@_op(lambda grad, src, row_map, probs, layout, num_experts, padded, has_tail: (src.new_empty(src.shape),
                                                                               probs.new_empty(probs.shape)))
def gather_rows_backward(grad: torch.Tensor, src: torch.Tensor, row_map: torch.Tensor, probs: torch.Tensor,
                         layout: torch.Tensor, num_experts: int, padded: bool,
                         has_tail: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of :func:`gather_rows`' ``src`` and ``probs``."""
    return _C.gather_rows_backward(grad.contiguous(), src.contiguous(), row_map, probs.contiguous(), layout,
                                   num_experts, padded, has_tail)


# ---- FP8 rows ---------------------------------------------------------------------------------


@_op(lambda x: (x.new_empty(x.shape, dtype=torch.uint8), x.new_empty(x.shape[0], x.shape[1] // FP8_GROUP,
                                                                     dtype=torch.float32)))
def quantize_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q [R, H] uint8 bits of e4m3, scales [R, H / 128] float32)``."""
    return _C.quantize_fp8(x.contiguous())


@_op(lambda q, scales, dtype: q.new_empty(q.shape, dtype=dtype))
def dequantize_fp8(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``q [R, H]`` uint8 bits of e4m3 times their scales, as ``dtype``."""
    return _C.dequantize_fp8(q.contiguous(), scales.contiguous(), torch.empty(0, dtype=dtype))


@_op(lambda x: torch.empty_like(x), lambda ctx, grad: (grad,), lambda ctx, inputs, output: None)
def fp8_round_trip(x: torch.Tensor) -> torch.Tensor:
    """Rows rounded through FP8; straight-through gradient."""
    return dequantize_fp8(*quantize_fp8(x), x.dtype)
