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


def _others_may_read_cache():
    """A cache folder others may read and traverse (0755, accepted), under /tmp (sticky)."""
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="fd-cache-0755-", dir="/tmp"))
    os.chmod(root, 0o755)
    return root


def test_lock_files_are_private(tmp_path):
    """Lock files are 0600 in a 0700 subfolder, also in a cache folder others may read."""
    root = tmp_path / "cache"
    root.mkdir(mode=0o755)
    lock = _jit._BuildLock(root, "key")
    assert lock.try_acquire()
    try:
        assert lock.path.parent.stat().st_mode & 0o777 == 0o700
        assert lock.path.stat().st_mode & 0o777 == 0o600
        assert lock.owner.parent == lock.path.parent
    finally:
        lock.release()


@needs_root
def test_another_user_cannot_hold_a_build_lock():
    """The stall this prevents: another user opens a 0644 lock file in an accepted 0755 cache
    folder and flock()s it; every cold build would then wait for the lock timeout."""
    import shutil
    import time

    root = _others_may_read_cache()
    try:
        lock = _jit._BuildLock(root, "key")
        assert lock.try_acquire()  # (creates the lock file)
        lock.release()
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # another user (a plain fork: no interpreter of theirs needs to start)
            try:
                import fcntl

                os.setgid(4321)
                os.setuid(4321)
                fd = os.open(str(lock.path), os.O_RDONLY)
                fcntl.flock(fd, fcntl.LOCK_EX)
                os.write(write, b"held")
                time.sleep(30)
            except OSError as exc:
                os.write(write, f"refused: {exc}".encode())
            finally:
                os._exit(0)
        os.close(write)
        try:
            said = os.read(read, 200).decode()
            assert said.startswith("refused"), f"another user could hold the lock: {said}"
            assert lock.try_acquire()
            lock.release()
        finally:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            os.close(read)
    finally:
        shutil.rmtree(root)


def test_clear_cache_leaves_the_lock_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("FLEXDISPATCH_CACHE_DIR", str(tmp_path))
    (tmp_path / "flexdispatch_C-cpu-aaaa").mkdir()
    held = _jit._BuildLock(tmp_path, "flexdispatch_C-cpu-cccc")
    assert held.try_acquire()
    try:
        removed, kept = _jit.clear_cache()
        assert removed == 1 and kept == [] and held.path.exists()
    finally:
        held.release()


def _refuse_writes_under(root: Path, monkeypatch):
    """A read-only file system under ``root`` (root may create files anywhere: simulated)."""
    import errno

    def refused(path, write):
        if write and str(os.fspath(path)).startswith(str(root)):
            raise OSError(errno.EROFS, "Read-only file system", str(path))

    real_mkdir, real_open = os.mkdir, os.open

    def mkdir(path, *args, **kwargs):
        refused(path, True)
        return real_mkdir(path, *args, **kwargs)

    def open_(path, flags, *args, **kwargs):
        refused(path, flags & (os.O_CREAT | os.O_WRONLY | os.O_RDWR))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(os, "open", open_)


@pytest.mark.parametrize("how", ["read-only file system", pytest.param("no write permission", marks=pytest.mark.skipif(
    not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root may write any folder"))])
def test_a_cache_that_cannot_be_written_is_said_as_such(tmp_path, monkeypatch, how):
    """A cold cache in a folder that cannot be written: reported as not writable (naming the
    folder and FLEXDISPATCH_CACHE_DIR), not as a failed build, and the kernels are built
    privately for the process."""
    root = tmp_path / "cache"
    root.mkdir(mode=0o700)
    monkeypatch.setenv("FLEXDISPATCH_CACHE_DIR", str(root))
    if how == "read-only file system":
        _refuse_writes_under(root, monkeypatch)
    else:
        os.chmod(root, 0o500)
    try:
        with pytest.raises(_jit.CacheNotWritableError, match=rf"kernel cache folder {root} is not writable .*"
                                                              rf"FLEXDISPATCH_CACHE_DIR"):
            _jit.load(_jit.kernel_spec([]))
        warnings = []
        monkeypatch.setattr(_jit, "load_private", lambda spec=None: "built privately")
        monkeypatch.setattr(_jit.logger, "warning", lambda msg, *args: warnings.append(msg % args))
        for mode in ("auto", "1"):
            monkeypatch.setenv("FLEXDISPATCH_JIT", mode)
            assert _jit.load_kernels() == "built privately"
        assert len(warnings) == 2 and all("is not writable" in w and "build failed" not in w for w in warnings)
    finally:
        os.chmod(root, 0o700)


def test_parents_that_others_may_write_are_refused(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)  # anyone may rename the cache folder away and put another in its place
    with pytest.raises(_jit.UnsafeCacheError, match=rf"the folder {shared} on its path is writable by others and "
                                                    rf"not sticky"):
        _jit.prepare_root(shared / "cache")
    assert not (shared / "cache").exists()  # refused before anything was made
    os.chmod(shared, 0o1777)  # sticky (as /tmp): only the owner may rename its entries
    assert _jit.prepare_root(shared / "cache").is_dir()
    deeper = tmp_path / "open" / "a" / "b"
    deeper.mkdir(parents=True)
    os.chmod(tmp_path / "open", 0o777)
    with pytest.raises(_jit.UnsafeCacheError, match="open on its path is writable by others"):
        _jit.prepare_root(deeper / "cache")


def test_symlinks_on_the_path_are_followed_and_checked(tmp_path):
    good = tmp_path / "good"
    good.mkdir()
    (tmp_path / "link").symlink_to(good)
    assert _jit.prepare_root(tmp_path / "link" / "cache").resolve() == (good / "cache").resolve()
    bad = tmp_path / "bad"
    bad.mkdir()
    os.chmod(bad, 0o777)
    (tmp_path / "relative").symlink_to("bad")
    with pytest.raises(_jit.UnsafeCacheError, match=rf"the folder {bad} on its path is writable by others"):
        _jit.prepare_root(tmp_path / "relative" / "cache")


def test_a_folder_swapped_during_the_check_is_refused(tmp_path, monkeypatch):
    """The walk compares the folder it opened with the one it checked: a swap in between (an
    attacker renaming folders in a loop) raises instead of being followed."""
    (tmp_path / "a").mkdir()
    (tmp_path / "decoy").mkdir()
    real_stat = os.stat

    def stat(path, *args, **kwargs):  # what a swap right after the check looks like to the walk
        return real_stat(tmp_path / "decoy") if path == "a" and kwargs.get("dir_fd") is not None else \
            real_stat(path, *args, **kwargs)

    monkeypatch.setattr(os, "stat", stat)
    with pytest.raises(_jit.UnsafeCacheError, match="changed while it was checked"):
        _jit.check_parents(tmp_path / "a" / "cache")


@needs_root
def test_a_parent_owned_by_another_user_is_refused(tmp_path):
    parent = tmp_path / "theirs"
    parent.mkdir()
    os.chown(parent, 4321, 4321)
    with pytest.raises(_jit.UnsafeCacheError, match=rf"{parent} on its path is owned by uid 4321"):
        _jit.prepare_root(parent / "cache")


def test_the_default_cache_path_is_accepted():
    _jit.check_parents(Path.home() / ".cache" / "flexdispatch")
