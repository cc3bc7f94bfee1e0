"""jaxfood.eval.metrics against hand-computed values on small cases and against scikit-learn / scipy."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.spatial.distance import pdist
from scipy.stats import spearmanr
from sklearn.metrics import f1_score, r2_score, roc_auc_score, top_k_accuracy_score

from jaxfood.errors import UserError
from jaxfood.eval import metrics as M

# Six samples, three classes; confidences chosen away from the 1/15 bin edges.
ECE_PROBA = np.array(
    [
        [0.90, 0.05, 0.05],  # y=0, correct, conf .90 -> bin 13
        [0.78, 0.12, 0.10],  # y=1, wrong,   conf .78 -> bin 11
        [0.08, 0.62, 0.30],  # y=1, correct, conf .62 -> bin 9
        [0.20, 0.35, 0.45],  # y=2, correct, conf .45 -> bin 6
        [0.50, 0.30, 0.20],  # y=1, wrong,   conf .50 -> bin 7
        [0.14, 0.76, 0.10],  # y=1, correct, conf .76 -> bin 11
    ]
)
ECE_Y = np.array([0, 1, 1, 2, 1, 1])


def test_ece_by_hand():
    # bin 11 holds samples 2 and 6: accuracy .5, mean confidence .77 -> |.5 - .77| = .27, weight 2/6.
    # the other bins hold one sample each: |1-.9|, |1-.62|, |1-.45|, |0-.5|.
    expected = (0.10 + 2 * 0.27 + 0.38 + 0.55 + 0.50) / 6
    assert M.expected_calibration_error(ECE_Y, ECE_PROBA) == pytest.approx(expected, abs=1e-12)
    assert expected == pytest.approx(0.345)
    metrics = M.classification_metrics(ECE_Y, ECE_PROBA)
    assert metrics["ece"] == pytest.approx(0.345)
    assert metrics["accuracy"] == pytest.approx(4 / 6)


def test_ece_perfectly_calibrated_is_zero():
    # Two samples at confidence .5 (one right, one wrong) and one at 1.0 that is right.
    proba = np.array([[0.5, 0.5], [0.5, 0.5], [1.0, 0.0]])
    assert M.expected_calibration_error([0, 1, 0], proba) == pytest.approx(0.0)


def test_classification_metrics_against_sklearn():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(60, 5))
    proba = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    y = rng.integers(0, 5, size=60)
    y[:5] = np.arange(5)  # every class present
    m = M.classification_metrics(y, proba)
    assert set(m) == {"accuracy", "weighted_f1", "auroc_macro", "top3_accuracy", "ece"}
    assert m["accuracy"] == pytest.approx(np.mean(proba.argmax(1) == y))
    assert m["weighted_f1"] == pytest.approx(f1_score(y, proba.argmax(1), average="weighted"))
    assert m["auroc_macro"] == pytest.approx(roc_auc_score(y, proba, multi_class="ovr", average="macro"))
    assert m["top3_accuracy"] == pytest.approx(top_k_accuracy_score(y, proba, k=3, labels=np.arange(5)))


def test_classification_metrics_with_string_labels():
    labels = ["apple", "kiwi", "pear"]
    y_names = [labels[i] for i in ECE_Y]
    assert M.classification_metrics(y_names, ECE_PROBA, labels=labels) == M.classification_metrics(ECE_Y, ECE_PROBA)
    with pytest.raises(ValueError, match="fig"):
        M.classification_metrics(["fig"] + y_names[1:], ECE_PROBA, labels=labels)


def test_auroc_over_present_classes_by_hand():
    # Class 2 never occurs: it is left out. Class 0 scores separate perfectly (AUC 1);
    # class 1: positives .6, .3 vs negatives .1, .5 -> 3 of 4 pairs ordered -> .75.
    proba = np.array([[0.6, 0.1, 0.3], [0.4, 0.5, 0.1], [0.3, 0.6, 0.1], [0.2, 0.3, 0.5]])
    y = np.array([0, 0, 1, 1])
    assert M.auroc_ovr_macro(y, proba) == pytest.approx((1.0 + 0.75) / 2)
    assert M.classification_metrics(y, proba)["auroc_macro"] == pytest.approx(0.875)
    assert math.isnan(M.auroc_ovr_macro([1, 1], proba[:2]))


def test_auroc_equals_sklearn_per_class_with_ties_and_absent_classes():
    # Scores rounded to one decimal: many ties within and across positives and negatives. Class 6
    # never occurs (left out); sklearn scores each present class on its own column.
    rng = np.random.default_rng(3)
    for n, classes in ((12, 3), (50, 7), (200, 65)):
        proba = np.round(rng.dirichlet(np.ones(classes), size=n), 1)
        y = rng.integers(0, classes, size=n)
        y[y == 6] = 0
        present = np.unique(y)
        expected = np.mean([roc_auc_score(y == c, proba[:, c]) for c in present])
        assert M.auroc_ovr_macro(y, proba) == pytest.approx(expected, abs=1e-12)


def test_top3_accuracy_by_hand():
    proba = np.array(
        [
            [0.40, 0.30, 0.15, 0.10, 0.05],  # y=2: rank 3 -> hit
            [0.40, 0.30, 0.15, 0.10, 0.05],  # y=3: rank 4 -> miss
            [0.05, 0.10, 0.15, 0.30, 0.40],  # y=4: rank 1 -> hit
            [0.05, 0.10, 0.15, 0.30, 0.40],  # y=0: rank 5 -> miss
        ]
    )
    y = np.array([2, 3, 4, 0])
    assert M.top_k_accuracy(y, proba, 3) == pytest.approx(0.5)
    assert M.classification_metrics(y, proba)["top3_accuracy"] == pytest.approx(0.5)
    assert M.top_k_accuracy(y, proba, 1) == pytest.approx(0.25)


def test_per_class_table_and_confusion_by_hand():
    y_true = [0, 0, 1, 2]
    y_pred = [0, 1, 1, 1]
    table = M.per_class_table(y_true, y_pred, ["apple", "kiwi", "pear", "fig"])
    assert [row["class"] for row in table] == ["apple", "kiwi", "pear", "fig"]
    apple, kiwi, pear, fig = table
    assert (apple["precision"], apple["recall"], apple["f1"], apple["support"]) == pytest.approx((1.0, 0.5, 2 / 3, 2))
    assert (kiwi["precision"], kiwi["recall"], kiwi["f1"], kiwi["support"]) == pytest.approx((1 / 3, 1.0, 0.5, 1))
    assert (pear["precision"], pear["recall"], pear["f1"], pear["support"]) == (0.0, 0.0, 0.0, 1)
    assert fig["support"] == 0
    cm = M.confusion(y_true, y_pred, 4)
    expected = np.zeros((4, 4), dtype=np.int64)
    expected[0, 0] = 1
    expected[0, 1] = 1
    expected[1, 1] = 1
    expected[2, 1] = 1
    np.testing.assert_array_equal(cm, expected)


def _polar(angles_deg, radii):
    a = np.deg2rad(np.asarray(angles_deg, dtype=np.float64))
    return np.stack([np.cos(a), np.sin(a)], axis=1) * np.asarray(radii, dtype=np.float64)[:, None]


def test_knn_purity_by_hand():
    # Angles 0, 15, 35 (label a) and 90, 100, 170 (label b); radii vary, cosine ignores them.
    # k=2 neighbours: 0->{15,35} 15->{0,35} 35->{15,0} 90->{100,35} 100->{90,35} 170->{100,90}
    # purities 1, 1, 1, .5, .5, 1 -> 5/6.
    x = _polar([0, 15, 35, 90, 100, 170], [1.0, 3.0, 10.0, 0.5, 2.0, 1.0])
    labels = np.array(["a", "a", "a", "b", "b", "b"])
    assert M.knn_purity(x, labels, k=2) == pytest.approx(5 / 6)
    assert M.knn_purity(x, labels, k=1) == pytest.approx(1.0)
    # k = 5 = everything else: each point sees 2 of its own label among 5 others.
    assert M.knn_purity(x, labels, k=5) == pytest.approx(2 / 5)
    assert M.knn_purity(x, labels, k=50) == pytest.approx(2 / 5)  # capped at n - 1


def test_distance_spearman_by_hand_and_against_scipy():
    # Embedding angles equal to 1-D profile positions: 1 - cos(dθ) is monotone in dθ -> rho = 1.
    angles = np.array([0.0, 30.0, 60.0, 100.0])
    x = _polar(angles, [1.0, 2.0, 0.5, 4.0])
    assert M.distance_spearman(x, angles[:, None]) == pytest.approx(1.0)
    rng = np.random.default_rng(1)
    emb, prof = rng.normal(size=(12, 6)), rng.normal(size=(12, 4))
    expected = spearmanr(pdist(emb, "cosine"), pdist(prof, "euclidean")).statistic
    assert M.distance_spearman(emb, prof) == pytest.approx(expected)


def test_nutrient_r2_by_hand_and_against_sklearn():
    true = np.array([[1.0, 2.0], [2.0, 4.0], [3.0, 6.0]])
    pred = np.array([[1.0, 2.0], [2.0, 5.0], [3.0, 6.0]])
    # column 0 exact -> 1; column 1: SS_res 1, SS_tot 8 -> 7/8; mean .9375.
    r2 = M.nutrient_r2(true, pred, ["Protein", "Fat"])
    assert r2["per_nutrient"] == pytest.approx({"Protein": 1.0, "Fat": 0.875})
    assert r2["overall"] == pytest.approx(0.9375)
    assert r2["overall"] == pytest.approx(r2_score(true, pred))


def test_precision_recall_at_k_by_hand():
    ranking = {
        "apple": ["m1", "m2", "m3", "m4"],
        "pear": ["m5", "m6", "m7"],
        "kiwi": ["m1", "m2"],
    }
    reference = {"apple": {"m2", "m9"}, "pear": {"m7"}, "fig": {"m1"}, "kiwi": set()}
    # fig is not ranked and kiwi has no markers: only apple and pear count.
    # k=2: apple {m1,m2} -> 1 hit: P 1/2, R 1/2; pear {m5,m6} -> 0.
    assert M.precision_recall_at_k(ranking, reference, k=2) == pytest.approx((0.25, 0.25))
    # k=3: apple 1 hit: P 1/3, R 1/2; pear m7: P 1/3, R 1.
    assert M.precision_recall_at_k(ranking, reference, k=3) == pytest.approx((1 / 3, 0.75))
    p, r = M.precision_recall_at_k(ranking, {"fig": {"m1"}}, k=3)
    assert math.isnan(p) and math.isnan(r)


def test_jaccard_and_stability_by_hand():
    a, b, c = [1, 2, 3, 4], [3, 2, 5, 6], [1, 2, 3, 7]
    assert M.jaccard_at_k(a, b, 3) == pytest.approx(2 / 4)
    assert M.jaccard_at_k(a, b, 4) == pytest.approx(2 / 6)
    assert M.jaccard_at_k([], [], 3) == 1.0
    # k=3 pairs: (a,b) 2/4, (a,c) 3/3, (b,c) {3,2,5} vs {1,2,3} = 2/4 -> mean 2/3.
    assert M.stability_jaccard([a, b, c], k=3) == pytest.approx(2 / 3)
    runs = [{"apple": a, "pear": a}, {"apple": b, "pear": a, "kiwi": c}]
    # common foods apple (1/2) and pear (1) -> 3/4.
    assert M.stability_jaccard(runs, k=3) == pytest.approx(0.75)
    with pytest.raises(ValueError):
        M.stability_jaccard([a], k=3)


def test_fidelity_by_hand():
    full = [0.9, 0.8, 0.6]
    removed = [0.2, 0.5, 0.6]
    kept = [0.85, 0.9, 0.3]
    plus, minus = M.fidelity(full, removed, kept)
    assert plus == pytest.approx((0.7 + 0.3 + 0.0) / 3)
    assert minus == pytest.approx((0.05 - 0.1 + 0.3) / 3)


def test_read_biomarkers(tmp_path):
    path = tmp_path / "markers.csv"
    path.write_text("\ufefffeature,category,note\n 12 ,apple,x\n13,apple,\n12,apple,dup\n7,pear,\n", encoding="utf-8")
    assert M.read_biomarkers(path) == {"apple": {"12", "13"}, "pear": {"7"}}
    assert M.biomarkers_from_pairs([("12", "apple"), (7, "pear")]) == {"apple": {"12"}, "pear": {"7"}}


@pytest.mark.parametrize(
    "text, needle",
    [
        ("molecule,category\n1,apple\n", "'feature'"),
        ("feature,food\n1,apple\n", "'category'"),
        ("feature,category\n1,\n", "line 2: empty 'category'"),
        ("feature,category\n", "no biomarker rows"),
        ("", "'feature'"),
    ],
)
def test_read_biomarkers_errors_name_file_and_column(tmp_path, text, needle):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(UserError) as info:
        M.read_biomarkers(path)
    assert str(path) in str(info.value) and needle in str(info.value)
    assert "\n" not in str(info.value)


def test_read_biomarkers_missing_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        M.read_biomarkers(tmp_path / "nope.csv")


def test_fit_temperature_recovers_the_scale_of_a_miscalibrated_model():
    """Labels drawn from softmax(z): logits 2z are over-confident by T = 2, z / 3 under-confident by
    T = 1/3; temperature scaling must find those scales, and the scaled probabilities are calibrated."""
    from jaxfood.eval.metrics import expected_calibration_error, fit_temperature

    rng = np.random.default_rng(0)
    z = rng.normal(0.0, 2.0, (4000, 6))
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    y = np.array([rng.choice(6, p=row) for row in p])
    assert abs(fit_temperature(2.0 * z, y) - 2.0) < 0.15
    assert abs(fit_temperature(z / 3.0, y) - 1.0 / 3.0) < 0.03
    t = fit_temperature(2.0 * z, y)
    scaled = np.exp(2.0 * z / t - (2.0 * z / t).max(1, keepdims=True))
    scaled /= scaled.sum(1, keepdims=True)
    raw = np.exp(2.0 * z - (2.0 * z).max(1, keepdims=True))
    raw /= raw.sum(1, keepdims=True)
    assert expected_calibration_error(y, scaled) < 0.5 * expected_calibration_error(y, raw)
    assert fit_temperature(np.zeros((0, 3)), np.zeros(0, int)) == 1.0
