"""Salient molecule discovery, training side: the losses that make molecule importances faithful.

Training makes the attention scores faithful with a *sufficiency* loss: the food predicted from
the top-k scored molecules of a sample alone (encoder and pooling restricted to those edges) must
agree with the full prediction, ``KL(p_full || p_topk)``; the top-k mask is hard in the forward
pass and straight-through (a sigmoid around the k-th score) in the backward pass, so molecules
just outside the top-k receive gradient. A normalised-entropy term keeps the weights sparse.

The scorers, rankings, fidelity and stability that judge the importances live in
:mod:`jaxfood.eval.molecules`; the edge masks both use in :mod:`jaxfood.graph.edge_masks`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxfood.graph import hetero_graph, schema
from jaxfood.graph.edge_masks import (  # noqa: F401 (re-exported: the losses' edge bookkeeping)
    REV_CONTAINS,
    contains_edge_masks,
    label_edge_masks,
    merge_edge_masks,
)
from jaxfood.graph.hetero_graph import HeteroGraph
from jaxfood.models.pooling import (  # noqa: F401 (re-exported: the salient-molecule toolbox)
    restricted_softmax,
    segment_softmax,
    segment_topk_mask,
    straight_through_topk,
)


# ---- edge bookkeeping --------------------------------------------------------------------------
def align_reverse_edges(graph: HeteroGraph, key: str = schema.CONTAINS) -> HeteroGraph:
    """Reverse edge ``e`` of ``key`` becomes the mirror of forward edge ``e`` (see
    :func:`jaxfood.graph.hetero_graph.align_reverse_edges`); one mask then serves both directions."""
    return hetero_graph.align_reverse_edges(graph, (key,))


# ---- losses ---------------------------------------------------------------------------------------
def sufficiency_loss(full_logits, topk_logits, mask=None):
    """``mean_s KL(p_full_s || p_topk_s)`` with the full prediction held fixed: [B, C], [B, C], [B]."""
    p_full = jax.nn.softmax(jax.lax.stop_gradient(full_logits.astype(jnp.float32)), -1)
    log_full = jax.nn.log_softmax(jax.lax.stop_gradient(full_logits.astype(jnp.float32)), -1)
    log_topk = jax.nn.log_softmax(topk_logits.astype(jnp.float32), -1)
    kl = jnp.sum(p_full * (log_full - log_topk), -1)
    if mask is None:
        return jnp.mean(kl)
    w = jnp.asarray(mask).astype(jnp.float32)
    return jnp.sum(w * kl) / jnp.maximum(jnp.sum(w), 1.0)


def comprehensiveness_loss(removed_logits, labels, mask):
    """``mean_s p_removed_s(y_s)``: the probability of each selected sample's food ``labels`` [B]
    from ``removed_logits`` [B, C] (its top-k molecules removed), over ``mask`` [B] bool. Minimising
    it is ERASER's comprehensiveness (DeYoung et al. 2020): without the named molecules the food
    must no longer be recognised. Bounded in [0, 1]."""
    labels = jnp.asarray(labels)
    p = jax.nn.softmax(removed_logits.astype(jnp.float32), -1)
    p_true = jnp.take_along_axis(p, jnp.where(labels >= 0, labels, 0)[:, None], -1)[:, 0]
    w = (jnp.asarray(mask) & (labels >= 0)).astype(jnp.float32)
    return jnp.sum(w * p_true) / jnp.maximum(jnp.sum(w), 1.0)


def attention_entropy(weights, segment_ids, num_segments: int, sample_mask=None, edge_mask=None):
    """Mean normalised entropy ``H(alpha_s) / log(n_s)`` of each sample's weights (0 where n_s < 2).

    ``weights`` [E] sum to one within each sample; ``sample_mask`` [S] selects samples.
    """
    edge_mask = jnp.ones(weights.shape, bool) if edge_mask is None else edge_mask
    w = jnp.where(edge_mask, weights, 0.0)
    plogp = jnp.where(w > 0, w * jnp.log(jnp.where(w > 0, w, 1.0)), 0.0)
    entropy = -jax.ops.segment_sum(plogp, segment_ids, num_segments)
    count = jax.ops.segment_sum(edge_mask.astype(jnp.float32), segment_ids, num_segments)
    norm = jnp.where(count > 1, entropy / jnp.log(jnp.maximum(count, 2.0)), 0.0)
    sel = (count > 1) if sample_mask is None else (jnp.asarray(sample_mask) & (count > 1))
    sel = sel.astype(jnp.float32)
    return jnp.sum(sel * norm) / jnp.maximum(jnp.sum(sel), 1.0)


def mass_outside_topk(weights, topk_mask, segment_ids, num_segments: int, sample_mask=None):
    """Mean over samples of the attention mass outside their top-k edges, ``1 - sum_{top-k} alpha``.

    A sparsity term that asks for ``k`` molecules to carry the prediction without forcing a single
    one (as minimal entropy does). ``weights`` [E] sum to 1 per sample; ``topk_mask`` [E] bool.
    """
    inside = jax.ops.segment_sum(jnp.where(topk_mask, weights, 0.0), segment_ids, num_segments)
    total = jax.ops.segment_sum(weights, segment_ids, num_segments)
    outside = jnp.maximum(total - inside, 0.0)
    sel = total > 0 if sample_mask is None else (jnp.asarray(sample_mask) & (total > 0))
    sel = sel.astype(jnp.float32)
    return jnp.sum(sel * outside) / jnp.maximum(jnp.sum(sel), 1.0)
