import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_toy_graph

from jaxfood.errors import GraphError
from jaxfood.graph import schema
from jaxfood.graph.hetero_graph import (
    EdgeSet,
    align_reverse_edges,
    load_graph,
    mirror_permutation,
    save_graph,
    summary,
    validate,
)
from jaxfood.graph.splits import restrict_label_edges, samples_reaching_own_food, stratified_split


def test_every_relation_has_its_reverse(toy_graph):
    for key in schema.FORWARD_RELATIONS:
        if key in toy_graph.edges:
            rev = toy_graph.edges[schema.reverse_key(key)]
            fwd = toy_graph.edges[key]
            np.testing.assert_array_equal(rev.senders, fwd.receivers)
            np.testing.assert_array_equal(rev.attributes, fwd.attributes)


def test_graph_is_a_pytree_through_jit(toy_graph):
    @jax.jit
    def total_intensity(g):
        return jnp.sum(g.edges[schema.CONTAINS].attributes)

    assert np.isclose(float(total_intensity(toy_graph)), toy_graph.edges[schema.CONTAINS].attributes.sum(), atol=1e-4)
    leaves = jax.tree_util.tree_leaves(toy_graph)
    assert all(hasattr(x, "shape") for x in leaves)


def test_save_load_round_trip_is_exact(tmp_path):
    g = make_toy_graph(similar=True)
    save_graph(g, tmp_path / "g")
    h = load_graph(tmp_path / "g")
    assert jax.tree_util.tree_structure(g.replace(meta=h.meta)) == jax.tree_util.tree_structure(h)
    for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(h)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    assert h.meta.node_ids == g.meta.node_ids and h.meta.num_nodes == g.meta.num_nodes
    s = summary(h)
    assert s["nodes"]["Molecule"] == 40 and s["edges"][schema.CONTAINS] == g.edges[schema.CONTAINS].num_edges
    assert sum(s["splits"].values()) == 30


def test_graphs_alike_in_everything_static_share_jitted_programs(tmp_path):
    """The same graph loaded twice: two GraphMeta objects, equal by content, one trace of a jitted
    function for both; a graph whose static description differs (here the intensity statistics,
    which traced code reads as constants) gets a program of its own."""
    import dataclasses

    save_graph(make_toy_graph(), tmp_path / "g")
    a, b = load_graph(tmp_path / "g"), load_graph(tmp_path / "g")
    assert a.meta is not b.meta and a.meta == b.meta and hash(a.meta) == hash(b.meta)
    traces = []

    @jax.jit
    def total(g):
        traces.append(1)
        return jnp.sum(g.edges[schema.CONTAINS].attributes)

    assert float(total(a)) == float(total(b))
    assert len(traces) == 1
    stats = {"transform": "log1p", "mean": [1.0] * 40, "std": [2.0] * 40}
    c = a.replace(meta=dataclasses.replace(a.meta, normalisation={"contains_molecule": stats}))
    assert c.meta != a.meta and c.meta != "not a meta"
    total(c)
    assert len(traces) == 2


@pytest.mark.parametrize("breakage, message", [
    (lambda e: EdgeSet(e.senders, e.receivers.at[0].set(999) if hasattr(e.receivers, "at") else np.where(np.arange(len(e.receivers)) == 0, 999, e.receivers), e.attributes), "out of range"),
    (lambda e: EdgeSet(e.senders, e.receivers, np.full_like(e.attributes, np.nan)), "NaN"),
    (lambda e: EdgeSet(e.senders, e.receivers[:-1], e.attributes), "equal 1-D shapes"),
    (lambda e: EdgeSet(e.senders[:0], e.receivers[:0], e.attributes[:0]), "empty"),
])
def test_validation_errors_name_the_relation(toy_graph, breakage, message):
    edges = dict(toy_graph.edges)
    edges[schema.CONTAINS] = breakage(edges[schema.CONTAINS])
    with pytest.raises(GraphError, match=message) as info:
        validate(toy_graph.replace(edges=edges))
    assert schema.CONTAINS in str(info.value)


def test_validation_rejects_unknown_types(toy_graph):
    edges = dict(toy_graph.edges)
    edges["Sample|eats|Food"] = edges[schema.IS_INSTANCE_OF]
    with pytest.raises(GraphError, match="unknown relation 'Sample\\|eats\\|Food'"):
        validate(toy_graph.replace(edges=edges))


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(GraphError, match="graph.json: not found"):
        load_graph(tmp_path)
    save_graph(make_toy_graph(), tmp_path / "g")
    (tmp_path / "g" / "graph.json").write_text("{not json")
    with pytest.raises(GraphError, match="graph.json: not valid JSON"):
        load_graph(tmp_path / "g")


