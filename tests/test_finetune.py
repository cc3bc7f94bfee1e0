"""The fine-tuning loop end to end on a small graph: two runs with the same seed write identical
metrics.json; `jaxfood evaluate` on the checkpoint reproduces them exactly; TensorBoard has every
task; configuration and checkpoint errors are one clear line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_toy_graph

from jaxfood import cli
from jaxfood.graph.hetero_graph import load_graph, save_graph
from jaxfood.train import task_weighting as tw

#: A tiny model (one GAT layer: smaller programs to compile): what is tested is the workflow --
#: reproducibility, evaluate, TensorBoard, GradNorm bookkeeping -- not what the model learns.
SMALL = [
    "steps=4", "eval_every=2", "patience=0", "scorers=[attention]", "figures=false",
    "encoder.hidden_dim=8", "encoder.num_heads=2", "encoder.embedding_dim=8", "encoder.num_layers=1",
    "heads.hidden_dim=8", "heads.pool_dim=8", "heads.attention_dim=4", "heads.projection_dim=4",
    "loss.salient_top_k=3", "salient_k=3", "weighting.method=gradnorm",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One run through the CLI, one through the library, same graph and seed."""
    from jaxfood.config import load_config
    from jaxfood.train.finetune import FinetuneConfig
    from jaxfood.workflows import finetune

    root = tmp_path_factory.mktemp("finetune")
    # The second run uses the programs the first compiled (the same graph loaded again is alike in
    # everything static: GraphMeta compares by content).
    graph_dir = root / "graph"
    save_graph(make_toy_graph(), graph_dir)
    biomarkers = root / "biomarkers.csv"
    biomarkers.write_text("feature,category\nm0,f0\nm1,f0\nm3,f1\nm4,f1\n")
    args = ["finetune", "--graph", str(graph_dir), "--workdir", str(root / "a"), "--biomarkers", str(biomarkers),
            "--quiet"]
    for item in SMALL:
        args += ["--set", item]
    assert cli.main(args) == 0
    cfg = load_config(FinetuneConfig(), None, SMALL)
    result = finetune(load_graph(graph_dir), cfg, root / "b", biomarkers=biomarkers, progress=False)
    return root, graph_dir, result


def test_same_seed_writes_identical_metrics_json(runs):
    root, _, result = runs
    a = (root / "a" / "metrics.json").read_bytes()
    b = (root / "b" / "metrics.json").read_bytes()
    assert a == b
    metrics = json.loads(a)
    for section, keys in {"food_classification": ("accuracy", "weighted_f1", "auroc_macro", "top3_accuracy"),
                          "nutrition": ("knn_purity", "spearman", "nutrient_r2"),
                          "salient_molecules": ("precision_at_3", "fidelity_plus", "fidelity_minus")}.items():
        for key in keys:
            assert key in metrics[section], (section, key)
    assert set(tw.TASKS) <= set(metrics["task_weights"])
    assert metrics["salient_molecules"]["precision_at_3"] == metrics["salient_molecules"]["precision_at_3"]  # not NaN
    # The step compiles once per process: this run (the graph loaded again, the same configuration)
    # found the program the CLI run compiled.
    assert result.num_step_compilations == 0
    weights = [metrics["task_weights"][t] for t in tw.TASKS]
    assert abs(sum(weights) - len(weights)) < 1e-5  # GradNorm keeps them summing to the task count
    for name in ("config.yaml", "history.json", "checkpoints"):
        assert (root / "a" / name).exists(), name


def test_a_rerun_in_the_same_workdir_replaces_the_earlier_run(runs, tmp_path):
    import shutil

    from jaxfood.config import load_config
    from jaxfood.train.checkpoint import latest_step, save_checkpoint
    from jaxfood.train.finetune import FinetuneConfig
    from jaxfood.workflows import finetune

    root, graph_dir, first = runs
    workdir = tmp_path / "w"
    shutil.copytree(root / "b", workdir)  # an earlier run, plus a later step of it that would win
    save_checkpoint(workdir / "checkpoints", 99, {"params": first.params}, {"kind": "finetune"})
    # The same configuration: the same compiled programs, no time spent compiling.
    result = finetune(load_graph(graph_dir), load_config(FinetuneConfig(), None, SMALL), workdir, progress=False)
    # The kept state is saved at its step, or, for a kept start that took a trained step's
    # representation, at that step (meta best_step 0); either way the earlier run's step 99 is gone.
    assert result.best_step == first.best_step and result.composed_step == first.composed_step
    kept_at = result.best_step if result.composed_step is None else result.composed_step
    assert latest_step(workdir / "checkpoints") == kept_at != 99
    assert json.loads((workdir / "metrics.json").read_text())["best_step"] == first.best_step
    assert len(list((workdir / "tb").iterdir())) == 1  # the earlier run's event file is gone


