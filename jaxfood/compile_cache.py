"""A persistent XLA compilation cache, so that repeated commands do not recompile.

``jaxfood predict`` on one sample spends most of its time compiling the model; with the cache a
second call with the same checkpoint loads the compiled programs from disk instead. The cache
lives in the user cache directory (``$XDG_CACHE_HOME/jaxfood/xla``, default
``~/.cache/jaxfood/xla``); ``JAXFOOD_COMPILE_CACHE=DIR`` moves it, ``JAXFOOD_NO_COMPILE_CACHE=1``
(or the ``--no-compile-cache`` flag of ``jaxfood`` and ``run_mtl.py``) turns it off.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

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


def enable_compile_cache(disabled: bool = False) -> Path | None:
    """Points JAX's persistent compilation cache at :func:`cache_dir` (every program, however fast
    it compiled: predict's many small programs add up). Returns the directory, None when off.

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
                "jax_persistent_cache_min_compile_time_secs": 0.0,
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
