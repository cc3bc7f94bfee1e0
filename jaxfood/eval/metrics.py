"""Evaluation metrics for the three objectives: numpy in, plain Python numbers out.

Pure functions (no JAX, no files except :func:`read_biomarkers`), so the same code scores the
fine-tuned model, the pretrained-only probe, the from-scratch ablation and the baselines.

* Food classification: :func:`classification_metrics` (accuracy, weighted F1, macro one-vs-rest
  AUROC, top-3 accuracy, expected calibration error), :func:`per_class_table`, :func:`confusion`.
* Nutrition alignment: :func:`knn_purity`, :func:`distance_spearman`, :func:`nutrient_r2`.
* Salient molecules: :func:`precision_recall_at_k`, :func:`jaccard_at_k`,
  :func:`stability_jaccard`, :func:`fidelity`, and the reference table reader
  :func:`read_biomarkers` / :func:`biomarkers_from_pairs`.

scikit-learn computes every metric it has (F1, AUROC, R², confusion); the rest is written out
here and checked against hand-computed values in ``tests/test_metrics.py``.
"""

from __future__ import annotations

import csv
import itertools
import os
from collections.abc import Hashable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxfood.errors import UserError

#: Number of equal-width confidence bins of the expected calibration error (Guo et al. 2017).
ECE_BINS = 15


# --------------------------------------------------------------------------------------------
# Food classification
# --------------------------------------------------------------------------------------------


def _class_indices(y_true: Any, labels: Sequence[Hashable] | None, num_classes: int) -> np.ndarray:
    """``y_true`` as column indices of ``proba`` ([n] int), checked to be in range."""
    if labels is None:
        y = np.asarray(y_true)
        if y.size and not np.issubdtype(y.dtype, np.integer):
            if np.issubdtype(y.dtype, np.floating) and np.all(np.equal(np.mod(y, 1), 0)):
                y = y.astype(np.int64)
            else:
                raise ValueError("y_true must hold integer class indices when labels is None")
        y = y.astype(np.int64).reshape(-1)
    else:
        if len(labels) != num_classes:
            raise ValueError(f"labels has {len(labels)} entries but proba has {num_classes} columns")
        position = {label: i for i, label in enumerate(labels)}
        try:
            y = np.asarray([position[v] for v in np.asarray(y_true).tolist()], dtype=np.int64)
        except KeyError as exc:
            raise ValueError(f"y_true holds {exc.args[0]!r}, which is not in labels") from None
    if y.size and (y.min() < 0 or y.max() >= num_classes):
        raise ValueError(f"y_true must be class indices in [0, {num_classes}); got [{y.min()}, {y.max()}]")
    return y


def _check_proba(proba: Any, n: int) -> np.ndarray:
    proba = np.asarray(proba, dtype=np.float64)
    if proba.ndim != 2 or proba.shape[0] != n:
        raise ValueError(f"proba must be [n={n}, num_classes]; got shape {proba.shape}")
    if not np.all(np.isfinite(proba)):
        raise ValueError("proba holds NaN or infinite values")
    return proba


def expected_calibration_error(y_true: Any, proba: Any, n_bins: int = ECE_BINS) -> float:
    """Expected calibration error of the top-1 prediction (Guo et al., ICML 2017, eq. 3).

    ``proba`` [n, C]. Confidence = max probability, bin m holds confidences in
    ``((m-1)/M, m/M]`` (the first bin also takes exactly 0);
    ``ECE = sum_m |B_m|/n * |accuracy(B_m) - mean confidence(B_m)|``. Empty bins contribute 0.
    """
    proba = np.asarray(proba, dtype=np.float64)
    y = np.asarray(y_true).astype(np.int64).reshape(-1)
    if y.size == 0:
        return float("nan")
    confidence = proba.max(axis=1)
    correct = (proba.argmax(axis=1) == y).astype(np.float64)
    bins = np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        in_bin = bins == b
        count = int(in_bin.sum())
        if count:
            ece += count / y.size * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(ece)


