"""Salient molecules: the class-attention pooling computes what it documents (both readouts, both
pooling paths), its log-sum-exp readout is faithful by construction, the scorers read the right
branch, the per-food rankings contrast by log ratio, and the stability helpers against hand values."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_toy_graph

from jaxfood.eval import molecules
from jaxfood.eval.evaluator import Evaluator
from jaxfood.graph import schema
from jaxfood.graph.splits import prepare_graph
from jaxfood.models import heads as heads_mod
from jaxfood.models import pooling
from jaxfood.models.encoder import EncoderConfig
from jaxfood.models.heads import HeadsConfig, make_multitask_model
from jaxfood.models.pooling import ClassAttentionPool, branch_weights

SENDERS = np.array([0, 0, 0, 1, 1, 2], np.int32)
RECEIVERS = np.array([0, 2, 3, 1, 2, 3], np.int32)


def _pool_case(readout):
    rng = np.random.default_rng(0)
    mol = rng.normal(size=(4, 5)).astype(np.float32)
    x = rng.normal(size=(6, 1)).astype(np.float32)
    pool = ClassAttentionPool(num_classes=3, pool_dim=6, attention_dim=3, readout=readout, standardise=False)
    params = pool.init(jax.random.key(1), mol, SENDERS, RECEIVERS, x, 3)["params"]
    # Non-zero intensity evidence, so the test sees it.
    if readout == "mean":
        params = {**params, "evidence_intensity": jnp.asarray(rng.normal(size=(1, 3)), jnp.float32)}
    return pool, params, mol, x


def _numpy_branches(p, mol, x, readout, mask=None):
    """The documented formulas in numpy: ``(class_logits [S, C], alpha [E, C])``."""
    p = jax.tree_util.tree_map(np.asarray, p)
    h = mol @ p["instance"]["kernel"] + p["instance"]["bias"]
    gv = np.tanh(h @ p["attention_v"]["kernel"] + p["attention_v"]["bias"])
    gu = 1 / (1 + np.exp(-(h @ p["attention_u"]["kernel"] + p["attention_u"]["bias"])))
    A = 3.0 * np.tanh((gv * gu) @ p["attention_w"]["kernel"] / 3.0)                       # [M, C]
    b = 3.0 * np.tanh(np.sum((h @ p["attention_intensity"]["kernel"])[RECEIVERS] * x, -1) / 3.0)
    a = A[RECEIVERS] + b[:, None]                                                          # [E, C]
    mask = np.ones(6, bool) if mask is None else mask
    logits = np.zeros((3, 3))
    alpha = np.zeros((6, 3))
    for s in range(3):
        sel = (SENDERS == s) & mask
        e = np.exp(a[sel])
        alpha[sel] = e / e.sum(0)
        if readout == "lse":
            logits[s] = np.log(e.sum(0))
        else:
            u = (h @ p["evidence"]["kernel"] + p["evidence"]["bias"])[RECEIVERS[sel]] + x[sel] @ p["evidence_intensity"]
            logits[s] = np.sum(alpha[sel] * u, 0)
    return logits, alpha


@pytest.mark.parametrize("readout", ["lse", "mean"])
def test_class_attention_pool_matches_numpy_masks_and_paths(readout, monkeypatch):
    pool, params, mol, x = _pool_case(readout)
    logits, branches = pool.apply({"params": params}, mol, SENDERS, RECEIVERS, x, 3)
    want_logits, want_alpha = _numpy_branches(params, mol, x, readout)
    np.testing.assert_allclose(np.asarray(logits), want_logits, rtol=1e-5, atol=1e-5)
    explain = jnp.asarray([2, 0, 1])
    weights, _ = branch_weights(branches, SENDERS, RECEIVERS, explain)
    np.testing.assert_allclose(np.asarray(weights), want_alpha[np.arange(6), np.asarray(explain)[SENDERS]],
                               rtol=1e-5, atol=1e-6)
    # A masked edge gets weight 0 and leaves its sample's softmax.
    mask = np.array([True, False, True, True, True, True])
    logits_m, branches_m = pool.apply({"params": params}, mol, SENDERS, RECEIVERS, x, 3, mask)
    want_m, alpha_m = _numpy_branches(params, mol, x, readout, mask)
    np.testing.assert_allclose(np.asarray(logits_m), want_m, rtol=1e-5, atol=1e-5)
    w_m, _ = branch_weights(branches_m, SENDERS, RECEIVERS, explain)
    assert float(w_m[1]) == 0.0
    np.testing.assert_allclose(np.asarray(w_m), alpha_m[np.arange(6), np.asarray(explain)[SENDERS]], rtol=1e-5,
                               atol=1e-6)
    # The segment-sum path for large graphs gives the same logits.
    monkeypatch.setattr(pooling, "DENSE_POOL_LIMIT", 0)
    logits_seg, _ = pool.apply({"params": params}, mol, SENDERS, RECEIVERS, x, 3)
    np.testing.assert_allclose(np.asarray(logits_seg), np.asarray(logits), rtol=1e-5, atol=1e-5)


def test_lse_readout_is_monotone_so_top_molecules_are_faithful():
    """Keeping only branch c's top molecules keeps food c's logit up to the dropped mass and lowers
    every other food's; removing them lowers food c's logit (log-sum-exp is monotone in the set)."""
    pool, params, mol, x = _pool_case("lse")
    full, branches = pool.apply({"params": params}, mol, SENDERS, RECEIVERS, x, 3)
    c = 1
    weights, _ = branch_weights(branches, SENDERS, RECEIVERS, jnp.full((3,), c))
    top = np.asarray(molecules.segment_topk_mask(weights, jnp.asarray(SENDERS), 3, 1))
    kept, _ = pool.apply({"params": params}, mol, SENDERS, RECEIVERS, x, 3, top)
    removed, _ = pool.apply({"params": params}, mol, SENDERS, RECEIVERS, x, 3, ~top)
    full, kept, removed = (np.asarray(v) for v in (full, kept, removed))
    w = np.asarray(weights)
    for s in (0, 1):  # samples with more than one molecule
        kept_mass = w[top & (SENDERS == s)].sum()
        assert kept[s, c] == pytest.approx(full[s, c] + math.log(kept_mass), abs=1e-5)  # log of the kept mass
        assert np.all(kept[s] <= full[s] + 1e-6)
        assert removed[s, c] < full[s, c]


SMALL_ENCODER = EncoderConfig(hidden_dim=16, num_heads=2, num_layers=1, embedding_dim=16, dropout=0.0,
                              input_modes={"Sample": "shared", "Molecule": "both", "Food": "both",
                                           "Nutrient": "embedding"})
SMALL_HEADS = HeadsConfig(hidden_dim=16, pool_dim=16, attention_dim=8, projection_dim=8, dropout=0.0)


@pytest.fixture(scope="module")
def toy_model():
    graph = prepare_graph(make_toy_graph())
    model = make_multitask_model(graph, SMALL_ENCODER, SMALL_HEADS)
    params = model.init(jax.random.key(0), graph)
    return graph, model, params


def test_scorers_read_the_own_and_the_predicted_food_branch(toy_model):
    graph, model, params = toy_model
    assert set(params["salient_pool"]) >= {heads_mod.CLASS_ATTENTION}
    contains = graph.edges[schema.CONTAINS]
    S = graph.num_nodes[schema.SAMPLE]
    rep = model.represent(params, graph)
    _, branches = model.class_branches(params, graph, model.pool_features(rep))
    out = model.apply(params, graph)
    own = molecules.score_molecules("class_attention", model, params, graph)
    predicted = jnp.argmax(out.food_logits, -1)
    # A training sample's own food; every other sample's predicted food (no held-out label is read).
    train = np.asarray(graph.sample_split) == 0
    assert train.any() and (~train).any()
    explain = jnp.where(jnp.asarray(train), jnp.asarray(graph.sample_food), predicted)
    want_own, _ = branch_weights(branches, contains.senders, contains.receivers, explain)
    np.testing.assert_allclose(np.asarray(own), np.asarray(want_own), rtol=1e-5, atol=1e-7)
    want_pred, _ = branch_weights(branches, contains.senders, contains.receivers, predicted)
    np.testing.assert_allclose(np.asarray(molecules.score_molecules("attention", model, params, graph)),
                               np.asarray(want_pred), rtol=1e-5, atol=1e-7)
    per_sample = jax.ops.segment_sum(own, contains.senders, S)
    np.testing.assert_allclose(np.asarray(per_sample), 1.0, rtol=1e-5)
    # Without MLP classifier the food logits are the class branches' alone.
    mlp_off = make_multitask_model(graph, SMALL_ENCODER, dataclasses.replace(SMALL_HEADS, classifier_mlp=False))
    class_logits, _ = mlp_off.class_branches(params, graph, mlp_off.pool_features(rep))
    np.testing.assert_allclose(np.asarray(mlp_off.apply(params, graph).food_logits), np.asarray(class_logits),
                               rtol=1e-5, atol=1e-6)


def test_the_scorers_one_program_gives_each_scorer_s_own_scores(toy_model):
    """Evaluation runs the scorers besides the headline one as one program (they share the forward
    pass) and the headline one through its masked program: each name gets its own scorer's scores."""
    from jaxfood.eval.evaluator import model_programs, molecule_scores

    graph, model, params = toy_model
    params = dict(params, classifier=dict(params["classifier"], wide_kernel=jax.random.normal(
        jax.random.key(3), params["classifier"]["wide_kernel"].shape)))  # a non-zero linear path
    names = tuple(molecules.SCORERS)
    got = molecule_scores(model, params, graph, names, headline="intensity_attribution")
    assert tuple(got) == names
    assert ("scores", names[1:]) in model_programs(model)._jitted  # the five others: one program
    for name in names:
        want = jax.jit(lambda p, g, n=name: molecules.score_molecules(n, model, p, g))(params, graph)
        np.testing.assert_allclose(np.asarray(got[name]), np.asarray(want), rtol=1e-5, atol=1e-6, err_msg=name)
    # The scorers differ, so a name given another scorer's scores would fail above.
    for a, b in zip(names, names[1:]):
        assert not np.allclose(np.asarray(got[a]), np.asarray(got[b]), atol=1e-6), (a, b)


