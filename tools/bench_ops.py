"""Benchmark the fused ops on one GPU against their byte floor and flexdispatch.reference.

For each shape (R rows, H hidden, E experts, K top-k; bf16 tokens, fp32 probs, every slot
used) it times, with CUDA events after warm-up (median of --iters runs):

  route_topk    the router's top-k of dense float32 probs [R, E] with its check, one pass (its
                "reference" column: torch.topk, then check_route, the steps it replaces)
  multihot      indices_to_multihot
  permute       permute_by_indices with the output size known (as in the managers)
  permute_map   permute by the multihot map (the public entry TransformerEngine's and Megatron's
                users call), the same rows; "vs index": its time over permute's
  permute+sync  permute_by_indices sizing its output itself (one host sync)
  perm+unperm   permute then unpermute, the pair a layer runs (the small-batch latency)
  unpermute     unpermute without probs (the restore step)
  unpermute_w   unpermute merging probs
  permute_bwd   backward of permute (a gather)
  unperm_bwd    backward of unpermute (a scatter)
  quantize_fp8  bf16 rows -> e4m3 bytes + a float32 scale per 128 values (3 bytes a value moved)
  dequantize_fp8  and back
  permute_fp8   permute_fp8_by_indices: FP8 rows dequantized as they are permuted (its
                "reference" column: dequantize, then permute, the two passes it replaces)

Each op is timed twice: one call from an idle GPU ("ms": the host's time before the first
launch included), and calls queued back to back ("ms back to back": the kernels' own time,
the host hidden behind them when it is the faster).

"launches": the device operations one call queues (kernels, copies, fills; torch.profiler),
counted once per op; with --kernels, each of them and its device time in microseconds.

Floor: permute and unpermute move 2*H*(R + N) bytes (N = R*K), the pair twice that; the
multihot conversion reads the route and writes an R x E bool map and R x E float32 probs.
GB/s is that over the time, and "of copy" is the ratio to a measured device-to-device copy
(bytes read + written). A permute reads a row once and writes it K times, so a fill's
write-only bandwidth is printed too: write-heavy ops are bounded by it more than by the copy.

    python tools/bench_ops.py --json out.json --png out.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parent)]

from flexdispatch import ops, reference  # noqa: E402
from bench_route_topk import topk_then_check  # noqa: E402
from timing import back_to_back_ms, device_ops, median_ms, one_call_events  # noqa: E402

SHAPES = [(16384, 7168, 64, 8), (32768, 2048, 32, 8), (1024, 1024, 8, 4), (4096, 7168, 256, 8),
          (4096, 7168, 512, 8), (1024, 1024, 32, 4), (1024, 1024, 128, 8), (1024, 1024, 256, 8),
          (1024, 1024, 512, 8)]


def copy_bandwidth(iters: int) -> tuple[float, float]:
    """GB/s of a 2 GiB device-to-device copy (bytes read + written) and of a 2 GiB fill
    (bytes written): the floors of read-heavy and write-heavy ops."""
    src = torch.randn(1 << 29, device="cuda")  # 2 GiB of float32
    dst = torch.empty_like(src)
    copy_ms = median_ms(lambda: dst.copy_(src), iters)
    fill_ms = median_ms(lambda: dst.fill_(1.5), iters)
    return 2 * src.numel() * 4 / copy_ms / 1e6, src.numel() * 4 / fill_ms / 1e6


def routing(rows: int, experts: int, topk: int, seed: int = 0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    idx = torch.rand(rows, experts, device="cuda", generator=g).argsort(dim=1)[:, :topk].contiguous()
    probs = torch.rand(rows, topk, device="cuda", generator=g)
    return idx, probs


def short_kernel_name(name: str) -> str:
    """A kernel's name without its namespaces and template arguments."""
    head = name.split("(")[0].split("<")[0]
    return head.rsplit("::", 1)[-1].replace("void ", "")


