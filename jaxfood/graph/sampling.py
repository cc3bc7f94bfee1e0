"""Neighbour-sampled minibatches: seed samples -> padded k-hop heterogeneous subgraphs.

GraphSAGE-style layer-wise sampling (Hamilton, Ying & Leskovec, "Inductive Representation
Learning on Large Graphs", NeurIPS 2017) on the heterogeneous graph, in the form of PyG's
``NeighborLoader``: starting from a batch of seed ``Sample`` nodes, hop ``h`` draws, for every node
reached at hop ``h`` and every relation ending in its type, at most ``fanouts[relation][h]`` of its
incoming edges (without replacement). After ``num_hops`` hops (= encoder layers) a seed's output
embedding computed on the subgraph depends on exactly the sampled part of its receptive field.

Static shapes: every subgraph is padded to a node budget per type and an edge budget per relation,
computed once from the fan-outs (worst case, capped by the graph's counts) or configured, so a
training run compiles its step once. Padded nodes are one spare row per sampled type (all padded
edges point at it, and are off in ``edge_masks``).

Small node types (``full_types``, default ``Food`` and ``Nutrient``) are always present in full,
with local index = global index: food classes, ``food_nutrients`` and ``food_category`` keep their
meaning, and their nodes join the seeds as hop-0 frontier (so Food embeddings used by the
nutrition task see sampled instances). Relations between two full types are copied whole.

Symmetry: an edge drawn in one direction is also added in the reverse relation, so the subgraph
keeps the full graph's property that every relation has its exact reverse (a seed's
``contains_molecule`` edges are the molecules it drew, which the salient-molecule pooling reads).

Label hygiene: label edges (``is_instance_of`` and its reverse) that touch a seed sample are never
drawn, so no seed sees its own food through message passing. Non-seed samples in the subgraph get
``sample_split = -1``: they carry messages but are never supervised.

Determinism: the seeds of a step and the neighbour draws are functions of ``(seed, step, shard)``
only (``shard`` = global index of the subgraph among all devices of all processes), so a resumed
run sees the data an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import flax.struct
import numpy as np

from jaxfood.errors import ConfigError
from jaxfood.graph import schema
from jaxfood.graph.hetero_graph import SPLIT_CODES, EdgeSet, GraphMeta, HeteroGraph, mirror_permutation

Array = Any

#: Default fan-outs per relation and hop (hop 0 = edges into the seeds / full types).
DEFAULT_FANOUTS: dict[str, tuple[int, ...]] = {
    schema.reverse_key(schema.CONTAINS): (32, 16),  # a sample's molecules
    schema.CONTAINS: (8, 8),  # a molecule's samples
    schema.IS_SIMILAR_TO: (4, 4),
    schema.reverse_key(schema.IS_SIMILAR_TO): (4, 4),
    schema.IS_INSTANCE_OF: (4, 4),  # a food's (non-seed) instances
    schema.reverse_key(schema.IS_INSTANCE_OF): (1, 1),  # a non-seed sample's food
}


@dataclasses.dataclass(frozen=True)
class SamplerConfig:
    """How subgraphs are drawn.

    Attributes:
      batch_size: seed samples per subgraph (per device).
      num_hops: sampling depth; use the encoder's ``num_layers``.
      fanouts: relation key (``"Src|rel|Dst"``, or just ``rel``) -> incoming edges drawn per node,
        one number per hop (a single number applies to every hop). Relations not named use
        :data:`DEFAULT_FANOUTS`, else 0 (never sampled).
      full_types: node types always present in full (must include ``Food``).
      node_budget: optional fixed node budget per type (default: worst case of the fan-outs).
      edge_budget: optional fixed edge budget per relation key (default: worst case).
      seed: base of every random stream.
    """

    batch_size: int = 32
    num_hops: int = 2
    fanouts: dict[str, tuple[int, ...]] = dataclasses.field(default_factory=dict)
    full_types: tuple[str, ...] = (schema.FOOD, schema.NUTRIENT)
    node_budget: dict[str, int] = dataclasses.field(default_factory=dict)
    edge_budget: dict[str, int] = dataclasses.field(default_factory=dict)
    seed: int = 0


@flax.struct.dataclass
class SampledSubgraph:
    """One padded subgraph (local indices) and how it maps back to the full graph.

    Attributes:
      graph: the subgraph; ``meta.num_nodes`` are the budgets, node features, edges, sample labels
        and splits are local (``sample_split`` is -1 except for seeds).
      node_index: type -> [n_type] int32 global index of each local node (padding: 0), the
        ``node_index`` argument of the encoder (rows of the per-id embedding tables).
      node_mask: type -> [n_type] bool, real (True) vs padding nodes.
      edge_masks: relation -> [E_rel] bool, real (True) vs padding edges; pass to the encoder.
      edge_index: relation -> [E_rel] int32 global edge id (-1 for padding).
      seed_mask: [n_Sample] bool, the seed samples (the first ``batch_size`` local samples).
    """

    graph: HeteroGraph
    node_index: dict[str, Array]
    node_mask: dict[str, Array]
    edge_masks: dict[str, Array]
    edge_index: dict[str, Array]
    seed_mask: Array

    @property
    def num_real_edges(self) -> int:
        return int(sum(np.asarray(m).sum() for m in self.edge_masks.values()))


# ---- budgets ---------------------------------------------------------------------------------
def resolve_fanouts(config: SamplerConfig, relations: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """Relation key -> fan-out per hop (length ``num_hops``) for every relation of the graph."""
    by_rel = {}
    for key, value in config.fanouts.items():
        full = [k for k in relations if k == key or schema.split_key(k)[1] == key]
        if not full:
            raise ConfigError(f"sampler.fanouts: unknown relation '{key}' (expected one of {list(relations)})")
        for k in full:
            by_rel[k] = value
    out = {}
    for key in relations:
        value = by_rel.get(key, DEFAULT_FANOUTS.get(key, 0))
        hops = (int(value),) if isinstance(value, (int, np.integer)) else tuple(int(v) for v in value)
        if not hops or any(v < 0 for v in hops):
            raise ConfigError(f"sampler.fanouts['{key}'] = {value!r}: expected non-negative integers")
        if len(hops) < config.num_hops:  # the last value repeats for deeper hops
            hops = hops + (hops[-1],) * (config.num_hops - len(hops))
        out[key] = hops[: config.num_hops]
    return out


def compute_budgets(
    num_nodes: Mapping[str, int], num_edges: Mapping[str, int], fanouts: Mapping[str, Sequence[int]],
    batch_size: int, num_hops: int, full_types: Sequence[str],
) -> tuple[dict[str, int], dict[str, int]]:
    """Worst-case ``(node_budget, edge_budget)`` of a subgraph drawn with these fan-outs.

    Hop ``h`` draws at most ``frontier_h[dst] * fanout[r][h]`` edges of relation ``r`` (each node is
    in a frontier once, so also at most ``num_edges[r]`` over all hops); each drawn edge adds at
    most one new source node. Sampled types get one extra padding node.
    """
    full = set(full_types)
    frontier = {t: (num_nodes[t] if t in full else 0) for t in num_nodes}
    frontier[schema.SAMPLE] = min(batch_size, num_nodes[schema.SAMPLE])
    nodes = dict(frontier)
    edges = {k: 0 for k in num_edges}
    for k in num_edges:
        src, _, dst = schema.split_key(k)
        if src in full and dst in full:
            edges[k] = num_edges[k]
    for h in range(num_hops):
        new = {t: 0 for t in num_nodes}
        for k in num_edges:
            src, _, dst = schema.split_key(k)
            if src in full and dst in full:
                continue
            drawn = min(frontier[dst] * int(fanouts[k][h]), num_edges[k] - edges[k])
            edges[k] += drawn
            if src not in full:
                new[src] += drawn
        for t in num_nodes:
            new[t] = min(new[t], num_nodes[t] - nodes[t])
            nodes[t] += new[t]
        frontier = new
    # Each relation also holds the mirror of the edges drawn in its reverse.
    edges = {k: min(edges[k] + (edges[schema.reverse_key(k)] if schema.reverse_key(k) in edges
                                and not _both_full(k, full) else 0), num_edges[k])
             for k in num_edges}
    node_budget = {t: nodes[t] + (0 if t in full else 1) for t in num_nodes}
    # Seeds occupy a fixed block of batch_size slots, even when the graph has fewer samples.
    node_budget[schema.SAMPLE] += batch_size - min(batch_size, num_nodes[schema.SAMPLE])
    edge_budget = {k: max(edges[k], 1) for k in num_edges}
    return node_budget, edge_budget


def _both_full(key: str, full) -> bool:
    src, _, dst = schema.split_key(key)
    return src in full and dst in full


# ---- the sampler -----------------------------------------------------------------------------
class _CSR:
    """Incoming edges of one relation grouped by destination: edge ids ``order[indptr[d]:indptr[d+1]]``."""

    def __init__(self, receivers: np.ndarray, num_dst: int):
        receivers = np.asarray(receivers)
        self.order = np.argsort(receivers, kind="stable").astype(np.int64)
        counts = np.bincount(receivers, minlength=num_dst)
        self.indptr = np.zeros(num_dst + 1, np.int64)
        np.cumsum(counts, out=self.indptr[1:])


def _incoming_candidates(csr: _CSR, frontier: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(edge_ids, segment)``: all incoming edges of ``frontier`` nodes, grouped by frontier slot."""
    starts = csr.indptr[frontier]
    deg = csr.indptr[frontier + 1] - starts
    total = int(deg.sum())
    seg = np.repeat(np.arange(frontier.size), deg)
    offsets = np.arange(total) - np.repeat(np.cumsum(deg) - deg, deg)
    return csr.order[np.repeat(starts, deg) + offsets], seg


