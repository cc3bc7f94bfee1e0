"""Where the test suite's time goes: per test and per compiled program.

A pytest plugin plus a report. The plugin records, for every test, its CPU time (its own process
and the subprocesses it waited for) and JAX's tracing, lowering and XLA compilation durations
(``jax.monitoring``), and every program's persistent-cache key, so that the report can tell how
much compilation was a program compiled again (by another test, worker or process start)::

    python -m pytest -q -p no:cacheprovider -p benchmarks.suite_profile   # writes runs/suite_profile/
    python benchmarks/suite_profile.py [runs/suite_profile] [--top 25]

The report prints the totals, the slowest tests and modules, and last the share of XLA
compilation spent on programs compiled more than once. ``SUITE_PROFILE_DIR`` moves the output.
Subprocesses (the multi-process, multi-device and resume tests) count in CPU time only.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import os
import re
import resource
import sys
import threading
import time
from pathlib import Path

OUT_ENV = "SUITE_PROFILE_DIR"
DEFAULT_OUT = Path("runs") / "suite_profile"
#: jax.monitoring events summed per test (their last path component).
EVENTS = ("jaxpr_trace_duration", "jaxpr_to_mlir_module_duration", "backend_compile_duration")
_KEY = re.compile(r"(MISS|hit) for '(.*)' with key '(.*)'")


# ---- the plugin (loaded by pytest in every worker) ---------------------------------------------
class _Recorder(logging.Handler):
    """Per test: CPU, JAX phase durations; per program: (test, module, cache key, compile seconds)."""

    def __init__(self):
        super().__init__()
        self.test = "<collection>"
        self.tests: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
        self.programs: list[list] = []
        self.guard = threading.Lock()  # (logging.Handler holds its own self.lock around emit)

    def emit(self, record):  # jax._src.compiler's cache hit / miss lines (DEBUG) carry the key
        match = _KEY.search(record.getMessage())
        if match:
            with self.guard:
                self.programs.append([self.test, match.group(1), match.group(2), match.group(3), 0.0])

    def duration(self, event, seconds, **_):
        name = event.rsplit("/", 1)[-1]
        if name not in EVENTS:
            return
        with self.guard:
            self.tests[self.test][name] += seconds
            self.tests[self.test][name + "_count"] += 1
            if name == "backend_compile_duration" and self.programs:
                self.programs[-1][4] += seconds


_RECORDER = _Recorder()


def _out() -> Path:
    return Path(os.environ.get(OUT_ENV) or DEFAULT_OUT)


def pytest_configure(config):
    import jax.monitoring

    if not hasattr(config, "workerinput"):  # the run's first process: an earlier run's files go
        for stale in _out().glob("*.json"):
            stale.unlink()

    jax.monitoring.register_event_duration_secs_listener(_RECORDER.duration)
    logger = logging.getLogger("jax._src.compiler")
    logger.setLevel(logging.DEBUG)
    logger.addHandler(_RECORDER)


def _cpu():
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, children.ru_utime + children.ru_stime


def pytest_runtest_logstart(nodeid, location):
    _RECORDER.test = nodeid
    _RECORDER.tests[nodeid]["_start_wall"] = time.perf_counter()
    own, children = _cpu()
    _RECORDER.tests[nodeid]["_start_cpu"], _RECORDER.tests[nodeid]["_start_children"] = own, children


def pytest_runtest_logfinish(nodeid, location):
    row = _RECORDER.tests[nodeid]
    own, children = _cpu()
    row["wall"] = time.perf_counter() - row.pop("_start_wall")
    row["cpu"] = own - row.pop("_start_cpu")
    row["cpu_subprocesses"] = children - row.pop("_start_children")
    _RECORDER.test = "<between tests>"


def pytest_unconfigure(config):
    if getattr(config.option, "numprocesses", None) and not hasattr(config, "workerinput"):
        return  # pytest-xdist's controller: the workers ran the tests and write their own files
    out = _out()
    out.mkdir(parents=True, exist_ok=True)
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    (out / f"{worker}.json").write_text(json.dumps({
        "tests": {k: dict(v) for k, v in _RECORDER.tests.items()}, "programs": _RECORDER.programs}))


# ---- the report ---------------------------------------------------------------------------------
def load(directory: Path) -> tuple[dict, list]:
    tests, programs = {}, []
    files = sorted(directory.glob("*.json"))
    if not files:
        raise SystemExit(f"error: {directory}: no profile (run pytest with -p benchmarks.suite_profile first)")
    for path in files:
        data = json.loads(path.read_text())
        tests.update(data["tests"])
        programs += [[*row, path.stem] for row in data["programs"]]
    return tests, programs


def repeated_compilation(programs: list) -> tuple[float, float, int]:
    """``(all compile seconds, seconds of programs whose key was compiled before, their count)``."""
    seen, total, repeated, count = set(), 0.0, 0.0, 0
    for _test, kind, _module, key, seconds, _worker in programs:
        if kind != "MISS":
            continue
        total += seconds
        if key in seen:
            repeated += seconds
            count += 1
        seen.add(key)
    return total, repeated, count


def report(directory: Path, top: int = 25) -> None:
    tests, programs = load(directory)
    cpu = {k: r.get("cpu", 0.0) + r.get("cpu_subprocesses", 0.0) for k, r in tests.items()}
    sums = collections.Counter()
    for row in tests.values():
        sums.update({k: v for k, v in row.items() if isinstance(v, (int, float))})
    print(f"tests: {len(tests)}  CPU {sum(cpu.values()):.0f} s (subprocesses {sums['cpu_subprocesses']:.0f} s)  "
          f"trace {sums['jaxpr_trace_duration']:.0f} s  lower {sums['jaxpr_to_mlir_module_duration']:.0f} s  "
          f"XLA compile {sums['backend_compile_duration']:.0f} s "
          f"({int(sums['backend_compile_duration_count'])} programs)")
    print(f"\n{'CPU s':>7} {'subproc':>7} {'trace':>6} {'lower':>6} {'compile':>7} {'progs':>5}  test")
    for name in sorted(cpu, key=cpu.get, reverse=True)[:top]:
        row = tests[name]
        print(f"{cpu[name]:7.1f} {row.get('cpu_subprocesses', 0):7.1f} {row.get('jaxpr_trace_duration', 0):6.1f} "
              f"{row.get('jaxpr_to_mlir_module_duration', 0):6.1f} {row.get('backend_compile_duration', 0):7.1f} "
              f"{int(row.get('backend_compile_duration_count', 0)):5d}  {name}")
    modules = collections.Counter()
    for name, seconds in cpu.items():
        modules[name.split("::")[0]] += seconds
    print(f"\n{'CPU s':>7}  module")
    for module, seconds in modules.most_common(top):
        print(f"{seconds:7.1f}  {module}")
    total, repeated, count = repeated_compilation(programs)
    print(f"\nrepeated programs: {count}, {repeated:.1f} of {total:.1f} s of XLA compilation")
    print(f"repeated_compile_share: {repeated / total if total else 0.0:.3f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", nargs="?", default=os.environ.get(OUT_ENV) or str(DEFAULT_OUT),
                        help="what the plugin wrote (default: $SUITE_PROFILE_DIR or runs/suite_profile)")
    parser.add_argument("--top", type=int, default=25, help="tests and modules listed")
    args = parser.parse_args(argv)
    report(Path(args.directory), args.top)
    return 0


if __name__ == "__main__":
    sys.exit(main())
