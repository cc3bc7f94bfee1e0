"""The main job, ``experiments/run_mtl.py``: bad inputs and a short end-to-end run."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run_mtl():
    spec = importlib.util.spec_from_file_location("run_mtl", ROOT / "experiments" / "run_mtl.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["run_mtl"] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("args, message", [
    (["--set", "finetune.stepz=3"], "unknown key 'finetune.stepz'"),
    (["--set", "finetune.steps=abc"], "key 'finetune.steps' = 'abc': expected an integer"),
    (["--set", "seeds=0"], "seeds=0: expected a positive number of seeds"),
    (["--graph", "{tmp}/no_graph"], "no_graph/graph.json: not found"),
    (["--config", "{tmp}/missing.yaml"], "missing.yaml: config file not found"),
])
def test_bad_inputs_exit_2_with_one_line_and_write_nothing(tmp_path, capsys, args, message):
    workdir = tmp_path / "w"
    args = [a.format(tmp=tmp_path) for a in args]
    code = _run_mtl().main(["--workdir", str(workdir), "--no-progress", *args])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err
    assert not workdir.exists()


#: The embedded default graph (its 65 foods and 33 nutrients are checked below) with a tiny model:
#: the test checks that every output is written, not what the model learns. The fine-tuned model
#: and the from-scratch ablation take their encoder from pretrain.encoder; one stability
#: perturbation still computes stability_jaccard; every scorer is kept.
TINY_MODEL = [
    "pretrain.encoder.hidden_dim=8", "pretrain.encoder.num_heads=2", "pretrain.encoder.embedding_dim=8",
    "pretrain.encoder.num_layers=1",
    "pretrain.batch_size=32", "pretrain.val_views=1", "pretrain.projection_hidden=8", "pretrain.projection_dim=4",
    "finetune.heads.hidden_dim=8", "finetune.heads.pool_dim=8", "finetune.heads.attention_dim=4",
    "finetune.heads.projection_dim=4", "finetune.stability_perturbations=1",
]


@pytest.mark.slow
def test_short_end_to_end_run_writes_every_output(tmp_path, capsys):
    from jaxfood.train.monitoring import read_scalars

    workdir = tmp_path / "w"
    code = _run_mtl().main([
        "--workdir", str(workdir), "--no-progress", *[arg for item in TINY_MODEL for arg in ("--set", item)],
        "--set", "pretrain.epochs=1", "--set", "pretrain.steps_per_epoch=1",
        "--set", "finetune.steps=2", "--set", "finetune.eval_every=2", "--set", "evaluation.rf_estimators=5",
    ])
    out = capsys.readouterr().out
    assert code == 0
    metrics = json.loads((workdir / "metrics.json").read_text())
    required = {
        "food_classification": {"accuracy", "weighted_f1", "auroc_macro", "top3_accuracy"},
        "nutrition": {"knn_purity", "spearman", "nutrient_r2"},
        "salient_molecules": {"precision_at_10", "recall_at_10", "fidelity_plus", "fidelity_minus"},
    }  # stability_jaccard: the main result only (checked below)
    for section, keys in required.items():
        assert keys <= set(metrics[section]), section
        # The ablations and the untrained control carry the same nested sections and keys as the main result.
        for ablation in ("pretrained_probe", "from_scratch", "untrained"):
            assert keys <= set(metrics[ablation][section]), (ablation, section)
    assert {"logreg_accuracy", "logreg_weighted_f1", "rf_accuracy", "ridge_nutrient_r2",
            "fold_change_precision_at_10", "random_precision_at_10"} <= set(metrics["baselines"])
    assert {"food_classification", "nutrition", "salient_molecules"} <= set(metrics["task_weights"])
    assert metrics["runtime_s"] > 0
    assert 0.0 <= metrics["food_classification"]["accuracy"] <= 1.0
    # Model and baselines scored on the same test samples, and every section says on how many.
    fc = metrics["food_classification"]
    assert fc["num_samples"] > 0 and fc["samples_digest"] == metrics["baselines"]["samples_digest"]
    assert fc["num_samples"] == metrics["baselines"]["num_samples"] == metrics["nutrition"]["num_samples"] \
        == metrics["salient_molecules"]["num_samples"]
    # Food-level figures on the foods held out of the nutrition training (7 of 65), in-sample on the rest.
    assert metrics["nutrition"]["num_foods"] == 7 and metrics["nutrition"]["num_foods_in_sample"] == 58
    assert set(metrics["nutrition"]["in_sample"]) == {"spearman_in_sample", "knn_purity_in_sample"}
    # Checkpoints, graph, TensorBoard events for every task, a report whose images exist.
    assert any((workdir / "checkpoints").iterdir())
    assert (workdir / "graph" / "graph.json").exists()
    tags = set(read_scalars(workdir / "tb"))
    for task in ("food_classification", "nutrition", "salient_molecules"):
        assert f"loss/{task}" in tags and f"weight/{task}" in tags and f"task_grad_norm/{task}" in tags
    report = (workdir / "report.md").read_text()
    for title in ("Food classification", "Nutrition alignment", "Salient molecule discovery"):
        assert f"## {title}" in report
    images = [line.split("](")[1].rstrip(")") for line in report.splitlines() if line.startswith("![")]
    assert images and all((workdir / image).exists() for image in images)
    for caption in ("Confusion matrix", "Food embeddings by USDA category", "Food embeddings coloured by",
                    "Top 10 molecules per food", "jaxfood vs ablations and baselines"):
        assert f"### {caption}" in report, caption
    assert 0.0 <= metrics["salient_molecules"]["stability_jaccard"] <= 1.0
    # The detail stays in metrics.json: R² per nutrient, every scorer; rankings.json: every scorer's top-10.
    assert len(metrics["nutrition"]["nutrient_r2_per_nutrient"]) == 33
    scorers = set(metrics["salient_molecules"]["per_scorer"])
    assert {"class_attention", "attention", "gat_attention", "gradient"} <= scorers
    rankings = json.loads((workdir / "rankings.json").read_text())
    assert set(rankings) == scorers
    for per_food in rankings.values():  # each molecule with its m/z and RT (the embedded table has no annotation)
        assert len(per_food) == 65 and all(len({e["molecule_id"] for e in top}) == 10 for top in per_food.values())
        assert all(e["mz"] > 0 and e["rt"] >= 0 and e["annotation"] is None for top in per_food.values() for e in top)
    assert "food accuracy" in out and "runtime (s)" in out
