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
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
import uuid
from pathlib import Path
from typing import Optional, Sequence

import torch

from ._log import logger
from ._version import __version__

EXTENSION_NAME = "flexdispatch_C"
_LOCK_TIMEOUT_S = 3600.0


# ---- where files go ------------------------------------------------------------------------


def cache_root() -> Path:
    """Folder of cached builds: ``$FLEXDISPATCH_CACHE_DIR`` or ``~/.cache/flexdispatch``."""
    env = os.environ.get("FLEXDISPATCH_CACHE_DIR")
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
    """The cached module, or None when absent, incomplete, corrupt or not importable."""
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        return None
    library = _library_file(folder, spec.name)
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


def _build(spec: BuildSpec, folder: Path):
    """Build into a private temporary folder, then publish it as ``folder`` by rename."""
    from torch.utils import cpp_extension

    tmp = folder.parent / f".tmp-{folder.name}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    what = f"CUDA kernels for {', '.join(spec.archs)}" if spec.with_cuda else "CPU kernels"
    logger.info("building %s (first use on this machine) in %s ...", what, folder)
    start = time.perf_counter()
    saved_arch_env = os.environ.get("TORCH_CUDA_ARCH_LIST")
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
            verbose=os.environ.get("FLEXDISPATCH_VERBOSE_BUILD") == "1",
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
        if saved_arch_env is None:
            os.environ.pop("TORCH_CUDA_ARCH_LIST", None)
        else:
            os.environ["TORCH_CUDA_ARCH_LIST"] = saved_arch_env
    logger.info("built %s in %.1f s", what, seconds)
    last_load.built, last_load.seconds = True, seconds
    return module  # loaded from the temporary path; the mapping survives the rename


def load(spec: Optional[BuildSpec] = None):
    """Load ``spec``'s library from the cache, building it first if needed (once per key
    across processes). Returns the extension module."""
    from filelock import FileLock, Timeout

    global last_load
    last_load = LoadInfo()
    spec = spec or kernel_spec()
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    folder = root / spec.folder_name()
    last_load.path = _library_file(folder, spec.name)
    module = _try_cached(folder, spec, warn=False)
    if module is not None:
        return module
    lock = FileLock(str(root / f"{folder.name}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        logger.info("waiting for another process to finish building %s ...", folder.name)
        last_load.waited = True
        lock.acquire(timeout=_LOCK_TIMEOUT_S)
    try:
        module = _try_cached(folder, spec, warn=folder.exists())  # built while we waited?
        if module is not None:
            return module
        return _build(spec, folder)
    finally:
        lock.release()


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


def clear_cache() -> int:
    """Remove every cached build (not the lock files, which other processes may hold)."""
    root = cache_root()
    removed = 0
    if root.is_dir():
        for entry in root.iterdir():
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
                removed += 1
    return removed


def jit_mode() -> str:
    mode = os.environ.get("FLEXDISPATCH_JIT", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        raise ValueError(f"FLEXDISPATCH_JIT must be auto, 0 or 1, got {mode!r}")
    return mode


def load_kernels():
    """The kernels for this machine, or None (FLEXDISPATCH_JIT=0, or a failed build in
    ``auto`` mode, each with one warning)."""
    mode = jit_mode()
    if mode == "0":
        logger.warning("FLEXDISPATCH_JIT=0: using the plain PyTorch ops (slower; no kernels built)")
        return None
    try:
        return load()
    except Exception as exc:  # noqa: BLE001 - any build failure falls back in auto mode
        if mode == "1":
            raise
        tail = str(exc).strip().splitlines()[-5:]
        logger.warning("kernel build failed; using the plain PyTorch ops. Set FLEXDISPATCH_JIT=1 to "
                       "raise instead. Last lines: %s", " | ".join(tail))
        return None

