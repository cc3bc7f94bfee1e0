"""jaxfood.eval.baselines: preprocessing and VIP by hand, baselines recover planted signal."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.cross_decomposition import PLSRegression

from jaxfood.eval import baselines as B

NUM_FOODS = 4
NUM_MOLECULES = 60
PLANTED = {f: 10 + 7 * f for f in range(NUM_FOODS)}  # molecule index of each food's marker


def planted_dataset(samples_per_food: int = 12, seed: int = 0):
    """Raw peak areas [S, M] with one strong marker per food, random loading per sample.

    Background molecules are detected at random (30 %) in every sample; each food's marker is
    detected in all of its samples at ~20x the background level and never elsewhere.
    """
    rng = np.random.default_rng(seed)
    food = np.repeat(np.arange(NUM_FOODS), samples_per_food)
    rng.shuffle(food)
    s = food.size
    areas = np.where(rng.random((s, NUM_MOLECULES)) < 0.3, rng.lognormal(0.0, 0.5, (s, NUM_MOLECULES)), 0.0)
    for f, m in PLANTED.items():
        areas[:, m] = 0.0
        areas[food == f, m] = rng.lognormal(3.0, 0.2, (food == f).sum())
    areas *= rng.lognormal(8.0, 1.0, (s, 1))  # sample loading: removed by TIC normalisation
    molecule_ids = [f"mol{j}" for j in range(NUM_MOLECULES)]
    food_names = ["apple", "kiwi", "pear", "fig"]
    return areas, food, molecule_ids, food_names


def test_intensity_matrix_sums_duplicates():
    m = B.intensity_matrix([0, 0, 1, 0], [1, 1, 2, 0], [2.0, 3.0, 4.0, 1.0], 3, 3)
    np.testing.assert_array_equal(m, [[1.0, 5.0, 0.0], [0.0, 0.0, 4.0], [0.0, 0.0, 0.0]])
    with pytest.raises(ValueError):
        B.intensity_matrix([3], [0], [1.0], 3, 3)


def test_preprocess_tic_then_log1p_by_hand():
    x = B.preprocess_intensities([[1.0, 3.0, 0.0], [0.0, 0.0, 0.0], [10.0, 30.0, 0.0]])
    expected = np.log1p([2500.0, 7500.0, 0.0])
    np.testing.assert_allclose(x[0], expected)
    np.testing.assert_array_equal(x[1], 0.0)  # zero TIC stays zero, no NaN
    np.testing.assert_allclose(x[2], expected)  # loading factor removed


def test_log2_fold_change_by_hand():
    x = np.log1p(np.array([[3.0, 1.0], [1.0, 1.0], [0.0, 4.0], [0.0, 2.0]]))
    lfc = B.log2_fold_change(x, [True, True, False, False], pseudocount=1e-3)
    np.testing.assert_allclose(lfc, [np.log2(2.001) - np.log2(0.001), np.log2(1.001) - np.log2(3.001)])


def test_vip_one_component_by_hand():
    # One component, one response: w = X'y / ||X'y|| (centred), so VIP_j = sqrt(p) |X_j'y| / ||X'y||.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(20, 5))
    y = x[:, 0] - 0.5 * x[:, 3] + 0.1 * rng.normal(size=20)
    pls = PLSRegression(n_components=1, scale=False).fit(x, y[:, None])
    xc, yc = x - x.mean(0), y - y.mean()
    xty = xc.T @ yc
    np.testing.assert_allclose(B.vip_scores(pls), np.sqrt(5) * np.abs(xty) / np.linalg.norm(xty), rtol=1e-6)


def _nipals_vip(x: np.ndarray, y: np.ndarray, n_components: int) -> np.ndarray:
    """PLS1 NIPALS written out (Wold), then VIP_j = sqrt(p sum_a SS_a w_ja^2 / sum_a SS_a)."""
    xk, yk = x - x.mean(0), y - y.mean()
    ws, ss = [], []
    for _ in range(n_components):
        w = xk.T @ yk
        w /= np.linalg.norm(w)
        t = xk @ w
        p = xk.T @ t / (t @ t)
        q = yk @ t / (t @ t)
        xk = xk - np.outer(t, p)
        yk = yk - q * t
        ws.append(w)
        ss.append(q * q * (t @ t))
    w, ss = np.stack(ws, 1), np.asarray(ss)
    return np.sqrt(x.shape[1] * (w**2 @ ss) / ss.sum())


def test_vip_two_components_against_written_out_nipals():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(30, 8))
    y = (x[:, 1] + x[:, 2] * x[:, 4] > 0).astype(float)
    pls = PLSRegression(n_components=2, scale=False).fit(x, y[:, None])
    vip = B.vip_scores(pls)
    np.testing.assert_allclose(vip, _nipals_vip(x, y, 2), rtol=1e-6)
    assert np.mean(vip**2) == pytest.approx(1.0)  # VIP's defining normalisation


def test_pls1_vip_all_columns_equals_one_sklearn_model_per_column():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(40, 12))
    food = rng.integers(0, 4, size=40)
    one_hot = (food[:, None] == np.arange(4)[None, :]).astype(float)
    for n_components in (1, 2, 3):
        vip = B.pls1_vip(x, one_hot, n_components)
        assert vip.shape == (12, 4)
        for c in range(4):
            pls = PLSRegression(n_components=n_components, scale=False).fit(x, one_hot[:, c : c + 1])
            np.testing.assert_allclose(vip[:, c], B.vip_scores(pls), rtol=1e-6, atol=1e-9)
            np.testing.assert_allclose(vip[:, c], _nipals_vip(x, one_hot[:, c], n_components), rtol=1e-6)


def test_log2_fold_change_per_group_columns():
    x = np.log1p(np.random.default_rng(0).random((10, 5)) * 50)
    food = np.arange(10) % 3
    groups = food[:, None] == np.arange(3)[None, :]
    lfc = B.log2_fold_change(x, groups)
    for c in range(3):
        np.testing.assert_allclose(lfc[:, c], B.log2_fold_change(x, food == c))


def test_fold_change_ranking_puts_planted_marker_first():
    areas, food, molecule_ids, food_names = planted_dataset()
    x = B.preprocess_intensities(areas)
    ranking = B.fold_change_ranking(x, food, molecule_ids, food_names)
    assert list(ranking) == food_names
    for f, m in PLANTED.items():
        assert ranking[food_names[f]][0] == f"mol{m}"
        assert sorted(ranking[food_names[f]]) == sorted(molecule_ids)  # a full ranking


def test_fold_change_filter_keeps_down_regulated_molecules_behind():
    # Molecule 0 is missing from apple and abundant elsewhere: highly discriminating (high VIP)
    # but a marker of absence, so for apple it must rank after every molecule up 2-fold.
    areas, food, molecule_ids, food_names = planted_dataset(seed=3)
    areas[:, 0] = np.where(food == 0, 0.0, areas.max())
    x = B.preprocess_intensities(areas)
    lfc = B.log2_fold_change(x, food == 0)
    passes = int((lfc > 1.0).sum())
    ranking = B.fold_change_ranking(x, food, molecule_ids, food_names)["apple"]
    assert ranking.index("mol0") >= passes
    assert set(ranking[:passes]) == {molecule_ids[j] for j in np.flatnonzero(lfc > 1.0)}


def test_random_ranking_is_seeded_and_puts_detected_first():
    areas, food, molecule_ids, food_names = planted_dataset()
    x = B.preprocess_intensities(areas)
    a = B.random_ranking(x, food, molecule_ids, food_names, seed=5)
    assert a == B.random_ranking(x, food, molecule_ids, food_names, seed=5)
    assert a != B.random_ranking(x, food, molecule_ids, food_names, seed=6)
    detected = (x[food == 0] > 0).any(0)
    n_detected = int(detected.sum())
    assert {molecule_ids[j] for j in np.flatnonzero(detected)} == set(a["apple"][:n_detected])


def test_classifiers_recover_planted_foods():
    areas, food, _, _ = planted_dataset(samples_per_food=40)
    x = B.preprocess_intensities(areas)
    train = np.arange(food.size) % 3 != 0
    for fit in (B.logreg_baseline, lambda *a, **k: B.random_forest_baseline(*a, n_estimators=30, **k)):
        result = fit(x[train], food[train], x[~train], food[~train], n_classes=6)
        assert result["proba"].shape == (int((~train).sum()), 6)
        np.testing.assert_allclose(result["proba"].sum(1), 1.0)
        np.testing.assert_array_equal(result["proba"][:, 4:], 0.0)  # foods never seen in training
        # 40 samples per food: enough for L2 logistic regression to single out the marker among
        # 59 noise molecules (with 15 it reaches only ~0.8-0.95, still far above chance 0.25).
        assert result["accuracy"] >= 0.95
        assert result["auroc_macro"] > 0.95


def test_ridge_recovers_linear_nutrients():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 30))
    weights = rng.normal(size=(30, 3))
    y = x @ weights + 0.1 * rng.normal(size=(120, 3))
    result = B.ridge_nutrient_baseline(x[:90], y[:90], x[90:], y[90:], names=["Protein", "Fat", "Fiber"])
    assert result["r2"] > 0.9
    assert set(result["per_nutrient"]) == {"Protein", "Fat", "Fiber"}
    assert result["pred"].shape == (30, 3)


def test_baseline_metrics_keys_and_signal():
    areas, food, molecule_ids, food_names = planted_dataset(samples_per_food=40, seed=2)
    x = B.preprocess_intensities(areas)
    split = np.where(np.arange(food.size) % 4 == 0, 2, 0)
    food = food.copy()
    food[1] = -1  # an unlabelled sample is ignored
    nutrients = np.random.default_rng(0).normal(size=(NUM_FOODS, 3))
    reference = {food_names[f]: {f"mol{m}"} for f, m in PLANTED.items()}
    out = B.baseline_metrics(x, food, split, nutrients, molecule_ids, food_names, reference, rf_estimators=30)
    required = {"logreg_accuracy", "logreg_weighted_f1", "rf_accuracy", "ridge_nutrient_r2",
                "fold_change_precision_at_10", "random_precision_at_10"}
    assert required <= set(out)
    assert out.pop("num_samples") == int(((split == 2) & (food >= 0)).sum())
    assert out.pop("num_training_samples") == int(((split == 0) & (food >= 0)).sum())
    assert all(isinstance(v, float) for v in out.values())
    assert out["logreg_accuracy"] >= 0.9 and out["rf_accuracy"] >= 0.9
    assert out["ridge_nutrient_r2"] > 0.5  # nutrients are a function of the (recoverable) food
    assert out["fold_change_precision_at_10"] == pytest.approx(0.1)  # 1 marker in the top 10 of each food
    assert out["fold_change_recall_at_10"] == pytest.approx(1.0)
    assert out["random_recall_at_10"] < out["fold_change_recall_at_10"]
    again = B.baseline_metrics(x, food, split, nutrients, molecule_ids, food_names, reference, rf_estimators=30)
    assert out == {k: v for k, v in again.items() if not k.startswith("num_")}


def test_baselines_are_fitted_on_training_samples_only():
    """Three quarters of the samples are test samples, and there foods 0 and 1 swap labels: a
    baseline fitted on all samples would learn the swap (accuracy near 1); fitted on the training
    quarter it predicts the true food, so the swapped half is wrong (accuracy near 0.5); the
    rankings (training samples only) do not move at all."""
    areas, food, molecule_ids, food_names = planted_dataset(samples_per_food=40, seed=3)
    x = B.preprocess_intensities(areas)
    split = np.where(np.arange(food.size) % 4 == 0, 0, 2)
    swapped = food.copy()
    test = split == 2
    swapped[test & (food == 0)], swapped[test & (food == 1)] = 1, 0
    nutrients = np.random.default_rng(0).normal(size=(NUM_FOODS, 3))
    reference = {food_names[f]: {f"mol{m}"} for f, m in PLANTED.items()}
    clean = B.baseline_metrics(x, food, split, nutrients, molecule_ids, food_names, reference, rf_estimators=30)
    out = B.baseline_metrics(x, swapped, split, nutrients, molecule_ids, food_names, reference, rf_estimators=30)
    assert clean["logreg_accuracy"] >= 0.8 and clean["rf_accuracy"] >= 0.8  # the signal is there
    assert out["logreg_accuracy"] <= 0.6 and out["rf_accuracy"] <= 0.6, (out["logreg_accuracy"], out["rf_accuracy"])
    for key in ("fold_change_precision_at_10", "fold_change_recall_at_10", "random_precision_at_10"):
        assert out[key] == clean[key], key
    assert out["num_training_samples"] == int((split == 0).sum())
