#!/usr/bin/env python
"""Fast model-development harness: fine-tune from scratch on the default graph and compare with
the chemometrics baselines on the same test samples (docs/experiments.md logs its figures).

    python experiments/model_harness.py [--seeds 0 1 2] [--graph DIR] [--steps N] [--set key=value ...]

No pretraining, no ablations, no figures: one short fine-tune per seed (``--set`` addresses
:class:`~jaxfood.train.finetune.FinetuneConfig` keys), then accuracy / macro AUROC / ECE /
nutrient R² / precision@10 of the model next to logistic regression, random forest, ridge and
fold change; mean ± std over the seeds last. ``--graph``: a graph directory from
``jaxfood build-graph`` (default: the embedded default graph of each seed).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

ROWS = [
    ("accuracy", ("food_classification", "accuracy"), "logreg_accuracy"),
    ("rf accuracy", None, "rf_accuracy"),
    ("AUROC", ("food_classification", "auroc_macro"), "logreg_auroc_macro"),
    ("ECE", ("food_classification", "ece"), "logreg_ece"),
    ("nutrient R2", ("nutrition", "nutrient_r2"), "ridge_nutrient_r2"),
    ("precision@10", ("salient_molecules", "precision_at_10"), "fold_change_precision_at_10"),
    ("recall@10", ("salient_molecules", "recall_at_10"), "fold_change_recall_at_10"),
    ("fidelity+", ("salient_molecules", "fidelity_plus"), None),
    ("fidelity-", ("salient_molecules", "fidelity_minus"), None),
]


def _get(d, path):
    for k in path or ():
        if not isinstance(d, dict) or k not in d:
            return float("nan")
        d = d[k]
    return float(d) if isinstance(d, (int, float)) else float("nan")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--graph", default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--no-baselines", action="store_true")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)

    from jaxfood.compile_cache import enable_compile_cache

    enable_compile_cache()  # the seeds' graphs have the same shapes: one compilation
    from jaxfood.config import load_config
    from jaxfood.data.default import build_default_graph
    from jaxfood.eval.pipeline import run_baselines
    from jaxfood.graph.hetero_graph import load_graph
    from jaxfood.train.finetune import FinetuneConfig
    from jaxfood.workflows import finetune

    sets = list(args.set) + ([f"steps={args.steps}"] if args.steps else [])
    sets += ["tensorboard=false", "figures=false", "stability_perturbations=0"]
    table = {name: ([], []) for name, _, _ in ROWS}
    for seed in args.seeds:
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = load_graph(args.graph) if args.graph else build_default_graph(seed=seed)
        cfg = load_config(FinetuneConfig(), None, sets + [f"seed={seed}"])
        with tempfile.TemporaryDirectory(prefix="jaxfood-harness-") as tmp:
            result = finetune(graph, cfg, tmp, pretrained=None, progress=False)
        base = {} if args.no_baselines else run_baselines(graph, _reference(graph), seed=seed,
                                                          rf_estimators=100)
        line = []
        for name, model_path, base_key in ROWS:
            m, b = _get(result.metrics, model_path), base.get(base_key, float("nan"))
            table[name][0].append(m)
            table[name][1].append(b)
            line.append(f"{name} {m:.3f}/{b:.3f}")
        print(f"[seed {seed}, {time.perf_counter() - start:.0f} s, kept step {result.best_step}"
              f"{'' if result.composed_step is None else f' + {result.composed_parts} of step {result.composed_step}'}] " + "; ".join(line),
              flush=True)
        print("  validation (step: accuracy / nutrient R2): " + ", ".join(
            f"{row['step']}: {row.get('food_classification/accuracy', float('nan')):.3f} / "
            f"{row.get('nutrition/nutrient_r2', float('nan')):.3f}" for row in result.history["val"]), flush=True)
    print(f"{'metric':<14}{'model':>16}{'baseline':>16}")
    for name, (m, b) in table.items():
        print(f"{name:<14}{np.mean(m):>9.3f} ± {np.std(m):.3f}{np.mean(b):>9.3f} ± {np.std(b):.3f}")
    return 0


def _reference(graph):
    from jaxfood.workflows import default_biomarkers

    return default_biomarkers(graph)


if __name__ == "__main__":
    sys.exit(main())
