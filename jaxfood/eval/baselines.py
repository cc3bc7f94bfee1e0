"""What food researchers would do without a graph model, on the same samples and split.

Every baseline reads the sample x molecule intensity matrix only:

* features: :func:`intensity_matrix` (sparse COO -> dense ``[num_samples, num_molecules]``)
  then :func:`preprocess_intensities` — TIC normalisation, *then* ``log1p`` (order below);
* food classification: :func:`logreg_baseline` (multinomial logistic regression on
  standardised features), :func:`random_forest_baseline`;
* nutrient estimation: :func:`ridge_nutrient_baseline` (ridge regression, alpha by efficient
  leave-one-out cross-validation on the training rows);
* biomarkers per food: :func:`fold_change_ranking` (fold change food vs rest filtered at
  log2FC > 1, ranked by PLS-DA VIP, the volcano-plus-VIP practice of untargeted metabolomics),
  :func:`random_ranking` (chance level);
* :func:`baseline_metrics`: all of the above on a train/test split, keyed as in ``metrics.json``
  ``"baselines"``.

Pure functions of numpy arrays with fixed seeds: the same inputs give the same numbers. On ~500
samples x 1,500 molecules and 64 foods all baselines together take a few seconds on 2 cores.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np

from jaxfood.eval.metrics import classification_metrics, nutrient_r2, precision_recall_at_k

#: TIC-normalised intensities are expressed per 10,000 of the sample's total ion current before
#: ``log1p``: a molecule carrying 1 % of the TIC maps to log1p(100) = 4.6, one at 0.01 % to
#: log1p(1) = 0.69, so the log compresses the dynamic range instead of acting linearly on tiny
#: fractions. A fixed constant (not the dataset's median TIC) keeps train and test independent.
TIC_SCALE = 1.0e4


# --------------------------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------------------------


def intensity_matrix(
    sample_index: Any, molecule_index: Any, intensity: Any, num_samples: int, num_molecules: int
) -> np.ndarray:
    """Dense sample x molecule matrix ``[num_samples, num_molecules]`` from COO entries ``[nnz]``.

    Duplicate ``(sample, molecule)`` entries are summed; absent pairs are 0 (not detected).
    Works for raw peak areas (:class:`~jaxfood.data.tables.FeatureTable`) or for the
    ``contains_molecule`` edges of a graph (senders, receivers, attributes[:, 0]).
    """
    rows = np.asarray(sample_index, dtype=np.int64).reshape(-1)
    cols = np.asarray(molecule_index, dtype=np.int64).reshape(-1)
    values = np.asarray(intensity, dtype=np.float64).reshape(-1)
    if not (rows.shape == cols.shape == values.shape):
        raise ValueError(f"sample_index, molecule_index, intensity must share [nnz]; got {rows.shape}, {cols.shape}, {values.shape}")
    if rows.size and (rows.min() < 0 or rows.max() >= num_samples or cols.min() < 0 or cols.max() >= num_molecules):
        raise ValueError("sample_index / molecule_index out of range of num_samples / num_molecules")
    matrix = np.zeros((num_samples, num_molecules), dtype=np.float64)
    np.add.at(matrix, (rows, cols), values)
    return matrix


def preprocess_intensities(matrix: Any, tic_scale: float = TIC_SCALE) -> np.ndarray:
    """TIC normalisation then ``log1p``: ``log1p(tic_scale * x_ij / sum_j x_ij)``, ``[S, M]``.

    Order: total-ion-current normalisation first, on the linear scale where sample loading and
    instrument response act multiplicatively, then ``log1p`` to compress the dynamic range
    (MetaboAnalyst's "normalisation by sum" followed by log transform). Negative values (not
    expected of peak areas) are clipped to 0; a sample with zero TIC stays all zero.
    """
    x = np.clip(np.asarray(matrix, dtype=np.float64), 0.0, None)
    if x.ndim != 2:
        raise ValueError(f"intensity matrix must be [num_samples, num_molecules]; got shape {x.shape}")
    tic = x.sum(axis=1, keepdims=True)
    return np.log1p(tic_scale * x / np.where(tic > 0, tic, 1.0))


def _expand_proba(proba: np.ndarray, classes: np.ndarray, n_classes: int) -> np.ndarray:
    """Columns for every class 0..n_classes-1 (classes never seen in training get probability 0)."""
    full = np.zeros((proba.shape[0], n_classes))
    full[:, classes] = proba
    return full


def _n_classes(y_train: np.ndarray, y_test: np.ndarray, n_classes: int | None) -> int:
    if n_classes is not None:
        return int(n_classes)
    return int(max(y_train.max(initial=-1), y_test.max(initial=-1)) + 1)


def _classification_result(proba: np.ndarray, y_test: np.ndarray) -> dict[str, Any]:
    result: dict[str, Any] = dict(classification_metrics(y_test, proba))
    result["proba"] = proba
    return result


# --------------------------------------------------------------------------------------------
# Food classification
# --------------------------------------------------------------------------------------------


def logreg_baseline(
    X_train: Any,
    y_train: Any,
    X_test: Any,
    y_test: Any,
    *,
    n_classes: int | None = None,
    C: float = 1.0,
    seed: int = 0,
) -> dict[str, Any]:
    """Multinomial logistic regression (L2, lbfgs) on standardised features.

    ``X_*`` [n, M] from :func:`preprocess_intensities`, ``y_*`` [n] food indices. The scaler is
    fitted on the training rows only. Returns :func:`~jaxfood.eval.metrics.classification_metrics`
    of the test rows (``accuracy``, ``weighted_f1``, ``auroc_macro``, ``top3_accuracy``, ``ece``)
    plus ``proba`` [n_test, n_classes] (``n_classes`` defaults to the largest label + 1; foods
    absent from training get probability 0).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    y_train = np.asarray(y_train, dtype=np.int64)
    y_test = np.asarray(y_test, dtype=np.int64)
    model = make_pipeline(StandardScaler(), LogisticRegression(C=C, max_iter=500, random_state=seed))
    model.fit(np.asarray(X_train, dtype=np.float64), y_train)
    proba = _expand_proba(
        model.predict_proba(np.asarray(X_test, dtype=np.float64)),
        model.classes_,
        _n_classes(y_train, y_test, n_classes),
    )
    return _classification_result(proba, y_test)


