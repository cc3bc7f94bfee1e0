"""`jaxfood predict`: a new sample appended to the graph reproduces the in-graph prediction of the
sample it copies; unknown ids are counted; bad inputs are one-line errors (exit 2); the
out-of-library experiment runs end to end."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

from jaxfood import cli
from jaxfood.graph import schema
from jaxfood.graph.hetero_graph import SPLIT_CODES, save_graph

TINY = [
    "steps=3", "eval_every=3", "patience=0", "scorers=[attention]", "figures=false", "tensorboard=false",
    "encoder.hidden_dim=8", "encoder.num_heads=2", "encoder.embedding_dim=8", "encoder.num_layers=1",
    "heads.hidden_dim=8", "heads.pool_dim=8", "heads.attention_dim=4", "heads.projection_dim=4",
    "loss.salient_top_k=3", "salient_k=3",
]


def _tables():
    from jaxfood.data.simulate import SimConfig, simulate

    cfg = SimConfig(replicates_per_food=4, num_molecules=400, nutrient_linked_per_class=20, background=40,
                    contaminants=20, embedding_dim=4)
    return simulate(cfg, seed=0).tables


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A small simulated graph saved the way run_mtl saves it, beside a fine-tuning checkpoint of the
    tiny model at its initial parameters (prediction consistency needs no training; skipping it
    keeps the test fast)."""
    import jax

    from jaxfood.config import load_config
    from jaxfood.data.build import build_graph
    from jaxfood.models.heads import make_multitask_model
    from jaxfood.train.checkpoint import save_checkpoint
    from jaxfood.train.finetune import FinetuneConfig, checkpoint_meta, prepare_graph

    root = tmp_path_factory.mktemp("predict")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = build_graph(_tables(), seed=0)
    save_graph(graph, root / "graph")
    cfg = load_config(FinetuneConfig(), None, TINY)
    dgraph = prepare_graph(graph)
    model = make_multitask_model(dgraph, cfg.encoder, cfg.heads)
    params = model.init(jax.random.key(1), dgraph)
    ckpt = root / "checkpoints"
    save_checkpoint(ckpt, 1, {"params": params}, checkpoint_meta(cfg, cfg.encoder, graph, None, None))
    return root, graph, ckpt


