"""The multi-task step: gradient accumulation equals one step on the union, one compilation per run,
and no label leakage (held-out accuracy at chance when only label edges carry information)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_toy_graph

from jaxfood.errors import GraphError
from jaxfood.graph import schema
from jaxfood.graph.hetero_graph import make_edge_set, validate, with_reverse_edges
from jaxfood.graph.splits import SPLIT_CODES, prepare_graph, samples_reaching_own_food
from jaxfood.models.encoder import EncoderConfig
from jaxfood.models.heads import HeadsConfig, make_multitask_model
from jaxfood.train import multitask as mt
from jaxfood.train import task_weighting as tw
from jaxfood.train.optimizer import OptimizerConfig, make_optimizer

# One GAT layer: a sample's embedding reads its food's input embedding straight through a label edge,
# so a leak would be used at once (the positive controls below); and the step compiles in 2/3 the time.
SMALL_ENCODER = EncoderConfig(hidden_dim=16, num_heads=2, num_layers=1, embedding_dim=16, dropout=0.0,
                              input_modes={"Sample": "shared", "Molecule": "both", "Food": "both",
                                           "Nutrient": "embedding"})
SMALL_HEADS = HeadsConfig(hidden_dim=16, pool_dim=16, attention_dim=8, projection_dim=8, dropout=0.0)


def _without_label_edges(graph):
    edges = {k: e for k, e in graph.edges.items() if k not in schema.LABEL_RELATIONS}
    edges[schema.IS_INSTANCE_OF] = make_edge_set([], [])
    edges[schema.reverse_key(schema.IS_INSTANCE_OF)] = make_edge_set([], [])
    return graph.replace(edges=edges)


def _counted_jit(step):
    traces = []

    def counted(state, graph, batch):
        traces.append(1)
        return step(state, graph, batch)

    return jax.jit(counted), traces


def test_multisteps_over_four_micro_batches_equals_one_step_on_their_union():
    # No label edges (so masking differs in nothing between the batches), no dropout, static
    # weights: every loss is a mean over the supervised samples, linear in them. (The sufficiency
    # term standardises its restricted pass with the unsupervised samples' statistics, which
    # depend on the batch; its weight is 0 here.)
    graph = prepare_graph(_without_label_edges(make_toy_graph(num_samples=40, per_sample=6)))
    model = make_multitask_model(graph, SMALL_ENCODER, SMALL_HEADS)
    loss_cfg = mt.LossConfig(supervised_fraction=1.0, salient_top_k=8)
    weighting = tw.WeightingConfig(method="static", static_weights={"salient_molecules": 0.0})
    train = np.nonzero(np.asarray(graph.sample_split) == SPLIT_CODES["train"])[0][:16]
    parts = np.split(train, 4)
    masks = [np.isin(np.arange(40), p) for p in parts]

    def run(accumulation: int, batches):
        tx, _ = make_optimizer(OptimizerConfig(accumulation_steps=accumulation), 10)
        state = mt.init_train_state(model, weighting, tx, jax.random.key(0), graph)
        step, traces = _counted_jit(mt.make_train_step(model, loss_cfg, weighting, tx))
        start = jax.device_get(state.params)
        for i, mask in enumerate(batches):
            state, _ = step(state, graph, mt.Batch(jnp.asarray(mask), jax.random.key(i)))
        return start, jax.device_get(state.params), traces

    start, accumulated, traces = run(4, masks)
    _, union, _ = run(1, [np.any(masks, axis=0)])
    assert len(traces) == 1  # four calls, one compilation
    moved = [not np.allclose(a, b) for a, b in zip(jax.tree_util.tree_leaves(start),
                                                     jax.tree_util.tree_leaves(accumulated))]
    assert sum(moved) > len(moved) // 2
    # Compared on the whole update: Adam's first step is g / (|g| + eps), which turns the float
    # rounding noise of gradients that are exactly 0 in theory (attention over identical messages)
    # into full-size steps; everything else agrees to float precision.
    flat = [np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(t)]) for t in (start, accumulated, union)]
    d_acc, d_union = flat[1] - flat[0], flat[2] - flat[0]
    assert np.linalg.norm(d_acc - d_union) < 2e-2 * np.linalg.norm(d_union)
    close = np.isclose(flat[1], flat[2], rtol=1e-5, atol=1e-6)
    assert close.mean() > 0.97, close.mean()
    heads = [np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(t["classifier"])]) for t in (accumulated, union)]
    np.testing.assert_allclose(heads[0], heads[1], rtol=1e-5, atol=1e-6)


def _shuffled_graph(leaky: bool):
    """Molecule edges shuffled: molecules say nothing about the food, only label edges do.

    ``leaky``: held-out samples get label edges too (what a broken graph builder would do).
    """
    graph = make_toy_graph(num_samples=160, num_molecules=40, num_foods=4, per_sample=8, seed=1)
    rng = np.random.default_rng(1)
    contains = graph.edges[schema.CONTAINS]
    senders = np.asarray(contains.senders)
    receivers = rng.integers(0, 40, senders.size)
    key = senders.astype(np.int64) * 40 + receivers
    _, first = np.unique(key, return_index=True)  # no duplicate (sample, molecule) pairs
    first = np.sort(first)
    food = np.asarray(graph.sample_food)
    split = np.asarray(graph.sample_split)
    labelled = np.ones(160, bool) if leaky else split == SPLIT_CODES["train"]
    forward = {
        schema.CONTAINS: make_edge_set(senders[first], receivers[first], np.asarray(contains.attributes)[first]),
        schema.IS_INSTANCE_OF: make_edge_set(np.nonzero(labelled)[0], food[labelled]),
        schema.HAS_NUTRIENT: graph.edges[schema.HAS_NUTRIENT],
    }
    return graph.replace(edges=with_reverse_edges(forward))


@functools.cache
def _held_out_accuracy(leaky: bool, loss_cfg: mt.LossConfig, steps: int = 40) -> tuple[float, float]:
    """``(held-out accuracy, last training accuracy)`` after ``steps`` steps on the shuffled graph
    (:func:`_shuffled_graph`; prepared unless ``leaky``, which prepare_graph refuses). Each run is
    made once per worker: the leakage and label-trick tests share the masked run."""
    graph = _shuffled_graph(leaky)
    graph = graph.replace(edges=dict(graph.edges)) if leaky else prepare_graph(graph)
    dgraph = jax.device_put(graph)
    model = make_multitask_model(dgraph, SMALL_ENCODER, SMALL_HEADS)
    weighting = tw.WeightingConfig(method="static")
    tx, _ = make_optimizer(OptimizerConfig(), steps)
    state = mt.init_train_state(model, weighting, tx, jax.random.key(0), dgraph)
    step = jax.jit(mt.make_train_step(model, loss_cfg, weighting, tx))
    split = np.asarray(graph.sample_split)
    seed_mask = jnp.asarray(split == SPLIT_CODES["train"])
    for i in range(steps):
        state, metrics = step(state, dgraph, mt.Batch(seed_mask, jax.random.key(i)))
    logits = np.asarray(mt.make_predict_fn(model)(state.params, dgraph).food_logits)
    held_out = split != SPLIT_CODES["train"]
    food = np.asarray(graph.sample_food)
    return float(np.mean(logits[held_out].argmax(1) == food[held_out])), float(metrics["train/accuracy"])


#: Every training sample supervised at every step, its own label edge masked (the label trick).
MASKED = mt.LossConfig(supervised_fraction=1.0)
#: The same without the masking: a training sample reads its food off its own label edge.
UNMASKED = mt.LossConfig(supervised_fraction=1.0, mask_label_edges=False)


def test_no_label_leakage_held_out_accuracy_stays_at_chance():
    # 4 foods: chance 0.25; 48 held-out samples -> 3 standard deviations above chance is 0.44.
    # (Every training sample supervised: the run the label-trick test below makes too.)
    accuracy, _ = _held_out_accuracy(False, MASKED)
    assert accuracy < 0.44, accuracy

    # The test can fail: label edges of held-out samples in the graph (refused by prepare_graph)
    # with a step that does not mask the supervised samples' own label edges is a perfect leak.
    leaky = _shuffled_graph(leaky=True)
    with pytest.raises(GraphError, match="held-out"):
        prepare_graph(leaky)
    leaked, train_accuracy = _held_out_accuracy(True, UNMASKED)
    assert train_accuracy > 0.9 and leaked > 0.9, (train_accuracy, leaked)


def test_label_trick_hides_each_supervised_sample_its_own_food():
    """Shuffled molecules, every training sample supervised at every step: with its own label edge
    masked a training sample cannot read its food off the edge -- training accuracy is what the
    model memorises from random molecule sets (0.64 measured; chance 0.25) -- without the masking
    the label edge hands every sample its food (the positive control, the defect put back)."""
    _, masked = _held_out_accuracy(False, MASKED)
    _, unmasked = _held_out_accuracy(False, UNMASKED)
    assert unmasked > 0.9, unmasked
    assert masked < unmasked - 0.2, (masked, unmasked)


def test_a_reverse_only_label_edge_of_a_held_out_sample_is_a_leak():
    """Forward label edges for training samples only, but ``Food -> Sample`` reverse edges for every
    labelled sample: message passing hands each held-out sample its food all the same."""
    graph = _shuffled_graph(leaky=False)
    food, split = np.asarray(graph.sample_food), np.asarray(graph.sample_split)
    everyone = np.nonzero(food >= 0)[0]
    edges = dict(graph.edges)
    edges[schema.reverse_key(schema.IS_INSTANCE_OF)] = make_edge_set(food[everyone], everyone)
    leaky = graph.replace(edges=edges)
    held_out = np.nonzero(split != SPLIT_CODES["train"])[0]
    np.testing.assert_array_equal(samples_reaching_own_food(leaky), held_out)
    assert samples_reaching_own_food(graph).size == 0
    for check in (prepare_graph, validate):
        with pytest.raises(GraphError, match="held-out"):
            check(leaky)


def test_triplet_masks_match_reference_and_keep_a_negative_per_anchor():
    """In-step masks equal nutrition_alignment's numpy reference; ``num_positives`` beyond the
    foods available is capped so every anchor keeps one negative (the triplet term stays on)."""
    from jaxfood.train.nutrition_alignment import nutrient_triplet_masks

    profiles = np.random.default_rng(3).normal(size=(7, 4)).astype(np.float32)
    for k in (1, 3, 5):
        pos, neg = mt._triplet_masks(jnp.asarray(profiles), k)
        ref_pos, ref_neg = nutrient_triplet_masks(profiles, num_positives=k)
        np.testing.assert_array_equal(np.asarray(pos), ref_pos)
        np.testing.assert_array_equal(np.asarray(neg), ref_neg)
    pos, neg = mt._triplet_masks(jnp.asarray(profiles), 20)
    ref_pos, _ = nutrient_triplet_masks(profiles, num_positives=5)  # 7 foods - 2
    np.testing.assert_array_equal(np.asarray(pos), ref_pos)
    assert np.asarray(neg).sum(1).tolist() == [1] * 7