def random_forest_baseline(
    X_train: Any,
    y_train: Any,
    X_test: Any,
    y_test: Any,
    *,
    n_classes: int | None = None,
    n_estimators: int = 200,
    seed: int = 0,
    n_jobs: int | None = None,
) -> dict[str, Any]:
    """Random forest (``n_estimators`` trees, sqrt features per split, fixed ``seed``).

    Same inputs and outputs as :func:`logreg_baseline`.
    """
    from sklearn.ensemble import RandomForestClassifier

    y_train = np.asarray(y_train, dtype=np.int64)
    y_test = np.asarray(y_test, dtype=np.int64)
    model = RandomForestClassifier(
        n_estimators=n_estimators, max_features="sqrt", random_state=seed, n_jobs=n_jobs
    )
    model.fit(np.asarray(X_train, dtype=np.float64), y_train)
    proba = _expand_proba(
        model.predict_proba(np.asarray(X_test, dtype=np.float64)),
        model.classes_,
        _n_classes(y_train, y_test, n_classes),
    )
    return _classification_result(proba, y_test)


# --------------------------------------------------------------------------------------------
# Nutrient estimation
# --------------------------------------------------------------------------------------------


def ridge_nutrient_baseline(
    X_train: Any,
    Y_train: Any,
    X_test: Any,
    Y_test: Any,
    *,
    names: Sequence[str] | None = None,
    alphas: Sequence[float] = tuple(np.logspace(-1, 5, 13)),
) -> dict[str, Any]:
    """Ridge regression from intensities to nutrient profiles, ``Y_*`` [n, p].

    Features standardised on the training rows; ``alpha`` chosen among ``alphas`` by efficient
    leave-one-out error on the training rows (``RidgeCV``), one alpha for all nutrients.
    Returns ``{"r2": overall R², "per_nutrient": {name: R²}, "pred": [n_test, p], "alpha"}``
    (R² as :func:`~jaxfood.eval.metrics.nutrient_r2`; names default to ``"0", "1", ...``).
    """
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    Y_train = np.asarray(Y_train, dtype=np.float64)
    Y_test = np.asarray(Y_test, dtype=np.float64)
    names = list(names) if names is not None else [str(i) for i in range(Y_train.shape[1])]
    model = make_pipeline(StandardScaler(), RidgeCV(alphas=np.asarray(alphas, dtype=np.float64)))
    model.fit(np.asarray(X_train, dtype=np.float64), Y_train)
    pred = model.predict(np.asarray(X_test, dtype=np.float64)).reshape(Y_test.shape)
    r2 = nutrient_r2(Y_test, pred, names)
    return {"r2": r2["overall"], "per_nutrient": r2["per_nutrient"], "pred": pred, "alpha": float(model[-1].alpha_)}


