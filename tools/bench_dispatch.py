"""Benchmark a MoE layer's token movement on W local GPUs, through every available manager,
beside raw DeepEP dispatch+combine.

Each rank routes T tokens (bf16, hidden H) to K of E experts (uniformly random distinct
experts). The experts are a per-expert scale times the permuted probs, so the dispatcher's
own time dominates. Measured with CUDA events after warm-up, the median of --iters runs,
the slowest rank reported:

  raw        DeepEP get_dispatch_layout + dispatch + combine alone (no permutation, no autograd)
  reference  the reference dispatcher's algorithm on the same DeepEP buffer (tools/reference_dispatcher.py:
             its unfused torch permutation, host syncs and scatter_add restore), as the baseline
             variant ``--managers reference``; its output is compared with the deepep manager's
  dispatcher the forward minus its experts stage timed alone (the synchronous pass below): the
             dispatcher's own share of the layer, as "dispatcher fwd / raw"
  traffic    the rows that cross NVLink per dispatch (one per token and other rank holding one
             of its experts: the same for DeepEP and the NVLink manager), their bytes a token,
             and the aggregate GB/s of raw DeepEP and of each variant's dispatch and combine stages
  forward    token_permutation2 + experts + token_unpermutation (async dispatch/combine as the
             facade does by default), stages timed in a separate synchronous pass
  fwd+bwd    the same plus backward, from a fixed random upstream gradient of the output, to
             the hidden states and the probs
  peak       torch allocator peak over fwd+bwd, minus what was allocated before (DeepEP's own
             communication buffer is outside the allocator and not counted)

    python tools/bench_dispatch.py --world-size 4 --json out.json --png out.png

Variants for A/B runs in the same process: ``--managers reference,deepep,deepep:novalidate,alltoall``;
options after the colon, joined by ``+``: ``novalidate`` (moe_validate_routing=False), ``torchexperts`` (the
broadcast-multiply experts instead of the fused Triton ones), ``fp8`` (moe_fp8_dispatch=True:
then raw DeepEP with FP8 dispatch is timed too, quantization included, and the variant's
output is compared with the same manager's bf16 output: ``rel_err``), ``syncfree``
(moe_sync_free=True), ``nostagger`` (the NVLink manager's pulls all start at the first received row
instead of the next rank's: the testing switch nvlink_pulls=from_row_0), ``ncclagree`` (the DeepEP manager agrees through an NCCL all-gather instead of
symmetric memory: the testing switch deepep_agreement=nccl), ``onecall`` (the forward through token_permutation2 and
token_unpermutation, where managers may fuse steps: the NVLink manager's permutation reads the
rows from its peers' buffers; stages are still timed step by step), ``bound=F`` (sync-free with moe_max_tokens_per_expert = F times the mean
rows per local expert, T * W * K / E), ``graph`` (sync-free, and the forward and the
forward+backward each captured in a CUDA graph and timed as replays; peak = the live bytes at
the peak of the forward+backward capture, and the graph pool's kept segments are shown; its gradients are checked equal to an eager run's; stages
are those of the same layer run eagerly). Host ms: the median time from the call to its return
with the GPU idle at the start. ``--trace DIR`` writes a
torch.profiler chrome trace of rank 0 for three forwards of the first shape per variant and
for raw DeepEP (see tools/trace_summary.py).
"""

from __future__ import annotations

import argparse
import json
import math
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

import flexdispatch as fd  # noqa: E402
from flexdispatch import envs  # noqa: E402
from flexdispatch.managers import deepep  # noqa: E402
from bench_experts import scale_rows, triton_available  # noqa: E402
from reference_dispatcher import DeepepTransport, ReferenceDispatcher  # noqa: E402
from timing import init_rank, median_ms  # noqa: E402

SHAPES = [(4096, 7168, 256, 8), (8192, 2048, 128, 8), (1024, 1024, 32, 4)]
STAGES = ("preprocess", "dispatch", "permute", "experts", "restore", "combine")


def _median_ms(fn, iters: int, warmup: int) -> float:
    return median_ms(fn, iters, warmup, before_each=dist.barrier)  # ranks start together


