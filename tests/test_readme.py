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
