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
    "steps=3", "eval_every=3", "patience=0", "scorers=[intensity_attribution]", "figures=false", "tensorboard=false",
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
    from jaxfood.graph.splits import prepare_graph
    from jaxfood.models.heads import make_multitask_model
    from jaxfood.train.checkpoint import save_checkpoint
    from jaxfood.train.finetune import FinetuneConfig, checkpoint_meta

    root = tmp_path_factory.mktemp("predict")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = build_graph(_tables(), seed=0)
    save_graph(graph, root / "graph")
    cfg = load_config(FinetuneConfig(), None, TINY)
    dgraph = prepare_graph(graph)
    model = make_multitask_model(dgraph, cfg.encoder, cfg.heads)
    params = model.init(jax.random.key(1), dgraph)
    # The linear path starts at 0 (no attribution to rank by): a random one, as after training.
    kernel = params["classifier"]["wide_kernel"]
    params["classifier"]["wide_kernel"] = jax.random.normal(jax.random.key(2), kernel.shape, kernel.dtype)
    ckpt = root / "checkpoints"
    save_checkpoint(ckpt, 1, {"params": params}, checkpoint_meta(cfg, cfg.encoder, graph, None, None))
    return root, graph, ckpt


def _sample_csv(graph, index, path, extra_unknown=0):
    """Writes sample ``index`` of ``graph`` as raw peak areas (inverting the normalisation)."""
    from jaxfood.eval.predict import graph_sample_intensities

    ids, area = graph_sample_intensities(graph, index)
    lines = ["molecule_id,intensity"] + [f"{m},{float(a)!r}" for m, a in zip(ids, area)]
    lines += [f"nosuch{i},1000" for i in range(extra_unknown)] + ["zero_is_not_detected,0"]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_new_sample_reproduces_in_graph_prediction(run, tmp_path, capsys):
    import jax

    from jaxfood.eval.evaluator import Evaluator
    from jaxfood.graph.splits import prepare_graph
    from jaxfood.train.finetune import load_finetuned

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
    # Driving molecules: the headline scorer's in-graph attributions of that sample (to its
    # predicted food: a test sample has no training label), largest first, with their
    # attention-pooling weights beside them.
    from jaxfood.eval.molecules import intensity_attribution_scorer

    assert out["molecule_ranking"] == "intensity_attribution"
    dgraph = prepare_graph(graph)
    contains = dgraph.edges[schema.CONTAINS]
    mine = np.nonzero(np.asarray(contains.senders) == test)[0]
    scorer = jax.jit(lambda params, g: intensity_attribution_scorer(loaded.model, params, g))  # (eagerly: ~300 programs)
    attribution = np.asarray(scorer(loaded.params, dgraph))[mine]
    order = np.argsort(-attribution, kind="stable")[:len(s["top_molecules"])]
    ids = graph.meta.node_ids[schema.MOLECULE]
    assert [m["molecule_id"] for m in s["top_molecules"]] == [ids[int(np.asarray(contains.receivers)[mine][i])]
                                                              for i in order]
    np.testing.assert_allclose([m["attribution"] for m in s["top_molecules"]], attribution[order], rtol=1e-4,
                               atol=1e-6)
    assert attribution[order[0]] > attribution[order[-1]]  # a ranking, not ties
    np.testing.assert_allclose([m["weight"] for m in s["top_molecules"]],
                               np.asarray(own.molecule_weights)[mine][order], rtol=1e-4, atol=1e-7)

    # Out-of-library: squared Mahalanobis distance of the in-graph embedding to the nearest food mean,
    # Gaussians fitted on the training samples' embeddings with their label edges switched off.
    from sklearn.covariance import LedoitWolf

    from jaxfood.graph.edge_masks import label_edge_masks
    from jaxfood.train.multitask import make_predict_fn

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


@pytest.mark.slow
def test_out_of_library_rates_pipeline(tmp_path):
    from jaxfood.config import load_config
    from jaxfood.train.finetune import FinetuneConfig
    from jaxfood.workflows import out_of_library_rates

    cfg = load_config(FinetuneConfig(), None, [*TINY, "weighting.method=static"])
    tables = _tables()
    rates = out_of_library_rates(tables, num_held_out=4, cfg=cfg, workdir=tmp_path, seed=0)
    labels = dict(zip(tables.metadata.sample_ids, tables.metadata.food_labels))
    assert rates["num_unknown_samples"] == sum(f in rates["held_out_foods"] for f in labels.values())
    assert rates["num_known_samples"] == len(rates["known_samples"]) > 0
    assert rates["method"] == "mahalanobis"
    for key in ("detection_rate", "false_alarm_rate", "auroc"):
        assert 0.0 <= rates[key] <= 1.0
    # Rates are fractions of the counted samples, each group scored against one threshold.
    for key, n in (("detection_rate", rates["num_unknown_samples"]), ("false_alarm_rate", rates["num_known_samples"])):
        assert rates[key] * n == pytest.approx(round(rates[key] * n)), key


