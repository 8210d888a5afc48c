"""Where the one-rank layer's eager host time goes: device operations and Python per call.

    python tools/host_layer.py [--tokens 1024 --hidden 1024 --experts 32 --topk 4]
        [--mode sync-free|host-sized] [--device cuda|cpu] [--calls 200] [--top 25]

The layer is ``bench_compile.py``'s (router softmax, ``token_permutation`` on the local manager,
elementwise experts, ``token_unpermutation``). At small shapes its eager forward is host-bound:
the GPU waits for the host's launches. This prints, per call:

  host us         wall time of many calls queued with one sync at the end (median of 5 batches),
                  forward and forward + backward, and the same for the layer without the
                  dispatcher (softmax and experts alone) and for torch's cheapest device op
  device ops      the kernels, copies and fills one forward and one backward queue (torch.profiler):
                  on CUDA the runtime calls, each named with the aten op around it ("-" for the
                  extension's own launches); on the CPU the outermost aten ops, each with the
                  Python frame of flexdispatch that called it
  cProfile        the functions with the most own time over the forwards + backwards

On ``--device cpu`` the same runs on the CPU kernels (a smoke test; there is no launch cost).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

import flexdispatch as fd  # noqa: E402
from bench_compile import add_layer_arguments, dispatcher, layer, layer_inputs  # noqa: E402
from timing import host_us, own_time_top  # noqa: E402


def experts_alone(d, x, logits, scales):
    """The layer without the dispatcher: the router softmax and the experts on the input rows
    (as many rows as tokens, each row's expert its argmax)."""
    probs = torch.softmax(logits, dim=-1)
    expert = probs.argmax(dim=-1)
    return torch.nn.functional.silu(x * scales[expert]) * probs.amax(dim=-1, keepdim=True).to(x.dtype)


def queued_ops(fn, device: str) -> list:
    """(what, the flexdispatch frame that queued it) of every device operation one ``fn`` call
    queues: on CUDA its runtime calls that queue work (launches, copies, fills), each named with
    the aten op around it; on the CPU the outermost aten ops (what a device would launch)."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities, with_stack=True) as prof:
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
    events = prof.events()
    if device != "cuda":
        return [(e.name, _frame(e)) for e in events if e.name.startswith("aten::") and _aten_above(e) == "-"]
    queueing = ("Launch", "Memset", "Memcpy")
    return [(f"{e.name} ({_aten_above(e)})", _frame(e)) for e in events
            if e.device_type != torch.autograd.DeviceType.CUDA and e.name.startswith("cuda")
            and any(word in e.name for word in queueing)]


def _aten_above(event) -> str:
    parent = event.cpu_parent
    while parent is not None and not parent.name.startswith("aten::"):
        parent = parent.cpu_parent
    return "-" if parent is None else parent.name


def _frame(event) -> str:
    """The innermost Python frame of flexdispatch (or of the tools) above ``event``."""
    while event is not None:
        if "flexdispatch/" in event.name or "tools/" in event.name:
            return event.name.split("/")[-1]
        event = event.cpu_parent
    return "-"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_layer_arguments(parser)
    parser.add_argument("--mode", choices=("sync-free", "host-sized"), default="sync-free")
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    dev = args.device
    fd.ops.load_kernels()
    d = dispatcher(args, args.mode == "sync-free")
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    (x, logits, scales), grad = layer_inputs(args, dtype)

    def forward():
        return layer(d, x, logits, scales)

    def forward_backward():
        x.grad = None
        forward().backward(grad)

    one = torch.ones(1, device=dev)
    print(f"one-rank layer, {args.mode}: T={args.tokens} H={args.hidden} E={args.experts} K={args.topk} {dtype} "
          f"on {dev} ({torch.cuda.get_device_name() if dev == 'cuda' else 'CPU'}), torch {torch.__version__}")
    for label, fn in [("forward", forward), ("forward + backward", forward_backward),
                      ("softmax and experts alone, forward", lambda: experts_alone(d, x, logits, scales)),
                      ("launch floor (one add_)", lambda: one.add_(1))]:
        print(f"host us per call, {label}: {host_us(fn, dev, args.calls):.1f}")

    out = forward()
    for label, fn in [("forward", forward), ("backward", lambda: out.backward(grad))]:
        queued = queued_ops(fn, dev)
        print(f"device operations of one {label}: {len(queued)}")
        for name, frame in queued:
            print(f"  {name[:70]:70s} {frame}")

    top = own_time_top(forward_backward, dev, args.calls, args.top)
    print(f"cProfile of {args.calls} forwards + backwards, by own time:\n{top}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
