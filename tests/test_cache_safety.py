"""The kernel cache on shared machines: private folders, foreign or writable files refused,
bounded lock waits that name the holder, no deletion of a build in progress, no retry storm
after a failed build, and commands that need no kernels build none."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flexdispatch import _jit

REPO = Path(__file__).resolve().parents[1]
needs_root = pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0,
                                reason="chown to another user needs root")


def test_cache_folder_is_created_private(tmp_path):
    root = _jit.prepare_root(tmp_path / "a" / "cache")
    assert root.stat().st_mode & 0o777 == 0o700


def test_writable_by_others_is_refused(tmp_path):
    root = tmp_path / "cache"
    root.mkdir(mode=0o700)
    (root / "lib.so").write_bytes(b"x")
    os.chmod(root / "lib.so", 0o666)
    with pytest.raises(_jit.UnsafeCacheError, match="writable by others"):
        _jit.check_private(root / "lib.so", "cached library")
    os.chmod(root, 0o777)
    with pytest.raises(_jit.UnsafeCacheError, match="kernel cache folder .* writable by others"):
        _jit.prepare_root(root)


@needs_root
def test_foreign_owner_and_symlink_to_foreign_file_are_refused(tmp_path):
    foreign = tmp_path / "planted.so"
    foreign.write_bytes(b"x")
    os.chown(foreign, 4321, 4321)
    with pytest.raises(_jit.UnsafeCacheError, match="owned by uid 4321"):
        _jit.check_private(foreign, "cached library")
    link = tmp_path / "link.so"
    link.symlink_to(foreign)
    with pytest.raises(_jit.UnsafeCacheError, match="points to a file that is owned by uid 4321"):
        _jit.check_private(link, "cached library")
    planted_root = tmp_path / "shared-tmp-cache"
    planted_root.mkdir()
    os.chown(planted_root, 4321, 4321)
    with pytest.raises(_jit.UnsafeCacheError, match="kernel cache folder"):
        _jit.prepare_root(planted_root)


@needs_root
def test_planted_build_is_never_loaded(tmp_path):
    spec = _jit.kernel_spec([])
    folder = tmp_path / spec.folder_name()
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"key": spec.key(), "sha256": "0"}))
    os.chown(folder / "manifest.json", 4321, 4321)
    with pytest.raises(_jit.UnsafeCacheError, match="cached manifest"):
        _jit._try_cached(folder, spec, warn=False)


def test_lock_wait_is_bounded_and_names_the_holder(tmp_path):
    holder = _jit._BuildLock(tmp_path, "key")
    assert holder.try_acquire()
    try:
        waiter = _jit._BuildLock(tmp_path, "key")
        with pytest.raises(_jit.LockTimeoutError, match=rf"pid {os.getpid()} on host"):
            waiter.acquire(0.2)
    finally:
        holder.release()


def test_clear_cache_keeps_a_build_in_progress_and_killed_tmp_folders_go(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEXDISPATCH_CACHE_DIR", str(tmp_path))
    (tmp_path / "flexdispatch_C-cpu-aaaa").mkdir()
    (tmp_path / "flexdispatch_C-cpu-bbbb").mkdir()
    (tmp_path / ".tmp-flexdispatch_C-cpu-bbbb-123-abcdef12").mkdir()
    busy = _jit._BuildLock(tmp_path, "flexdispatch_C-cpu-bbbb")
    assert busy.try_acquire()
    try:
        removed, kept = _jit.clear_cache()
    finally:
        busy.release()
    assert removed == 1
    assert sorted(p.name for p, _ in kept) == [".tmp-flexdispatch_C-cpu-bbbb-123-abcdef12", "flexdispatch_C-cpu-bbbb"]
    assert all("build is in progress" in why for _, why in kept)
    _jit._remove_killed_builds(tmp_path, "flexdispatch_C-cpu-bbbb")
    assert not (tmp_path / ".tmp-flexdispatch_C-cpu-bbbb-123-abcdef12").exists()


def test_recent_failure_is_not_retried(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEXDISPATCH_CACHE_DIR", str(tmp_path))
    spec = _jit.kernel_spec([])
    _jit.prepare_root(tmp_path)
    import time
    (tmp_path / f"{spec.folder_name()}.failed").write_text(json.dumps(
        {"at": time.time(), "pid": 99, "error": "No space left on device"}))
    with pytest.raises(_jit.BuildFailedRecentlyError, match="No space left on device"):
        _jit.load(spec)
    assert not (tmp_path / spec.folder_name()).exists()


def cli(*args, cache):
    env = dict(os.environ, PYTHONPATH=str(REPO), FLEXDISPATCH_CACHE_DIR=str(cache), FLEXDISPATCH_JIT="1")
    return subprocess.run([sys.executable, "-m", "flexdispatch", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_commands_that_need_no_kernels_build_none(tmp_path):
    info = cli("info", cache=tmp_path)
    assert info.returncode == 0 and "built        nothing yet" in info.stdout, info.stderr
    cleared = cli("clear-cache", cache=tmp_path)
    assert cleared.returncode == 0 and "removed 0" in cleared.stdout, cleared.stderr
    helped = cli("demo", "--help", cache=tmp_path)
    assert helped.returncode == 0 and "--world-size" in helped.stdout
    for out in (info, cleared, helped):
        assert "building" not in out.stderr
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]


def test_clear_sentences_instead_of_tracebacks(tmp_path):
    import torch

    if torch.version.cuda is None:
        built = cli("build", "--arch", "9.0", cache=tmp_path)
        assert built.returncode == 2 and "CPU build" in built.stderr and "Traceback" not in built.stderr
    if not torch.cuda.is_available():
        demo = cli("demo", "--device", "cuda", "--world-size", "2", cache=tmp_path)
        why = "CPU-only build" if torch.version.cuda is None else "GPU"
        assert demo.returncode != 0 and "--device cuda" in demo.stderr and why in demo.stderr, demo.stderr
        assert "Traceback" not in demo.stderr
    import flexdispatch as fd

    with pytest.raises(ValueError, match="moe_flex_backend='alltoall': needs an expert-parallel process group"):
        fd.MoEFlexTokenDispatcher(4, [0, 1, 2, 3], fd.MoEConfig(num_moe_experts=4, moe_flex_backend="alltoall"), None)


def test_logging_is_the_applications():
    """No handler of flexdispatch's own; build progress reaches stderr only while logging is
    unconfigured, and a configured application gets it as an INFO record instead."""
    code = """
        import logging, sys
        from flexdispatch import _log
        assert _log.logger.handlers == [] and _log.logger.propagate
        _log.progress("building %s", "x")
        logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="record %(name)s %(message)s")
        _log.progress("building %s", "y")
    """
    import textwrap

    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("FLEXDISPATCH_LOG_LEVEL", None)
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert "[flexdispatch] building x" in out.stderr and "building y" not in out.stderr
    assert "record flexdispatch building y" in out.stdout
