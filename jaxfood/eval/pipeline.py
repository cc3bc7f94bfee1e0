"""The evaluation that ``run_mtl.py`` reports: the model, its ablations and the baselines.

Everything is computed on the same graph and split: the fine-tuned model's metrics come from
:mod:`jaxfood.train.finetune`; the baselines (:mod:`jaxfood.eval.baselines`) are fitted on the
training samples and scored on the test split, from raw peak areas recovered from the graph's
normalised intensities (the graph keeps the per-molecule statistics, so this is exact).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from jaxfood.graph import schema
from jaxfood.graph.hetero_graph import HeteroGraph

#: The sections of metrics.json that the model, the probe and the from-scratch run share.
SECTIONS = ("food_classification", "nutrition", "salient_molecules")


def raw_peak_areas(graph: HeteroGraph) -> np.ndarray:
    """``[S, M]`` peak areas, undoing the builder's ``log1p`` + per-molecule z-score.

    Compatibility-mode graphs (no ``log1p``) and graphs without stored statistics return the
    edge attribute as is (absent pairs 0).
    """
    edges = graph.edges[schema.CONTAINS]
    senders, receivers = np.asarray(edges.senders), np.asarray(edges.receivers)
    z = np.asarray(edges.attributes[:, 0], np.float64)
    stats = graph.meta.normalisation.get("contains_molecule", {})
    if stats.get("transform") == "log1p" and "mean" in stats:
        mean, std = np.asarray(stats["mean"]), np.asarray(stats["std"])
        values = np.expm1(z * std[receivers] + mean[receivers])
    else:
        values = z - z.min() + 1.0 if z.size else z
    matrix = np.zeros((graph.num_nodes[schema.SAMPLE], graph.num_nodes[schema.MOLECULE]))
    np.add.at(matrix, (senders, receivers), values)
    return matrix


def run_baselines(graph: HeteroGraph, reference: Mapping[str, set[str]] | None, *, k: int = 10, seed: int = 0,
                  rf_estimators: int = 200) -> dict[str, float]:
    """``metrics.json["baselines"]`` for ``graph``'s test split."""
    from jaxfood.eval.baselines import baseline_metrics, preprocess_intensities

    features = preprocess_intensities(raw_peak_areas(graph))
    return baseline_metrics(
        features, np.asarray(graph.sample_food), np.asarray(graph.sample_split), np.asarray(graph.food_nutrients),
        graph.meta.node_ids[schema.MOLECULE], graph.meta.node_ids[schema.FOOD], reference,
        k=k, seed=seed, rf_estimators=rf_estimators,
    )


def headline(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The shared sections of a run's metrics, without per-nutrient/per-scorer detail."""
    out: dict[str, Any] = {}
    for section in SECTIONS:
        if section in metrics:
            out[section] = {k: v for k, v in metrics[section].items() if not isinstance(v, (dict, list))}
    return out


def mean_and_std(runs: list[Mapping[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Element-wise mean and standard deviation of nested dicts of numbers (other leaves: first run)."""

    def combine(values: list[Any]) -> tuple[Any, Any]:
        first = values[0]
        if isinstance(first, Mapping):
            keys = [k for k in first if all(isinstance(v, Mapping) and k in v for v in values)]
            pairs = {k: combine([v[k] for v in values]) for k in keys}
            return {k: p[0] for k, p in pairs.items()}, {k: p[1] for k, p in pairs.items()}
        if isinstance(first, (int, float)) and not isinstance(first, bool):
            arr = np.asarray(values, np.float64)
            finite = arr[np.isfinite(arr)]
            if finite.size == 0:
                return math.nan, math.nan
            return float(finite.mean()), float(finite.std(ddof=1)) if finite.size > 1 else 0.0
        return first, None

    mean, std = combine(list(runs))
    return mean, _prune(std)


def _prune(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        pruned = {k: _prune(v) for k, v in tree.items()}
        return {k: v for k, v in pruned.items() if v is not None and v != {}}
    return tree
