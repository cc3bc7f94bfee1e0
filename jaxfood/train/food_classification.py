"""Food classification loss: cross-entropy with optional label smoothing and class weights.

Conventions follow ``torch.nn.functional.cross_entropy``: with label smoothing ``eps`` the target
is ``(1 - eps) * onehot + eps / num_classes``; with class weights the mean is weighted,
``sum_i w_{y_i} CE_i / sum_i w_{y_i}`` (over the supervised samples only).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


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


#: Below the lowest fitted intercept: the logit bias of a food without training samples in
#: :func:`fit_logistic_regression` (the baseline gives such foods probability 0; exp(-30) ~ 1e-13).
ABSENT_CLASS_GAP = 30.0


def fit_logistic_regression(features, labels, mask, num_classes: int, C: float = 1.0):
    """``(W [D, C], b [C])`` numpy float32: scikit-learn's ``LogisticRegression(C=C, max_iter=500)``
    (multinomial, L2 on ``W``, unpenalised intercept, lbfgs with its default tolerance) on the rows
    of ``features`` [S, D] in ``mask`` [S] with ``labels`` [S] -- the logistic-regression baseline
    of :mod:`jaxfood.eval.baselines`, fitted the same way, so that a classifier starting at it
    predicts what the baseline predicts. Classes without a training row get ``W = 0`` and a bias
    :data:`ABSENT_CLASS_GAP` below the lowest fitted one; with one class only, ``W = 0, b = 0``."""
    from sklearn.linear_model import LogisticRegression  # 2 s to import: only when a fit is asked for

    x = np.asarray(features, np.float64)
    y = np.asarray(labels)
    rows = np.asarray(mask, bool) & (y >= 0)
    kernel = np.zeros((x.shape[1], num_classes), np.float32)
    bias = np.zeros((num_classes,), np.float32)
    classes = np.unique(y[rows])
    if classes.size < 2:
        return kernel, bias
    fit = LogisticRegression(C=C, max_iter=500).fit(x[rows], y[rows])
    coef, intercept = fit.coef_, fit.intercept_
    if classes.size == 2:  # scikit-learn's binary form: one logit, for the second class
        coef, intercept = np.stack([-coef[0] / 2, coef[0] / 2]), np.array([-intercept[0] / 2, intercept[0] / 2])
    kernel[:, classes] = coef.T
    bias[:] = intercept.min() - ABSENT_CLASS_GAP
    bias[classes] = intercept
    return kernel, bias