def fit_temperature(logits: Any, y_true: Any, grid: int = 241, log_range: float = 4.0) -> float:
    """Temperature scaling (Guo et al., "On Calibration of Modern Neural Networks", 2017): the
    ``T > 0`` minimising the negative log-likelihood of ``softmax(logits / T)`` on held-out samples
    (``logits`` [n, C], ``y_true`` [n] class indices), searched on a log grid over
    ``[e^-log_range, e^log_range]``. It changes no prediction (argmax), only the confidence;
    1.0 without samples."""
    logits = np.asarray(logits, np.float64)
    y = np.asarray(y_true, np.int64)
    if logits.ndim != 2 or logits.shape[0] == 0 or y.shape != (logits.shape[0],):
        return 1.0
    best, best_nll = 1.0, np.inf
    for t in np.exp(np.linspace(-log_range, log_range, grid)):
        z = logits / t
        z = z - z.max(axis=1, keepdims=True)
        nll = float(np.mean(np.log(np.exp(z).sum(axis=1)) - z[np.arange(y.size), y]))
        if nll < best_nll - 1e-12:
            best, best_nll = float(t), nll
    return best


def top_k_accuracy(y_true: Any, proba: Any, k: int = 3) -> float:
    """Fraction of samples whose true class is among the ``k`` highest probabilities.

    Ties are broken towards the lower class index (stable sort), as a deterministic reading of the
    model's ranking. ``k`` is capped at the number of classes.
    """
    proba = np.asarray(proba, dtype=np.float64)
    y = np.asarray(y_true).astype(np.int64).reshape(-1)
    if y.size == 0:
        return float("nan")
    k = min(k, proba.shape[1])
    top = np.argsort(-proba, axis=1, kind="stable")[:, :k]
    return float(np.mean(np.any(top == y[:, None], axis=1)))


def auroc_ovr_macro(y_true: Any, proba: Any) -> float:
    """Macro one-vs-rest AUROC over the classes present in ``y_true``.

    For every class c that occurs in ``y_true`` (and does not make up all of it),
    ``roc_auc_score(y_true == c, proba[:, c])``; the result is their unweighted mean. Classes
    absent from ``y_true`` have no positives, so their AUROC is undefined and they are left out
    (a held-out split of 64 foods rarely holds every food). Each class is scored with its own
    probability column, so no renormalisation is needed; when every class is present this equals
    ``sklearn.metrics.roc_auc_score(y_true, proba, multi_class="ovr", average="macro")``.
    Returns NaN when fewer than two classes are present.

    Computed for all classes at once as the Mann-Whitney statistic (the AUROC is the fraction of
    (positive, negative) pairs the score orders, ties counting half: the positives' mean rank, with
    tied scores sharing their average rank), the number sklearn's trapezoids give; one
    ``roc_auc_score`` call per class cost ~10 ms, 10 s per run of the 65-food default.
    """
    from scipy.stats import rankdata

    proba = np.asarray(proba, dtype=np.float64)
    y = np.asarray(y_true).astype(np.int64).reshape(-1)
    present = np.unique(y)
    if present.size < 2:
        return float("nan")
    positive = y[:, None] == present[None, :]                         # [n, C]
    ranks = rankdata(proba[:, present], method="average", axis=0)     # [n, C], 1-based
    n_pos = positive.sum(axis=0)
    n_neg = y.size - n_pos
    rank_sum = np.where(positive, ranks, 0.0).sum(axis=0)
    scores = (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)
    return float(np.mean(scores))