def _sample_csv(graph, index, path, extra_unknown=0):
    """Writes sample ``index`` of ``graph`` as raw peak areas (inverting the normalisation)."""
    contains = graph.edges[schema.CONTAINS]
    edges = np.nonzero(np.asarray(contains.senders) == index)[0]
    mols = np.asarray(contains.receivers)[edges]
    z = np.asarray(contains.attributes, np.float64)[edges, 0]
    stats = graph.meta.normalisation["contains_molecule"]
    area = np.expm1(z * np.asarray(stats["std"])[mols] + np.asarray(stats["mean"])[mols])
    ids = graph.meta.node_ids[schema.MOLECULE]
    lines = ["molecule_id,intensity"] + [f"{ids[m]},{float(a)!r}" for m, a in zip(mols, area)]
    lines += [f"nosuch{i},1000" for i in range(extra_unknown)] + ["zero_is_not_detected,0"]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_new_sample_reproduces_in_graph_prediction(run, tmp_path, capsys):
    from jaxfood.train.finetune import Evaluator, load_finetuned, prepare_graph

    root, graph, ckpt = run
    test = np.nonzero(np.asarray(graph.sample_split) == SPLIT_CODES["test"])[0][0]
    csv = _sample_csv(graph, test, tmp_path / "s.csv", extra_unknown=2)
    # --graph left out: CHECKPOINT/../graph is found, as after run_mtl.
    assert cli.main(["predict", "--checkpoint", str(ckpt), "--sample", str(csv),
                     "--top-k", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["graph"].endswith("graph") and out["num_samples"] == 1
    s = out["samples"][0]
    assert s["molecules_unknown"] == 2 and s["unknown_examples"] == ["nosuch0", "nosuch1"]
    assert s["molecules_known"] == int(np.sum(np.asarray(graph.edges[schema.CONTAINS].senders) == test))
    probs = [f["probability"] for f in s["top_foods"]]
    assert len(probs) == 3 and sum(probs) <= 1 + 1e-9 and probs == sorted(probs, reverse=True)
    assert s["out_of_library_score"] >= 0.0 and isinstance(s["out_of_library"], bool)
    assert out["out_of_library"]["method"] == "mahalanobis"
    assert set(s["nutrients_per_100g"]) == set(graph.meta.nutrient_names)
    assert 0 < len(s["top_molecules"]) <= 10

    # The model's own evaluation of that sample inside the graph.
    loaded = load_finetuned(ckpt, graph)
    own = Evaluator(loaded.model, prepare_graph(graph)).predict(loaded.params)
    logits = np.asarray(own.food_logits, np.float64)[test]
    p = np.exp(logits - logits.max())
    p /= p.sum()
    foods = graph.meta.node_ids[schema.FOOD]
    assert s["top_foods"][0]["food"] == foods[int(np.argmax(p))]
    np.testing.assert_allclose(probs, np.sort(p)[::-1][:3], rtol=1e-4, atol=1e-6)
    # Nutrients de-normalised: z * std + mean of the graph's has_nutrient statistics, floored at 0.
    stats = graph.meta.normalisation["has_nutrient"]
    want = np.asarray(own.nutrient_profile, np.float64)[test] * np.asarray(stats["std"]) + np.asarray(stats["mean"])
    want = np.maximum(want, 0.0)
    np.testing.assert_allclose([s["nutrients_per_100g"][n] for n in graph.meta.nutrient_names], want,
                               rtol=1e-4, atol=1e-4)
    # Driving molecules: the in-graph attention-pooling weights of that sample.
    contains = graph.edges[schema.CONTAINS]
    mine = np.nonzero(np.asarray(prepare_graph(graph).edges[schema.CONTAINS].senders) == test)[0]
    w = np.asarray(own.molecule_weights)[mine]
    top = graph.meta.node_ids[schema.MOLECULE][int(np.asarray(contains.receivers)[mine][np.argmax(w)])]
    assert s["top_molecules"][0]["molecule_id"] == top
    np.testing.assert_allclose(s["top_molecules"][0]["weight"], w.max(), rtol=1e-4)

    # Out-of-library: squared Mahalanobis distance of the in-graph embedding to the nearest food mean,
    # Gaussians fitted on the training samples' embeddings with their label edges switched off.
    from sklearn.covariance import LedoitWolf

    from jaxfood.train.multitask import make_predict_fn
    from jaxfood.train.salient_molecules import label_edge_masks

    dgraph = prepare_graph(graph)
    split, labels = np.asarray(graph.sample_split), np.asarray(graph.sample_food)
    train = np.nonzero(split == SPLIT_CODES["train"])[0]
    ref = make_predict_fn(loaded.model)(loaded.params, dgraph, label_edge_masks(dgraph, split == SPLIT_CODES["train"]))
    x = np.asarray(ref.embeddings[schema.SAMPLE], np.float64)[train]
    y = labels[train]
    means = {c: x[y == c].mean(0) for c in np.unique(y)}
    precision = np.linalg.inv(LedoitWolf().fit(x - np.stack([means[c] for c in y])).covariance_)
    e = np.asarray(own.embeddings[schema.SAMPLE], np.float64)[test]
    want = min(float((e - m) @ precision @ (e - m)) for m in means.values())
    np.testing.assert_allclose(s["out_of_library_score"], want, rtol=1e-3)


def test_gnps_table_many_samples_and_table_output(run, tmp_path, capsys):
    root, graph, ckpt = run
    ids = graph.meta.node_ids[schema.MOLECULE]
    table = tmp_path / "features.csv"
    rows = ["row ID,row m/z,row retention time,a.mzML Peak area,b.mzML Peak area"]
    rows += [f"{m},100.0,1.0,{1000 + i},{0 if i % 2 else 500}" for i, m in enumerate(ids[:30])]
    rows += ["unknown_feature,100.0,1.0,10,10"]
    table.write_text("\n".join(rows) + "\n")
    assert cli.main(["predict", "--checkpoint", str(ckpt), "--graph", str(root / "graph"),
                     "--sample", str(table), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [s["sample_id"] for s in out["samples"]] == ["a.mzML", "b.mzML"]
    assert [s["molecules_known"] for s in out["samples"]] == [30, 15]
    assert [s["molecules_unknown"] for s in out["samples"]] == [1, 1]
    assert cli.main(["predict", "--checkpoint", str(ckpt), "--sample", str(table)]) == 0
    text = capsys.readouterr().out
    assert "a.mzML" in text and "out-of-library score" in text and "probability" in text


@pytest.mark.parametrize("content, expect", [
    ("nosuch,1\nnope,2\n", "none of its 2 molecule id(s) is in the graph"),
    ("{m0},1\n{m1},-3\n", "column 'intensity', line 3: negative intensity"),
    ("{m0},1\n{m1},nan\n", "column 'intensity', line 3: 'nan' is not a finite number"),
    ("{m0},abc\n", "column 'intensity', line 2: 'abc' is not a number"),
    ("{m0},1\n{m0},2\n", "column 'molecule_id', line 3: duplicate molecule id"),
    ("{m0},0\n", "has no detected molecule"),
])
def test_bad_samples_exit_2(run, tmp_path, capsys, content, expect):
    root, graph, ckpt = run
    ids = graph.meta.node_ids[schema.MOLECULE]
    csv = tmp_path / "bad.csv"
    csv.write_text("molecule_id,intensity\n" + content.format(m0=ids[0], m1=ids[1]))
    assert cli.main(["predict", "--checkpoint", str(ckpt), "--sample", str(csv)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and str(csv) in err and expect in err and "\n" not in err


def test_missing_column_exit_2(run, tmp_path, capsys):
    root, graph, ckpt = run
    csv = tmp_path / "cols.csv"
    csv.write_text("molecule,intensity\nx,1\n")
    assert cli.main(["predict", "--checkpoint", str(ckpt), "--sample", str(csv)]) == 2
    err = capsys.readouterr().err
    assert "missing column 'molecule_id'" in err and str(csv) in err


def test_out_of_library_rates_pipeline(tmp_path):
    from jaxfood.config import load_config
    from jaxfood.eval.predict import out_of_library_rates
    from jaxfood.train.finetune import FinetuneConfig

    cfg = load_config(FinetuneConfig(), None, [*TINY, "weighting.method=static"])
    tables = _tables()
    rates = out_of_library_rates(tables, num_held_out=4, cfg=cfg, workdir=tmp_path, seed=0)
    labels = dict(zip(tables.metadata.sample_ids, tables.metadata.food_labels))
    assert rates["num_unknown_samples"] == sum(f in rates["held_out_foods"] for f in labels.values())
    assert rates["num_known_samples"] > 0
    assert rates["method"] == "mahalanobis"
    for key in ("detection_rate", "false_alarm_rate", "auroc"):
        assert 0.0 <= rates[key] <= 1.0
    assert rates["mean_score_known"] >= 0.0 and rates["mean_score_unknown"] >= 0.0
    assert set(rates["alternative_scores"]) == {"msp", "energy", "knn"}
    for alt in ("msp", "energy", "knn"):
        for key in ("detection_rate", "false_alarm_rate", "auroc"):
            assert 0.0 <= rates["alternative_scores"][alt][key] <= 1.0
    msp = rates["alternative_scores"]["msp"]
    assert 0.0 <= msp["mean_score_known"] < 1.0 and 0.0 <= msp["mean_score_unknown"] < 1.0


def test_knn_and_energy_scores_hand_computed():
    from jaxfood.eval.predict import energy_scores, knn_distance_scores, ool_scores

    logits = np.array([[0.0, 0.0], [np.log(3.0), 0.0]])
    np.testing.assert_allclose(ool_scores(logits), [0.5, 0.25])
    np.testing.assert_allclose(energy_scores(logits), [-np.log(2.0), -np.log(4.0)])
    ref = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    # [1, 0]: distances 0 (itself, skipped), 1 - 1/sqrt(2), 1; [-1, 0]: 2, 1, 1 + 1/sqrt(2) -> nearest 1
    np.testing.assert_allclose(knn_distance_scores(np.array([[1.0, 0.0], [-1.0, 0.0]]), ref, k=1),
                               [1 - 1 / np.sqrt(2), 1.0])


def test_mahalanobis_hand_computed():
    from sklearn.covariance import LedoitWolf

    from jaxfood.eval.predict import fit_class_gaussians, mahalanobis_scores

    # Means (0, 0) and (3, 0), precision diag(1, 4): x = (1, 1) -> min(1 + 4, 4 + 4) = 5; (3, 0.5) -> 1.
    np.testing.assert_allclose(mahalanobis_scores(np.array([[1.0, 1.0], [3.0, 0.5]]), np.array([[0.0, 0.0], [3.0, 0.0]]),
                                                  np.diag([1.0, 4.0])), [5.0, 1.0])
    x = np.array([[0.0, 1.0], [2.0, 1.0], [1.0, 3.0], [10.0, 0.0], [12.0, 2.0], [11.0, 1.0]])
    y = np.array([5, 5, 5, 2, 2, 2])
    classes, means, precision = fit_class_gaussians(x, y)
    np.testing.assert_array_equal(classes, [2, 5])
    np.testing.assert_allclose(means, [[11.0, 1.0], [1.0, 5.0 / 3.0]])
    centred = x - np.where(y[:, None] == 5, [1.0, 5.0 / 3.0], [11.0, 1.0])
    np.testing.assert_allclose(precision, np.linalg.inv(LedoitWolf().fit(centred).covariance_), rtol=1e-10)
