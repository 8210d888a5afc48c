"""The benchmark tools' own arithmetic, on the CPU (the tools themselves need GPUs)."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_dispatch  # noqa: E402
import bench_host  # noqa: E402


@pytest.mark.parametrize("world,experts,topk", [(2, 8, 2), (3, 12, 3), (4, 32, 4), (4, 256, 8)])
def test_remote_rows_count_each_other_rank_once_per_token(world, experts, topk):
    """A token crosses NVLink once per other rank holding one of its experts (never once per
    expert); unused slots (-1) send nothing."""
    g = torch.Generator().manual_seed(world * experts + topk)
    idx = torch.rand(50, experts, generator=g).argsort(1)[:, :topk]
    idx[3, 0] = -1
    idx[7, :] = -1
    local = experts // world
    for rank in range(world):
        want = sum(len({int(e) // local for e in row if e >= 0} - {rank}) for row in idx)
        assert bench_dispatch.remote_rows(idx, rank, world, experts) == want


def test_traffic_lines_report_bytes_and_rates():
    stages = dict(zip(bench_dispatch.STAGES, [0.1, 0.25, 0.1, 0.3, 0.1, 0.2]))
    entry = {"shape": [1024, 1024, 32, 4], "raw_deepep_ms": 0.5, "remote_rows": 3000,
             "managers": {"deepep": {"stages_ms": stages}, "deepep:fp8": {"stages_ms": stages}}}
    first, rates = bench_dispatch.traffic_lines(entry, 4)
    assert "3000 rows cross per dispatch (0.73 a token, of 3 other ranks)" in first
    bf16 = 3000 * 1024 * 2
    fp8 = 3000 * (1024 + 1024 // 128 * 4)
    assert f"raw DeepEP {2 * bf16 / 0.5 / 1e6:.0f}" in rates
    assert f"deepep {bf16 / 0.25 / 1e6:.0f} dispatch, {bf16 / 0.2 / 1e6:.0f} combine" in rates
    assert f"deepep:fp8 {fp8 / 0.25 / 1e6:.0f} dispatch" in rates
    assert bench_dispatch.traffic_lines({"shape": [1, 2, 3, 4], "managers": {}}, 2) == []


def test_reference_baseline_computes_the_dense_layer():
    """The benchmark's baseline (the reference's algorithm, one rank) gives the dense formula's
    output and gradients, unused slots (-1) included: what it is timed on is the same layer."""
    import reference_dispatcher as ref
    from moe_math import dense_layer, rel_err

    g = torch.Generator().manual_seed(11)
    tokens, hidden, experts, topk = 40, 16, 8, 3
    x = torch.randn(tokens, hidden, generator=g, dtype=torch.float64)
    idx = torch.rand(tokens, experts, generator=g).argsort(1)[:, :topk]
    idx[5, 1] = -1
    idx[9, :] = -1
    probs = torch.rand(tokens, topk, generator=g).double()  # (probs travel as float32, as in the reference)
    weights = torch.randn(experts, hidden, hidden, generator=g, dtype=torch.float64) / 4

    def layer(x, p):
        d = ref.ReferenceDispatcher(experts, ref.LocalTransport(experts))
        h, _ = d.dispatch_preprocess2(x, tokens, p, idx)
        h, _ = d.dispatch_all_to_all(h)
        rows, tokens_per_expert, permuted_probs = d.dispatch_postprocess(h)
        assert tokens_per_expert.device.type == "cpu" and int(tokens_per_expert.sum()) == rows.shape[0]
        chunks = torch.split(rows, tokens_per_expert.tolist())
        y = torch.cat([torch.tanh(c @ weights[e]) for e, c in enumerate(chunks)]) * permuted_probs[:, None]
        return d.combine_postprocess(d.combine_all_to_all(d.combine_preprocess(y)))

    leaves = [x.clone().requires_grad_(), probs.clone().requires_grad_()]
    got = layer(*leaves)
    grad_out = torch.randn(tokens, hidden, generator=g, dtype=torch.float64)
    got_grads = torch.autograd.grad(got, leaves, grad_out)
    dense_leaves = [x.clone().requires_grad_(), probs.clone().requires_grad_()]
    want = dense_layer(*dense_leaves[:1], dense_leaves[1], idx, weights)
    want_grads = torch.autograd.grad(want, dense_leaves, grad_out)
    assert rel_err(got, want) < 1e-12
    for a, b in zip(got_grads, want_grads):
        assert rel_err(a, b) < 1e-6  # (the probs' gradient comes back through float32)
    assert got[9].abs().max() == 0  # every slot -1: a zero row


def test_reference_variant_is_compared_with_the_deepep_manager():
    assert bench_dispatch.compared_with("reference") == "deepep"
    assert bench_dispatch.compared_with("deepep:fp8+graph") == "deepep:graph"
    assert bench_dispatch.compared_with("deepep:fp8") == "deepep"
    assert bench_dispatch.compared_with("nvlink:onecall") is None


def test_run_notebook_creates_the_figures_folder(tmp_path):
    """--figures DIR works when DIR does not exist yet: the tool creates it before it saves the
    first figure."""
    pytest.importorskip("matplotlib")
    import json
    import subprocess

    notebook = tmp_path / "tiny.ipynb"
    cell = {"cell_type": "code", "metadata": {}, "outputs": [], "execution_count": None,
            "source": ["import matplotlib.pyplot as plt\n", "plt.plot([1, 2])\n", "plt.show()\n"]}
    notebook.write_text(json.dumps({"cells": [cell], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    figures = tmp_path / "not" / "there"
    tool = Path(__file__).resolve().parents[1] / "tools" / "run_notebook.py"
    out = subprocess.run([sys.executable, str(tool), str(notebook), "--figures", str(figures)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert (figures / "tiny-fig1.png").stat().st_size > 0


def test_host_comparison_reports_medians_ranges_and_ratios_to_the_first_tree():
    """bench_host --repos: per point, each tree's median (range) of its rounds and the ratio of
    its median to the first tree's; a point a tree did not measure is shown as missing."""
    own = {("EP 1 local", "old"): [0.20, 0.10, 0.30], ("EP 1 local", "new"): [0.05, 0.08, 0.04],
           ("EP 2 alltoall", "old"): [1.0, 2.0, 3.0]}
    lines = bench_host.comparison_lines(own, ["old", "new"], 3)
    assert "median (range) of 3 rounds; ratio to old" in lines[0]
    assert lines[1].startswith("EP 1 local") and "old: 0.200 (0.100-0.300) | new: 0.050 (0.040-0.080) 0.25x" in lines[1]
    assert "old: 2.000 (1.000-3.000) | new: -" in lines[2]


