"""Per-relation edge masks: ``{relation key: [E] bool}`` mappings the encoder takes as ``edge_masks``.

Training (label-edge masking, top-k restriction) and evaluation (fidelity, perturbations) both
switch edges off this way; a missing key means all edges of that relation are on. Masks of
``contains_molecule`` serve both directions, which relies on the reverse relation listing its
edges in the forward order (:func:`jaxfood.graph.hetero_graph.align_reverse_edges`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp

from jaxfood.graph import schema
from jaxfood.graph.hetero_graph import HeteroGraph

REV_CONTAINS = schema.reverse_key(schema.CONTAINS)


def contains_edge_masks(keep) -> dict[str, Any]:
    """Encoder edge masks keeping the ``contains_molecule`` edges in ``keep`` [E], both directions."""
    return {schema.CONTAINS: keep, REV_CONTAINS: keep}


def label_edge_masks(graph: HeteroGraph, hidden_samples) -> dict[str, Any]:
    """Masks of the label edges (both directions) that switch off those of ``hidden_samples`` [S] bool."""
    fwd = graph.edges[schema.IS_INSTANCE_OF]
    rev = graph.edges[schema.reverse_key(schema.IS_INSTANCE_OF)]
    hidden_samples = jnp.asarray(hidden_samples)
    return {schema.IS_INSTANCE_OF: ~hidden_samples[fwd.senders],
            schema.reverse_key(schema.IS_INSTANCE_OF): ~hidden_samples[rev.receivers]}


def merge_edge_masks(*masks: Mapping[str, Any] | None) -> dict[str, Any]:
    """Logical AND of several relation-key -> [E] bool mappings (missing key = all on)."""
    out: dict[str, Any] = {}
    for m in masks:
        for k, v in (m or {}).items():
            out[k] = v if k not in out else (out[k] & v)
    return out