def _key_paths(tree, prefix=""):
    out = set()
    for key, value in tree.items():
        out.add(prefix + key)
        if isinstance(value, dict) and key != "per_scorer":
            out |= _key_paths(value, f"{prefix}{key}/")
    return out


@pytest.mark.slow
def test_data_parallel_sampled_run_writes_the_same_metrics_keys(runs, tmp_path):
    """`--data-parallel --sampled`: the same workflow on sampled subgraphs; metrics.json has every key
    of the full-graph run, stability included, and its checkpoint is evaluated like any other."""
    root, graph_dir, _ = runs
    args = ["finetune", "--graph", str(graph_dir), "--workdir", str(tmp_path / "dp"), "--quiet",
            "--biomarkers", str(root / "biomarkers.csv"), "--data-parallel", "--sampled", "--batch-size", "8"]
    for item in SMALL:
        args += ["--set", item]
    assert cli.main(args) == 0
    full = json.loads((root / "a" / "metrics.json").read_text())
    sampled = json.loads((tmp_path / "dp" / "metrics.json").read_text())
    assert _key_paths(sampled) == _key_paths(full)
    assert 0.0 <= sampled["salient_molecules"]["stability_jaccard"] <= 1.0
    assert cli.main(["evaluate", "--checkpoint", str(tmp_path / "dp" / "checkpoints"), "--graph", str(graph_dir),
                     "--out", str(tmp_path / "m.json")]) == 0
    assert json.loads((tmp_path / "m.json").read_text()) == sampled


def test_evaluate_reproduces_the_final_metrics_exactly(runs, tmp_path):
    root, graph_dir, _ = runs
    out = tmp_path / "m.json"
    assert cli.main(["evaluate", "--checkpoint", str(root / "a" / "checkpoints"), "--graph", str(graph_dir),
                     "--out", str(out)]) == 0
    assert json.loads(out.read_text()) == json.loads((root / "a" / "metrics.json").read_text())


def test_tensorboard_has_every_task(runs):
    from jaxfood.train.monitoring import read_scalars

    root, _, _ = runs
    scalars = read_scalars(root / "a" / "tb")
    for task in tw.TASKS:
        for prefix in ("loss", "weight", "task_grad_norm"):
            assert len(scalars[f"{prefix}/{task}"]) == 4, (prefix, task)
    for tag in ("loss/total", "learning_rate/encoder", "learning_rate/classifier", "grad_norm/encoder",
                "task_grad_cosine/food_classification__nutrition", "val/food_classification/accuracy"):
        assert tag in scalars, tag
    # Validation covers all three tasks, at every evaluation (the fitted start, step 0, and
    # eval_every=2 of 4 steps).
    # (the tiny graph has too few foods to hold any out: its Food-level figures are the in-sample ones)
    for tag in ("val/nutrition/spearman_in_sample", "val/salient_molecules/precision_at_3", "val/salient_molecules/fidelity_plus"):
        assert [step for step, _ in scalars[tag]] == [0, 2, 4], tag


def test_bad_config_key_and_checkpoint_are_one_line_errors(tmp_path, capsys):
    assert cli.main(["finetune", "--workdir", str(tmp_path / "w"), "--set", "optimizer.encoder.lr=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "optimizer.encoder.lr" in err and "\n" not in err
    assert cli.main(["finetune", "--workdir", str(tmp_path / "w"), "--set", "weighting.method=magic"]) == 2
    assert "weighting.method" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert cli.main(["evaluate", "--checkpoint", str(tmp_path / "empty"), "--graph", str(tmp_path / "nope")]) == 2
    assert "error: " in capsys.readouterr().err
    assert not Path(tmp_path / "w" / "metrics.json").exists()