def _draw_per_segment(seg: np.ndarray, k: int, num_segments: int, rng: np.random.Generator) -> np.ndarray:
    """Positions of at most ``k`` uniformly drawn entries (without replacement) of each segment."""
    counts = np.bincount(seg, minlength=num_segments)
    if counts.size == 0 or counts.max(initial=0) <= k:
        return np.arange(seg.size)
    # Random order inside each segment (segments stay contiguous), keep the first k.
    order = np.argsort(seg + rng.random(seg.size), kind="stable")
    first = np.cumsum(counts) - counts
    rank = np.arange(seg.size) - np.repeat(first, counts)
    return np.sort(order[rank < k])


def _floyd_offsets(deg: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """[n, k] distinct offsets in ``[0, deg_i)`` per row, a uniform k-subset for each (all deg > k).

    Robert Floyd's algorithm (Bentley & Floyd, "A sample of brilliance", CACM 1987), vectorised
    over rows: k rounds instead of sorting every candidate edge of high-degree nodes.
    """
    out = np.empty((deg.size, k), np.int64)
    for i in range(k):
        top = deg - k + i  # round i draws from [0, top]
        t = rng.integers(0, top + 1)
        taken = (out[:, :i] == t[:, None]).any(axis=1)
        out[:, i] = np.where(taken, top, t)
    return out


def _sample_incoming(csr: _CSR, frontier: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Edge ids of at most ``k`` incoming edges per ``frontier`` node, uniform without replacement."""
    starts = csr.indptr[frontier]
    deg = csr.indptr[frontier + 1] - starts
    small = deg <= k
    s_start, s_deg = starts[small], deg[small]
    offsets = np.arange(int(s_deg.sum())) - np.repeat(np.cumsum(s_deg) - s_deg, s_deg)
    every = np.repeat(s_start, s_deg) + offsets
    big_start, big_deg = starts[~small], deg[~small]
    drawn = (big_start[:, None] + _floyd_offsets(big_deg, k, rng)).reshape(-1) if big_deg.size else every[:0]
    return csr.order[np.concatenate([every, drawn])]


class NeighbourSampler:
    """Draws padded subgraphs of ``graph`` around seed samples (see the module docstring).

    Build once per graph (CSR adjacency of every sampled relation is computed here), then call
    :meth:`sample` or :meth:`batch`. All subgraphs share one :class:`GraphMeta` object, so ``jit``
    sees the same static structure every step.
    """

    def __init__(self, graph: HeteroGraph, config: SamplerConfig = SamplerConfig(),
                 seed_pool: np.ndarray | None = None):
        graph = graph.to_numpy()
        self.graph, self.config = graph, config
        if schema.FOOD not in config.full_types:
            raise ConfigError("sampler.full_types: must include 'Food' (food classes index Food nodes)")
        if config.batch_size < 1 or config.num_hops < 1:
            raise ConfigError(f"sampler: batch_size ({config.batch_size}) and num_hops ({config.num_hops}) must be >= 1")
        self.full_types = tuple(t for t in graph.node_types if t in config.full_types)
        if schema.SAMPLE in self.full_types:
            raise ConfigError("sampler.full_types: 'Sample' cannot be a full type (samples are the seeds)")
        self.relations = tuple(graph.edges.keys())
        self.fanouts = resolve_fanouts(config, self.relations)
        num_edges = {k: e.num_edges for k, e in graph.edges.items()}
        nodes, edges = compute_budgets(graph.num_nodes, num_edges, self.fanouts, config.batch_size,
                                       config.num_hops, self.full_types)
        for t, n in config.node_budget.items():
            if t not in nodes:
                raise ConfigError(f"sampler.node_budget: unknown node type '{t}'")
            if t in self.full_types and int(n) != nodes[t]:
                raise ConfigError(f"sampler.node_budget['{t}'] = {n}: '{t}' is a full type with {nodes[t]} nodes")
            nodes[t] = int(n)
        for k, n in config.edge_budget.items():
            if k not in edges:
                raise ConfigError(f"sampler.edge_budget: unknown relation '{k}'")
            if _both_full(k, self.full_types) and int(n) != edges[k]:
                # Padding needs a padding node; relations between full types are copied whole.
                raise ConfigError(f"sampler.edge_budget['{k}'] = {n}: '{k}' joins two full types and "
                                  f"always holds its {edges[k]} edges")
            edges[k] = int(n)
        if nodes[schema.SAMPLE] < config.batch_size + 1:
            raise ConfigError(f"sampler.node_budget['Sample'] = {nodes[schema.SAMPLE]}: must exceed batch_size {config.batch_size}")
        self.node_budget, self.edge_budget = nodes, edges
        self._csr = {k: _CSR(graph.edges[k].receivers, graph.num_nodes[schema.split_key(k)[2]])
                     for k in self.relations if not self._is_full_relation(k)}
        # Edge id in relation `rev(k)` of each edge of relation `k` (identity for graphs built with
        # `with_reverse_edges`; found by matching (src, dst) pairs otherwise).
        self._mirror = {k: mirror_permutation(k, graph.edges[k], graph.edges[schema.reverse_key(k)])
                        for k in self.relations if schema.reverse_key(k) in graph.edges}
        if seed_pool is None:
            seed_pool = np.nonzero((np.asarray(graph.sample_split) == SPLIT_CODES["train"]) & (np.asarray(graph.sample_food) >= 0))[0]
        self.seed_pool = np.asarray(seed_pool, np.int64)
        if self.seed_pool.size == 0:
            raise ConfigError("sampler: the seed pool is empty (no training samples with a known food)")
        self.meta = GraphMeta(
            num_nodes=dict(nodes),
            node_ids={t: graph.meta.node_ids[t] for t in self.full_types if t in graph.meta.node_ids},
            food_categories=graph.meta.food_categories,
            nutrient_names=graph.meta.nutrient_names,
            nutrient_units=graph.meta.nutrient_units,
            attribute_names=graph.meta.attribute_names,
            feature_names=graph.meta.feature_names,
            normalisation=graph.meta.normalisation,
            extra=dict(graph.meta.extra, sampled=True, parent_num_nodes=dict(graph.num_nodes),
                       padding_node={t: nodes[t] - 1 for t in graph.node_types if t not in self.full_types}),
        )

    def _is_full_relation(self, key: str) -> bool:
        src, _, dst = schema.split_key(key)
        return src in self.full_types and dst in self.full_types

    # ---- seeds ---------------------------------------------------------------------------------
    def seeds_for(self, step: int, shard: int = 0) -> np.ndarray:
        """The seed samples of subgraph ``shard`` (global shard index) at ``step`` (global sample indices).

        Each step draws a fresh permutation of the seed pool from ``(seed, step)``; shard ``i`` takes
        the ``i``-th run of ``batch_size`` entries (wrapping), so shards of one step are disjoint
        whenever the pool is large enough. At most ``min(batch_size, pool size)`` seeds.
        """
        pool = self.seed_pool
        b = min(self.config.batch_size, pool.size)
        perm = np.random.default_rng([self.config.seed, 0x5EED, int(step)]).permutation(pool.size)
        pos = (int(shard) * b + np.arange(b)) % pool.size
        return pool[perm[pos]]

    def batch(self, step: int, shard: int = 0) -> SampledSubgraph:
        """The subgraph of ``shard`` at ``step``: deterministic in ``(config.seed, step, shard)``."""
        rng = np.random.default_rng([self.config.seed, 0xB17, int(step), int(shard)])
        return self.sample(self.seeds_for(step, shard), rng)

    # ---- one subgraph --------------------------------------------------------------------------
    def sample(self, seeds: np.ndarray, rng: np.random.Generator) -> SampledSubgraph:
        """The padded subgraph around ``seeds`` ([<= batch_size] distinct global sample indices)."""
        g, cfg = self.graph, self.config
        seeds = np.asarray(seeds, np.int64)
        if seeds.size > cfg.batch_size or np.unique(seeds).size != seeds.size:
            raise ValueError(f"sample: expected at most {cfg.batch_size} distinct seeds, got {seeds.size}")
        num_nodes = g.num_nodes
        is_seed = np.zeros(num_nodes[schema.SAMPLE], bool)
        is_seed[seeds] = True
        # Local nodes per type, in order of arrival; `local_of` maps global -> local (-1 absent).
        members: dict[str, list[np.ndarray]] = {t: [] for t in g.node_types}
        local_of = {t: np.full(num_nodes[t], -1, np.int64) for t in g.node_types}
        count = {t: 0 for t in g.node_types}

        def admit(t: str, nodes: np.ndarray) -> np.ndarray:
            new = np.unique(nodes[local_of[t][nodes] < 0])
            local_of[t][new] = count[t] + np.arange(new.size)
            count[t] += new.size
            members[t].append(new)
            return new

        # Seed slots come first and are fixed: padded seed slots are taken by nothing.
        local_of[schema.SAMPLE][seeds] = np.arange(seeds.size)
        members[schema.SAMPLE].append(seeds)
        count[schema.SAMPLE] = cfg.batch_size
        frontier = {t: np.zeros(0, np.int64) for t in g.node_types}
        frontier[schema.SAMPLE] = seeds
        for t in self.full_types:
            admit(t, np.arange(num_nodes[t]))
            frontier[t] = np.arange(num_nodes[t])

        picked: dict[str, list[np.ndarray]] = {k: [] for k in self.relations}
        for h in range(cfg.num_hops):
            new_frontier = {t: [] for t in g.node_types}
            for key in self.relations:
                if self._is_full_relation(key):
                    continue
                src, _, dst = schema.split_key(key)
                k = self.fanouts[key][h]
                if k == 0 or frontier[dst].size == 0:
                    continue
                if key in schema.LABEL_RELATIONS:
                    # Never draw a label edge that touches a seed sample (either direction).
                    eids, seg = _incoming_candidates(self._csr[key], frontier[dst])
                    e = g.edges[key]
                    sample_end = e.senders[eids] if src == schema.SAMPLE else e.receivers[eids]
                    keep = ~is_seed[sample_end]
                    eids, seg = eids[keep], seg[keep]
                    eids = eids[_draw_per_segment(seg, k, frontier[dst].size, rng)]
                else:
                    eids = _sample_incoming(self._csr[key], frontier[dst], k, rng)
                picked[key].append(eids)
                if src not in self.full_types:
                    new_frontier[src].append(g.edges[key].senders[eids].astype(np.int64))
            frontier = {}
            for t in g.node_types:
                cand = np.concatenate(new_frontier[t]) if new_frontier[t] else np.zeros(0, np.int64)
                frontier[t] = admit(t, cand) if t not in self.full_types else np.zeros(0, np.int64)
        return self._assemble(members, local_of, count, picked, seeds)

    def _assemble(self, members, local_of, count, picked, seeds) -> SampledSubgraph:
        g, cfg = self.graph, self.config
        node_index, node_mask = {}, {}
        for t in g.node_types:
            budget = self.node_budget[t]
            if count[t] > budget - (0 if t in self.full_types else 1):
                raise ConfigError(f"sampler.node_budget['{t}'] = {budget}: a subgraph needs {count[t]} nodes "
                                  "(plus one padding node); raise it or lower the fan-outs")
            idx = np.zeros(budget, np.int32)
            mask = np.zeros(budget, bool)
            if t == schema.SAMPLE:
                idx[: seeds.size] = seeds
                mask[: seeds.size] = True
                rest = np.concatenate(members[t][1:]) if len(members[t]) > 1 else np.zeros(0, np.int64)
                idx[cfg.batch_size: cfg.batch_size + rest.size] = rest
                mask[cfg.batch_size: cfg.batch_size + rest.size] = True
            else:
                allm = np.concatenate(members[t]) if members[t] else np.zeros(0, np.int64)
                idx[: allm.size] = allm
                mask[: allm.size] = True
            node_index[t], node_mask[t] = idx, mask

        edges, edge_masks, edge_index = {}, {}, {}
        for key in self.relations:
            src, _, dst = schema.split_key(key)
            e = g.edges[key]
            if self._is_full_relation(key):
                eids = np.arange(e.num_edges)
            else:
                own = picked[key]
                rkey = schema.reverse_key(key)
                mirrored = [self._mirror[rkey][x] for x in picked.get(rkey, [])] if rkey in self._mirror else []
                eids = np.unique(np.concatenate(own + mirrored)) if own or mirrored else np.zeros(0, np.int64)
            budget = self.edge_budget[key]
            if eids.size > budget:
                raise ConfigError(f"sampler.edge_budget['{key}'] = {budget}: a subgraph needs {eids.size} edges; "
                                  "raise it or lower the fan-outs")
            # Padding edges join the padding nodes (last row) and are off in the mask.
            senders = np.full(budget, self.node_budget[src] - 1, np.int32)
            receivers = np.full(budget, self.node_budget[dst] - 1, np.int32)
            senders[: eids.size] = local_of[src][e.senders[eids]]
            receivers[: eids.size] = local_of[dst][e.receivers[eids]]
            attributes = np.zeros((budget, e.attributes.shape[1]), np.float32)
            attributes[: eids.size] = e.attributes[eids]
            mask = np.zeros(budget, bool)
            mask[: eids.size] = True
            gidx = np.full(budget, -1, np.int32)
            gidx[: eids.size] = eids
            edges[key] = EdgeSet(senders=senders, receivers=receivers, attributes=attributes)
            edge_masks[key], edge_index[key] = mask, gidx

        node_features = {}
        for t, x in g.node_features.items():
            feats = np.asarray(x)[node_index[t]].astype(np.float32)
            feats[~node_mask[t]] = 0.0
            node_features[t] = feats
        s_idx, s_mask = node_index[schema.SAMPLE], node_mask[schema.SAMPLE]
        seed_mask = np.zeros(self.node_budget[schema.SAMPLE], bool)
        seed_mask[: seeds.size] = True
        sample_food = np.where(s_mask, np.asarray(g.sample_food)[s_idx], -1).astype(np.int32)
        sample_split = np.where(seed_mask, np.asarray(g.sample_split)[s_idx], -1).astype(np.int32)
        food_nutrients = np.asarray(g.food_nutrients, np.float32)
        food_category = np.asarray(g.food_category, np.int32)
        sub = HeteroGraph(node_features=node_features, edges=edges, sample_food=sample_food,
                          sample_split=sample_split, food_nutrients=food_nutrients,
                          food_category=food_category, meta=self.meta)
        return SampledSubgraph(graph=sub, node_index=node_index, node_mask=node_mask,
                               edge_masks=edge_masks, edge_index=edge_index, seed_mask=seed_mask)


def padding_edge_masks(graph: HeteroGraph) -> dict[str, Array]:
    """Relation -> [E] bool, False on the padding edges of a sampled subgraph ({} for a full graph).

    Padding edges are recognisable from the graph alone: they, and only they, touch the padding
    node (last row) of a sampled node type. Works inside ``jit`` (the padding rows are static).
    A step that receives only a graph (no ``SampledSubgraph``) can mask padding with this.
    """
    padding = graph.meta.extra.get("padding_node") if graph.meta.extra.get("sampled") else None
    if not padding:
        return {}
    masks = {}
    for key, e in graph.edges.items():
        src, _, dst = schema.split_key(key)
        mask = None
        for idx, t in ((e.senders, src), (e.receivers, dst)):
            if t in padding:
                m = idx != padding[t]
                mask = m if mask is None else mask & m
        if mask is not None:
            masks[key] = mask
    return masks


def mask_padding(graph: HeteroGraph, edge_masks: Mapping[str, Array] | None = None) -> Mapping[str, Array] | None:
    """``edge_masks`` (relation -> [E] bool, missing: all on) AND :func:`padding_edge_masks`.

    The one padding rule of the model boundary: the encoder and the task heads call this on every
    graph they get, so a sampled subgraph's padding edges are off whoever calls them. On a full
    graph ``edge_masks`` comes back unchanged.
    """
    padding = padding_edge_masks(graph)
    if not padding:
        return edge_masks
    masks = dict(padding)
    for key, m in (edge_masks or {}).items():
        masks[key] = masks[key] & m if key in masks else m
    return masks


def mask_relation_padding(graph: HeteroGraph, key: str, mask: Array | None = None) -> Array | None:
    """:func:`mask_padding` for one relation: [E] ``mask`` (None: all on) AND its real edges."""
    padding = padding_edge_masks(graph).get(key)
    if padding is None:
        return mask
    return padding if mask is None else mask & padding
