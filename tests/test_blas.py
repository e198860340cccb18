"""Threads must not busy-wait between calls: OpenBLAS's whatever the import order, onnxruntime's once run returns."""
import subprocess
import sys

import pytest

from fastrun.system import blas, ortutil

PROBE = """
import ctypes, sys
{first}
from fastrun.system import blas, ortutil
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


IDLE_PROBE = """
import time
import numpy as np
from onnx import helper
from fastrun.system import ortutil
shape = [1, 64, 56, 56]
nodes = [helper.make_node("Relu", ["x"], ["t"]), helper.make_node("Sigmoid", ["t"], ["y"])]
model = ortutil.make_model(nodes, [ortutil.value_info("x", shape)], [ortutil.value_info("y", shape)])
sess = ortutil.session(model, threads=2)
feed = {"x": np.ones(shape, np.float32)}
for _ in range(20):
    sess.run(None, feed)
c0 = time.process_time(); time.sleep(0.5); print(time.process_time() - c0)
"""


def test_onnxruntime_threads_stop_spinning_when_run_returns():
    """Spinning during ``run`` (as onnxruntime's default) but not after: without the stop, the
    worker burned ~40 ms of CPU in the 0.5 s after a call."""
    so = ortutil.session_options()
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    assert so.get_session_config_entry("session.force_spinning_stop") == "1"
    out = subprocess.run([sys.executable, "-c", IDLE_PROBE], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert float(out.stdout) < 0.01
