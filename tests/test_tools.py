"""The benchmark tools' own arithmetic, on the CPU (the tools themselves need GPUs)."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import bench_dispatch  # noqa: E402


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
