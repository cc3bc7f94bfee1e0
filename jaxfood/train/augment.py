"""Graph augmentations for GraphCL pretraining, as masks with static shapes.

You et al., "Graph Contrastive Learning with Augmentations" (NeurIPS 2020) contrast two randomly
augmented views of a graph. Here every augmentation keeps the graph's shapes and becomes either an
edge mask (``dict[relation key, [E] bool]``, read by the encoder: a masked edge contributes
nothing and the attention softmax renormalises over the edges left) or a multiplicative mask on
input features / edge attributes. So one ``jit`` compilation serves every view of a run.

* **Node dropping** (per node type, rate = probability a node is dropped): every edge incident to a
  dropped node is masked, in every relation and in both directions.
* **Edge perturbation** (per forward relation): *removal* masks a random fraction of the real
  edges together with their reverse edges; *addition* switches on a random subset of a fixed
  candidate pool of plausible edges. The pool is appended to the relation once, outside ``jit``,
  by :func:`prepare_pretrain_graph` (mask off by default), so adding edges never changes a shape.
* **Feature masking** (per node type, rate = fraction of feature dimensions zeroed for all nodes
  of the type, as in GraphCL/GRACE attribute masking) and **edge-attribute masking** (per forward
  relation, rate = fraction of edges whose attribute row, e.g. intensity or quantity, is zeroed in
  both directions).

Label edges (``is_instance_of`` and its reverse) are never seen by pretraining: their mask is
always off.

Relations are written here by their short forward name (``contains_molecule``) or their full key
(``Sample|contains_molecule|Molecule``). :func:`prepare_pretrain_graph` also puts each reverse
relation in the same edge order as its forward relation, so one mask serves both directions.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxfood.errors import ConfigError
from jaxfood.graph import hetero_graph, schema
from jaxfood.graph.hetero_graph import EdgeSet, HeteroGraph, make_edge_set
from jaxfood.graph.splits import hide_held_out_nutrients

Array = Any

#: ``graph.meta.extra`` key holding ``{forward relation key: number of candidate edges}``.
CANDIDATES_KEY = "graphcl_candidate_edges"


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Rates of each augmentation (0 disables it). Keys: node types or forward relation names."""

    #: Probability that a node of the type is dropped (its incident edges masked).
    node_drop: dict[str, float] = dataclasses.field(
        default_factory=lambda: {schema.SAMPLE: 0.1, schema.MOLECULE: 0.1})
    #: Fraction of the real edges of the relation removed (with their reverse edges).
    edge_drop: dict[str, float] = dataclasses.field(
        default_factory=lambda: {"contains_molecule": 0.2, "has_nutrient": 0.3})
    #: Number of candidate edges switched on, as a fraction of the relation's real edges.
    edge_add: dict[str, float] = dataclasses.field(
        default_factory=lambda: {"contains_molecule": 0.05})
    #: Size of the candidate pool per relation, as a multiple of the edges added per view.
    candidate_pool_factor: float = 4.0
    #: Fraction of feature dimensions zeroed (same dimensions for every node of the type).
    feature_mask: dict[str, float] = dataclasses.field(
        default_factory=lambda: {schema.MOLECULE: 0.2, schema.FOOD: 0.2})
    #: Fraction of edges whose attribute row (intensity, quantity) is zeroed. Not ``has_nutrient`` by
    #: default: quantities are what tells foods apart (they drive the attention over nutrients).
    edge_attr_mask: dict[str, float] = dataclasses.field(
        default_factory=lambda: {"contains_molecule": 0.2})


