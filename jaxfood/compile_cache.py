"""A persistent XLA compilation cache, so that repeated commands do not recompile.

``jaxfood predict`` on one sample spends most of its time compiling the model; with the cache a
second call with the same checkpoint loads the compiled programs from disk instead. The cache
lives in the user cache directory (``$XDG_CACHE_HOME/jaxfood/xla``, default
``~/.cache/jaxfood/xla``); ``JAXFOOD_COMPILE_CACHE=DIR`` moves it, ``JAXFOOD_NO_COMPILE_CACHE=1``
(or the ``--no-compile-cache`` flag of ``jaxfood`` and ``run_mtl.py``) turns it off.

Within one process, :func:`shared_program` goes further: runs of the same model (fine-tuning, the
pretrained probe, the from-scratch ablation, the untrained control, the report) use the same jitted
functions, so JAX's in-memory cache answers -- no tracing, no lowering, no read from disk; and
:class:`Background` compiles a program in a thread while the caller goes on (XLA compiles without
Python's GIL, so two compilations, or a compilation and a training step, share the cores).
:func:`collect_less` keeps Python's garbage collector from running thousands of times while a
program is traced.
"""

from __future__ import annotations

import dataclasses
import enum
import gc
import hashlib
import os
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")

ENV_DIR = "JAXFOOD_COMPILE_CACHE"
ENV_OFF = "JAXFOOD_NO_COMPILE_CACHE"


