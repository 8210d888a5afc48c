"""Run a notebook's code cells in order in one namespace and print what they print, for
machines without a Jupyter kernel (the lent GPU machines). Figures are rendered off-screen
and saved in the --figures folder when given. CI runs notebooks with nbclient instead
(tests/test_notebook.py).

    python tools/run_notebook.py examples/quickstart.ipynb --figures out/
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("notebook", type=Path, help="the .ipynb file to run")
    parser.add_argument("--figures", type=Path, metavar="DIR",
                        help="save each figure shown as DIR/NOTEBOOK-figN.png (DIR is created when missing)")
    args = parser.parse_args()
    if args.figures:
        args.figures.mkdir(parents=True, exist_ok=True)  # now, not at the first figure after minutes of cells
    os.environ.setdefault("MPLBACKEND", "Agg")
    import matplotlib.pyplot as plt

    saved = []

    def show(*_, **__):
        for num in plt.get_fignums():
            if args.figures:
                path = args.figures / f"{args.notebook.stem}-fig{len(saved) + 1}.png"
                plt.figure(num).savefig(path, dpi=100)
                saved.append(path)
            plt.close(num)

    plt.show = show
    sys.path.insert(0, str(args.notebook.resolve().parent))
    namespace = {"__name__": "__main__"}
    cells = [c for c in json.loads(args.notebook.read_text())["cells"] if c["cell_type"] == "code"]
    for i, cell in enumerate(cells, 1):
        source = "".join(cell["source"])
        start = time.perf_counter()
        print(f"--- cell {i}", flush=True)
        exec(compile(source, f"{args.notebook.name}[cell {i}]", "exec"), namespace)
        print(f"--- cell {i}: {time.perf_counter() - start:.1f} s", flush=True)
    print(f"ran {len(cells)} cells; figures: {[str(p) for p in saved]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