def relation_key(name: str, graph: HeteroGraph | None = None) -> str:
    """Forward relation key of ``name`` (``contains_molecule`` or ``Sample|contains_molecule|Molecule``)."""
    if "|" in name:
        key = schema.forward_key(name)
    else:
        matches = [k for k in schema.FORWARD_RELATIONS if schema.split_key(k)[1] == name]
        if not matches:
            names = sorted(schema.split_key(k)[1] for k in schema.FORWARD_RELATIONS)
            raise ConfigError(f"augmentation relation '{name}': unknown (expected one of {names})")
        key = matches[0]
    if key not in schema.FORWARD_RELATIONS:
        raise ConfigError(f"augmentation relation '{name}': unknown relation key")
    if key in schema.LABEL_RELATIONS:
        raise ConfigError(f"augmentation relation '{name}': label edges are never used by pretraining")
    return key


def check_config(cfg: AugmentConfig, graph: HeteroGraph) -> None:
    """Raises :class:`ConfigError` for unknown node types/relations or rates outside [0, 1]."""
    for field in ("node_drop", "feature_mask"):
        for t, rate in getattr(cfg, field).items():
            if t not in schema.NODE_TYPES:
                raise ConfigError(f"augment.{field}.{t}: unknown node type (expected one of {list(schema.NODE_TYPES)})")
            if field == "feature_mask" and rate > 0 and t not in graph.node_features:
                raise ConfigError(f"augment.{field}.{t}: the graph has no input features for '{t}'")
            _check_rate(f"augment.{field}.{t}", rate)
    for field in ("edge_drop", "edge_add", "edge_attr_mask"):
        for name, rate in getattr(cfg, field).items():
            relation_key(name)
            _check_rate(f"augment.{field}.{name}", rate)
    if cfg.candidate_pool_factor < 1.0:
        raise ConfigError(f"augment.candidate_pool_factor = {cfg.candidate_pool_factor}: expected >= 1")


def _check_rate(key: str, rate: float) -> None:
    if not 0.0 <= float(rate) <= 1.0:
        raise ConfigError(f"{key} = {rate}: expected a rate in [0, 1]")


def _rates(mapping: Mapping[str, float], graph: HeteroGraph) -> dict[str, float]:
    """``{forward key present in graph: rate > 0}``."""
    out = {}
    for name, rate in mapping.items():
        key = relation_key(name)
        if key in graph.edges and float(rate) > 0:
            out[key] = float(rate)
    return out


# ---- once per run, outside jit ------------------------------------------------------------------
def align_reverse_edges(graph: HeteroGraph) -> HeteroGraph:
    """Every reverse relation listed in its forward relation's order (one ``[E]`` mask serves both
    directions); see :func:`jaxfood.graph.hetero_graph.align_reverse_edges`."""
    return hetero_graph.align_reverse_edges(graph)


def num_candidate_edges(graph: HeteroGraph) -> dict[str, int]:
    """``{forward relation key: K}``: the last K edges of the relation (and its reverse) are candidates."""
    return dict(graph.meta.extra.get(CANDIDATES_KEY, {}))


