"""The README's one-rank example runs as written and matches the dense layer, and its swap
lines are the names the alias needs."""

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, re.S)


def test_readme_example_runs_as_written():
    example = _python_blocks()[0]
    run = subprocess.run([sys.executable, "-c", example], capture_output=True, text=True, timeout=600,
                         cwd=REPO)
    assert run.returncode == 0, run.stderr
    error = float(run.stdout.strip().rsplit(":", 1)[1])
    assert error < 1e-5, run.stdout


def test_readme_swap_names_exist():
    import flexdispatch

    one_import, alias = _python_blocks()[1:3]
    names = re.search(r"from flexdispatch import (.*)", one_import).group(1).split(", ")
    assert all(hasattr(flexdispatch, n.strip()) for n in names)
    # The module the alias plugin replaces (read, not imported: importing the plugin aliases it here).
    module = re.search(r'^MODULE = "(.+)"$', (REPO / "tools" / "automodel_alias.py").read_text(), re.M).group(1)
    assert module in alias


def _readme_test_command() -> str:
    return re.search(r"^(pip install .*&& python -m pytest)$", README, re.M).group(1)


def test_ci_runs_the_readme_test_command():
    assert _readme_test_command() in (REPO / ".ci" / "run").read_text()


def test_ci_fails_when_the_install_fails(tmp_path):
    """.ci/run with stand-ins for python3, pip and nvcc: a failing install must fail CI (set -e
    alone passes over a failure left of &&), and the same run with an install that works and
    tests that pass must succeed (so the stand-ins are what the script runs)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # python3 -m venv DIR makes a venv whose python and pip are stand-ins too; pip fails on
    # "install torch..." when PIP_FAILS is set, python -m pytest exits 0.
    (bin_dir / "python3").write_text(
        '#!/bin/sh\nif [ "$1 $2" = "-m venv" ]; then mkdir -p "$3/bin"; '
        'printf \'PATH="%s/bin:$PATH"\\n\' "$3" > "$3/bin/activate"; '
        'cp "$0" "$3/bin/python"; cp "$(dirname "$0")/pip" "$3/bin/pip"; fi\nexit 0\n')
    (bin_dir / "pip").write_text('#!/bin/sh\n[ "$1 $2" = "install torch==2.13.0" ] && [ -n "$PIP_FAILS" ] && exit 1\nexit 0\n')
    (bin_dir / "nvcc").write_text("#!/bin/sh\nexit 0\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "TMPDIR": str(tmp_path)}

    def ci(**extra):
        return subprocess.run(["bash", str(REPO / ".ci" / "run")], capture_output=True, text=True, timeout=120,
                              env={**env, **extra})

    passing = ci()
    assert passing.returncode == 0 and "CI finished" in passing.stdout, passing.stderr
    failing = ci(PIP_FAILS="1")
    assert failing.returncode != 0 and "CI finished" not in failing.stdout, failing.stdout
    assert "install or tests failed" in failing.stderr
