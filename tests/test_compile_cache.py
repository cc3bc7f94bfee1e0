"""The persistent XLA compilation cache: where it lives, the opt-out, and that programs land in it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from jaxfood.compile_cache import ENV_DIR, ENV_MIN_COMPILE_TIME, ENV_OFF, cache_dir

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = """
from jaxfood.compile_cache import enable_compile_cache
print(enable_compile_cache())
import jax, jax.numpy as jnp
print(float(jax.jit(lambda x: jnp.sin(x) * 2)(jnp.ones(3)).sum()))
"""


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv(ENV_DIR, raising=False)
    monkeypatch.delenv(ENV_OFF, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "jaxfood" / "xla"
    monkeypatch.setenv(ENV_DIR, str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"
    monkeypatch.setenv(ENV_OFF, "1")
    assert cache_dir() is None
    monkeypatch.setenv(ENV_OFF, "0")
    assert cache_dir() == tmp_path / "mine"


def test_tests_never_write_into_the_user_cache():
    assert not Path(os.environ[ENV_DIR]).resolve().is_relative_to(Path.home() / ".cache")


def _run(env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in (ENV_OFF, ENV_MIN_COMPILE_TIME)}  # the defaults
    env.update({"PYTHONPATH": str(ROOT), **env_extra})
    return subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)


def test_compiled_programs_are_written_to_the_cache_above_the_threshold_and_the_opt_out_writes_none(tmp_path):
    on = _run({ENV_DIR: str(tmp_path / "on")})
    assert on.returncode == 0, on.stderr
    assert on.stdout.splitlines()[0] == str(tmp_path / "on")
    assert any((tmp_path / "on").iterdir())  # the jitted program's cache entry
    # JAX's threshold set in the environment is kept: a program faster than it is not written.
    high = _run({ENV_DIR: str(tmp_path / "high"), ENV_MIN_COMPILE_TIME: "1000"})
    assert high.returncode == 0, high.stderr
    assert high.stdout.splitlines()[0] == str(tmp_path / "high") and not any((tmp_path / "high").iterdir())
    off = _run({ENV_DIR: str(tmp_path / "off"), ENV_OFF: "1"})
    assert off.returncode == 0, off.stderr
    assert off.stdout.splitlines()[0] == "None" and not (tmp_path / "off").exists()


def test_shared_program_is_keyed_by_value_of_configs_and_by_identity_of_other_objects():
    import dataclasses

    import numpy as np

    from jaxfood.compile_cache import forget_shared_programs, shared_program
    from jaxfood.models.encoder import EncoderConfig
    from jaxfood.train.optimizer import OptimizerConfig

    built = []

    def build():
        built.append(1)
        return object()

    a = shared_program("t", (EncoderConfig(hidden_dim=8), OptimizerConfig(), np.arange(3)), build)
    # Equal values (new objects) share; any difference in a field or an array does not.
    assert shared_program("t", (EncoderConfig(hidden_dim=8), OptimizerConfig(), np.arange(3)), build) is a
    assert shared_program("t", (EncoderConfig(hidden_dim=16), OptimizerConfig(), np.arange(3)), build) is not a
    assert shared_program("t", (EncoderConfig(hidden_dim=8), dataclasses.replace(
        OptimizerConfig(), accumulation_steps=2), np.arange(3)), build) is not a
    assert shared_program("t", (EncoderConfig(hidden_dim=8), OptimizerConfig(), np.arange(1, 4)), build) is not a
    assert shared_program("u", (EncoderConfig(hidden_dim=8), OptimizerConfig(), np.arange(3)), build) is not a
    # Objects that are not values (here a closure) share only when they are the same object.
    f = lambda: 0  # noqa: E731
    b = shared_program("t", f, build)
    assert shared_program("t", f, build) is b
    assert shared_program("t", lambda: 0, build) is not b
    assert len(built) == 7
    forget_shared_programs()
    assert shared_program("t", f, build) is not b


def test_collect_less_raises_the_garbage_collector_thresholds_and_never_lowers_them(monkeypatch):
    import gc

    from jaxfood import cli, compile_cache
    from jaxfood.compile_cache import GC_THRESHOLD, collect_less

    saved = gc.get_threshold()
    try:
        gc.set_threshold(700, 10, 10)  # Python's defaults
        collect_less()
        assert gc.get_threshold() == GC_THRESHOLD and GC_THRESHOLD[0] > 700
        gc.set_threshold(GC_THRESHOLD[0] * 2, 1, 50)  # a process that chose its own: kept where higher
        collect_less()
        assert gc.get_threshold() == (GC_THRESHOLD[0] * 2, GC_THRESHOLD[1], 50)
        # Every command runs with them (the session's compilation cache left as it is).
        monkeypatch.setattr(compile_cache, "enable_compile_cache", lambda disabled=False: None)
        gc.set_threshold(700, 10, 10)
        assert cli.run_command(lambda args: 0, object(), debug=False) == 0
        assert gc.get_threshold() == GC_THRESHOLD
    finally:
        gc.set_threshold(*saved)