# --------------------------------------------------------------------------------------------
# Biomarkers
# --------------------------------------------------------------------------------------------


def vip_scores(pls: Any) -> np.ndarray:
    """Variable importance in projection of a fitted ``sklearn`` ``PLSRegression``, ``[p]``.

    Wold et al. (1993); Mehmood et al. (2012):
    ``VIP_j = sqrt(p * sum_a SS_a (w_ja / ||w_a||)^2 / sum_a SS_a)`` with
    ``SS_a = (t_a' t_a) * sum_k q_ka^2`` the response variance explained by component a,
    ``w_a`` the X weights (of the deflated X, ``x_weights_``), ``t_a`` the X scores,
    ``q_a`` the Y loadings. Mean of ``VIP^2`` is 1, so VIP > 1 is the usual "important" cut-off.
    """
    w = np.asarray(pls.x_weights_, dtype=np.float64)  # [p, A]
    t = np.asarray(pls.x_scores_, dtype=np.float64)  # [n, A]
    q = np.asarray(pls.y_loadings_, dtype=np.float64)  # [k, A]
    ss = np.sum(t * t, axis=0) * np.sum(q * q, axis=0)  # [A]
    w_norm = w / np.linalg.norm(w, axis=0, keepdims=True)
    total = ss.sum()
    if total <= 0:
        return np.zeros(w.shape[0])
    return np.sqrt(w.shape[0] * (w_norm**2 @ ss) / total)


def pls1_vip(X: Any, Y: Any, n_components: int = 2) -> np.ndarray:
    """VIP of one PLS1 model per response column, all columns at once: ``[p, k]``.

    ``X`` [n, p], ``Y`` [n, k]; column c of the result equals :func:`vip_scores` of
    ``PLSRegression(n_components, scale=False).fit(X, Y[:, c])`` (NIPALS with regression
    deflation), but without fitting k models: for a single response NIPALS needs no inner
    iteration (``w_a ∝ X_a' y``), and the deflated ``X_a = X - sum_b t_b p_b'`` never has to be
    formed, since ``X_a' y = X' y - sum_b p_b (t_b' y)`` and ``X_a w = X w - sum_b t_b (p_b' w)``.
    The cost is a few ``[n, p] x [p, k]`` products per component (64 foods vs rest: milliseconds).
    """
    x = np.asarray(X, dtype=np.float64)
    y = np.asarray(Y, dtype=np.float64)
    if y.ndim == 1:
        y = y[:, None]
    x = x - x.mean(axis=0)
    y = y - y.mean(axis=0)
    n_comp = max(1, min(int(n_components), x.shape[0] - 1, x.shape[1]))
    scores: list[np.ndarray] = []  # t_b [n, k]
    loadings: list[np.ndarray] = []  # p_b [p, k]
    weights_sq: list[np.ndarray] = []  # w_a^2 [p, k]
    explained: list[np.ndarray] = []  # SS_a [k]
    tiny = np.finfo(np.float64).tiny
    for _ in range(n_comp):
        w = x.T @ y
        for t_b, p_b in zip(scores, loadings):
            w -= p_b * np.sum(t_b * y, axis=0)
        w /= np.maximum(np.linalg.norm(w, axis=0, keepdims=True), tiny)
        t = x @ w
        for t_b, p_b in zip(scores, loadings):
            t -= t_b * np.sum(p_b * w, axis=0)
        tt = np.maximum(np.sum(t * t, axis=0), tiny)
        q = np.sum(y * t, axis=0) / tt  # t_a' y_a = t_a' y: the t's are orthogonal
        scores.append(t)
        loadings.append(x.T @ t / tt)  # X_a' t_a = X' t_a for the same reason
        weights_sq.append(w * w)
        explained.append(q * q * tt)
    ss = np.stack(explained)  # [A, k]
    total = ss.sum(axis=0)
    vip_sq = x.shape[1] * np.einsum("apk,ak->pk", np.stack(weights_sq), ss) / np.where(total > 0, total, 1.0)
    return np.sqrt(vip_sq)


