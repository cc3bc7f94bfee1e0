"""Nutrition alignment: a triplet loss that makes Food embeddings follow nutritional similarity, and
an MSE loss for the head that estimates a sample's nutrient profile.

Triplets (Schroff, Kalenichenko & Philbin, "FaceNet", CVPR 2015): for anchor food ``a`` the
positives are its ``num_positives`` nearest foods by nutrient profile (Euclidean distance of the
normalised ``graph.food_nutrients``), the negatives all other foods. Semi-hard mining: for each
(anchor, positive) pair the negative is the closest one farther than the positive
(``d_an > d_ap``); where none exists, the farthest negative (the convention of TensorFlow Addons'
``triplet_semihard_loss``). Loss ``mean_{(a,p)} max(d_ap - d_an + margin, 0)`` with Euclidean
distances between L2-normalised projections.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def nutrient_distances(food_nutrients) -> np.ndarray:
    """[F, F] Euclidean distances between nutrient profiles ``food_nutrients`` [F, N]."""
    x = np.asarray(food_nutrients, np.float64)
    sq = np.sum(x * x, 1)
    d2 = np.maximum(sq[:, None] + sq[None, :] - 2.0 * x @ x.T, 0.0)
    return np.sqrt(d2)


def nutrient_triplet_masks(food_nutrients, num_positives: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """``(positive [F, F] bool, negative [F, F] bool)`` from nutrient-profile similarity.

    ``positive[a, p]``: ``p`` is among the ``num_positives`` foods nearest to ``a`` (ties broken by
    index, ``a`` itself excluded); ``negative[a, n]``: any other food but ``a``.
    """
    dist = nutrient_distances(food_nutrients)
    num_foods = dist.shape[0]
    k = int(min(max(num_positives, 0), max(num_foods - 1, 0)))
    np.fill_diagonal(dist, np.inf)
    order = np.argsort(dist, axis=1, kind="stable")[:, :k]
    positive = np.zeros((num_foods, num_foods), bool)
    positive[np.arange(num_foods)[:, None], order] = True
    negative = ~positive & ~np.eye(num_foods, dtype=bool)
    return positive, negative


def pairwise_distances(embeddings, normalize: bool = True):
    """[F, D] -> [F, F] Euclidean distances (of L2-normalised rows when ``normalize``)."""
    x = embeddings.astype(jnp.float32)
    if normalize:
        x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
    sq = jnp.sum(x * x, -1)
    d2 = jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * x @ x.T, 0.0)
    # sqrt has an infinite derivative at 0 (the diagonal, duplicates): guard it.
    safe = jnp.where(d2 > 1e-12, d2, 1.0)
    return jnp.where(d2 > 1e-12, jnp.sqrt(safe), 0.0)


def semi_hard_triplet_loss(embeddings, positive_mask, negative_mask, margin: float = 0.2,
                           normalize: bool = True, valid=None):
    """Semi-hard triplet loss over all (anchor, positive) pairs.

    Args:
      embeddings: [F, D] food projections.
      positive_mask, negative_mask: [F, F] bool (see :func:`nutrient_triplet_masks`).
      margin: triplet margin.
      valid: optional [F] bool, foods that take part (padding in sampled subgraphs).

    Returns the mean hinge over pairs that have at least one negative; 0 when there is none.
    """
    dist = pairwise_distances(embeddings, normalize)
    pos = jnp.asarray(positive_mask)
    neg = jnp.asarray(negative_mask)
    if valid is not None:
        valid = jnp.asarray(valid)
        both = valid[:, None] & valid[None, :]
        pos, neg = pos & both, neg & both
    d_ap = dist[:, :, None]  # [a, p, 1]
    d_an = dist[:, None, :]  # [a, 1, n]
    neg3 = neg[:, None, :]
    outside = neg3 & (d_an > d_ap)
    big = jnp.float32(1e9)
    semi_hard = jnp.min(jnp.where(outside, d_an, big), axis=-1)          # closest farther negative
    hardest_fallback = jnp.max(jnp.where(neg3, d_an, -big), axis=-1)     # farthest negative
    has_outside = jnp.any(outside, axis=-1)
    chosen = jnp.where(has_outside, semi_hard, hardest_fallback)
    has_neg = jnp.any(neg, axis=-1)[:, None]
    pair = pos & has_neg
    hinge = jnp.maximum(dist - chosen + margin, 0.0)
    count = jnp.sum(pair)
    return jnp.sum(jnp.where(pair, hinge, 0.0)) / jnp.maximum(count, 1)


def nutrient_mse_loss(predicted, target, mask=None):
    """Mean squared error over samples in ``mask`` and all nutrients: [B, N], [B, N], [B] -> scalar."""
    err = jnp.square(predicted.astype(jnp.float32) - target.astype(jnp.float32))
    per_sample = jnp.mean(err, axis=-1)
    if mask is None:
        return jnp.mean(per_sample)
    w = jnp.asarray(mask).astype(jnp.float32)
    return jnp.sum(w * per_sample) / jnp.maximum(jnp.sum(w), 1.0)
