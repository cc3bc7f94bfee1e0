"""Neighbour sampling: static padded shapes, label hygiene, faithful subgraphs, determinism."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_toy_graph

from jaxfood.errors import ConfigError
from jaxfood.graph import schema
from jaxfood.graph.sampling import (
    _CSR,
    NeighbourSampler,
    SamplerConfig,
    _draw_per_segment,
    _sample_incoming,
    compute_budgets,
    padding_edge_masks,
)
from jaxfood.models.encoder import EncoderConfig, init_encoder, make_encoder

ALL = 10_000  # a fan-out above every degree: the whole k-hop neighbourhood


@pytest.fixture(scope="module")
def graph():
    return make_toy_graph(num_samples=60, num_molecules=50, per_sample=8, similar=True, seed=3)


def _shapes(tree):
    return [(x.shape, x.dtype) for x in jax.tree_util.tree_leaves(tree)]


def test_padded_shapes_never_change_and_the_step_compiles_once(graph):
    sampler = NeighbourSampler(graph, SamplerConfig(batch_size=6, seed=1))
    traces = []

    @jax.jit
    def total(sub):
        traces.append(1)
        return sum(jnp.sum(jnp.where(m, 1, 0)) for m in sub.edge_masks.values())

    first = sampler.batch(0)
    reference = _shapes(first)
    real_edges = set()
    for step in range(25):
        sub = sampler.batch(step, shard=step % 3)
        assert _shapes(sub) == reference
        assert sub.graph.meta is first.graph.meta  # same static part: jit cache hit
        assert int(total(sub)) == sub.num_real_edges
        real_edges.add(sub.num_real_edges)
    assert len(traces) == 1
    assert len(real_edges) > 1  # the draws do vary; only the padding keeps shapes fixed
    for t, n in sampler.node_budget.items():
        assert first.graph.num_nodes[t] == n == first.node_index[t].shape[0]


def test_no_seed_sample_sees_its_own_label_edge(graph):
    sampler = NeighbourSampler(graph, SamplerConfig(batch_size=8, fanouts={"is_instance_of": ALL,
                                                                           "rev_is_instance_of": ALL}))
    fwd, rev = schema.IS_INSTANCE_OF, schema.reverse_key(schema.IS_INSTANCE_OF)
    seen_label_edges = 0
    for step in range(20):
        sub = sampler.batch(step)
        seeds = np.nonzero(sub.seed_mask)[0]
        assert seeds.size == 8
        # Any label edge, real or padding, that touches a seed sample is a leak.
        for key, sample_end in ((fwd, sub.graph.edges[fwd].senders), (rev, sub.graph.edges[rev].receivers)):
            assert not np.isin(sample_end, seeds).any(), (step, key)
            seen_label_edges += int(sub.edge_masks[key].sum())
        # Seeds are supervised; the other samples only carry messages.
        split = sub.graph.sample_split
        assert np.all(split[sub.seed_mask] == 0) and np.all(split[~sub.seed_mask] == -1)
    assert seen_label_edges > 0  # label edges of non-seed samples are drawn


def test_subgraph_edges_are_edges_of_the_graph_with_their_attributes(graph):
    sampler = NeighbourSampler(graph, SamplerConfig(batch_size=5))
    sub = sampler.batch(7)
    for key, e in sub.graph.edges.items():
        src, _, dst = schema.split_key(key)
        m = sub.edge_masks[key]
        gid = sub.edge_index[key][m]
        parent = graph.edges[key]
        np.testing.assert_array_equal(sub.node_index[src][e.senders[m]], np.asarray(parent.senders)[gid])
        np.testing.assert_array_equal(sub.node_index[dst][e.receivers[m]], np.asarray(parent.receivers)[gid])
        np.testing.assert_array_equal(e.attributes[m], np.asarray(parent.attributes)[gid])
        assert np.all(sub.node_mask[src][e.senders[m]]) and np.all(sub.node_mask[dst][e.receivers[m]])
        assert np.all(sub.edge_index[key][~m] == -1)
        # Every relation holds exactly the reverse of its reverse relation, as in the full graph.
        r = sub.graph.edges[schema.reverse_key(key)]
        rm = sub.edge_masks[schema.reverse_key(key)]
        assert sorted(zip(e.senders[m], e.receivers[m])) == sorted(zip(r.receivers[rm], r.senders[rm]))
    # Padding is recognisable from the graph alone (a step that only gets the graph can mask it).
    derived = padding_edge_masks(sub.graph)
    for key, m in sub.edge_masks.items():
        np.testing.assert_array_equal(derived.get(key, np.ones_like(m)), m)
    # Full node types keep global indices: food classes and food_nutrients keep their meaning.
    np.testing.assert_array_equal(sub.node_index[schema.FOOD], np.arange(graph.num_nodes[schema.FOOD]))
    sf = np.asarray(graph.sample_food)[sub.node_index[schema.SAMPLE]]
    np.testing.assert_array_equal(sub.graph.sample_food[sub.node_mask[schema.SAMPLE]], sf[sub.node_mask[schema.SAMPLE]])
    np.testing.assert_array_equal(sub.graph.food_nutrients, graph.food_nutrients)


def test_with_full_fanouts_seed_embeddings_equal_full_graph_embeddings(graph):
    """Sampling the whole 2-hop neighbourhood reproduces full-graph message passing for the seeds
    (with their label edges off) and for the foods, through node_index and the edge masks."""
    fanouts = {k: ALL for k in graph.edges}
    sampler = NeighbourSampler(graph, SamplerConfig(batch_size=6, num_hops=2, fanouts=fanouts))
    cfg = EncoderConfig(hidden_dim=8, num_heads=2, num_layers=2, embedding_dim=8, dropout=0.0,
                        input_modes={"Sample": "embedding", "Molecule": "both", "Food": "both"})
    encoder = make_encoder(graph, cfg)
    params = init_encoder(encoder, jax.random.key(0), graph)
    apply = jax.jit(encoder.apply)  # one program per graph, not one per operation
    sub = sampler.batch(2)
    seeds = sub.node_index[schema.SAMPLE][sub.seed_mask]
    local = apply({"params": params}, sub.graph, edge_masks=sub.edge_masks, node_index=sub.node_index)
    hidden = np.zeros(graph.num_nodes[schema.SAMPLE], bool)
    hidden[seeds] = True
    fwd, rev = graph.edges[schema.IS_INSTANCE_OF], graph.edges[schema.reverse_key(schema.IS_INSTANCE_OF)]
    label_masks = {schema.IS_INSTANCE_OF: ~hidden[np.asarray(fwd.senders)],
                   schema.reverse_key(schema.IS_INSTANCE_OF): ~hidden[np.asarray(rev.receivers)]}
    full = apply({"params": params}, graph, edge_masks=label_masks)
    np.testing.assert_allclose(local[schema.SAMPLE][sub.seed_mask], full[schema.SAMPLE][seeds], atol=1e-5)
    np.testing.assert_allclose(local[schema.FOOD], full[schema.FOOD], atol=1e-5)


def test_draws_are_uniform_without_replacement_and_capped_by_the_fanout():
    rng = np.random.default_rng(0)
    seg = np.repeat(np.arange(3), [2, 5, 10])
    counts = np.zeros(seg.size)
    for _ in range(3000):
        pos = _draw_per_segment(seg, 3, 3, rng)
        assert np.array_equal(np.bincount(seg[pos], minlength=3), [2, 3, 3])
        assert np.unique(pos).size == pos.size
        counts[pos] += 1
    # Every edge of a segment of degree d is drawn with probability min(1, k/d).
    np.testing.assert_allclose(counts / 3000, np.repeat([1.0, 3 / 5, 3 / 10], [2, 5, 10]), atol=0.04)


def test_floyd_draws_of_high_degree_nodes_are_uniform_k_subsets():
    receivers = np.repeat(np.arange(4), [1, 3, 6, 40])  # node 3: 40 incoming edges
    csr = _CSR(receivers, 4)
    rng = np.random.default_rng(1)
    counts = np.zeros(receivers.size)
    for _ in range(4000):
        eids = _sample_incoming(csr, np.array([0, 1, 2, 3]), 4, rng)
        assert np.unique(eids).size == eids.size
        np.testing.assert_array_equal(np.bincount(receivers[eids], minlength=4), [1, 3, 4, 4])
        counts[eids] += 1
    expected = np.repeat([1.0, 1.0, 4 / 6, 4 / 40], [1, 3, 6, 40])
    np.testing.assert_allclose(counts / 4000, expected, atol=0.035)
    # Pairs are uniform too (a k-subset, not k independent draws): P(both of two edges) = k(k-1)/(d(d-1)).
    both = 0
    for _ in range(4000):
        eids = set(_sample_incoming(csr, np.array([2]), 4, rng).tolist())
        both += {4, 5} <= eids
    assert abs(both / 4000 - 4 * 3 / (6 * 5)) < 0.03


def test_budgets_are_the_worst_case_of_the_fanouts():
    num_nodes = {"Sample": 1000, "Molecule": 5000, "Food": 10, "Nutrient": 4}
    keys = [schema.CONTAINS, schema.reverse_key(schema.CONTAINS), schema.IS_INSTANCE_OF,
            schema.reverse_key(schema.IS_INSTANCE_OF), schema.HAS_NUTRIENT, schema.reverse_key(schema.HAS_NUTRIENT)]
    num_edges = dict(zip(keys, [50_000, 50_000, 700, 700, 40, 40]))
    fanouts = {k: (0, 0) for k in keys}
    fanouts[schema.reverse_key(schema.CONTAINS)] = (10, 10)  # sample <- molecules
    fanouts[schema.CONTAINS] = (3, 3)  # molecule <- samples
    nodes, edges = compute_budgets(num_nodes, num_edges, fanouts, batch_size=4, num_hops=2,
                                   full_types=("Food", "Nutrient"))
    # hop 0: 4 seeds draw 40 molecules; hop 1: 40 molecules draw 120 samples.
    assert nodes == {"Sample": 4 + 120 + 1, "Molecule": 40 + 1, "Food": 10, "Nutrient": 4}
    assert edges[schema.reverse_key(schema.CONTAINS)] == 40 + 120  # own draws + mirrored reverse draws
    assert edges[schema.CONTAINS] == 160 and edges[schema.HAS_NUTRIENT] == 40


def test_seeds_are_deterministic_disjoint_across_shards_and_vary_with_the_step(graph):
    sampler = NeighbourSampler(graph, SamplerConfig(batch_size=4, seed=5))
    a = [sampler.seeds_for(3, shard) for shard in range(4)]
    assert np.unique(np.concatenate(a)).size == 16
    assert all(np.array_equal(x, sampler.seeds_for(3, i)) for i, x in enumerate(a))
    assert not np.array_equal(a[0], sampler.seeds_for(4, 0))
    pool = set(sampler.seed_pool.tolist())
    assert set(np.concatenate(a).tolist()) <= pool
    assert all(np.asarray(graph.sample_split)[i] == 0 for i in pool)
    x, y = sampler.batch(9, 2), sampler.batch(9, 2)
    for u, v in zip(jax.tree_util.tree_leaves(x), jax.tree_util.tree_leaves(y)):
        np.testing.assert_array_equal(u, v)


def test_bad_sampler_settings_are_config_errors(graph):
    with pytest.raises(ConfigError, match="sampler.fanouts: unknown relation 'eats'"):
        NeighbourSampler(graph, SamplerConfig(fanouts={"eats": 3}))
    with pytest.raises(ConfigError, match="must include 'Food'"):
        NeighbourSampler(graph, SamplerConfig(full_types=("Nutrient",)))
    with pytest.raises(ConfigError, match="joins two full types"):
        NeighbourSampler(graph, SamplerConfig(edge_budget={schema.HAS_NUTRIENT: 1000}))
    with pytest.raises(ConfigError, match=r"node_budget\['Molecule'\] = 3"):
        NeighbourSampler(graph, SamplerConfig(batch_size=4, node_budget={"Molecule": 3})).batch(0)
