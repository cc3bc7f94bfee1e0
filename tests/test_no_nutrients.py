"""A lab's plain study: a feature table and metadata, no nutrient table, no molecule embeddings.

The study is simulated and written in the real formats; the test keeps only the feature table
(with a GNPS annotation column added) and the metadata, builds the graph with ``jaxfood
build-graph`` and runs the main job with no ``--set``: defaults follow the graph. The same study
written as a Metabolomics Workbench file builds the same graph, array for array.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from jaxfood.cli import main
from jaxfood.graph import schema

ROOT = Path(__file__).resolve().parents[1]

#: Small model, few steps, one scorer: the test checks plumbing, not accuracy.
TINY_RUN = """\
pretrain:
  epochs: 1
  steps_per_epoch: 1
  val_views: 1
  batch_size: 32
  projection_hidden: 8
  projection_dim: 4
  encoder: {hidden_dim: 8, num_heads: 2, embedding_dim: 8, num_layers: 1}
finetune:
  steps: 2
  eval_every: 2
  scorers: [class_attention]
  stability_perturbations: 1
  heads: {hidden_dim: 8, pool_dim: 8, attention_dim: 4, projection_dim: 4}
evaluation:
  ablations: false
  rf_estimators: 5
"""


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """feature_table.csv (+ 'Compound_Name' on a few rows) and metadata.csv of a small simulated study."""
    from jaxfood.data.simulate import simulate
    from jaxfood.data.simulated_files import write_dataset
    from jaxfood.data.simulated_world import SimConfig

    root = tmp_path_factory.mktemp("plain_study")
    cfg = SimConfig(replicates_per_food=4, num_molecules=400, nutrient_linked_per_class=20, background=40,
                    contaminants=20, embedding_dim=4)
    paths = write_dataset(simulate(cfg, seed=0), root / "sim")
    table = pd.read_csv(paths["feature_table"])
    table = table.copy()  # a wide table: insert into a defragmented copy
    table.insert(3, "Compound_Name", ["" if i % 3 else f"compound {i}" for i in range(len(table))])
    table.to_csv(root / "quant.csv", index=False)
    (root / "metadata.csv").write_bytes(Path(paths["metadata"]).read_bytes())
    return root


@pytest.fixture(scope="module")
def graph_dir(study):
    out = study / "graph"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main(["build-graph", "--feature-table", str(study / "quant.csv"),
                     "--metadata", str(study / "metadata.csv"), "--out", str(out)])
    assert code == 0
    return out


def test_build_graph_without_nutrients_has_no_nutrient_part_and_says_so(graph_dir):
    from jaxfood.graph.hetero_graph import load_graph, molecule_details, molecule_label

    summary = json.loads((graph_dir / "summary.json").read_text())
    assert set(summary["nodes"]) == {schema.SAMPLE, schema.MOLECULE, schema.FOOD}
    assert not any("has_nutrient" in k for k in summary["edges"])
    assert "no nutrient table" in summary["absent"][schema.NUTRIENT]
    assert "Molecule features" in summary["absent"]
    graph = load_graph(graph_dir)
    assert graph.food_nutrients.shape == (graph.num_nodes[schema.FOOD], 0)
    assert schema.FOOD not in graph.node_features and schema.MOLECULE not in graph.node_features
    # m/z, RT and the annotation column travel with each molecule.
    table = pd.read_csv(graph_dir.parent / "quant.csv")
    row = table.iloc[3]
    i = graph.meta.node_ids[schema.MOLECULE].index(str(row["row ID"]))
    d = molecule_details(graph, i)
    assert d["mz"] == pytest.approx(row["row m/z"]) and d["rt"] == pytest.approx(row["row retention time"])
    assert d["annotation"] == "compound 3"
    assert molecule_details(graph, graph.meta.node_ids[schema.MOLECULE].index(str(table.iloc[1]["row ID"])))[
        "annotation"] is None
    assert "compound 3" in molecule_label(graph, i) and f"{row['row m/z']:.4f}" in molecule_label(graph, i)


def test_adapt_to_graph_changes_only_what_the_graph_cannot_do(graph_dir):
    from jaxfood.graph.hetero_graph import load_graph
    from jaxfood.train.adapt import adapt_to_graph
    from jaxfood.train.finetune import FinetuneConfig
    from jaxfood.train.graphcl import PretrainConfig, check_pretrain_config

    graph = load_graph(graph_dir)
    pre, notes = adapt_to_graph(PretrainConfig(), graph)
    assert pre.encoder.input_modes[schema.MOLECULE] == "embedding"
    # works on this graph: untouched
    assert pre.encoder.input_modes[schema.SAMPLE] == PretrainConfig().encoder.input_modes[schema.SAMPLE]
    assert schema.MOLECULE not in pre.augment.feature_mask and "has_nutrient" not in pre.augment.edge_drop
    assert pre.augment.edge_drop["contains_molecule"] == PretrainConfig().augment.edge_drop["contains_molecule"]
    assert any("feature_mask.Molecule" in n for n in notes)
    check_pretrain_config(pre, graph)  # the adapted config passes the checks the default fails
    with pytest.raises(Exception, match="feature_mask.Molecule"):
        check_pretrain_config(PretrainConfig(), graph)
    ft, notes = adapt_to_graph(FinetuneConfig(), graph)
    assert ft.weighting.static_weights["nutrition"] == 0.0
    assert not any(k.startswith("nutrition.") for k in ft.selection)
    assert any("nutrient table" in n for n in notes)
    # A graph with everything needs nothing.
    from conftest import make_toy_graph

    assert adapt_to_graph(FinetuneConfig(), make_toy_graph())[1] == []


def _run_mtl():
    spec = importlib.util.spec_from_file_location("run_mtl", ROOT / "experiments" / "run_mtl.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["run_mtl"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_main_job_and_every_command_run_on_a_plain_study_whose_workbench_file_is_the_same_graph(graph_dir, tmp_path, capsys):
    config = tmp_path / "tiny.yaml"
    config.write_text(TINY_RUN)
    workdir = tmp_path / "w"
    code = _run_mtl().main(["--graph", str(graph_dir), "--workdir", str(workdir), "--config", str(config),
                            "--no-progress"])
    out = capsys.readouterr().out
    assert code == 0
    assert out.count("defaults adapted to the graph") == 1
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert 0.0 <= metrics["food_classification"]["accuracy"] <= 1.0
    assert "fidelity_plus" in metrics["salient_molecules"]
    assert "no nutrient table" in metrics["nutrition"]["absent"]
    assert "ridge_nutrient_r2" not in metrics["baselines"] and "logreg_accuracy" in metrics["baselines"]
    report = (workdir / "report.md").read_text()
    assert "## Nutrition alignment\n\nNot measured: no nutrient table" in report
    assert "## Food classification" in report and "## Salient molecule discovery" in report
    rankings = json.loads((workdir / "rankings.json").read_text())
    entry = next(iter(next(iter(rankings.values())).values()))[0]
    assert set(entry) == {"molecule_id", "mz", "rt", "annotation"} and entry["mz"] > 0

    # The commands on the same graph: evaluate, predict and embed with the run's checkpoint.
    graph_arg = ["--graph", str(graph_dir)]
    ckpt = str(workdir / "checkpoints")
    assert main(["evaluate", *graph_arg, "--checkpoint", ckpt, "--out", str(tmp_path / "eval")]) == 0
    table = pd.read_csv(graph_dir.parent / "quant.csv")
    area = [c for c in table.columns if c.endswith(" Peak area")][0]
    sample = table.loc[table[area] > 0, ["row ID", area]].rename(columns={"row ID": "molecule_id", area: "intensity"})
    sample.to_csv(tmp_path / "sample.csv", index=False)
    capsys.readouterr()
    assert main(["predict", "--checkpoint", ckpt, *graph_arg, "--sample", str(tmp_path / "sample.csv"), "--json"]) == 0
    pred = json.loads(capsys.readouterr().out)
    top = pred["samples"][0]["top_molecules"][0]
    assert {"molecule_id", "mz", "rt", "annotation", "weight"} <= set(top)
    assert main(["embed", "--checkpoint", ckpt, *graph_arg, "--out", str(tmp_path / "emb")]) == 0
    capsys.readouterr()

    _the_study_as_a_workbench_file_is_the_same_graph(graph_dir, tmp_path / "workbench", capsys)


def _the_study_as_a_workbench_file_is_the_same_graph(graph_dir: Path, tmp_path, capsys):
    """The same study's peak areas (those of its feature table, to the digit) and foods written as a
    Workbench file (classes = foods): ``build-graph --mwtab`` gives the plain study's graph, array
    for array and statistic for statistic, only the molecules named by their Workbench names: the
    main job above, which reads nothing else, is this study's run too."""
    from test_mwtab import write_mwtab

    from jaxfood.graph.hetero_graph import load_graph, molecule_details

    tmp_path.mkdir()
    plain = load_graph(graph_dir)
    foods = plain.meta.node_ids[schema.FOOD]
    label = {s: foods[f] for s, f in zip(plain.meta.node_ids[schema.SAMPLE], np.asarray(plain.sample_food))}
    quant_csv = graph_dir.parent / "quant.csv"
    table = pd.read_csv(quant_csv)
    columns = [c for c in table.columns if c.endswith(" Peak area")]
    samples = [c[: -len(" Peak area")] for c in columns]
    areas = table[columns].to_numpy(float).copy()
    areas[areas == 0] = np.nan  # not detected: an empty cell
    path = write_mwtab(tmp_path / "study.txt", samples, [label[s] for s in samples],
                       [f"m{m}" for m in table["row ID"]], areas, mz=list(table["row m/z"]),
                       rt=list(table["row retention time"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main(["build-graph", "--mwtab", str(path), "--label-column", "Origin", "--out", str(tmp_path / "g")])
    assert code == 0, capsys.readouterr().err
    workbench = load_graph(tmp_path / "g")
    assert workbench.meta.node_ids[schema.MOLECULE] == [f"m{m}" for m in plain.meta.node_ids[schema.MOLECULE]]
    for t in (schema.SAMPLE, schema.FOOD):
        assert workbench.meta.node_ids[t] == plain.meta.node_ids[t], t
    assert set(workbench.edges) == set(plain.edges) and set(workbench.node_features) == set(plain.node_features)
    for key, edges in plain.edges.items():
        for field in ("senders", "receivers", "attributes"):
            np.testing.assert_array_equal(getattr(workbench.edges[key], field), getattr(edges, field),
                                          err_msg=f"{key}.{field}")
    np.testing.assert_array_equal(workbench.sample_food, plain.sample_food)
    np.testing.assert_array_equal(workbench.sample_split, plain.sample_split)
    assert workbench.meta.normalisation == plain.meta.normalisation
    for i in (0, 7):  # a Workbench metabolite's name is its id and its annotation, beside its m/z and RT
        details, plain_details = molecule_details(workbench, i), molecule_details(plain, i)
        assert details["annotation"] == workbench.meta.node_ids[schema.MOLECULE][i]
        assert (details["mz"], details["rt"]) == (plain_details["mz"], plain_details["rt"]) and details["mz"] > 0
