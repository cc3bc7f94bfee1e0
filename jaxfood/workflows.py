"""Training and evaluation composed: what the commands and ``experiments/`` call.

``jaxfood.train`` and ``jaxfood.eval`` are siblings that import neither each other; the functions
here hand the fine-tuning loop its evaluation (:mod:`jaxfood.eval.evaluator`) and score what it
leaves behind.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from jaxfood.eval import evaluator as ev
from jaxfood.eval import predict as pred
from jaxfood.graph.hetero_graph import HeteroGraph
from jaxfood.graph.splits import prepare_graph
from jaxfood.train import finetune as ft
from jaxfood.train.distributed import finetune_on_devices


def reference_biomarkers(graph: HeteroGraph, biomarkers=None) -> dict[str, set[str]] | None:
    """``{food: {molecule ids}}`` from ``biomarkers`` (CSV path, mapping or pairs), else the
    simulator's for the embedded default graph, else None."""
    return ev.as_reference(biomarkers) if biomarkers is not None else ev.default_biomarkers(graph)


def evaluation_for(graph: HeteroGraph, biomarkers=None) -> ft.EvaluationFactory:
    """The evaluation the fine-tuning loop runs on ``graph`` (see :func:`reference_biomarkers`)."""
    return ev.finetune_evaluation(reference_biomarkers(graph, biomarkers))


def finetune(graph: HeteroGraph, cfg: ft.FinetuneConfig | None = None, workdir: str | Path = "runs/finetune",
             pretrained: str | Path | None = None, biomarkers=None, progress: bool = True, log=None,
             options=None) -> ft.FinetuneResult:
    """Fine-tunes ``graph`` (:func:`jaxfood.train.finetune.finetune`, or the data-parallel job when
    ``options`` want it) with :mod:`jaxfood.eval.evaluator`'s validation and test metrics."""
    return finetune_on_devices(graph, cfg or ft.FinetuneConfig(), workdir, options=options, pretrained=pretrained,
                               evaluation=evaluation_for(graph, biomarkers), progress=progress, log=log)


def evaluate_checkpoint(ckpt_dir: str | Path, graph: HeteroGraph, biomarkers=None, split: str = "test",
                        step: int | None = None) -> dict[str, Any]:
    """Test metrics of a fine-tuning checkpoint on ``graph`` -- those :func:`finetune` reported.

    ``biomarkers`` (a ``feature,category`` CSV path, ``{food: ids}`` or pairs) replaces the reference
    the checkpoint was scored with (kept in its meta).
    """
    loaded = ft.load_finetuned(ckpt_dir, graph, step)
    cfg = loaded.config
    if biomarkers is not None:
        reference = ev.as_reference(biomarkers)
    else:
        reference = ev.as_reference(loaded.meta.get("biomarkers"))
    evaluation = ev.FinetuneEvaluation(loaded.model, prepare_graph(graph), cfg, reference)
    metrics = evaluation.test(loaded.params, split)
    metrics["task_weights"] = ft.task_weight_summary(cfg.weighting, loaded.params)
    metrics["best_step"] = int(loaded.meta.get("best_step", loaded.meta.get("step", 0)))
    return metrics


def out_of_library_rates(tables, num_held_out: int = 5, cfg: ft.FinetuneConfig | None = None,
                         workdir: str | Path = "runs/ool", seed: int = 0, quantile: float = pred.DEFAULT_QUANTILE,
                         held_out: Sequence[str] | None = None) -> dict[str, Any]:
    """:func:`jaxfood.eval.predict.out_of_library_rates` with a model fine-tuned by ``cfg`` in ``workdir``."""

    def fit(graph: HeteroGraph):
        result = finetune(graph, cfg, workdir, progress=False)
        return ft.load_finetuned(result.checkpoint_dir, graph)

    return pred.out_of_library_rates(tables, fit, num_held_out=num_held_out, seed=seed, quantile=quantile,
                                     held_out=held_out)