def prepare_pretrain_graph(graph: HeteroGraph, cfg: AugmentConfig, seed: int = 0) -> HeteroGraph:
    """The graph pretraining runs on: no label edges, no nutrient inputs of the foods held out of
    the nutrition training, reverse relations aligned, candidates appended.

    Label relations are kept (the encoder has parameters for them) but emptied: pretraining never
    sees which food a sample is, and no compute is spent on edges that would be masked anyway.
    The held-out foods' ``has_nutrient`` edges and Food features go as in fine-tuning
    (:func:`jaxfood.graph.splits.hide_held_out_nutrients`): their profiles are test data.

    For each relation with an ``edge_add`` rate, ``K = ceil(candidate_pool_factor * rate * E)``
    candidate edges are appended to the relation and, in the same order, to its reverse. A
    candidate joins a random source node to a random destination node it is not yet joined to,
    with the destination drawn in proportion to its degree (a molecule seen in many samples is a
    plausible extra detection), and copies the attribute row of a random real edge of that
    destination (intensities are normalised per molecule, quantities per nutrient).
    Their number is recorded in ``meta.extra`` (static), so :func:`augment` knows which edges are
    candidates; they are off unless a view switches them on. Deterministic in ``seed``.
    """
    check_config(cfg, graph)
    graph = align_reverse_edges(hide_held_out_nutrients(graph))
    edges = dict(graph.edges)
    for key in schema.LABEL_RELATIONS:
        if key in edges:
            edges[key] = make_edge_set(np.zeros(0, np.int32), np.zeros(0, np.int32),
                                       np.zeros((0, edges[key].attributes.shape[1]), np.float32))
    graph = graph.replace(edges=edges)
    rng = np.random.default_rng(seed)
    edges = dict(graph.edges)
    counts: dict[str, int] = {}
    for key, rate in _rates(cfg.edge_add, graph).items():
        fwd = graph.edges[key]
        src_t, _, dst_t = schema.split_key(key)
        n_src, n_dst = graph.num_nodes[src_t], graph.num_nodes[dst_t]
        s, r, a = np.asarray(fwd.senders), np.asarray(fwd.receivers), np.asarray(fwd.attributes)
        k = int(math.ceil(cfg.candidate_pool_factor * rate * s.size))
        existing = set((s.astype(np.int64) * n_dst + r).tolist())
        free = n_src * n_dst - len(existing)
        k = min(k, free)
        if k <= 0 or s.size == 0:
            continue
        dst_prob = np.bincount(r, minlength=n_dst).astype(np.float64)
        dst_prob /= dst_prob.sum()
        edges_of_dst = np.split(np.argsort(r, kind="stable"), np.cumsum(np.bincount(r, minlength=n_dst))[:-1])
        cand_s, cand_r, cand_a = [], [], []
        chosen: set[int] = set()
        # Rejection sampling; fall back to uniform destinations if degree-weighting saturates.
        for attempt in range(50):
            need = k - len(cand_s)
            if need <= 0:
                break
            m = 4 * need
            ps = rng.integers(0, n_src, m)
            pr = rng.choice(n_dst, m, p=dst_prob) if attempt < 25 else rng.integers(0, n_dst, m)
            for i, j in zip(ps.tolist(), pr.tolist()):
                code = i * n_dst + j
                if code in existing or code in chosen:
                    continue
                chosen.add(code)
                cand_s.append(i)
                cand_r.append(j)
                pool = edges_of_dst[j]
                cand_a.append(a[rng.choice(pool)] if pool.size else np.zeros(a.shape[1], a.dtype))
                if len(cand_s) == k:
                    break
        k = len(cand_s)
        if k == 0:
            continue
        cs, cr = np.asarray(cand_s, np.int32), np.asarray(cand_r, np.int32)
        ca = np.asarray(cand_a, np.float32).reshape(k, a.shape[1])
        edges[key] = EdgeSet(senders=np.concatenate([s, cs]), receivers=np.concatenate([r, cr]),
                             attributes=np.concatenate([a, ca]))
        rkey = schema.reverse_key(key)
        if rkey in edges:
            rev = edges[rkey]
            edges[rkey] = EdgeSet(senders=np.concatenate([np.asarray(rev.senders), cr]),
                                  receivers=np.concatenate([np.asarray(rev.receivers), cs]),
                                  attributes=np.concatenate([np.asarray(rev.attributes), ca]))
        counts[key] = k
    meta = dataclasses.replace(graph.meta, extra={**graph.meta.extra, CANDIDATES_KEY: counts})
    return graph.replace(edges=edges, meta=meta)


# ---- per view, inside jit ------------------------------------------------------------------------
def base_edge_masks(graph: HeteroGraph) -> dict[str, Array]:
    """Masks of the un-augmented pretraining graph: real edges on; label and candidate edges off."""
    counts = num_candidate_edges(graph)
    masks = {}
    for key, e in graph.edges.items():
        n = e.senders.shape[0]
        if key in schema.LABEL_RELATIONS:
            masks[key] = jnp.zeros((n,), bool)
            continue
        k = counts.get(schema.forward_key(key), 0)
        masks[key] = jnp.arange(n) < (n - k)
    return masks


