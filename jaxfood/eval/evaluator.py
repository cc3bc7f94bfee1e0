"""Evaluation of a fine-tuned multi-task model: the metrics of all three tasks on one split.

:class:`Evaluator` compiles the forward pass, the molecule scorers and fidelity once for a graph
and scores parameters on a split (``jaxfood.workflows`` hands it to the fine-tuning loop as its
validation hook: ``jaxfood.train`` imports nothing from here). ``params`` are a
:class:`MultiTaskModel`'s (extra top-level entries such as the task-weighting parameters are
ignored). :func:`default_biomarkers` / :func:`as_reference`: the reference precision@k is scored against.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxfood.compile_cache import Background, shared_program
from jaxfood.eval import molecules as mol
from jaxfood.eval.metrics import (
    biomarkers_from_pairs,
    classification_metrics,
    distance_spearman,
    fidelity,
    fit_temperature,
    knn_purity,
    nutrient_r2,
    precision_recall_at_k,
    read_biomarkers,
    samples_digest,
)
from jaxfood.graph import schema
from jaxfood.graph.hetero_graph import SPLIT_CODES, HeteroGraph, absent_parts
from jaxfood.graph.splits import held_out_food_mask


# ---- reference biomarkers -------------------------------------------------------------------------
def default_biomarkers(graph: HeteroGraph) -> dict[str, set[str]] | None:
    """The simulator's ground-truth biomarkers for the embedded default graph, else None."""
    sources = graph.meta.extra.get("sources")
    source = sources.get("embedded_default") if isinstance(sources, Mapping) else None
    if not source:
        return None
    from jaxfood.data.simulate import simulate  # the simulator is only needed for the embedded graph

    ds = simulate(preset=source.get("preset", "default"), seed=int(source.get("seed", 0)))
    return as_reference(biomarkers_from_pairs(ds.biomarkers))


def as_reference(biomarkers) -> dict[str, set[str]] | None:
    """``{food: {molecule ids}}`` in sorted food order (the order of the means of precision@k:
    the same order wherever the reference comes from keeps the metrics bit-identical).

    ``biomarkers``: a ``feature,category`` CSV path, ``{food: ids}`` or ``(id, food)`` pairs; None: None.
    """
    if biomarkers is None:
        return None
    if isinstance(biomarkers, (str, Path)):
        reference = read_biomarkers(biomarkers)
    elif isinstance(biomarkers, Mapping):
        reference = biomarkers
    else:
        reference = biomarkers_from_pairs(biomarkers)
    return {str(k): {str(m) for m in reference[k]} for k in sorted(reference, key=str)}


# ---- settings -------------------------------------------------------------------------------
def stability_settings(cfg) -> tuple[int, float, float, int]:
    """The :class:`Evaluator`'s ``stability`` argument from a fine-tuning config."""
    return (int(cfg.stability_perturbations), float(cfg.stability_noise_sd), float(cfg.stability_drop_fraction),
            int(cfg.seed))


