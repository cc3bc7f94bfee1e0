"""HeteroGATEncoder: shapes, input modes, dropout, edge masks, attention, dtypes, jit, node_index."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_toy_graph

from jaxfood.errors import ConfigError, GraphError
from jaxfood.graph import schema
from jaxfood.graph.hetero_graph import EdgeSet
from jaxfood.models.encoder import EncoderConfig, init_encoder, make_encoder

MODES = {"Sample": "shared", "Molecule": "both", "Food": "both", "Nutrient": "embedding"}
CFG = EncoderConfig(hidden_dim=16, num_heads=4, num_layers=2, embedding_dim=8, dropout=0.2, input_modes=MODES)


@pytest.fixture(scope="module")
def graph():
    return make_toy_graph()


@pytest.fixture(scope="module")
def setup(graph):
    encoder = make_encoder(graph, CFG)
    params = init_encoder(encoder, jax.random.key(0), graph)
    apply = jax.jit(encoder.apply, static_argnames=("deterministic", "return_attention"))
    return encoder, params, apply


def test_shapes_and_parameter_layout(graph, setup):
    encoder, params, apply = setup
    out = apply({"params": params}, graph)
    assert {t: v.shape for t, v in out.items()} == {t: (n, 16) for t, n in graph.num_nodes.items()}
    assert all(v.dtype == jnp.float32 for v in out.values())
    assert set(params) == {"shared_Sample", "embed_Molecule", "project_Molecule", "embed_Food", "project_Food",
                           "embed_Nutrient", "layer_0", "layer_1"}
    assert params["shared_Sample"].shape == (1, 8)
    assert params["embed_Molecule"]["embedding"].shape == (40, 8)
    assert params["project_Food"]["kernel"].shape == (6, 8)
    layer0, layer1 = params["layer_0"], params["layer_1"]
    assert set(layer0) == set(graph.edges)
    rel = layer0[schema.CONTAINS]
    assert rel["lin_src"]["kernel"].shape == (8, 16) and layer1[schema.CONTAINS]["lin_src"]["kernel"].shape == (16, 16)
    assert rel["att_src"].shape == (4, 4) and rel["bias"].shape == (16,)
    assert rel["lin_edge"]["kernel"].shape == (1, 16) and layer0[schema.HAS_NUTRIENT]["lin_edge"]["kernel"].shape == (3, 16)
    assert "lin_edge" not in layer0[schema.IS_INSTANCE_OF] and "att_edge" not in layer0[schema.IS_INSTANCE_OF]


def test_input_modes(graph, setup):
    encoder, params, apply = setup
    base = apply({"params": params}, graph)
    # features/both read node_features; embedding ignores them.
    noisy = graph.replace(node_features={t: x + 1.0 for t, x in graph.node_features.items()})
    changed = apply({"params": params}, noisy)
    mol_diff = np.abs(np.asarray(changed["Molecule"]) - np.asarray(base["Molecule"])).max()
    assert mol_diff > 1e-3
    feature_only = make_encoder(graph, dataclasses.replace(CFG, input_modes={"Molecule": "features"}))
    p = jax.eval_shape(feature_only.init, jax.random.key(0), graph)["params"]
    assert "project_Molecule" in p and "embed_Molecule" not in p and "embed_Sample" in p
    # shared: inductive, a graph with more samples (and no table for them) still embeds.
    bigger = make_toy_graph(num_samples=45, seed=1)
    out = apply({"params": params}, bigger)
    assert out["Sample"].shape == (45, 16)
    # embedding mode on a graph of another size needs node_index.
    per_id = make_encoder(graph, dataclasses.replace(CFG, input_modes={}))
    with pytest.raises(GraphError, match="node_index"):
        jax.eval_shape(per_id.init, jax.random.key(0), bigger)


def test_config_errors(graph):
    with pytest.raises(ConfigError, match="hidden_dim"):
        make_encoder(graph, EncoderConfig(hidden_dim=10, num_heads=4))
    with pytest.raises(ConfigError, match="input_modes.Nutrient"):
        make_encoder(graph, EncoderConfig(input_modes={"Nutrient": "features"}))
    with pytest.raises(ConfigError, match="aggr"):
        make_encoder(graph, EncoderConfig(aggr="cat"))
    with pytest.raises(ConfigError, match="input_modes.Sample"):
        make_encoder(graph, EncoderConfig(input_modes={"Sample": "learned"}))
    assert hash(CFG) == hash(dataclasses.replace(CFG))


def test_dropout_only_in_training(graph, setup):
    encoder, params, apply = setup
    eval_a = apply({"params": params}, graph, rngs={"dropout": jax.random.key(1)})
    eval_b = apply({"params": params}, graph, rngs={"dropout": jax.random.key(2)})
    train_a = apply({"params": params}, graph, deterministic=False, rngs={"dropout": jax.random.key(1)})
    train_b = apply({"params": params}, graph, deterministic=False, rngs={"dropout": jax.random.key(2)})
    for t in eval_a:
        np.testing.assert_array_equal(eval_a[t], eval_b[t])
        assert not np.allclose(train_a[t], train_b[t])
        assert not np.allclose(train_a[t], eval_a[t])
    # Attention dropout: every training coefficient is 0 or the eval one scaled by 1 / (1 - p)
    # (layer 0 sees no node dropout, so its eval coefficients are the pre-dropout ones).
    _, att_eval = apply({"params": params}, graph, return_attention=True)
    _, att_train = apply({"params": params}, graph, deterministic=False, return_attention=True,
                         rngs={"dropout": jax.random.key(3)})
    for key in graph.edges:
        ev, tr = np.asarray(att_eval[0][key]), np.asarray(att_train[0][key]) * (1 - CFG.dropout)
        dropped = tr == 0
        assert 0 < dropped.mean() < 0.5
        np.testing.assert_allclose(tr[~dropped], ev[~dropped], rtol=1e-5)


def test_attention_structure(graph, setup):
    encoder, params, apply = setup
    out, attention = apply({"params": params}, graph, return_attention=True)
    assert isinstance(attention, list) and len(attention) == CFG.num_layers
    for layer in attention:
        assert set(layer) == set(graph.edges)
        for key, alpha in layer.items():
            e = graph.edges[key]
            assert alpha.shape == (e.num_edges, CFG.num_heads)
            # Softmax over each destination's incoming edges: sums to 1 wherever there are edges.
            dst = schema.split_key(key)[2]
            sums = jax.ops.segment_sum(alpha, e.receivers, graph.num_nodes[dst])
            has_edges = np.bincount(np.asarray(e.receivers), minlength=graph.num_nodes[dst]) > 0
            np.testing.assert_allclose(np.asarray(sums)[has_edges], 1.0, rtol=1e-5)
            np.testing.assert_array_equal(np.asarray(sums)[~has_edges], 0.0)
    same = apply({"params": params}, graph)
    for t in out:
        np.testing.assert_array_equal(out[t], same[t])


def _drop_edges(graph, keep: dict[str, np.ndarray]):
    edges = {}
    for key, e in graph.edges.items():
        k = keep.get(key, np.ones(e.num_edges, bool))
        edges[key] = EdgeSet(np.asarray(e.senders)[k], np.asarray(e.receivers)[k], np.asarray(e.attributes)[k])
    return graph.replace(edges=edges)


def test_edge_masks_equal_removed_edges(graph, setup):
    encoder, params, apply = setup
    rng = np.random.default_rng(0)
    keep = {schema.CONTAINS: rng.uniform(size=graph.edges[schema.CONTAINS].num_edges) < 0.7,
            schema.reverse_key(schema.IS_INSTANCE_OF): np.zeros(graph.edges[schema.IS_INSTANCE_OF].num_edges, bool)}
    masks = {k: jnp.asarray(v) for k, v in keep.items()}
    masked, att = apply({"params": params}, graph, edge_masks=masks, return_attention=True)
    removed = apply({"params": params}, _drop_edges(graph, keep))
    for t in masked:
        np.testing.assert_allclose(masked[t], removed[t], rtol=1e-5, atol=1e-6)
    for key, k in keep.items():
        np.testing.assert_array_equal(np.asarray(att[0][key])[~k], 0.0)
    all_on = apply({"params": params}, graph, edge_masks={k: jnp.ones(e.num_edges, bool) for k, e in graph.edges.items()})
    plain = apply({"params": params}, graph)
    for t in plain:
        np.testing.assert_allclose(all_on[t], plain[t], rtol=1e-6, atol=1e-7)
    grads = jax.jit(jax.grad(lambda p: sum(jnp.sum(v) for v in encoder.apply({"params": p}, graph, edge_masks=masks).values())))(params)
    assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grads))


def test_bfloat16_compute_with_float32_params(graph, setup):
    encoder, params, apply = setup
    bf16 = make_encoder(graph, dataclasses.replace(CFG, compute_dtype="bfloat16"))
    p16 = jax.eval_shape(bf16.init, jax.random.key(0), graph)["params"]
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(p16))
    out16 = jax.jit(bf16.apply)({"params": params}, graph)
    out32 = apply({"params": params}, graph)
    for t in out32:
        assert out16[t].dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(out16[t], np.float32), out32[t], atol=0.1, rtol=0.05)
    grads = jax.jit(jax.grad(lambda p: sum(jnp.sum(v.astype(jnp.float32)) for v in bf16.apply({"params": p}, graph).values())))(params)
    assert all(g.dtype == jnp.float32 and np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grads))


def test_jit_matches_eager_and_node_index_relabels(graph, setup):
    encoder, params, apply = setup
    jitted = apply({"params": params}, graph)
    eager = encoder.apply({"params": params}, graph)  # op by op
    for t in eager:
        np.testing.assert_allclose(jitted[t], eager[t], rtol=1e-5, atol=1e-6)
    # Relabel the molecules by a permutation: with node_index mapping local rows to table rows,
    # the embeddings are the same rows, permuted (one code path for subgraphs).
    n = graph.num_nodes["Molecule"]
    perm = np.random.default_rng(0).permutation(n)  # local molecule i is global molecule perm[i]
    inverse = np.argsort(perm)
    edges = {}
    for key, e in graph.edges.items():
        src, _, dst = schema.split_key(key)
        s, r = np.asarray(e.senders), np.asarray(e.receivers)
        s = inverse[s] if src == "Molecule" else s
        r = inverse[r] if dst == "Molecule" else r
        edges[key] = EdgeSet(s.astype(np.int32), r.astype(np.int32), e.attributes)
    relabelled = graph.replace(edges=edges, node_features={**graph.node_features,
                                                           "Molecule": np.asarray(graph.node_features["Molecule"])[perm]})
    out = apply({"params": params}, relabelled, node_index={"Molecule": jnp.asarray(perm, jnp.int32)})
    np.testing.assert_allclose(out["Molecule"], np.asarray(jitted["Molecule"])[perm], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out["Sample"], jitted["Sample"], rtol=1e-5, atol=1e-6)


def test_blocked_and_vmapped_match_one_block_one_graph(graph, setup):
    # Edge blocks change nothing but speed (same dropout draws, same values and gradients), and
    # data-parallel steps vmap the encoder over padded subgraphs of equal shapes.
    encoder, params, apply = setup
    blocked = encoder.clone(edge_block=16)  # 227 contains edges -> 15 blocks, the last one padded
    one_block = encoder.clone(edge_block=0)
    key = jax.random.key(5)
    rng = np.random.default_rng(1)
    other = graph.replace(edges={k: EdgeSet(e.senders, e.receivers, rng.normal(size=np.shape(e.attributes)).astype(np.float32))
                                 for k, e in graph.edges.items()})
    masks = [{schema.CONTAINS: jnp.asarray(rng.uniform(size=graph.edges[schema.CONTAINS].num_edges) < 0.8)} for _ in range(2)]
    stacked = jax.tree_util.tree_map(lambda a, b: jnp.stack([jnp.asarray(a), jnp.asarray(b)]), graph, other)
    stacked_masks = jax.tree_util.tree_map(lambda a, b: jnp.stack([a, b]), masks[0], masks[1])

    def loss(p, g, m, enc):
        out = enc.apply({"params": p}, g, edge_masks=m, deterministic=False, rngs={"dropout": key})
        return sum(jnp.sum(jnp.tanh(v)) for v in out.values())

    grad_fn = jax.jit(jax.vmap(jax.value_and_grad(lambda p, g, m: loss(p, g, m, blocked)), in_axes=(None, 0, 0)))
    values, grads = grad_fn(params, stacked, stacked_masks)
    reference = jax.jit(jax.value_and_grad(lambda p, g, m: loss(p, g, m, one_block)))
    for i, g in enumerate((graph, other)):
        value, grad = reference(params, g, masks[i])
        np.testing.assert_allclose(values[i], value, rtol=1e-5)
        for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(grad)):
            np.testing.assert_allclose(a[i], b, rtol=1e-4, atol=1e-6)


def test_profile_sample_inputs_are_inductive_and_follow_incoming_edge_masks():
    """``profile`` Sample inputs: a function of the sample's own molecules (samples start distinct,
    a new sample needs no per-sample parameter), switched off edges count as undetected, and only
    Sample may use it."""
    graph = make_toy_graph(seed=2)
    cfg = EncoderConfig(hidden_dim=8, num_heads=2, num_layers=2, embedding_dim=8, dropout=0.0, residual=True,
                        input_modes={schema.SAMPLE: "profile"})
    encoder = make_encoder(graph, cfg)
    params = init_encoder(encoder, jax.random.key(0), graph)
    M = graph.num_nodes[schema.MOLECULE]
    assert params["profile_Sample"].shape == (M, 8) and "embed_Sample" not in params

    # One layer: a sample's output depends on its own input and its molecules' (fixed) inputs only.
    one_layer = make_encoder(graph, dataclasses.replace(cfg, num_layers=1))
    one_params = {k: v for k, v in params.items() if k != "layer_1"}

    @jax.jit  # (eagerly: ~150 programs of one operation each)
    def inputs(masks=None):
        return one_layer.apply({"params": one_params}, graph, masks)[schema.SAMPLE]

    x = np.asarray(inputs())
    assert np.min(np.std(x, axis=0)) > 0  # no two-sample collapse onto one shared vector
    # Sample 3 with all its incoming molecule edges off: its input changes, nobody else's does.
    incoming = schema.reverse_key(schema.CONTAINS)
    receivers = np.asarray(graph.edges[incoming].receivers)
    mask = {incoming: jnp.asarray(receivers != 3)}
    x_masked = np.asarray(inputs(mask))
    assert not np.allclose(x_masked[3], x[3])
    np.testing.assert_allclose(np.delete(x_masked, 3, 0), np.delete(x, 3, 0), rtol=1e-5, atol=1e-5)
    # Residual weights exist per relation and layer; every node type leaves the encoder distinct.
    assert all("res" in p for p in params["layer_1"].values())
    out = jax.jit(encoder.apply)({"params": params}, graph)
    assert np.min(np.std(np.asarray(out[schema.MOLECULE]), axis=0)) > 0
    with pytest.raises(ConfigError, match="input_modes.Molecule"):
        EncoderConfig(input_modes={schema.MOLECULE: "profile"}).validate()


def test_initialisation_ignores_edges_one_program_for_pretraining_and_fine_tuning(graph, setup):
    """init_encoder equals Flax's init on the whole graph, and the pretraining graph (label edges
    emptied, candidate edges appended) initialises through the same program with the same values."""
    from jaxfood.graph.splits import prepare_graph
    from jaxfood.models.encoder import parameter_skeleton
    from jaxfood.train.augment import AugmentConfig, prepare_pretrain_graph

    encoder, params, _ = setup  # params: init_encoder's
    flax_init = jax.jit(encoder.init)(jax.random.key(0), graph)["params"]
    same = jax.tree_util.tree_map(np.array_equal, flax_init, params)
    assert jax.tree_util.tree_all(same)
    tuned = prepare_graph(graph).to_numpy()
    pre = prepare_pretrain_graph(graph, AugmentConfig(edge_add={schema.CONTAINS: 0.2}), seed=0).to_numpy()
    assert pre.edges[schema.CONTAINS].num_edges > tuned.edges[schema.CONTAINS].num_edges  # candidates appended
    enc_tuned, enc_pre = make_encoder(tuned, CFG), make_encoder(pre, CFG)
    init = jax.jit(lambda key, g: enc_tuned.init(key, g)["params"])
    texts = [init.lower(jax.random.key(1), parameter_skeleton(g)).as_text() for g in (tuned, pre)]
    assert texts[0] == texts[1]
    a, b = init_encoder(enc_tuned, jax.random.key(1), tuned), init_encoder(enc_pre, jax.random.key(1), pre)
    assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, a, b))
