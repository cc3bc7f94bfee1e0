"""The evaluation protocol: nothing reported as a test figure depends on the labels of held-out
samples except the figures that score predictions against them, and checkpoint selection never
looks at the test split."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from jaxfood import cli
from jaxfood.graph.hetero_graph import SPLIT_CODES, save_graph

SCORERS = ("intensity_attribution", "input_gradient", "class_attention", "attention", "gat_attention", "gradient")
TINY = [
    "steps=4", "eval_every=2", "patience=0", "figures=false", "tensorboard=false", "weighting.method=static",
    "encoder.hidden_dim=8", "encoder.num_heads=2", "encoder.embedding_dim=8", "encoder.num_layers=1",
    "heads.hidden_dim=8", "heads.pool_dim=8", "heads.attention_dim=4", "heads.projection_dim=4",
    "loss.salient_top_k=3", "salient_k=3", "stability_perturbations=1", f"scorers=[{', '.join(SCORERS)}]",
]


def _simulated():
    from jaxfood.data.build import build_graph
    from jaxfood.data.simulate import SimConfig, simulate

    cfg = SimConfig(replicates_per_food=4, num_molecules=400, nutrient_linked_per_class=20, background=40,
                    contaminants=20, embedding_dim=4)
    ds = simulate(cfg, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = build_graph(ds.tables, seed=0)
    return graph, ds.biomarkers


def permute_labels(graph, splits=("val", "test"), seed=0):
    """``graph`` with the food labels of the samples of ``splits`` permuted among themselves."""
    food = np.asarray(graph.sample_food).copy()
    split = np.asarray(graph.sample_split)
    chosen = np.nonzero(np.isin(split, [SPLIT_CODES[s] for s in splits]) & (food >= 0))[0]
    food[chosen] = food[chosen][np.random.default_rng(seed).permutation(chosen.size)]
    assert np.mean(food[chosen] != np.asarray(graph.sample_food)[chosen]) > 0.5  # the labels really moved
    return graph.replace(sample_food=food)


@pytest.fixture(scope="module")
def simulated():
    return _simulated()


def test_held_out_labels_move_only_the_metrics_scored_against_them(simulated, tmp_path):
    """Issue 16, done when: permuting the food labels of every non-training sample changes neither
    precision/recall@k of any scorer nor the rankings nor any Food-level nutrition metric that
    `jaxfood evaluate` reports; the classification metrics (scored against those labels) move."""
    import jax

    from jaxfood.config import load_config
    from jaxfood.eval.evaluator import as_reference
    from jaxfood.eval.pipeline import scorer_rankings
    from jaxfood.graph.splits import prepare_graph
    from jaxfood.models.heads import make_multitask_model
    from jaxfood.train.checkpoint import save_checkpoint
    from jaxfood.train.finetune import FinetuneConfig, checkpoint_meta, load_finetuned

    graph, pairs = simulated
    reference = as_reference(pairs)
    cfg = load_config(FinetuneConfig(), None, TINY)
    dgraph = prepare_graph(graph)
    model = make_multitask_model(dgraph, cfg.encoder, cfg.heads)
    params = model.init(jax.random.key(3), dgraph)
    # The linear path starts at 0 (its attribution would be all ties): give it weights to rank by.
    kernel = params["classifier"]["wide_kernel"]
    params["classifier"]["wide_kernel"] = jax.random.normal(jax.random.key(4), kernel.shape, kernel.dtype)
    ckpt = tmp_path / "checkpoints"
    save_checkpoint(ckpt, 1, {"params": params}, checkpoint_meta(cfg, cfg.encoder, graph, None,
                                                                   {"biomarkers": {f: sorted(m) for f, m in reference.items()}}))

    permuted = permute_labels(graph)
    metrics, rankings = {}, {}
    for name, g in (("original", graph), ("permuted", permuted)):
        save_graph(g, tmp_path / name)
        out = tmp_path / f"{name}.json"
        assert cli.main(["evaluate", "--checkpoint", str(ckpt), "--graph", str(tmp_path / name),
                         "--out", str(out)]) == 0
        metrics[name] = json.loads(out.read_text())
        rankings[name] = scorer_rankings(load_finetuned(ckpt, g), g, k=20, scorers=SCORERS)

    a, b = metrics["original"], metrics["permuted"]
    assert set(a["salient_molecules"]["per_scorer"]) == set(SCORERS)
    for scorer in SCORERS:
        for key in ("precision_at_3", "recall_at_3"):
            assert a["salient_molecules"]["per_scorer"][scorer][key] == b["salient_molecules"]["per_scorer"][scorer][key], (scorer, key)
        assert rankings["original"][scorer] == rankings["permuted"][scorer], scorer
    assert a["salient_molecules"]["stability_jaccard"] == b["salient_molecules"]["stability_jaccard"]
    food_level = [*a["nutrition"]["in_sample"], "num_foods_in_sample"]
    assert {"spearman", "knn_purity"} <= set(food_level)
    for key in food_level:
        assert a["nutrition"][key] == b["nutrition"][key], key
    for section in ("food_classification", "nutrition", "salient_molecules"):
        assert a[section]["num_samples"] == b[section]["num_samples"] > 0, section
    # The permutation bites where it must: the metrics scored against the held-out labels move.
    # (a tiny model may get no test sample right before and after; nutrient R² is scored against the
    # permuted foods' profiles and moves regardless)
    assert a["food_classification"]["accuracy"] != b["food_classification"]["accuracy"] or \
        a["food_classification"]["weighted_f1"] != b["food_classification"]["weighted_f1"] or \
        a["nutrition"]["nutrient_r2"] != b["nutrition"]["nutrient_r2"]
    assert a["nutrition"]["nutrient_r2"] != b["nutrition"]["nutrient_r2"]


def test_checkpoint_selection_evaluates_val_only(simulated, tmp_path, monkeypatch):
    """During training only the val split is evaluated (the test split once, at the end), and
    permuting the test labels changes neither the validation history nor the kept checkpoint."""
    from jaxfood.config import load_config
    from jaxfood.eval.evaluator import Evaluator
    from jaxfood.train.finetune import FinetuneConfig
    from jaxfood.workflows import finetune

    graph, pairs = simulated
    calls = []
    evaluate = Evaluator.evaluate

    def spy(self, params, split="test", *args, **kwargs):
        calls.append(split)
        return evaluate(self, params, split, *args, **kwargs)

    monkeypatch.setattr(Evaluator, "evaluate", spy)
    cfg = load_config(FinetuneConfig(), None, [*TINY, "scorers=[attention]", "stability_perturbations=0"])
    a = finetune(graph, cfg, tmp_path / "a", biomarkers=pairs, progress=False)
    assert calls == ["val", "val", "test"], calls
    b = finetune(permute_labels(graph, ("test",)), cfg, tmp_path / "b", biomarkers=pairs, progress=False)
    np.testing.assert_equal(a.history["val"], b.history["val"])
    assert a.best_step == b.best_step
    np.testing.assert_equal(jax_leaves(a.params), jax_leaves(b.params))


def jax_leaves(tree):
    import jax

    return [np.asarray(x) for x in jax.tree_util.tree_leaves(tree)]


def test_in_sample_metrics_are_refused_as_selection_criteria():
    from jaxfood.config import load_config
    from jaxfood.errors import ConfigError
    from jaxfood.train.finetune import FinetuneConfig, check_config

    for key in ("nutrition.spearman", "nutrition.knn_purity", "salient_molecules.precision_at_10"):
        cfg = load_config(FinetuneConfig(), None, [f"selection={{{key}: 1.0}}"])
        with pytest.raises(ConfigError, match=key):
            check_config(cfg)
    check_config(FinetuneConfig())  # the default selects on validation samples only
