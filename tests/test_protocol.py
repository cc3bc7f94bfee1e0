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
    # Food-level figures: on the foods held out of the nutrition training, and in-sample on the others.
    assert a["nutrition"]["num_foods"] == 7 and a["nutrition"]["num_foods_in_sample"] == 58
    assert set(a["nutrition"]["in_sample"]) == {"spearman_in_sample", "knn_purity_in_sample"}
    food_level = ["spearman", "knn_purity", "num_foods", "foods_digest", *a["nutrition"]["in_sample"],
                  "num_foods_in_sample"]
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


@pytest.mark.slow
def test_checkpoint_selection_evaluates_val_only(tmp_path, monkeypatch):
    """During training only the val split is evaluated (the test split once, at the end), and
    permuting the test labels changes neither the validation history nor the kept checkpoint.
    (test_finetune's graph and configuration: a worker that ran its runs has the programs compiled.)"""
    from conftest import make_toy_graph
    from test_finetune import SMALL

    from jaxfood.config import load_config
    from jaxfood.eval.evaluator import Evaluator
    from jaxfood.train.finetune import FinetuneConfig
    from jaxfood.workflows import finetune

    graph, pairs = make_toy_graph(), [("m0", "f0"), ("m1", "f0"), ("m3", "f1"), ("m4", "f1")]
    calls = []
    evaluate = Evaluator.evaluate

    def spy(self, params, split="test", *args, **kwargs):
        calls.append(split)
        return evaluate(self, params, split, *args, **kwargs)

    monkeypatch.setattr(Evaluator, "evaluate", spy)
    cfg = load_config(FinetuneConfig(), None, SMALL)
    a = finetune(graph, cfg, tmp_path / "a", biomarkers=pairs, progress=False)
    # The fitted starting state (step 0) and the trained states are selected on val alone.
    assert [row["step"] for row in a.history["val"]][0] == 0
    assert calls == ["val"] * (len(calls) - 1) + ["test"] and len(calls) >= 3, calls
    # One evaluation a history row, and one for each trained state composed into the kept start
    # (the start with its nutrient head is scored too; never at step 0).
    assert len(a.history["val"]) <= len(calls) - 1 <= 2 * len(a.history["val"]) - 1, calls
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


# ---- foods held out of the nutrition training ------------------------------------------------------
def _with_profiles_changed(graph, foods, seed=0):
    """``graph`` with new nutrient profiles for ``foods`` [F] bool wherever a profile appears:
    ``food_nutrients``, the ``has_nutrient`` edge attributes (both directions), the Food features."""
    from jaxfood.graph import schema

    rng = np.random.default_rng(seed)
    profiles = np.asarray(graph.food_nutrients).copy()
    profiles[foods] = rng.normal(size=profiles[foods].shape) * 3
    edges = dict(graph.edges)
    for key, end in ((schema.HAS_NUTRIENT, "senders"), (schema.reverse_key(schema.HAS_NUTRIENT), "receivers")):
        e = edges[key]
        attributes = np.asarray(e.attributes).copy()
        hit = foods[np.asarray(getattr(e, end))]
        attributes[hit, 0] = rng.normal(size=hit.sum()) * 3
        edges[key] = e.replace(attributes=attributes)
    features = dict(graph.node_features, **{schema.FOOD: profiles})
    return graph.replace(food_nutrients=profiles, edges=edges, node_features=features)


def _gradients(graphs, loss_cfg):
    """Gradients of the summed task losses of one training step on each of ``graphs`` (same
    shapes and meta: one compilation): what training takes from a graph."""
    import jax

    from jaxfood.graph.splits import prepare_graph
    from jaxfood.models.encoder import EncoderConfig
    from jaxfood.models.heads import HeadsConfig, make_multitask_model
    from jaxfood.train import multitask as mt

    dgraphs = [prepare_graph(g) for g in graphs]
    encoder = EncoderConfig(hidden_dim=8, num_heads=2, num_layers=1, embedding_dim=8, dropout=0.0,
                            input_modes={"Sample": "shared", "Molecule": "both", "Food": "both"})
    model = make_multitask_model(dgraphs[0], encoder, HeadsConfig(hidden_dim=8, pool_dim=8, attention_dim=4,
                                                                  projection_dim=4, dropout=0.0, wide=False))
    params = model.init(jax.random.key(0), dgraphs[0])
    seed_mask = np.asarray(graphs[0].sample_split) == SPLIT_CODES["train"]

    @jax.jit
    def grads(dgraph):
        def total(p):
            return mt.task_losses(model, loss_cfg, p, dgraph, mt.Batch(seed_mask, jax.random.key(1)))[0].sum()
        return jax.grad(total)(params)

    out = [jax_leaves(grads(d)) for d in dgraphs]
    assert grads._cache_size() == 1
    return out