def bench_shape(rows, hidden, experts, topk, iters, ref_iters, copy_gbps, only=None):
    idx, probs = routing(rows, experts, topk)
    x = torch.randn(rows, hidden, device="cuda", dtype=torch.bfloat16)
    n = rows * topk
    floor_bytes = 2 * hidden * (rows + n)
    out, _, plan, _ = ops.permute_by_indices(x, idx, probs, num_experts=experts)
    results = {}

    def record(name, fn, ref_fn=None, bytes_moved=None):
        if only and name not in only:
            return
        ms = median_ms(fn, iters)
        queued = device_ops(one_call_events(fn))
        entry = {"ms": ms, "ms_b2b": back_to_back_ms(fn, iters), "launches": len(queued),
                 "kernels": [(short_kernel_name(n), us) for n, us in queued]}
        if bytes_moved:
            entry["gbps"] = bytes_moved / ms / 1e6
            entry["of_copy"] = entry["gbps"] / copy_gbps
            entry["of_copy_b2b"] = bytes_moved / entry["ms_b2b"] / 1e6 / copy_gbps
        if ref_fn is not None:
            ref_ms = median_ms(ref_fn, ref_iters, warmup=1)
            entry["ref_ms"] = ref_ms
            entry["speedup"] = ref_ms / ms
        results[name] = entry
        torch.cuda.empty_cache()

    # (the dense probs read; values, indices and clean indices written, R x K each)
    router = torch.softmax(torch.randn(rows, experts, device="cuda"), -1)
    record("route_topk", lambda: ops.route_topk_trusted(router, topk, 0, None), lambda: topk_then_check(router, topk),
           rows * experts * 4 + rows * topk * 20)
    # (the route read; the map's bool and float32 probs written, R x E each)
    multihot_bytes = idx.numel() * (idx.element_size() + probs.element_size()) + rows * experts * 5
    record("multihot", lambda: ops.indices_to_multihot(idx, probs, experts),
           lambda: reference.indices_to_multihot(idx, probs, experts), multihot_bytes)
    record("permute", lambda: ops.permute_by_indices(x, idx, probs, num_experts=experts, num_out_tokens=n),
           lambda: reference.permute_by_indices(x, idx, probs, num_experts=experts, num_out_tokens=n), floor_bytes)
    routing_map, dense_probs = ops.indices_to_multihot(idx, probs, experts)
    record("permute_map", lambda: ops.permute(x, routing_map, dense_probs, num_out_tokens=n),
           lambda: reference.permute(x, routing_map, dense_probs, num_out_tokens=n), floor_bytes)
    if "permute_map" in results and "permute" in results:
        results["permute_map"]["vs_index"] = results["permute_map"]["ms_b2b"] / results["permute"]["ms_b2b"]
    record("permute+sync", lambda: ops.permute_by_indices(x, idx, probs, num_experts=experts), None, floor_bytes)
    record("perm+unperm", lambda: ops.unpermute(*ops.permute_by_indices(x, idx, probs, num_experts=experts,
                                                                       num_out_tokens=n)[::2]), None, 2 * floor_bytes)
    ref_out, _, ref_plan, _ = reference.permute_by_indices(x, idx, probs, num_experts=experts)
    record("unpermute", lambda: ops.unpermute(out, plan), lambda: reference.unpermute(ref_out, ref_plan), floor_bytes)
    record("unpermute_w", lambda: ops.unpermute(out, plan, probs), lambda: reference.unpermute(ref_out, ref_plan, probs),
           floor_bytes)

    # Backward passes, timed through autograd with a fixed upstream gradient.
    xg = x.clone().requires_grad_()
    pout = ops.permute_by_indices(xg, idx, probs, num_experts=experts, num_out_tokens=n)[0]
    gout = torch.randn_like(pout)
    xr = x.clone().requires_grad_()
    rout = reference.permute_by_indices(xr, idx, probs, num_experts=experts, num_out_tokens=n)[0]
    record("permute_bwd", lambda: torch.autograd.grad(pout, xg, gout, retain_graph=True),
           lambda: torch.autograd.grad(rout, xr, gout, retain_graph=True), floor_bytes)
    del pout, rout, gout
    og = out.clone().requires_grad_()
    uout = ops.unpermute(og, plan)
    gu = torch.randn_like(uout)
    orf = ref_out.clone().requires_grad_()
    ruout = reference.unpermute(orf, ref_plan)
    record("unperm_bwd", lambda: torch.autograd.grad(uout, og, gu, retain_graph=True),
           lambda: torch.autograd.grad(ruout, orf, gu, retain_graph=True), floor_bytes)
    del uout, ruout, gu, og, orf

    # FP8 rows: bf16 in, e4m3 bytes and one float32 scale per 128 values out, and back.
    if hidden % reference.FP8_GROUP == 0:
        fp8_bytes = rows * hidden * 3 + rows * hidden // reference.FP8_GROUP * 4
        q, scales = ops.quantize_fp8(x)
        record("quantize_fp8", lambda: ops.quantize_fp8(x), lambda: reference.quantize_fp8(x), fp8_bytes)
        record("dequantize_fp8", lambda: ops.dequantize_fp8(q, scales), lambda: reference.dequantize_fp8(q, scales),
               fp8_bytes)
        # The dequantizing permutation: FP8 rows and scales read once, N bf16 rows written.
        permute_fp8_bytes = rows * hidden + rows * hidden // reference.FP8_GROUP * 4 + n * hidden * 2
        record("permute_fp8", lambda: ops.permute_fp8_by_indices(q, scales, idx, probs, num_experts=experts,
                                                                 num_out_tokens=n),
               lambda: ops.permute_by_indices(ops.dequantize_fp8(q, scales), idx, probs, num_experts=experts,
                                              num_out_tokens=n), permute_fp8_bytes)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--ref-iters", type=int, default=5)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--png", type=Path)
    parser.add_argument("--shapes", default=",".join(map(str, range(len(SHAPES)))), help="which shapes (indices)")
    parser.add_argument("--kernels", action="store_true", help="print each op's device operations and their time")
    parser.add_argument("--ops", help="time only these ops (comma-separated names, e.g. quantize_fp8,permute_fp8)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench_ops needs a CUDA GPU", file=sys.stderr)
        return 2
    assert ops.load_kernels(), "kernels not built"
    copy_gbps, write_gbps = copy_bandwidth(args.iters)
    device = torch.cuda.get_device_name()
    print(f"device: {device}; torch {torch.__version__}; device-to-device copy {copy_gbps:.0f} GB/s (read+write); "
          f"fill {write_gbps:.0f} GB/s (write only)")
    report = {"device": device, "torch": torch.__version__, "copy_gbps": copy_gbps, "write_gbps": write_gbps,
              "shapes": []}
    header = ("| R | H | E | K | op | ms | GB/s | of copy | ms back to back | of copy | launches | reference ms | "
              "speed-up |")
    print(header)
    print("|" + "---|" * 13)
    for shape in [SHAPES[int(i)] for i in args.shapes.split(",")]:
        results = bench_shape(*shape, args.iters, args.ref_iters, copy_gbps, args.ops and set(args.ops.split(",")))
        report["shapes"].append({"shape": shape, "results": results})
        for name, r in results.items():
            print(f"| {' | '.join(map(str, shape))} | {name} | {r['ms']:.3f} | {r.get('gbps', float('nan')):.0f} | "
                  f"{r.get('of_copy', float('nan')):.0%} | {r['ms_b2b']:.3f} | {r.get('of_copy_b2b', float('nan')):.0%} | "
                  f"{r['launches']} | {r.get('ref_ms', float('nan')):.3f} | "
                  f"{r.get('speedup', float('nan')):.1f}x |"
                  + (f" vs index {r['vs_index']:.2f}x" if "vs_index" in r else ""))
            if args.kernels:
                print("|  |  |  |  | " + ", ".join(f"{k} {us:.1f} us" for k, us in r["kernels"]) + " |")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    if args.png:
        plot(report, args.png)
    return 0


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops_with_floor = ["permute", "unpermute", "unpermute_w", "permute_bwd", "unperm_bwd"]
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(report["shapes"])
    for i, entry in enumerate(report["shapes"]):
        values = [entry["results"][o]["of_copy"] * 100 for o in ops_with_floor]
        ax.bar([j + i * width for j in range(len(ops_with_floor))], values, width,
               label="R={} H={} E={} K={}".format(*entry["shape"]))
    ax.axhline(100, color="gray", lw=0.8)
    ax.set_xticks([j + width for j in range(len(ops_with_floor))], ops_with_floor)
    ax.set_ylabel("% of device-to-device copy bandwidth")
    ax.set_title(f"flexdispatch ops on {report['device']}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
