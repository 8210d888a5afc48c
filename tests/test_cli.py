"""The command line and the demo (the README's main job)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from flexdispatch.demo import DemoArgs, format_report, run_demo, tolerance

REPO = Path(__file__).resolve().parents[1]


def cli(*args, env=None, timeout=600):
    full = dict(os.environ, PYTHONPATH=str(REPO), **(env or {}))
    return subprocess.run([sys.executable, "-m", "flexdispatch", *args], capture_output=True, text=True,
                          env=full, timeout=timeout)


def test_info_and_build_use_the_cache():
    built = cli("build")
    assert built.returncode == 0, built.stderr
    assert "cpu: " in built.stdout
    info = cli("info")
    assert info.returncode == 0, info.stderr
    for line in ("torch", "arch key     cpu", "cache", "built        cpu", "deep_ep"):
        assert line in info.stdout


def test_clear_cache(tmp_path):
    (tmp_path / "flexdispatch_C-cpu-0123").mkdir()
    (tmp_path / "x.lock").write_text("")
    out = cli("clear-cache", env={"FLEXDISPATCH_CACHE_DIR": str(tmp_path), "FLEXDISPATCH_JIT": "0"})
    assert out.returncode == 0 and "removed 1" in out.stdout
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]
    assert "x.lock" in [p.name for p in tmp_path.iterdir()]  # locks are never deleted
    info = cli("info", env={"FLEXDISPATCH_CACHE_DIR": str(tmp_path)})
    built = [line for line in info.stdout.splitlines() if line.startswith("built")]
    # Importing builds nothing: the line must not send the reader to an import.
    assert built == [line for line in built if "nothing yet" in line and "import" not in line] != []
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]  # and info built nothing


def test_kernels_loaded_is_a_query(monkeypatch):
    """ops.kernels_loaded() answers without loading or building; ops.load_kernels() loads."""
    from flexdispatch import ops

    def no_load():
        raise AssertionError("kernels_loaded() loaded (or built) the kernels")

    monkeypatch.setattr(ops, "_loaded", False)
    monkeypatch.setattr(ops, "_C", None)
    monkeypatch.setattr(ops._jit, "load_kernels", no_load)
    assert ops.kernels_loaded() is False
    monkeypatch.undo()
    assert ops.load_kernels() is True and ops.kernels_loaded() is True


@pytest.mark.timeout(600)
def test_demo_two_ranks():
    args = DemoArgs(world_size=2, steps=2, tokens=64, hidden=32, ffn=48, experts=6, topk=2, device="cpu")
    result = run_demo(args)
    assert result["backend"] == "alltoall" and result["device"] == "cpu"
    assert max(result["errors"].values()) < tolerance(result)
    assert "alltoall manager" in format_report(args, result)


@pytest.mark.timeout(600)
def test_demo_one_rank():
    """The notebook and laptop path: one rank, several steps of one dispatcher (it failed its
    own check from the second step on when tokens_per_expert leaked between calls)."""
    args = DemoArgs(world_size=1, steps=3, tokens=64, hidden=32, ffn=48, experts=6, topk=2, device="cpu")
    result = run_demo(args)
    assert result["backend"] == "local"
    assert max(result["errors"].values()) < tolerance(result)


def test_demo_command_line_rejects_bad_sizes():
    out = cli("demo", "--experts", "5", "--world-size", "2")
    assert out.returncode != 0 and "divisible" in out.stderr
