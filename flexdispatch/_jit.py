"""Compile the kernels on first import and cache them per machine.

Three small parts, as in FlashInfer's jit package:

* where files go: :func:`cache_root` (``$FLEXDISPATCH_CACHE_DIR``, default
  ``~/.cache/flexdispatch``) and :func:`sources_dir` (``cuda_src/`` of a checkout or of the
  installed package);
* what to build: :class:`BuildSpec` (sources, flags, target architectures) and its
  :meth:`BuildSpec.key`, a hash of everything the binary depends on;
* how to build: :func:`load`, one build per key across processes (a ``filelock`` per key,
  re-checked once held), in a private temporary folder published by an atomic rename. A
  cached library whose checksum or import fails is rebuilt.

Finding the GPU architecture uses NVML (or ``nvidia-smi``), never the CUDA runtime, so
``import flexdispatch`` creates no CUDA context and stays safe before ``fork``.

``FLEXDISPATCH_JIT``: ``auto`` (default; a failed build warns and falls back to the plain
PyTorch ops), ``1`` (a failed build raises), ``0`` (build nothing, use the PyTorch ops).

Shared machines: the cache folder is created private (0700); a folder, library or manifest
that another user owns, that others may write, or that is a symlink to another user's file is
never loaded (:class:`UnsafeCacheError`: the kernels are then built in a private temporary
folder for this process). Every folder above the cache folder must be owned by this user or
root and not writable by others (unless sticky, as /tmp), so that nobody else can rename,
replace or re-point a part of its path; they are checked through directory descriptors, one
component at a time (a swap during the check is seen, never followed). Build locks live in a
private subfolder (``.locks``, 0700; lock files 0600): another user cannot open one, so cannot
hold it. A cache folder that cannot be written (read-only file system, no permission) is said
as such (:class:`CacheNotWritableError`; the kernels are then built privately too), not as a
failed build. A build lock held by another process is waited for at most
``FLEXDISPATCH_LOCK_TIMEOUT`` seconds (default 900), then :class:`LockTimeoutError` names the
holder (pid, host). A failed build is not retried by the processes waiting behind it for
``FLEXDISPATCH_BUILD_RETRY_S`` seconds (default 600; a full disk would fail each of them again).
Folders of killed builds (``.tmp-*``) are removed by the next build of the same key.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import hashlib
import importlib.util
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import sysconfig
import tempfile
import time
import uuid
from pathlib import Path
from typing import Optional, Sequence

import torch

from . import envs
from ._log import logger, progress
from ._version import __version__

EXTENSION_NAME = "flexdispatch_C"


class UnsafeCacheError(RuntimeError):
    """A cached file or folder another user could have planted or changed: never loaded."""


class CacheNotWritableError(RuntimeError):
    """The cache folder cannot be written (read-only file system, no permission): reported as
    such, not as a failed build."""


class LockTimeoutError(RuntimeError):
    """Another process held a build lock for longer than ``FLEXDISPATCH_LOCK_TIMEOUT``."""


class BuildFailedRecentlyError(RuntimeError):
    """A build of the same key failed moments ago; not retried (see ``FLEXDISPATCH_BUILD_RETRY_S``)."""


def check_private(path: Path, what: str) -> None:
    """Raise UnsafeCacheError unless ``path`` (and, for a symlink, what it points to) is owned
    by this user and not writable by group or others."""
    if not hasattr(os, "getuid"):  # Windows: no POSIX owners to check
        return
    uid = os.getuid()
    for st, kind in ((os.lstat(path), "is"), (os.stat(path), "points to a file that is")):
        if st.st_uid != uid:
            raise UnsafeCacheError(f"{what} {path} {kind} owned by uid {st.st_uid}, not by this user (uid {uid})")
        if not stat.S_ISLNK(st.st_mode) and st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            raise UnsafeCacheError(f"{what} {path} {kind} writable by others (mode {oct(st.st_mode & 0o777)}); "
                                   f"run chmod go-w on it")


def _group_is_only_mine(gid: int) -> bool:
    """Whether group ``gid`` is this user's private group (named as the user, no other member
    listed): what a umask of 002 makes folders group-writable for on many Linux systems."""
    try:
        import grp
        import pwd

        me = pwd.getpwuid(os.getuid()).pw_name
        group = grp.getgrgid(gid)
    except (ImportError, KeyError):
        return False
    return group.gr_name == me and set(group.gr_mem) <= {me}


def _unsafe_ancestor(st: os.stat_result) -> Optional[str]:
    """Why a folder above the cache folder lets another user change the path (None: it does not)."""
    uid = os.getuid()
    if st.st_uid not in (uid, 0):
        return f"is owned by uid {st.st_uid}, neither this user (uid {uid}) nor root"
    if st.st_mode & stat.S_IWOTH or (st.st_mode & stat.S_IWGRP and not _group_is_only_mine(st.st_gid)):
        if not st.st_mode & stat.S_ISVTX:
            return f"is writable by others and not sticky (mode {oct(st.st_mode & 0o7777)})"
    return None


def check_parents(path: Path, what: str = "kernel cache folder") -> None:
    """Raise UnsafeCacheError unless every folder above ``path`` (symlinks on the way resolved
    one at a time) is owned by this user or root and not writable by others unless sticky, and
    every symlink on the way is this user's or root's: then no other user can rename, replace
    or re-point any part of the path. The walk opens each folder relative to the previous one
    (``O_NOFOLLOW``) and compares what it opened with what it checked (``fstat``): a folder
    swapped during the walk raises. Components that do not exist yet end the walk (this user
    creates them)."""
    if not hasattr(os, "getuid") or not hasattr(os, "O_NOFOLLOW"):  # Windows: no POSIX owners to check
        return
    pending = list(Path(os.path.abspath(path)).parts[1:])
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
    fd, here, links = os.open("/", os.O_RDONLY | os.O_DIRECTORY), Path("/"), 0
    try:
        reason = _unsafe_ancestor(os.fstat(fd)) if pending else None
        while reason is None and pending:
            name = pending.pop(0)
            try:
                st = os.stat(name, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                return
            if stat.S_ISLNK(st.st_mode):
                links += 1
                if links > 40:
                    raise UnsafeCacheError(f"{what} {path}: too many symlinks on its path")
                if st.st_uid not in (os.getuid(), 0):
                    reason, here = f"is a symlink owned by uid {st.st_uid}", here / name
                    break
                target = os.readlink(name, dir_fd=fd)
                pending[:0] = list(Path(target).parts[1:] if os.path.isabs(target) else Path(target).parts)
                if os.path.isabs(target):
                    os.close(fd)
                    fd, here = os.open("/", os.O_RDONLY | os.O_DIRECTORY), Path("/")
                continue
            if not pending:  # the folder itself: check_private's rules
                return
            try:
                sub = os.open(name, flags, dir_fd=fd)
            except OSError as exc:
                raise UnsafeCacheError(f"{what} {path}: {here / name} changed while it was checked ({exc})") from None
            os.close(fd)
            fd, here = sub, Path(os.path.normpath(here / name))
            opened = os.fstat(fd)
            if (opened.st_dev, opened.st_ino) != (st.st_dev, st.st_ino):
                raise UnsafeCacheError(f"{what} {path}: {here} changed while it was checked")
            reason = _unsafe_ancestor(opened)
    finally:
        os.close(fd)
    if reason is not None:
        raise UnsafeCacheError(f"{what} {path}: the folder {here} on its path {reason}, so another user could "
                               f"swap the cache; set FLEXDISPATCH_CACHE_DIR to a folder under your own")


@contextlib.contextmanager
def _writing(root: Path):
    """Say a write refused by the file system (read-only, no permission) as what it is."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise
        raise CacheNotWritableError(f"kernel cache folder {root} is not writable ({exc.strerror}: "
                                    f"{exc.filename or root}); set FLEXDISPATCH_CACHE_DIR to a writable folder of "
                                    f"yours") from None


