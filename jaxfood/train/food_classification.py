"""Food classification loss: cross-entropy with optional label smoothing and class weights.

Conventions follow ``torch.nn.functional.cross_entropy``: with label smoothing ``eps`` the target
is ``(1 - eps) * onehot + eps / num_classes``; with class weights the mean is weighted,
``sum_i w_{y_i} CE_i / sum_i w_{y_i}`` (over the supervised samples only).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def cross_entropy_loss(logits, labels, mask=None, label_smoothing: float = 0.0, class_weights=None):
    """Mean cross-entropy over the samples in ``mask``.

    Args:
      logits: [B, C] food logits.
      labels: [B] int food index (entries outside ``mask`` may be -1).
      mask: [B] bool, samples that count (default: all with ``labels >= 0``).
      label_smoothing: ``eps`` in [0, 1).
      class_weights: optional [C] weight per class.

    Returns a scalar; 0 when no sample is selected.
    """
    num_classes = logits.shape[-1]
    labels = jnp.asarray(labels)
    valid = labels >= 0
    mask = valid if mask is None else (jnp.asarray(mask) & valid)
    safe = jnp.where(valid, labels, 0)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    target = jax.nn.one_hot(safe, num_classes, dtype=jnp.float32)
    if label_smoothing:
        target = (1.0 - label_smoothing) * target + label_smoothing / num_classes
    per_sample = -jnp.sum(target * log_probs, axis=-1)
    weight = mask.astype(jnp.float32)
    if class_weights is not None:
        weight = weight * jnp.asarray(class_weights, jnp.float32)[safe]
    return jnp.sum(weight * per_sample) / jnp.maximum(jnp.sum(weight), 1e-12)


def accuracy(logits, labels, mask=None):
    """Fraction of the samples in ``mask`` whose arg-max logit is their label: [B, C], [B] -> scalar."""
    labels = jnp.asarray(labels)
    valid = labels >= 0
    mask = valid if mask is None else (jnp.asarray(mask) & valid)
    hit = (jnp.argmax(logits, -1) == labels) & mask
    return jnp.sum(hit) / jnp.maximum(jnp.sum(mask), 1)


def fit_linear_classifier(features, labels, mask, num_classes: int, l2: float, label_smoothing: float = 0.0,
                          steps: int = 300, learning_rate: float = 0.05, intercept: bool = True):
    """``(W [D, C], b [C])`` minimising ``cross_entropy(features @ W + b) + l2 * ||W||^2`` over the
    samples in ``mask`` (full batch, Adam, a convex problem: the multinomial logistic regression;
    the intercept ``b`` is not penalised, as in scikit-learn, and stays 0 without ``intercept``).
    ``features`` [S, D], ``labels`` [S] (-1 = unknown), ``mask`` [S] bool."""
    features = jnp.asarray(features, jnp.float32)

    def objective(params):
        kernel, bias = params
        logits = features @ kernel + (bias if intercept else 0.0)
        return cross_entropy_loss(logits, labels, mask, label_smoothing) + l2 * jnp.sum(kernel * kernel)

    tx = optax.adam(learning_rate)
    params = (jnp.zeros((features.shape[1], num_classes), jnp.float32), jnp.zeros((num_classes,), jnp.float32))

    def body(_, carry):
        params, opt_state = carry
        grads = jax.grad(objective)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    (kernel, bias), _ = jax.lax.fori_loop(0, steps, body, (params, tx.init(params)))
    return kernel, (bias - jnp.mean(bias)) if intercept else bias
