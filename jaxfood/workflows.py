"""Training and evaluation composed once: :func:`pretrain`, :func:`finetune`, :func:`evaluate`.

``jaxfood pretrain|finetune|evaluate``, ``experiments/run_mtl.py`` and ``experiments/pod/train.py``
call these; each runs on 1..N devices of 1..N processes (every process calls it with the same
arguments; process 0 alone writes reports), on the full graph or on sampled subgraphs
(:class:`~jaxfood.train.parallel_options.DataParallelOptions`). Training (``jaxfood.train``) gets
evaluation as hooks; it never imports ``jaxfood.eval``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax

from jaxfood.config import load_config
from jaxfood.eval import predict as prediction
from jaxfood.eval.evaluator import Evaluator, as_reference, default_biomarkers, stability_settings
from jaxfood.eval.memory import fit_scorers
from jaxfood.eval.readouts import embedding_readouts, food_embedding_figure
from jaxfood.graph import schema
from jaxfood.graph.hetero_graph import HeteroGraph
from jaxfood.graph.splits import prepare_graph
from jaxfood.io_utils import write_json
from jaxfood.models.heads import make_multitask_model
from jaxfood.train import finetune as training
from jaxfood.train import pretrain as pretraining
from jaxfood.train.checkpoint import latest_step
from jaxfood.train.finetune import (
    FinetuneConfig,
    FinetuneResult,
    check_config,
    composed_parts,
    load_finetuned,
    task_weight_summary,
)
from jaxfood.train.graphcl import PretrainConfig
from jaxfood.train.monitoring import write_curves
from jaxfood.train.parallel_options import DataParallelOptions
from jaxfood.train.processes import is_primary

Log = Callable[[str], None]


def pretrain(graph: HeteroGraph, cfg: PretrainConfig, workdir: str | Path, *,
             options: DataParallelOptions = DataParallelOptions(), progress: bool = True,
             log: Log | None = None) -> pretraining.PretrainResult:
    """GraphCL pretraining (:func:`jaxfood.train.pretrain.pretrain`) and the read-outs of its encoder.

    Writes under ``workdir`` (process 0): ``pretrain_history.json`` (``loss`` and ``val_loss`` per
    epoch), ``pretrain_metrics.json`` (k-NN purity and linear-probe accuracy of the pretrained and
    of the randomly initialised encoder; NaN as null) and ``figures/pretrain_food_embeddings.png``,
    ``figures/random_food_embeddings.png``; training writes ``pretrain_config.yaml``,
    ``checkpoints/`` and ``tb/``. Raises ``Preempted`` when stopped by SIGTERM.
    """
    workdir = Path(workdir)
    result = pretraining.pretrain(graph, cfg, workdir, options=options, progress=progress and is_primary(),
                                  log=log if is_primary() else None)
    result.metrics = {side: embedding_readouts(emb, graph, cfg.knn_k, cfg.seed)
                      for side, emb in result.embeddings.items()}
    if is_primary():
        write_json(workdir / "pretrain_metrics.json",
                   {side: {k: (v if math.isfinite(v) else None) for k, v in values.items()}
                    for side, values in result.metrics.items()})
        write_json(workdir / "pretrain_history.json", result.history)
        titles = {"pretrained": "Food embeddings after GraphCL", "random": "Food embeddings, random encoder"}
        names = {"pretrained": "food_embeddings", "random": "food_embeddings_random"}
        files = {"pretrained": "pretrain_food_embeddings.png", "random": "random_food_embeddings.png"}
        result.figures = {
            names[side]: food_embedding_figure(
                emb[schema.FOOD], graph, workdir / "figures" / files[side],
                f"{titles[side]} (k-NN purity {result.metrics[side]['knn_purity']:.2f})")
            for side, emb in result.embeddings.items()}
    return result


def _evaluator(model, graph: HeteroGraph, cfg: FinetuneConfig, temperature: float = 1.0) -> Evaluator:
    return Evaluator(model, prepare_graph(graph), cfg.salient_k, cfg.knn_k, cfg.salient_scorer, cfg.scorers,
                     stability_settings(cfg), temperature)


def _test_metrics(evaluator: Evaluator, params, cfg: FinetuneConfig, reference, best_step: int,
                  composed_step: int | None = None, parts: list[str] | None = None) -> dict[str, Any]:
    """The metrics.json of a kept state: test split, every scorer, stability, task weights."""
    metrics = evaluator.evaluate(params, "test", reference)
    metrics["task_weights"] = task_weight_summary(cfg.weighting, params)
    metrics["best_step"] = int(best_step)
    metrics["composed_step"] = composed_step
    metrics["composed_parts"] = parts
    return metrics


def finetune(graph: HeteroGraph, cfg: FinetuneConfig | None = None, workdir: str | Path = "runs/finetune", *,
             pretrained: str | Path | None = None, biomarkers=None,
             options: DataParallelOptions = DataParallelOptions(), progress: bool = True,
             log: Log | None = None) -> FinetuneResult:
    """Multi-task fine-tuning (:func:`jaxfood.train.finetune.finetune`) validated on all three
    tasks, then the kept checkpoint scored on the test split.

    Validation every ``eval_every`` steps: food classification, nutrition and the headline
    salient scorer (precision/recall@k, fidelity; no stability perturbations) on the val split;
    the combined score picks the kept checkpoint and stops early. ``biomarkers``: reference for
    precision@k (``{food: ids}``, ``(id, food)`` pairs or a ``feature,category`` CSV path); default:
    the simulator's for the embedded default graph. Writes under ``workdir`` (process 0):
    ``metrics.json`` (test metrics, also ``jaxfood evaluate``'s), ``history.json``, ``figures/``;
    training writes ``config.yaml``, ``checkpoints/``, ``tb/``. Raises ``Preempted`` when stopped.
    """
    cfg = check_config(cfg or FinetuneConfig())
    workdir = Path(workdir)
    reference = as_reference(biomarkers) if biomarkers is not None else default_biomarkers(graph)
    evaluators: dict[int, Evaluator] = {}
    run = {"cfg": cfg}  # the configuration the run uses (prepare may change its scorers)

    def evaluator_for(model) -> Evaluator:
        if id(model) not in evaluators:  # compiled once per model, reused at every evaluation
            evaluators[id(model)] = _evaluator(model, graph, run["cfg"])
        return evaluators[id(model)]

    def prepare(model, params, run_cfg: FinetuneConfig) -> FinetuneConfig:
        if latest_step(workdir / "resume") is not None and (workdir / "config.yaml").is_file():
            # A resumed run keeps the scorers it started with (the memory left may differ now).
            recorded = load_config(FinetuneConfig(), workdir / "config.yaml", [])
            scorer, scorers, needs = recorded.salient_scorer, tuple(recorded.scorers), {}
        else:
            scorer, scorers, needs = fit_scorers(model, params, prepare_graph(graph), run_cfg.salient_scorer,
                                                 run_cfg.scorers, run_cfg.salient_k)
        if (scorer, scorers) != (run_cfg.salient_scorer, tuple(run_cfg.scorers)) and log is not None and is_primary():
            dropped = [n for n in dict.fromkeys([run_cfg.salient_scorer, *run_cfg.scorers]) if n not in scorers]
            sizes = ", ".join(f"{n} {needs[n] / 1024 ** 3:.1f} GiB" for n in dropped if n in needs)
            log(f"whole-graph evaluation: scorers {dropped} left out ({sizes or 'as when the run started'}); "
                f"headline scorer {scorer}")
        run["cfg"] = dataclasses.replace(run_cfg, salient_scorer=scorer, scorers=scorers)
        return run["cfg"]

    background = []

    def validate(model, params):
        evaluator = evaluator_for(model)
        if not background:  # the test evaluation's other scorers compile while the model trains
            background.append(evaluator.compile_in_background(params))
        return evaluator.evaluate(params, "val", reference, scorers=(run["cfg"].salient_scorer,), stability=False)

    stored = None if reference is None else {f: sorted(m) for f, m in sorted(reference.items())}
    try:
        result = training.finetune(graph, cfg, workdir, pretrained=pretrained, validate=validate, options=options,
                                   meta_extra={"biomarkers": stored}, prepare=prepare,
                                   progress=progress and is_primary(),
                                   log=log if is_primary() else None)
    finally:
        for thread in background:
            if thread is not None:
                thread.join()
    model = make_multitask_model(prepare_graph(graph), result.encoder_config, cfg.heads)
    params = jax.device_put(result.params)
    evaluator = next(iter(evaluators.values())) if evaluators else _evaluator(model, graph, result.config)
    evaluator.temperature = result.temperature  # calibrated on val with the kept state
    result.metrics = _test_metrics(evaluator, params, result.config, reference, result.best_step,
                                   result.composed_step, result.composed_parts)
    if is_primary():
        write_json(workdir / "metrics.json", result.metrics)
        write_json(workdir / "history.json", result.history)
        if cfg.figures:
            result.figures = {path.stem: path for path in write_curves(result.history, workdir / "figures")}
    return result


def untrained(graph: HeteroGraph, cfg: FinetuneConfig, encoder_config=None, biomarkers=None) -> dict[str, Any]:
    """The control of a run: the same model and evaluation with its initial weights (seed
    ``cfg.seed``, nothing trained), scored on the test split like the trained model. A trained
    model's figures mean something where they clearly beat these."""
    cfg = check_config(cfg)
    prepared = prepare_graph(graph)
    model = make_multitask_model(prepared, encoder_config or cfg.encoder, cfg.heads)
    params = model.init(jax.random.key(cfg.seed), prepared)  # as fine-tuning initialises it
    reference = as_reference(biomarkers) if biomarkers is not None else default_biomarkers(graph)
    return _evaluator(model, graph, cfg).evaluate(params, "test", reference, stability=False)


def evaluate(ckpt_dir: str | Path, graph: HeteroGraph, biomarkers=None, split: str = "test",
             step: int | None = None) -> dict[str, Any]:
    """Metrics of a fine-tuning checkpoint on ``graph`` -- those :func:`finetune` reported for it
    (any run: one device or many, full graph or sampled).

    ``biomarkers`` (a ``feature,category`` CSV path, ``{food: ids}`` or pairs) replaces the reference
    the checkpoint was scored with (kept in its meta).
    """
    loaded = load_finetuned(ckpt_dir, graph, step)
    if biomarkers is not None:
        reference = as_reference(biomarkers)
    elif loaded.meta.get("biomarkers") is not None:
        reference = as_reference(loaded.meta["biomarkers"])
    else:
        reference = None
    metrics = _evaluator(loaded.model, graph, loaded.config, loaded.temperature).evaluate(loaded.params, split,
                                                                                        reference)
    metrics["task_weights"] = task_weight_summary(loaded.config.weighting, loaded.params)
    metrics["best_step"] = int(loaded.meta.get("best_step", loaded.meta.get("step", 0)))
    metrics["composed_step"] = loaded.meta.get("composed_step")
    metrics["composed_parts"] = composed_parts(loaded.meta)
    return metrics


def out_of_library_rates(tables, num_held_out: int = 5, cfg: FinetuneConfig | None = None,
                         workdir: str | Path = "runs/ool", seed: int = 0,
                         quantile: float = prediction.DEFAULT_QUANTILE, held_out=None) -> dict[str, Any]:
    """:func:`jaxfood.eval.predict.out_of_library_rates` with a model fine-tuned by ``cfg`` in ``workdir``."""

    def fit(graph: HeteroGraph):
        result = finetune(graph, cfg, workdir, progress=False)
        return load_finetuned(result.checkpoint_dir, graph)

    return prediction.out_of_library_rates(tables, fit, num_held_out=num_held_out, seed=seed, quantile=quantile,
                                           held_out=held_out)