# ---- where files go ------------------------------------------------------------------------


def cache_root() -> Path:
    """Folder of cached builds: ``$FLEXDISPATCH_CACHE_DIR`` or ``~/.cache/flexdispatch``."""
    env = envs.cache_dir()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "flexdispatch"


def sources_dir() -> Path:
    """``cuda_src/``: inside the installed package, or beside it in a source checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "cuda_src", here.parent / "cuda_src"):
        if (candidate / "bindings.cpp").is_file():
            return candidate
    raise FileNotFoundError(f"flexdispatch kernel sources (cuda_src/) not found near {here}")


# ---- what to build -------------------------------------------------------------------------


def _nvml_capabilities() -> Optional[list[tuple[int, int]]]:
    """Compute capabilities of all GPUs through NVML, or None when NVML is unavailable."""
    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
    except OSError:
        return None
    if nvml.nvmlInit_v2() != 0:
        return None
    try:
        count = ctypes.c_uint(0)
        if nvml.nvmlDeviceGetCount_v2(ctypes.byref(count)) != 0:
            return None
        caps = []
        for i in range(count.value):
            handle = ctypes.c_void_p()
            major, minor = ctypes.c_int(0), ctypes.c_int(0)
            if nvml.nvmlDeviceGetHandleByIndex_v2(i, ctypes.byref(handle)) != 0:
                return None
            if nvml.nvmlDeviceGetCudaComputeCapability(handle, ctypes.byref(major), ctypes.byref(minor)) != 0:
                return None
            caps.append((major.value, minor.value))
        return caps
    finally:
        nvml.nvmlShutdown()


def _smi_capabilities() -> Optional[list[tuple[int, int]]]:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=30, check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    caps = []
    for line in out.split():
        major, _, minor = line.strip().partition(".")
        if major.isdigit() and minor.isdigit():
            caps.append((int(major), int(minor)))
    return caps


def _visible(caps: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Keep the GPUs that CUDA_VISIBLE_DEVICES lets this process see (indices only; UUIDs keep all)."""
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is None:
        return caps
    items = [x.strip() for x in env.split(",") if x.strip()]
    if not items:
        return []
    if all(x.isdigit() for x in items):
        return [caps[int(x)] for x in items if int(x) < len(caps)]
    return caps