def test_held_out_foods_profiles_never_reach_the_food_inputs_or_the_triplet_loss():
    """New nutrient profiles for the held-out foods (every place a profile is stored) leave the
    model input and the training gradients unchanged; new profiles for as many training foods
    change them (the check can fail). The sample-level nutrient MSE is off here: it supervises a
    training sample with its food's profile, held out or not (the one path this hold-out leaves)."""
    from conftest import make_toy_graph

    from jaxfood.graph.splits import held_out_food_mask, prepare_graph
    from jaxfood.train import multitask as mt

    graph = make_toy_graph(num_samples=48, num_molecules=30, num_foods=12, per_sample=6, seed=0)
    held_out = held_out_food_mask(graph)
    assert held_out.sum() == 3
    trained = np.nonzero(~held_out)[0][:3]
    other = np.zeros_like(held_out)
    other[trained] = True

    hidden = _with_profiles_changed(graph, held_out)
    a, b = prepare_graph(graph), prepare_graph(hidden)
    assert not np.array_equal(np.asarray(a.food_nutrients), np.asarray(b.food_nutrients))  # the targets moved
    np.testing.assert_equal(jax_leaves(a.replace(food_nutrients=b.food_nutrients)), jax_leaves(b))

    loss_cfg = mt.LossConfig(nutrient_mse_weight=0.0, salient_top_k=3)
    base, same, moved = _gradients([graph, hidden, _with_profiles_changed(graph, other)], loss_cfg)
    np.testing.assert_equal(same, base)
    assert any(not np.array_equal(x, y) for x, y in zip(moved, base))


def test_held_out_foods_are_drawn_from_the_seed_and_fingerprinted(simulated):
    from jaxfood.errors import CheckpointError
    from jaxfood.graph.splits import (
        check_split_matches,
        held_out_food_mask,
        num_held_out_foods,
        resplit,
        split_fingerprint,
        with_splits,
    )

    assert [num_held_out_foods(n, 0.1) for n in (9, 10, 20, 29, 65)] == [0, 3, 3, 3, 7]
    assert num_held_out_foods(65, 0.0) == 0
    graph, _ = simulated
    again = with_splits(graph, seed=0)
    np.testing.assert_array_equal(held_out_food_mask(again), held_out_food_mask(graph))
    other = resplit(graph, 1)
    assert held_out_food_mask(other).sum() == 7
    assert not np.array_equal(held_out_food_mask(other), held_out_food_mask(graph))
    # Same samples split the same way, other held-out foods: a checkpoint of the one refuses the other.
    foods_only = graph.replace(meta=other.meta)
    recorded = split_fingerprint(graph)
    assert {k: v for k, v in split_fingerprint(foods_only).items() if k != "held_out_foods"} == \
        {k: v for k, v in recorded.items() if k != "held_out_foods"}
    with pytest.raises(CheckpointError, match="held_out_foods food ids differ"):
        check_split_matches(recorded, foods_only, "ckpt")
    check_split_matches(recorded, graph, "ckpt")
    # No nutrient table: no food is held out.
    from conftest import make_toy_graph

    bare = make_toy_graph(num_foods=12, num_samples=24)
    edges = {k: e for k, e in bare.edges.items() if "has_nutrient" not in k}
    bare = bare.replace(edges=edges, food_nutrients=np.zeros((12, 0), np.float32))
    assert not held_out_food_mask(with_splits(bare, seed=0)).any()


def test_food_metrics_on_held_out_queries_match_brute_force():
    from scipy.stats import spearmanr

    from jaxfood.eval.metrics import distance_spearman, knn_purity

    rng = np.random.default_rng(0)
    x, p = rng.normal(size=(9, 3)), rng.normal(size=(9, 4))
    labels = np.arange(9) % 3
    queries = np.zeros(9, bool)
    queries[[1, 6]] = True
    pairs = [(i, j) for i in range(9) for j in range(i + 1, 9) if queries[i] or queries[j]]
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    d_emb = [1 - unit[i] @ unit[j] for i, j in pairs]
    d_prof = [np.linalg.norm(p[i] - p[j]) for i, j in pairs]
    assert len(pairs) == 15
    assert distance_spearman(x, p, queries) == pytest.approx(spearmanr(d_emb, d_prof).statistic)
    purity = []
    for i in np.nonzero(queries)[0]:
        sim = unit @ unit[i]
        sim[i] = -np.inf
        purity.append(np.mean(labels[np.argsort(-sim, kind="stable")[:2]] == labels[i]))
    assert knn_purity(x, labels, 2, queries) == pytest.approx(np.mean(purity))
    assert np.isnan(knn_purity(x, labels, 2, np.zeros(9, bool)))
    assert np.isnan(distance_spearman(x, p, np.zeros(9, bool)))