class _Loaded:
    def __init__(self, model, params, meta):
        self.model, self.params, self.meta = model, params, meta


def test_out_of_library_known_samples_were_never_in_the_graph():
    """The false alarms are measured on samples of known foods that the graph (and so the model,
    transductive as it is) never contained; the unknown foods are absent from it entirely."""
    import jax

    from jaxfood.config import load_config
    from jaxfood.eval.predict import out_of_library_rates
    from jaxfood.graph.splits import prepare_graph
    from jaxfood.models.heads import make_multitask_model
    from jaxfood.train.finetune import FinetuneConfig

    cfg = load_config(FinetuneConfig(), None, TINY)
    seen = []

    def fit(graph):  # the initial parameters: which samples are where needs no training
        seen.append(graph)
        dgraph = prepare_graph(graph)
        model = make_multitask_model(dgraph, cfg.encoder, cfg.heads)
        return _Loaded(model, model.init(jax.random.key(0), dgraph), {})

    tables = _tables()
    rates = out_of_library_rates(tables, fit, num_held_out=4, seed=1)
    (graph,) = seen
    in_graph = set(graph.meta.node_ids[schema.SAMPLE])
    labels = dict(zip(tables.metadata.sample_ids, tables.metadata.food_labels))
    known = rates["known_samples"]
    assert known and not in_graph & set(known)
    assert {labels[s] for s in known} <= set(graph.meta.node_ids[schema.FOOD])
    assert not set(rates["held_out_foods"]) & set(graph.meta.node_ids[schema.FOOD])
    # Every sample is in exactly one place: the graph, the known group or the unknown group.
    assert len(in_graph) + len(known) + rates["num_unknown_samples"] == len(tables.features.sample_ids)
    # At least one sample of every food left in the graph, never all of them.
    per_food = {f: sum(labels[s] == f for s in known) for f in set(labels[s] for s in in_graph)}
    assert min(per_food.values()) >= 1


@pytest.mark.parametrize("n,d", [(5, 64), (300, 8), (40, 40)])
def test_ledoit_wolf_covariance_is_scikit_learns(n, d):
    from sklearn.covariance import LedoitWolf

    from jaxfood.eval.ool import ledoit_wolf_covariance

    rng = np.random.default_rng(n * d)
    x = rng.normal(size=(n, d)) * rng.uniform(0.1, 3.0, size=d) + 1.0
    np.testing.assert_allclose(ledoit_wolf_covariance(x), LedoitWolf().fit(x).covariance_, rtol=1e-10, atol=1e-12)


def _table(graph, samples):
    """A FeatureTable of ``samples`` [(name, {molecule index: raw peak area})]."""
    from jaxfood.data.tables import FeatureTable

    ids = list(graph.meta.node_ids[schema.MOLECULE])
    s, m, x = [], [], []
    for j, (_, areas) in enumerate(samples):
        for mol, area in areas.items():
            s.append(j)
            m.append(mol)
            x.append(area)
    return FeatureTable(molecule_ids=ids, sample_ids=[name for name, _ in samples], sample_index=np.asarray(s),
                        molecule_index=np.asarray(m), intensity=np.asarray(x, np.float64))