# ---- evaluation ---------------------------------------------------------------------------------
class ModelPrograms:
    """The jitted evaluation functions of one model: ``predict(params, graph)``,
    ``scores(names)(params, graph)``, ``masked_scorer(name)(params, graph, edge_masks)``,
    ``fidelity(k)(params, graph, scores, sample_mask)``. Get them with :func:`model_programs`:
    models of the same structure share them. :func:`molecule_scores` is how callers use the scorers."""

    def __init__(self, model):
        self.model = model
        self._jitted: dict[tuple, Any] = {}
        self._called: set[tuple] = set()  # programs called at least once (so compiled)
        self.predict = self._get(("predict",), lambda: lambda p, g: model.apply(p, g))

    def _get(self, key: tuple, make):
        """A jitted ``make()`` called with the model's own parameters (extra entries dropped)."""
        if key not in self._jitted:
            jitted = jax.jit(make())
            own = self.model.own_params

            def call(params, *args):
                self._called.add(key)
                return jitted(own(params), *args)

            self._jitted[key] = call
        return self._jitted[key]

    def compile_scores_in_background(self, names: Sequence[str], params, graph: HeteroGraph) -> Background | None:
        """Calls ``scores(names)`` once in a :class:`~jaxfood.compile_cache.Background` thread (its
        result is dropped): the program compiles while the caller goes on, e.g. while the model
        trains, so that the evaluation that needs it later finds it compiled. None (no thread) when
        it has run before, when ``names`` is empty, or in a multi-process job. ``join()`` it before
        returning; an error is left to the evaluation that needs the program."""
        names = tuple(names)
        if not names or ("scores", names) in self._called or jax.process_count() > 1:
            return None
        program = self.scores(names)

        def run():
            try:
                jax.block_until_ready(program(params, graph))
            except Exception:  # noqa: BLE001 - raised again where the program is needed
                self._called.discard(("scores", names))

        return Background(run, name="jaxfood-compile-scores")

    def scores(self, names: Sequence[str]):
        """``(params, graph) -> {name: [E] edge scores}`` of several scorers in one program: they
        share the model's forward pass, which is then compiled (and run) once, not once a scorer."""
        model, names = self.model, tuple(names)
        return self._get(("scores", names),
                         lambda: lambda p, g: {n: mol.score_molecules(n, model, p, g) for n in names})

    def masked_scorer(self, name: str):
        model = self.model
        return self._get(("masked", name), lambda: lambda p, g, m: mol.score_molecules(name, model, p, g, m))

    def fidelity(self, k: int):
        model = self.model

        def fid(params, graph, scores, sample_mask):
            return mol.fidelity_probabilities(model, params, graph, scores, k, sample_mask)

        return self._get(("fidelity", int(k)), lambda: fid)


def model_programs(model) -> ModelPrograms:
    """The :class:`ModelPrograms` of ``model``, one per model structure in this process."""
    return shared_program("model_programs", model, lambda: ModelPrograms(model))


def molecule_scores(model, params, graph: HeteroGraph, names: Sequence[str], headline: str) -> dict[str, Any]:
    """``{name: [E_contains] edge scores}`` of the scorers ``names``. The ``headline`` scorer runs
    through its masked program with every edge on (the program its stability perturbations run),
    the others through one program (:meth:`ModelPrograms.scores`), so the evaluation, the
    rankings and the report of a model compile each scorer once."""
    programs = model_programs(model)
    names = tuple(dict.fromkeys(names))
    others = tuple(n for n in names if n != headline)
    out = dict(programs.scores(others)(params, graph)) if others else {}
    if headline in names:
        all_edges = mol.contains_edge_masks(jnp.ones(graph.edges[schema.CONTAINS].senders.shape, bool))
        out[headline] = programs.masked_scorer(headline)(params, graph, all_edges)
    return {n: out[n] for n in names}


