"""Each task loss against a value computed by hand (or by a few lines of plain numpy)."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

from jaxfood.train.food_classification import cross_entropy_loss
from jaxfood.train.nutrition_alignment import (
    nutrient_mse_loss,
    nutrient_triplet_masks,
    semi_hard_triplet_loss,
)
from jaxfood.train.salient_molecules import (
    attention_entropy,
    comprehensiveness_loss,
    segment_topk_mask,
    straight_through_topk,
    sufficiency_loss,
)


def test_cross_entropy_plain_smoothed_and_weighted_against_hand_values():
    logits = jnp.array([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [5.0, 5.0, 5.0]])
    labels = jnp.array([0, 2, 1])
    lse0 = math.log(math.exp(2) + 2)          # log-sum-exp of row 0
    lse1 = math.log(2 + math.e)               # row 1
    ce = [lse0 - 2.0, lse1 - 0.0, math.log(3)]
    assert float(cross_entropy_loss(logits, labels)) == pytest.approx(np.mean(ce), rel=1e-6)

    # Only the masked-in samples count; -1 labels never count.
    mask = jnp.array([True, False, True])
    assert float(cross_entropy_loss(logits, labels, mask)) == pytest.approx((ce[0] + ce[2]) / 2, rel=1e-6)
    assert float(cross_entropy_loss(logits, jnp.array([0, -1, 1]))) == pytest.approx((ce[0] + ce[2]) / 2, rel=1e-6)

    # Label smoothing eps: target (1 - eps) onehot + eps / C (PyTorch's convention).
    eps = 0.3
    logp0 = np.array([2.0, 0.0, 0.0]) - lse0
    smoothed0 = -((1 - eps) * logp0[0] + eps / 3 * logp0.sum())
    got = float(cross_entropy_loss(logits[:1], labels[:1], label_smoothing=eps))
    assert got == pytest.approx(smoothed0, rel=1e-6)

    # Class weights: weighted mean sum_i w_{y_i} CE_i / sum_i w_{y_i}.
    w = jnp.array([1.0, 3.0, 0.5])
    expected = (1.0 * ce[0] + 0.5 * ce[1] + 3.0 * ce[2]) / (1.0 + 0.5 + 3.0)
    assert float(cross_entropy_loss(logits, labels, class_weights=w)) == pytest.approx(expected, rel=1e-6)


def test_triplet_masks_from_nutrient_profiles():
    profiles = np.array([[0.0, 0.0], [1.0, 0.0], [5.0, 0.0], [5.0, 1.5]])
    pos, neg = nutrient_triplet_masks(profiles, num_positives=1)
    # Nearest food of each: 0->1, 1->0, 2->3, 3->2.
    np.testing.assert_array_equal(np.argwhere(pos), [[0, 1], [1, 0], [2, 3], [3, 2]])
    assert not np.any(np.diag(neg)) and not np.any(pos & neg)
    assert neg.sum() == 4 * 2


def test_semi_hard_triplet_loss_against_hand_computed_value():
    # Unit vectors on a circle (normalisation leaves them as they are).
    angles = np.array([0.0, 0.3, 1.2, 2.0])
    emb = np.stack([np.cos(angles), np.sin(angles)], 1)
    d = np.sqrt(np.maximum(((emb[:, None] - emb[None]) ** 2).sum(-1), 0.0))
    pos = np.zeros((4, 4), bool)
    pos[0, 1] = pos[2, 3] = True
    neg = ~pos & ~np.eye(4, dtype=bool)
    neg[1, 0] = neg[3, 2] = False
    margin = 0.5
    # Pair (0, 1): negatives 2, 3 both farther than d01 -> semi-hard = the closer one (2).
    h01 = max(d[0, 1] - d[0, 2] + margin, 0.0)
    # Pair (2, 3): negatives 0 and 1: d20 = 1.2 chord, d21, d23; semi-hard among those > d23.
    outside = [d[2, n] for n in (0, 1) if d[2, n] > d[2, 3]]
    chosen = min(outside) if outside else max(d[2, 0], d[2, 1])
    h23 = max(d[2, 3] - chosen + margin, 0.0)
    expected = (h01 + h23) / 2
    got = float(semi_hard_triplet_loss(jnp.asarray(emb), pos, neg, margin=margin))
    assert got == pytest.approx(expected, rel=1e-5)

    # No semi-hard negative: falls back to the farthest negative (TF Addons' convention).
    pos2 = np.zeros((4, 4), bool)
    pos2[0, 3] = True
    neg2 = np.zeros((4, 4), bool)
    neg2[0, 1] = neg2[0, 2] = True
    expected2 = max(d[0, 3] - max(d[0, 1], d[0, 2]) + margin, 0.0)
    assert float(semi_hard_triplet_loss(jnp.asarray(emb), pos2, neg2, margin=margin)) == pytest.approx(expected2, rel=1e-5)


def test_nutrient_mse_against_hand_value():
    pred = jnp.array([[1.0, 2.0], [0.0, 0.0], [3.0, 3.0]])
    target = jnp.array([[0.0, 0.0], [1.0, 1.0], [3.0, 1.0]])
    assert float(nutrient_mse_loss(pred, target)) == pytest.approx(((1 + 4) / 2 + 1 + 2) / 3, rel=1e-6)
    mask = jnp.array([True, False, True])
    assert float(nutrient_mse_loss(pred, target, mask)) == pytest.approx((2.5 + 2.0) / 2, rel=1e-6)


def test_sufficiency_kl_and_attention_entropy_against_hand_values():
    full = jnp.array([[0.0, math.log(3.0)], [0.0, 0.0]])      # p = (1/4, 3/4), (1/2, 1/2)
    topk = jnp.array([[0.0, 0.0], [math.log(4.0), 0.0]])      # q = (1/2, 1/2), (4/5, 1/5)
    kl0 = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    kl1 = 0.5 * math.log(0.5 / 0.8) + 0.5 * math.log(0.5 / 0.2)
    assert float(sufficiency_loss(full, topk)) == pytest.approx((kl0 + kl1) / 2, rel=1e-5)
    assert float(sufficiency_loss(full, topk, jnp.array([False, True]))) == pytest.approx(kl1, rel=1e-5)

    # Sample 0 has weights (0.5, 0.25, 0.25), sample 1 (1.0) (fewer than 2 edges: not counted).
    weights = jnp.array([0.5, 0.25, 0.25, 1.0])
    seg = jnp.array([0, 0, 0, 1])
    h0 = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25)) / math.log(3)
    assert float(attention_entropy(weights, seg, 2)) == pytest.approx(h0, rel=1e-5)


def test_comprehensiveness_is_the_true_food_probability_without_the_top_k():
    removed = jnp.array([[0.0, math.log(3.0)], [0.0, 0.0], [5.0, 0.0]])   # p = (1/4, 3/4), (1/2, 1/2), ...
    labels = jnp.array([1, 0, -1])
    assert float(comprehensiveness_loss(removed, labels, jnp.array([True, True, True]))) == pytest.approx(
        (0.75 + 0.5) / 2, rel=1e-6)  # the unknown food (-1) does not count
    assert float(comprehensiveness_loss(removed, labels, jnp.array([False, True, True]))) == pytest.approx(0.5)


def test_top_k_mask_and_straight_through_gate():
    scores = jnp.array([0.1, 0.9, 0.5, 0.3, 2.0, -1.0, 0.0])
    seg = jnp.array([0, 0, 0, 0, 1, 1, 1])
    mask = segment_topk_mask(scores, seg, 2, 2)
    np.testing.assert_array_equal(np.asarray(mask), [False, True, True, False, True, False, True])
    gate = straight_through_topk(scores, mask, seg, 2, temperature=0.1)
    np.testing.assert_allclose(np.asarray(gate), np.asarray(mask, np.float32), atol=1e-6)  # hard forward


@pytest.mark.parametrize("num_present", [3, 2])
def test_fitted_start_predicts_what_the_logistic_regression_baseline_predicts(num_present):
    """``fit_logistic_regression`` on standardised features gives the probabilities of the
    baseline (:func:`jaxfood.eval.baselines.logreg_baseline`), for many classes and for
    scikit-learn's binary form; a class without training rows gets probability ~0, as there."""
    from jaxfood.eval.baselines import logreg_baseline
    from jaxfood.train.food_classification import fit_logistic_regression

    rng = np.random.default_rng(num_present)
    n, d, c = 120, 8, 4
    centers = rng.normal(0, 1.5, (c, d))
    y = rng.integers(0, num_present, n)  # class 3 (and 2) never seen in training
    x = centers[y] + rng.normal(0, 1.0, (n, d))
    train = np.arange(n) < 90
    # standardised on the training rows, as the model's profile is (the baseline's scaler is then the identity)
    x = (x - x[train].mean(0)) / x[train].std(0)
    y_test = np.where(train, -1, y)
    kernel, bias = fit_logistic_regression(x, np.where(train, y, -1), train, c)
    logits = x @ kernel + bias
    proba = np.exp(logits - logits.max(1, keepdims=True))
    proba /= proba.sum(1, keepdims=True)
    want = logreg_baseline(x[train], y[train], x[~train], y_test[~train], n_classes=c)["proba"]
    np.testing.assert_allclose(proba[~train], want, atol=1e-5)
    assert np.all(proba[:, num_present:] < 1e-10) and np.all(kernel[:, num_present:] == 0)
    assert 0.3 < float(np.mean(np.argmax(proba[~train], 1) == y[~train]))  # a fit, not a constant
