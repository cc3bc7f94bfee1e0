"""GraphCL augmentations: rates, static shapes, label edges, reverse consistency, candidate pool."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from conftest import make_toy_graph

from jaxfood.errors import ConfigError, GraphError
from jaxfood.graph import schema
from jaxfood.graph.hetero_graph import EdgeSet
from jaxfood.train.augment import (
    AugmentConfig,
    align_reverse_edges,
    augment,
    base_edge_masks,
    num_candidate_edges,
    prepare_pretrain_graph,
)

REV_CONTAINS = schema.reverse_key(schema.CONTAINS)
REV_HAS_NUTRIENT = schema.reverse_key(schema.HAS_NUTRIENT)
OFF = AugmentConfig(node_drop={}, edge_drop={}, edge_add={}, feature_mask={}, edge_attr_mask={})


@pytest.fixture(scope="module")
def big_graph():
    # ~4,000 contains edges, 64-dim molecule features: enough for rate estimates within a few %.
    return make_toy_graph(num_samples=200, num_molecules=300, num_foods=8, num_nutrients=30,
                          per_sample=20, molecule_dim=64, seed=1)


def _views(graph, cfg, n, seed=0, nodes=False):
    fn = jax.jit(lambda g, k: augment(g, k, cfg, return_node_masks=nodes))
    return [jax.device_get(fn(graph, k)) for k in jax.random.split(jax.random.key(seed), n)]


def test_label_edges_always_masked_and_shapes_static(big_graph):
    cfg = AugmentConfig(node_drop={"Sample": 0.3, "Molecule": 0.3, "Food": 0.3},
                        edge_drop={"contains_molecule": 0.5}, edge_add={"contains_molecule": 0.1},
                        feature_mask={"Molecule": 0.5}, edge_attr_mask={"has_nutrient": 0.5})
    graph = prepare_pretrain_graph(big_graph, cfg, seed=0)
    ref_shapes = jax.tree_util.tree_map(np.shape, graph)
    traces = []

    def f(g, k):
        traces.append(1)
        return augment(g, k, cfg)

    fn = jax.jit(f)
    # The pretraining graph has no label edges at all ...
    assert all(graph.edges[key].num_edges == 0 for key in schema.LABEL_RELATIONS)
    for k in jax.random.split(jax.random.key(3), 4):
        view, masks = fn(graph, k)
        assert jax.tree_util.tree_map(np.shape, view) == ref_shapes
        assert set(masks) == set(graph.edges)
        for key, m in masks.items():
            assert m.shape == (graph.edges[key].num_edges,) and m.dtype == bool
    assert len(traces) == 1
    # ... and any graph given to augment (e.g. a sampled subgraph) gets its label edges masked.
    for k in jax.random.split(jax.random.key(4), 3):
        _, masks = fn(big_graph, k)
        for key in schema.LABEL_RELATIONS:
            assert big_graph.edges[key].num_edges > 0
            assert not np.any(masks[key])
    # The un-augmented pretraining graph also never uses label edges or candidates.
    base = base_edge_masks(graph)
    assert not any(np.any(base[k]) for k in schema.LABEL_RELATIONS)
    k = num_candidate_edges(graph)[schema.CONTAINS]
    assert k > 0 and not np.any(np.asarray(base[schema.CONTAINS])[-k:])
    assert np.all(np.asarray(base[schema.CONTAINS])[:-k])


def test_all_rates_zero_is_identity(big_graph):
    graph = prepare_pretrain_graph(big_graph, OFF)
    view, masks = _views(graph, OFF, 1)[0]
    for key, m in masks.items():
        assert np.all(m) and (m.size > 0) == (key not in schema.LABEL_RELATIONS)
    np.testing.assert_array_equal(view.node_features["Molecule"], graph.node_features["Molecule"])
    np.testing.assert_array_equal(view.edges[schema.CONTAINS].attributes, graph.edges[schema.CONTAINS].attributes)


@pytest.mark.parametrize("rate", [0.2, 0.5])
def test_edge_removal_rate_and_reverse_consistency(big_graph, rate):
    cfg = dataclasses.replace(OFF, edge_drop={"contains_molecule": rate, "Food|has_nutrient|Nutrient": rate})
    graph = prepare_pretrain_graph(big_graph, cfg)
    removed = {schema.CONTAINS: [], schema.HAS_NUTRIENT: []}
    for _, masks in _views(graph, cfg, 5):
        for key in removed:
            removed[key].append(1.0 - masks[key].mean())
            np.testing.assert_array_equal(masks[key], masks[schema.reverse_key(key)])
        # Relations not configured are untouched.
        assert np.all(masks[schema.reverse_key(schema.CONTAINS)] == masks[schema.CONTAINS])
    assert abs(np.mean(removed[schema.CONTAINS]) - rate) < 0.02
    assert abs(np.mean(removed[schema.HAS_NUTRIENT]) - rate) < 0.03  # 240 edges x 5 views


def test_reverse_edges_are_aligned_before_masking(big_graph):
    # A builder may order the reverse relation differently: prepare_pretrain_graph re-pairs it.
    perm = np.random.default_rng(0).permutation(big_graph.edges[REV_CONTAINS].num_edges)
    rev = big_graph.edges[REV_CONTAINS]
    shuffled = big_graph.replace(edges={**big_graph.edges, REV_CONTAINS: EdgeSet(
        np.asarray(rev.senders)[perm], np.asarray(rev.receivers)[perm], np.asarray(rev.attributes)[perm])})
    aligned = align_reverse_edges(shuffled)
    fwd, back = aligned.edges[schema.CONTAINS], aligned.edges[REV_CONTAINS]
    np.testing.assert_array_equal(fwd.senders, back.receivers)
    np.testing.assert_array_equal(fwd.receivers, back.senders)
    np.testing.assert_array_equal(fwd.attributes, back.attributes)
    broken = shuffled.replace(edges={**shuffled.edges, REV_CONTAINS: EdgeSet(
        np.asarray(rev.senders)[:-1], np.asarray(rev.receivers)[:-1], np.asarray(rev.attributes)[:-1])})
    with pytest.raises(GraphError, match="rev_contains_molecule"):
        align_reverse_edges(broken)


@pytest.mark.parametrize("rate", [0.1, 0.3])
def test_node_dropping_rate_and_incident_edges(big_graph, rate):
    cfg = dataclasses.replace(OFF, node_drop={"Molecule": rate, "Sample": rate})
    graph = prepare_pretrain_graph(big_graph, cfg)
    dropped = []
    for _, masks, nodes in _views(graph, cfg, 6, nodes=True):
        dropped.append([1.0 - nodes["Molecule"].mean(), 1.0 - nodes["Sample"].mean()])
        assert np.all(nodes["Food"]) and np.all(nodes["Nutrient"])
        for key, e in graph.edges.items():
            if key in schema.LABEL_RELATIONS:
                continue
            src, _, dst = schema.split_key(key)
            expected = nodes[src][np.asarray(e.senders)] & nodes[dst][np.asarray(e.receivers)]
            np.testing.assert_array_equal(masks[key], expected, err_msg=key)
    # 300 molecules / 200 samples x 6 views
    np.testing.assert_allclose(np.mean(dropped, axis=0), [rate, rate], atol=0.03)


def test_edge_addition_from_candidate_pool(big_graph):
    rate = 0.05
    cfg = dataclasses.replace(OFF, edge_add={"contains_molecule": rate}, candidate_pool_factor=4.0)
    graph = prepare_pretrain_graph(big_graph, cfg, seed=0)
    e_real = big_graph.edges[schema.CONTAINS].num_edges
    k = num_candidate_edges(graph)[schema.CONTAINS]
    assert k == int(np.ceil(4.0 * rate * e_real))
    fwd, rev = graph.edges[schema.CONTAINS], graph.edges[REV_CONTAINS]
    assert fwd.num_edges == e_real + k and rev.num_edges == e_real + k
    # Candidates are new (sample, molecule) pairs, distinct, mirrored in the reverse relation.
    pairs = set(zip(np.asarray(fwd.senders[:e_real]).tolist(), np.asarray(fwd.receivers[:e_real]).tolist()))
    cand = list(zip(np.asarray(fwd.senders[e_real:]).tolist(), np.asarray(fwd.receivers[e_real:]).tolist()))
    assert len(set(cand)) == k and not (set(cand) & pairs)
    np.testing.assert_array_equal(rev.senders, fwd.receivers)
    np.testing.assert_array_equal(rev.attributes, fwd.attributes)
    # Each candidate's intensity is one seen on a real edge of the same molecule.
    real_r, real_a = np.asarray(fwd.receivers[:e_real]), np.asarray(fwd.attributes[:e_real, 0])
    for (_, mol), a in zip(cand[:50], np.asarray(fwd.attributes[e_real:, 0])[:50]):
        assert np.any(np.isclose(real_a[real_r == mol], a))
    # Original graph untouched, prepare is deterministic.
    assert big_graph.edges[schema.CONTAINS].num_edges == e_real
    again = prepare_pretrain_graph(big_graph, cfg, seed=0)
    np.testing.assert_array_equal(again.edges[schema.CONTAINS].senders, fwd.senders)
    added = []
    for _, masks in _views(graph, cfg, 8):
        m = masks[schema.CONTAINS]
        assert np.all(m[:e_real])  # no removal configured
        added.append(m[e_real:].sum() / e_real)
        np.testing.assert_array_equal(m, masks[REV_CONTAINS])
    assert abs(np.mean(added) - rate) < 0.01


def test_feature_masking_rate(big_graph):
    rate = 0.25
    cfg = dataclasses.replace(OFF, feature_mask={"Molecule": rate, "Food": rate})
    graph = prepare_pretrain_graph(big_graph, cfg)
    x = np.asarray(graph.node_features["Molecule"])
    zeroed = []
    for view, _ in _views(graph, cfg, 10):
        xv = view.node_features["Molecule"]
        dead = np.all(xv == 0, axis=0)
        zeroed.append(dead.mean())
        np.testing.assert_array_equal(xv[:, ~dead], x[:, ~dead])  # kept dims unchanged
    # 64 dims x 10 views
    assert abs(np.mean(zeroed) - rate) < 0.06


def test_edge_attribute_masking_rate(big_graph):
    rate = 0.3
    cfg = dataclasses.replace(OFF, edge_attr_mask={"contains_molecule": rate, "has_nutrient": rate})
    graph = prepare_pretrain_graph(big_graph, cfg)
    a = np.asarray(graph.edges[schema.CONTAINS].attributes)
    fracs = []
    for view, masks in _views(graph, cfg, 5):
        av = view.edges[schema.CONTAINS].attributes
        zero_rows = np.all(av == 0, axis=1)
        fracs.append(zero_rows.mean())
        np.testing.assert_array_equal(av[~zero_rows], a[~zero_rows])
        np.testing.assert_array_equal(view.edges[REV_CONTAINS].attributes, av)
        np.testing.assert_array_equal(view.edges[REV_HAS_NUTRIENT].attributes,
                                      view.edges[schema.HAS_NUTRIENT].attributes)
        assert np.all(masks[schema.CONTAINS])  # attribute masking masks no edge
    assert abs(np.mean(fracs) - rate) < 0.02


def test_config_errors(toy_graph):
    with pytest.raises(ConfigError, match="is_instance_of"):
        prepare_pretrain_graph(toy_graph, dataclasses.replace(OFF, edge_drop={"is_instance_of": 0.1}))
    with pytest.raises(ConfigError, match="augment.node_drop.Recipe"):
        prepare_pretrain_graph(toy_graph, dataclasses.replace(OFF, node_drop={"Recipe": 0.1}))
    with pytest.raises(ConfigError, match=r"augment.edge_drop.contains_molecule = 1.5"):
        prepare_pretrain_graph(toy_graph, dataclasses.replace(OFF, edge_drop={"contains_molecule": 1.5}))
    with pytest.raises(ConfigError, match="Nutrient"):
        prepare_pretrain_graph(toy_graph, dataclasses.replace(OFF, feature_mask={"Nutrient": 0.1}))


# ---- sampled subgraphs: a candidate pool per subgraph ------------------------------------------------
def _sampled_views(graph, augment_cfg, batch_size=4):
    from jaxfood.graph.sampling import SamplerConfig
    from jaxfood.models.encoder import EncoderConfig
    from jaxfood.train.pretrain import PretrainConfig, PretrainSampler

    enc = EncoderConfig(hidden_dim=8, num_heads=2, num_layers=1, embedding_dim=8,
                        input_modes={"Sample": "embedding", "Molecule": "both", "Food": "both"})
    return PretrainSampler(graph, PretrainConfig(encoder=enc, augment=augment_cfg),
                           SamplerConfig(batch_size=batch_size, seed=2))


def test_subgraph_candidates_join_real_nodes_not_yet_joined_in_both_directions():
    import math

    graph = make_toy_graph(num_samples=60, num_molecules=50, per_sample=8, seed=3)
    cfg = AugmentConfig(edge_add={"contains_molecule": 0.1})
    views = _sampled_views(graph, cfg)
    budget = views.sampler.edge_budget[schema.CONTAINS]
    k = views.counts[schema.CONTAINS]
    assert k == math.ceil(cfg.candidate_pool_factor * 0.1 * budget)
    shapes = None
    for step in range(4):
        sub = views.batch(step, shard=step % 2)
        g = sub.graph
        assert g.meta is views.meta and num_candidate_edges(g) == {schema.CONTAINS: k}
        now = jax.tree_util.tree_map(np.shape, sub)
        assert shapes is None or now == shapes  # static shapes: one compilation
        shapes = now
        assert all(g.edges[key].num_edges == 1 for key in schema.LABEL_RELATIONS)  # padding only
        fwd, rev = g.edges[schema.CONTAINS], g.edges[REV_CONTAINS]
        # One mask serves both directions: the reverse relation lists the same edges, swapped.
        np.testing.assert_array_equal(fwd.senders, rev.receivers)
        np.testing.assert_array_equal(fwd.receivers, rev.senders)
        np.testing.assert_array_equal(fwd.attributes, rev.attributes)
        on = sub.edge_masks[schema.CONTAINS]
        np.testing.assert_array_equal(on, sub.edge_masks[REV_CONTAINS])
        assert not on[-k:].any()  # candidates are not real edges
        real_s, real_r = fwd.senders[:-k][on[:-k]], fwd.receivers[:-k][on[:-k]]
        cand_s, cand_r = fwd.senders[-k:], fwd.receivers[-k:]
        assert sub.node_mask[schema.SAMPLE][cand_s].all() and sub.node_mask[schema.MOLECULE][cand_r].all()
        existing = set(zip(real_s.tolist(), real_r.tolist()))
        pairs = list(zip(cand_s.tolist(), cand_r.tolist()))
        assert len(set(pairs)) == k and not existing & set(pairs)
        # Attributes are copied from a real edge into the same molecule.
        for r_, attr in zip(cand_r.tolist(), fwd.attributes[-k:]):
            assert any(np.array_equal(attr, a) for a in fwd.attributes[:-k][on[:-k] & (fwd.receivers[:-k] == r_)])
    # Deterministic in (step, shard).
    a, b = views.batch(5, 1), views.batch(5, 1)
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(x, y)


def test_subgraph_candidates_fall_back_to_padding_when_the_subgraph_is_dense():
    # Two samples of 8 molecules among 10: few free pairs, many candidates asked.
    graph = make_toy_graph(num_samples=20, num_molecules=10, per_sample=8, seed=5)
    views = _sampled_views(graph, AugmentConfig(edge_add={"contains_molecule": 1.0}), batch_size=2)
    sub = views.batch(0)
    k = views.counts[schema.CONTAINS]
    pad = sub.graph.meta.extra["padding_node"]
    fwd = sub.graph.edges[schema.CONTAINS]
    on = fwd.senders[-k:] != pad[schema.SAMPLE]  # the candidates that join real nodes
    assert 0 < on.sum() < k
    assert sub.node_mask[schema.MOLECULE][fwd.receivers[-k:][on]].all()
    assert np.all(fwd.senders[-k:][~on] == pad[schema.SAMPLE])
    assert np.all(fwd.receivers[-k:][~on] == pad[schema.MOLECULE])
    # The padding candidates are off in every view (the encoder masks edges of padding nodes).
    from jaxfood.graph.sampling import padding_edge_masks

    assert not np.any(np.asarray(padding_edge_masks(sub.graph)[schema.CONTAINS])[-k:][~on])
