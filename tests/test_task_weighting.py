"""Task weighting moves the weights the right way when one task's gradient is 10x larger.

Toy problem: a shared parameter ``theta`` (the "last shared layer"), task losses
``L_1 = |theta - a|^2 + 4`` and ``L_2 = 10 (|theta - b|^2 + 4)`` (the constant: irreducible noise): task 2's loss and gradient are
10x larger for the same error. A balanced method must give task 2 the smaller weight.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxfood.train import task_weighting as tw

TASKS2 = ("first", "second")
A = jnp.array([1.0, 0.0, 0.0, 0.0])
B = jnp.array([-1.0, 0.0, 0.0, 0.0])


def toy_losses(theta):
    return jnp.stack([jnp.sum((theta - A) ** 2) + 4.0, 10.0 * (jnp.sum((theta - B) ** 2) + 4.0)])


def test_uncertainty_weighting_downweights_the_large_task_and_removes_the_scale():
    cfg = tw.WeightingConfig(method="uncertainty", static_weights={}, log_variance_bounds=(-10.0, 10.0))
    wparams, _ = tw.init_weighting(cfg, TASKS2)
    params = {"theta": jnp.zeros(4), "w": wparams}
    opt = optax.adam(0.05)
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        def total(p):
            return tw.weighted_total(cfg, toy_losses(p["theta"]), p["w"], TASKS2)

        grads = jax.grad(total)(params)
        updates, state = opt.update(grads, state)
        return optax.apply_updates(params, updates), state

    w0 = np.asarray(tw.task_weights(cfg, params["w"], TASKS2))
    for _ in range(600):
        params, state = step(params, state)
    w = np.asarray(tw.task_weights(cfg, params["w"], TASKS2))
    assert w0[0] == w0[1]
    assert w[1] < w0[1] and w[1] < w[0]
    # Kendall et al.: sigma_t^2 -> L_t, so the weight ratio approaches L_1 / L_2 ~ 1/10 ...
    assert 0.05 < w[1] / w[0] < 0.2
    # ... and theta settles between the tasks instead of being dragged to b, as static weights do
    # (static optimum: theta = (a + 10 b) / 11 = -0.82).
    assert abs(float(params["theta"][0])) < 0.2


def test_uncertainty_uses_the_classification_form_for_cross_entropy():
    cfg = tw.WeightingConfig(method="uncertainty")
    params = {"log_vars": jnp.array([0.4, 0.4, 0.4])}
    losses = jnp.array([2.0, 3.0, 5.0])
    w = np.exp(-0.4)
    expected = w * 2.0 + 0.5 * w * 3.0 + w * 5.0 + 3 * 0.5 * 0.4  # nutrition is the regression form
    assert float(tw.weighted_total(cfg, losses, params)) == pytest.approx(expected, rel=1e-6)


def test_gradnorm_downweights_the_task_with_the_larger_gradient():
    cfg = tw.WeightingConfig(method="gradnorm", static_weights={"first": 1.0, "second": 1.0}, gradnorm_alpha=1.5)
    wparams, wstate = tw.init_weighting(cfg, TASKS2)
    theta = jnp.zeros(4) + 0.3
    opt_theta, opt_w = optax.sgd(0.002), optax.adam(0.02)
    s_theta, s_w = opt_theta.init(theta), opt_w.init(wparams)

    @jax.jit
    def step(theta, wparams, wstate, s_theta, s_w):
        losses = toy_losses(theta)
        per_task = jax.jacrev(toy_losses)(theta)               # [T, 4] gradients on the shared layer
        norms = jnp.linalg.norm(per_task, axis=1)
        wstate = tw.update_state(wstate, losses)
        g_w, stats = tw.gradnorm_gradient(cfg, wparams, wstate, losses, norms)
        g_theta = jax.grad(lambda t: tw.weighted_total(cfg, toy_losses(t), wparams, TASKS2))(theta)
        u, s_theta = opt_theta.update(g_theta, s_theta)
        theta = optax.apply_updates(theta, u)
        u, s_w = opt_w.update({"weights": g_w}, s_w)
        wparams = tw.renormalise(cfg, optax.apply_updates(wparams, u))
        return theta, wparams, wstate, s_theta, s_w, wparams["weights"] * norms

    for _ in range(300):
        theta, wparams, wstate, s_theta, s_w, weighted_norms = step(theta, wparams, wstate, s_theta, s_w)
    w = np.asarray(wparams["weights"])
    assert w[1] < 0.5 < 1.5 < w[0]                       # moved the right way, and far
    assert w.sum() == pytest.approx(2.0, rel=1e-5)       # renormalised to the number of tasks
    g = np.asarray(weighted_norms)
    assert g.max() / g.min() < 3.0                       # weighted gradient norms brought together (10x before)


def test_static_weights_reject_unknown_tasks():
    from jaxfood.errors import ConfigError

    with pytest.raises(ConfigError, match="static_weights"):
        tw.init_weighting(tw.WeightingConfig(method="static", static_weights={"nope": 1.0}))