def gpu_archs() -> list[str]:
    """Architectures of the visible GPUs, e.g. ``["sm_90"]``; ``[]`` when kernels are CPU-only.

    CPU-only when torch has no CUDA, or no GPU is visible. Never creates a CUDA context.
    """
    if torch.version.cuda is None:
        return []
    caps = _nvml_capabilities()
    if caps is None:
        caps = _smi_capabilities() or []
    return sorted({f"sm_{major}{minor}" for major, minor in _visible(caps)})


def parse_arch(text: str) -> str:
    """``"9.0"``, ``"90"`` or ``"sm_90"`` -> ``"sm_90"``."""
    t = text.strip().lower().removeprefix("sm_").replace(".", "")
    if not t.isdigit() or len(t) < 2:
        raise ValueError(f"arch: expected a compute capability like 9.0 or sm_90, got {text!r}")
    return f"sm_{t}"


@dataclasses.dataclass(frozen=True)
class BuildSpec:
    """Everything a build depends on. ``archs == ()`` means the CPU-only build."""

    name: str
    sources: tuple[Path, ...]
    headers: tuple[Path, ...] = ()
    archs: tuple[str, ...] = ()
    cflags: tuple[str, ...] = ()
    cuda_cflags: tuple[str, ...] = ()
    ldflags: tuple[str, ...] = ()

    @property
    def with_cuda(self) -> bool:
        return bool(self.archs)

    @property
    def arch_tag(self) -> str:
        return "-".join(self.archs) if self.archs else "cpu"

    def key(self) -> str:
        """Hash of version, sources, flags, torch, CUDA, Python ABI and target architectures."""
        h = hashlib.sha256()
        parts = [
            self.name, __version__, torch.__version__, str(torch.version.cuda) if self.with_cuda else "cpu",
            sys.implementation.cache_tag, sysconfig.get_config_var("SOABI") or "", self.arch_tag,
            *self.cflags, "|", *self.cuda_cflags, "|", *self.ldflags,
        ]
        h.update("\0".join(parts).encode())
        for path in sorted(self.sources + self.headers):
            h.update(path.name.encode())
            h.update(path.read_bytes())
        return h.hexdigest()

    def folder_name(self) -> str:
        return f"{self.name}-{self.arch_tag}-{self.key()[:16]}"