def augment(graph: HeteroGraph, rng: Array, cfg: AugmentConfig,
            return_node_masks: bool = False):
    """One random view of ``graph`` (from :func:`prepare_pretrain_graph`). Pure and jit-able.

    Args:
      graph: the pretraining graph; its shapes are kept.
      rng: PRNG key; the view is a deterministic function of it.
      cfg: augmentation rates (static).
      return_node_masks: also return ``{node type: [N] bool}`` (False = node dropped).

    Returns:
      ``(graph_view, edge_masks)``: ``graph_view`` has masked input features and edge attributes;
      ``edge_masks`` maps every relation key to ``[E]`` bool (label edges always off). With
      ``return_node_masks``, a third element ``node_masks``.
    """
    counts = num_candidate_edges(graph)
    masks = base_edge_masks(graph)

    # What each augmentation draws, planned statically: (what, node type or relation, rate, size).
    plan: list[tuple[str, str, float, int]] = []
    for key, rate in _rates(cfg.edge_drop, graph).items():
        plan.append(("edge_drop", key, rate, graph.edges[key].senders.shape[0] - counts.get(key, 0)))
    for key, rate in _rates(cfg.edge_add, graph).items():
        k = counts.get(key, 0)
        if k:
            # Each candidate is switched on with the probability that adds rate * E_real edges.
            n_real = graph.edges[key].senders.shape[0] - k
            plan.append(("edge_add", key, min(1.0, rate * n_real / k), k))
    for t, rate in cfg.node_drop.items():
        if float(rate) > 0 and t in graph.num_nodes:
            plan.append(("node_drop", t, float(rate), graph.num_nodes[t]))
    for t, rate in cfg.feature_mask.items():
        if float(rate) > 0 and t in graph.node_features:
            plan.append(("feature_mask", t, float(rate), graph.node_features[t].shape[1]))
    for key, rate in _rates(cfg.edge_attr_mask, graph).items():
        if graph.edges[key].attributes.shape[1]:
            plan.append(("edge_attr_mask", key, rate, graph.edges[key].senders.shape[0]))
    # One uniform draw for the whole view, sliced per augmentation: one RNG kernel to compile
    # instead of one per mask (they dominated the compile time of the pretraining step).
    total = sum(size for *_, size in plan)
    uniform = jax.random.uniform(rng, (max(total, 1),))
    draws, offset = {}, 0
    for what, name, rate, size in plan:
        draws[what, name] = (rate, uniform[offset:offset + size])
        offset += size

    features = dict(graph.node_features)
    edges = dict(graph.edges)
    node_masks = {t: jnp.ones((n,), bool) for t, n in graph.num_nodes.items()}
    for (what, name), (rate, u) in draws.items():
        if what == "edge_drop":
            # Real edges only; candidates keep their (off unless added) state. Both directions.
            n_cand = counts.get(name, 0)
            keep = jnp.concatenate([u >= rate, jnp.ones((n_cand,), bool)])
            masks = _and_both_directions(masks, name, keep)
        elif what == "edge_add":
            n_real = graph.edges[name].senders.shape[0] - u.shape[0]
            on = jnp.concatenate([jnp.zeros((n_real,), bool), u < rate])
            masks = _or_both_directions(masks, name, on)
        elif what == "node_drop":
            node_masks[name] = u >= rate
        elif what == "feature_mask":
            # The same dimensions zeroed for every node of the type.
            x = features[name]
            features[name] = x * (u >= rate).astype(x.dtype)[None, :]
        elif what == "edge_attr_mask":
            # Whole attribute rows, both directions.
            keep = (u >= rate)
            for k in (name, schema.reverse_key(name)):
                if k in edges:
                    ek = edges[k]
                    edges[k] = ek.replace(attributes=ek.attributes * keep.astype(ek.attributes.dtype)[:, None])

    # Node dropping: every incident edge, in every relation (hence both directions), masked.
    for key, e in graph.edges.items():
        src_t, _, dst_t = schema.split_key(key)
        if ("node_drop", src_t) in draws:
            masks[key] = masks[key] & node_masks[src_t][e.senders]
        if ("node_drop", dst_t) in draws:
            masks[key] = masks[key] & node_masks[dst_t][e.receivers]

    view = graph.replace(node_features=features, edges=edges)
    if return_node_masks:
        return view, masks, node_masks
    return view, masks


