"""Multi-task fine-tuning: configuration, the run (the one training loop) and checkpoints.

:func:`finetune` loads a pretrained encoder (GraphCL, or converted from PyTorch) or starts from
scratch and trains food classification, nutrition alignment and salient molecule discovery
together with the step of :mod:`jaxfood.train.multitask` in the loop of :mod:`jaxfood.train.loop`
(1..N devices, 1..N hosts, full graph or sampled subgraphs). Validation is a hook passed in
(:func:`jaxfood.workflows.finetune` passes the evaluation of all three tasks); its combined
score picks the kept checkpoint and stops early. It writes under ``workdir``::

    config.yaml          the resolved configuration
    checkpoints/         orbax: params (encoder + heads + task weighting), optimizer state,
                         weighting state, step; meta: config, encoder config, graph id maps
    resume/              training-state snapshots while running (removed at the end)
    tb/                  TensorBoard event files (every task loss, weights, lrs, grad norms, val)

:func:`load_finetuned` rebuilds the model of a checkpoint for a graph.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxfood.config import config_from_dict, config_to_dict, dump_config
from jaxfood.errors import CheckpointError, ConfigError
from jaxfood.graph.hetero_graph import SPLIT_CODES, HeteroGraph, summary
from jaxfood.graph.sampling import NeighbourSampler, SamplerConfig
from jaxfood.graph.splits import check_split_matches, prepare_graph, split_fingerprint
from jaxfood.io_utils import write_text
from jaxfood.models.encoder import EncoderConfig
from jaxfood.models.heads import (
    CLASS_ATTENTION,
    SCORER_NAMES,
    HeadsConfig,
    MultiTaskModel,
    make_multitask_model,
)
from jaxfood.train import multitask as mt
from jaxfood.train import task_weighting as tw
from jaxfood.train.checkpoint import load_encoder, restore_checkpoint, restore_params
from jaxfood.train.data_parallel import ShardLayout, data_parallel
from jaxfood.train.finetune_step import multitask_step_fn, train_state_to_dict
from jaxfood.train.food_classification import fit_logistic_regression
from jaxfood.train.graphcl import default_encoder_config as graphcl_encoder_config
from jaxfood.train.loop import LoopConfig, prepare_run, train_loop
from jaxfood.train.monitoring import TensorBoard, flatten_metrics
from jaxfood.train.optimizer import GROUPS, OptimizerConfig, learning_rates, make_optimizer
from jaxfood.train.parallel_options import DataParallelOptions
from jaxfood.train.preemption import Preempted
from jaxfood.train.pretrain import sampled_edges
from jaxfood.train.processes import is_primary

CHECKPOINT_KIND = "finetune"
#: The evaluation hook of :func:`finetune`: ``(model, params) -> nested validation metrics``.
ValidateFn = Callable[[MultiTaskModel, Any], Mapping[str, Any]]
#: ``(model, initial params, cfg) -> cfg``: see :func:`finetune`'s ``prepare``.
PrepareFn = Callable[[MultiTaskModel, Any, "FinetuneConfig"], "FinetuneConfig"]


def default_encoder_config() -> EncoderConfig:
    """The GraphCL default (:func:`jaxfood.train.graphcl.default_encoder_config`): training from
    scratch and from a pretrained checkpoint then compare the same architecture."""
    return graphcl_encoder_config()


def default_selection() -> dict[str, float]:
    """Validation metrics of the validation samples only; the Food-level figures (``nutrition.spearman``,
    ``knn_purity``) are measured on the same held-out foods for val and test (and their ``*_in_sample``
    twins on the triplet loss's foods): selecting on them would make the number that picks the
    checkpoint a test figure."""
    return {"food_classification.accuracy": 1.0, "nutrition.nutrient_r2": 0.5}


#: Metrics that do not depend on the split, never a selection criterion: the Food-level figures
#: (held-out foods, one set for val and test; in-sample foods) and the rankings' agreement with the
#: reference biomarkers (training samples' rankings against the reference the test reports); prefixes.
IN_SAMPLE_METRICS = ("nutrition.spearman", "nutrition.knn_purity", "salient_molecules.precision_at_",
                     "salient_molecules.recall_at_", "salient_molecules.stability_jaccard")


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """Everything a fine-tuning run depends on (``--set key=value`` addresses it, dotted for sections).

    ``selection``: validation metric (``section.name``) -> weight; the combined score decides early
    stopping and the kept checkpoint. ``patience``: evaluations without improvement before stopping
    (0 = never). ``encoder``: used when starting from scratch; a pretrained checkpoint brings its own.
    ``task_gradient_scope``: representation | encoder (see :func:`multitask.make_train_step`).
    ``wide_init``: the classifier's linear path starts at 0 (``zeros``) or at the multinomial
    logistic regression of the training samples' intensity profiles (``fit``), fitted as the
    logistic-regression baseline is, with inverse L2 strength ``wide_init_c`` (scikit-learn's
    ``C``; see :func:`jaxfood.train.food_classification.fit_logistic_regression`): the baseline is
    then where training starts, not where it has to arrive in ``steps``. The starting state is then evaluated
    (step 0) and a trained state replaces it only when its selection score is higher by more than
    ``start_margin`` (None: the largest standard error of a validation accuracy, ``0.5 /
    sqrt(validation samples)`` times the accuracy's selection weight -- the one-standard-error rule:
    with a few samples per food the validation split is noisy, and the simpler model is kept
    unless training clearly beats it; docs/experiments.md §5).
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
    #: Evaluations without a better validation score before stopping (docs/experiments.md §11: no
    #: run of 3 seeds x fine-tuned/probe/scratch chose a state after the second one).
    patience: int = 2
    selection: dict[str, float] = dataclasses.field(default_factory=default_selection)
    encoder: EncoderConfig = dataclasses.field(default_factory=default_encoder_config)
    heads: HeadsConfig = dataclasses.field(default_factory=HeadsConfig)
    loss: mt.LossConfig = dataclasses.field(default_factory=mt.LossConfig)
    weighting: tw.WeightingConfig = dataclasses.field(default_factory=tw.WeightingConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    task_gradient_scope: Literal["representation", "encoder"] = "representation"
    salient_k: int = 10
    salient_scorer: Literal["intensity_attribution", "input_gradient", "class_attention", "attention", "gat_attention",
                            "gradient"] = "intensity_attribution"
    scorers: tuple[str, ...] = SCORER_NAMES
    stability_perturbations: int = 3
    stability_noise_sd: float = 0.1
    stability_drop_fraction: float = 0.05
    knn_k: int = 5
    prng_impl: Literal["rbg", "threefry2x32"] = "rbg"
    tensorboard: bool = True
    figures: bool = True
    wide_init: Literal["zeros", "fit"] = "fit"
    start_margin: float | None = None
    wide_init_c: float = 1.0


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
    if not (math.isfinite(cfg.wide_init_c) and cfg.wide_init_c > 0):
        raise ConfigError(f"finetune config: key 'wide_init_c' = {cfg.wide_init_c}: expected a number > 0 "
                          "(scikit-learn's C of the fitted start)")
    if cfg.start_margin is not None and not (math.isfinite(cfg.start_margin) and cfg.start_margin >= 0):
        raise ConfigError(f"finetune config: key 'start_margin' = {cfg.start_margin}: expected a number >= 0 "
                          "or null (one standard error of the validation accuracy)")
    if not 0.0 <= cfg.loss.label_smoothing < 1.0:
        raise ConfigError(f"finetune config: key 'loss.label_smoothing' = {cfg.loss.label_smoothing}: "
                          "expected a number in [0, 1)")
    if cfg.stability_perturbations < 0 or cfg.stability_noise_sd < 0 or not 0.0 <= cfg.stability_drop_fraction < 1.0:
        raise ConfigError("finetune config: keys 'stability_perturbations' and 'stability_noise_sd' must be >= 0 and "
                          f"'stability_drop_fraction' in [0, 1) (got {cfg.stability_perturbations}, "
                          f"{cfg.stability_noise_sd}, {cfg.stability_drop_fraction})")
    if cfg.patience < 0 or cfg.optimizer.freeze_encoder_steps < 0:
        raise ConfigError("finetune config: keys 'patience' and 'optimizer.freeze_encoder_steps' must be >= 0")
    sections = set(tw.TASKS)  # metric sections are named after the tasks
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
    for group in GROUPS:
        g = getattr(cfg.optimizer, group)
        # A negative rate climbs the loss (and AdamW then decays towards it): never what a user meant.
        for name, value in (("learning_rate", g.learning_rate), ("weight_decay", g.weight_decay),
                            ("end_factor", g.end_factor), ("warmup_steps", g.warmup_steps), ("clip_norm", g.clip_norm)):
            if value < 0:
                raise ConfigError(f"finetune config: key 'optimizer.{group}.{name}' = {value}: expected a number >= 0")
        if g.eps <= 0:
            raise ConfigError(f"finetune config: key 'optimizer.{group}.eps' = {g.eps}: expected a positive number")
    cfg.encoder.validate("finetune config: encoder")
    return cfg


def selection_score(metrics: Mapping[str, Any], selection: Mapping[str, float]) -> float:
    """Weighted sum of validation metrics named ``section.metric``; a NaN metric counts 0."""
    score = 0.0
    for key, weight in selection.items():
        section, name = key.split(".", 1)
        value = metrics.get(section, {}).get(name, math.nan)
        value = float(value) if value is not None else math.nan
        score += weight * (value if math.isfinite(value) else 0.0)
    return score


def start_margin(cfg: FinetuneConfig, graph: HeteroGraph) -> float:
    """What a trained state's selection score must exceed the fitted starting state's by (see
    :class:`FinetuneConfig` ``start_margin``)."""
    if cfg.start_margin is not None:
        return float(cfg.start_margin)
    split, labels = np.asarray(graph.sample_split), np.asarray(graph.sample_food)
    num_val = int(np.sum((split == SPLIT_CODES["val"]) & (labels >= 0)))
    return float(cfg.selection.get("food_classification.accuracy", 0.0)) * 0.5 / math.sqrt(max(num_val, 1))


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
    start_step: int = 0
    edges_per_second: float = 0.0
    spread: dict = dataclasses.field(default_factory=dict)
    #: The parameters training started from (fresh or pretrained initialisation, before any resume).
    initial_params: dict[str, Any] | None = None
    #: Temperature that calibrates the kept state's food probabilities (fitted on val; 1: none).
    temperature: float = 1.0
    #: The kept start (``best_step`` 0) carries parts of this trained step (None: its own).
    composed_step: int | None = None
    #: Which parts (:data:`REPRESENTATION_PARAMS`, possibly :data:`NUTRIENT_HEAD`).
    composed_parts: list[str] | None = None


#: Key of the calibration temperature in a checkpoint's ``validation`` meta (the evaluation hook's
#: ``food_classification.calibration_temperature``; see :func:`jaxfood.eval.metrics.fit_temperature`).
TEMPERATURE_KEY = "food_classification/calibration_temperature"


def checkpoint_temperature(meta: Mapping[str, Any]) -> float:
    """The calibration temperature a fine-tuning checkpoint was kept with (1.0 if none)."""
    value = (meta.get("validation") or {}).get(TEMPERATURE_KEY)
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) and value > 0 else 1.0


def _load_pretrained(pretrained, cfg: FinetuneConfig) -> tuple[EncoderConfig, Any, dict]:
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


def _fitted_linear_model(model: MultiTaskModel, graph: HeteroGraph, cfg: FinetuneConfig, num_classes: int):
    """``(kernel [M, F], bias [F])``: the logistic regression of the training samples' standardised
    intensity profiles, fitted as the baseline fits it (:func:`fit_logistic_regression`, C =
    ``wide_init_c``): the classifier's wide path and output bias when training starts there."""
    profile = model.profile(graph)
    features = profile.linear(jnp.eye(profile.num_molecules, dtype=jnp.float32))  # [S, M]
    labels = np.asarray(graph.sample_food)
    train = np.asarray(graph.sample_split) == SPLIT_CODES["train"]
    kernel, bias = fit_logistic_regression(features, labels, train, num_classes, cfg.wide_init_c)
    return jnp.asarray(kernel), jnp.asarray(bias)


#: ``logit_log_scale`` of the class-attention branches when training starts at the linear model:
#: their standardised logits enter at ``exp(-3)`` ~ 0.05 of their own scale, and grow where they help.
CLASS_LOGITS_START = -3.0


def _start_at_linear_model(params, wide_kernel, bias):
    """The parameters with the classifier's wide path at ``wide_kernel``, its output bias at
    ``bias`` and the deep paths' outputs silenced: the classifier MLP's and the nutrient MLP's
    output layers at 0 (but for that bias), the class-attention branches' logit scale at
    :data:`CLASS_LOGITS_START`. The food logits are then (nearly) the logistic regression's, the
    nutrient profile the one expected under its posterior; the deep paths still receive gradients
    (their hidden layers are not 0) and enter where they help."""

    def silence(head, bias=None):
        out = head["mlp"]["out"]
        zeros = jnp.zeros_like(out["bias"])
        out = {"kernel": jnp.zeros_like(out["kernel"]), "bias": zeros if bias is None else zeros.at[:bias.shape[0]].set(bias)}
        return dict(head, mlp=dict(head["mlp"], out=out))

    params = dict(params, classifier=dict(silence(params["classifier"], bias), wide_kernel=wide_kernel),
                  nutrient_head=silence(params["nutrient_head"]))
    pool = params["salient_pool"]
    if CLASS_ATTENTION in pool and "logit_log_scale" in pool[CLASS_ATTENTION]:
        branches = pool[CLASS_ATTENTION]
        scale = jnp.full_like(branches["logit_log_scale"], CLASS_LOGITS_START)
        params["salient_pool"] = dict(pool, **{CLASS_ATTENTION: dict(branches, logit_log_scale=scale)})
    return params


#: What the fitted start takes from the best trained state when no trained state beats it: the
#: representation (encoder and Food projection). The heads stay the start's, so the kept food
#: probabilities are (up to the class-attention branch, at exp(-3)) the start's, while the Food
#: embeddings have been through the nutrient-alignment loss.
REPRESENTATION_PARAMS = ("encoder", "food_projection")
#: What it also takes when the trained representation with this head estimates the validation
#: samples' nutrients better (R²) than the start: the head reads the representation, so the
#: nutrient estimate is then the trained model's own.
NUTRIENT_HEAD = "nutrient_head"


def with_trained_parts(start: Mapping[str, Any], trained: Mapping[str, Any],
                       parts: Sequence[str] = REPRESENTATION_PARAMS) -> dict[str, Any]:
    """The host train state ``start`` with the ``parts`` (top-level parameters) of ``trained``."""
    params = dict(start["params"], **{k: trained["params"][k] for k in parts if k in trained["params"]})
    return dict(start, params=params)


def compose_start(start: Mapping[str, Any], trained: Mapping[str, Any], start_r2: float,
                  nutrient_r2: Callable[[Mapping[str, Any]], float]) -> tuple[dict[str, Any], tuple[str, ...]]:
    """The kept start with the trained representation, and with the trained nutrient head too when
    ``nutrient_r2(params)`` (validation) of that composition beats ``start_r2`` (the start's);
    returns the state and the parts taken."""
    parts = REPRESENTATION_PARAMS
    if NUTRIENT_HEAD in trained["params"] and math.isfinite(start_r2):
        candidate = with_trained_parts(start, trained, parts + (NUTRIENT_HEAD,))
        if nutrient_r2(candidate["params"]) > start_r2:
            return candidate, parts + (NUTRIENT_HEAD,)
    return with_trained_parts(start, trained, parts), parts


def validation_nutrient_r2(val: Mapping[str, Any]) -> float:
    """The nutrient R² of an evaluation hook's result (-inf when there is none: no nutrient table)."""
    value = (val.get("nutrition") or {}).get("nutrient_r2")
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else -math.inf


def checkpoint_meta(cfg: FinetuneConfig, enc_cfg: EncoderConfig, graph: HeteroGraph, pretrained,
                    extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What a fine-tuning checkpoint records besides its state: kind, configs, the graph's id maps."""
    return {
        "kind": CHECKPOINT_KIND,
        "encoder_config": config_to_dict(enc_cfg),
        "config": config_to_dict(cfg),
        "tasks": list(tw.TASKS),
        "id_maps": {t: list(ids) for t, ids in graph.meta.node_ids.items()},
        "graph_summary": summary(graph),
        "graph_sources": graph.meta.extra.get("sources"),
        "split_fingerprint": split_fingerprint(graph),
        "nutrient_names": list(graph.meta.nutrient_names),
        "normalisation": graph.meta.normalisation,
        "pretrained": None if pretrained is None else str(pretrained),
        **(extra or {}),
    }


def finetune(graph: HeteroGraph, cfg: FinetuneConfig | None = None, workdir: str | Path = "runs/finetune", *,
             pretrained: str | Path | None = None, validate: ValidateFn | None = None,
             options: DataParallelOptions = DataParallelOptions(), meta_extra: Mapping[str, Any] | None = None,
             prepare: PrepareFn | None = None, progress: bool = True, log=None) -> FinetuneResult:
    """Fine-tunes the three tasks on ``graph`` with the loop of :mod:`jaxfood.train.loop`; every
    process of a job calls it with the same arguments.

    Args:
      graph: a built graph (train/val/test split, label edges for training samples only).
      cfg: the run's configuration (default :class:`FinetuneConfig`).
      workdir: output directory: ``config.yaml`` (process 0), ``checkpoints/`` (the kept state),
        ``resume/`` (snapshots while running), ``tb/`` (process 0).
      pretrained: checkpoint directory of a pretrained encoder (GraphCL / converted); None: scratch.
      validate: the evaluation hook, ``(model, params) -> nested validation metrics``; every
        ``eval_every`` steps (and after the last) their :func:`selection_score` decides the kept
        checkpoint and early stopping. None: the last step is kept.
      options: devices, hosts, full graph or sampled subgraphs, resume snapshots.
      meta_extra: more JSON for the checkpoint's meta (e.g. the reference biomarkers).
      prepare: ``(model, params, cfg) -> cfg``, called once the model and its initial parameters
        exist and before anything is written: the configuration the run records and uses (the
        workflow fits the evaluation's scorers to the memory; it may raise a ``UserError``).

    Raises :class:`~jaxfood.train.preemption.Preempted` when stopped by SIGTERM (rerun to resume).
    """
    start = time.perf_counter()
    cfg = check_config(cfg or FinetuneConfig())
    log = log or (lambda _msg: None)
    workdir = Path(workdir)
    primary = is_primary()
    if pretrained is not None:
        enc_cfg, enc_params, _ = _load_pretrained(pretrained, cfg)
        log(f"encoder from {pretrained}")
    else:
        enc_cfg, enc_params = cfg.encoder, None
    cfg = dataclasses.replace(cfg, encoder=enc_cfg)
    if options.sampled and cfg.heads.wide:
        # The wide path maps a sample's profile over the whole graph's molecules with whole-graph
        # statistics; a padded subgraph has neither (models/profile.py): off, and recorded in the config.
        cfg = dataclasses.replace(cfg, heads=dataclasses.replace(cfg.heads, wide=False))
        log("sampled subgraphs: heads.wide off (the wide path needs the whole graph's molecules)")

    full = prepare_graph(graph).to_numpy()
    model = make_multitask_model(full, enc_cfg, cfg.heads)
    layout = ShardLayout.current(options.per_device, options.local_devices)
    if options.sampled:
        sampler = NeighbourSampler(full, SamplerConfig(batch_size=options.batch_size, num_hops=enc_cfg.num_layers,
                                                       seed=cfg.seed))
        make_shard, example, count_edges = sampler.batch, sampler.batch(0).graph, sampled_edges
    else:
        full_edges = sum(e.num_edges for e in full.edges.values()) * layout.local_shards

        def make_shard(step, shard):
            return full

        def count_edges(batch):
            return full_edges
        example = full
    accumulation = cfg.optimizer.accumulation_steps
    tx, schedules = make_optimizer(cfg.optimizer, math.ceil(cfg.steps / accumulation))
    state = mt.init_train_state(model, cfg.weighting, tx, jax.random.key(cfg.seed), example)
    if enc_params is not None:
        _check_encoder_params(enc_params, state.params["encoder"], pretrained)
        params = dict(state.params, encoder=jax.device_put(enc_params))
        state = state.replace(params=params, opt_state=tx.init(params))
    if cfg.wide_init == "fit" and cfg.heads.wide:
        params = _start_at_linear_model(state.params, *_fitted_linear_model(
            model, example, cfg, state.params["classifier"]["wide_kernel"].shape[1]))
        state = state.replace(params=params, opt_state=tx.init(params))
    state = jax.device_get(train_state_to_dict(state))
    initial_params = jax.tree_util.tree_map(np.array, state["params"])  # a copy the loop cannot touch
    if prepare is not None:
        cfg = prepare(model, initial_params, cfg)
    if primary:  # written once the inputs passed every check (a pretrained encoder of another graph: nothing)
        write_text(workdir / "config.yaml", dump_config(cfg))
    # The step is a function of these alone (the frozen encoder steps are optimizer state): the
    # pretrained probe, the from-scratch run and fine-tuning share one compiled program.
    program = (model, cfg.loss, cfg.weighting, dataclasses.replace(cfg.optimizer, freeze_encoder_steps=0),
               math.ceil(cfg.steps / accumulation), cfg.task_gradient_scope)
    step = data_parallel(multitask_step_fn(model, cfg.loss, cfg.weighting, tx, axis_name=layout.axes,
                                           task_gradient_scope=cfg.task_gradient_scope),
                         layout, seed=cfg.seed, prng_impl=cfg.prng_impl, share=program)
    spread = dict(layout.describe(), sampled=options.sampled,
                  batch_size=options.batch_size if options.sampled else None)
    meta = checkpoint_meta(cfg, enc_cfg, graph, pretrained, dict(meta_extra or {}, data_parallel=spread))

    loop = LoopConfig(num_steps=cfg.steps, checkpoint_dir=workdir / "checkpoints", resume_dir=workdir / "resume",
                      checkpoint_every=options.checkpoint_every, eval_every=cfg.eval_every, patience=cfg.patience,
                      eval_initial=cfg.wide_init == "fit" and cfg.heads.wide)
    tb_dir = workdir / "tb"
    prepare_run(loop, stale=[tb_dir])
    tensorboard = TensorBoard(tb_dir if cfg.tensorboard and primary else None)

    def on_train(done: int, metrics: dict[str, float]) -> dict[str, float]:
        if not math.isfinite(metrics.get("loss/total", 0.0)):
            raise FloatingPointError(f"fine-tuning diverged at step {done} (total loss {metrics['loss/total']})")
        rates = learning_rates(schedules, (done - 1) // accumulation)
        row = dict(metrics, **{f"learning_rate/{g}": float(v) for g, v in rates.items()})
        tensorboard.write(done, row)
        return row

    margin = start_margin(cfg, full) if loop.eval_initial else 0.0
    start_r2: list[float] = []  # the start's validation nutrient R² (compose compares with it)

    def evaluate(state, done: int) -> tuple[float, dict[str, float]]:
        val = validate(model, jax.device_put(state["params"]))
        if done == 0:
            start_r2[:] = [validation_nutrient_r2(val)]
        score = selection_score(val, cfg.selection)
        row = flatten_metrics(val)
        if done > 0 and margin:  # a trained state must beat the fitted start by more than the margin
            row["selection_margin"] = margin
            score -= margin
        tensorboard.write(done, dict(row, selection_score=score), "val/")
        log(f"step {done}: validation score {score:.4f} "
            f"(accuracy {row.get('food_classification/accuracy', math.nan):.3f})")
        return score, row

    def val_r2(params) -> float:
        return validation_nutrient_r2(validate(model, jax.device_put(params)))

    def compose(start_state, trained) -> tuple[dict[str, Any], dict[str, Any]]:
        if not start_r2:  # resumed after the start's evaluation
            start_r2[:] = [val_r2(start_state["params"])]
        composed, parts = compose_start(start_state, trained, start_r2[0], val_r2)
        if NUTRIENT_HEAD in parts:
            log(f"the kept start takes the trained nutrient head (validation nutrient R² above the start's "
                f"{start_r2[0]:.4f})")
        return composed, {"composed_parts": list(parts)}

    try:
        result = train_loop(step, state, make_shard, loop, fixed_batch=not options.sampled,
                            evaluate=evaluate if validate is not None else None, meta=meta,
                            on_train=on_train, count_edges=count_edges, progress=progress, log=log,
                            compose=compose if loop.eval_initial and validate is not None else None)
    finally:
        tensorboard.close()
    if result.preempted:
        raise Preempted(result.end_step, loop.resume_dir)
    # The kept state as stored: evaluating the checkpoint later reproduces what is scored now.
    kept, kept_meta = restore_checkpoint(loop.checkpoint_dir)
    return FinetuneResult(params=kept["params"], temperature=checkpoint_temperature(kept_meta), history=result.history,
                          metrics={}, best_step=result.best_step, checkpoint_dir=loop.checkpoint_dir, runtime_s=time.perf_counter() - start,
                          num_step_compilations=step.compile_count(), config=cfg, encoder_config=enc_cfg,
                          figures={}, start_step=result.start_step, edges_per_second=result.edges_per_second,
                          spread=spread, initial_params=initial_params, composed_step=kept_meta.get("composed_step"),
                          composed_parts=composed_parts(kept_meta))


def composed_parts(meta: Mapping[str, Any]) -> list[str] | None:
    """The parts a kept start took (:func:`with_trained_parts`); None when nothing was composed."""
    if meta.get("composed_step") is None:
        return None
    return list(meta.get("composed_parts") or REPRESENTATION_PARAMS)


# ---- checkpoints --------------------------------------------------------------------------------
@dataclasses.dataclass
class LoadedFinetune:
    model: MultiTaskModel
    params: dict[str, Any]
    config: FinetuneConfig
    meta: dict[str, Any]

    @property
    def temperature(self) -> float:
        """Divides the food logits before a probability is reported (:func:`checkpoint_temperature`)."""
        return checkpoint_temperature(self.meta)


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
    check_split_matches(meta.get("split_fingerprint"), graph, source)


def load_finetuned(ckpt_dir: str | Path, graph: HeteroGraph, step: int | None = None) -> LoadedFinetune:
    """Model (built for ``graph``) and params of a fine-tuning checkpoint."""
    state_params, meta = restore_params(ckpt_dir, step)
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
    if not isinstance(state_params, Mapping):
        raise CheckpointError(f"{source}: state has no 'params'")
    dgraph = prepare_graph(graph)
    model = make_multitask_model(dgraph, enc_cfg, cfg.heads)
    params = jax.device_put(dict(state_params))
    return LoadedFinetune(model=model, params=params, config=cfg, meta=meta)
