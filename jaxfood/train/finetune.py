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

:func:`evaluate_checkpoint` rebuilds the model from a checkpoint and reproduces those metrics
exactly (same graph, same reference biomarkers -- the checkpoint keeps the ones it was scored with).
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxfood.config import config_from_dict, config_to_dict, dump_config
from jaxfood.errors import CheckpointError, ConfigError
from jaxfood.graph import schema
from jaxfood.graph.hetero_graph import SPLIT_CODES, HeteroGraph, absent_parts
from jaxfood.models.encoder import EncoderConfig
from jaxfood.models.heads import HeadsConfig, MultiTaskModel, make_multitask_model
from jaxfood.train import multitask as mt
from jaxfood.train import salient_molecules as sal
from jaxfood.train import task_weighting as tw
from jaxfood.train.optimizer import OptimizerConfig, learning_rates, make_optimizer

CHECKPOINT_KIND = "finetune"


def default_encoder_config() -> EncoderConfig:
    """The GraphCL default (:func:`jaxfood.train.pretrain.default_encoder_config`): training from
    scratch and from a pretrained checkpoint then compare the same architecture."""
    from jaxfood.train.pretrain import default_encoder_config as pretrain_default

    return pretrain_default()


def default_selection() -> dict[str, float]:
    return {"food_classification.accuracy": 1.0, "nutrition.nutrient_r2": 0.5, "nutrition.spearman": 0.25}


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
    scorers: tuple[str, ...] = tuple(sal.SCORERS)
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
    bad = [name for name in (*cfg.scorers, cfg.salient_scorer) if name not in sal.SCORERS]
    if bad:
        raise ConfigError(f"finetune config: key 'scorers': unknown scorer '{bad[0]}' (expected {list(sal.SCORERS)})")
    unknown = set(cfg.weighting.static_weights) - set(tw.TASKS)
    if unknown:
        raise ConfigError(f"finetune config: key 'weighting.static_weights': unknown task(s) {sorted(unknown)} "
                          f"(expected {list(tw.TASKS)})")
    cfg.encoder.validate("finetune config: encoder")
    return cfg


# ---- graph preparation --------------------------------------------------------------------------
def prepare_graph(graph: HeteroGraph) -> HeteroGraph:
    """The graph fine-tuning and evaluation run on: reverse ``contains_molecule`` edges aligned with
    the forward ones, arrays on the device. Held-out samples never have label edges (checked)."""
    sal_graph = sal.align_reverse_edges(graph)
    split = np.asarray(graph.sample_split)
    fwd = graph.edges[schema.IS_INSTANCE_OF]
    held_out = split[np.asarray(fwd.senders)] != SPLIT_CODES["train"]
    if held_out.any():
        from jaxfood.errors import GraphError

        raise GraphError(f"graph: {int(held_out.sum())} held-out sample(s) have a label edge "
                         "('Sample|is_instance_of|Food'); rebuild the graph with 'jaxfood build-graph'")
    return jax.device_put(sal_graph)


def default_biomarkers(graph: HeteroGraph) -> dict[str, set[str]] | None:
    """The simulator's ground-truth biomarkers for the embedded default graph, else None."""
    source = graph.meta.extra.get("sources", {}).get("embedded_default") if isinstance(
        graph.meta.extra.get("sources"), Mapping) else None
    if not source:
        return None
    from jaxfood.data.simulate import simulate
    from jaxfood.eval.metrics import biomarkers_from_pairs

    ds = simulate(preset=source.get("preset", "default"), seed=int(source.get("seed", 0)))
    return _as_reference(biomarkers_from_pairs(ds.biomarkers))


