"""Benchmark a MoE layer's token movement on W local GPUs, through every available manager,
beside raw DeepEP dispatch+combine.

Each rank routes T tokens (bf16, hidden H) to K of E experts (uniformly random distinct
experts). The experts are a per-expert scale times the permuted probs, so the dispatcher's
own time dominates. Measured with CUDA events after warm-up, the median of --iters runs,
the slowest rank reported:

  raw        DeepEP get_dispatch_layout + dispatch + combine alone (no permutation, no autograd)
  forward    token_permutation2 + experts + token_unpermutation (async dispatch/combine as the
             facade does by default), stages timed in a separate synchronous pass
  fwd+bwd    the same plus backward of sum(out^2) to the hidden states and the probs
  peak       torch allocator peak over fwd+bwd, minus what was allocated before (DeepEP's own
             communication buffer is outside the allocator and not counted)

    python tools/bench_dispatch.py --world-size 4 --json out.json --png out.png
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

import flexdispatch as fd  # noqa: E402
from flexdispatch.managers import deepep  # noqa: E402
from timing import median_ms  # noqa: E402

SHAPES = [(4096, 7168, 256, 8), (8192, 2048, 128, 8), (1024, 1024, 32, 4)]
STAGES = ("preprocess", "dispatch", "permute", "experts", "restore", "combine")


def _median_ms(fn, iters: int, warmup: int) -> float:
    return median_ms(fn, iters, warmup, before_each=dist.barrier)  # ranks start together


class Layer:
    """Inputs of one rank and the layer on a dispatcher."""

    def __init__(self, rank, world, tokens, hidden, experts, topk, backend):
        g = torch.Generator(device="cuda").manual_seed(1234 + rank)
        self.tokens = tokens
        self.x = torch.randn(tokens, hidden, device="cuda", generator=g).to(torch.bfloat16)
        self.idx = torch.rand(tokens, experts, device="cuda", generator=g).argsort(1)[:, :topk].contiguous()
        self.probs = torch.rand(tokens, topk, device="cuda", generator=g)
        local = experts // world
        self.scale = torch.linspace(0.5, 1.5, experts, device="cuda")[rank * local:(rank + 1) * local]
        self.local = local
        config = fd.MoEConfig(num_moe_experts=experts, moe_router_topk=topk, moe_flex_backend=backend)
        self.d = fd.MoEFlexTokenDispatcher(local, list(range(rank * local, (rank + 1) * local)), config,
                                           dist.group.WORLD)

    def experts(self, rows, tokens_per_expert, permuted_probs):
        counts = tokens_per_expert.to("cuda", non_blocking=True)
        row_expert = torch.repeat_interleave(torch.arange(self.local, device="cuda"), counts,
                                             output_size=rows.shape[0])
        return rows * (self.scale[row_expert] * permuted_probs)[:, None].to(rows.dtype)

    def forward(self, x, probs, async_finish=True, marks=None):
        d = self.d
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
        out = self.forward(x, p)
        out.float().square().sum().backward()


def raw_deepep_ms(layer, experts, iters, warmup):
    buffer = deepep._registry.get(dist.group.WORLD, layer.x.shape[1] * 2, 20)

    def run():
        per_rank, per_rdma, per_expert, in_rank, _ = buffer.get_dispatch_layout(layer.idx, experts)
        recv_x, _, _, _, handle, _ = buffer.dispatch(layer.x, topk_idx=layer.idx, topk_weights=layer.probs,
                                                     num_tokens_per_rank=per_rank, num_tokens_per_rdma_rank=per_rdma,
                                                     is_token_in_rank=in_rank, num_tokens_per_expert=per_expert)
        buffer.combine(recv_x, handle)

    return _median_ms(run, iters, warmup)


def profile_forward(rank, world, manager, args):
    """torch.profiler over a few forwards of the first shape; rank 0 prints where time goes."""
    layer = Layer(rank, world, *SHAPES[0], manager)
    for _ in range(3):
        layer.forward(layer.x, layer.probs)
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(3):
            layer.forward(layer.x, layer.probs)
        torch.cuda.synchronize()
    if rank == 0:
        print(f"profile: {manager}, shape {SHAPES[0]}, 3 forwards", flush=True)
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60), flush=True)
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=18, max_name_column_width=60), flush=True)
    del layer
    torch.cuda.empty_cache()


def _worker(rank, world, port, args, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=torch.device("cuda", rank))
    report = []
    managers = [m for m in args.managers if m != "deepep" or deepep.unusable_reason(dist.group.WORLD) is None]
    if args.profile:
        profile_forward(rank, world, managers[0], args)
    for tokens, hidden, experts, topk in SHAPES:
        entry = {"shape": [tokens, hidden, experts, topk], "managers": {}}
        values = []
        if "deepep" in managers:
            layer = Layer(rank, world, tokens, hidden, experts, topk, "deepep")
            entry["raw_deepep_ms"] = len(values)
            values.append(raw_deepep_ms(layer, experts, args.iters, args.warmup))
        for manager in managers:
            layer = Layer(rank, world, tokens, hidden, experts, topk, manager)
            fwd = _median_ms(lambda: layer.forward(layer.x, layer.probs), args.iters, args.warmup)
            stages = layer.stage_ms(args.iters, args.warmup)
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            layer.fwd_bwd()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() - base
            both = _median_ms(layer.fwd_bwd, args.iters, args.warmup)
            entry["managers"][manager] = len(values)
            values += [fwd, both, peak / 2**30, *stages]
            del layer
            torch.cuda.empty_cache()
        slowest = torch.tensor(values, dtype=torch.float64, device="cuda")
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        v = slowest.tolist()
        if "raw_deepep_ms" in entry:
            entry["raw_deepep_ms"] = v[entry["raw_deepep_ms"]]
        for manager, at in entry["managers"].items():
            entry["managers"][manager] = {"forward_ms": v[at], "fwd_bwd_ms": v[at + 1], "peak_gib": v[at + 2],
                                          "stages_ms": dict(zip(STAGES, v[at + 3:at + 3 + len(STAGES)]))}
        report.append(entry)
    if rank == 0:
        results.put(report)
    fd.shutdown()
    dist.destroy_process_group()


def format_table(report, world, device) -> str:
    lines = [f"{world} x {device}",
             "| T | H | E | K | manager | forward ms | fwd+bwd ms | peak GiB | raw DeepEP ms | fwd / raw | "
             "fwd+bwd / raw | stages (ms, synchronous pass) |", "|" + "---|" * 12]
    for entry in report:
        raw = entry.get("raw_deepep_ms")
        for manager, r in entry["managers"].items():
            ratio = (lambda v: f"{v / raw:.2f}x") if raw else (lambda v: "-")
            stages = ", ".join(f"{k} {v:.3f}" for k, v in r["stages_ms"].items())
            lines.append(f"| {' | '.join(map(str, entry['shape']))} | {manager} | {r['forward_ms']:.3f} | "
                         f"{r['fwd_bwd_ms']:.3f} | {r['peak_gib']:.2f} | {raw if raw else float('nan'):.3f} | "
                         f"{ratio(r['forward_ms'])} | {ratio(r['fwd_bwd_ms'])} | {stages} |")
    return "\n".join(lines)


def plot(report, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(report), figsize=(5 * len(report), 4), squeeze=False)
    for ax, entry in zip(axes[0], report):
        names, bottoms = [], []
        for i, (manager, r) in enumerate(entry["managers"].items()):
            bottom = 0.0
            for stage, ms in r["stages_ms"].items():
                ax.bar(i, ms, bottom=bottom, label=stage if i == 0 else None, color=f"C{STAGES.index(stage)}")
                bottom += ms
            names.append(manager)
            bottoms.append(bottom)
        if entry.get("raw_deepep_ms"):
            ax.bar(len(names), entry["raw_deepep_ms"], color="gray", label="raw DeepEP d+c")
            names.append("raw DeepEP")
        ax.set_xticks(range(len(names)), names)
        ax.set_ylabel("forward ms (stages, synchronous)")
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
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table of the first shape")
    args = parser.parse_args()
    args.managers = args.managers.split(",")
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