def test_scores_compile_in_a_thread_and_the_evaluation_finds_them_compiled(toy_model):
    """Fine-tuning starts compiling the test evaluation's scorers beside training: the program
    compiles in another thread, and the later call in this thread compiles nothing."""
    import threading

    from jax import monitoring

    from jaxfood.eval.evaluator import model_programs

    graph, model, params = toy_model
    programs = model_programs(model)
    names = tuple(reversed(list(molecules.SCORERS)[1:3]))  # a program no other test calls
    threads = []
    real_scores = programs.scores

    def scores(names_):  # records the thread that runs the program
        program = real_scores(names_)

        def run(*args):
            threads.append(threading.current_thread())
            return program(*args)
        return run

    programs.scores = scores
    try:
        thread = programs.compile_scores_in_background(names, params, graph)
    finally:
        del programs.scores
    assert thread is not None
    thread.join()
    assert threads == [thread] and thread is not threading.current_thread()
    assert programs.compile_scores_in_background(names, params, graph) is None  # it ran: nothing to do
    assert programs.compile_scores_in_background((), params, graph) is None

    compiled = []

    def listen(event, duration, **_):
        if event.endswith("backend_compile_duration"):
            compiled.append(event)

    monitoring.register_event_duration_secs_listener(listen)
    try:
        got = jax.block_until_ready(programs.scores(names)(params, graph))
    finally:
        monitoring.unregister_event_duration_listener(listen)
    assert compiled == []
    for name in names:
        want = jax.jit(lambda p, g, n=name: molecules.score_molecules(n, model, p, g))(params, graph)
        np.testing.assert_allclose(np.asarray(got[name]), np.asarray(want), rtol=1e-5, atol=1e-6, err_msg=name)