def classification_metrics(
    y_true: Any, proba: Any, labels: Sequence[Hashable] | None = None
) -> dict[str, float]:
    """Food classification metrics of predicted probabilities.

    Args:
      y_true: ``[n]`` true classes: column indices of ``proba``, or values of ``labels``.
      proba: ``[n, num_classes]`` predicted probabilities (rows sum to 1).
      labels: optional ``[num_classes]`` class label of each column of ``proba``.

    Returns ``{"accuracy", "weighted_f1", "auroc_macro", "top3_accuracy", "ece"}``:
    accuracy of the argmax; support-weighted F1 (sklearn, ``zero_division=0``); macro one-vs-rest
    AUROC over the classes present in ``y_true`` (:func:`auroc_ovr_macro`); top-3 accuracy
    (:func:`top_k_accuracy`); expected calibration error with 15 equal-width bins on the max
    probability (:func:`expected_calibration_error`). NaN everywhere for an empty ``y_true``.
    """
    from sklearn.metrics import f1_score

    n = int(np.asarray(y_true).reshape(-1).shape[0])
    proba = _check_proba(proba, n)
    y = _class_indices(y_true, labels, proba.shape[1])
    if n == 0:
        return {k: float("nan") for k in ("accuracy", "weighted_f1", "auroc_macro", "top3_accuracy", "ece")}
    y_pred = proba.argmax(axis=1)
    return {
        "accuracy": float(np.mean(y_pred == y)),
        "weighted_f1": float(
            f1_score(y, y_pred, labels=np.arange(proba.shape[1]), average="weighted", zero_division=0)
        ),
        "auroc_macro": auroc_ovr_macro(y, proba),
        "top3_accuracy": top_k_accuracy(y, proba, k=3),
        "ece": expected_calibration_error(y, proba),
    }


def per_class_table(y_true: Any, y_pred: Any, class_names: Sequence[str]) -> list[dict[str, Any]]:
    """Per-class ``[{"class", "precision", "recall", "f1", "support"}]``, one row per class name.

    ``y_true``/``y_pred`` are ``[n]`` class indices into ``class_names``; classes with no
    prediction or no support get 0 (sklearn ``zero_division=0``), support is the true count.
    """
    from sklearn.metrics import precision_recall_fscore_support

    y_true = np.asarray(y_true).astype(np.int64).reshape(-1)
    y_pred = np.asarray(y_pred).astype(np.int64).reshape(-1)
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, y_pred, labels=np.arange(len(class_names)), zero_division=0
    )
    return [
        {
            "class": str(name),
            "precision": float(p),
            "recall": float(r),
            "f1": float(f),
            "support": int(s),
        }
        for name, p, r, f, s in zip(class_names, precision, recall, f1, support)
    ]


def confusion(y_true: Any, y_pred: Any, n_classes: int) -> np.ndarray:
    """Confusion matrix ``[n_classes, n_classes]`` int64: row = true class, column = predicted."""
    from sklearn.metrics import confusion_matrix

    y_true = np.asarray(y_true).astype(np.int64).reshape(-1)
    y_pred = np.asarray(y_pred).astype(np.int64).reshape(-1)
    return confusion_matrix(y_true, y_pred, labels=np.arange(n_classes)).astype(np.int64)


# --------------------------------------------------------------------------------------------
# Nutrition alignment
# --------------------------------------------------------------------------------------------


def samples_digest(sample_ids: Iterable[Hashable]) -> str:
    """Short SHA-1 of the sorted sample ids a metric was measured on: two sections with the same
    digest were scored on the same samples (model vs baselines in ``metrics.json``)."""
    import hashlib

    return hashlib.sha1("\n".join(sorted(map(str, sample_ids))).encode()).hexdigest()[:12]


