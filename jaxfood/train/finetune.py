"""Multi-task fine-tuning: configuration, the training loop, evaluation and checkpoints.

:func:`finetune` loads a pretrained encoder (GraphCL, or converted from PyTorch) or starts from
scratch, trains food classification, nutrition alignment and salient molecule discovery together
with the jitted step of :mod:`jaxfood.train.multitask`, validates every ``eval_every`` steps on
all tasks, stops early on a combined validation score, keeps the best checkpoint and evaluates it
on the test split. Everything lands under ``workdir``::

    config.yaml          the resolved configuration
    checkpoints/         orbax: params (encoder + heads + task weighting), optimizer state,
                         weighting state, step; meta: config, encoder config, graph id maps
    tb/                  TensorBoard event files (every task loss, weights, lrs, grad norms, val)
    history.json         per-step training metrics and per-evaluation validation metrics
    metrics.json         the final test metrics (also returned)
    figures/             losses.png, task_weights.png, gradient_conflict.png

The metrics come from the evaluation the caller supplies (``evaluation``: ``train/`` imports
nothing from ``eval/``; :func:`jaxfood.workflows.finetune` passes :mod:`jaxfood.eval.evaluator`'s).
:func:`load_finetuned` rebuilds the model from a checkpoint; :func:`jaxfood.workflows.evaluate_checkpoint`
reproduces the metrics exactly (same graph, same reference biomarkers -- the checkpoint keeps the
ones it was scored with).
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from jaxfood.config import config_from_dict, config_to_dict, dump_config
from jaxfood.errors import CheckpointError, ConfigError
from jaxfood.graph.hetero_graph import SPLIT_CODES, HeteroGraph
from jaxfood.graph.splits import prepare_graph
from jaxfood.models.encoder import EncoderConfig
from jaxfood.models.heads import SCORER_NAMES, HeadsConfig, MultiTaskModel, make_multitask_model
from jaxfood.train import multitask as mt
from jaxfood.train import task_weighting as tw
from jaxfood.train.optimizer import OptimizerConfig, learning_rates, make_optimizer

CHECKPOINT_KIND = "finetune"


def default_encoder_config() -> EncoderConfig:
    """The GraphCL default (:func:`jaxfood.train.pretrain.default_encoder_config`): training from
    scratch and from a pretrained checkpoint then compare the same architecture."""
    from jaxfood.train.pretrain import default_encoder_config as pretrain_default

    return pretrain_default()


def default_selection() -> dict[str, float]:
    """Validation metrics of the validation samples only; the Food-level figures (``nutrition.spearman``,
    ``knn_purity``) are in-sample and would make the number that picks the checkpoint a test figure."""
    return {"food_classification.accuracy": 1.0, "nutrition.nutrient_r2": 0.5}


#: Metrics that do not depend on the split, never a selection criterion: the Food-level figures
#: (in-sample) and the rankings' agreement with the reference biomarkers (training samples' rankings
#: against the reference the test reports); prefixes.
IN_SAMPLE_METRICS = ("nutrition.spearman", "nutrition.knn_purity", "salient_molecules.precision_at_",
                     "salient_molecules.recall_at_", "salient_molecules.stability_jaccard")


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """Everything a fine-tuning run depends on (``--set key=value`` addresses it, dotted for sections).

    ``selection``: validation metric (``section.name``) -> weight; the combined score decides early
    stopping and the kept checkpoint. ``patience``: evaluations without improvement before stopping
    (0 = never). ``encoder``: used when starting from scratch; a pretrained checkpoint brings its own.
    ``task_gradient_scope``: representation | encoder (see :func:`multitask.make_train_step`).
    ``salient_k``: k of precision/recall@k and fidelity; ``salient_scorer``: scorer of the headline
    salient-molecule numbers; ``scorers``: all scorers evaluated (reported under ``per_scorer``).
    ``stability_*``: ``stability_jaccard`` of the headline scorer, the mean top-k Jaccard overlap of
    each food's list between the clean input and that many perturbations (Gaussian noise of sd
    ``stability_noise_sd`` on the normalised intensities, ``stability_drop_fraction`` of the
    molecule edges dropped; seeded by ``seed``; 0 perturbations: not computed). ``prng_impl``: rbg (fast on CPU) or threefry2x32.
    """

    seed: int = 0
    steps: int = 150
    eval_every: int = 25
    patience: int = 3
    selection: dict[str, float] = dataclasses.field(default_factory=default_selection)
    encoder: EncoderConfig = dataclasses.field(default_factory=default_encoder_config)
    heads: HeadsConfig = dataclasses.field(default_factory=HeadsConfig)
    loss: mt.LossConfig = dataclasses.field(default_factory=mt.LossConfig)
    weighting: tw.WeightingConfig = dataclasses.field(default_factory=tw.WeightingConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    task_gradient_scope: Literal["representation", "encoder"] = "representation"
    salient_k: int = 10
    salient_scorer: Literal["class_attention", "attention", "gat_attention", "gradient"] = "class_attention"
    scorers: tuple[str, ...] = SCORER_NAMES
    stability_perturbations: int = 3
    stability_noise_sd: float = 0.1
    stability_drop_fraction: float = 0.05
    knn_k: int = 5
    prng_impl: Literal["rbg", "threefry2x32"] = "rbg"
    tensorboard: bool = True
    figures: bool = True


def check_config(cfg: FinetuneConfig) -> FinetuneConfig:
    """Value checks the type checks of :func:`jaxfood.config.load_config` cannot express."""
    positives = {"steps": cfg.steps, "eval_every": cfg.eval_every, "salient_k": cfg.salient_k, "knn_k": cfg.knn_k,
                 "loss.salient_top_k": cfg.loss.salient_top_k, "optimizer.accumulation_steps":
                 cfg.optimizer.accumulation_steps, "heads.hidden_dim": cfg.heads.hidden_dim,
                 "heads.pool_dim": cfg.heads.pool_dim, "heads.projection_dim": cfg.heads.projection_dim}
    for key, value in positives.items():
        if value < 1:
            raise ConfigError(f"finetune config: key '{key}' = {value}: expected a positive integer")
    if not 0.0 < cfg.loss.supervised_fraction <= 1.0:
        raise ConfigError(f"finetune config: key 'loss.supervised_fraction' = {cfg.loss.supervised_fraction}: "
                          "expected a number in (0, 1]")
    if not 0.0 <= cfg.loss.label_smoothing < 1.0:
        raise ConfigError(f"finetune config: key 'loss.label_smoothing' = {cfg.loss.label_smoothing}: "
                          "expected a number in [0, 1)")
    if cfg.stability_perturbations < 0 or cfg.stability_noise_sd < 0 or not 0.0 <= cfg.stability_drop_fraction < 1.0:
        raise ConfigError("finetune config: keys 'stability_perturbations' and 'stability_noise_sd' must be >= 0 and "
                          f"'stability_drop_fraction' in [0, 1) (got {cfg.stability_perturbations}, "
                          f"{cfg.stability_noise_sd}, {cfg.stability_drop_fraction})")
    if cfg.patience < 0 or cfg.optimizer.freeze_encoder_steps < 0:
        raise ConfigError("finetune config: keys 'patience' and 'optimizer.freeze_encoder_steps' must be >= 0")
    sections = {"food_classification", "nutrition", "salient_molecules"}
    for key in cfg.selection:
        if key.split(".")[0] not in sections or "." not in key:
            raise ConfigError(f"finetune config: key 'selection.{key}': expected '<section>.<metric>' with a "
                              f"section in {sorted(sections)}")
        if key.startswith(IN_SAMPLE_METRICS):
            raise ConfigError(f"finetune config: key 'selection.{key}': the same on val and test (in-sample or "
                              "scored against the test reference); select on validation-sample metrics")
    bad = [name for name in (*cfg.scorers, cfg.salient_scorer) if name not in SCORER_NAMES]
    if bad:
        raise ConfigError(f"finetune config: key 'scorers': unknown scorer '{bad[0]}' (expected {list(SCORER_NAMES)})")
    unknown = set(cfg.weighting.static_weights) - set(tw.TASKS)
    if unknown:
        raise ConfigError(f"finetune config: key 'weighting.static_weights': unknown task(s) {sorted(unknown)} "
                          f"(expected {list(tw.TASKS)})")
    cfg.encoder.validate("finetune config: encoder")
    return cfg


# ---- evaluation (supplied by the caller) -------------------------------------------------------
class FinetuneEvaluation(Protocol):
    """What the loop needs from evaluation; :class:`jaxfood.eval.evaluator.FinetuneEvaluation` is one.

    ``train/`` imports nothing from ``eval/``: the caller (``jaxfood.workflows``) hands
    :func:`finetune` a factory ``(model, prepared graph, cfg) -> FinetuneEvaluation``.
    """

    reference: Mapping[str, set[str]] | None  # the reference biomarkers, kept in the checkpoint meta

    def validate(self, params, salient: bool = True) -> tuple[dict[str, Any], float]:
        """Validation metrics and the selection score of ``params`` (a MultiTaskModel's)."""

    def test(self, params) -> dict[str, Any]:
        """The final (test) metrics of ``params``."""


EvaluationFactory = Callable[[MultiTaskModel, HeteroGraph, "FinetuneConfig"], FinetuneEvaluation]


def task_weight_summary(cfg: tw.WeightingConfig, params) -> dict[str, Any]:
    weights = np.asarray(tw.task_weights(cfg, params.get(mt.WEIGHTING_KEY, {}), tw.TASKS))
    out: dict[str, Any] = {"method": cfg.method}
    out.update({t: float(w) for t, w in zip(tw.TASKS, weights)})
    if cfg.method == "uncertainty":
        out["log_variances"] = {t: float(v) for t, v in zip(tw.TASKS, np.asarray(params[mt.WEIGHTING_KEY]["log_vars"]))}
    return out


# ---- the run ------------------------------------------------------------------------------------
@dataclasses.dataclass
class FinetuneResult:
    """What :func:`finetune` returns (everything also written under ``workdir``)."""

    params: dict[str, Any]
    history: dict[str, list[dict[str, float]]]
    metrics: dict[str, Any]
    best_step: int
    checkpoint_dir: Path
    runtime_s: float
    num_step_compilations: int
    config: FinetuneConfig
    encoder_config: EncoderConfig
    figures: dict[str, Path]


def _load_pretrained(pretrained, cfg: FinetuneConfig) -> tuple[EncoderConfig, Any, dict]:
    from jaxfood.train.checkpoint import load_encoder

    config_dict, params, meta = load_encoder(pretrained)
    try:
        enc_cfg = config_from_dict(EncoderConfig(), config_dict, source=f"{pretrained}: meta 'encoder_config'")
        enc_cfg.validate(f"{pretrained}: meta 'encoder_config'")
    except ConfigError as err:
        raise CheckpointError(str(err)) from None
    return enc_cfg, params, meta


def _check_encoder_params(pretrained_params, init_params, source) -> None:
    flat_p = dict(jax.tree_util.tree_flatten_with_path(pretrained_params)[0])
    flat_i = dict(jax.tree_util.tree_flatten_with_path(init_params)[0])
    for path, leaf in flat_i.items():
        name = jax.tree_util.keystr(path)
        if path not in flat_p:
            raise CheckpointError(f"{source}: encoder parameter {name} is missing (the checkpoint was made for "
                                  "another graph schema or encoder configuration)")
        if tuple(np.shape(flat_p[path])) != tuple(np.shape(leaf)):
            raise CheckpointError(f"{source}: encoder parameter {name} has shape {tuple(np.shape(flat_p[path]))}, "
                                  f"this graph needs {tuple(np.shape(leaf))} (pretrained on another graph?)")
    extra = [jax.tree_util.keystr(p) for p in flat_p if p not in flat_i]
    if extra:
        raise CheckpointError(f"{source}: unexpected encoder parameter {extra[0]} (encoder configuration mismatch)")


def checkpoint_meta(cfg: FinetuneConfig, enc_cfg: EncoderConfig, graph: HeteroGraph, reference, pretrained,
                    extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    from jaxfood.graph.hetero_graph import summary

    return {
        "kind": CHECKPOINT_KIND,
        "encoder_config": config_to_dict(enc_cfg),
        "config": config_to_dict(cfg),
        "tasks": list(tw.TASKS),
        "id_maps": {t: list(ids) for t, ids in graph.meta.node_ids.items()},
        "graph_summary": summary(graph),
        "graph_sources": graph.meta.extra.get("sources"),
        "nutrient_names": list(graph.meta.nutrient_names),
        "normalisation": graph.meta.normalisation,
        "pretrained": None if pretrained is None else str(pretrained),
        "biomarkers": None if reference is None else {f: sorted(m) for f, m in sorted(reference.items())},
        **(extra or {}),
    }


def finetune(graph: HeteroGraph, cfg: FinetuneConfig | None = None, workdir: str | Path = "runs/finetune",
             pretrained: str | Path | None = None, *, evaluation: EvaluationFactory, progress: bool = True,
             log=None) -> FinetuneResult:
    """Fine-tunes the three tasks on ``graph``; see the module docstring for what is written.

    Args:
      graph: a built graph (train/val/test split, label edges for training samples only).
      cfg: the run's configuration (default :class:`FinetuneConfig`).
      workdir: output directory.
      pretrained: checkpoint directory of a pretrained encoder (GraphCL / converted); None: scratch.
      evaluation: ``(model, prepared graph, cfg) -> FinetuneEvaluation``, the validation and test
        metrics (:func:`jaxfood.workflows.finetune` passes :mod:`jaxfood.eval.evaluator`'s).
    """
    from jaxfood.io_utils import write_json, write_text
    from jaxfood.train.checkpoint import restore_checkpoint, save_checkpoint
    from jaxfood.train.finetune_monitoring import FinetuneMonitor

    start = time.perf_counter()
    cfg = check_config(cfg or FinetuneConfig())
    log = log or (lambda _msg: None)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)

    if pretrained is not None:
        enc_cfg, enc_params, _ = _load_pretrained(pretrained, cfg)
        log(f"encoder from {pretrained}")
    else:
        enc_cfg, enc_params = cfg.encoder, None
    cfg = dataclasses.replace(cfg, encoder=enc_cfg)
    write_text(workdir / "config.yaml", dump_config(cfg))

    dgraph = prepare_graph(graph)
    model = make_multitask_model(dgraph, enc_cfg, cfg.heads)
    steps = int(cfg.steps)
    optimizer_steps = math.ceil(steps / cfg.optimizer.accumulation_steps)
    tx, schedules = make_optimizer(cfg.optimizer, optimizer_steps)
    root = jax.random.key(cfg.seed, impl=cfg.prng_impl)
    k_init, k_train = jax.random.split(root)
    state = mt.init_train_state(model, cfg.weighting, tx, jax.random.key(cfg.seed), dgraph)
    if enc_params is not None:
        _check_encoder_params(enc_params, state.params["encoder"], pretrained)
        params = dict(state.params)
        params["encoder"] = jax.tree_util.tree_map(jnp.asarray, enc_params)
        state = state.replace(params=params, opt_state=tx.init(params))
    del k_init

    traces: list[int] = []
    raw_step = mt.make_train_step(model, cfg.loss, cfg.weighting, tx, task_gradient_scope=cfg.task_gradient_scope)

    def counted_step(state, graph, batch):
        traces.append(1)  # runs at trace time only: counts compilations
        return raw_step(state, graph, batch)

    step_fn = jax.jit(counted_step, donate_argnums=(0,))
    evaluator = evaluation(model, dgraph, cfg)
    reference = evaluator.reference
    seed_mask = jnp.asarray(np.asarray(graph.sample_split) == SPLIT_CODES["train"])
    accumulation = cfg.optimizer.accumulation_steps

    def lr_at(step: int) -> dict[str, float]:
        return {g: float(v) for g, v in learning_rates(schedules, (step - 1) // accumulation).items()}

    # A new run replaces an earlier one in the same workdir: its checkpoints would otherwise clash
    # with (or, at a later step, win over) this run's best, and its event files mix into the curves.
    ckpt_dir = workdir / "checkpoints"
    for stale_dir in (ckpt_dir, workdir / "tb"):
        if stale_dir.is_dir():
            shutil.rmtree(stale_dir)
    monitor = FinetuneMonitor(workdir / "tb" if cfg.tensorboard else None, lr_at, steps, progress)
    best_score, best_step, stale = -math.inf, 0, 0
    try:
        for i in range(steps):
            batch = mt.Batch(seed_mask=seed_mask, rng=jax.random.fold_in(k_train, i))
            state, metrics = step_fn(state, dgraph, batch)
            row = monitor.train(i + 1, jax.device_get(metrics))
            if not math.isfinite(row["loss/total"]):
                raise FloatingPointError(f"fine-tuning diverged at step {i + 1} (total loss {row['loss/total']})")
            if (i + 1) % cfg.eval_every == 0 or i + 1 == steps:
                # All three tasks are validated; the salient task by its headline scorer only
                # (precision/recall@k, fidelity), without the stability perturbations.
                val, score = evaluator.validate(mt.split_params(state.params)[0])
                monitor.validation(i + 1, val, score)
                if score > best_score:
                    best_score, best_step, stale = score, i + 1, 0
                    meta = checkpoint_meta(cfg, enc_cfg, graph, reference, pretrained,
                                           {"best_step": i + 1, "selection_score": score})
                    save_checkpoint(ckpt_dir, i + 1, {"params": state.params, "opt_state": state.opt_state,
                                                      "weighting_state": state.weighting_state,
                                                      "step": state.step}, meta, max_to_keep=1)
                else:
                    stale += 1
                    if cfg.patience and stale >= cfg.patience:
                        log(f"early stop at step {i + 1}: no improvement for {cfg.patience} evaluations")
                        break
    finally:
        monitor.close()

    # The final metrics are computed from the checkpoint as stored: evaluate_checkpoint reproduces them.
    restored, _ = restore_checkpoint(ckpt_dir)
    best_params = jax.tree_util.tree_map(jnp.asarray, restored["params"])
    metrics = evaluator.test(mt.split_params(best_params)[0])
    metrics["task_weights"] = task_weight_summary(cfg.weighting, best_params)
    metrics["best_step"] = best_step
    write_json(workdir / "metrics.json", metrics)
    write_json(workdir / "history.json", monitor.history)
    figures = {}
    if cfg.figures:
        for path in monitor.figures(workdir / "figures"):
            figures[path.stem] = path
    return FinetuneResult(params=jax.device_get(best_params), history=monitor.history, metrics=metrics,
                          best_step=best_step, checkpoint_dir=ckpt_dir, runtime_s=time.perf_counter() - start,
                          num_step_compilations=len(traces), config=cfg, encoder_config=enc_cfg, figures=figures)


# ---- checkpoints --------------------------------------------------------------------------------
@dataclasses.dataclass
class LoadedFinetune:
    model: MultiTaskModel
    params: dict[str, Any]
    config: FinetuneConfig
    meta: dict[str, Any]


def check_graph_matches(meta: Mapping[str, Any], graph: HeteroGraph, source: str) -> None:
    """The graph must have the node ids (in order) the checkpoint was trained on."""
    id_maps = meta.get("id_maps") or {}
    for node_type, ids in id_maps.items():
        have = list(graph.meta.node_ids.get(node_type, []))
        if len(have) != len(ids):
            raise CheckpointError(f"{source}: the checkpoint has {len(ids)} '{node_type}' nodes, the graph "
                                  f"{len(have)} (evaluate on the graph it was fine-tuned on)")
        if have != list(ids):
            bad = next(i for i, (a, b) in enumerate(zip(have, ids)) if a != b)
            raise CheckpointError(f"{source}: '{node_type}' node {bad} is '{have[bad]}' in the graph but "
                                  f"'{ids[bad]}' in the checkpoint (a different graph)")


def load_finetuned(ckpt_dir: str | Path, graph: HeteroGraph, step: int | None = None) -> LoadedFinetune:
    """Model (built for ``graph``) and params of a fine-tuning checkpoint."""
    from jaxfood.train.checkpoint import restore_checkpoint

    state, meta = restore_checkpoint(ckpt_dir, step)
    source = str(ckpt_dir)
    if meta.get("kind") != CHECKPOINT_KIND:
        raise CheckpointError(f"{source}: meta 'kind' is {meta.get('kind')!r}, expected '{CHECKPOINT_KIND}' "
                              "(a 'jaxfood finetune' checkpoint directory)")
    try:
        cfg = config_from_dict(FinetuneConfig(), meta.get("config") or {}, source=f"{source}: meta 'config'")
        enc_cfg = config_from_dict(EncoderConfig(), meta["encoder_config"], source=f"{source}: meta 'encoder_config'")
    except (ConfigError, KeyError) as err:
        raise CheckpointError(str(err)) from None
    check_graph_matches(meta, graph, source)
    if not isinstance(state, Mapping) or "params" not in state:
        raise CheckpointError(f"{source}: state has no 'params'")
    dgraph = prepare_graph(graph)
    model = make_multitask_model(dgraph, enc_cfg, cfg.heads)
    params = jax.tree_util.tree_map(jnp.asarray, dict(state["params"]))
    return LoadedFinetune(model=model, params=params, config=cfg, meta=meta)
