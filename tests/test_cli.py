"""The command line and the demo (the README's main job)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flexdispatch.demo import DemoArgs, run_demo, tolerance

REPO = Path(__file__).resolve().parents[1]


def cli(*args, env=None, timeout=600):
    full = dict(os.environ, PYTHONPATH=str(REPO))
    full.update(env or {})
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


def test_info_says_which_backend_and_why():
    info = cli("info", env={"FLEXDISPATCH_BACKEND": "alltoall"})
    assert info.returncode == 0, info.stderr
    lines = info.stdout.splitlines()
    from flexdispatch.managers import registry

    for name in registry.backend_names()[1:]:  # every backend, usable or with the reason it is not
        row = next(line for line in lines if line.strip().startswith(name + " "))
        why = registry.unavailable_here(name)
        assert ("not usable: " + why) in row if why else row.rstrip().endswith("usable"), row
    assert any(line.startswith("auto picks") and "local for one rank" in line for line in lines)
    assert any(line.startswith("FLEXDISPATCH_BACKEND=alltoall") for line in lines)


def test_clear_cache(tmp_path):
    (tmp_path / "flexdispatch_C-cpu-0123").mkdir()
    (tmp_path / "x.lock").write_text("")
    out = cli("clear-cache", env={"FLEXDISPATCH_CACHE_DIR": str(tmp_path), "FLEXDISPATCH_JIT": "0"})
    assert out.returncode == 0 and "removed 1" in out.stdout
    assert "import flexdispatch" not in out.stderr  # no shadowing warning where nothing shadows
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == [".locks"]  # locks are never deleted
    assert "x.lock" in [p.name for p in tmp_path.iterdir()]
    info = cli("info", env={"FLEXDISPATCH_CACHE_DIR": str(tmp_path)})
    built = [line for line in info.stdout.splitlines() if line.startswith("built")]
    # Importing builds nothing: the line must not send the reader to an import.
    assert built and all("nothing yet" in line and "import" not in line for line in built), built
    assert [p.name for p in tmp_path.iterdir() if p.is_dir()] == [".locks"]  # and info built nothing


def test_kernels_loaded_is_a_query(monkeypatch):
    """ops.kernels_loaded() answers without loading or building; ops.load_kernels() loads."""
    from flexdispatch import _library, ops

    def no_load():
        raise AssertionError("kernels_loaded() loaded (or built) the kernels")

    monkeypatch.setattr(_library, "_loaded", False)
    monkeypatch.setattr(_library, "_C", None)
    monkeypatch.setattr(_library._jit, "load_kernels", no_load)
    assert ops.kernels_loaded() is False
    monkeypatch.undo()
    assert ops.load_kernels() is True and ops.kernels_loaded() is True


# Made importable from PYTHONPATH, this makes every process that starts NumPy-less: an import
# of numpy fails as on a machine without it, and each attempt is counted in NUMPY_ATTEMPTS.
NO_NUMPY = """
import os, sys

class _NoNumpy:
    def find_spec(self, name, path=None, target=None):
        if name == "numpy" or name.startswith("numpy."):
            with open(os.environ["NUMPY_ATTEMPTS"], "a") as f:
                f.write(name + "\\n")
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, _NoNumpy())
"""


@pytest.mark.timeout(600)
def test_demo_command_two_ranks_without_numpy(tmp_path):
    """The README's first command end to end, where NumPy does not import: nothing on the
    demo's path needs it (torch's own import still warns then; NumPy is a dependency so that
    an install has it)."""
    (tmp_path / "sitecustomize.py").write_text(NO_NUMPY)
    attempts = tmp_path / "attempts"
    out = cli("demo", "--world-size", "2", "--device", "cpu", "--steps", "2", "--tokens", "64", "--hidden", "32",
              "--ffn", "48", "--experts", "6", "--topk", "2",
              env={"PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO)]), "NUMPY_ATTEMPTS": str(attempts)})
    assert out.returncode == 0, out.stderr
    assert "flexdispatch demo: 2 ranks on cpu (float32), alltoall manager" in out.stdout
    assert "OK: every error below" in out.stdout and "Traceback" not in out.stderr
    assert attempts.read_text()  # the processes did run without NumPy


def test_numpy_is_a_dependency():
    """torch warns "Failed to initialize NumPy" when imported without it, and every process of
    the demo imports torch: an install of flexdispatch brings NumPy."""
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert "numpy" in [dep.split(">")[0].split("=")[0].strip() for dep in project["dependencies"]]


@pytest.mark.timeout(600)
def test_demo_one_rank():
    """The notebook and laptop path: one rank, several steps of one dispatcher, each checked
    (a tokens_per_expert left over from the previous call would fail the second step)."""
    args = DemoArgs(world_size=1, steps=3, tokens=64, hidden=32, ffn=48, experts=6, topk=2, device="cpu")
    result = run_demo(args)
    assert result["backend"] == "local"
    assert max(result["errors"].values()) < tolerance(result)


def test_demo_command_line_rejects_bad_sizes():
    out = cli("demo", "--experts", "5", "--world-size", "2")
    assert out.returncode == 2
    assert "error: --experts 5 must be a multiple of --world-size 2" in out.stderr


def _deep_ep_imports() -> bool:
    from flexdispatch.managers.deepep import deepep_available

    return deepep_available()[0]


def test_demo_backend_names_come_from_the_registry(monkeypatch, capsys):
    """--backend takes what MoEConfig takes, read at run time (a new backend needs no CLI change)."""
    from flexdispatch import demo
    from flexdispatch.managers import registry

    monkeypatch.setattr(registry, "backend_names", lambda: ("auto", "local", "newengine"))
    assert demo._parser().parse_args(["--backend", "newengine"]).backend == "newengine"
    with pytest.raises(SystemExit) as exit_:
        demo.main(["--backend", "foo"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "argument --backend: invalid choice: 'foo'" in err and "newengine" in err


@pytest.mark.parametrize("backend", ["deepep", "nvlink", "hybridep", "uccl_ep"])
def test_demo_says_in_one_line_that_a_backend_cannot_run_here(backend, monkeypatch, capsys):
    """Every backend that cannot run on this machine is refused before any rank starts, with
    the registry's reason, in one line (exit status 2)."""
    from flexdispatch import demo
    from flexdispatch.managers import registry

    why = registry.unavailable_here(backend)
    if why is None:
        pytest.skip(f"{backend} can run here")

    def no_ranks(*_, **__):
        raise AssertionError(f"ranks started although {backend} cannot run")

    monkeypatch.setattr(demo, "run_demo", no_ranks)
    with pytest.raises(SystemExit) as exit_:
        demo.main(["--backend", backend, "--world-size", "2"])
    assert exit_.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and f"demo: error: --backend {backend}: {why}" in lines[0], lines


