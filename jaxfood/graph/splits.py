"""Train/val/test splits of samples and the label-edge rule.

A sample must never see its own food through message passing. :func:`restrict_label_edges` keeps
``is_instance_of`` edges (and their reverses) for training samples only; held-out samples have
none. Training steps additionally mask the label edges of the samples they supervise.

Foods are split too: a share of the foods (``meta.extra['nutrition_held_out_foods']``, drawn with
the sample split) keeps its nutrient profile out of training -- :func:`prepare_graph` removes their
``has_nutrient`` edges and Food input features, the triplet loss leaves them out -- so the
Food-level nutrition metrics can be measured on foods whose profiles the model never saw.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import numpy as np

from jaxfood.errors import UserError
from jaxfood.graph import schema
from jaxfood.graph.hetero_graph import (
    SPLIT_CODES,
    EdgeSet,
    HeteroGraph,
    align_reverse_edges,
    check_label_edges,
    make_edge_set,
)


def stratified_split(
    sample_food: np.ndarray, fractions: Sequence[float] = (0.7, 0.15, 0.15), seed: int = 0
) -> np.ndarray:
    """[S] int32 split codes (0 train, 1 val, 2 test), stratified by food, deterministic in ``seed``.

    Within each food the samples are shuffled and cut by the fractions (rounded, at least one
    training sample per food where the food has any; val/test get samples only where the food
    has at least 3). Samples with unknown food (-1) go to training without a label edge.
    """
    fractions = np.asarray(fractions, dtype=np.float64)
    if fractions.shape != (3,) or np.any(fractions < 0) or not np.isclose(fractions.sum(), 1.0):
        raise UserError(f"split fractions {list(fractions)}: expected three non-negative numbers summing to 1")
    sample_food = np.asarray(sample_food)
    split = np.zeros(sample_food.shape[0], np.int32)
    rng = np.random.default_rng(seed)
    for food in np.unique(sample_food[sample_food >= 0]):
        idx = np.nonzero(sample_food == food)[0]
        idx = idx[rng.permutation(idx.size)]
        n = idx.size
        if n < 3:
            continue
        n_val = max(1, int(round(fractions[1] * n))) if fractions[1] > 0 else 0
        n_test = max(1, int(round(fractions[2] * n))) if fractions[2] > 0 else 0
        while n - n_val - n_test < 1:
            if n_test >= n_val and n_test > 0:
                n_test -= 1
            else:
                n_val -= 1
        split[idx[n - n_val - n_test : n - n_test]] = SPLIT_CODES["val"]
        split[idx[n - n_test :]] = SPLIT_CODES["test"]
    return split


def label_edges_for(sample_food: np.ndarray, sample_mask: np.ndarray):
    """``is_instance_of`` edge set for the samples in ``sample_mask`` with a known food."""
    sample_food = np.asarray(sample_food)
    keep = np.nonzero(np.asarray(sample_mask) & (sample_food >= 0))[0]
    return make_edge_set(keep, sample_food[keep])


def restrict_label_edges(graph: HeteroGraph) -> HeteroGraph:
    """Label edges (both directions) for training samples only."""
    fwd = label_edges_for(np.asarray(graph.sample_food), np.asarray(graph.sample_split) == SPLIT_CODES["train"])
    rev = make_edge_set(fwd.receivers, fwd.senders)
    edges = dict(graph.edges)
    edges[schema.IS_INSTANCE_OF] = fwd
    edges[schema.reverse_key(schema.IS_INSTANCE_OF)] = rev
    return graph.replace(edges=edges)


# ---- foods whose nutrient profiles training never sees ------------------------------------------
#: Default share of the foods held out of the nutrition training (their profiles are test data).
NUTRITION_HOLDOUT_FRACTION = 0.1
#: With fewer foods none is held out: 3 held out would leave the triplet loss too few to rank.
MIN_FOODS_FOR_HOLDOUT = 10
#: ``meta.extra`` keys: the held-out food ids (graph order) and the fraction they were drawn with.
HELD_OUT_FOODS = "nutrition_held_out_foods"
HOLDOUT_FRACTION = "nutrition_holdout_fraction"
#: The :func:`split_fingerprint` entry of the held-out foods.
FOOD_FINGERPRINT = "held_out_foods"


def num_held_out_foods(num_foods: int, fraction: float) -> int:
    """How many of ``num_foods`` foods (with a nutrient profile) are held out: ``fraction`` of them,
    rounded half up, at least 3; none with ``fraction`` 0 or fewer than ``MIN_FOODS_FOR_HOLDOUT``."""
    if fraction < 0 or fraction >= 1:
        raise UserError(f"nutrition hold-out fraction {fraction}: expected a number in [0, 1)")
    if fraction == 0 or num_foods < MIN_FOODS_FOR_HOLDOUT:
        return 0
    return min(max(3, int(np.floor(fraction * num_foods + 0.5))), num_foods - 3)


def choose_held_out_foods(graph: HeteroGraph, fraction: float, seed: int) -> np.ndarray:
    """[F] bool: the foods whose nutrient profiles training never sees, drawn with ``seed`` among the
    foods with at least one ``has_nutrient`` edge (none when the graph has no nutrient table)."""
    F = graph.num_nodes[schema.FOOD]
    held_out = np.zeros(F, bool)
    if schema.HAS_NUTRIENT not in graph.edges or np.shape(graph.food_nutrients)[1] == 0:
        return held_out
    candidates = np.unique(np.asarray(graph.edges[schema.HAS_NUTRIENT].senders))
    n = num_held_out_foods(candidates.size, fraction)
    # A stream of its own: the sample split drawn with the same seed is unchanged by the food draw.
    rng = np.random.default_rng([int(seed), 16])
    held_out[rng.choice(candidates, n, replace=False)] = True
    return held_out


def held_out_food_mask(graph: HeteroGraph) -> np.ndarray:
    """[F] bool of the foods listed in ``meta.extra['nutrition_held_out_foods']`` (static: usable
    inside ``jit``); all False for a graph without the list (built before foods were held out)."""
    ids = graph.meta.extra.get(HELD_OUT_FOODS) or []
    food_ids = list(graph.meta.node_ids.get(schema.FOOD) or [])
    if food_ids:
        wanted = set(map(str, ids))
        return np.asarray([str(f) in wanted for f in food_ids], bool)
    return np.isin(np.arange(graph.num_nodes[schema.FOOD]), np.asarray(ids, dtype=np.int64))


def hide_held_out_nutrients(graph: HeteroGraph) -> HeteroGraph:
    """``graph`` without the nutrient inputs of its held-out foods: their ``has_nutrient`` edges (both
    directions) removed and their Food input features zeroed. ``food_nutrients`` keeps every
    profile (the evaluation scores against them, as ``sample_food`` keeps held-out labels)."""
    held_out = held_out_food_mask(graph)
    if not held_out.any():
        return graph
    edges = dict(graph.edges)
    for key, food_end in ((schema.HAS_NUTRIENT, "senders"), (schema.reverse_key(schema.HAS_NUTRIENT), "receivers")):
        if key in edges:
            e = edges[key]
            keep = ~held_out[np.asarray(getattr(e, food_end))]
            edges[key] = EdgeSet(senders=np.asarray(e.senders)[keep], receivers=np.asarray(e.receivers)[keep],
                                 attributes=np.asarray(e.attributes)[keep])
    features = dict(graph.node_features)
    if schema.FOOD in features:
        features[schema.FOOD] = np.where(held_out[:, None], 0.0, np.asarray(features[schema.FOOD])).astype(np.float32)
    return graph.replace(edges=edges, node_features=features)


def with_splits(graph: HeteroGraph, fractions=(0.7, 0.15, 0.15), seed: int = 0,
                nutrition_holdout_fraction: float = NUTRITION_HOLDOUT_FRACTION) -> HeteroGraph:
    """Assigns a stratified split, restricts the label edges to training samples and draws the
    foods held out of the nutrition training (``meta.extra['nutrition_held_out_foods']``, ids)."""
    split = stratified_split(np.asarray(graph.sample_food), fractions, seed)
    held_out = choose_held_out_foods(graph, nutrition_holdout_fraction, seed)
    food_ids = list(graph.meta.node_ids.get(schema.FOOD) or range(held_out.size))
    meta = dataclasses.replace(graph.meta, extra={
        **graph.meta.extra, HOLDOUT_FRACTION: float(nutrition_holdout_fraction),
        HELD_OUT_FOODS: [str(food_ids[i]) for i in np.nonzero(held_out)[0]]})
    return restrict_label_edges(graph.replace(sample_split=split, meta=meta))


def resplit(graph: HeteroGraph, seed: int) -> HeteroGraph:
    """``graph`` with a new stratified split and new held-out foods drawn with ``seed`` (the
    fractions it was built with, ``meta.extra['split_fractions']`` and
    ``['nutrition_holdout_fraction']``) and label edges for its new training samples; the split
    seed is recorded as ``meta.extra['split_seed']``. Seeds of a repeated experiment vary the split."""
    fractions = graph.meta.extra.get("split_fractions") or (0.7, 0.15, 0.15)
    # A graph from before foods were held out keeps holding none: its seed-0 split has none either.
    holdout = float(graph.meta.extra.get(HOLDOUT_FRACTION, 0.0))
    out = with_splits(graph, fractions, seed, holdout)
    meta = dataclasses.replace(out.meta, extra={**out.meta.extra, "split_seed": int(seed)})
    return out.replace(meta=meta)


def samples_reaching_own_food(graph: HeteroGraph) -> np.ndarray:
    """Indices of held-out samples that reach their own food node through label edges.

    Walks every path made only of ``is_instance_of`` edges and their reverses (Sample -> Food ->
    Sample -> ...) from each held-out sample, each edge of either relation taken both ways: a
    reverse-only ``Food -> Sample`` edge leaks as much as a forward one. Empty for a correct graph.
    """
    sf = np.asarray(graph.sample_food)
    split = np.asarray(graph.sample_split)
    fwd = graph.edges[schema.IS_INSTANCE_OF]
    rev = graph.edges[schema.reverse_key(schema.IS_INSTANCE_OF)]
    S, F = graph.num_nodes[schema.SAMPLE], graph.num_nodes[schema.FOOD]
    s2f = [[] for _ in range(S)]
    f2s = [[] for _ in range(F)]
    pairs = [*zip(np.asarray(fwd.senders), np.asarray(fwd.receivers)),
             *zip(np.asarray(rev.receivers), np.asarray(rev.senders))]
    for s, f in pairs:
        s2f[s].append(f)
        f2s[f].append(s)
    leaks = []
    for s0 in np.nonzero((split != SPLIT_CODES["train"]) & (sf >= 0))[0]:
        seen_f: set[int] = set()
        frontier = {int(s0)}
        seen_s = set(frontier)
        while frontier:
            foods = {f for s in frontier for f in s2f[s]} - seen_f
            seen_f |= foods
            frontier = {s for f in foods for s in f2s[f]} - seen_s
            seen_s |= frontier
        if int(sf[s0]) in seen_f:
            leaks.append(int(s0))
    return np.asarray(leaks, dtype=np.int64)


def prepare_graph(graph: HeteroGraph) -> HeteroGraph:
    """The graph fine-tuning and evaluation run on: reverse ``contains_molecule`` edges aligned with
    the forward ones (one edge mask then serves both directions), the nutrient inputs of the
    held-out foods removed (:func:`hide_held_out_nutrients`), arrays on the device. Held-out
    samples never have label edges (checked)."""
    check_label_edges(graph)
    return jax.device_put(align_reverse_edges(hide_held_out_nutrients(graph), (schema.CONTAINS,)))


def split_fingerprint(graph: HeteroGraph) -> dict[str, str]:
    """``{split name: 16 hex digits}``: a hash of the sorted sample ids of each split, and under
    ``held_out_foods`` of the sorted ids of the foods held out of the nutrition training.

    Recorded in fine-tuning checkpoints; a graph with the same samples split differently (another
    ``--seed`` or ``--split``) has another fingerprint, so its test samples may be training samples.
    """
    import hashlib

    ids = np.asarray(graph.meta.node_ids[schema.SAMPLE], dtype=object)
    split = np.asarray(graph.sample_split)
    out = {}
    for name, code in SPLIT_CODES.items():
        members = sorted(str(s) for s in ids[split == code])
        out[name] = hashlib.sha256("\n".join(members).encode()).hexdigest()[:16]
    foods = sorted(str(f) for f in graph.meta.extra.get(HELD_OUT_FOODS) or [])
    out[FOOD_FINGERPRINT] = hashlib.sha256("\n".join(foods).encode()).hexdigest()[:16]
    return out


def check_split_matches(recorded, graph: HeteroGraph, source: str) -> None:
    """Raises :class:`~jaxfood.errors.CheckpointError` when ``graph``'s split is not ``recorded``
    (a :func:`split_fingerprint`; None, as in checkpoints older than the fingerprint, is not checked)."""
    from jaxfood.errors import CheckpointError

    if not recorded:
        return
    have = split_fingerprint(graph)
    differ = [name for name in (*SPLIT_CODES, FOOD_FINGERPRINT) if name in recorded and recorded[name] != have[name]]
    if differ:
        what = ", ".join(f"{name} food ids" if name == FOOD_FINGERPRINT else f"{name} sample ids" for name in differ)
        raise CheckpointError(
            f"{source}: the graph splits its samples or foods differently from the graph the checkpoint was "
            f"fine-tuned on ({what} differ: fingerprint {have[differ[0]]}, checkpoint {recorded[differ[0]]}); its "
            "held-out samples or foods may be training data: use the graph built with the same files, --seed and "
            "--split")
