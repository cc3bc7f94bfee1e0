"""The multi-task step of :mod:`jaxfood.train.multitask` in the loop's shape
``step(state, batch, rng) -> (state, metrics)``, on full graphs and on padded sampled subgraphs
(the model masks a subgraph's padding itself: :func:`jaxfood.graph.sampling.mask_padding`)."""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxfood.graph.hetero_graph import SPLIT_CODES
from jaxfood.graph.sampling import SampledSubgraph
from jaxfood.models.heads import MultiTaskModel
from jaxfood.train import multitask
from jaxfood.train.data_parallel import StepFn


def train_state_to_dict(state: multitask.TrainState) -> dict[str, Any]:
    """A multi-task ``TrainState`` as ``{"step", "params", "opt_state", "weighting_state"}`` (the
    form the loop and the checkpoints hold)."""
    return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}


def multitask_step_fn(model: MultiTaskModel, loss_cfg, weighting, tx, *, axis_name: str | tuple[str, ...],
                      **step_options) -> StepFn:
    """The multi-task step as ``step(state, batch, rng) -> (state, metrics)``.

    ``state``: :func:`train_state_to_dict` form. ``batch``: a
    :class:`~jaxfood.graph.sampling.SampledSubgraph` (its seeds are supervised) or a full graph
    (its training split is). Gradients, task losses and weighting statistics are averaged over
    ``axis_name`` (the layout's :attr:`~jaxfood.train.data_parallel.ShardLayout.axes`) by the step
    itself. ``step_options`` go to
    ``multitask.make_train_step`` (e.g. ``task_gradient_scope``).
    """
    step = multitask.make_train_step(model, loss_cfg, weighting, tx, axis_name=axis_name,
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