@pytest.mark.skipif(_deep_ep_imports(), reason="deep_ep imports here")
@pytest.mark.timeout(120)
def test_demo_prints_one_line_per_failed_rank(monkeypatch, capfd):
    """A rank's error is one line (rank, type, message), not interleaved tracebacks. DeepEP with
    the up-front check switched off stands for a backend whose problem only the ranks see."""
    from flexdispatch import demo

    monkeypatch.setattr(demo, "backend_problem", lambda *_: None)
    small = ["--world-size", "2", "--device", "cpu", "--tokens", "16", "--hidden", "16", "--ffn", "16",
             "--experts", "2", "--topk", "1", "--steps", "1"]
    assert demo.main(["--backend", "deepep", *small]) == 1
    err = capfd.readouterr().err  # the parent's and the spawned ranks' stderr
    assert "Traceback" not in err, err
    ranks = [line for line in err.splitlines() if line.startswith("rank ")]
    assert len(ranks) == 2 and all(line.startswith(f"rank {r}: EngineUnavailableError: config.moe_flex_backend="
                                                   f"'deepep': DeepEP manager: deep_ep does not import")
                                   for r, line in enumerate(ranks)), err


def test_demo_failures_name_each_rank(monkeypatch, capsys):
    """What run_demo raises when ranks fail, as main prints it: one line per failed rank, exit
    status 1 (no processes: run_demo raises it)."""
    from flexdispatch import demo

    lines = [(0, "ValueError: bad"), (3, "the process was killed by SIGABRT")]
    failed = demo.DemoFailed(lines, {0: "tb"})
    assert failed.failures == lines
    assert str(failed) == "rank 0: ValueError: bad; rank 3: the process was killed by SIGABRT"

    def fail(*_, **__):
        raise failed

    monkeypatch.setattr(demo, "run_demo", fail)
    assert demo.main(["--world-size", "4", "--device", "cpu"]) == 1
    err = capsys.readouterr().err.splitlines()
    assert [line for line in err if line.startswith("rank ")] == [f"rank {r}: {line}" for r, line in lines], err
    assert demo._one_line(ValueError("two\nlines")) == "ValueError: two lines"
    assert demo._exit_reason(-6) == "was killed by SIGABRT" and demo._exit_reason(3) == "exited with code 3"


