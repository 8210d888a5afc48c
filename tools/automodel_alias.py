"""A pytest plugin that runs NeMo Automodel's tests with its flex token dispatcher replaced by
flexdispatch: ``sys.modules`` maps Automodel's module name to the ``flexdispatch`` package, so
every ``import``/``from ... import`` and every ``mock.patch("...token_dispatcher.X")`` in
Automodel's code and tests reaches flexdispatch.

    python -m pytest -p automodel_alias <Automodel>/tests/unit_tests/moe ...

(with ``tools/`` on ``PYTHONPATH``; ``tools/run_automodel_tests.sh`` does it).
"""

import importlib
import sys

import flexdispatch

MODULE = "nemo_automodel.components.moe.megatron.token_dispatcher"


def alias() -> None:
    """Point Automodel's module name (and its parent package's attribute) at flexdispatch."""
    sys.modules[MODULE] = flexdispatch
    parent, _, leaf = MODULE.rpartition(".")
    try:
        setattr(importlib.import_module(parent), leaf, flexdispatch)
    except ImportError:  # Automodel not importable: its tests say why when they import it
        pass


alias()


def pytest_configure(config):  # noqa: ARG001  (re-assert after other plugins imported Automodel)
    alias()
