"""Read a chrome trace written by ``bench_dispatch.py --trace`` and print, for one profiled
forward, its GPU work in time order (start offset, duration, stream, kernel) with the idle
gaps, and the host calls that waited on the GPU.

    python tools/trace_summary.py TRACE.json [--forward 1] [--top 60]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

GPU_CATS = {"kernel", "gpu_memcpy", "gpu_memset"}
WAITS = ("cudaStreamSynchronize", "cudaEventSynchronize", "cudaDeviceSynchronize", "cudaMemcpy", "cudaMemcpyAsync",
         "cudaStreamWaitEvent", "cudaHostAlloc", "cudaMalloc", "cudaFree")


def load(path: Path):
    events = json.loads(path.read_text())["traceEvents"]
    return [e for e in events if e.get("ph") == "X"]


def summarize(events, which: int, top: int) -> str:
    forwards = sorted((e for e in events if e["name"] == "forward" and e.get("cat") == "user_annotation"),
                      key=lambda e: e["ts"])
    if not forwards:
        return "no 'forward' annotation in this trace"
    fwd = forwards[min(which, len(forwards) - 1)]
    t0, t1 = fwd["ts"], fwd["ts"] + fwd["dur"]
    launches = {e["args"]["correlation"]: e for e in events
                if e.get("cat") == "cuda_runtime" and "correlation" in e.get("args", {}) and t0 <= e["ts"] <= t1}
    gpu = sorted((e for e in events if e.get("cat") in GPU_CATS and e.get("args", {}).get("correlation") in launches),
                 key=lambda e: e["ts"])
    lines = [f"forward {which}: host {fwd['dur'] / 1e3:.3f} ms, {len(gpu)} GPU ops"]
    if gpu:
        start = gpu[0]["ts"]
        end = max(e["ts"] + e["dur"] for e in gpu)
        lines.append(f"GPU span {(end - start) / 1e3:.3f} ms (first op {(start - t0) / 1e3:.3f} ms after the host began)")
        busy_until = start
        for e in gpu[:top]:
            gap = e["ts"] - busy_until
            if gap > 5:
                lines.append(f"{'':>9} idle {gap / 1e3:.3f} ms")
            launch = launches[e["args"]["correlation"]]
            lines.append(f"{(e['ts'] - start) / 1e3:9.3f} {e['dur'] / 1e3:7.3f} ms  s{e.get('tid')}  "
                         f"(host +{(launch['ts'] - t0) / 1e3:.3f})  {e['name'][:90]}")
            busy_until = max(busy_until, e["ts"] + e["dur"])
    host = sorted((e for e in events if e.get("cat") == "cuda_runtime" and e["name"] in WAITS
                   and t0 <= e["ts"] <= t1 and e["dur"] > 20), key=lambda e: -e["dur"])
    lines.append("host calls over 20 us: " + (", ".join(f"{e['name']} {e['dur'] / 1e3:.3f} ms at "
                                                          f"+{(e['ts'] - t0) / 1e3:.3f}" for e in host[:12]) or "none"))
    ops = {}
    for e in events:
        if e.get("cat") == "cpu_op" and t0 <= e["ts"] <= t1:
            ops.setdefault(e["name"], [0, 0])
            ops[e["name"]][0] += e["dur"]
            ops[e["name"]][1] += 1
    heavy = sorted(ops.items(), key=lambda kv: -kv[1][0])[:15]
    lines.append("host ops (inclusive ms, calls): " + ", ".join(f"{k} {v[0] / 1e3:.3f} ({v[1]})" for k, v in heavy))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("traces", type=Path, nargs="+")
    parser.add_argument("--forward", type=int, default=1, help="which profiled forward (0-based)")
    parser.add_argument("--top", type=int, default=80, help="GPU ops to list")
    args = parser.parse_args()
    for path in args.traces:
        print(f"== {path.name}")
        print(summarize(load(path), args.forward, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