def test_rankings_contrast_by_log_ratio_against_hand_values():
    """Two foods, three molecules; food 0's samples 0, 1 and food 1's sample 2."""
    graph = make_toy_graph()
    edges = dict(graph.edges)
    senders = np.array([0, 0, 1, 1, 2, 2], np.int32)
    receivers = np.array([0, 1, 0, 2, 1, 2], np.int32)
    edges[schema.CONTAINS] = edges[schema.CONTAINS].replace(senders=senders, receivers=receivers,
                                                            attributes=np.zeros((6, 1), np.float32))
    tiny = graph.replace(edges=edges, sample_food=np.array([0, 0, 1] + [-1] * (graph.num_nodes["Sample"] - 3),
                                                            np.int32))
    scores = np.array([0.5, 0.5, 0.8, 0.2, 0.1, 0.9])
    everyone = np.ones(graph.num_nodes["Sample"], bool)  # the default is the training samples only
    ranking, importance = molecules.rank_molecules_per_food(scores, tiny, everyone, contrast="log_ratio")
    c = molecules.LOG_RATIO_PSEUDOCOUNT * scores.mean()
    # food 0: mean importance of molecule 0 = (0.5 + 0.8) / 2, of molecule 1 = 0.25, of 2 = 0.1;
    # the other food (sample 2): 0, 0.1, 0.9.
    want0 = np.log(np.array([0.65, 0.25, 0.1]) + c) - np.log(np.array([0.0, 0.1, 0.9]) + c)
    np.testing.assert_allclose(importance[0, :3], want0, rtol=1e-9)
    assert list(ranking[0, :2]) == [0, 1] and ranking[0, -1] == 2  # absent molecules score 0, between
    _, diff = molecules.rank_molecules_per_food(scores, tiny, everyone, contrast=True)  # True = difference (as before)
    np.testing.assert_allclose(diff[0, :3], [0.65, 0.15, -0.8], rtol=1e-9)
    with pytest.raises(ValueError, match="contrast"):
        molecules.rank_molecules_per_food(scores, tiny, everyone, contrast="ratio")
    # By default only the training samples rank: sample 2 (food 1) held out, food 1 has no sample.
    split = np.zeros(graph.num_nodes["Sample"], np.int32)
    split[2] = 2
    _, default = molecules.rank_molecules_per_food(scores, tiny.replace(sample_split=split), contrast=True)
    np.testing.assert_allclose(default[1, :3], [-0.65, -0.25, -0.1], rtol=1e-9)