def _as_reference(biomarkers) -> dict[str, set[str]] | None:
    """``{food: {molecule ids}}`` in sorted food order (the order of the means of precision@k:
    the same order wherever the reference comes from keeps the metrics bit-identical)."""
    if biomarkers is None:
        return None
    if isinstance(biomarkers, (str, Path)):
        from jaxfood.eval.metrics import read_biomarkers

        reference = read_biomarkers(biomarkers)
    elif isinstance(biomarkers, Mapping):
        reference = biomarkers
    else:
        from jaxfood.eval.metrics import biomarkers_from_pairs

        reference = biomarkers_from_pairs(biomarkers)
    return {str(k): {str(m) for m in reference[k]} for k in sorted(reference, key=str)}


# ---- evaluation ---------------------------------------------------------------------------------
class Evaluator:
    """Jitted evaluation of a :class:`MultiTaskModel` on one graph (compiled once, reused).

    ``evaluate(params, split, reference=None, salient=True)`` returns the nested metrics dict::

        {"food_classification": {accuracy, weighted_f1, auroc_macro, top3_accuracy, ece},
         "nutrition": {knn_purity, spearman, nutrient_r2, nutrient_r2_per_nutrient},
         "salient_molecules": {precision_at_K, recall_at_K, fidelity_plus, fidelity_minus, scorer,
                               stability_jaccard, per_scorer: {name: {...}}}}

    Food classification and nutrient R² are scored on the samples of ``split``; the Food
    embeddings (the triplet projection) on all foods against their USDA categories (k-NN purity)
    and nutrient profiles (Spearman of pairwise distances); molecule rankings per food from all
    labelled samples, fidelity on the samples of ``split`` (probability of the true food);
    ``stability_jaccard`` of the headline scorer's rankings under ``stability`` =
    ``(perturbations, noise_sd, drop_fraction, seed)`` (see :func:`salient_molecules.perturb_contains`).
    """

    def __init__(self, model: MultiTaskModel, graph: HeteroGraph, salient_k: int = 10, knn_k: int = 5,
                 scorer: str = "class_attention", scorers: Sequence[str] = tuple(sal.SCORERS),
                 stability: tuple[int, float, float, int] = (3, 0.1, 0.05, 0)):
        self.model, self.graph = model, graph
        self.stability = stability
        self.salient_k, self.knn_k, self.scorer = int(salient_k), int(knn_k), scorer
        self.scorers = tuple(dict.fromkeys([scorer, *scorers]))
        self._predict = mt.make_predict_fn(model)
        self._score = {name: jax.jit(lambda p, g, _n=name: sal.score_molecules(_n, model, mt.split_params(p)[0], g))
                       for name in self.scorers}
        k = self.salient_k

        def fid(params, graph, scores, sample_mask, target):
            return sal.fidelity_probabilities(model, mt.split_params(params)[0], graph, scores, k, sample_mask,
                                              target_class=target)

        self._fidelity = jax.jit(fid)
        # The headline scorer always runs with explicit edge masks (all edges for the clean input):
        # the clean and the perturbed inputs share one compiled program.
        self._score_perturbed = jax.jit(lambda p, g, m: sal.score_molecules(scorer, model, mt.split_params(p)[0], g, m))
        self._all_edges = sal.contains_edge_masks(jnp.ones(graph.edges[schema.CONTAINS].senders.shape, bool))

    def _headline_scores(self, params):
        return self._score_perturbed(params, self.graph, self._all_edges)

    def stability_jaccard(self, params, clean_scores=None) -> float:
        """Mean :func:`salient_molecules.topk_jaccard` of the headline scorer's per-food rankings
        between the clean input and each perturbation (NaN with 0 perturbations)."""
        perturbations, noise_sd, drop_fraction, seed = self.stability
        if perturbations < 1:
            return math.nan
        k = self.salient_k
        if clean_scores is None:
            clean_scores = self._headline_scores(params)
        clean = sal.rankings_by_id(sal.rank_molecules_per_food(np.asarray(clean_scores), self.graph)[0], self.graph, k)
        overlaps = []
        for i in range(perturbations):
            graph, masks = sal.perturb_contains(self.graph, jax.random.fold_in(jax.random.key(seed), i), noise_sd,
                                                drop_fraction)
            scores = np.asarray(self._score_perturbed(params, graph, masks))
            noisy = sal.rankings_by_id(sal.rank_molecules_per_food(scores, self.graph)[0], self.graph, k)
            overlaps.append(sal.topk_jaccard(clean, noisy, k))
        return float(np.mean(overlaps))

    def predict(self, params):
        return jax.device_get(self._predict(params, self.graph))

    def evaluate(self, params, split: str = "test", reference: Mapping[str, set[str]] | None = None,
                 salient: bool = True, scorers: Sequence[str] | None = None,
                 stability: bool = True) -> dict[str, Any]:
        from jaxfood.eval.metrics import (
            classification_metrics,
            distance_spearman,
            fidelity,
            knn_purity,
            nutrient_r2,
            precision_recall_at_k,
        )

        graph = self.graph
        out = self.predict(params)
        labels = np.asarray(graph.sample_food)
        in_split = (np.asarray(graph.sample_split) == SPLIT_CODES[split]) & (labels >= 0)
        idx = np.nonzero(in_split)[0]
        logits = np.asarray(out.food_logits, np.float64)[idx]
        proba = np.exp(logits - logits.max(1, keepdims=True))
        proba /= proba.sum(1, keepdims=True)
        metrics: dict[str, Any] = {"food_classification": classification_metrics(labels[idx], proba)}

        food_nutrients = np.asarray(graph.food_nutrients)
        if food_nutrients.shape[1] == 0:  # no nutrient table: the section says why it is empty
            metrics["nutrition"] = {"absent": absent_parts(graph)[schema.NUTRIENT]}
        else:
            r2 = nutrient_r2(food_nutrients[labels[idx]], np.asarray(out.nutrient_profile)[idx],
                             list(graph.meta.nutrient_names) or [str(i) for i in range(food_nutrients.shape[1])])
            projection = np.asarray(out.food_projection)
            category = np.asarray(graph.food_category)
            known = category >= 0
            metrics["nutrition"] = {
                "knn_purity": knn_purity(projection[known], category[known], self.knn_k) if known.sum() > 1 else math.nan,
                "spearman": distance_spearman(projection, food_nutrients),
                "nutrient_r2": r2["overall"],
                "nutrient_r2_per_nutrient": r2["per_nutrient"],
            }
        if not salient:
            return metrics

        k = self.salient_k
        sample_mask = jnp.asarray(in_split)
        target = jnp.asarray(np.where(labels >= 0, labels, 0))
        per_scorer = {}
        headline_scores = None
        for name in (scorers or self.scorers):
            scores = self._headline_scores(params) if name == self.scorer else self._score[name](params, graph)
            if name == self.scorer:
                headline_scores = scores
            # GraphFramEx's "phenomenon" form: the probability of the true food.
            p_full, p_removed, p_kept = (np.asarray(x)[idx] for x in jax.device_get(
                self._fidelity(params, graph, scores, sample_mask, target)))
            fid_plus, fid_minus = fidelity(p_full, p_removed, p_kept)
            entry = {"fidelity_plus": fid_plus, "fidelity_minus": fid_minus}
            if reference is not None:
                ranking, _ = sal.rank_molecules_per_food(np.asarray(scores), graph)
                prec, rec = precision_recall_at_k(sal.rankings_by_id(ranking, graph, k), reference, k)
            else:
                prec = rec = math.nan
            entry[f"precision_at_{k}"] = prec
            entry[f"recall_at_{k}"] = rec
            per_scorer[name] = entry
        head = per_scorer[self.scorer] if self.scorer in per_scorer else next(iter(per_scorer.values()))
        metrics["salient_molecules"] = {**head, "scorer": self.scorer, "k": k,
                                        "stability_jaccard": (self.stability_jaccard(params, headline_scores)
                                                              if stability else math.nan),
                                        "per_scorer": per_scorer}
        return metrics

    def rankings(self, params, scorer: str | None = None, top: int | None = None) -> dict[str, list[str]]:
        """``{food id: [molecule ids]}`` ranked by ``scorer`` (default: the headline scorer)."""
        scorer = scorer or self.scorer
        scores = np.asarray(self._headline_scores(params) if scorer == self.scorer else self._score[scorer](params, self.graph))
        ranking, _ = sal.rank_molecules_per_food(scores, self.graph)
        return sal.rankings_by_id(ranking, self.graph, top)