class Evaluator:
    """Jitted evaluation of a :class:`MultiTaskModel` on one graph (compiled once, reused).

    ``evaluate(params, split, reference=None, salient=True)`` returns the nested metrics dict::

        {"food_classification": {accuracy, weighted_f1, auroc_macro, top3_accuracy, ece, temperature
                                 (val: calibration_temperature)},
         "nutrition": {knn_purity, spearman, num_foods, knn_purity_in_sample, spearman_in_sample,
                       num_foods_in_sample, nutrient_r2, nutrient_r2_per_nutrient, num_samples},
         "salient_molecules": {precision_at_K, recall_at_K, fidelity_plus, fidelity_minus, scorer,
                               stability_jaccard, per_scorer: {name: {...}}}}

    Food classification and nutrient R² are scored on the ``num_samples`` samples of ``split``;
    the Food embeddings (the triplet projection) against their USDA categories (k-NN purity) and
    nutrient profiles (Spearman of pairwise distances) on the ``num_foods`` foods held out of the
    nutrition training (:func:`jaxfood.graph.splits.held_out_food_mask`: no nutrient input, no
    triplet; NaN when the graph holds none out), each against all foods, and in-sample on the
    others (``*_in_sample``, listed under ``nutrition.in_sample``); molecule rankings per
    food from the *training* samples only (no label of a scored sample enters them), fidelity on
    the samples of ``split`` (probability of the *predicted* food, for every scorer);
    ``stability_jaccard`` of the headline scorer's rankings under ``stability`` =
    ``(perturbations, noise_sd, drop_fraction, seed)`` (see :func:`molecules.perturb_contains`).
    ``graph``: a :func:`jaxfood.graph.splits.prepare_graph` output.
    """

    def __init__(self, model, graph: HeteroGraph, salient_k: int = 10, knn_k: int = 5,
                 scorer: str = "intensity_attribution", scorers: Sequence[str] = tuple(mol.SCORERS),
                 stability: tuple[int, float, float, int] = (3, 0.1, 0.05, 0), temperature: float = 1.0):
        self.model, self.graph = model, graph
        #: Divides the food logits before the probabilities are scored (temperature scaling fitted
        #: on the validation split, see :func:`fit_temperature`; 1: the raw softmax).
        self.temperature = float(temperature)
        self.stability = stability
        self.salient_k, self.knn_k, self.scorer = int(salient_k), int(knn_k), scorer
        self.scorers = tuple(dict.fromkeys([scorer, *scorers]))
        # Evaluators of the same model (fine-tuning's validation and test, the ablations, the
        # untrained control, the report) share their compiled programs within the process.
        self._predict = model_programs(model).predict
        self._fidelity = model_programs(model).fidelity(self.salient_k)
        # The headline scorer always runs with explicit edge masks (all edges for the clean input):
        # the clean and the perturbed inputs share one compiled program.
        self._score_perturbed = model_programs(model).masked_scorer(scorer)

    def compile_in_background(self, params) -> Background | None:
        """Starts compiling, in a thread, the program of the scorers a test evaluation runs besides
        the headline one (validation only runs the headline scorer): see
        :meth:`ModelPrograms.compile_scores_in_background`."""
        others = tuple(n for n in self.scorers if n != self.scorer)
        return model_programs(self.model).compile_scores_in_background(others, params, self.graph)

    def _scores(self, params, names: Sequence[str]) -> dict[str, Any]:
        return molecule_scores(self.model, params, self.graph, names, self.scorer)

    def _headline_scores(self, params):
        return self._scores(params, (self.scorer,))[self.scorer]

    def stability_jaccard(self, params, clean_scores=None) -> float:
        """Mean :func:`molecules.topk_jaccard` of the headline scorer's per-food rankings
        between the clean input and each perturbation (NaN with 0 perturbations)."""
        perturbations, noise_sd, drop_fraction, seed = self.stability
        if perturbations < 1:
            return math.nan
        k = self.salient_k
        if clean_scores is None:
            clean_scores = self._headline_scores(params)
        clean = mol.rankings_by_id(mol.rank_molecules_per_food(np.asarray(clean_scores), self.graph)[0], self.graph, k)
        overlaps = []
        for i in range(perturbations):
            graph, masks = mol.perturb_contains(self.graph, jax.random.fold_in(jax.random.key(seed), i), noise_sd,
                                                drop_fraction)
            scores = np.asarray(self._score_perturbed(params, graph, masks))
            noisy = mol.rankings_by_id(mol.rank_molecules_per_food(scores, self.graph)[0], self.graph, k)
            overlaps.append(mol.topk_jaccard(clean, noisy, k))
        return float(np.mean(overlaps))

    def predict(self, params):
        return jax.device_get(self._predict(params, self.graph))

    def evaluate(self, params, split: str = "test", reference: Mapping[str, set[str]] | None = None,
                 salient: bool = True, scorers: Sequence[str] | None = None,
                 stability: bool = True) -> dict[str, Any]:
        graph = self.graph
        out = self.predict(params)
        labels = np.asarray(graph.sample_food)
        in_split = (np.asarray(graph.sample_split) == SPLIT_CODES[split]) & (labels >= 0)
        idx = np.nonzero(in_split)[0]
        logits = np.asarray(out.food_logits, np.float64)[idx]
        scaled = logits / self.temperature
        proba = np.exp(scaled - scaled.max(1, keepdims=True))
        proba /= proba.sum(1, keepdims=True)
        sample_ids = graph.meta.node_ids.get(schema.SAMPLE) or [str(i) for i in range(labels.size)]
        metrics: dict[str, Any] = {"food_classification": {
            **classification_metrics(labels[idx], proba), "temperature": self.temperature,
            "num_samples": int(idx.size), "samples_digest": samples_digest(sample_ids[i] for i in idx)}}
        if split == "val":  # the temperature that calibrates these parameters (kept with the checkpoint)
            metrics["food_classification"]["calibration_temperature"] = fit_temperature(logits, labels[idx])

        food_nutrients = np.asarray(graph.food_nutrients)
        if food_nutrients.shape[1] == 0:  # no nutrient table: the section says why it is empty
            metrics["nutrition"] = {"absent": absent_parts(graph)[schema.NUTRIENT]}
        else:
            r2 = nutrient_r2(food_nutrients[labels[idx]], np.asarray(out.nutrient_profile)[idx],
                             list(graph.meta.nutrient_names) or [str(i) for i in range(food_nutrients.shape[1])])
            projection = np.asarray(out.food_projection)
            category = np.asarray(graph.food_category)
            known = category >= 0
            held_out = held_out_food_mask(graph)
            trained = ~held_out
            food_ids = graph.meta.node_ids.get(schema.FOOD) or [str(i) for i in range(held_out.size)]
            metrics["nutrition"] = {
                # Held-out foods: profiles neither the Food inputs nor the triplet loss saw, each
                # food placed among all foods; the same foods for val and test (never a selection metric).
                "knn_purity": (knn_purity(projection[known], category[known], self.knn_k, queries=held_out[known])
                               if known.sum() > 1 else math.nan),
                "spearman": distance_spearman(projection, food_nutrients, queries=held_out),
                "num_foods": int(held_out.sum()),
                "foods_digest": samples_digest(food_ids[i] for i in np.nonzero(held_out)[0]),
                # In-sample: the foods whose nutrient profiles the triplet loss trains on.
                "knn_purity_in_sample": (knn_purity(projection[known & trained], category[known & trained], self.knn_k)
                                         if (known & trained).sum() > 1 else math.nan),
                "spearman_in_sample": distance_spearman(projection[trained], food_nutrients[trained]),
                "in_sample": ["knn_purity_in_sample", "spearman_in_sample"],
                "num_foods_in_sample": int(trained.sum()),
                "nutrient_r2": r2["overall"],
                "nutrient_r2_per_nutrient": r2["per_nutrient"],
                "num_samples": int(idx.size),
            }
        if not salient:
            return metrics

        k = self.salient_k
        sample_mask = jnp.asarray(in_split)
        per_scorer = {}
        all_scores = self._scores(params, scorers or self.scorers)
        headline_scores = all_scores.get(self.scorer)
        for name, scores in all_scores.items():
            # One rule for every scorer: the probability of the *predicted* food (what a user of
            # `jaxfood predict` is shown), never the held-out label.
            p_full, p_removed, p_kept = (np.asarray(x)[idx] for x in jax.device_get(
                self._fidelity(params, graph, scores, sample_mask)))
            fid_plus, fid_minus = fidelity(p_full, p_removed, p_kept)
            entry = {"fidelity_plus": fid_plus, "fidelity_minus": fid_minus}
            if reference is not None:
                ranking, _ = mol.rank_molecules_per_food(np.asarray(scores), graph)
                prec, rec = precision_recall_at_k(mol.rankings_by_id(ranking, graph, k), reference, k)
            else:
                prec = rec = math.nan
            entry[f"precision_at_{k}"] = prec
            entry[f"recall_at_{k}"] = rec
            per_scorer[name] = entry
        head = per_scorer[self.scorer] if self.scorer in per_scorer else next(iter(per_scorer.values()))
        ranking_samples = (np.asarray(graph.sample_split) == SPLIT_CODES["train"]) & (labels >= 0)
        metrics["salient_molecules"] = {**head, "scorer": self.scorer, "k": k,
                                        # fidelity on the samples of the split; rankings (precision/
                                        # recall@k, stability) from the training samples only
                                        "num_samples": int(idx.size),
                                        "num_ranking_samples": int(ranking_samples.sum()),
                                        "num_reference_foods": len(reference) if reference is not None else 0,
                                        "in_sample": [f"precision_at_{k}", f"recall_at_{k}", "stability_jaccard"],
                                        "stability_jaccard": (self.stability_jaccard(params, headline_scores)
                                                              if stability else math.nan),
                                        "per_scorer": per_scorer}
        return metrics

    def rankings(self, params, scorer: str | None = None, top: int | None = None) -> dict[str, list[str]]:
        """``{food id: [molecule ids]}`` ranked by ``scorer`` (default: the headline scorer)."""
        scorer = scorer or self.scorer
        scores = np.asarray(self._scores(params, (scorer,))[scorer])
        ranking, _ = mol.rank_molecules_per_food(scores, self.graph)
        return mol.rankings_by_id(ranking, self.graph, top)
