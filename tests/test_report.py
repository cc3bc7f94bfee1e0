from jaxfood.eval.report import render_report

METRICS = {
    "food_classification": {"accuracy": 0.70, "weighted_f1": 0.69, "auroc_macro": 0.95, "top3_accuracy": 0.9, "ece": 0.05},
    "nutrition": {"knn_purity": 0.6, "spearman": 0.4, "nutrient_r2": 0.5},
    "salient_molecules": {"precision_at_10": 0.3, "recall_at_10": 0.5, "fidelity_plus": 0.4, "fidelity_minus": 0.1,
                          "stability_jaccard": 0.8},
    "baselines": {"logreg_accuracy": 0.80, "logreg_weighted_f1": 0.6, "rf_accuracy": 0.5, "ridge_nutrient_r2": 0.2,
                  "fold_change_precision_at_10": 0.2, "random_precision_at_10": 0.01},
    "pretrained_probe": {"food_classification": {"accuracy": 0.5}},
    "from_scratch": {"food_classification": {"accuracy": 0.75}},
    "task_weights": {"food": 1.2, "nutrition": 0.8},
    "runtime_s": 123.4,
}


def test_report_says_plainly_where_the_model_loses(tmp_path):
    fig = tmp_path / "figures" / "cm.png"
    text = render_report(METRICS, {"Confusion matrix": fig}, "a: 1\n", workdir=tmp_path)
    assert "jaxfood (0.700) is behind the logistic regression baseline (0.800)" in text
    assert "fine-tuning (0.700) is behind training from scratch (0.750)" in text
    # Where the model is ahead, no such sentence.
    assert "behind the random forest" not in text and "ridge regression baseline" not in text
    assert "![Confusion matrix](figures/cm.png)" in text
    assert "| Accuracy ↑ | **0.700** | 0.500 | 0.750 | 0.800 (logistic regression) |" in text
    assert "123.4 s" in text and "```yaml\na: 1\n```" in text


def test_report_without_baselines_has_no_verdict_notes():
    metrics = {k: v for k, v in METRICS.items() if k in ("food_classification", "nutrition")}
    text = render_report(metrics)
    assert "behind" not in text.split("## Verdict")[1]
    assert "## Salient molecule discovery" not in text