def _and_both_directions(masks, key, keep):
    masks = dict(masks)
    for k in (key, schema.reverse_key(key)):
        if k in masks:
            masks[k] = masks[k] & keep
    return masks


def _or_both_directions(masks, key, on):
    masks = dict(masks)
    for k in (key, schema.reverse_key(key)):
        if k in masks:
            masks[k] = masks[k] | on
    return masks


# ---- sampled subgraphs: a candidate pool per subgraph, outside jit ----------------------------------
def subgraph_candidate_counts(cfg: AugmentConfig, sampler) -> dict[str, int]:
    """``{forward relation key: K}`` candidate edges appended to every subgraph of ``sampler``.

    ``K = ceil(candidate_pool_factor * rate * edge_budget)``: static, so every subgraph has the
    same shapes. A relation between two full node types (copied whole into every subgraph) gets at
    most as many candidates as it has free pairs. Forward and reverse relations must have the same
    edge budget (one mask serves both directions).
    """
    graph = sampler.graph
    counts = {}
    for key in _augmented_relations(cfg, graph):
        rkey = schema.reverse_key(key)
        if rkey in sampler.edge_budget and sampler.edge_budget[rkey] != sampler.edge_budget[key]:
            raise ConfigError(f"sampler.edge_budget: '{key}' ({sampler.edge_budget[key]}) and '{rkey}' "
                              f"({sampler.edge_budget[rkey]}) must be equal for GraphCL augmentations")
    for key, rate in _rates(cfg.edge_add, graph).items():
        k = int(math.ceil(cfg.candidate_pool_factor * rate * sampler.edge_budget[key]))
        src_t, _, dst_t = schema.split_key(key)
        if src_t in sampler.full_types and dst_t in sampler.full_types:
            k = min(k, graph.num_nodes[src_t] * graph.num_nodes[dst_t] - graph.edges[key].num_edges)
        if k > 0:
            counts[key] = k
    return counts


def _augmented_relations(cfg: AugmentConfig, graph: HeteroGraph) -> set[str]:
    keys = set()
    for rates in (cfg.edge_drop, cfg.edge_add, cfg.edge_attr_mask):
        keys.update(_rates(rates, graph))
    return keys