def test_padding_shares_one_program_across_sample_sizes_and_changes_no_real_output(run):
    """New samples and their edges are padded to power-of-two sizes: samples of other sizes give the
    same shapes (one compiled program), and a sample's outputs do not depend on the padding or on
    the other samples predicted with it."""

    from jaxfood.eval.evaluator import Evaluator
    from jaxfood.eval.predict import (
        _forward_fn,
        extend_graph,
        match_molecules,
        normalise_intensity,
        padded_size,
        predict_arrays,
    )
    from jaxfood.graph.splits import prepare_graph
    from jaxfood.train.finetune import load_finetuned

    assert [padded_size(k, 64) for k in (1, 64, 65, 200, 1025)] == [64, 64, 128, 256, 1536]
    assert [padded_size(k, 2) for k in (1, 2, 3, 5, 17)] == [2, 2, 4, 6, 24]
    root, graph, ckpt = run
    loaded = load_finetuned(ckpt, graph)
    norm = graph.meta.normalisation
    rng = np.random.default_rng(0)
    big = {int(i): float(a) for i, a in zip(rng.choice(400, 40, replace=False), rng.uniform(1e3, 1e6, 40))}
    small = dict(list(big.items())[:7])
    other = {int(i): 5e4 for i in rng.choice(400, 90, replace=False)}

    dgraph = prepare_graph(graph)
    S = int(dgraph.num_nodes[schema.SAMPLE])

    def extended(samples):
        table = _table(graph, samples)
        matched = match_molecules(table, graph)
        return extend_graph(dgraph, matched, normalise_intensity(matched.intensity, matched.molecule_index, norm))

    # 40 and 7 molecules: the same padded shapes, and the same program (what the persistent
    # compilation cache keys on: a new sample size compiles nothing).
    programs = []
    for samples in ([("big", big)], [("small", small)]):
        ext, masks, stats_mask, _ = extended(samples)
        masks = dict(masks)
        for key in (schema.IS_INSTANCE_OF, schema.reverse_key(schema.IS_INSTANCE_OF)):
            masks[key] = np.ones(ext.edges[key].senders.shape, bool)
        programs.append(_forward_fn(loaded.model).lower(loaded.params, ext, masks, stats_mask).as_text())
    assert programs[0] == programs[1]
    ext, masks, stats_mask, new_edges = extended([("big", big)])
    assert ext.num_nodes[schema.SAMPLE] == S + 2 and new_edges.tolist() == list(range(new_edges[0], new_edges[0] + 40))
    assert not masks[schema.CONTAINS][new_edges[0]:].any() and not stats_mask[S:].any()

    alone = predict_arrays(loaded, graph, _table(graph, [("big", big)]), norm, reference=True)
    together = predict_arrays(loaded, graph, _table(graph, [("other", other), ("big", big), ("small", small)]), norm,
                              reference=True)
    # The graph's own samples: as in the graph without new samples or padding.
    own = Evaluator(loaded.model, dgraph).predict(loaded.params)
    np.testing.assert_allclose(np.asarray(alone.outputs.food_logits)[:S], np.asarray(own.food_logits),
                               rtol=1e-4, atol=1e-5)
    # Padding rows are dropped: one row per graph sample and new sample, one per real edge.
    assert alone.outputs.food_logits.shape[0] == S + 1 and together.outputs.food_logits.shape[0] == S + 3
    assert alone.attribution.shape[0] == alone.outputs.molecule_weights.shape[0] == alone.new_edges[-1] + 1
    for field in ("food_logits", "nutrient_profile", "pooled"):
        np.testing.assert_allclose(np.asarray(getattr(alone.outputs, field))[S],
                                   np.asarray(getattr(together.outputs, field))[S + 1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(alone.outputs.embeddings[schema.SAMPLE][:S + 1],
                               np.delete(together.outputs.embeddings[schema.SAMPLE], [S, S + 2], 0)[:S + 1],
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(alone.reference_outputs.embeddings[schema.SAMPLE][:S],
                               together.reference_outputs.embeddings[schema.SAMPLE][:S], rtol=1e-5, atol=1e-6)
    mine = together.new_edges[together.matched.sample_index == 1]
    np.testing.assert_allclose(np.asarray(alone.attribution)[alone.new_edges], np.asarray(together.attribution)[mine],
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(np.asarray(alone.outputs.molecule_weights)[alone.new_edges],
                               np.asarray(together.outputs.molecule_weights)[mine], rtol=1e-5, atol=1e-7)
    # The checkpoint loaded again (another model object of the same structure) predicts through the
    # same jitted pass: nothing is traced or compiled again, and the outputs are the same.
    from jaxfood.compile_cache import shared_program

    forward = shared_program("predict_forward", loaded.model, lambda: pytest.fail("predict_arrays shares no pass"))
    traced = forward._cache_size()
    again = load_finetuned(ckpt, graph)
    assert again.model is not loaded.model
    repeat = predict_arrays(again, graph, _table(graph, [("big", big)]), norm, reference=True)
    assert forward._cache_size() == traced
    np.testing.assert_array_equal(repeat.outputs.food_logits, alone.outputs.food_logits)