def _unit_rows(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    # A zero vector has no direction; it stays zero (cosine similarity 0 to everything).
    return x / np.where(norm > 0, norm, 1.0)


def knn_purity(embeddings: Any, labels: Any, k: int = 5, queries: Any = None) -> float:
    """Mean fraction of each point's ``k`` nearest *other* points that share its label.

    ``embeddings`` [n, d], ``labels`` [n] (any comparable values, e.g. USDA food categories).
    Neighbours by cosine similarity; the point itself is excluded; ties in similarity go to the
    lower index; ``k`` is capped at ``n - 1``. A point's purity is ``same-label neighbours / k``,
    the result their mean over all points (1.0 = every neighbourhood is pure) or, with
    ``queries`` [n] bool, over the query points only (their neighbours still drawn from all
    points: held-out foods among all foods). NaN for ``n < 2`` or no query point.
    """
    x = np.asarray(embeddings, dtype=np.float64)
    labels = np.asarray(labels)
    if x.ndim != 2 or labels.shape != (x.shape[0],):
        raise ValueError(f"embeddings must be [n, d] and labels [n]; got {x.shape} and {labels.shape}")
    n = x.shape[0]
    queries = np.ones(n, bool) if queries is None else np.asarray(queries, bool)
    if queries.shape != (n,):
        raise ValueError(f"queries must be [n] bool; got {queries.shape} for n = {n}")
    if n < 2 or not queries.any():
        return float("nan")
    k = min(int(k), n - 1)
    if k < 1:
        raise ValueError("k must be at least 1")
    unit = _unit_rows(x)
    purity = np.empty(n)
    chunk = 1024  # bounded [chunk, n] similarity block for large sample sets
    for start in range(0, n, chunk):
        rows = np.arange(start, min(start + chunk, n))
        sim = unit[rows] @ unit.T
        sim[np.arange(rows.size), rows] = -np.inf  # never one's own neighbour
        order = np.argsort(-sim, axis=1, kind="stable")[:, :k]
        purity[rows] = np.mean(labels[order] == labels[rows][:, None], axis=1)
    return float(purity[queries].mean())


def distance_spearman(embeddings: Any, profiles: Any, queries: Any = None) -> float:
    """Spearman rank correlation between embedding distances and nutrient-profile distances.

    ``embeddings`` [n, d] (e.g. Food embeddings), ``profiles`` [n, p] (their normalised nutrient
    profiles). Both condensed pairwise distance vectors (``n (n-1) / 2`` pairs, scipy ``pdist``
    order): cosine distance ``1 - cos`` for embeddings (equal to ``pdist(x, "cosine")``, a zero
    vector being at distance 1), euclidean for profiles; the result is their Spearman rho
    (1.0 = foods close in nutrients are close in embedding space). ``queries`` [n] bool: only the
    pairs with at least one query point (held-out foods against all foods). NaN if ``n < 3``, no
    query point or a distance vector is constant.
    """
    from scipy.spatial.distance import pdist
    from scipy.stats import spearmanr

    x = np.asarray(embeddings, dtype=np.float64)
    p = np.asarray(profiles, dtype=np.float64)
    if x.ndim != 2 or p.ndim != 2 or x.shape[0] != p.shape[0]:
        raise ValueError(f"embeddings [n, d] and profiles [n, p] must share n; got {x.shape} and {p.shape}")
    if x.shape[0] < 3:
        return float("nan")
    unit = _unit_rows(x)
    upper = np.triu_indices(x.shape[0], k=1)  # the same pair order as pdist's condensed vector
    d_emb = 1.0 - (unit @ unit.T)[upper]  # cosine distance; a zero vector is at distance 1
    d_prof = pdist(p, "euclidean")
    if queries is not None:
        queries = np.asarray(queries, bool)
        if queries.shape != (x.shape[0],):
            raise ValueError(f"queries must be [n] bool; got {queries.shape} for n = {x.shape[0]}")
        touched = queries[upper[0]] | queries[upper[1]]
        if not touched.any():
            return float("nan")
        d_emb, d_prof = d_emb[touched], d_prof[touched]
    if np.ptp(d_emb) == 0 or np.ptp(d_prof) == 0:
        return float("nan")
    return float(spearmanr(d_emb, d_prof).statistic)


def nutrient_r2(true: Any, pred: Any, names: Sequence[str]) -> dict[str, Any]:
    """R² of estimated nutrient profiles: ``{"overall": float, "per_nutrient": {name: float}}``.

    ``true``/``pred`` [n, p] (same normalisation), ``names`` [p]. ``overall`` is sklearn
    ``r2_score(multioutput="uniform_average")`` — the plain mean of the per-nutrient R², so every
    nutrient counts the same whatever its scale. A nutrient constant over the evaluated samples
    gets sklearn's convention (1.0 if predicted exactly, else 0.0).
    """
    from sklearn.metrics import r2_score

    true = np.asarray(true, dtype=np.float64)
    pred = np.asarray(pred, dtype=np.float64)
    if true.shape != pred.shape or true.ndim != 2 or true.shape[1] != len(names):
        raise ValueError(f"true and pred must both be [n, {len(names)}]; got {true.shape} and {pred.shape}")
    if true.shape[0] < 2:
        return {"overall": float("nan"), "per_nutrient": {str(n): float("nan") for n in names}}
    per = r2_score(true, pred, multioutput="raw_values")
    return {
        "overall": float(r2_score(true, pred, multioutput="uniform_average")),
        "per_nutrient": {str(name): float(v) for name, v in zip(names, per)},
    }


# --------------------------------------------------------------------------------------------
# Salient molecules
# --------------------------------------------------------------------------------------------


def precision_recall_at_k(
    ranking: Mapping[Hashable, Sequence[Hashable]],
    reference: Mapping[Hashable, Iterable[Hashable]],
    k: int = 10,
) -> tuple[float, float]:
    """Mean precision@k and recall@k of per-food molecule rankings against reference biomarkers.

    ``ranking[food]`` is the molecule ids ordered from most to least salient; ``reference[food]``
    the known marker ids. Averaged over the foods that are in both and have at least one
    reference marker (reference foods the model does not know are skipped, not scored 0):
    ``precision = |top_k ∩ ref| / k`` (the usual denominator k, even when a ranking is shorter)
    and ``recall = |top_k ∩ ref| / |ref|``. ``(nan, nan)`` when no food qualifies.
    """
    if k < 1:
        raise ValueError("k must be at least 1")
    precisions: list[float] = []
    recalls: list[float] = []
    for food, markers in reference.items():
        markers = set(markers)
        if not markers or food not in ranking:
            continue
        hits = len(set(list(ranking[food])[:k]) & markers)
        precisions.append(hits / k)
        recalls.append(hits / len(markers))
    if not precisions:
        return float("nan"), float("nan")
    return float(np.mean(precisions)), float(np.mean(recalls))


def jaccard_at_k(list_a: Sequence[Hashable], list_b: Sequence[Hashable], k: int) -> float:
    """Jaccard overlap ``|A ∩ B| / |A ∪ B|`` of the top-``k`` sets of two rankings (1.0 if both empty)."""
    a, b = set(list(list_a)[:k]), set(list(list_b)[:k])
    union = a | b
    return 1.0 if not union else len(a & b) / len(union)


def stability_jaccard(
    rankings_list: Sequence[Sequence[Hashable] | Mapping[Hashable, Sequence[Hashable]]], k: int = 10
) -> float:
    """Stability of salient-molecule rankings across runs (seeds or input perturbations).

    ``rankings_list`` holds one ranking per run: either a list of ids, or a per-food dict
    ``{food: [ids]}``. For every pair of runs, :func:`jaccard_at_k` of their top-``k`` lists
    (for dicts: averaged over the foods both runs rank); the result is the mean over all pairs.
    1.0 = the same top-k every time. Needs at least two runs; NaN if no pair shares a food.
    """
    runs = list(rankings_list)
    if len(runs) < 2:
        raise ValueError(f"stability needs rankings from at least 2 runs; got {len(runs)}")
    pair_scores: list[float] = []
    for a, b in itertools.combinations(runs, 2):
        if isinstance(a, Mapping) != isinstance(b, Mapping):
            raise ValueError("rankings_list mixes per-food dicts and plain lists")
        if isinstance(a, Mapping):
            foods = [f for f in a if f in b]
            if foods:
                pair_scores.append(float(np.mean([jaccard_at_k(a[f], b[f], k) for f in foods])))
        else:
            pair_scores.append(jaccard_at_k(a, b, k))
    return float(np.mean(pair_scores)) if pair_scores else float("nan")


def fidelity(full_proba_true_class: Any, removed_proba: Any, kept_proba: Any) -> tuple[float, float]:
    """Fidelity+ and fidelity− of an explanation (GraphFramEx, Amara et al., LoG 2022, probability form).

    All inputs ``[n]``: the model's probability of the sample's true food (the "phenomenon"
    focus of GraphFramEx) on the full input, with the top-k salient molecules removed, and with
    only the top-k kept.

    * ``fidelity+ = mean(p_full - p_without_topk)``: how much the prediction needs the
      explanation (higher = more necessary).
    * ``fidelity- = mean(p_full - p_only_topk)``: how much is lost keeping only the explanation
      (lower = more sufficient; negative = the top-k alone are even more convincing).

    A faithful explanation has fidelity+ well above fidelity−. NaN for empty input.
    """
    full = np.asarray(full_proba_true_class, dtype=np.float64).reshape(-1)
    removed = np.asarray(removed_proba, dtype=np.float64).reshape(-1)
    kept = np.asarray(kept_proba, dtype=np.float64).reshape(-1)
    if not (full.shape == removed.shape == kept.shape):
        raise ValueError(f"fidelity inputs must share shape [n]; got {full.shape}, {removed.shape}, {kept.shape}")
    if full.size == 0:
        return float("nan"), float("nan")
    return float(np.mean(full - removed)), float(np.mean(full - kept))


# --------------------------------------------------------------------------------------------
# Reference biomarkers
# --------------------------------------------------------------------------------------------

BIOMARKER_COLUMNS = ("feature", "category")


def biomarkers_from_pairs(pairs: Iterable[tuple[Hashable, Hashable]]) -> dict[str, set[str]]:
    """``{food: {molecule ids}}`` from ``(molecule_id, food)`` pairs (the simulator's ground truth)."""
    reference: dict[str, set[str]] = {}
    for molecule_id, food in pairs:
        reference.setdefault(str(food), set()).add(str(molecule_id))
    return reference


def read_biomarkers(path: str | os.PathLike) -> dict[str, set[str]]:
    """Reads a reference biomarker table: CSV with header columns ``feature,category``.

    ``feature`` is a molecule id (the feature table's ``row ID``), ``category`` the food label it
    marks; other columns are ignored, surrounding whitespace is stripped, duplicates collapse.
    Returns ``{food: {molecule ids}}``. Raises :class:`UserError` naming the file (and column or
    line) when the file is missing, lacks a column, has an empty value, or has no rows.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: biomarker file not found (expected a CSV with columns feature,category)")
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            header = [h.strip() for h in (reader.fieldnames or [])]
            missing = [c for c in BIOMARKER_COLUMNS if c not in header]
            if missing:
                raise UserError(
                    f"{path}: missing column '{missing[0]}' (expected header feature,category; "
                    f"found {','.join(header) if header else 'no header'})"
                )
            reader.fieldnames = header
            pairs: list[tuple[str, str]] = []
            for line, row in enumerate(reader, start=2):
                feature = (row.get("feature") or "").strip()
                category = (row.get("category") or "").strip()
                if not feature or not category:
                    empty = "feature" if not feature else "category"
                    raise UserError(f"{path}: line {line}: empty '{empty}' (expected a molecule id and a food label)")
                pairs.append((feature, category))
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 text CSV (expected columns feature,category)") from None
    except csv.Error as exc:
        raise UserError(f"{path}: unreadable CSV ({exc}); expected columns feature,category") from None
    if not pairs:
        raise UserError(f"{path}: no biomarker rows (expected at least one feature,category line)")
    return biomarkers_from_pairs(pairs)


def match_biomarkers(reference: Mapping[str, Iterable[str]], food_ids: Sequence[str], molecule_ids: Sequence[str],
                     source: str) -> tuple[int, int]:
    """``(matched, total)`` (feature, category) pairs of ``reference`` whose food and molecule the
    graph has. Precision@k against pairs that match nothing is 0 whatever the model: no pair
    matching is a :class:`UserError` naming the unknown foods/ids."""
    foods, molecules = set(map(str, food_ids)), set(map(str, molecule_ids))
    pairs = [(str(f), str(m)) for f, ms in reference.items() for m in ms]
    matched = sum(f in foods and m in molecules for f, m in pairs)
    if pairs and not matched:
        bad_foods = sorted({f for f, _ in pairs if f not in foods})
        bad_ids = sorted({m for _, m in pairs if m not in molecules})
        what = []
        if bad_foods:
            what.append(f"categories not among the graph's foods: {', '.join(repr(f) for f in bad_foods[:3])}"
                        f"{' ...' if len(bad_foods) > 3 else ''}")
        if bad_ids:
            what.append(f"features not among the graph's molecule ids: {', '.join(repr(m) for m in bad_ids[:3])}"
                        f"{' ...' if len(bad_ids) > 3 else ''}")
        raise UserError(f"{source}: none of the {len(pairs)} biomarker rows matches the graph ({'; '.join(what)}); "
                        "expected 'feature' = a feature table row ID and 'category' = a food label")
    return matched, len(pairs)
