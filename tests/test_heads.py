"""Task heads and parameter groups: the attention pooling computes what it documents; a head whose
learning rate is 0 does not move; a frozen encoder stays frozen (and unfreezes on schedule)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_toy_graph

from jaxfood.graph import schema
from jaxfood.models import pooling
from jaxfood.models.encoder import EncoderConfig
from jaxfood.models.heads import HeadsConfig, make_multitask_model
from jaxfood.models.pooling import GatedAttentionPool
from jaxfood.train import multitask as mt
from jaxfood.train import task_weighting as tw
from jaxfood.train.finetune import prepare_graph
from jaxfood.train.optimizer import GroupConfig, OptimizerConfig, make_optimizer

SMALL_ENCODER = EncoderConfig(hidden_dim=16, num_heads=2, num_layers=1, embedding_dim=16, dropout=0.0,
                              input_modes={"Sample": "shared", "Molecule": "both", "Food": "both",
                                           "Nutrient": "embedding"})
SMALL_HEADS = HeadsConfig(hidden_dim=16, pool_dim=16, attention_dim=8, projection_dim=8, dropout=0.0)


def test_gated_attention_pool_matches_numpy_and_respects_masks(monkeypatch):
    rng = np.random.default_rng(0)
    senders = np.array([0, 0, 0, 1, 1, 2], np.int32)
    receivers = np.array([0, 2, 3, 1, 2, 3], np.int32)
    mol = rng.normal(size=(4, 5)).astype(np.float32)
    x = rng.normal(size=(6, 1)).astype(np.float32)
    pool = GatedAttentionPool(pool_dim=6, attention_dim=3)
    params = pool.init(jax.random.key(0), mol, senders, receivers, x, 3)["params"]
    pooled, weights, logits = pool.apply({"params": params}, mol, senders, receivers, x, 3)

    # The documented formula in numpy.
    p = jax.tree_util.tree_map(np.asarray, params)
    h = mol @ p["instance"]["kernel"]  # no bias: the pooled vectors are standardised
    gv = np.tanh(h @ p["attention_v"]["kernel"] + p["attention_v"]["bias"])
    gu = 1 / (1 + np.exp(-(h @ p["attention_u"]["kernel"] + p["attention_u"]["bias"])))
    a_mol = (gv * gu) @ p["attention_w"]["kernel"][:, 0]
    raw = a_mol[receivers] + np.sum((h @ p["attention_intensity"]["kernel"])[receivers] * x, -1)
    a = raw.copy()
    for s in range(3):  # centred per sample, then bounded: c tanh(a / c), c = 3
        sel = senders == s
        a[sel] = 3.0 * np.tanh((a[sel] - a[sel].mean()) / 3.0)
    np.testing.assert_allclose(np.asarray(logits), a, rtol=1e-5, atol=1e-6)
    alpha = np.zeros(6)
    expected = np.zeros((3, 6))
    for s in range(3):
        sel = senders == s
        e = np.exp(a[sel] - a[sel].max())
        alpha[sel] = e / e.sum()
        inst = h[receivers[sel]] + x[sel] @ p["instance_intensity"]
        expected[s] = alpha[sel] @ inst
    expected = (expected - expected.mean(0)) / np.sqrt(expected.var(0) + 1e-5)  # standardised over samples
    np.testing.assert_allclose(np.asarray(weights), alpha, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(pooled), expected, rtol=1e-4, atol=1e-4)

    # Masked edges get weight 0; the rest of their sample is centred and normalised without them.
    mask = np.array([True, False, True, True, True, True])
    _, w_masked, _ = pool.apply({"params": params}, mol, senders, receivers, x, 3, mask)
    w_masked = np.asarray(w_masked)
    assert w_masked[1] == 0.0
    kept = raw[[0, 2]]
    e = np.exp(3.0 * np.tanh((kept - kept.mean()) / 3.0))
    np.testing.assert_allclose(w_masked[[0, 2]], e / e.sum(), rtol=1e-5)

    # The segment-sum path for large graphs gives the same result as the dense one.
    monkeypatch.setattr(pooling, "DENSE_POOL_LIMIT", 0)
    pooled_seg, _, _ = pool.apply({"params": params}, mol, senders, receivers, x, 3)
    np.testing.assert_allclose(np.asarray(pooled_seg), np.asarray(pooled), rtol=1e-5, atol=1e-6)


def _train(optimizer_cfg: OptimizerConfig, steps: int):
    graph = prepare_graph(make_toy_graph())
    model = make_multitask_model(graph, SMALL_ENCODER, SMALL_HEADS)
    weighting = tw.WeightingConfig(method="static")
    tx, _ = make_optimizer(optimizer_cfg, 10)
    state = mt.init_train_state(model, weighting, tx, jax.random.key(0), graph)
    step = jax.jit(mt.make_train_step(model, mt.LossConfig(), weighting, tx))
    seed_mask = jnp.asarray(np.asarray(graph.sample_split) == 0)
    snapshots = [jax.device_get(state.params)]
    for i in range(steps):
        state, _ = step(state, graph, mt.Batch(seed_mask, jax.random.key(i)))
        snapshots.append(jax.device_get(state.params))
    return snapshots


def _same(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def test_zero_learning_rate_head_and_frozen_encoder_do_not_move():
    cfg = OptimizerConfig(classifier=GroupConfig(learning_rate=0.0, weight_decay=1e-2),
                          wide=GroupConfig(learning_rate=0.0), freeze_encoder_steps=2)
    snaps = _train(cfg, steps=3)
    first, frozen_end, after = snaps[0], snaps[2], snaps[3]
    # Learning rate 0 (even with weight decay): the classifier never moves.
    assert _same(first["classifier"], after["classifier"])
    # The encoder is frozen for the first two optimizer steps, then trains.
    assert _same(first["encoder"], frozen_end["encoder"])
    assert not _same(frozen_end["encoder"], after["encoder"])
    # The other heads train from the first step.
    for head in ("nutrient_head", "food_projection", "salient_pool"):
        assert not _same(first[head], snaps[1][head]), head


def test_optimizer_groups_follow_parameter_paths():
    from jaxfood.train.optimizer import param_labels

    params = {"encoder": {"layer_0": {"w": 1.0}}, "classifier": {"b": 2.0}, "task_weighting": {"log_vars": 0.0}}
    assert param_labels(params) == {"encoder": {"layer_0": {"w": "encoder"}}, "classifier": {"b": "classifier"},
                                    "task_weighting": {"log_vars": "task_weighting"}}
    with pytest.raises(ValueError, match="no optimizer group"):
        param_labels({"mystery": 1.0})
    # The linear paths on the intensity profile are one group whichever head holds them.
    wide = {"classifier": {"wide_kernel": 1.0, "mlp": {"b": 0.0}}, "nutrient_head": {"wide_kernel": 1.0}}
    assert param_labels(wide) == {"classifier": {"wide_kernel": "wide", "mlp": {"b": "classifier"}},
                                  "nutrient_head": {"wide_kernel": "wide"}}


def test_model_params_have_the_documented_layout():
    graph = prepare_graph(make_toy_graph())
    model = make_multitask_model(graph, SMALL_ENCODER, dataclasses.replace(SMALL_HEADS))
    params = model.init(jax.random.key(0), graph)
    assert set(params) == {"encoder", "classifier", "nutrient_head", "food_projection", "salient_pool"}
    out = jax.jit(model.apply)(params, graph)  # one program (op by op: ~300 small ones)
    S, F = graph.num_nodes[schema.SAMPLE], graph.num_nodes[schema.FOOD]
    assert out.food_logits.shape == (S, F)
    assert out.nutrient_profile.shape == (S, graph.food_nutrients.shape[1])
    assert out.food_projection.shape == (F, SMALL_HEADS.projection_dim)
    per_sample = jax.ops.segment_sum(out.molecule_weights, graph.edges[schema.CONTAINS].senders, S)
    np.testing.assert_allclose(np.asarray(per_sample), 1.0, rtol=1e-5)


def test_wide_path_reads_the_baselines_features_and_follows_the_pooling_mask():
    """The profile the wide paths map is exactly the logistic regression's input (baselines'
    TIC + log1p features, standardised on the training rows), and a sample reduced to some of its
    molecules is a sample in which only those were detected (its TIC recomputed)."""
    from jaxfood.eval.baselines import preprocess_intensities
    from jaxfood.eval.pipeline import raw_peak_areas
    from jaxfood.graph.hetero_graph import SPLIT_CODES
    from jaxfood.models.profile import sample_profile

    graph = make_toy_graph(num_samples=24, num_molecules=30, seed=4)
    areas = raw_peak_areas(graph)
    train = np.asarray(graph.sample_split) == SPLIT_CODES["train"]

    def standardised(x):
        mean, std = x[train].mean(0), x[train].std(0)
        return (x - mean) / np.where(std > 1e-5, std, 1.0)

    expected = standardised(preprocess_intensities(areas))
    eye = jnp.eye(graph.num_nodes[schema.MOLECULE])
    np.testing.assert_allclose(np.asarray(sample_profile(graph).linear(eye)), expected, atol=2e-4)

    # Sample 0 keeps only its first two molecules: its row is that of a sample with only those
    # two peaks, standardised with the statistics of the full training data.
    contains = graph.edges[schema.CONTAINS]
    senders = np.asarray(contains.senders)
    mask = np.ones(senders.shape, bool)
    mask[np.flatnonzero(senders == 0)[2:]] = False
    reduced = areas.copy()
    reduced[0, np.asarray(contains.receivers)[~mask]] = 0.0
    x_full = preprocess_intensities(areas)
    mean, std = x_full[train].mean(0), x_full[train].std(0)
    std = np.where(std > 1e-5, std, 1.0)
    expected_reduced = (preprocess_intensities(reduced) - mean) / std
    got = np.asarray(sample_profile(graph, jnp.asarray(mask)).linear(eye))
    np.testing.assert_allclose(got, expected_reduced, atol=2e-4)
    assert not np.allclose(got[0], expected[0])


def test_wide_outputs_are_the_linear_part_of_the_heads():
    graph = prepare_graph(make_toy_graph())
    model = make_multitask_model(graph, SMALL_ENCODER, SMALL_HEADS)
    params = model.init(jax.random.key(0), graph)
    F = graph.num_nodes[schema.FOOD]
    # Initial wide kernels are zero: the heads start as the deep path alone.
    base = model.apply(params, graph)
    np.testing.assert_allclose(np.asarray(base.wide_food_logits), 0.0)
    kernel = jax.random.normal(jax.random.key(1), params["classifier"]["wide_kernel"].shape)
    moved = {**params, "classifier": {**params["classifier"], "wide_kernel": kernel}}
    out = model.apply(moved, graph)
    assert out.wide_food_logits.shape == (graph.num_nodes[schema.SAMPLE], F)
    np.testing.assert_allclose(np.asarray(out.food_logits - base.food_logits), np.asarray(out.wide_food_logits),
                               rtol=1e-4, atol=1e-4)
    assert float(jnp.std(out.wide_food_logits)) > 0.1
    no_wide = make_multitask_model(graph, SMALL_ENCODER, dataclasses.replace(SMALL_HEADS, wide=False))
    plain = no_wide.init(jax.random.key(0), graph)
    assert "wide_kernel" not in plain["classifier"] and no_wide.apply(plain, graph).wide_food_logits is None


def test_nutrients_from_foods_add_the_posterior_expected_profile():
    """With ``nutrients_from_foods`` the nutrient head adds softmax(logits * exp(log_scale)) @
    food_nutrients to its own output (and to its linear part); the posterior takes no gradient
    from the nutrient output (the nutrition task does not train the classifier)."""
    graph = prepare_graph(make_toy_graph())
    plain_model = make_multitask_model(graph, SMALL_ENCODER, dataclasses.replace(SMALL_HEADS, nutrients_from_foods=False))
    model = make_multitask_model(graph, SMALL_ENCODER, SMALL_HEADS)
    params = model.init(jax.random.key(0), graph)
    assert "food_posterior" in params["nutrient_head"]
    params["nutrient_head"]["food_posterior"]["log_scale"] = jnp.asarray(0.3)
    plain = {**params, "nutrient_head": {k: v for k, v in params["nutrient_head"].items() if k != "food_posterior"}}
    out, base = model.apply(params, graph), plain_model.apply(plain, graph)
    logits = np.asarray(out.food_logits, np.float64) * np.exp(0.3)
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    expected = p @ np.asarray(graph.food_nutrients, np.float64)
    np.testing.assert_allclose(np.asarray(out.nutrient_profile - base.nutrient_profile), expected, atol=1e-5)
    np.testing.assert_allclose(np.asarray(out.wide_nutrient_profile - base.wide_nutrient_profile), expected, atol=1e-5)

    def nutrient_sum(classifier):
        return jnp.sum(model.apply({**params, "classifier": classifier}, graph).nutrient_profile)

    grads = jax.grad(nutrient_sum)(params["classifier"])
    assert all(float(jnp.abs(g).max()) == 0.0 for g in jax.tree_util.tree_leaves(grads))
