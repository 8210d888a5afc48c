"""examples/quickstart.ipynb runs top to bottom, headless, and shows what it promises."""

import os
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "examples" / "quickstart.ipynb"


def test_notebook_extra_brings_what_runs_the_notebook():
    """pip install -e '.[notebook]' brings what tools/run_notebook.py and this file use."""
    tomllib = pytest.importorskip("tomllib")
    extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["notebook"]
    names = {re.split(r"[<>=!~\[; ]", dep, maxsplit=1)[0].lower() for dep in extra}
    # run_notebook: matplotlib; here: nbformat, nbclient, the python3 kernel (ipykernel), pytest
    # and the plugin of its timeout marker.
    assert {"matplotlib", "nbformat", "nbclient", "ipykernel", "pytest", "pytest-timeout"} <= names


@pytest.mark.timeout(600)
def test_quickstart_notebook_runs(monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # The kernel runs from examples/; let it import this checkout even when not installed.
    repo = str(NOTEBOOK.parents[1])
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])))
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()
    text, images = [], 0
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            text.append(output.get("text", "") + str(output.get("data", {}).get("text/plain", "")))
            images += "image/png" in output.get("data", {})
    text = "\n".join(text)
    assert "fused kernels: True" in text
    assert "CUDA context created by the import: False" in text
    assert "kernels loaded by the import: False" in text  # a query builds nothing
    errors = [float(v) for v in text.split("largest relative error vs dense: output ")[1].split("\n")[0]
              .replace(", gradients", "").split()]
    assert max(errors) < 1e-4
    assert "capacity per expert" in text and "speed-up" in text
    # The timing: a spread beside each median, and a figure that says what was timed.
    spread = r"[\d.]+ ms \([\d.]+-[\d.]+\)"
    timings = [line for line in text.splitlines() if line.startswith("R=")]
    assert len(timings) == 3 and all(re.search(f"fused +{spread}, reference +{spread}", t) for t in timings), timings
    figure = text.split("figure: ")[1].split("\n")[0]
    assert "bars: fastest to slowest" in figure and "alternating rounds" in figure
    assert ("CPU timing" in figure) == ("device cpu" in text)
    assert images == 3
