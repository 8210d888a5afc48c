"""The compile-on-first-import loader: keys, one build across processes, corrupt caches,
FLEXDISPATCH_JIT=0, and no CUDA context at import."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from flexdispatch import _jit

REPO = Path(__file__).resolve().parents[1]


def run_python(code: str, env_extra: dict, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), **env_extra)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_parse_arch():
    assert _jit.parse_arch("9.0") == _jit.parse_arch("90") == _jit.parse_arch("sm_90") == "sm_90"
    assert _jit.parse_arch("10.0") == "sm_100"
    with pytest.raises(ValueError, match="arch"):
        _jit.parse_arch("hopper")


def test_key_follows_sources_and_arch(tmp_path):
    src = tmp_path / "cuda_src"
    shutil.copytree(_jit.sources_dir(), src)
    base = _jit.kernel_spec([], src=src).key()
    assert base == _jit.kernel_spec([]).key()  # content, not location
    assert _jit.kernel_spec(["sm_90"], src=src).key() not in (base, _jit.kernel_spec(["sm_80"], src=src).key())
    header = src / "cpu" / "half.h"
    header.write_text(header.read_text() + "\n// edited\n")
    assert _jit.kernel_spec([], src=src).key() != base
    kernel = src / "rows.cu"
    before = _jit.kernel_spec(["sm_90"], src=src).key()
    kernel.write_text(kernel.read_text() + "\n")
    assert _jit.kernel_spec(["sm_90"], src=src).key() != before


def test_gpu_archs_come_from_nvml_and_visible_devices(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(_jit, "_nvml_capabilities", lambda: [(9, 0), (8, 0), (9, 0)])
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert _jit.gpu_archs() == ["sm_80", "sm_90"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "1")
    assert _jit.gpu_archs() == ["sm_80"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert _jit.gpu_archs() == []
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert _jit.gpu_archs() == []


CHECK_KERNELS = """
    import json, torch, flexdispatch
    from flexdispatch import _jit, ops, reference
    g = torch.Generator().manual_seed(0)
    idx = torch.rand(500, 9, generator=g).argsort(1)[:, :3]
    x = torch.randn(500, 40, generator=g)
    a = ops.permute_by_indices(x, idx, num_experts=9, pad_multiple=4)
    b = reference.permute_by_indices(x, idx, num_experts=9, pad_multiple=4)
    ok = torch.equal(a[0], b[0]) and torch.equal(ops.unpermute(a[0], a[2]), reference.unpermute(b[0], b[2]))
    print(json.dumps({"kernels": ops.kernels_loaded(), "built": _jit.last_load.built,
                      "waited": _jit.last_load.waited, "rebuilt": _jit.last_load.rebuilt_corrupt, "ok": ok,
                      "cuda_initialized": torch.cuda.is_initialized()}))
"""


@pytest.mark.slow
def test_four_processes_on_a_cold_cache_build_once(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), FLEXDISPATCH_CACHE_DIR=str(tmp_path), FLEXDISPATCH_JIT="1")
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(CHECK_KERNELS)], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(4)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=900)
        assert p.returncode == 0, err
        results.append((json.loads(out.strip().splitlines()[-1]), err))
    assert sum(r["built"] for r, _ in results) == 1
    assert all(r["ok"] and r["kernels"] for r, _ in results)
    assert sum("] building " in err for _, err in results) == 1  # one log line says a build starts...
    assert sum("] built " in err for _, err in results) == 1  # ...and one its elapsed time
    for r, err in results:
        if r["waited"]:
            assert "waiting for another process" in err
    folders = [p for p in tmp_path.iterdir() if p.is_dir() and p.name != _jit.LOCKS]
    assert len(folders) == 1 and not any(p.name.startswith(".tmp") for p in tmp_path.iterdir())


@pytest.mark.slow
def test_corrupt_cached_library_is_rebuilt(tmp_path):
    env = {"FLEXDISPATCH_CACHE_DIR": str(tmp_path), "FLEXDISPATCH_JIT": "1"}
    first = run_python(CHECK_KERNELS, env)
    assert first.returncode == 0, first.stderr
    (library,) = tmp_path.glob("*/flexdispatch_C.so")
    library.write_bytes(b"\x7fELF not really a library")
    second = run_python(CHECK_KERNELS, env)
    assert second.returncode == 0, second.stderr
    result = json.loads(second.stdout.strip().splitlines()[-1])
    assert result["rebuilt"] and result["built"] and result["ok"]
    assert "unusable" in second.stderr
    third = json.loads(run_python(CHECK_KERNELS, env).stdout.strip().splitlines()[-1])
    assert not third["built"] and third["ok"]  # the rebuilt library is trusted again


def test_jit_disabled_uses_reference_ops_with_one_warning(tmp_path):
    result = run_python(CHECK_KERNELS, {"FLEXDISPATCH_JIT": "0", "FLEXDISPATCH_CACHE_DIR": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout.strip().splitlines()[-1])
    assert data["ok"] and not data["kernels"] and not data["built"]
    assert result.stderr.count("FLEXDISPATCH_JIT=0") == 1
    assert not any(tmp_path.iterdir())


def test_import_creates_no_cuda_context():
    result = run_python(CHECK_KERNELS, {})
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1])["cuda_initialized"] is False


def _fake_compiler(folder: Path, name: str, libstdcxx: str) -> Path:
    path = folder / name
    path.write_text(f"#!/bin/sh\necho '{libstdcxx}'\n")
    path.chmod(0o755)
    return path


def test_a_compiler_with_only_a_static_libstdcxx_is_replaced(tmp_path, monkeypatch):
    """CXX that links only libstdc++.a (it names no libstdc++.so) gets the PATH's c++ instead:
    a second, private C++ runtime in the extension crashed when an error message formatted a
    number (seen on a lent GPU machine). Kept when CXX finds a shared one, when asked, and
    when no other compiler is there."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    static = _fake_compiler(tmp_path, "static-g++", "libstdc++.so")
    shared = _fake_compiler(tmp_path, "shared-g++", "/usr/lib/gcc/x86_64-linux-gnu/13/libstdc++.so")
    system = _fake_compiler(bin_dir, "c++", "/usr/lib/gcc/x86_64-linux-gnu/13/libstdc++.so")
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.delenv("FLEXDISPATCH_KEEP_CXX", raising=False)
    monkeypatch.setenv("CXX", str(static))
    assert _jit.shared_runtime_compiler() == str(system)
    monkeypatch.setenv("FLEXDISPATCH_KEEP_CXX", "1")
    assert _jit.shared_runtime_compiler() is None
    monkeypatch.delenv("FLEXDISPATCH_KEEP_CXX")
    monkeypatch.setenv("CXX", str(shared))
    assert _jit.shared_runtime_compiler() is None
    monkeypatch.delenv("CXX")
    assert _jit.shared_runtime_compiler() is None
    system.unlink()
    monkeypatch.setenv("CXX", str(static))
    assert _jit.shared_runtime_compiler() is None  # (warns: nothing better on PATH)
