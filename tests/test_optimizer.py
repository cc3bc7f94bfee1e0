"""The fine-tuning optimizer's schedules against optax's, and freezing as state (one program)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxfood.train.optimizer import (
    GroupConfig,
    OptimizerConfig,
    flat,
    group_rate,
    make_optimizer,
    schedule_value,
)


def _optax_schedule(group: GroupConfig, span: int):
    lr = group.learning_rate
    if group.schedule == "constant":
        return optax.constant_schedule(lr)
    if group.schedule == "cosine":
        return optax.cosine_decay_schedule(lr, span, alpha=group.end_factor)
    if group.schedule == "linear":
        return optax.linear_schedule(lr, lr * group.end_factor, span)
    warm = min(group.warmup_steps, span - 1) if group.warmup_steps > 0 else 0
    if warm == 0:
        warm = max(1, span // 10) if span > 1 else 0
    return optax.warmup_cosine_decay_schedule(0.1 * lr, lr, warm, span, end_value=lr * group.end_factor)


@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear", "warmup_cosine"])
@pytest.mark.parametrize("span,warmup", [(1, 0), (2, 0), (37, 0), (150, 0), (150, 7), (5, 9)])
def test_schedules_equal_optax(schedule, span, warmup):
    group = GroupConfig(learning_rate=2e-3, schedule=schedule, warmup_steps=warmup, end_factor=0.1)
    reference = _optax_schedule(group, span)
    counts = np.arange(span + 3)
    want = np.array([float(reference(c)) for c in counts])
    traced = jax.jit(lambda c, s: schedule_value(group, c, s))(jnp.asarray(counts), jnp.int32(span))
    np.testing.assert_allclose(np.asarray(traced), want, rtol=2e-6, atol=1e-12)
    host = schedule_value(group, counts, span, xp=np)
    np.testing.assert_allclose(host, want, rtol=2e-6, atol=1e-12)


def test_frozen_steps_shift_the_schedule_to_the_unfrozen_part():
    group = GroupConfig(learning_rate=1e-2, schedule="warmup_cosine")
    total, frozen = 40, 15
    reference = _optax_schedule(group, total - frozen)
    rates = [float(group_rate(group, total, c, frozen, xp=np)) for c in range(total)]
    assert rates[:frozen] == [0.0] * frozen
    np.testing.assert_allclose(rates[frozen:], [float(reference(c)) for c in range(total - frozen)], rtol=2e-6)


def test_freezing_is_state_one_program_for_every_number_of_frozen_steps():
    params = {"encoder": {"w": jnp.ones((3,))}, "classifier": {"w": jnp.ones((2,))}}
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    programs, moved = [], []
    for frozen in (0, 4):
        tx, schedules = make_optimizer(OptimizerConfig(freeze_encoder_steps=frozen), 4)
        state = tx.init(params)
        update = jax.jit(tx.update)
        programs.append(update.lower(grads, state, params).as_text())
        updates, _ = update(grads, state, params)
        moved.append(float(jnp.abs(updates["encoder"]["w"]).sum()))
        assert schedules["encoder"](0) == (0.0 if frozen else pytest.approx(2e-4))
        assert schedules["classifier"](0) == pytest.approx(5e-3)
    assert programs[0] == programs[1]
    assert moved[0] > 0 and moved[1] == 0.0


def test_flat_gives_the_updates_of_the_transformation_on_the_tree():
    # AdamW after clipping by the global norm, over three steps, on leaves of several shapes; a
    # multi_transform group without leaves (all masked) works too.
    rng = np.random.default_rng(0)
    params = {"a": jnp.asarray(rng.normal(size=(3, 4)), jnp.float32), "b": {"c": jnp.asarray(rng.normal(size=5), jnp.float32),
              "d": jnp.asarray(rng.normal(size=()), jnp.float32)}}

    def inner():
        return optax.chain(optax.clip_by_global_norm(0.5), optax.adamw(0.1, weight_decay=0.01))

    txs = {"tree": optax.multi_transform({"x": inner(), "empty": inner()}, lambda p: jax.tree.map(lambda _: "x", p)),
           "flat": optax.multi_transform({"x": flat(inner()), "empty": flat(inner())},
                                         lambda p: jax.tree.map(lambda _: "x", p))}
    out = {}
    for name, tx in txs.items():
        p, state = params, tx.init(params)
        # orbax cannot save arrays of size 0 (the empty group's state has none)
        assert all(np.size(x) > 0 for x in jax.tree.leaves(state)), name
        for k in range(3):
            grads = jax.tree.map(lambda x, k=k: jnp.cos(x * (k + 1)) * 3.0, p)
            updates, state = tx.update(grads, state, p)
            p = optax.apply_updates(p, updates)
        out[name] = p
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), out["tree"], params)
    assert min(jax.tree.leaves(moved)) > 1e-3  # the steps did move every leaf
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), out["flat"], out["tree"])
    assert [x.shape for x in jax.tree.leaves(out["flat"])] == [x.shape for x in jax.tree.leaves(params)]
