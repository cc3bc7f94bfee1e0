"""Salient molecules as evaluation sees them: scorers, per-food rankings, fidelity, stability.

Importance of molecule ``m`` in sample ``s`` is a score on the ``contains_molecule`` edge
``(s, m)``. Four scorers share one interface, ``scorer(model, params, graph, edge_masks) -> [E]``
(one score per ``contains_molecule`` edge, normalised over each sample's edges; ``params`` are
the model's, without the task-weighting parameters):

* ``intensity_attribution`` (the headline) -- the classifier's exact additive attribution of a
  food's logit to each measured intensity through its linear path (gradient x input);
* ``input_gradient`` -- gradient x input of a food's logit with respect to every measured
  intensity, through every path of the model;

* ``class_attention`` -- the weights of each sample's own food's branch of the class-attention
  pooling (CLAM, Lu et al. 2021; see :class:`jaxfood.models.pooling.ClassAttentionPool`);
* ``attention`` -- the importances the model reports for its predicted food: that food's
  class-attention branch, or without class attention the gated attention pooling (Ilse et al. 2018);
* ``gat_attention`` -- the last encoder layer's attention on ``Molecule|rev_contains_molecule|Sample``
  edges, averaged over heads;
* ``gradient`` -- gradient x input with the molecule's presence as input: the first-order change
  of the predicted food's log-probability when the molecule is taken out of the sample's pooling.

:func:`rank_molecules_per_food` turns edge scores into per-food rankings; :func:`fidelity_probabilities`
checks them by removing / keeping each sample's top-k molecules (GraphFramEx); stability:
:func:`perturb_contains` perturbs the input and :func:`topk_jaccard` compares two rankings.
The training losses that make the scores faithful live in :mod:`jaxfood.train.salient_molecules`.

Removal and restriction of a sample's molecules act on both edge directions. They rely on the
reverse relation listing its edges in the forward order (:func:`jaxfood.graph.splits.prepare_graph`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxfood.eval.metrics import jaccard_at_k
from jaxfood.graph import schema
from jaxfood.graph.edge_masks import REV_CONTAINS, contains_edge_masks, merge_edge_masks
from jaxfood.graph.hetero_graph import SPLIT_CODES, HeteroGraph
from jaxfood.models.pooling import segment_topk_mask


# ---- scorers -------------------------------------------------------------------------------------
def _per_sample_normalise(scores, graph: HeteroGraph, edge_mask=None):
    contains = graph.edges[schema.CONTAINS]
    scores = jnp.abs(scores.astype(jnp.float32))
    if edge_mask is not None:
        scores = jnp.where(edge_mask, scores, 0.0)
    total = jax.ops.segment_sum(scores, contains.senders, graph.num_nodes[schema.SAMPLE])
    return scores / jnp.where(total > 0, total, 1.0)[contains.senders]


def training_labels(graph: HeteroGraph):
    """[S] food of each training sample, -1 for every other sample (val, test, unknown food)."""
    train = jnp.asarray(graph.sample_split) == SPLIT_CODES["train"]
    return jnp.where(train, jnp.asarray(graph.sample_food), -1)


def attention_scorer(model, params, graph: HeteroGraph, edge_masks=None):
    """Weights of the attention-pooling head, [E_contains]."""
    out = model.apply(params, graph, edge_masks=edge_masks)
    return out.molecule_weights


def class_attention_scorer(model, params, graph: HeteroGraph, edge_masks=None):
    """Weights of the class-attention branch of each *training* sample's own food, [E_contains];
    every other sample (val, test, unknown food) gets its *predicted* food's branch, so no label
    the model was not trained on enters a score. Without class attention: the plain pooling weights.

    GraphFramEx's "phenomenon" explanation: why is this sample its food -- the molecules that
    food's branch reads its logit from (see :class:`jaxfood.models.pooling.ClassAttentionPool`).
    """
    out = model.apply(params, graph, edge_masks=edge_masks, explain_class=training_labels(graph))
    return out.molecule_weights


def gat_attention_scorer(model, params, graph: HeteroGraph, edge_masks=None):
    """Last-layer GAT attention of every molecule on its samples, mean over heads, [E_contains]."""
    _, attention = model.encode(params, graph, edge_masks=edge_masks, return_attention=True)
    att = attention[-1][REV_CONTAINS]
    att = jnp.mean(att.astype(jnp.float32), axis=-1)
    mask = None if edge_masks is None else edge_masks.get(schema.CONTAINS)
    return _per_sample_normalise(att, graph, mask)


def gradient_scorer(model, params, graph: HeteroGraph, edge_masks=None):
    """Gradient x input with the *presence* of each molecule as the input, [E_contains].

    Every edge's pooling weight is multiplied by a gate ``g_e = 1``; the score is
    ``d log p(predicted food) / d g_e``: the first-order change of the prediction when the molecule
    is taken out of the sample (Grad-CAM-like: attention times the gradient of the pooled vector),
    positive for molecules that support the prediction. Normalised by each sample's total |score|.
    """
    contains = graph.edges[schema.CONTAINS]
    S = graph.num_nodes[schema.SAMPLE]
    representation = model.represent(params, graph, edge_masks=edge_masks)
    mask = None if edge_masks is None else edge_masks.get(schema.CONTAINS)
    features = model.pool_features(representation)

    def objective(gate):
        pooled, _, _ = model.pool(params, graph, features, edge_mask=mask, gate=gate)
        log_p = jax.nn.log_softmax(model.classify(params, representation[schema.SAMPLE], pooled), -1)
        predicted = jax.lax.stop_gradient(jnp.argmax(log_p, -1))
        return jnp.sum(jnp.take_along_axis(log_p, predicted[:, None], -1))

    saliency = jax.grad(objective)(jnp.ones(contains.senders.shape, jnp.float32))
    if mask is not None:
        saliency = jnp.where(mask, saliency, 0.0)
    total = jax.ops.segment_sum(jnp.abs(saliency), contains.senders, S)
    return saliency / jnp.where(total > 0, total, 1.0)[contains.senders]


def absent_intensity(graph: HeteroGraph):
    """[M] the normalised ``contains_molecule`` intensity of a molecule that is not detected
    (``log1p(0)`` through the graph's z-score statistics; without them the smallest intensity)."""
    stats = (graph.meta.normalisation or {}).get("contains_molecule", {})
    if stats.get("transform") == "log1p" and "mean" in stats and "std" in stats:
        mean = jnp.asarray(np.asarray(stats["mean"], np.float32))
        std = jnp.asarray(np.asarray(stats["std"], np.float32))
        return -mean / jnp.where(std > 0, std, 1.0)
    z = jnp.asarray(graph.edges[schema.CONTAINS].attributes, jnp.float32)[:, 0]
    return jnp.full((graph.num_nodes[schema.MOLECULE],), jnp.min(z) if z.shape[0] else 0.0)


def input_gradient_scorer(model, params, graph: HeteroGraph, edge_masks=None):
    """Gradient x input of the explained food's logit with respect to every measured intensity,
    [E_contains]: ``d logit_c(s) / d z_sm * (z_sm - z_absent_m)`` -- the first-order share of
    molecule m's measured intensity in sample s's score for food c, through *every* path of the
    model (the intensity profile of the wide path and of the Sample inputs, the GAT edge
    attributes, the pooling); ``z_absent`` is the intensity of an undetected molecule
    (:func:`absent_intensity`), so an absent molecule contributes nothing. For a linear classifier
    it is the exact decomposition of the logit. ``c``: the food of each training sample, the
    predicted food of every other sample (as :func:`class_attention_scorer`). Positive for
    molecules that raise the food's score; normalised by each sample's total |score|.
    """
    contains = graph.edges[schema.CONTAINS]
    S = graph.num_nodes[schema.SAMPLE]
    attributes = jnp.asarray(contains.attributes, jnp.float32)
    z = attributes[:, 0]
    explain = training_labels(graph)

    def objective(intensity):
        attrs = attributes.at[:, 0].set(intensity)
        edges = dict(graph.edges)
        edges[schema.CONTAINS] = contains.replace(attributes=attrs)
        if REV_CONTAINS in edges:  # listed in the forward order (prepare_graph)
            edges[REV_CONTAINS] = edges[REV_CONTAINS].replace(attributes=attrs)
        logits = model.apply(params, graph.replace(edges=edges), edge_masks=edge_masks).food_logits
        chosen = jnp.where(explain >= 0, explain, jnp.argmax(jax.lax.stop_gradient(logits), -1))
        return jnp.sum(jnp.take_along_axis(logits.astype(jnp.float32), chosen[:, None], -1))

    saliency = jax.grad(objective)(z) * (z - absent_intensity(graph)[contains.receivers])
    mask = None if edge_masks is None else edge_masks.get(schema.CONTAINS)
    if mask is not None:
        saliency = jnp.where(mask, saliency, 0.0)
    total = jax.ops.segment_sum(jnp.abs(saliency), contains.senders, S)
    return saliency / jnp.where(total > 0, total, 1.0)[contains.senders]


def intensity_attribution_scorer(model, params, graph: HeteroGraph, edge_masks=None):
    """The classifier's own additive attribution of the explained food's logit to each measured
    intensity, [E_contains]: ``x_sm / scale_m * W_wide[m, c]`` -- gradient x input of the logit's
    linear path on the intensity profile (:class:`jaxfood.models.profile.SampleProfile`; ``x`` is
    ``log1p(1e4 area / TIC)``, 0 for an undetected molecule, so the baseline is "not detected" and
    the attribution is exact: the sample's linear logit is the sum of its molecules' terms plus a
    constant). ``c``: the food of each training sample, the predicted food of every other sample
    (as :func:`class_attention_scorer`). It is what the model learned (zero for the initial
    weights, whose linear path starts at 0), not a statistic of presence. Positive for molecules
    that raise the food's score; normalised by each sample's total |score|. Without the wide path
    (``heads.wide`` off, e.g. on sampled subgraphs) it is :func:`input_gradient_scorer`.
    """
    if not model.heads_config.wide:
        return input_gradient_scorer(model, params, graph, edge_masks)
    mask = None if edge_masks is None else edge_masks.get(schema.CONTAINS)
    logits = model.apply(params, graph, edge_masks=edge_masks).food_logits
    explain = training_labels(graph)
    return wide_attribution(model, params, graph, jnp.where(explain >= 0, explain, jnp.argmax(logits, -1)), mask)


def wide_attribution(model, params, graph: HeteroGraph, chosen, mask=None):
    """[E_contains] ``x_sm / scale_m * W_wide[m, chosen[s]]`` normalised by each sample's total
    |score| (see :func:`intensity_attribution_scorer`); ``chosen`` [S] the food explained for each
    sample; ``mask`` [E_contains] the detected (pooled) edges. Needs ``heads_config.wide``."""
    contains = graph.edges[schema.CONTAINS]
    profile = model.profile(graph, mask)  # edges in the forward contains_molecule order
    kernel = params["classifier"]["wide_kernel"].astype(jnp.float32)
    terms = profile.values / profile.scale[profile.molecules] * kernel[profile.molecules, chosen[profile.samples]]
    if mask is not None:
        terms = jnp.where(mask, terms, 0.0)
    total = jax.ops.segment_sum(jnp.abs(terms), contains.senders, graph.num_nodes[schema.SAMPLE])
    return terms / jnp.where(total > 0, total, 1.0)[contains.senders]


SCORERS: dict[str, Callable[..., Any]] = {
    "intensity_attribution": intensity_attribution_scorer,
    "input_gradient": input_gradient_scorer,
    "class_attention": class_attention_scorer,
    "attention": attention_scorer,
    "gat_attention": gat_attention_scorer,
    "gradient": gradient_scorer,
}


def score_molecules(method: str, model, params, graph: HeteroGraph, edge_masks=None):
    """Importance of every ``contains_molecule`` edge by scorer ``method`` (see :data:`SCORERS`)."""
    if method not in SCORERS:
        raise ValueError(f"unknown scorer '{method}' (expected one of {sorted(SCORERS)})")
    return SCORERS[method](model, params, graph, edge_masks)


# ---- rankings -----------------------------------------------------------------------------------
#: Pseudocount of the log-ratio contrast, relative to the mean positive edge score.
LOG_RATIO_PSEUDOCOUNT = 1e-3


def rank_molecules_per_food(edge_scores, graph: HeteroGraph, sample_mask=None, sample_food=None,
                            contrast: bool | str = "log_ratio"):
    """Molecules ranked for each food by their importance in the food's samples.

    Args:
      edge_scores: [E_contains] per-sample importances (summing to 1 over each sample's edges).
      sample_mask: [S] bool, samples to use (default: the training samples with a known food --
        a ranking reported as a test figure must not use the labels of the samples it is tested on).
      sample_food: [S] food of each sample (default ``graph.sample_food``; predicted foods work too).
      contrast: how the food's samples are contrasted with the other foods' samples:
        ``log_ratio`` (default) ``log(mean_f + c) - log(mean_rest + c)`` of the (non-negative part
        of the) importances -- the fold change of importance, specific to the food as a fold change
        of intensity is; ``c`` = :data:`LOG_RATIO_PSEUDOCOUNT` x the mean positive edge score;
        ``difference`` (or True) ``mean_f - mean_rest``; ``none`` (or False) the mean alone (which
        also ranks molecules that matter for every food of a category high). A difference leaves
        a molecule shared by a whole category on top of a food's list; the ratio puts a molecule
        seldom important elsewhere there (measured on the embedded data: presence alone ranks the
        planted biomarkers at precision@10 0.08 by difference, 0.29 by log ratio).

    Returns ``(ranking [F, M] int molecule indices, best first; importance [F, M] float)``; a
    molecule absent from a sample counts 0 for it; ties keep molecule order.
    """
    contains = graph.edges[schema.CONTAINS]
    senders = np.asarray(contains.senders)
    receivers = np.asarray(contains.receivers)
    scores = np.asarray(edge_scores, np.float64)
    food = np.asarray(graph.sample_food if sample_food is None else sample_food)
    if sample_mask is None:
        sample_mask = np.asarray(graph.sample_split) == SPLIT_CODES["train"]
    use = np.asarray(sample_mask) & (food >= 0)
    num_foods, num_molecules = graph.num_nodes[schema.FOOD], graph.num_nodes[schema.MOLECULE]
    keep = use[senders]
    total = np.zeros((num_foods, num_molecules), np.float64)
    np.add.at(total, (food[senders[keep]], receivers[keep]), scores[keep])
    counts = np.bincount(food[use], minlength=num_foods).astype(np.float64)
    mode = {True: "difference", False: "none"}.get(contrast, contrast) if isinstance(contrast, bool) else contrast
    if mode not in ("log_ratio", "difference", "none"):
        raise ValueError(f"contrast must be 'log_ratio', 'difference' or 'none', got {contrast!r}")
    if mode == "log_ratio":
        positive = np.maximum(scores, 0.0)
        pseudocount = LOG_RATIO_PSEUDOCOUNT * (positive[positive > 0].mean() if (positive > 0).any() else 1.0)
        total = np.zeros((num_foods, num_molecules), np.float64)
        np.add.at(total, (food[senders[keep]], receivers[keep]), positive[keep])
    importance = total / np.maximum(counts, 1.0)[:, None]
    if mode != "none":
        rest = (total.sum(0, keepdims=True) - total) / np.maximum(counts.sum() - counts, 1.0)[:, None]
        importance = (np.log(importance + pseudocount) - np.log(rest + pseudocount) if mode == "log_ratio"
                      else importance - rest)
    ranking = np.argsort(-importance, axis=1, kind="stable")
    return ranking, importance


def rankings_by_id(ranking: np.ndarray, graph: HeteroGraph, top: int | None = None) -> dict[str, list[str]]:
    """``{food id: [molecule id, ...]}`` from :func:`rank_molecules_per_food`'s index ranking."""
    food_ids = graph.meta.node_ids.get(schema.FOOD) or [str(i) for i in range(ranking.shape[0])]
    mol_ids = graph.meta.node_ids.get(schema.MOLECULE) or [str(i) for i in range(ranking.shape[1])]
    top = ranking.shape[1] if top is None else top
    return {food_ids[f]: [mol_ids[m] for m in ranking[f, :top]] for f in range(ranking.shape[0])}


def fidelity_probabilities(model, params, graph: HeteroGraph, edge_scores, k: int, sample_mask,
                           target_class=None, base_masks=None):
    """Probabilities of ``target_class`` [S] (default: the full model's prediction), three ways.

    Returns ``(p_full, p_removed, p_kept)`` each [S]: with all molecules, with the top-``k``
    molecules of each sample in ``sample_mask`` [S] bool removed, and with only them kept (both
    edge directions and the pooling; all selected samples at once). Fidelity+ =
    mean(p_full - p_removed), fidelity- = mean(p_full - p_kept) (GraphFramEx, Amara et al. 2022).
    """
    contains = graph.edges[schema.CONTAINS]
    S = graph.num_nodes[schema.SAMPLE]
    sample_mask = jnp.asarray(sample_mask)
    base = base_masks.get(schema.CONTAINS) if base_masks else None
    topk = segment_topk_mask(jnp.asarray(edge_scores), contains.senders, S, k, base)
    selected = sample_mask[contains.senders]
    keep_removed = ~(topk & selected)
    keep_kept = ~selected | topk
    if base is not None:
        keep_removed, keep_kept = keep_removed & base, keep_kept & base

    # One forward pass in the program, run for the three inputs in turn (lax.map): about half the
    # compilation of three inlined passes. Every edge on (within the base masks) is the full input.
    keeps = jnp.stack([jnp.ones_like(keep_removed) if base is None else base, keep_removed, keep_kept])

    def proba(keep):
        out = model.apply(params, graph, edge_masks=merge_edge_masks(base_masks, contains_edge_masks(keep)),
                          stats_mask=~sample_mask)
        return jax.nn.softmax(out.food_logits.astype(jnp.float32), -1)

    p_full, p_removed, p_kept = jax.lax.map(proba, keeps)
    target = jnp.argmax(p_full, -1) if target_class is None else jnp.asarray(target_class)

    def pick(p):
        return jnp.take_along_axis(p, target[:, None], -1)[:, 0]

    return pick(p_full), pick(p_removed), pick(p_kept)


# ---- stability ------------------------------------------------------------------------------------
def topk_jaccard(rankings_a: Mapping[str, Sequence[str]], rankings_b: Mapping[str, Sequence[str]], k: int) -> float:
    """Mean over the foods of both rankings of the Jaccard overlap ``|A ∩ B| / |A ∪ B|`` of their
    top-``k`` molecule lists (``{food: [molecule ids, best first]}``); NaN without a common food."""
    if k < 1:
        raise ValueError("k must be at least 1")
    foods = [f for f in rankings_a if f in rankings_b]
    if not foods:
        return float("nan")
    return float(np.mean([jaccard_at_k(list(rankings_a[f]), list(rankings_b[f]), k) for f in foods]))


def perturb_contains(graph: HeteroGraph, key, noise_sd: float = 0.1, drop_fraction: float = 0.05):
    """A small perturbation of the input, for the stability of the rankings: ``(graph, edge_masks)``.

    Gaussian noise of standard deviation ``noise_sd`` on the (normalised) ``contains_molecule``
    attributes, and each ``contains_molecule`` edge dropped with probability ``drop_fraction``
    (``edge_masks``, both directions). The reverse relation gets the same attributes, which
    assumes its edges mirror the forward ones (:func:`align_reverse_edges`). Pure: the same
    ``key`` gives the same perturbation.
    """
    k_noise, k_drop = jax.random.split(key)
    fwd = graph.edges[schema.CONTAINS]
    attributes = jnp.asarray(fwd.attributes, jnp.float32)
    noisy = attributes + noise_sd * jax.random.normal(k_noise, attributes.shape, jnp.float32)
    edges = dict(graph.edges)
    edges[schema.CONTAINS] = fwd.replace(attributes=noisy.astype(fwd.attributes.dtype))
    if REV_CONTAINS in edges:
        edges[REV_CONTAINS] = edges[REV_CONTAINS].replace(attributes=noisy.astype(edges[REV_CONTAINS].attributes.dtype))
    keep = jax.random.uniform(k_drop, fwd.senders.shape) >= drop_fraction
    return graph.replace(edges=edges), contains_edge_masks(keep)