def test_topk_jaccard_by_hand():
    a = {"apple": ["m1", "m2", "m3", "m4"], "pear": ["m5", "m6", "m7"], "only_a": ["m1"]}
    b = {"apple": ["m3", "m1", "m9", "m4"], "pear": ["m5", "m6", "m7"]}
    # apple top-3: {m1, m2, m3} vs {m3, m1, m9} -> 2 / 4; pear identical -> 1; only_a is not in b.
    assert molecules.topk_jaccard(a, b, 3) == pytest.approx((0.5 + 1.0) / 2)
    assert molecules.topk_jaccard(a, a, 3) == 1.0
    assert math.isnan(molecules.topk_jaccard({"x": ["m1"]}, {"y": ["m1"]}, 3))


def test_perturbation_is_seeded_and_stability_of_identical_input_is_one(toy_model):
    graph, model, params = toy_model
    key = jax.random.key(3)
    g1, m1 = molecules.perturb_contains(graph, key, 0.1, 0.2)
    g2, m2 = molecules.perturb_contains(graph, key, 0.1, 0.2)
    a1 = np.asarray(g1.edges[schema.CONTAINS].attributes)
    np.testing.assert_array_equal(a1, np.asarray(g2.edges[schema.CONTAINS].attributes))
    np.testing.assert_array_equal(np.asarray(m1[schema.CONTAINS]), np.asarray(m2[schema.CONTAINS]))
    np.testing.assert_array_equal(a1, np.asarray(g1.edges[molecules.REV_CONTAINS].attributes))  # both directions
    np.testing.assert_array_equal(np.asarray(m1[schema.CONTAINS]), np.asarray(m1[molecules.REV_CONTAINS]))
    diff = a1 - np.asarray(graph.edges[schema.CONTAINS].attributes)
    assert 0.05 < diff.std() < 0.2
    dropped = 1.0 - np.asarray(m1[schema.CONTAINS]).mean()
    assert 0.05 < dropped < 0.4
    # No perturbation at all: the rankings cannot move.
    evaluator = Evaluator(model, graph, salient_k=3, scorer="class_attention", scorers=["class_attention"],
                          stability=(2, 0.0, 0.0, 0))
    assert evaluator.stability_jaccard(params) == 1.0
    evaluator.stability = (2, 0.5, 0.3, 0)  # same shapes: the compiled scorers are reused
    value = evaluator.stability_jaccard(params)
    assert 0.0 <= value < 1.0
    assert evaluator.stability_jaccard(params) == value  # seeded: deterministic


