"""The multi-task step of :mod:`jaxfood.train.multitask` in the loop's shape
``step(state, batch, rng) -> (state, metrics)``, on full graphs and on padded sampled subgraphs."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from jaxfood.graph import schema
from jaxfood.graph.hetero_graph import SPLIT_CODES
from jaxfood.graph.sampling import SampledSubgraph, padding_edge_masks
from jaxfood.models.heads import MultiTaskModel
from jaxfood.train import multitask
from jaxfood.train.data_parallel import DATA_AXES, StepFn


class PaddingAwareEncoder:
    """Wraps an encoder so that sampled subgraphs need nothing from the step that calls it.

    ``apply`` switches off the subgraph's padding edges (:func:`~jaxfood.graph.sampling.padding_edge_masks`,
    merged with the caller's masks; nothing changes on a full graph) and ``init`` fills a dummy
    ``node_index`` on a subgraph (parameter shapes come from the encoder, not the subgraph).
    Parameters are those of the wrapped encoder, unchanged.
    """

    def __init__(self, encoder):
        self.encoder = encoder

    def init(self, rngs, graph, *args, **kwargs):
        if "node_index" not in kwargs and graph.meta.extra.get("sampled"):
            kwargs["node_index"] = {t: np.zeros(n, np.int32) for t, n in graph.num_nodes.items()}
        return self.encoder.init(rngs, graph, *args, **kwargs)

    def apply(self, variables, graph, *args, edge_masks=None, **kwargs):
        if "method" in kwargs:  # another entry point of the module: nothing to mask
            return self.encoder.apply(variables, graph, *args, **kwargs)
        return self.encoder.apply(variables, graph, *args, edge_masks=_with_padding(graph, edge_masks), **kwargs)

    def __getattr__(self, name):
        if name == "encoder":  # not yet set (copy/unpickle): no recursion
            raise AttributeError(name)
        return getattr(self.encoder, name)


def _with_padding(graph, edge_masks):
    """``edge_masks`` AND the padding masks of a sampled subgraph (``None`` when nothing is masked)."""
    masks = dict(padding_edge_masks(graph))
    for key, m in (edge_masks or {}).items():
        masks[key] = m if key not in masks else masks[key] & m
    return masks or None


def padding_aware_model(model: MultiTaskModel) -> MultiTaskModel:
    """``model`` made blind to subgraph padding.

    Its encoder becomes a :class:`PaddingAwareEncoder` and its attention pooling ignores padding
    ``contains_molecule`` edges (so the padding sample has no molecules and stays out of the pooled
    standardisation statistics). Parameters and results on full graphs are unchanged.
    """
    if getattr(model, "_padding_aware", False):
        return model

    class PaddingAwareModel(type(model)):
        _padding_aware = True

        def pool(self, params, graph, molecule_features, edge_mask=None, gate=None, stats_mask=None):
            padding = _with_padding(graph, None) or {}
            if schema.CONTAINS in padding:
                edge_mask = padding[schema.CONTAINS] if edge_mask is None else edge_mask & padding[schema.CONTAINS]
            return super().pool(params, graph, molecule_features, edge_mask, gate=gate, stats_mask=stats_mask)

    fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(model)}
    fields["encoder"] = PaddingAwareEncoder(model.encoder)
    return PaddingAwareModel(**fields)


def train_state_to_dict(state: multitask.TrainState) -> dict[str, Any]:
    """A multi-task ``TrainState`` as ``{"step", "params", "opt_state", "weighting_state"}`` (the
    form the loop and the checkpoints hold)."""
    return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}


def multitask_step_fn(model: MultiTaskModel, loss_cfg, weighting, tx, **step_options) -> StepFn:
    """The multi-task step as ``step(state, batch, rng) -> (state, metrics)``.

    ``state``: :func:`train_state_to_dict` form. ``batch``: a
    :class:`~jaxfood.graph.sampling.SampledSubgraph` (its seeds are supervised) or a full graph
    (its training split is). Gradients, task losses and weighting statistics are averaged over
    :data:`~jaxfood.train.data_parallel.DATA_AXES` by the step itself. ``step_options`` go to
    ``multitask.make_train_step`` (e.g. ``task_gradient_scope``).
    """
    step = multitask.make_train_step(padding_aware_model(model), loss_cfg, weighting, tx, axis_name=DATA_AXES,
                                     **step_options)

    def run(state, batch, rng):
        if isinstance(batch, SampledSubgraph):
            graph, node_index, seed_mask = batch.graph, batch.node_index, batch.seed_mask
        else:
            graph, node_index, seed_mask = batch, None, batch.sample_split == SPLIT_CODES["train"]
        new_state, metrics = step(multitask.TrainState(**state), graph,
                                  multitask.Batch(seed_mask=seed_mask, rng=rng, node_index=node_index))
        return train_state_to_dict(new_state), metrics

    return run