def test_cuda_problem_says_what_is_true(monkeypatch):
    from flexdispatch import demo

    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    assert "is a CPU-only build, without CUDA; install a CUDA build of torch" in demo.cuda_problem(1)
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    assert "(CUDA 12.8) sees no GPU (CUDA_VISIBLE_DEVICES='')" in demo.cuda_problem(1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert demo.cuda_problem(4) == ("only 2 GPU(s) visible for --world-size 4 (one GPU per rank); use --world-size 2 "
                                    "or less, or --device cpu")
    assert demo.cuda_problem(2) is None


@pytest.mark.skipif(torch.version.cuda is not None, reason="needs a CPU-only torch")
def test_demo_on_cuda_with_a_cpu_torch_says_so(capsys):
    from flexdispatch import demo

    with pytest.raises(SystemExit) as exit_:
        demo.main(["--world-size", "1", "--device", "cuda"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "--device cuda: this torch" in err and "CPU-only build" in err and "smaller" not in err


@pytest.mark.parametrize("option,value", [("--world-size", "0"), ("--world-size", "-1"), ("--experts", "0"),
                                          ("--steps", "0"), ("--tokens", "6"), ("--topk", "0"),
                                          ("--hidden", "-3"), ("--ffn", "x"), ("--seed", "1.5")])
def test_demo_rejects_bad_numbers_naming_the_option(option, value, capsys):
    from flexdispatch import demo

    with pytest.raises(SystemExit) as exit_:
        demo.main([option, value])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"error: argument {option}: " in err and "divisible" not in err, err


def _option_entries(help_text: str) -> list[tuple[str, str]]:
    """``(invocation, description)`` of each entry under "options:" in argparse's help."""
    entries = []
    for line in help_text.split("\noptions:\n", 1)[1].splitlines():
        if line.startswith("  -"):
            invocation, _, description = line.strip().partition("  ")
            entries.append([invocation, description.strip()])
        elif line.startswith("   ") and entries:
            entries[-1][1] = (entries[-1][1] + " " + line.strip()).strip()
        else:
            break
    return [tuple(e) for e in entries]


@pytest.mark.parametrize("command", [[], ["info"], ["build"], ["clear-cache"], ["demo"]])
def test_help_describes_every_option_with_its_default(command, capsys):
    from flexdispatch.__main__ import main

    with pytest.raises(SystemExit) as exit_:
        main([*command, "--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    for markup in ("``", ":class:", ":func:", ":meth:"):
        assert markup not in text
    description = text.split("\n\n")[1]
    assert len(description.split()) >= 10, text  # a sentence or two on what the command does
    entries = _option_entries(text)
    assert entries and entries[0][0] == "-h, --help"
    for invocation, help_ in entries[1:]:
        assert len(help_.split()) >= 3 and "default" in help_, (invocation, help_)
    if command == ["demo"]:
        assert len(entries) >= 11  # every DemoArgs field


# What an editable install puts in sys.meta_path (setuptools' finder, after the path finder):
# it maps flexdispatch and its modules to this checkout (ahead of any editable install of
# another checkout in this environment).
EDITABLE_FINDER = """
import importlib.util, sys
from pathlib import Path

ROOT = Path(%r)

class _EditableFinder:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name.split(".")[0] != "flexdispatch":
            return None
        base = ROOT.joinpath(*name.split("."))
        if (base / "__init__.py").is_file():
            return importlib.util.spec_from_file_location(name, base / "__init__.py",
                                                          submodule_search_locations=[str(base)])
        if base.with_suffix(".py").is_file():
            return importlib.util.spec_from_file_location(name, base.with_suffix(".py"))
        return None

from importlib.machinery import PathFinder
sys.meta_path.insert(sys.meta_path.index(PathFinder) + 1, _EditableFinder)
"""


def test_cli_warns_when_a_folder_shadows_the_package(tmp_path):
    """Run from the folder that holds a clone named flexdispatch, 'import flexdispatch' finds the
    clone as a namespace package; the command says so (user scripts there would fail).
    test_clear_cache checks that it says nothing where nothing shadows the package."""
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(EDITABLE_FINDER % str(REPO))
    (tmp_path / "flexdispatch").mkdir()  # the clone, seen from its parent: no __init__.py
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    script = "import flexdispatch; print(hasattr(flexdispatch, 'MoEConfig'))"
    shadowed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                              env=dict(env, PYTHONPATH=str(shim)), timeout=60)
    assert shadowed.stdout.strip() == "False"  # the failure the warning is about
    out = subprocess.run([sys.executable, "-m", "flexdispatch", "clear-cache"], capture_output=True, text=True,
                         cwd=tmp_path, timeout=120,
                         env=dict(env, PYTHONPATH=str(shim), FLEXDISPATCH_CACHE_DIR=str(tmp_path / "cache")))
    assert out.returncode == 0, out.stderr
    assert f"'import flexdispatch' here finds the folder {tmp_path / 'flexdispatch'}, not the installed" in out.stderr


def test_deepep_off_the_gpus_says_why(monkeypatch):
    """DeepEP importable but no GPU per rank: the line says what is missing and how to run here."""
    from flexdispatch import demo
    from flexdispatch.managers import deepep

    monkeypatch.setattr(deepep, "deepep_available", lambda: (True, "1.2"))
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    line = demo.backend_problem("deepep", "cpu", 2)
    assert line == ("--backend deepep: DeepEP moves CUDA tensors, and only 1 GPU(s) visible for --world-size 2 "
                    "(one GPU per rank); use --backend auto or alltoall to run on the CPU")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert "--device cpu was given" in demo.backend_problem("deepep", "cpu", 2)
