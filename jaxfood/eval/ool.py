"""Out-of-library scores of samples: how unlike every food the model was trained on a sample
looks (see :mod:`jaxfood.eval.predict` for how ``jaxfood predict`` calibrates and reports them).

``mahalanobis`` (default; Lee et al., NeurIPS 2018): squared Mahalanobis distance of the Sample
embedding to the nearest food, one Gaussian per food with a shared Ledoit-Wolf covariance;
``msp``: 1 - max softmax probability (Hendrycks & Gimpel, ICLR 2017); ``energy``:
-logsumexp(logits) (Liu et al., NeurIPS 2020); ``knn``: cosine distance to the k-th nearest
training sample (Sun et al., ICML 2022). Numpy only.
"""

from __future__ import annotations

import numpy as np

from jaxfood.graph import schema

#: Out-of-library scores: name -> description (the first is the default).
OOL_SCORES = {
    "mahalanobis": "Mahalanobis distance of the Sample embedding to the nearest food (shared covariance)",
    "msp": "1 - max softmax probability",
    "energy": "negative free energy -logsumexp(logits)",
    "knn": "cosine distance of the Sample embedding to the 5th nearest training sample",
}
DEFAULT_OOL_SCORE = "mahalanobis"


def softmax(logits):
    """[..., F] logits -> probabilities (float64, max-shifted)."""
    z = np.asarray(logits, np.float64)
    z = np.exp(z - z.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def ool_scores(logits) -> np.ndarray:
    """[n, F] logits -> [n] out-of-library score ``1 - max softmax probability``."""
    return 1.0 - softmax(logits).max(-1)


def energy_scores(logits) -> np.ndarray:
    """[n, F] -> [n] negative free energy ``-logsumexp(logits)`` (Liu et al., NeurIPS 2020); higher =
    more out-of-library. Reported by :func:`jaxfood.eval.predict.out_of_library_rates` for comparison."""
    z = np.asarray(logits, np.float64)
    m = z.max(-1)
    return -(m + np.log(np.exp(z - m[:, None]).sum(-1)))


def knn_distance_scores(features, reference, k: int = 5) -> np.ndarray:
    """[n, d], [r, d] -> [n] cosine distance to the k-th nearest ``reference`` row (Sun et al., ICML
    2022, deep nearest neighbours; a sample's distance to itself, if in ``reference``, is skipped
    by taking the (k+1)-th when it is 0)."""
    def unit(x):
        x = np.asarray(x, np.float64)
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    d = 1.0 - unit(features) @ unit(reference).T
    d = np.sort(d, axis=1)
    k = min(k, d.shape[1] - 1)
    self_hit = d[:, 0] <= 1e-9
    return np.where(self_hit, d[:, min(k, d.shape[1] - 1)], d[:, k - 1])


def fit_class_gaussians(features, labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(classes [C], means [C, d], precision [d, d])`` of class-conditional Gaussians with one
    shared covariance (Lee et al. 2018) from ``features`` [n, d] and ``labels`` [n].

    The covariance of the class-centred features is Ledoit-Wolf shrunk: with ~5 samples per food
    and d = hidden the plain estimate is singular."""
    x = np.asarray(features, np.float64)
    y = np.asarray(labels)
    classes = np.unique(y)
    means = np.stack([x[y == c].mean(0) for c in classes])
    centred = x - means[np.searchsorted(classes, y)]
    covariance = ledoit_wolf_covariance(centred) if x.shape[0] > 1 else np.eye(x.shape[1])
    return classes, means, np.linalg.pinv(covariance, hermitian=True)


def ledoit_wolf_covariance(x) -> np.ndarray:
    """[n, d] -> [d, d] Ledoit-Wolf shrunk covariance (Ledoit & Wolf 2004; what scikit-learn's
    ``LedoitWolf().fit(x).covariance_`` gives) in numpy: ``jaxfood predict`` does not import
    scikit-learn (2 s) for it."""
    x = np.asarray(x, np.float64)
    x = x - x.mean(0)
    n, d = x.shape
    cov = x.T @ x / n
    mu = np.trace(cov) / d
    x2 = x ** 2
    beta_sum = np.sum(x2.T @ x2)
    delta_sum = np.sum(cov ** 2)  # = sum((x^T x)^2) / n^2
    beta = (beta_sum / n - delta_sum) / (n * d)
    delta = (delta_sum - 2.0 * mu * np.trace(cov) + d * mu ** 2) / d
    shrinkage = 0.0 if delta == 0 else min(beta, delta) / delta
    return (1.0 - shrinkage) * cov + shrinkage * mu * np.eye(d)


def mahalanobis_scores(features, means, precision) -> np.ndarray:
    """[n, d], [C, d], [d, d] -> [n] ``min_c (x - mu_c)^T P (x - mu_c)``: squared Mahalanobis
    distance to the nearest class mean; higher = more out-of-library."""
    d = np.asarray(features, np.float64)[:, None, :] - np.asarray(means, np.float64)[None]
    return np.einsum("nkd,nkd->nk", d @ np.asarray(precision, np.float64), d).min(1)  # one matmul, not a d^2 loop


def score_samples(outputs, reference_outputs, train_index, train_labels,
                  method: str = DEFAULT_OOL_SCORE) -> np.ndarray:
    """[S'] out-of-library scores of every sample of ``outputs`` by ``method`` (see ``OOL_SCORES``).

    ``reference_outputs``: the same forward pass with the training samples' label edges masked
    (:func:`jaxfood.eval.predict.predict_arrays` with ``reference=True``); ``train_index`` [n] / ``train_labels`` [n]:
    the training samples and their foods, the reference of ``mahalanobis`` and ``knn``.
    """
    index, labels = np.asarray(train_index), np.asarray(train_labels)
    if method == "msp":
        return ool_scores(outputs.food_logits)
    if method == "energy":
        return energy_scores(outputs.food_logits)
    features = np.asarray(outputs.embeddings[schema.SAMPLE], np.float64)
    reference = np.asarray(reference_outputs.embeddings[schema.SAMPLE], np.float64)[index]
    if method == "knn":
        return knn_distance_scores(features, reference)
    if method == "mahalanobis":
        _, means, precision = fit_class_gaussians(reference, labels)
        return mahalanobis_scores(features, means, precision)
    raise ValueError(f"unknown out-of-library score '{method}' (expected one of {list(OOL_SCORES)})")