def stability_settings(cfg: FinetuneConfig) -> tuple[int, float, float, int]:
    """The :class:`Evaluator`'s ``stability`` argument from a config."""
    return (int(cfg.stability_perturbations), float(cfg.stability_noise_sd), float(cfg.stability_drop_fraction),
            int(cfg.seed))


def selection_score(metrics: Mapping[str, Any], selection: Mapping[str, float]) -> float:
    """Weighted sum of validation metrics named ``section.metric``; a NaN metric counts 0."""
    score = 0.0
    for key, weight in selection.items():
        section, name = key.split(".", 1)
        value = metrics.get(section, {}).get(name, math.nan)
        value = float(value) if value is not None else math.nan
        score += weight * (value if math.isfinite(value) else 0.0)
    return score


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
             pretrained: str | Path | None = None, biomarkers=None, progress: bool = True,
             log=None) -> FinetuneResult:
    """Fine-tunes the three tasks on ``graph``; see the module docstring for what is written.

    Args:
      graph: a built graph (train/val/test split, label edges for training samples only).
      cfg: the run's configuration (default :class:`FinetuneConfig`).
      workdir: output directory.
      pretrained: checkpoint directory of a pretrained encoder (GraphCL / converted); None: scratch.
      biomarkers: reference biomarkers for precision@k (``{food: ids}``, ``(id, food)`` pairs or a
        ``feature,category`` CSV path); default: the simulator's for the embedded default graph.
    """
    from jaxfood.io_utils import write_json, write_text
    from jaxfood.train.checkpoint import restore_checkpoint, save_checkpoint
    from jaxfood.train.finetune_monitoring import FinetuneMonitor

    start = time.perf_counter()
    cfg = check_config(cfg or FinetuneConfig())
    log = log or (lambda _msg: None)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    reference = _as_reference(biomarkers) if biomarkers is not None else default_biomarkers(graph)

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
    evaluator = Evaluator(model, dgraph, cfg.salient_k, cfg.knn_k, cfg.salient_scorer, cfg.scorers,
                          stability_settings(cfg))
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
                val = evaluator.evaluate(state.params, "val", reference, scorers=(cfg.salient_scorer,), stability=False)
                score = selection_score(val, cfg.selection)
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
    metrics = evaluator.evaluate(best_params, "test", reference)
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


def evaluate_checkpoint(ckpt_dir: str | Path, graph: HeteroGraph, biomarkers=None, split: str = "test",
                        step: int | None = None) -> dict[str, Any]:
    """Test metrics of a fine-tuning checkpoint on ``graph`` -- those :func:`finetune` reported.

    ``biomarkers`` (a ``feature,category`` CSV path, ``{food: ids}`` or pairs) replaces the reference
    the checkpoint was scored with (kept in its meta).
    """
    loaded = load_finetuned(ckpt_dir, graph, step)
    cfg = loaded.config
    if biomarkers is not None:
        reference = _as_reference(biomarkers)
    elif loaded.meta.get("biomarkers") is not None:
        reference = _as_reference(loaded.meta["biomarkers"])
    else:
        reference = None
    evaluator = Evaluator(loaded.model, prepare_graph(graph), cfg.salient_k, cfg.knn_k, cfg.salient_scorer, cfg.scorers,
                          stability_settings(cfg))
    metrics = evaluator.evaluate(loaded.params, split, reference)
    metrics["task_weights"] = task_weight_summary(cfg.weighting, loaded.params)
    metrics["best_step"] = int(loaded.meta.get("best_step", loaded.meta.get("step", 0)))
    return metrics