def kernel_spec(archs: Optional[Sequence[str]] = None, src: Optional[Path] = None) -> BuildSpec:
    """The flexdispatch kernels for ``archs`` (default: the visible GPUs, or CPU-only), from
    ``src`` (default: :func:`sources_dir`)."""
    src = Path(src) if src is not None else sources_dir()
    archs = tuple(sorted(parse_arch(a) for a in (gpu_archs() if archs is None else archs)))
    cpu_sources = sorted((src / "cpu").glob("*.cpp"))
    sources = [src / "bindings.cpp", *cpu_sources]
    cflags = ["-O3", "-fopenmp"]  # torch picks the C++ standard its headers need
    cuda_cflags: list[str] = []
    if archs:
        sources += sorted(src.glob("*.cu"))
        cflags.append("-DFLEXDISPATCH_WITH_CUDA")
        cuda_cflags = ["-O3", "-lineinfo"]
    headers = sorted([*src.glob("*.h"), *src.glob("*.cuh"), *(src / "cpu").glob("*.h")])
    return BuildSpec(
        name=EXTENSION_NAME, sources=tuple(sources), headers=tuple(headers), archs=archs,
        cflags=tuple(cflags), cuda_cflags=tuple(cuda_cflags), ldflags=("-fopenmp",),
    )


# ---- how to build --------------------------------------------------------------------------


@dataclasses.dataclass
class LoadInfo:
    """What the last :func:`load` did: ``built`` (compiled here), ``waited`` (for another
    process's lock), ``path`` (the library), ``seconds`` (build time, when built)."""

    built: bool = False
    waited: bool = False
    rebuilt_corrupt: bool = False
    path: Optional[Path] = None
    seconds: float = 0.0


last_load = LoadInfo()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _library_file(folder: Path, name: str) -> Path:
    return folder / f"{name}.so"