def _host_ms(fn, iters: int) -> float:
    """Median host milliseconds from calling ``fn`` to its return, the GPU idle at the start
    (what a step costs the CPU; includes the host waits inside, e.g. DeepEP's for its counts)."""
    times = []
    for _ in range(iters):
        dist.barrier()
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
        torch.cuda.synchronize()
    return statistics.median(times)


class Layer:
    """Inputs of one rank and the layer on a dispatcher."""

    def __init__(self, rank, world, tokens, hidden, experts, topk, variant):
        backend, _, options = variant.partition(":")
        options = set(filter(None, options.split("+")))  # (commas separate the variants)
        bound_factor = None
        for option in [o for o in options if o.startswith("bound=")]:
            options.remove(option)
            bound_factor = float(option.split("=", 1)[1])
        unknown = options - {"novalidate", "torchexperts", "fp8", "syncfree", "graph", "onecall", "ncclagree",
                             "nostagger"}
        if unknown:
            raise ValueError(f"--managers: unknown options {sorted(unknown)} in {variant!r}")
        self.graph = "graph" in options
        self.onecall = "onecall" in options  # token_permutation2 / token_unpermutation
        # The bound: a factor of the mean rows per local expert (T * W * K / E).
        bound = None if bound_factor is None else math.ceil(bound_factor * tokens * world * topk / experts)
        sync_free = self.graph or "syncfree" in options or bound is not None
        self.experts_impl = "torch" if "torchexperts" in options else "triton"
        g = torch.Generator(device="cuda").manual_seed(1234 + rank)
        self.tokens = tokens
        self.x = torch.randn(tokens, hidden, device="cuda", generator=g).to(torch.bfloat16)
        self.idx = torch.rand(tokens, experts, device="cuda", generator=g).argsort(1)[:, :topk].contiguous()
        self.probs = torch.rand(tokens, topk, device="cuda", generator=g)
        self.grad_out = torch.randn(tokens, hidden, device="cuda", generator=g).to(torch.bfloat16)
        local = experts // world
        self.scale = torch.linspace(0.5, 1.5, experts, device="cuda")[rank * local:(rank + 1) * local]
        self.local = local
        if backend == "reference":
            if options or bound is not None:
                raise ValueError(f"--managers: the reference variant takes no options ({variant!r})")
            buffer = deepep.buffers.get(dist.group.WORLD, hidden * 2, 20)  # (raw DeepEP's buffer)
            self.d = ReferenceDispatcher(local, DeepepTransport(buffer, experts))
            return
        config = fd.MoEConfig(num_moe_experts=experts, moe_router_topk=topk, moe_flex_backend=backend,
                              moe_validate_routing="novalidate" not in options, moe_fp8_dispatch="fp8" in options,
                              moe_sync_free=sync_free, moe_max_tokens_per_expert=bound, moe_dropped_tokens="ignore")
        switches = {}
        if "ncclagree" in options:
            switches["deepep_agreement"] = "nccl"
        if "nostagger" in options:
            switches["nvlink_pulls"] = "from_row_0"
        with envs.testing_switches(**switches):  # (read when the manager is made)
            self.d = fd.MoEFlexTokenDispatcher(local, list(range(rank * local, (rank + 1) * local)), config,
                                               dist.group.WORLD)

    def experts(self, rows, tokens_per_expert, permuted_probs):
        # Each row's expert found on the device, with no sync: the counts may live on the GPU
        # (sync-free) and then sum to fewer rows than the worst-case tensor holds (zero rows).
        ends = torch.cumsum(tokens_per_expert.to("cuda", non_blocking=True), 0)
        row_expert = torch.searchsorted(ends, torch.arange(rows.shape[0], device="cuda"), right=True)
        row_expert = row_expert.clamp_(max=self.local - 1)
        return scale_rows(rows, self.scale[row_expert] * permuted_probs, self.experts_impl)

    def forward(self, x, probs, async_finish=True, marks=None):
        d = self.d
        if self.onecall and marks is None:
            rows, tpe, pp = d.token_permutation2(x, self.tokens, probs, self.idx)
            return d.token_unpermutation(self.experts(rows, tpe, pp))
        h, _ = d.dispatch_preprocess2(x, self.tokens, probs, self.idx)
        self._mark(marks)
        h, _ = d.dispatch_all_to_all(h, async_finish=async_finish, allocate_on_comm_stream=async_finish)
        self._mark(marks)
        rows, tpe, pp = d.dispatch_postprocess(h)
        self._mark(marks)
        y = self.experts(rows, tpe, pp)
        self._mark(marks)
        y = d.combine_preprocess(y)
        self._mark(marks)
        y = d.combine_postprocess(d.combine_all_to_all(y, async_finish=async_finish,
                                                       allocate_on_comm_stream=async_finish))
        self._mark(marks)
        return y

    @staticmethod
    def _mark(marks):
        if marks is not None:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            marks.append(event)

    def stage_ms(self, iters, warmup):
        for _ in range(warmup):
            self.forward(self.x, self.probs, async_finish=False)
        samples = []
        for _ in range(iters):
            dist.barrier()
            torch.cuda.synchronize()
            marks = []
            self._mark(marks)
            self.forward(self.x, self.probs, async_finish=False, marks=marks)
            marks[-1].synchronize()
            samples.append([a.elapsed_time(b) for a, b in zip(marks, marks[1:])])
        return [statistics.median(col) for col in zip(*samples)]

    def fwd_bwd(self):
        x = self.x.detach().requires_grad_()
        p = self.probs.detach().requires_grad_()
        self.forward(x, p).backward(self.grad_out)

    def _fwd_bwd_grads(self):
        return torch.autograd.grad(self.forward(self.leaf_x, self.leaf_p), (self.leaf_x, self.leaf_p), self.grad_out)

    def capture(self):
        """Capture the forward, and forward+backward, in two CUDA graphs (sync-free mode); returns
        ``(peak live bytes during the forward+backward capture, bytes its memory pool kept)``."""
        self.leaf_x = self.x.detach().clone().requires_grad_()
        self.leaf_p = self.probs.detach().clone().requires_grad_()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                self.forward(self.x, self.probs)
                self._fwd_bwd_grads()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        self.graph_fwd, self.graph_fwd_bwd = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph_fwd):
            self.static_out = self.forward(self.x, self.probs)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        reserved, allocated = torch.cuda.memory_reserved(), torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        with torch.cuda.graph(self.graph_fwd_bwd):
            self.static_grads = self._fwd_bwd_grads()
        torch.cuda.synchronize()
        # (peak of live bytes while capturing, as the eager figure; the pool's segments, which
        # the graph keeps, are its footprint)
        return torch.cuda.max_memory_allocated() - allocated, torch.cuda.memory_reserved() - reserved

    def replay_matches_eager(self) -> bool:
        """The captured forward+backward's output gradients equal an eager run's, bit for bit."""
        self.graph_fwd_bwd.replay()
        eager = self._fwd_bwd_grads()
        torch.cuda.synchronize()
        return all(torch.equal(a, b) for a, b in zip(self.static_grads, eager))


