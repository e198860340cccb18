"""Run ONNX's backend node suite through a backend and record which cases fail.

    python scripts/node_suite_baseline.py                       # onnxruntime: writes the baseline
    python scripts/node_suite_baseline.py --backend fastrun --policy heuristic --out /tmp/fastrun.tsv

With the onnxruntime backend (the default) it writes ``tests/data/onnxruntime_node_failures.txt``:
the node cases onnxruntime fails, which ``tests/test_backend.py`` excludes for fastrun too (fastrun
promises onnxruntime's answers, not more). The header names the onnx and onnxruntime versions the
list was computed with. With ``--backend fastrun`` it writes one tab-separated line per case
(``name  status  exception``) for studying fastrun's own failures.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
import time
import unittest
import warnings
from pathlib import Path

import onnx
import onnx.backend.test
import onnxruntime

REPO = Path(__file__).resolve().parent.parent
BASELINE = REPO / "tests" / "data" / "onnxruntime_node_failures.txt"
NODE_CASES = r"^test_.*_cpu$"


class _Outcomes(unittest.TestResult):
    """Every case's status (pass, fail, error, skip) and the first line of what it raised."""

    def __init__(self) -> None:
        super().__init__()
        self.status: dict[str, tuple[str, str]] = {}

    @staticmethod
    def _name(test: unittest.TestCase) -> str:
        return test.id().rsplit(".", 1)[-1]

    def addSuccess(self, test):  # noqa: N802 (unittest's names)
        self.status[self._name(test)] = ("pass", "")

    def addFailure(self, test, err):  # noqa: N802
        self.status[self._name(test)] = ("fail", _first_line(err[1]))

    def addError(self, test, err):  # noqa: N802
        self.status[self._name(test)] = ("error", _first_line(err[1]))

    def addSkip(self, test, reason):  # noqa: N802
        self.status[self._name(test)] = ("skip", _first_line(reason))


def _first_line(exc: object) -> str:
    text = f"{type(exc).__name__}: {exc}" if isinstance(exc, BaseException) else str(exc)
    lines = [line for line in text.splitlines() if line.strip()]
    return (lines[0] if lines else text)[:300]


def node_suite(backend, **kwargs) -> unittest.TestSuite:
    """ONNX's node cases on CPU, for ``backend`` prepared with ``kwargs``."""
    runner = onnx.backend.test.BackendTest(backend, __name__)
    cases = runner.test_cases["OnnxBackendNodeModelTest"]
    suite = unittest.TestSuite()
    for name in unittest.TestLoader().getTestCaseNames(cases):
        if not re.search(NODE_CASES, name):
            continue
        test = cases(name)
        if kwargs:
            method = getattr(test, name)
            setattr(test, name, lambda method=method: method(**kwargs))
        suite.addTest(test)
    return suite


def run_suite(backend, **kwargs) -> tuple[dict[str, tuple[str, str]], float]:
    """Each node case's (status, message) and the suite's wall time."""
    outcomes = _Outcomes()
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        node_suite(backend, **kwargs).run(outcomes)
    return outcomes.status, time.perf_counter() - start


def write_baseline(status: dict[str, tuple[str, str]], path: Path) -> None:
    failing = sorted(name for name, (kind, _) in status.items() if kind in ("fail", "error"))
    skipped = sum(kind == "skip" for kind, _ in status.values())
    header = ["# ONNX backend node cases onnxruntime fails (scripts/node_suite_baseline.py)",
              f"# onnx {onnx.__version__}",
              f"# onnxruntime {onnxruntime.__version__}",
              f"# cases {len(status)}, failing {len(failing)}, skipped {skipped}"]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(header + failing) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("onnxruntime", "fastrun"), default="onnxruntime")
    parser.add_argument("--policy", help="fastrun's policy (default: fastrun's default)")
    parser.add_argument("--out", type=Path, help="where to write (default: the baseline for onnxruntime)")
    args = parser.parse_args()
    if args.backend == "onnxruntime":
        import onnxruntime.backend as backend

        status, seconds = run_suite(backend)
        write_baseline(status, args.out or BASELINE)
    else:
        import fastrun.backend as backend

        with tempfile.TemporaryDirectory() as cache_dir:
            options = {"cache_dir": cache_dir, **({"policy": args.policy} if args.policy else {})}
            status, seconds = run_suite(backend, **options)
        lines = [f"{name}\t{kind}\t{message}\n" for name, (kind, message) in sorted(status.items())]
        (args.out or Path(os.devnull)).write_text("".join(lines))
    counts = {kind: sum(k == kind for k, _ in status.values()) for kind in ("pass", "fail", "error", "skip")}
    print(f"{args.backend}: {len(status)} cases in {seconds:.1f} s: {counts}", file=sys.stderr)


if __name__ == "__main__":
    main()