def test_host_layer_lists_a_forwards_operations_with_the_frames_that_queued_them():
    """tools/host_layer.py on the CPU (where its GPU figures are a smoke test): the host times,
    and every operation of one forward and backward with the flexdispatch frame that queued it;
    the permutation's and the restore's kernel calls are among them."""
    import subprocess

    tool = Path(__file__).resolve().parents[1] / "tools" / "host_layer.py"
    out = subprocess.run([sys.executable, str(tool), "--device", "cpu", "--tokens", "16", "--hidden", "8",
                          "--experts", "4", "--topk", "2", "--calls", "3", "--top", "3"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for label in ("forward", "forward + backward", "softmax and experts alone, forward", "launch floor"):
        assert f"host us per call, {label}" in text
    forward = text.split("device operations of one forward: ")[1].split("device operations of one backward")[0]
    assert int(forward.split()[0]) > 0
    assert "permute" in forward and "gather_rows" in forward  # (the ops' frames in _library.py)


def _host_rounds(tool: str, *args: str) -> dict:
    """``{(round, label): host us}`` that ``tools/<tool>`` prints on the CPU (20 calls a row, two
    rounds; timing.print_host_rounds' lines); fails unless the tool exits 0 and every line after
    its title is a row."""
    import re
    import subprocess

    path = Path(__file__).resolve().parents[1] / "tools" / tool
    out = subprocess.run([sys.executable, str(path), "--device", "cpu", "--calls", "20", "--rounds", "2", *args],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    times = {}
    for line in out.stdout.splitlines()[1:]:
        m = re.match(r"round (\d)  (.*?)\s+([\d.]+)$", line)
        assert m, line
        times[(int(m.group(1)), m.group(2))] = float(m.group(3))
    return times


def test_host_stack_times_the_same_kernels_at_every_layer():
    """tools/host_stack.py on the CPU (a smoke test of its GPU figures): every row in every round,
    each a positive host time; the three kernels through the dispatcher cost at least what they
    cost called raw (the same kernels plus the layers above them)."""
    times = _host_rounds("host_stack.py", "--tokens", "16", "--hidden", "8", "--experts", "8", "--topk", "2")
    labels = {label for _, label in times}
    assert len(times) == 2 * len(labels) == 22 and all(t > 0 for t in times.values())
    assert all(times[(r, "three kernels: dispatcher")] > times[(r, "three kernels: raw")] for r in (1, 2))


def test_bench_binding_times_the_same_gather_through_every_binding():
    """tools/bench_binding.py on the CPU: its stand-in kernel's four bindings give the same rows
    and gradient (the tool checks before it times, and exits non-zero when they differ), and every
    row of every round is a positive host time."""
    times = _host_rounds("bench_binding.py", "--rows", "16", "--hidden", "8")
    labels = {label for _, label in times}
    assert {"raw, no grad", "python function, grad", "C++ op, grad", "C++ autograd, grad"} <= labels
    assert len(times) == 2 * len(labels) == 20 and all(t > 0 for t in times.values())


def test_bench_fused_node_checks_its_ways_against_the_registered_ops_and_times_each():
    """tools/bench_fused_node.py on the CPU: its four ways of running route_topk + permute give the
    registered ops' rows and permuted probs, and the three with gradients their gradients (checked
    before timing; a way whose gradient differs makes the check raise), and every row of every
    round is a positive host time."""
    import bench_fused_node

    times = _host_rounds("bench_fused_node.py", "--tokens", "16", "--hidden", "8", "--experts", "8", "--topk", "2")
    labels = {label for _, label in times}
    assert labels == {"registered ops", "two raw nodes", "one raw node", "raw, no gradient"}
    assert len(times) == 8 and all(t > 0 for t in times.values())

    from flexdispatch import _library, ops

    ops.load_kernels()
    g = torch.Generator().manual_seed(1)
    x, probs = torch.randn(16, 8, generator=g), torch.softmax(torch.randn(16, 8, generator=g), -1)
    ways = bench_fused_node.variants(_library.kernels(), 16, 8, 2)
    bench_fused_node.check(ways, x, probs)
    one_node = ways["one raw node"]

    class DoubledGradient(torch.autograd.Function):  # (the identity, its gradient doubled)
        forward = staticmethod(lambda ctx, t: t.clone())
        backward = staticmethod(lambda ctx, grad: 2 * grad)

    for wrong, what in ((lambda xi, pi: one_node(xi * 2, pi), "rows"),
                        (lambda xi, pi: one_node(DoubledGradient.apply(xi), pi), "gradients")):
        ways["one raw node"] = wrong
        with pytest.raises(AssertionError, match=f"one raw node: {what}"):
            bench_fused_node.check(ways, x, probs)


@pytest.mark.parametrize("mode,route", [("sync-free", "dense"), ("default", "given")])
def test_bench_one_step_checks_both_paths_agree_and_times_each(mode, route):
    """tools/bench_one_step.py on the CPU: the dispatcher whose manager's steps are replaced by
    themselves runs them one by one (the one-call path never runs there) and gives the one-step
    dispatcher's results and gradients, which the tool checks before timing (a dispatcher that
    differs makes the check raise); every row of every round is a positive host time."""
    import argparse

    import bench_compile
    import bench_one_step

    times = _host_rounds("bench_one_step.py", "--tokens", "16", "--hidden", "8", "--experts", "8", "--topk", "2",
                         "--mode", mode, "--route", route)
    assert {label for _, label in times} == {"one step, forward", "steps, forward", "one step, fwd+bwd",
                                             "steps, fwd+bwd"}
    assert len(times) == 8 and all(t > 0 for t in times.values())

    args = argparse.Namespace(tokens=16, hidden=8, experts=8, topk=2, device="cpu")
    (x, logits, _), _ = bench_compile.layer_inputs(args, torch.float32)
    one_step = bench_compile.dispatcher(args, mode == "sync-free")
    steps = bench_one_step.step_by_step(bench_compile.dispatcher(args, mode == "sync-free"))
    routed = []
    for one_call in ("route_and_permute", "dispatch_and_permute", "restore_and_combine"):  # (never on that path)
        setattr(steps._comm_manager, one_call, lambda *a, _name=one_call, **k: routed.append(_name))
    bench_one_step.check(one_step, steps, x, logits, route == "given")
    assert not routed
    args.topk = 3  # (another layer: its results differ)
    with pytest.raises(AssertionError, match="one step and steps differ"):
        bench_one_step.check(one_step, bench_one_step.step_by_step(bench_compile.dispatcher(args, False)), x, logits,
                             route == "given")


def test_bench_sizing_times_four_variants_of_the_same_layer():
    """tools/bench_sizing.py on the CPU (a smoke test of its GPU figures): it checks that the
    route-sized and sync-sized layers move the same rows before timing (exiting 1 otherwise),
    and prints a positive median for each of the four variants in both phases."""
    import re
    import subprocess

    tool = Path(__file__).resolve().parents[1] / "tools" / "bench_sizing.py"
    out = subprocess.run([sys.executable, str(tool), "--device", "cpu", "--dtype", "float32", "--calls", "3",
                          "--shapes", "16,8,4,2", "--kernels", "3"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    for phase in ("forward", "fwd+bwd"):
        line = next(x for x in out.stdout.splitlines() if x.strip().startswith(f"{phase}: route eager"))
        medians = re.findall(r"(route|sync) (eager|compiled) ([\d.]+) \(", line)
        assert len(medians) == 4 and all(float(m[2]) > 0 for m in medians), line


def test_host_compiled_splits_a_compiled_layers_host_time_between_flexdispatch_and_torch():
    """tools/host_compiled.py on the CPU (a smoke test; reduce-overhead needs CUDA): the wall
    and host times are positive, and flexdispatch's frames hold a share of the profiled own time
    between 0 and all of it (its ops run inside the compiled graph)."""
    import re
    import subprocess

    tool = Path(__file__).resolve().parents[1] / "tools" / "host_compiled.py"
    out = subprocess.run([sys.executable, str(tool), "--device", "cpu", "--mode", "default", "--backend", "aot_eager",
                          "--tokens", "16", "--hidden", "8", "--experts", "4", "--topk", "2", "--calls", "3",
                          "--top", "3"], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    wall = re.search(r"forward ([\d.]+), forward \+ backward ([\d.]+)", out.stdout)
    assert wall and float(wall.group(1)) > 0 and float(wall.group(2)) > 0, out.stdout
    share = re.search(r"own time ([\d.]+) us a call, of which flexdispatch's frames ([\d.]+) us", out.stdout)
    assert share and 0 < float(share.group(2)) < float(share.group(1)), out.stdout
    rejected = subprocess.run([sys.executable, str(tool), "--device", "cpu"], capture_output=True, text=True,
                              timeout=300)
    assert rejected.returncode == 2 and "--mode reduce-overhead needs --device cuda" in rejected.stderr