def raw_deepep(layer, experts, fp8=False):
    """DeepEP's layout, dispatch and combine alone, on the layer's inputs (a callable). With
    ``fp8`` the rows are quantized (flexdispatch's kernel) and dispatched as FP8; the combine
    sends bf16 rows of the received shape, as a layer's combine would."""
    buffer = deepep.buffers.get(dist.group.WORLD, layer.x.shape[1] * 2, 20)

    def run():
        per_rank, per_rdma, per_expert, in_rank, _ = buffer.get_dispatch_layout(layer.idx, experts)
        sent = fd.ops.quantize_fp8(layer.x) if fp8 else layer.x
        recv_x, _, _, _, handle, _ = buffer.dispatch(sent, topk_idx=layer.idx, topk_weights=layer.probs,
                                                     num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma,
                                                     is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
        if fp8:
            recv_x = torch.empty(recv_x[0].shape, dtype=torch.bfloat16, device="cuda")
        buffer.combine(recv_x, handle)

    return run


def remote_rows(idx: torch.Tensor, rank: int, world: int, experts: int) -> int:
    """Rows a rank's dispatch sends over NVLink: one per (token, other rank holding one of its
    experts), as DeepEP and the NVLink manager both send them (never one per expert); -1 slots
    ignored. Combine sends the same rows back."""
    local = experts // world
    dest = torch.where(idx >= 0, idx // local, world)  # world: no destination
    hit = torch.zeros(idx.shape[0], world + 1, dtype=torch.bool, device=idx.device).scatter_(1, dest, True)
    hit[:, rank] = False
    return int(hit[:, :world].sum())


def traffic_lines(entry: dict, world: int) -> list:
    """What crosses NVLink per call at a shape, and the aggregate GB/s each variant reached:
    raw DeepEP over its dispatch and combine together, a variant over its dispatch and combine
    stages (the synchronous pass: host time included, so a lower bound at small shapes)."""
    tokens, hidden, _, _ = entry["shape"]
    rows = entry.get("remote_rows")
    if not rows:
        return []
    bf16 = rows * hidden * 2
    lines = [f"NVLink traffic, shape {entry['shape']}: {rows} rows cross per dispatch ({rows / (tokens * world):.2f} "
             f"a token, of {world - 1} other ranks), {bf16 / (tokens * world) / 1e3:.1f} KB a token in bf16 each way"]
    gbps = []
    if entry.get("raw_deepep_ms"):
        gbps.append(f"raw DeepEP {2 * bf16 / entry['raw_deepep_ms'] / 1e6:.0f} (dispatch + combine)")
    for manager, r in entry["managers"].items():
        sent = rows * (hidden + hidden // 128 * 4) if "fp8" in manager else bf16
        d, c = r["stages_ms"]["dispatch"], r["stages_ms"]["combine"]
        gbps.append(f"{manager} {sent / d / 1e6:.0f} dispatch, {bf16 / c / 1e6:.0f} combine")
    return lines + ["aggregate GB/s over all ranks: " + "; ".join(gbps)]


def compared_with(variant: str):
    """The variant whose forward a variant's output is compared with: the same manager without
    FP8 for an FP8 variant, the deepep manager for the reference; None: not compared."""
    if variant == "reference":
        return "deepep"
    backend, _, options = variant.partition(":")
    options = options.split("+")
    if "fp8" not in options:
        return None
    rest = "+".join(o for o in options if o != "fp8")
    return f"{backend}:{rest}" if rest else backend


def rel_error(layer, rank, world, tokens, hidden, experts, topk, other) -> float:
    """Relative error of a layer's forward against another variant's on the same inputs."""
    plain = Layer(rank, world, tokens, hidden, experts, topk, other)
    want = plain.forward(plain.x, plain.probs).float()
    got = layer.forward(layer.x, layer.probs).float()
    return float((got - want).norm() / want.norm())


def _profiled(fn, path: Path, rank: int, repeats: int = 3) -> None:
    """Run fn a few times under torch.profiler on rank 0 (plainly elsewhere); write a chrome
    trace in which each run is annotated "forward" (tools/trace_summary.py reads them)."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    dist.barrier()
    if rank != 0:
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
        return
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(repeats):
            with torch.profiler.record_function("forward"):
                fn()
        torch.cuda.synchronize()
    prof.export_chrome_trace(str(path))
    print(f"trace: {path}", flush=True)


def trace_forwards(rank, world, variants, args):
    """Chrome traces of rank 0: raw DeepEP and each variant's forward on the first shape."""
    args.trace.mkdir(parents=True, exist_ok=True)
    tokens, hidden, experts, topk = args.shapes[0]
    if any(v.startswith(("deepep", "reference")) for v in variants):
        layer = Layer(rank, world, tokens, hidden, experts, topk, "deepep")
        _profiled(raw_deepep(layer, experts), args.trace / "raw_deepep.json", rank)
    for variant in variants:
        layer = Layer(rank, world, tokens, hidden, experts, topk, variant)
        name = variant.replace(":", "_").replace("+", "_").replace("=", "")
        _profiled(lambda: layer.forward(layer.x, layer.probs), args.trace / f"{name}.json", rank)
        _profiled(layer.fwd_bwd, args.trace / f"{name}_fwd_bwd.json", rank)
        del layer
        torch.cuda.empty_cache()


def _worker(rank, world, port, args, results):
    init_rank(rank, world, port)
    report = []
    managers = [m for m in args.managers
                if not m.startswith(("deepep", "reference")) or deepep.unusable_reason(dist.group.WORLD) is None]
    if args.trace:
        trace_forwards(rank, world, managers, args)
    for tokens, hidden, experts, topk in args.shapes:
        entry = {"shape": [tokens, hidden, experts, topk], "managers": {}}
        values = []
        if any(m.startswith(("deepep", "reference")) for m in managers):
            layer = Layer(rank, world, tokens, hidden, experts, topk, "deepep")
            entry["raw_deepep_ms"] = len(values)
            values.append(_median_ms(raw_deepep(layer, experts), args.iters, args.warmup))
            if any("fp8" in m for m in managers) and hidden % 128 == 0:
                entry["raw_deepep_fp8_ms"] = len(values)
                values.append(_median_ms(raw_deepep(layer, experts, fp8=True), args.iters, args.warmup))
        for manager in managers:
            layer = Layer(rank, world, tokens, hidden, experts, topk, manager)
            if "remote_rows" not in entry:  # (every variant routes the same tokens: the same seeds)
                sent = torch.tensor([remote_rows(layer.idx, rank, world, experts)], dtype=torch.float64, device="cuda")
                dist.all_reduce(sent)
                entry["remote_rows"] = int(sent.item())
            stages = layer.stage_ms(args.iters, args.warmup)  # eager, also for a captured variant
            pool = float("nan")
            if layer.graph:
                peak, pool = layer.capture()
                equal = float(layer.replay_matches_eager())
                fwd_fn, both_fn = layer.graph_fwd.replay, layer.graph_fwd_bwd.replay
            else:
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                layer.fwd_bwd()
                torch.cuda.synchronize()
                peak = torch.cuda.max_memory_allocated() - base
                equal = float("nan")
                fwd_fn, both_fn = (lambda: layer.forward(layer.x, layer.probs)), layer.fwd_bwd
            fwd = _median_ms(fwd_fn, args.iters, args.warmup)
            both = _median_ms(both_fn, args.iters, args.warmup)
            host = [_host_ms(fwd_fn, args.iters), _host_ms(both_fn, args.iters)]
            entry["managers"][manager] = len(values)
            other = compared_with(manager)
            err = 0.0 if other is None else rel_error(layer, rank, world, tokens, hidden, experts, topk, other)
            values += [fwd, both, peak / 2**30, *stages, err, *host, 1.0 - equal,  # (max over ranks: any mismatch)
                       pool / 2**30]
            del layer
            torch.cuda.empty_cache()
        slowest = torch.tensor(values, dtype=torch.float64, device="cuda")
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        v = slowest.tolist()
        for key in ("raw_deepep_ms", "raw_deepep_fp8_ms"):
            if key in entry:
                entry[key] = v[entry[key]]
        for manager, at in entry["managers"].items():
            entry["managers"][manager] = {"forward_ms": v[at], "fwd_bwd_ms": v[at + 1], "peak_gib": v[at + 2],
                                          "stages_ms": dict(zip(STAGES, v[at + 3:at + 3 + len(STAGES)])),
                                          "rel_err": v[at + 3 + len(STAGES)],
                                          "host_forward_ms": v[at + 4 + len(STAGES)],
                                          "host_fwd_bwd_ms": v[at + 5 + len(STAGES)],
                                          "replay_equals_eager": 1.0 - v[at + 6 + len(STAGES)],
                                          "graph_pool_gib": v[at + 7 + len(STAGES)]}
        report.append(entry)
    if rank == 0:
        results.put(report)
    fd.shutdown()
    dist.destroy_process_group()


def format_table(report, world, device) -> str:
    lines = [f"{world} x {device}",
             "| T | H | E | K | manager | forward ms | fwd+bwd ms | peak GiB | raw DeepEP ms | fwd / raw | "
             "dispatcher fwd / raw | fwd+bwd / raw | host ms fwd, fwd+bwd | stages (ms, synchronous pass) |",
             "|" + "---|" * 14]
    for entry in report:
        raw = entry.get("raw_deepep_ms")
        for manager, r in entry["managers"].items():
            ratio = (lambda v: f"{v / raw:.2f}x") if raw else (lambda v: "-")
            stages = ", ".join(f"{k} {v:.3f}" for k, v in r["stages_ms"].items())
            if compared_with(manager):
                stages += f"; rel. error vs {compared_with(manager)} {r['rel_err']:.4f}"
            if r["replay_equals_eager"] == r["replay_equals_eager"]:  # a captured variant
                stages += (f"; replay == eager (all ranks): {bool(r['replay_equals_eager'])}; graph pool "
                           f"{r['graph_pool_gib']:.2f} GiB")
            lines.append(f"| {' | '.join(map(str, entry['shape']))} | {manager} | {r['forward_ms']:.3f} | "
                         f"{r['fwd_bwd_ms']:.3f} | {r['peak_gib']:.2f} | {raw if raw else float('nan'):.3f} | "
                         f"{ratio(r['forward_ms'])} | {ratio(r['forward_ms'] - r['stages_ms']['experts'])} | "
                         f"{ratio(r['fwd_bwd_ms'])} | {r['host_forward_ms']:.3f}, "
                         f"{r['host_fwd_bwd_ms']:.3f} | {stages} |")
    for entry in report:
        lines += traffic_lines(entry, world)
    for entry in report:
        if "raw_deepep_fp8_ms" in entry:
            lines.append(f"raw DeepEP with FP8 dispatch (quantization included), shape {entry['shape']}: "
                         f"{entry['raw_deepep_fp8_ms']:.3f} ms")
    return "\n".join(lines)


def plot(report, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(report), figsize=(5 * len(report), 4), squeeze=False)
    for ax, entry in zip(axes[0], report):
        names, bottoms, labelled = [], [], set()

        def label(name):  # each legend entry once
            first = name not in labelled
            labelled.add(name)
            return name if first else None

        for i, (manager, r) in enumerate(entry["managers"].items()):
            bottom = 0.0
            if r["replay_equals_eager"] == r["replay_equals_eager"]:  # captured: one bar, the replay
                ax.bar(i, r["forward_ms"], color="black", label=label("captured forward (replay)"))
                bottom = r["forward_ms"]
            else:
                for stage, ms in r["stages_ms"].items():
                    ax.bar(i, ms, bottom=bottom, label=label(stage), color=f"C{STAGES.index(stage)}")
                    bottom += ms
            ax.plot(i, r["host_forward_ms"], "rx", label=label("host ms of a forward"))
            names.append(manager)
            bottoms.append(bottom)
        if entry.get("raw_deepep_ms"):
            ax.bar(len(names), entry["raw_deepep_ms"], color="gray", label="raw DeepEP d+c")
            names.append("raw DeepEP")
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=7)
        ax.set_ylabel("forward ms (eager: stages of a synchronous pass)")
        ax.set_title("T={} H={} E={} K={}".format(*entry["shape"]), fontsize=9)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=4)
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--managers", default="deepep,alltoall")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--png", type=Path)
    parser.add_argument("--shapes", default="0,1,2", help="which of the three shapes (indices)")
    parser.add_argument("--trace", type=Path, help="write chrome traces of the first shape's forwards here")
    args = parser.parse_args()
    args.managers = args.managers.split(",")
    args.shapes = [SHAPES[int(i)] for i in args.shapes.split(",")]
    print(f"experts: {'fused Triton' if triton_available() else 'torch broadcast multiply (no Triton)'}", flush=True)
    if torch.cuda.device_count() < args.world_size:
        print(f"needs {args.world_size} GPUs, found {torch.cuda.device_count()}", file=sys.stderr)
        return 2
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    results = ctx.SimpleQueue()
    mp.start_processes(_worker, args=(args.world_size, port, args, results), nprocs=args.world_size,
                       start_method="spawn")
    report = results.get()
    device = torch.cuda.get_device_name(0)
    print(format_table(report, args.world_size, device))
    if args.json:
        args.json.write_text(json.dumps({"world_size": args.world_size, "device": device, "shapes": report}, indent=1))
    if args.png:
        plot(report, args.png, f"flexdispatch on {args.world_size} x {device}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
