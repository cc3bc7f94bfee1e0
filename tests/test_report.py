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
    "untrained": {"food_classification": {"accuracy": 0.02}},
    "seed_std": {"food_classification": {"accuracy": 0.01}, "baselines": {"logreg_accuracy": 0.02}},
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
    # every column, the spread over seeds where the run has it (model and baseline here)
    assert "| Accuracy ↑ | **0.700 ± 0.010** | 0.500 | 0.750 | 0.020 | 0.800 ± 0.020 (logistic regression) |" in text
    assert "123.4 s" in text and "```yaml\na: 1\n```" in text
    assert "fidelity+ 0.400 < fidelity−" not in text  # fidelity+ is above fidelity− here


def test_report_lists_every_scorer_and_says_when_fidelity_fails():
    salient = {**METRICS["salient_molecules"], "fidelity_plus": 0.05, "fidelity_minus": 0.2, "scorer": "a",
               "per_scorer": {"a": {"precision_at_10": 0.3}, "b": {"precision_at_10": 0.25}}}
    text = render_report({**METRICS, "salient_molecules": salient})
    assert "| Precision@10, b scorer | 0.250 | | | | |" in text and "a scorer" not in text
    assert "(fidelity+ 0.050 < fidelity− 0.200)" in text


def test_report_without_baselines_has_no_verdict_notes():
    metrics = {k: v for k, v in METRICS.items() if k in ("food_classification", "nutrition")}
    text = render_report(metrics)
    assert "behind" not in text.split("## Verdict")[1]
    assert "## Salient molecule discovery" not in text


# ---- report_assets: the figures and sections run_mtl.py adds to report.md ---------------------------
import dataclasses  # noqa: E402
import math  # noqa: E402
import types  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