def log2_fold_change(X: Any, in_group: Any, pseudocount: float = 1e-3) -> np.ndarray:
    """``log2(mean_in + c) - log2(mean_out + c)`` per molecule on the linear scale.

    ``X`` [n, M] from :func:`preprocess_intensities` (``expm1`` undoes the log, giving
    intensities per 10,000 of TIC); ``in_group`` [n] bool gives ``[M]``, or [n, k] bool (one
    group per column, e.g. one-hot foods) gives ``[M, k]``. The pseudocount ``c`` keeps
    molecules never detected outside the group finite (and large).
    """
    linear = np.expm1(np.asarray(X, dtype=np.float64))
    groups = np.asarray(in_group, dtype=np.float64)
    single = groups.ndim == 1
    groups = groups[:, None] if single else groups
    n_in = groups.sum(axis=0)
    n_out = groups.shape[0] - n_in
    sum_in = linear.T @ groups  # [M, k]
    sum_out = linear.sum(axis=0)[:, None] - sum_in
    mean_in = sum_in / np.maximum(n_in, 1.0)
    mean_out = sum_out / np.maximum(n_out, 1.0)
    lfc = np.log2(mean_in + pseudocount) - np.log2(mean_out + pseudocount)
    return lfc[:, 0] if single else lfc


def fold_change_ranking(
    X: Any,
    y: Any,
    molecule_ids: Sequence[Hashable],
    food_names: Sequence[Hashable],
    *,
    log2fc_threshold: float = 1.0,
    n_components: int = 2,
) -> dict[Hashable, list[Hashable]]:
    """Per-food biomarker ranking by fold change + PLS-DA VIP (food vs rest).

    For each food with at least one sample in ``y`` (``[n]`` food indices into ``food_names``;
    -1 = unknown, ignored) and at least one sample outside it:

    1. ``log2FC`` of the food's samples vs all others (:func:`log2_fold_change`);
    2. a binary PLS-DA on autoscaled ``X`` (response 1 for the food, 0 for the rest;
       ``n_components``) and its VIP (:func:`pls1_vip`, identical to sklearn ``PLSRegression``
       + :func:`vip_scores`);
    3. ranking: molecules with ``log2FC > log2fc_threshold`` (up at least two-fold in the food)
       by decreasing VIP, then all the others by decreasing VIP; ties go to the lower index.

    Returns ``{food_name: [molecule ids, all M, most salient first]}`` in food-index order.
    """
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    known = y >= 0
    X, y = X[known], y[known]
    foods = np.asarray([f for f in np.unique(y) if (y != f).any()], dtype=np.int64)
    if foods.size == 0:
        return {}
    std = X.std(axis=0)
    scaled = (X - X.mean(axis=0)) / np.where(std > 0, std, 1.0)
    one_hot = y[:, None] == foods[None, :]  # [n, foods]
    lfc = log2_fold_change(X, one_hot)  # [M, foods]
    vip = pls1_vip(scaled, one_hot.astype(np.float64), n_components)  # [M, foods]
    ids = np.asarray(list(molecule_ids), dtype=object)
    index = np.arange(ids.size)
    rankings: dict[Hashable, list[Hashable]] = {}
    for c, food in enumerate(foods):
        passes = lfc[:, c] > log2fc_threshold
        order = np.lexsort((index, -vip[:, c], ~passes))  # last key is primary
        rankings[food_names[int(food)]] = ids[order].tolist()
    return rankings


