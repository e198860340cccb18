"""OpenBLAS must not busy-wait between host kernels, whatever the import order."""
import subprocess
import sys

import pytest

from fastrun import blas

PROBE = """
import ctypes, sys
{first}
from fastrun import blas
libs = blas._loaded_openblas()
print(",".join(str(ctypes.CDLL(p).openblas_thread_timeout()) for p in libs) or "none")
"""


def _timeouts(first: str, env: dict | None = None) -> str:
    import os

    environ = {k: v for k, v in os.environ.items() if k != blas.ENV}
    environ.update(env or {})
    out = subprocess.run([sys.executable, "-c", PROBE.format(first=first)], capture_output=True, text=True,
                         env=environ, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.mark.skipif(not blas._loaded_openblas(), reason="numpy is not linked to a loadable OpenBLAS here")
@pytest.mark.parametrize("first", ["import fastrun; import numpy", "import numpy; numpy.ones((64, 64)) @ numpy.ones((64, 64)); import fastrun"])
def test_short_thread_timeout_whatever_was_imported_first(first):
    assert set(_timeouts(first).split(",")) == {blas.TIMEOUT}


@pytest.mark.skipif(not blas._loaded_openblas(), reason="numpy is not linked to a loadable OpenBLAS here")
def test_a_timeout_the_user_set_is_kept():
    assert set(_timeouts("import numpy; import fastrun", {blas.ENV: "12"}).split(",")) == {"12"}