def test_intensity_attribution_is_the_exact_linear_decomposition_of_the_logit(toy_model):
    """Each edge's term is x_sm / scale_m * W[m, c] on the baselines' own features (TIC + log1p,
    standardised on the training rows), c the training sample's food (else the predicted one); per
    sample the terms add up to the linear logit minus the constant of an empty sample; the
    initial weights (linear path at 0) give no ranking at all."""
    from jaxfood.eval.baselines import preprocess_intensities
    from jaxfood.eval.pipeline import raw_peak_areas
    from jaxfood.graph.hetero_graph import SPLIT_CODES

    graph, model, params = toy_model
    assert float(jnp.abs(molecules.score_molecules("intensity_attribution", model, params, graph)).max()) == 0.0
    kernel = jax.random.normal(jax.random.key(5), params["classifier"]["wide_kernel"].shape)
    params = {**params, "classifier": {**params["classifier"], "wide_kernel": kernel}}
    scores = np.asarray(molecules.score_molecules("intensity_attribution", model, params, graph))

    x = preprocess_intensities(raw_peak_areas(graph))  # [S, M]
    labels, split = np.asarray(graph.sample_food), np.asarray(graph.sample_split)
    train = split == SPLIT_CODES["train"]
    std = x[train].std(0)
    std = np.where(std > 1e-5, std, 1.0)
    predicted = np.asarray(jnp.argmax(model.apply(params, graph).food_logits, -1))
    chosen = np.where(train & (labels >= 0), labels, predicted)
    contains = graph.edges[schema.CONTAINS]
    s, m = np.asarray(contains.senders), np.asarray(contains.receivers)
    W = np.asarray(kernel)
    terms = x[s, m] / std[m] * W[m, chosen[s]]
    total = np.bincount(s, np.abs(terms), minlength=x.shape[0])
    np.testing.assert_allclose(scores, terms / total[s], atol=2e-4)
    # exactness: the terms of a sample sum to its linear logit minus that of a sample with no peaks
    wide = np.asarray(model.apply(params, graph).wide_food_logits)
    mean = x[train].mean(0)
    empty = -(mean / std) @ W  # [F] the linear logit of an all-zero profile
    sums = np.bincount(s, terms, minlength=x.shape[0])
    np.testing.assert_allclose(sums, wide[np.arange(x.shape[0]), chosen] - empty[chosen], atol=2e-3)



def test_fidelity_probabilities_are_the_model_s_with_the_top_k_removed_and_kept():
    """Against three explicit forward passes: all molecules, each selected sample's top-k (by its
    edge scores, found here in numpy) removed, and only them kept; the target is the food predicted
    with all molecules; unselected samples keep every molecule."""
    graph = prepare_graph(make_toy_graph())
    enc = EncoderConfig(hidden_dim=8, num_heads=2, num_layers=1, embedding_dim=8, dropout=0.0)
    model = make_multitask_model(graph, enc, HeadsConfig(hidden_dim=8, pool_dim=8, attention_dim=4,
                                                         projection_dim=4, dropout=0.0))
    params = model.init(jax.random.key(0), graph)
    params = jax.tree_util.tree_map(lambda x: x + 0.5 * np.sin(np.arange(x.size).reshape(x.shape)).astype(x.dtype),
                                    params)  # away from the initialisation, so that predictions differ
    contains = graph.edges[schema.CONTAINS]
    senders = np.asarray(contains.senders)
    scores = np.random.default_rng(0).normal(size=senders.size).astype(np.float32)
    selected = np.arange(graph.num_nodes[schema.SAMPLE]) % 2 == 0
    k = 2
    top = np.zeros(senders.size, bool)
    for s in np.nonzero(selected)[0]:
        edges = np.nonzero(senders == s)[0]
        top[edges[np.argsort(-scores[edges])[:k]]] = True

    forward = jax.jit(lambda p, g, masks: model.apply(p, g, edge_masks=masks, stats_mask=jnp.asarray(~selected)))

    def proba(keep=None):
        masks = None if keep is None else molecules.contains_edge_masks(jnp.asarray(keep))
        logits = np.asarray(forward(params, graph, masks).food_logits, np.float64)
        p = np.exp(logits - logits.max(1, keepdims=True))
        return p / p.sum(1, keepdims=True)

    full = proba()
    target = full.argmax(1)
    want = [p[np.arange(target.size), target] for p in (full, proba(~top), proba(top | ~selected[senders]))]
    got = jax.jit(lambda p, g, s, m: molecules.fidelity_probabilities(model, p, g, s, k, m))(
        params, graph, scores, jnp.asarray(selected))
    for name, a, b in zip(("full", "removed", "kept"), got, want):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-4, atol=1e-6, err_msg=name)
    assert np.abs(want[0] - want[1]).max() > 1e-3 and np.abs(want[0] - want[2]).max() > 1e-3  # the masks matter