def random_ranking(
    X: Any,
    y: Any,
    molecule_ids: Sequence[Hashable],
    food_names: Sequence[Hashable],
    *,
    seed: int = 0,
    observed_only: bool = True,
) -> dict[Hashable, list[Hashable]]:
    """Chance-level biomarker ranking: a random order per food, fixed ``seed``.

    Same inputs as :func:`fold_change_ranking`. With ``observed_only`` (default) the molecules
    detected (``X > 0``) in at least one of the food's samples come first in random order, then
    the undetected ones in random order — the fair chance level for a model that can only rank
    what it sees in a food's samples. Otherwise all molecules in one random order.
    """
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    ids = np.asarray(list(molecule_ids), dtype=object)
    rng = np.random.default_rng(seed)
    rankings: dict[Hashable, list[Hashable]] = {}
    for food in np.unique(y[y >= 0]):
        perm = rng.permutation(ids.size)
        if observed_only:
            detected = (X[y == food] > 0).any(axis=0)
            perm = perm[np.argsort(~detected[perm], kind="stable")]
        rankings[food_names[int(food)]] = ids[perm].tolist()
    return rankings


# --------------------------------------------------------------------------------------------
# All baselines on one split
# --------------------------------------------------------------------------------------------


def baseline_metrics(
    X: Any,
    sample_food: Any,
    sample_split: Any,
    food_nutrients: Any,
    molecule_ids: Sequence[Hashable],
    food_names: Sequence[Hashable],
    reference: Mapping[Hashable, set] | None = None,
    *,
    k: int = 10,
    seed: int = 0,
    rf_estimators: int = 200,
    test_split: int = 2,
) -> dict[str, float]:
    """Every baseline on the graph's split, keyed as ``metrics.json["baselines"]``.

    Args:
      X: ``[S, M]`` features from :func:`preprocess_intensities` (all samples).
      sample_food: ``[S]`` food index (-1 unknown); ``sample_split``: ``[S]`` 0 train / 1 val / 2 test.
      food_nutrients: ``[F, N]`` normalised nutrient profiles; a sample's target is its food's row.
      molecule_ids, food_names: ids of the columns of ``X`` and of the food indices.
      reference: ``{food: {molecule ids}}`` biomarkers; None skips the ranking metrics.

    Models and rankings are fitted on the training samples with a known food and scored on the
    ``test_split`` samples with a known food. Returns ``logreg_accuracy``, ``logreg_weighted_f1``,
    ``rf_accuracy``, ``ridge_nutrient_r2``, ``fold_change_precision_at_10``,
    ``random_precision_at_10`` (the required keys; ``_at_10`` means ``_at_{k}``), plus
    ``logreg_auroc_macro``, ``logreg_top3_accuracy``, ``logreg_ece``, ``rf_weighted_f1``,
    ``rf_auroc_macro``, ``rf_top3_accuracy``, ``rf_ece``, ``fold_change_recall_at_10``,
    ``random_recall_at_10``; ``num_samples`` / ``num_training_samples`` (ints): the samples scored
    and fitted on (the model's ``food_classification.num_samples`` must equal the former).
    """
    X = np.asarray(X, dtype=np.float64)
    food = np.asarray(sample_food, dtype=np.int64)
    split = np.asarray(sample_split, dtype=np.int64)
    nutrients = np.asarray(food_nutrients, dtype=np.float64)
    train = (split == 0) & (food >= 0)
    test = (split == test_split) & (food >= 0)
    n_classes = len(food_names)
    out: dict[str, float] = {"num_samples": int(test.sum()), "num_training_samples": int(train.sum())}
    logreg = logreg_baseline(X[train], food[train], X[test], food[test], n_classes=n_classes, seed=seed)
    forest = random_forest_baseline(
        X[train], food[train], X[test], food[test], n_classes=n_classes, n_estimators=rf_estimators, seed=seed
    )
    for prefix, result in (("logreg", logreg), ("rf", forest)):
        for key in ("accuracy", "weighted_f1", "auroc_macro", "top3_accuracy", "ece"):
            out[f"{prefix}_{key}"] = result[key]
    if nutrients.shape[1]:  # a graph without a nutrient table has nothing to regress
        ridge = ridge_nutrient_baseline(X[train], nutrients[food[train]], X[test], nutrients[food[test]])
        out["ridge_nutrient_r2"] = ridge["r2"]
    if reference is not None:
        for name, ranking in (
            ("fold_change", fold_change_ranking(X[train], food[train], molecule_ids, food_names)),
            ("random", random_ranking(X[train], food[train], molecule_ids, food_names, seed=seed)),
        ):
            precision, recall = precision_recall_at_k(ranking, reference, k=k)
            out[f"{name}_precision_at_{k}"] = precision
            out[f"{name}_recall_at_{k}"] = recall
    return out
