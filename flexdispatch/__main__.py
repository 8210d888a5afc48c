"""The command line: python -m flexdispatch info | build [--arch ...] | clear-cache | demo [...]."""

from __future__ import annotations

import argparse
import os
import platform
import sys
from typing import Optional


def _info() -> int:
    import torch

    from . import _jit
    from ._version import __version__
    from .managers.deepep import deepep_available

    archs = _jit.gpu_archs()
    print(f"flexdispatch {__version__}")
    print(f"python       {platform.python_version()} ({sys.implementation.cache_tag})")
    print(f"torch        {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    print(f"arch key     {'-'.join(archs) if archs else 'cpu'}")
    print(f"cache        {_jit.cache_root()}")
    print(f"sources      {_jit.sources_dir()}")
    builds = _jit.built_variants()
    if not builds:
        print("built        nothing yet (the first dispatcher or kernel op builds the kernels; "
              "'python -m flexdispatch build' builds them now)")
    for b in builds:
        arch = ", ".join(b.get("archs") or ["cpu"])
        print(f"built        {arch}: torch {b.get('torch')}, {b.get('build_seconds')} s, {b.get('built_at')} "
              f"-> {b['folder']}")
    ok, detail = deepep_available()
    print(f"deep_ep      {'available, ' + detail if ok else 'not available: ' + detail}")
    if ok:
        from .managers.deepep import narrow_rows_fixed

        print("deep_ep rows " + ("any width its kernels take (this build has the narrow-row fix, DeepEP abba6ad)"
                                 if narrow_rows_fixed() else "at least 2048 bytes (this build predates DeepEP's "
                                 "narrow-row fix, abba6ad; judged by the absence of deep_ep.topk_idx_t)"))
    _print_backends()
    return 0


def _print_backends() -> None:
    """Which backend a dispatcher gets here, and why (registry.unavailable_here and auto's order)."""
    from . import envs
    from .managers import registry

    print("backends     (config.moe_flex_backend, config.moe_flex_dispatcher_backend or FLEXDISPATCH_BACKEND)")
    usable = {}
    for name in registry.backend_names()[1:]:
        why = registry.unavailable_here(name)
        usable[name] = why is None
        print(f"  {name:<10} {'usable' if why is None else 'not usable: ' + why}")
    order = [name + (" (one node)" if registry.BACKENDS[name].one_node else "")
             for name in registry.AUTO_ORDER if usable[name]]
    print(f"auto picks   local for one rank; for a group, the first of {', '.join(order)} that can serve the call"
          if len(order) > 1 else f"auto picks   local for one rank, {order[0]} for a group")
    if envs.backend():
        print(f"FLEXDISPATCH_BACKEND={envs.backend()}: every dispatcher of this process uses it, whatever its config says")


def _build(archs: Optional[list[str]]) -> int:
    from . import _jit

    import torch

    os.environ.setdefault("FLEXDISPATCH_JIT", "1")
    if archs and torch.version.cuda is None:
        print(f"error: --arch {' '.join(archs)}: this torch ({torch.__version__}) is a CPU build and cannot compile "
              f"CUDA kernels; install a CUDA build of torch, or run 'build' without --arch for the CPU kernels",
              file=sys.stderr)
        return 2
    try:
        spec = _jit.kernel_spec(archs)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    _jit.load(spec)
    info = _jit.last_load
    state = f"built in {info.seconds:.1f} s" if info.built else "already cached"
    print(f"{spec.arch_tag}: {state} at {info.path}")
    return 0


def _clear_cache() -> int:
    from . import _jit

    removed, kept = _jit.clear_cache()
    print(f"removed {removed} cached build(s) from {_jit.cache_root()}")
    for path, why in kept:
        print(f"kept {path}: {why}")
    return 0 if not kept else 1


DESCRIPTION = """\
flexdispatch's command line: what is installed and built, the kernel build, the cache, and a
demo of a MoE layer over several local ranks. 'python -m flexdispatch COMMAND --help' says
more about each command."""


def _parser() -> argparse.ArgumentParser:
    formatter = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(prog="python -m flexdispatch", description=DESCRIPTION,
                                     formatter_class=formatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("info", help="versions, architecture key, cache contents, DeepEP availability",
                   description="Print the versions of flexdispatch, Python and torch, the architecture key "
                   "of the kernels this machine needs, the kernel cache and what it holds, and whether "
                   "DeepEP imports. Builds nothing.", formatter_class=formatter)
    build = sub.add_parser("build", help="compile the kernels now (e.g. in an image build step)",
                           description="Compile the kernels into the cache now, rather than at the first "
                           "dispatcher or kernel op (tens of seconds on a cold cache; nothing when they are "
                           "cached). FLEXDISPATCH_CACHE_DIR sets the cache folder.")  # (--arch says its default)
    build.add_argument("--arch", action="append", metavar="ARCH",
                       help="a CUDA architecture to compile for, e.g. 9.0 or sm_90; repeat for several "
                       "(default: the visible GPUs' architectures, or the CPU kernels only when there is no GPU)")
    sub.add_parser("clear-cache", help="remove every cached build",
                   description="Remove every cached kernel build from the cache folder (the next use "
                   "builds again). A build another process is compiling now is kept, and named.",
                   formatter_class=formatter)
    sub.add_parser("demo", help="a real MoE layer over several local ranks, checked against a dense "
                   "computation ('demo --help' lists its options)", add_help=False)
    return parser


def _shadowing_folder() -> Optional[str]:
    """The folder 'import flexdispatch' finds instead of the package, or None. From the folder
    that holds a clone named flexdispatch, the clone (no __init__.py at its top) is imported as
    a namespace package ahead of an editable install's finder; this command still runs (its
    modules come through the finder) but the package's own names are missing, so a script run
    there fails with "module 'flexdispatch' has no attribute ..."."""
    package = sys.modules.get(__package__ or "flexdispatch")
    if package is None or getattr(package, "__file__", None) is not None:
        return None
    return ", ".join(str(p) for p in getattr(package, "__path__", [])) or "a folder"


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    folder = _shadowing_folder()
    if folder:
        from ._log import logger

        logger.warning("warning: 'import flexdispatch' here finds the folder %s, not the installed package "
                       "(Python looks in the current folder first); scripts run from %s will fail with \"module "
                       "'flexdispatch' has no attribute ...\". Run Python from inside the clone, or from any "
                       "other folder", folder, os.getcwd())
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    if args.command == "demo":
        from .demo import main as demo_main

        return demo_main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "info":
        return _info()
    if args.command == "build":
        return _build(args.arch)
    return _clear_cache()


if __name__ == "__main__":
    sys.exit(main())