def _import_library(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _try_cached(folder: Path, spec: BuildSpec, *, warn: bool):
    """The cached module, or None when absent, incomplete, corrupt or not importable. Raises
    UnsafeCacheError for files another user could have planted."""
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        return None
    library = _library_file(folder, spec.name)
    for path, what in ((folder, "cached build folder"), (manifest_path, "cached manifest"), (library, "cached library")):
        if path.exists() or path.is_symlink():
            check_private(path, what)
    try:
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("key") != spec.key() or manifest.get("sha256") != _sha256(library):
            raise ImportError("checksum or key mismatch")
        return _import_library(library, spec.name)
    except (OSError, ImportError, ValueError) as exc:
        if warn:
            logger.warning("cached kernels at %s are unusable (%s); rebuilding", folder, exc)
            last_load.rebuilt_corrupt = True
        return None


def _finds_shared_libstdcxx(compiler: str) -> bool:
    """Whether ``compiler`` links a shared libstdc++ (it names one by an absolute path); True
    when it cannot be asked (then it is left alone)."""
    try:
        out = subprocess.run([compiler, "-print-file-name=libstdc++.so"], capture_output=True, text=True,
                             timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return True
    return os.path.isabs(out)


def shared_runtime_compiler() -> Optional[str]:
    """The C++ compiler to build with instead of ``$CXX`` when ``$CXX`` can only link a static
    libstdc++ (its own library folder has ``libstdc++.a`` and no ``libstdc++.so``): the
    extension would then carry a private copy of the C++ runtime beside the one torch loaded,
    and formatting a number into an error message (every TORCH_CHECK) crashed in it. Seen on
    a lent GPU machine whose ``CXX`` was such a wrapper; the system's ``c++`` is used there
    instead. None: keep ``$CXX`` (also with ``FLEXDISPATCH_KEEP_CXX=1``)."""
    cxx = os.environ.get("CXX")
    if not cxx or envs.keep_cxx() or _finds_shared_libstdcxx(cxx):
        return None
    current = os.path.realpath(shutil.which(cxx) or cxx)
    for name in ("c++", "g++"):
        path = shutil.which(name)
        if path and os.path.realpath(path) != current and _finds_shared_libstdcxx(path):
            return path
    logger.warning("CXX=%s links only a static libstdc++ and no other compiler was found: C++ error messages "
                   "of the kernels may crash the process (set CXX to a compiler with a shared libstdc++)", cxx)
    return None


def _build(spec: BuildSpec, folder: Path):
    """Build into a private temporary folder, then publish it as ``folder`` by rename."""
    from torch.utils import cpp_extension

    tmp = folder.parent / f".tmp-{folder.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    with _writing(folder.parent):
        tmp.mkdir(parents=True)
    what = f"CUDA kernels for {', '.join(spec.archs)}" if spec.with_cuda else "CPU kernels"
    progress("building %s (first use on this machine) in %s ...", what, folder)
    start = time.perf_counter()
    saved_arch_env, saved_cxx = os.environ.get("TORCH_CUDA_ARCH_LIST"), os.environ.get("CXX")
    compiler = shared_runtime_compiler()
    if compiler is not None:
        logger.warning("building with %s instead of CXX=%s, which links only a static libstdc++ (a second C++ "
                       "runtime in the process; FLEXDISPATCH_KEEP_CXX=1 keeps CXX)", compiler, saved_cxx)
        os.environ["CXX"] = compiler
    try:
        if spec.with_cuda:
            # torch reads the target list from here; without it, it would ask the CUDA runtime
            # (and create a context).
            os.environ["TORCH_CUDA_ARCH_LIST"] = ";".join(f"{a[3:-1]}.{a[-1]}" for a in spec.archs)
        module = cpp_extension.load(
            name=spec.name,
            sources=[str(s) for s in spec.sources],
            extra_cflags=list(spec.cflags),
            extra_cuda_cflags=list(spec.cuda_cflags),
            extra_ldflags=list(spec.ldflags),
            build_directory=str(tmp),
            with_cuda=spec.with_cuda,
            verbose=envs.verbose_build(),
        )
        library = _library_file(tmp, spec.name)
        seconds = time.perf_counter() - start
        (tmp / "manifest.json").write_text(json.dumps({
            "key": spec.key(), "sha256": _sha256(library), "archs": list(spec.archs),
            "torch": torch.__version__, "cuda": torch.version.cuda, "flexdispatch": __version__,
            "python": sys.version.split()[0], "built_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "build_seconds": round(seconds, 1),
        }, indent=1))
        if folder.exists():  # a stale or corrupt copy; we hold the lock
            shutil.rmtree(folder)
        os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        for name, saved in (("TORCH_CUDA_ARCH_LIST", saved_arch_env), ("CXX", saved_cxx)):
            if saved is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = saved
    progress("built %s in %.1f s", what, seconds)
    last_load.built, last_load.seconds = True, seconds
    return module  # loaded from the temporary path; the mapping survives the rename


def prepare_root(root: Path) -> Path:
    """Create the cache folder private to this user (0700) if needed; raise UnsafeCacheError
    if it is not this user's, is writable by others, is a symlink to another user's folder, or
    a folder above it lets another user swap it (:func:`check_parents`); CacheNotWritableError
    if it cannot be created."""
    check_parents(root)
    if not root.exists() and not root.is_symlink():
        with _writing(root):
            root.parent.mkdir(parents=True, exist_ok=True)
            try:
                root.mkdir(mode=0o700)
            except FileExistsError:  # another process made it first: checked below
                pass
        check_parents(root)  # (the folders made above are this user's; a swap meanwhile is not)
    check_private(root, "kernel cache folder")
    return root


def _holder(owner_file: Path) -> str:
    try:
        data = json.loads(owner_file.read_text())
        return f"pid {data['pid']} on host {data['host']}, since {data['since']}"
    except (OSError, ValueError, KeyError):
        return "a process that left no owner note"


LOCKS = ".locks"  # the private subfolder of the build locks


class _BuildLock:
    """The per-key file lock, with a note of who holds it and a bounded wait.

    Locks live in ``<root>/.locks`` (0700) and are created 0600: in a cache folder that others
    may read (0755 is accepted), another user could otherwise open a lock file and flock() it,
    stalling every cold build for the lock timeout."""

    def __init__(self, root: Path, name: str):
        from filelock import FileLock

        folder = root / LOCKS
        with _writing(root):
            try:
                folder.mkdir(mode=0o700)
            except FileExistsError:
                pass
        check_private(folder, "kernel build lock folder")
        if not folder.is_symlink() and folder.stat().st_mode & 0o077:
            with _writing(root):
                folder.chmod(0o700)  # (ours: made by an earlier version, or with a wider umask)
        self.root = root
        self.path = folder / f"{name}.lock"
        self.owner = folder / f"{name}.owner"
        try:
            self.lock = FileLock(str(self.path), mode=0o600)
        except TypeError:  # filelock < 3.10 has no mode: the private folder alone keeps others out
            self.lock = FileLock(str(self.path))

    def try_acquire(self) -> bool:
        from filelock import Timeout

        try:
            with _writing(self.root):
                self.lock.acquire(timeout=0)
        except Timeout:
            return False
        self._note()
        return True

    def acquire(self, timeout: float) -> None:
        from filelock import Timeout

        try:
            with _writing(self.root):
                self.lock.acquire(timeout=timeout)
        except Timeout:
            raise LockTimeoutError(
                f"the kernel build lock {self.path} is held by {_holder(self.owner)} for more than {timeout:.0f} s "
                f"(FLEXDISPATCH_LOCK_TIMEOUT); if that process is gone, delete the lock file") from None
        self._note()

    def _note(self) -> None:
        try:
            self.owner.write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                              "since": time.strftime("%Y-%m-%dT%H:%M:%S")}))
        except OSError:
            pass  # the note is for messages only

    def release(self) -> None:
        try:
            self.owner.unlink()
        except OSError:
            pass
        self.lock.release()


