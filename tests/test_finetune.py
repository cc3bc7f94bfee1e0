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
    "steps=4", "eval_every=2", "patience=0", "scorers=[intensity_attribution]", "figures=false",
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


def test_fine_tuning_starts_at_the_logistic_regression_and_evaluates_it(runs):
    """``wide_init=fit`` (the default): the run starts at the logistic regression of the training
    samples' intensity profiles, with the deep paths silenced, and the loop evaluates that start."""
    import jax
    import numpy as np

    from jaxfood.config import load_config
    from jaxfood.eval.baselines import logreg_baseline, preprocess_intensities
    from jaxfood.eval.evaluator import Evaluator, model_programs
    from jaxfood.eval.pipeline import raw_peak_areas
    from jaxfood.graph import schema
    from jaxfood.graph.hetero_graph import SPLIT_CODES
    from jaxfood.graph.splits import prepare_graph
    from jaxfood.models.heads import CLASS_ATTENTION, make_multitask_model
    from jaxfood.train.checkpoint import restore_checkpoint
    from jaxfood.train.finetune import CLASS_LOGITS_START, FinetuneConfig

    _, graph_dir, result = runs
    cfg = load_config(FinetuneConfig(), None, SMALL)
    assert cfg.wide_init == "fit"
    graph = load_graph(graph_dir)
    init = result.initial_params

    # The classifier's and the nutrient head's deep outputs start at 0 (but for the classifier's
    # intercept), the class branches small.
    for leaf in init["nutrient_head"]["mlp"]["out"].values():
        assert np.all(np.asarray(leaf) == 0)
    assert np.all(np.asarray(init["classifier"]["mlp"]["out"]["kernel"]) == 0)
    np.testing.assert_array_equal(init["salient_pool"][CLASS_ATTENTION]["logit_log_scale"], CLASS_LOGITS_START)

    # The classifier starts at the logistic-regression baseline: the baseline's own function, on its
    # own features (raw peak areas -> TIC -> log1p -> standardised), predicts the same foods.
    prepared = prepare_graph(graph).to_numpy()
    model = make_multitask_model(prepared, result.encoder_config, cfg.heads)
    labels = np.asarray(prepared.sample_food)
    split = np.asarray(prepared.sample_split)
    train = (split == SPLIT_CODES["train"]) & (labels >= 0)
    others = (split != SPLIT_CODES["train"]) & (labels >= 0)
    x = preprocess_intensities(raw_peak_areas(graph))
    want = logreg_baseline(x[train], labels[train], x[others], labels[others],
                           n_classes=int(prepared.meta.num_nodes[schema.FOOD]))["proba"]
    # (The forward pass the evaluation compiled for this model and graph: no compilation here.)
    out = model_programs(model).predict(jax.device_put(init), prepared)
    wide = np.asarray(out.wide_food_logits) + np.asarray(init["classifier"]["mlp"]["out"]["bias"])
    proba = np.exp(wide - wide.max(1, keepdims=True))
    np.testing.assert_allclose((proba / proba.sum(1, keepdims=True))[others], want, atol=1e-4)
    assert float(np.abs(init["classifier"]["wide_kernel"]).max()) > 1e-2  # a fitted kernel, not the zeros it replaces

    # The starting model is that logistic regression plus at most exp(-3) of standardised class logits.
    deep = np.asarray(out.food_logits - out.wide_food_logits) - np.asarray(init["classifier"]["mlp"]["out"]["bias"])
    assert np.all(np.std(deep, axis=0) <= 1.01 * np.exp(CLASS_LOGITS_START))
    train_accuracy = np.mean(np.argmax(np.asarray(out.food_logits)[train], -1) == labels[train])
    assert train_accuracy == 1.0  # the toy foods are separable by their marker molecules

    # The starting state is evaluated (step 0) beside the later steps, which pay one standard error
    # of the validation accuracy (0.5 / sqrt(validation samples)) to replace it.
    val = result.history["val"]
    assert [row["step"] for row in val] == [0, 2, 4]
    num_val = int(np.sum((split == SPLIT_CODES["val"]) & (labels >= 0)))
    assert "selection_margin" not in val[0]
    for row in val[1:]:
        assert np.isclose(row["selection_margin"], 0.5 / np.sqrt(num_val))
    # Kept: the first state no later one beats; while the start is kept, the best-scoring trained
    # state lends it its representation.
    score = {row["step"]: row["selection_score"] for row in val}
    kept, composed = 0, None
    for step in (2, 4):
        if score[step] > score[kept]:
            kept, composed = step, None
        elif kept == 0 and (composed is None or score[step] > score[composed]):
            composed = step
    assert result.best_step == kept

    # A kept start carries the trained representation (encoder, Food projection) of that step and its own heads.
    state, meta = restore_checkpoint(result.checkpoint_dir)
    assert result.composed_step == meta.get("composed_step") == composed
    assert result.metrics["composed_step"] == result.composed_step
    parts = result.composed_parts or ()
    assert result.metrics["composed_parts"] == meta.get("composed_parts") == (list(parts) if kept == 0 else None)
    took_head = "nutrient_head" in parts
    changed = {name: not all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(state["params"][name]),
                                                                  jax.tree_util.tree_leaves(init[name])))
               for name in ("encoder", "food_projection", "classifier", "nutrient_head", "salient_pool")}
    assert changed == {"encoder": True, "food_projection": True, "classifier": kept != 0,
                       "nutrient_head": kept != 0 or took_head, "salient_pool": kept != 0}
    if took_head:  # only because the trained head (on the trained encoder) validates better than the start
        val_r2 = Evaluator(model, prepared).evaluate(jax.device_put(state["params"]), "val")["nutrition"]["nutrient_r2"]
        assert val_r2 > val[0]["nutrition/nutrient_r2"]


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
