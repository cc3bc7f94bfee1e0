"""train_loop's evaluation of the start (``eval_initial``): the first step runs in a thread beside
it, and nothing else changes -- the same states, history and kept step as steps run one after the
other, and an error on either side reaches the caller."""

from __future__ import annotations

import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxfood.train.data_parallel import ShardLayout, data_parallel
from jaxfood.train.loop import LoopConfig, train_loop

TARGET = np.array([1.0, -2.0, 0.5], np.float32)
#: One device, one shard: the layout every step here runs on (its ``axes``: the devices axis alone).
LAYOUT = ShardLayout(0, 1, 1, 1)


def _sgd_step(state, batch, rng):
    """One gradient step on |w - target|^2 (plus a little noise from the shard's key)."""
    grad = jax.lax.pmean(2.0 * (state["w"] - batch["target"]), LAYOUT.axes)
    noise = jax.lax.pmean(jax.random.normal(rng, (3,)) * 1e-3, LAYOUT.axes)
    w = state["w"] - 0.25 * grad + noise
    return {"w": w}, {"loss": jnp.sum((w - batch["target"]) ** 2)}


def _run(tmp_path, name, evaluate, step=None, steps=4):
    step = step or data_parallel(_sgd_step, LAYOUT, seed=3)
    loop = LoopConfig(num_steps=steps, checkpoint_dir=tmp_path / name, eval_every=2, eval_initial=True)
    return train_loop(step, {"w": np.zeros(3, np.float32)}, lambda i, shard: {"target": TARGET}, loop,
                      fixed_batch=True, evaluate=evaluate)


def test_the_first_step_runs_beside_the_start_s_evaluation_and_changes_nothing(tmp_path):
    threads, seen = {}, []
    started = threading.Event()

    def step_fn(state, batch, rng):
        threads["step"] = threading.current_thread()  # while tracing: the thread that calls the step
        started.set()
        return _sgd_step(state, batch, rng)

    def evaluate(state, done):
        if done == 0:
            threads["evaluate"] = threading.current_thread()
            # The first step is under way while the start is evaluated (it does not wait for it).
            assert started.wait(timeout=30)
        seen.append((done, np.array(state["w"])))
        return -float(np.sum((state["w"] - TARGET) ** 2)), {"distance": float(np.sum((state["w"] - TARGET) ** 2))}

    result = _run(tmp_path, "a", evaluate, data_parallel(step_fn, LAYOUT, seed=3))
    assert threads["evaluate"] is threading.main_thread() and threads["step"] is not threading.main_thread()

    # The same numbers as the update done by hand, step by step, from the same keys.
    w = np.zeros(3, np.float32)
    expected = [(0, w.copy())]
    for i in range(4):
        rng = jax.random.fold_in(jax.random.fold_in(jax.random.key(3), i), 0)
        w = w - 0.25 * 2.0 * (w - TARGET) + np.asarray(jax.random.normal(rng, (3,))) * 1e-3
        if (i + 1) % 2 == 0:
            expected.append((i + 1, w.copy()))
    assert [d for d, _ in seen] == [d for d, _ in expected] == [0, 2, 4]
    for (_, got), (_, want) in zip(seen, expected):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.state["w"], expected[-1][1], rtol=1e-5, atol=1e-6)
    assert result.best_step == 4 and [row["step"] for row in result.history["val"]] == [0, 2, 4]
    assert [row["step"] for row in result.history["train"]] == [1, 2, 3, 4]


def test_an_error_in_the_first_step_or_in_the_start_s_evaluation_reaches_the_caller(tmp_path):
    def failing_step(state, batch, rng):
        raise ValueError("the step failed")

    def evaluate(state, done):
        return 0.0, {}

    with pytest.raises(ValueError, match="the step failed"):
        _run(tmp_path, "b", evaluate, data_parallel(failing_step, LAYOUT, seed=3))

    def failing_evaluate(state, done):
        raise RuntimeError("the evaluation failed")

    with pytest.raises(RuntimeError, match="the evaluation failed"):
        _run(tmp_path, "c", failing_evaluate)