def _remove_killed_builds(root: Path, name: str) -> None:
    """Temporary folders of killed builds of this key (we hold its lock: nobody writes one)."""
    for tmp in root.glob(f".tmp-{name}-*"):
        shutil.rmtree(tmp, ignore_errors=True)


def _recent_failure(marker: Path) -> Optional[str]:
    try:
        data = json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
    age = time.time() - float(data.get("at", 0))
    if age > envs.build_retry_s():
        return None
    return f"{age:.0f} s ago in pid {data.get('pid')}: {data.get('error')}"


def load(spec: Optional[BuildSpec] = None):
    """Load ``spec``'s library from the cache, building it first if needed (once per key
    across processes). Returns the extension module.

    Raises UnsafeCacheError (then :func:`load_kernels` builds privately), LockTimeoutError,
    BuildFailedRecentlyError, or the build's own error."""
    global last_load
    last_load = LoadInfo()
    spec = spec or kernel_spec()
    root = prepare_root(cache_root())
    folder = root / spec.folder_name()
    last_load.path = _library_file(folder, spec.name)
    module = _try_cached(folder, spec, warn=False)
    if module is not None:
        return module
    lock = _BuildLock(root, folder.name)
    if not lock.try_acquire():
        progress("waiting for another process (%s) to finish building %s ...", _holder(lock.owner), folder.name)
        last_load.waited = True
        lock.acquire(envs.lock_timeout_s())
    try:
        module = _try_cached(folder, spec, warn=folder.exists())  # built while we waited?
        if module is not None:
            return module
        marker = root / f"{folder.name}.failed"
        failed = _recent_failure(marker)
        if failed is not None:
            raise BuildFailedRecentlyError(f"the build of {folder.name} failed {failed}; not retried (remove "
                                           f"{marker} or set FLEXDISPATCH_BUILD_RETRY_S=0 to retry now)")
        _remove_killed_builds(root, folder.name)
        try:
            module = _build(spec, folder)
        except Exception as exc:
            try:
                tail = " | ".join(str(exc).strip().splitlines()[-3:])
                marker.write_text(json.dumps({"at": time.time(), "pid": os.getpid(), "error": tail}))
            except OSError:
                pass  # a full disk may refuse even this note
            raise
        marker.unlink(missing_ok=True)
        return module
    finally:
        lock.release()