def test_stratified_split_is_seeded_and_stratified():
    food = np.repeat(np.arange(6), 20)
    a, b, c = stratified_split(food, seed=1), stratified_split(food, seed=1), stratified_split(food, seed=2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    for f in range(6):
        counts = np.bincount(a[food == f], minlength=3)
        assert counts.tolist() == [14, 3, 3]


def test_no_held_out_sample_reaches_its_food(toy_graph):
    assert (toy_graph.sample_split != 0).sum() > 0
    label = toy_graph.edges[schema.IS_INSTANCE_OF]
    assert set(np.asarray(label.senders)) == set(np.nonzero(np.asarray(toy_graph.sample_split) == 0)[0])
    assert samples_reaching_own_food(toy_graph).size == 0
    # The check itself can fail: give every sample a label edge and the held-out ones leak.
    leaky = restrict_label_edges(toy_graph.replace(sample_split=np.zeros_like(toy_graph.sample_split)))
    leaky = leaky.replace(sample_split=toy_graph.sample_split)
    assert samples_reaching_own_food(leaky).size == int((np.asarray(toy_graph.sample_split) != 0).sum())


def test_mirror_permutation_pairs_shuffled_and_parallel_edges():
    # Forward edges with a parallel pair (0->1 twice, different attributes); the reverse is shuffled.
    fwd = EdgeSet(senders=np.array([0, 0, 2, 1]), receivers=np.array([1, 1, 0, 2]),
                  attributes=np.array([[1.0], [2.0], [3.0], [4.0]], np.float32))
    order = np.array([3, 1, 0, 2])
    rev = EdgeSet(senders=fwd.receivers[order], receivers=fwd.senders[order], attributes=fwd.attributes[order])
    perm = mirror_permutation("A|r|B", fwd, rev)
    np.testing.assert_array_equal(rev.senders[perm], fwd.receivers)
    np.testing.assert_array_equal(rev.receivers[perm], fwd.senders)
    np.testing.assert_array_equal(rev.attributes[perm], fwd.attributes)  # the parallel pair is not swapped


def test_mirror_permutation_rejects_a_non_mirror():
    fwd = EdgeSet(senders=np.array([0, 1]), receivers=np.array([1, 2]), attributes=np.zeros((2, 0), np.float32))
    rev = EdgeSet(senders=np.array([1, 0]), receivers=np.array([0, 1]), attributes=np.zeros((2, 0), np.float32))
    with pytest.raises(GraphError, match="not relation 'A|r|B' reversed"):
        mirror_permutation("A|r|B", fwd, rev)
    with pytest.raises(GraphError, match="has 1 edges"):
        mirror_permutation("A|r|B", fwd, EdgeSet(rev.senders[:1], rev.receivers[:1], rev.attributes[:1]))


def test_align_reverse_edges_keeps_the_encoder_output(toy_graph):
    from jaxfood.models.encoder import EncoderConfig, init_encoder, make_encoder

    rkey = schema.reverse_key(schema.CONTAINS)
    rev = toy_graph.edges[rkey]
    order = np.random.default_rng(0).permutation(np.asarray(rev.senders).size)
    edges = dict(toy_graph.edges)
    edges[rkey] = EdgeSet(np.asarray(rev.senders)[order], np.asarray(rev.receivers)[order],
                          np.asarray(rev.attributes)[order])
    shuffled = toy_graph.replace(edges=edges)
    aligned = align_reverse_edges(shuffled)
    fwd = aligned.edges[schema.CONTAINS]
    np.testing.assert_array_equal(np.asarray(aligned.edges[rkey].senders), np.asarray(fwd.receivers))
    np.testing.assert_array_equal(np.asarray(aligned.edges[rkey].receivers), np.asarray(fwd.senders))
    encoder = make_encoder(toy_graph, EncoderConfig(hidden_dim=8, num_heads=2, num_layers=1, embedding_dim=8))
    params = {"params": init_encoder(encoder, jax.random.key(0), shuffled)}
    apply = jax.jit(encoder.apply)  # the two graphs have the same shapes: one program
    a, b = apply(params, shuffled), apply(params, aligned)
    for t in a:
        np.testing.assert_allclose(np.asarray(a[t]), np.asarray(b[t]), atol=1e-5)
