"""`python -m server` sets the OpenMP settings its decode thread needs before torch loads."""

import os
import subprocess
import sys

from server.engine.openmp import SETTINGS

PROBE = "import os, sys, server.__main__; print(sys.modules.get('torch') is None, *(os.environ[k] for k in {names!r}))"


def probe(env: dict) -> list[str]:
    names = sorted(SETTINGS)
    result = subprocess.run([sys.executable, "-c", PROBE.format(names=names)], env=env, capture_output=True,
                            text=True, check=True)
    return result.stdout.split()


def test_the_server_sets_them_before_torch_is_imported():
    env = {k: v for k, v in os.environ.items() if k not in SETTINGS}
    torch_not_loaded, *values = probe(env)
    assert torch_not_loaded == "True"
    assert values == [SETTINGS[k] for k in sorted(SETTINGS)]


def test_an_operators_own_values_win():
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "1000"}
    _, *values = probe(env)
    assert dict(zip(sorted(SETTINGS), values)) == {"GOMP_SPINCOUNT": "1000", "OMP_WAIT_POLICY": "PASSIVE"}