TINY = [
    "steps=3", "eval_every=3", "patience=0", "scorers=[intensity_attribution]", "figures=false", "tensorboard=false",
    "encoder.hidden_dim=8", "encoder.num_heads=2", "encoder.embedding_dim=8", "encoder.num_layers=1",
    "heads.hidden_dim=8", "heads.pool_dim=8", "heads.attention_dim=4", "heads.projection_dim=4",
    "loss.salient_top_k=3", "salient_k=3",
]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A small simulated graph, its simulator biomarkers and a checkpoint of the tiny model at its
    initial parameters (the assets only need *a* model; training would only cost time)."""
    import jax

    from jaxfood.config import load_config
    from jaxfood.data.build import build_graph
    from jaxfood.data.simulate import SimConfig, simulate
    from jaxfood.eval.metrics import biomarkers_from_pairs
    from jaxfood.graph.splits import prepare_graph
    from jaxfood.models.heads import make_multitask_model
    from jaxfood.train.checkpoint import save_checkpoint
    from jaxfood.train.finetune import FinetuneConfig, checkpoint_meta

    root = tmp_path_factory.mktemp("report")
    ds = simulate(SimConfig(replicates_per_food=4, num_molecules=400, nutrient_linked_per_class=20, background=40,
                            contaminants=20, embedding_dim=4), seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = build_graph(ds.tables, seed=0)
    reference = biomarkers_from_pairs(ds.biomarkers)
    cfg = load_config(FinetuneConfig(), None, TINY)
    model = make_multitask_model(prepare_graph(graph), cfg.encoder, cfg.heads)
    params = model.init(jax.random.key(1), prepare_graph(graph))
    save_checkpoint(root / "checkpoints", 1, {"params": params}, checkpoint_meta(cfg, cfg.encoder, graph, None, None))
    result = types.SimpleNamespace(params=params, config=cfg, encoder_config=cfg.encoder)
    return root, graph, reference, result, model


def test_report_assets_figures_and_tables(tiny_run):
    from sklearn.metrics import precision_recall_fscore_support

    from jaxfood.eval.pipeline import food_rankings, report_assets
    from jaxfood.graph import schema
    from jaxfood.graph.hetero_graph import SPLIT_CODES
    from jaxfood.graph.splits import prepare_graph
    from jaxfood.train.finetune import load_finetuned
    from jaxfood.train.multitask import make_predict_fn

    root, graph, reference, result, model = tiny_run
    assets = report_assets(load_finetuned(root / "checkpoints", graph), graph, root, METRICS, reference, k=3, max_foods=4,
                           biomarker_foods=3)
    names = {p.name for p in assets.figures.values()}
    assert names == {"confusion_matrix.png", "food_embeddings_category.png", "food_embeddings_protein.png",
                     "top_molecules.png", "model_vs_baselines.png"}
    for path in assets.figures.values():
        assert path.parent == root / "figures" and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Per-food table = sklearn on the model's own test predictions.
    out = make_predict_fn(model)(result.params, prepare_graph(graph))
    labels, split = np.asarray(graph.sample_food), np.asarray(graph.sample_split)
    test = (split == SPLIT_CODES["test"]) & (labels >= 0)
    pred = np.argmax(np.asarray(out.food_logits), 1)[test]
    foods = graph.meta.node_ids[schema.FOOD]
    p, r, f, s = precision_recall_fscore_support(labels[test], pred, labels=np.arange(len(foods)), zero_division=0)
    sections = dict(assets.sections)
    table = sections["Food classification per food (test split)"]
    i = int(np.nonzero(s)[0][0])
    cat = graph.meta.food_categories[int(np.asarray(graph.food_category)[i])]
    assert f"| {foods[i]} | {cat} | {p[i]:.2f} | {r[i]:.2f} | {f[i]:.2f} | {int(s[i])} |" in table
    assert f"**{np.mean(f[s > 0]):.3f}**" in table

    # Biomarker list: the top-3 of the headline scorer, reference biomarkers in bold.
    top = food_rankings(result, graph, k=3)
    assert top == food_rankings(load_finetuned(root / "checkpoints", graph), graph, k=3)  # FinetuneResult and checkpoint agree
    listing = next(v for t, v in assets.sections if t.startswith("Salient molecules"))
    rows = [line for line in listing.splitlines() if line.startswith("| ") and not line.startswith("| Food")]
    assert len(rows) == 3
    food = rows[0].split(" | ")[0][2:]
    from jaxfood.graph import schema
    from jaxfood.graph.hetero_graph import molecule_label

    pos = {m: i for i, m in enumerate(graph.meta.node_ids[schema.MOLECULE])}
    shown = {m: molecule_label(graph, pos[m]) for m in top[food]}  # id (m/z ..., RT ...)
    want = ", ".join(f"**{shown[m]}**" if m in reference.get(food, ()) else shown[m] for m in top[food])
    assert f"| {food} | {want} |" in listing and "m/z" in want

    again = report_assets(result, graph, root / "again", None, reference, k=3, fold_change=False)
    assert "jaxfood vs ablations" not in " ".join(again.figures)  # no metrics: no comparison chart

    stab = 0.625
    text = render_report({**METRICS, "salient_molecules": {**METRICS["salient_molecules"], "stability_jaccard": stab}},
                         assets.figures, None, workdir=root, extra_sections=assets.sections)
    assert "![Confusion matrix (test split, foods grouped by USDA category)](figures/confusion_matrix.png)" in text
    assert "## Food classification per food (test split)" in text and "## Salient molecules of a few foods" in text
    assert f"| Stability under input perturbation (Jaccard of top-10 lists) ↑ | **{stab:.3f}** |" in text
    assert "Stability across seeds" not in text  # one seed: the row is left out, not shown empty
    assert "jaxfood (0.700) is behind the logistic regression baseline (0.800)" in text


def test_seed_stability_hand_values():
    from jaxfood.eval.pipeline import seed_stability

    a = {"f": ["m1", "m2", "m3"], "g": ["x", "y"]}
    b = {"f": ["m1", "m2", "m4"], "g": ["x", "y"]}
    c = {"f": ["m5", "m6", "m7"]}
    # a-b: f 2/4, g 1 -> 0.75; a-c: f 0 (g only in a); b-c: f 0 -> mean 0.25
    assert seed_stability([a, b, c], k=3) == pytest.approx(0.25)
    assert seed_stability([a, b], k=2) == pytest.approx(1.0)  # top-2 of f agree
    assert math.isnan(seed_stability([a], k=3))


def test_nutrient_choice_values_and_representative_foods():
    from conftest import make_toy_graph

    from jaxfood.eval.pipeline import choose_nutrient, nutrient_values, representative_foods
    from jaxfood.graph import schema

    graph = make_toy_graph(num_foods=6, num_nutrients=4)
    # No 'Protein': the most variable nutrient.
    assert choose_nutrient(graph) == int(np.argmax(np.var(np.asarray(graph.food_nutrients), 0)))
    assert choose_nutrient(graph, "N2") == 2
    with pytest.raises(ValueError, match="nutrient 'Zinc' is not in the graph"):
        choose_nutrient(graph, "Zinc")
    # z-scores undone with the stored statistics; a food without the edge is missing (NaN).
    edges = graph.edges[schema.HAS_NUTRIENT]
    keep = ~((np.asarray(edges.senders) == 0) & (np.asarray(edges.receivers) == 1))
    edges = edges.replace(senders=np.asarray(edges.senders)[keep], receivers=np.asarray(edges.receivers)[keep],
                          attributes=np.asarray(edges.attributes)[keep])
    meta = dataclasses.replace(graph.meta, normalisation={"has_nutrient": {"mean": [0.0, 10.0, 0.0, 0.0],
                                                                          "std": [1.0, 2.0, 1.0, 1.0]}})
    g2 = graph.replace(edges={**graph.edges, schema.HAS_NUTRIENT: edges}, meta=meta)
    values = nutrient_values(g2, 1)
    assert math.isnan(values[0])
    np.testing.assert_allclose(values[1:], np.asarray(graph.food_nutrients)[1:, 1] * 2.0 + 10.0, rtol=1e-6)
    # Categories cat_a (f0, f2, f4) and cat_b (f1, f3, f5): round-robin, then by category.
    assert representative_foods(graph, None, 3) == ["f0", "f2", "f1"]
    assert representative_foods(graph, {"f4": {"m1"}}, 2) == ["f4", "f1"]




def test_figures_that_print_the_same_are_a_tie_not_a_loss():
    metrics = {**METRICS, "food_classification": {**METRICS["food_classification"], "accuracy": 0.7996},
               "from_scratch": {"food_classification": {"accuracy": 0.8004}},
               "nutrition": {**METRICS["nutrition"], "nutrient_r2": 0.1994}}
    text = render_report(metrics)
    assert "behind the logistic regression baseline" not in text  # 0.800 vs 0.800
    assert "behind training from scratch" not in text
    assert "jaxfood (0.199) is behind the ridge regression baseline (0.200)" in text  # 0.199 < 0.200


def test_auroc_top3_and_calibration_rows_carry_the_logistic_regression():
    baselines = {**METRICS["baselines"], "logreg_auroc_macro": 0.97, "logreg_top3_accuracy": 0.85, "logreg_ece": 0.02}
    text = render_report({**METRICS, "baselines": baselines})
    assert "| Macro AUROC (one-vs-rest) ↑ | **0.950** | – | – | – | 0.970 (logistic regression) |" in text
    assert "jaxfood (0.950) is behind the logistic regression baseline (0.970)" in text
    assert "| Top-3 accuracy ↑ | **0.900** |" in text and "0.850 (logistic regression)" in text
    # lower is better: an ECE of 0.05 against 0.02 is behind
    assert "On expected calibration error, jaxfood (0.050) is behind the logistic regression baseline (0.020)" in text
