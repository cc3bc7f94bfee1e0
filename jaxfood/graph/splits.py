"""Train/val/test splits of samples and the label-edge rule.

A sample must never see its own food through message passing. :func:`restrict_label_edges` keeps
``is_instance_of`` edges (and their reverses) for training samples only; held-out samples have
none. Training steps additionally mask the label edges of the samples they supervise.
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


def with_splits(graph: HeteroGraph, fractions=(0.7, 0.15, 0.15), seed: int = 0) -> HeteroGraph:
    """Assigns a stratified split and restricts the label edges to training samples."""
    split = stratified_split(np.asarray(graph.sample_food), fractions, seed)
    return restrict_label_edges(graph.replace(sample_split=split))


def resplit(graph: HeteroGraph, seed: int) -> HeteroGraph:
    """``graph`` with a new stratified split drawn with ``seed`` (the fractions it was built with,
    ``meta.extra['split_fractions']``) and label edges for its new training samples; the split
    seed is recorded as ``meta.extra['split_seed']``. Seeds of a repeated experiment vary the split."""
    fractions = graph.meta.extra.get("split_fractions") or (0.7, 0.15, 0.15)
    meta = dataclasses.replace(graph.meta, extra={**graph.meta.extra, "split_seed": int(seed)})
    return with_splits(graph, fractions, seed).replace(meta=meta)


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
    the forward ones (one edge mask then serves both directions), arrays on the device. Held-out
    samples never have label edges (checked)."""
    check_label_edges(graph)
    return jax.device_put(align_reverse_edges(graph, (schema.CONTAINS,)))


def split_fingerprint(graph: HeteroGraph) -> dict[str, str]:
    """``{split name: 16 hex digits}``: a hash of the sorted sample ids of each split.

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
    return out


def check_split_matches(recorded, graph: HeteroGraph, source: str) -> None:
    """Raises :class:`~jaxfood.errors.CheckpointError` when ``graph``'s split is not ``recorded``
    (a :func:`split_fingerprint`; None, as in checkpoints older than the fingerprint, is not checked)."""
    from jaxfood.errors import CheckpointError

    if not recorded:
        return
    have = split_fingerprint(graph)
    differ = [name for name in SPLIT_CODES if name in recorded and recorded[name] != have[name]]
    if differ:
        raise CheckpointError(
            f"{source}: the graph splits its samples differently from the graph the checkpoint was fine-tuned on "
            f"({', '.join(differ)} sample ids differ: fingerprint {have[differ[0]]}, checkpoint "
            f"{recorded[differ[0]]}); its held-out samples may be training samples: use the graph built with the "
            "same files, --seed and --split")