def cache_dir() -> Path | None:
    """Where compiled programs are kept, or None when the cache is switched off."""
    if os.environ.get(ENV_OFF, "").strip().lower() not in ("", "0", "false", "no"):
        return None
    if os.environ.get(ENV_DIR):
        return Path(os.environ[ENV_DIR]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "jaxfood" / "xla"


#: JAX's own variable: programs that compiled faster than this many seconds are not written.
ENV_MIN_COMPILE_TIME = "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"


def _min_compile_time() -> float:
    """0 (every program) unless the environment sets JAX's threshold (a number of seconds)."""
    try:
        return max(float(os.environ.get(ENV_MIN_COMPILE_TIME, "0")), 0.0)
    except ValueError:
        return 0.0


def enable_compile_cache(disabled: bool = False) -> Path | None:
    """Points JAX's persistent compilation cache at :func:`cache_dir` (every program, however fast
    it compiled: predict's many small programs add up; ``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS``
    in the environment keeps those faster than its seconds out). Returns the directory, None when off.

    Works before or after ``import jax``: before, through JAX's environment variables (so importing
    JAX stays out of ``--help``); after, through ``jax.config``. A directory that cannot be created
    turns the cache off rather than failing the command (it only costs time).
    """
    path = None if disabled else cache_dir()
    if path is not None:
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError:
            path = None
    settings = {"jax_compilation_cache_dir": str(path) if path is not None else None,
                "jax_persistent_cache_min_compile_time_secs": _min_compile_time(),
                "jax_persistent_cache_min_entry_size_bytes": 0}
    if "jax" in sys.modules:
        import jax

        if path is None:
            jax.config.update("jax_enable_compilation_cache", False)
            return None
        jax.config.update("jax_enable_compilation_cache", True)
        for key, value in settings.items():
            jax.config.update(key, value)
    elif path is None:
        os.environ["JAX_ENABLE_COMPILATION_CACHE"] = "false"
    else:
        for key, value in settings.items():
            os.environ[key.upper()] = str(value)
    return path


#: Python's cyclic garbage collector runs whenever allocations outnumber deallocations by the first
#: of these (default 700); tracing a model allocates millions of short-lived objects, so at the
#: default it ran ~1,600 times (and 12 full collections) in the fine-tuning tests' process, 5-6 % of
#: its CPU time; at 20,000, 40 times (0.7 s instead of 2.4-4.3 s). Cyclic garbage is still freed.
GC_THRESHOLD = (20_000, 10, 10)


def collect_less() -> None:
    """Raises the garbage collector's thresholds to :data:`GC_THRESHOLD` (never lowers them). For
    processes that trace and compile programs: the commands, the pod job, the test suite."""
    gc.set_threshold(*(max(now, new) for now, new in zip(gc.get_threshold(), GC_THRESHOLD)))


# ---- programs shared within the process ---------------------------------------------------------
#: How many shared programs (jitted functions and what they compiled) a process keeps.
SHARED_CAPACITY = 16


def static_signature(obj: Any, keep: list | None = None) -> Any:
    """A value-based, hashable description of what a program closes over: dataclasses (configs,
    Flax modules: their fields but ``parent``/``name``) field by field, mappings by sorted key,
    sequences in order, numpy arrays by dtype, shape and bytes, functions by qualified name. Any
    other object is described by its identity (it is appended to ``keep``, which the caller holds so
    that the id cannot be reused): two runs then share a program only when they share that object."""
    if obj is None or isinstance(obj, (bool, int, float, str, bytes, enum.Enum)):
        return (type(obj).__name__, obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return (type(obj).__module__, type(obj).__qualname__,
                tuple((f.name, static_signature(getattr(obj, f.name), keep))
                      for f in dataclasses.fields(obj) if f.name not in ("parent", "name")))
    if isinstance(obj, Mapping):
        return ("map", tuple(sorted((repr(k), static_signature(v, keep)) for k, v in obj.items())))
    if isinstance(obj, (tuple, list)):
        return (type(obj).__name__, tuple(static_signature(v, keep) for v in obj))
    if isinstance(obj, np.ndarray):
        return ("array", obj.dtype.str, obj.shape, hashlib.sha256(np.ascontiguousarray(obj).tobytes()).hexdigest())
    if isinstance(obj, np.generic):
        return ("scalar", obj.dtype.str, obj.item())
    if callable(obj) and hasattr(obj, "__qualname__") and "<" not in obj.__qualname__:
        return ("function", getattr(obj, "__module__", ""), obj.__qualname__)
    if keep is not None:
        keep.append(obj)
    return ("object", type(obj).__qualname__, id(obj))


class KeptCache:
    """``build()`` once per ``static_signature(key)``; the ``capacity`` most recently used values
    are kept (with the objects their keys describe by identity, so that no id is reused)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self._entries: OrderedDict[str, tuple[Any, list]] = OrderedDict()
        self._lock = threading.Lock()  # programs are also traced in background threads

    def get(self, key: Any, build: Callable[[], T]) -> T:
        keep: list = []
        digest = hashlib.sha256(repr(static_signature(key, keep)).encode()).hexdigest()
        with self._lock:
            entry = self._entries.get(digest)
            if entry is not None:
                self._entries.move_to_end(digest)
                return entry[0]
        value = build()  # outside the lock: a build may trace, and so use this cache itself
        with self._lock:  # two threads that built at once: the first value kept is returned to both
            entry = self._entries.setdefault(digest, (value, keep))
            self._entries.move_to_end(digest)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
        return entry[0]

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()


_SHARED = KeptCache(SHARED_CAPACITY)


def shared_program(kind: str, key: Any, build: Callable[[], T]) -> T:
    """``build()`` once per ``(kind, static_signature(key))`` in this process; later calls get the
    same object. ``build`` returns jitted functions (or objects holding them) whose programs depend
    only on ``key`` and on their arguments, so reusing them changes no result. The
    :data:`SHARED_CAPACITY` most recently used are kept."""
    return _SHARED.get((kind, key), build)


def forget_shared_programs() -> None:
    """Drops every program :func:`shared_program` keeps (and, with them, their compiled code)."""
    _SHARED.clear()


class Background(threading.Thread):
    """``fn(*args)`` in a thread, started at once: typically the first call of a jitted function,
    which traces and compiles it while the caller does other work. :meth:`result` waits for it and
    returns its value or raises its error in the caller's thread. Callers join it before they
    return (an XLA compilation must not outlive the interpreter) and keep it to one-process jobs
    (a multi-process job's collectives must run in the same order on every process)."""

    def __init__(self, fn: Callable, *args: Any, name: str = "jaxfood-background"):
        super().__init__(daemon=True, name=name)
        self._fn, self._args, self._value, self._error = fn, args, None, None
        self.start()

    def run(self) -> None:
        try:
            self._value = self._fn(*self._args)
        except BaseException as error:  # noqa: BLE001 - re-raised by result() in the caller's thread
            self._error = error

    def result(self) -> Any:
        self.join()
        if self._error is not None:
            raise self._error
        return self._value
