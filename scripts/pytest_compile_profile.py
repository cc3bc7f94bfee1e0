"""pytest plugin: JAX compilation, tracing and lowering seconds of every test (in the pytest process;
subprocesses that tests start are not counted), to see which tests compile what.

    PYTHONPATH=scripts python -m pytest -q -n 0 -p pytest_compile_profile [--durations=40]

(``-n 0``: one process; under pytest-xdist each worker would count and print its own share.)

writes ``$JAXFOOD_COMPILE_PROFILE`` (default ``compile_profile.tsv``: one row a test, slowest first:
wall, XLA compile, trace + lower seconds) and prints the totals at the end of the session.
"""

from __future__ import annotations

import collections
import os
import time

import pytest
from jax import monitoring

_totals: dict[str, float] = collections.defaultdict(float)
_rows: list[tuple[str, float, float, float]] = []


def _listen(event: str, duration: float, **_kwargs) -> None:
    _totals[event] += duration


monitoring.register_event_duration_secs_listener(_listen)


def _compile_and_trace(totals) -> tuple[float, float]:
    compile_s = sum(v for k, v in totals.items() if k.endswith("backend_compile_duration"))
    trace_s = sum(v for k, v in totals.items() if k.endswith(("jaxpr_trace_duration", "jaxpr_to_mlir_module_duration")))
    return compile_s, trace_s


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    before, start = dict(_totals), time.perf_counter()
    yield
    wall = time.perf_counter() - start
    compile_s, trace_s = _compile_and_trace({k: v - before.get(k, 0.0) for k, v in _totals.items()})
    _rows.append((item.nodeid, wall, compile_s, trace_s))


def pytest_terminal_summary(terminalreporter):
    path = os.environ.get("JAXFOOD_COMPILE_PROFILE", "compile_profile.tsv")
    with open(path, "w") as f:
        f.write("test\twall_s\tcompile_s\ttrace_lower_s\n")
        for nodeid, wall, compile_s, trace_s in sorted(_rows, key=lambda r: -r[1]):
            f.write(f"{nodeid}\t{wall:.2f}\t{compile_s:.2f}\t{trace_s:.2f}\n")
    wall = sum(r[1] for r in _rows)
    compile_s, trace_s = _compile_and_trace(_totals)
    terminalreporter.write_line(f"compile profile: {len(_rows)} tests, {wall:.0f} s; XLA compilation {compile_s:.0f} s, "
                                f"tracing and lowering {trace_s:.0f} s (this process); per test: {path}")
