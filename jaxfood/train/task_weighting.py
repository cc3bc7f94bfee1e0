"""Balancing the task losses: static weights, uncertainty weighting, GradNorm.

* ``static`` -- ``L = sum_t w_t L_t`` with fixed ``w_t``.
* ``uncertainty`` -- Kendall, Gal & Cipolla, "Multi-Task Learning Using Uncertainty to Weigh Losses
  for Scene Geometry and Semantics", CVPR 2018. A learned log-variance ``s_t = log sigma_t^2`` per
  task; regression tasks contribute ``0.5 exp(-s_t) L_t + 0.5 s_t``, classification tasks (the
  cross-entropy form, their eq. 10 with the approximation of eq. 12) ``exp(-s_t) L_t + 0.5 s_t``.
  The task weight is the multiplier of ``L_t``.
* ``gradnorm`` -- Chen, Badrinarayanan, Lee & Rabinovich, "GradNorm: Gradient Normalization for
  Adaptive Loss Balancing in Deep Multitask Networks", ICML 2018. Weights ``w_t`` are parameters;
  ``G_t = ||grad_W w_t L_t||`` on the last shared layer ``W``; relative inverse training rate
  ``r_t = (L_t / L_t(0)) / mean_j(L_j / L_j(0))``; the weights follow the gradient of
  ``sum_t |G_t - mean(G) r_t^alpha|`` (the target held constant) and are renormalised to sum to
  the number of tasks after every update.

The learnable part (``log_vars`` or ``weights``) lives in the training params under
``"task_weighting"`` so the optimizer updates it with its own learning rate; the state
(``initial_losses`` of GradNorm) is a separate pytree. Everything is a pure function.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp

from jaxfood.errors import ConfigError

TASKS: tuple[str, ...] = ("food_classification", "nutrition", "salient_molecules")
#: Which form of uncertainty weighting each task uses.
TASK_KINDS: dict[str, str] = {"food_classification": "classification", "nutrition": "regression",
                              "salient_molecules": "classification"}


@dataclasses.dataclass(frozen=True)
class WeightingConfig:
    """How task losses are combined.

    ``method``: static | uncertainty | gradnorm (static by default: on the embedded data it gave the
    best food classification in 150 steps; uncertainty weighting settles the cross-entropy at a
    weight of ~0.25, GradNorm drives the nutrition weight towards 0). ``static_weights``: task -> weight (static; also
    the starting weights of gradnorm, renormalised). ``gradnorm_alpha``: restoring-force strength.
    ``initial_log_variance``: start value of the uncertainty log-variances;
    ``log_variance_bounds``: they are clipped to this range -- a loss that can reach ~0 (the
    sufficiency KL) would otherwise drive its weight ``exp(-s)`` without bound.
    """

    method: Literal["static", "uncertainty", "gradnorm"] = "static"
    static_weights: dict[str, float] = dataclasses.field(
        default_factory=lambda: {"food_classification": 1.0, "nutrition": 1.0, "salient_molecules": 1.0})
    gradnorm_alpha: float = 1.5
    initial_log_variance: float = 0.0
    log_variance_bounds: tuple[float, float] = (-1.0, 3.0)


def _static_vector(cfg: WeightingConfig, tasks: Sequence[str]):
    unknown = set(cfg.static_weights) - set(tasks)
    if unknown:
        raise ConfigError(f"weighting.static_weights: unknown task(s) {sorted(unknown)} (expected {list(tasks)})")
    return jnp.asarray([float(cfg.static_weights.get(t, 1.0)) for t in tasks], jnp.float32)


def init_weighting(cfg: WeightingConfig, tasks: Sequence[str] = TASKS) -> tuple[dict, dict]:
    """``(params, state)`` of the weighting: params are trained by the optimizer."""
    T = len(tasks)
    if cfg.method == "uncertainty":
        params = {"log_vars": jnp.full((T,), cfg.initial_log_variance, jnp.float32)}
    elif cfg.method == "gradnorm":
        w = _static_vector(cfg, tasks)
        params = {"weights": w * T / jnp.sum(w)}
    else:
        _static_vector(cfg, tasks)
        params = {}
    state = {"initial_losses": jnp.zeros((T,), jnp.float32), "initialised": jnp.zeros((), bool)}
    return params, state


def _log_vars(cfg: WeightingConfig, params: Mapping[str, Any]):
    low, high = cfg.log_variance_bounds
    return jnp.clip(params["log_vars"], low, high)


def task_weights(cfg: WeightingConfig, params: Mapping[str, Any], tasks: Sequence[str] = TASKS):
    """[T] effective multiplier of each task loss."""
    if cfg.method == "uncertainty":
        scale = jnp.asarray([1.0 if TASK_KINDS.get(t) == "classification" else 0.5 for t in tasks])
        return scale * jnp.exp(-_log_vars(cfg, params))
    if cfg.method == "gradnorm":
        return params["weights"]
    return _static_vector(cfg, tasks)


def weighted_total(cfg: WeightingConfig, losses, params: Mapping[str, Any], tasks: Sequence[str] = TASKS):
    """Balanced total loss, differentiable in ``losses`` [T] and in the weighting ``params``.

    GradNorm weights enter with a stop-gradient: they are trained by :func:`gradnorm_gradient`.
    """
    if cfg.method == "uncertainty":
        return jnp.sum(task_weights(cfg, params, tasks) * losses + 0.5 * _log_vars(cfg, params))
    if cfg.method == "gradnorm":
        return jnp.sum(jax.lax.stop_gradient(params["weights"]) * losses)
    return jnp.sum(_static_vector(cfg, tasks) * losses)


def update_state(state: Mapping[str, Any], losses) -> dict:
    """Records the first step's losses as ``L_t(0)`` (GradNorm's reference)."""
    initialised = state["initialised"]
    initial = jnp.where(initialised, state["initial_losses"], jax.lax.stop_gradient(losses))
    return {"initial_losses": initial, "initialised": jnp.ones((), bool)}


def gradnorm_gradient(cfg: WeightingConfig, params: Mapping[str, Any], state: Mapping[str, Any], losses,
                      shared_grad_norms):
    """Gradient of GradNorm's loss with respect to the task weights.

    Args:
      losses: [T] current task losses; ``state["initial_losses"]`` must already hold ``L_t(0)``.
      shared_grad_norms: [T] ``||grad_W L_t||`` of the *unweighted* losses on the last shared layer.

    Returns ``(grad [T], stats)`` with stats ``{"gradnorm_loss", "inverse_rate" [T], "target" [T]}``.
    """
    weights = params["weights"]
    initial = jnp.where(state["initial_losses"] > 0, state["initial_losses"], 1.0)
    ratio = losses / initial
    inverse_rate = ratio / jnp.maximum(jnp.mean(ratio), 1e-12)

    def gradnorm_loss(w):
        g = w * shared_grad_norms
        target = jax.lax.stop_gradient(jnp.mean(g) * inverse_rate ** cfg.gradnorm_alpha)
        return jnp.sum(jnp.abs(g - target)), target

    (value, target), grad = jax.value_and_grad(gradnorm_loss, has_aux=True)(weights)
    return grad, {"gradnorm_loss": value, "inverse_rate": inverse_rate, "target": target}


def renormalise(cfg: WeightingConfig, params: Mapping[str, Any]) -> dict:
    """Projection after each optimizer update: GradNorm weights positive and summing to the number
    of tasks; uncertainty log-variances back inside ``log_variance_bounds``."""
    if cfg.method == "gradnorm":
        w = jnp.maximum(params["weights"], 1e-3)
        return {**params, "weights": w * w.shape[0] / jnp.sum(w)}
    if cfg.method == "uncertainty":
        return {**params, "log_vars": _log_vars(cfg, params)}
    return dict(params)