def load_private(spec: Optional[BuildSpec] = None):
    """Build into a fresh private temporary folder (when the shared cache is unsafe)."""
    spec = spec or kernel_spec()
    folder = Path(tempfile.mkdtemp(prefix="flexdispatch-private-")) / spec.folder_name()
    return _build(spec, folder)


def built_variants() -> list[dict]:
    """Manifests of the builds in the cache folder (for ``python -m flexdispatch info``)."""
    root = cache_root()
    found = []
    if root.is_dir():
        for manifest in sorted(root.glob("*/manifest.json")):
            try:
                data = json.loads(manifest.read_text())
            except (OSError, ValueError):
                continue
            data["folder"] = str(manifest.parent)
            found.append(data)
    return found


def clear_cache() -> tuple[int, list[tuple[Path, str]]]:
    """Remove every cached build that no process is building (lock files stay: other
    processes may hold them). Returns ``(removed, [(path, why it was kept)])``."""
    root = cache_root()
    removed, kept = 0, []
    if not root.is_dir():
        return removed, kept
    for entry in sorted(root.iterdir()):
        if not entry.is_dir() or entry.is_symlink() or entry.name == LOCKS:
            continue
        name = entry.name
        if name.startswith(".tmp-"):
            name = name[len(".tmp-"):].rsplit("-", 2)[0]
        lock = _BuildLock(root, name)
        if not lock.try_acquire():
            kept.append((entry, f"a build is in progress ({_holder(lock.owner)})"))
            continue
        try:
            shutil.rmtree(entry)
            removed += 1
        except OSError as exc:
            kept.append((entry, f"{type(exc).__name__}: {exc}"))
        finally:
            lock.release()
    return removed, kept


def load_kernels():
    """The kernels for this machine, or None (FLEXDISPATCH_JIT=0, or a failed build in
    ``auto`` mode, each with one warning)."""
    mode = envs.jit_mode()
    if mode == "0":
        logger.warning("FLEXDISPATCH_JIT=0: using the plain PyTorch ops (slower; no kernels built)")
        return None
    try:
        try:
            return load()
        except (UnsafeCacheError, CacheNotWritableError) as exc:
            logger.warning("not using the kernel cache: %s. Building privately for this process instead", exc)
            return load_private()
    except Exception as exc:  # noqa: BLE001 - any build failure falls back in auto mode
        if mode == "1":
            raise
        labels = {LockTimeoutError: "kernel build lock", BuildFailedRecentlyError: "kernel build",
                  UnsafeCacheError: "kernel cache", CacheNotWritableError: "kernel cache",
                  PermissionError: "kernel cache permissions"}
        label = next((v for k, v in labels.items() if isinstance(exc, k)), None)
        if label is not None:  # said as what it is, not as a failed compile
            logger.warning("%s: %s; using the plain PyTorch ops", label, exc)
            return None
        tail = str(exc).strip().splitlines()[-5:]
        logger.warning("kernel build failed; using the plain PyTorch ops. Set FLEXDISPATCH_JIT=1 to "
                       "raise instead. Last lines: %s", " | ".join(tail))
        return None