def add_candidate_edges(subgraph, counts: Mapping[str, int], rng: np.random.Generator, meta):
    """``subgraph`` (a :class:`~jaxfood.graph.sampling.SampledSubgraph`) with ``counts[key]``
    candidate edges appended to each relation and, in the same order, to its reverse.

    The per-subgraph form of :func:`prepare_pretrain_graph`'s pool: a candidate joins a real
    source node of the subgraph to a real destination node (drawn in proportion to its degree in
    the subgraph) it is not joined to there, and copies the attribute row of a random edge of that
    destination. Where the subgraph has too few free pairs, the rest are padding edges (they join
    the padding nodes, which the encoder masks). ``edge_masks`` (real edges) is False on all
    candidates. ``meta`` is the subgraphs' shared static meta,
    with ``extra[CANDIDATES_KEY] = counts`` (:func:`augment` reads it). Arrays only; deterministic
    in ``rng``.
    """
    from jaxfood.graph.sampling import SampledSubgraph

    sub = subgraph.graph
    edges, edge_masks, edge_index = dict(sub.edges), dict(subgraph.edge_masks), dict(subgraph.edge_index)
    padding = sub.meta.extra.get("padding_node", {})
    for key, k in counts.items():
        src_t, _, dst_t = schema.split_key(key)
        e, real = sub.edges[key], np.asarray(subgraph.edge_masks[key])
        s, r, a = np.asarray(e.senders)[real], np.asarray(e.receivers)[real], np.asarray(e.attributes)[real]
        n_dst = sub.num_nodes[dst_t]
        real_src = np.nonzero(np.asarray(subgraph.node_mask[src_t]))[0]
        real_dst = np.nonzero(np.asarray(subgraph.node_mask[dst_t]))[0]
        degree = np.bincount(r, minlength=n_dst)
        weight = degree[real_dst].astype(np.float64)
        weight = weight / weight.sum() if weight.sum() > 0 else None
        existing = s.astype(np.int64) * n_dst + r
        chosen = np.zeros(0, np.int64)
        for _ in range(3):  # rejection rounds; a dense subgraph may leave the pool short
            need = k - chosen.size
            if need <= 0 or real_src.size == 0 or real_dst.size == 0:
                break
            m = 4 * need + 16
            codes = rng.choice(real_src, m) * n_dst + rng.choice(real_dst, m, p=weight)
            codes = codes[~np.isin(codes, existing) & ~np.isin(codes, chosen)]
            _, first = np.unique(codes, return_index=True)
            chosen = np.concatenate([chosen, codes[np.sort(first)][:need]])
        cs, cr = (chosen // n_dst).astype(np.int32), (chosen % n_dst).astype(np.int32)
        # Attribute row of a random real edge into the same destination.
        order = np.argsort(r, kind="stable")
        start = np.concatenate([[0], np.cumsum(degree)[:-1]])
        pick = start[cr] + np.floor(rng.random(cr.size) * degree[cr]).astype(np.int64)
        ca = (a[order[np.minimum(pick, max(order.size - 1, 0))]] if order.size
              else np.zeros((cr.size, a.shape[1]), np.float32))
        ca = np.where((degree[cr] > 0)[:, None], ca, 0.0)  # a destination without edges: zero attributes
        short = k - cs.size
        if short and (src_t not in padding or dst_t not in padding):
            raise ConfigError(f"augment.edge_add: '{key}' has only {cs.size} free pairs in a subgraph, "
                              f"{k} candidates needed (lower augment.candidate_pool_factor)")
        cs = np.concatenate([cs, np.full(short, padding.get(src_t, 0), np.int32)])
        cr = np.concatenate([cr, np.full(short, padding.get(dst_t, 0), np.int32)])
        ca = np.concatenate([np.asarray(ca, np.float32).reshape(-1, a.shape[1]),
                             np.zeros((short, a.shape[1]), np.float32)])
        for rel, snd, rcv in ((key, cs, cr), (schema.reverse_key(key), cr, cs)):
            if rel not in edges:
                continue
            old = edges[rel]
            edges[rel] = EdgeSet(senders=np.concatenate([np.asarray(old.senders), snd]),
                                 receivers=np.concatenate([np.asarray(old.receivers), rcv]),
                                 attributes=np.concatenate([np.asarray(old.attributes), ca]))
            # Candidates are not edges of the graph: off in the real-edge mask (edge counts), on
            # or off per view by augment(); padding candidates are also off in every view.
            edge_masks[rel] = np.concatenate([np.asarray(edge_masks[rel]), np.zeros(k, bool)])
            edge_index[rel] = np.concatenate([np.asarray(edge_index[rel]), np.full(k, -1, np.int32)])
    return SampledSubgraph(graph=sub.replace(edges=edges, meta=meta), node_index=subgraph.node_index,
                           node_mask=subgraph.node_mask, edge_masks=edge_masks, edge_index=edge_index,
                           seed_mask=subgraph.seed_mask)
