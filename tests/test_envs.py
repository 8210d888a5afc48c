"""The environment variables and testing switches (flexdispatch.envs): typed, checked, named in
errors, and read when used."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name,raw,expected", [
    ("FLEXDISPATCH_JIT", " AUTO ", "auto"), ("FLEXDISPATCH_JIT", "2", None),
    ("FLEXDISPATCH_LOCK_TIMEOUT", "0", 0.0), ("FLEXDISPATCH_LOCK_TIMEOUT", "-1", None),
    ("FLEXDISPATCH_BUILD_RETRY_S", "soon", None), ("FLEXDISPATCH_DEEPEP_MIN_NVL_BYTES", "1000", 896),
    ("FLEXDISPATCH_DEEPEP_MIN_NVL_BYTES", "-5", None), ("NUM_OF_TOKENS_PER_CHUNK_COMBINE_API", "x", None)])
def test_environment_variables_are_typed_and_checked(monkeypatch, name, raw, expected):
    """Every variable is read through envs, parsed, and a bad value names the variable."""
    from flexdispatch import envs

    reader = {"FLEXDISPATCH_JIT": envs.jit_mode, "FLEXDISPATCH_LOCK_TIMEOUT": envs.lock_timeout_s,
              "FLEXDISPATCH_BUILD_RETRY_S": envs.build_retry_s,
              "FLEXDISPATCH_DEEPEP_MIN_NVL_BYTES": envs.deepep_min_nvl_bytes,
              "NUM_OF_TOKENS_PER_CHUNK_COMBINE_API": envs.hybridep_combine_chunk}[name]
    monkeypatch.setenv(name, raw)
    if expected is None:
        with pytest.raises(ValueError, match=name):
            reader()
    else:
        assert reader() == expected


@pytest.mark.parametrize("raw,expected", [(None, 600.0), ("2.5", 2.5), ("3600", 3600.0), ("0", None), ("-1", None),
                                          ("nan", None), ("soon", None), ("1e12", None)])
def test_peer_timeout_from_the_environment(monkeypatch, raw, expected):
    from flexdispatch import envs

    if raw is None:
        monkeypatch.delenv("FLEXDISPATCH_PEER_TIMEOUT_S", raising=False)
    else:
        monkeypatch.setenv("FLEXDISPATCH_PEER_TIMEOUT_S", raw)
    if expected is None:
        with pytest.raises(ValueError, match="FLEXDISPATCH_PEER_TIMEOUT_S"):
            envs.peer_timeout_s()
    else:
        assert envs.peer_timeout_s() == expected


@pytest.mark.parametrize("value,direct,warned", [("eager_ops=dispatcher", "False", False),
                                                 ("bad=1", "True", True), ("eager_ops=sometimes", "True", True)])
def test_testing_switches_from_the_environment_at_import(value, direct, warned):
    """FLEXDISPATCH_TESTING set before import applies to the eager path; a bad value does not
    stop the package loading (a warning names it) and raises where a switch is read."""
    code = ("import flexdispatch as fd\nfrom flexdispatch import _library\nprint(_library.eager_direct)\n"
            "try:\n    fd.envs.switch('nvlink_pulls')\nexcept ValueError as exc:\n    print('raised', exc)\n")
    env = dict(os.environ, PYTHONPATH=str(REPO), FLEXDISPATCH_TESTING=value, FLEXDISPATCH_JIT="0")
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0] == direct
    assert ("FLEXDISPATCH_TESTING" in run.stderr) == warned
    assert (len(lines) > 1 and lines[1].startswith("raised FLEXDISPATCH_TESTING")) == warned
