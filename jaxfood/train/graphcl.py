"""GraphCL self-supervised pretraining of the heterogeneous GAT encoder.

Stage one of two-stage training (You et al., "Graph Contrastive Learning with Augmentations",
NeurIPS 2020), at node level on the heterogeneous graph: two random views of the graph
(:mod:`jaxfood.train.augment`) are encoded, a projection head maps the embeddings of a random batch
of nodes of each selected node type to a unit sphere, and NT-Xent (Chen et al., "A Simple
Framework for Contrastive Learning of Visual Representations", ICML 2020) pulls the two views of the
same node together against the other nodes of the batch (in-batch negatives, both views), with
optional hard-negative weighting (Robinson et al., "Contrastive Learning with Hard Negative
Samples", ICLR 2021). The projection head exists only for this loss; fine-tuning starts from the
encoder (:func:`load_pretrained_encoder`).

This module holds the pure parts: configuration, the model pieces, :func:`nt_xent_loss`,
:func:`make_pretrain_step` and the held-out view loss; the run is :func:`jaxfood.train.pretrain.pretrain`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxfood.errors import ConfigError
from jaxfood.graph import schema
from jaxfood.graph.hetero_graph import HeteroGraph
from jaxfood.graph.sampling import NeighbourSampler, SampledSubgraph, SamplerConfig
from jaxfood.models.encoder import EncoderConfig, HeteroGATEncoder, init_encoder, make_encoder
from jaxfood.models.initialise import init_params
from jaxfood.train.augment import (
    CANDIDATES_KEY,
    AugmentConfig,
    add_candidate_edges,
    augment,
    base_edge_masks,
    check_config,
    prepare_pretrain_graph,
    subgraph_candidate_counts,
)
from jaxfood.train.optimizer import squared_norm

Array = Any

# Large finite stand-in for -inf in masked logits: keeps gradients finite where a row has no entry.
_NEG = -1e9


def default_encoder_config() -> EncoderConfig:
    """Two GAT layers with root weights, inductive Sample inputs from each sample's own profile.

    Without root weights (GATConv has no self loops) and with one shared vector for every sample,
    a second layer handed every sample the same vector back, so main used one layer: a pooling of
    the sample's own molecules that never used the graph. With per-relation root weights
    (``residual``, PyG ``GATConv(residual=True)``) and ``profile`` samples (a map of the sample's
    own standardised intensities: distinct, and new samples need no parameter), Sample -> Molecule
    -> Sample paths carry which samples share which molecules. Embedded data, seed 0, from
    scratch: precision@10 0.128 -> 0.254, nutrient R² 0.608 -> 0.631 (docs/experiments.md).
    """
    return EncoderConfig(
        hidden_dim=64, num_heads=4, num_layers=2, embedding_dim=64, dropout=0.1, aggr="sum", residual=True,
        input_modes={schema.SAMPLE: "profile", schema.MOLECULE: "both", schema.FOOD: "both",
                     schema.NUTRIENT: "embedding"},
    )


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """Everything a GraphCL run depends on (``jaxfood pretrain --set key=value`` addresses it)."""

    encoder: EncoderConfig = dataclasses.field(default_factory=default_encoder_config)
    augment: AugmentConfig = dataclasses.field(default_factory=AugmentConfig)
    #: Node types whose two views are contrasted, with the weight of each type's loss. (Molecule
    #: was off because with one layer and shared sample inputs all molecules embed alike; with the
    #: two-layer residual encoder that no longer holds, but turning it on was not measured.)
    loss_weights: dict[str, float] = dataclasses.field(
        default_factory=lambda: {schema.SAMPLE: 1.0, schema.FOOD: 1.0})
    #: Nodes per type drawn for the loss each step (all nodes where a type has fewer).
    batch_size: int = 256
    #: Softmax temperature of NT-Xent.
    temperature: float = 0.2
    #: Robinson et al. (2021) concentration beta; 0 = plain NT-Xent.
    hard_negative_beta: float = 0.0
    projection_hidden: int = 64
    projection_dim: int = 32
    learning_rate: float = 1e-2
    weight_decay: float = 1e-4
    warmup_steps: int = 20
    #: Final learning rate of the cosine schedule, as a fraction of ``learning_rate``.
    final_lr_fraction: float = 0.05
    grad_clip_norm: float = 1.0
    #: Apply the encoder's dropout in the pretraining step. Off by default: the augmentations are
    #: the noise GraphCL learns invariance to (the config's dropout still applies in fine-tuning).
    encoder_dropout: bool = False
    #: 10 x 10 steps (docs/experiments.md §11: 15 epochs gave no better fine-tuned figures on 3
    #: seeds and cost a third more pretraining).
    epochs: int = 10
    steps_per_epoch: int = 10
    #: Epochs without improvement of the held-out view loss before stopping (0 = never stop early).
    patience: int = 5
    #: Fixed view pairs over which the held-out view loss is averaged.
    val_views: int = 2
    #: k of the k-NN purity read-out.
    knn_k: int = 5
    seed: int = 0


def check_pretrain_config(cfg: PretrainConfig, graph: HeteroGraph) -> None:
    """Raises :class:`ConfigError` naming the first bad key."""
    cfg.encoder.validate("pretrain config 'encoder'")
    check_config(cfg.augment, graph)
    if not any(w > 0 for w in cfg.loss_weights.values()):
        raise ConfigError("loss_weights: expected at least one node type with a positive weight")
    for t, w in cfg.loss_weights.items():
        if t not in schema.NODE_TYPES:
            raise ConfigError(f"loss_weights.{t}: unknown node type (expected one of {list(schema.NODE_TYPES)})")
        if w < 0:
            raise ConfigError(f"loss_weights.{t} = {w}: expected a non-negative weight")
    positive = {"batch_size": cfg.batch_size, "epochs": cfg.epochs, "steps_per_epoch": cfg.steps_per_epoch,
                "val_views": cfg.val_views, "knn_k": cfg.knn_k, "projection_hidden": cfg.projection_hidden,
                "projection_dim": cfg.projection_dim}
    for name, value in positive.items():
        if value < 1:
            raise ConfigError(f"{name} = {value}: expected a positive integer")
    for name in ("temperature", "learning_rate", "grad_clip_norm"):
        if getattr(cfg, name) <= 0:
            raise ConfigError(f"{name} = {getattr(cfg, name)}: expected a positive number")
    if cfg.hard_negative_beta < 0:
        raise ConfigError(f"hard_negative_beta = {cfg.hard_negative_beta}: expected >= 0")
    if cfg.warmup_steps < 0 or cfg.patience < 0:
        raise ConfigError("warmup_steps and patience: expected non-negative integers")
    if not 0.0 <= cfg.final_lr_fraction <= 1.0:
        raise ConfigError(f"final_lr_fraction = {cfg.final_lr_fraction}: expected a number in [0, 1]")


# ---- model pieces ---------------------------------------------------------------------------------
class ProjectionHead(nn.Module):
    """Per node type MLP ``[n, hidden] -> [n, projection_dim]`` (Dense, ReLU, Dense), loss only."""

    node_types: tuple[str, ...]
    hidden: int
    out: int

    @nn.compact
    def __call__(self, embeddings: Mapping[str, Array]) -> dict[str, Array]:
        out = {}
        for t in self.node_types:
            h = nn.relu(nn.Dense(self.hidden, name=f"{t}_hidden")(embeddings[t].astype(jnp.float32)))
            out[t] = nn.Dense(self.out, name=f"{t}_out")(h)
        return out


def nt_xent_loss(z1: Array, z2: Array, valid: Array | None = None, temperature: float = 0.5,
                 hard_negative_beta: float = 0.0) -> Array:
    """NT-Xent between two views of a batch, SimCLR style, with optional hard-negative weighting.

    Args:
      z1, z2: [B, d] projections of the same B nodes in view 1 and view 2 (normalised here).
      valid: [B] bool; invalid nodes (dropped in a view, padding) are neither anchors nor negatives.
      temperature: tau of ``sim / tau`` (cosine similarity).
      hard_negative_beta: Robinson et al. (2021) beta. Each anchor's negatives ``j`` (the other
        2B - 2 projections) are reweighted by ``w_j = exp(beta s_j) / mean_k exp(beta s_k)``
        (mean weight 1; ``s`` = logits), i.e. ``log sum_j w_j e^{s_j} = log n + LSE((1+beta) s) -
        LSE(beta s)``. beta = 0 is plain NT-Xent.

    Returns:
      scalar: mean over the 2 x valid anchors of ``-log(e^{s_pos} / (e^{s_pos} + sum_j w_j e^{s_j}))``.
    """
    b = z1.shape[0]
    if valid is None:
        valid = jnp.ones((b,), bool)
    z = jnp.concatenate([z1, z2], axis=0).astype(jnp.float32)
    # rsqrt(|z|^2 + eps), not z / |z|: the norm's gradient is NaN at an all-zero projection
    # (a node whose every edge a view masked embeds to the bias alone, often exactly 0).
    z = z * jax.lax.rsqrt(jnp.sum(z * z, axis=1, keepdims=True) + 1e-12)
    v = jnp.concatenate([valid, valid])
    logits = (z @ z.T) / temperature  # [2B, 2B]
    rows = jnp.arange(2 * b)
    positive_col = (rows + b) % (2 * b)
    positive = logits[rows, positive_col]
    is_negative = v[None, :] & (rows[None, :] != rows[:, None]) & (rows[None, :] != positive_col[:, None])
    neg_logits = jnp.where(is_negative, logits, _NEG)
    if hard_negative_beta > 0:
        beta = hard_negative_beta
        n_neg = jnp.maximum(is_negative.sum(axis=1), 1).astype(jnp.float32)
        log_neg = (jnp.log(n_neg) + jax.nn.logsumexp(jnp.where(is_negative, (1 + beta) * logits, _NEG), axis=1)
                   - jax.nn.logsumexp(jnp.where(is_negative, beta * logits, _NEG), axis=1))
    else:
        log_neg = jax.nn.logsumexp(neg_logits, axis=1)
    per_anchor = jnp.logaddexp(positive, log_neg) - positive
    anchor = v & (is_negative.sum(axis=1) > 0)
    return jnp.sum(jnp.where(anchor, per_anchor, 0.0)) / jnp.maximum(anchor.sum(), 1)


def contrast_node_types(cfg: PretrainConfig, graph: HeteroGraph) -> tuple[str, ...]:
    """Node types with a positive loss weight that the graph has, in schema order."""
    return tuple(t for t in graph.node_types if cfg.loss_weights.get(t, 0.0) > 0)


@dataclasses.dataclass(frozen=True)
class PretrainModel:
    """The static pieces a step closes over (modules and config); no arrays, no state."""

    encoder: HeteroGATEncoder
    projection: ProjectionHead
    cfg: PretrainConfig
    node_types: tuple[str, ...]

    def init(self, rng: Array, graph: HeteroGraph, node_index: Mapping[str, Array] | None = None) -> dict[str, Any]:
        """``{"encoder", "projection"}`` parameters; ``node_index`` where ``graph`` is a sampled subgraph."""
        k_enc, k_proj = jax.random.split(rng)
        enc = init_encoder(self.encoder, k_enc, graph, node_index)  # as fine-tuning initialises its encoder
        dummy = {t: np.zeros((1, self.cfg.encoder.hidden_dim), np.float32) for t in self.node_types}
        proj = init_params(self.projection, k_proj, dummy)
        return {"encoder": enc, "projection": proj}

    def encode_views(self, params, graph: HeteroGraph, rng: Array, deterministic: bool,
                     node_index: Mapping[str, Array] | None = None):
        """Two augmented views, encoded: ``({type: [2, N, hidden]}, {type: [2, N] bool kept})``.

        The views are ``vmap``-ed over their rng, so the encoder is traced (and compiled) once for
        both; each view draws its own augmentation and dropout. On a sampled subgraph
        (:class:`PretrainSampler`), ``node_index`` [N] maps its nodes to rows of the per-id
        embedding tables and its padding edges stay off in both views (the encoder masks them).
        """

        def one_view(key):
            k_aug, k_drop = jax.random.split(key)
            view, masks, nodes = augment(graph, k_aug, self.cfg.augment, return_node_masks=True)
            emb = self.encoder.apply({"params": params["encoder"]}, view, edge_masks=masks, node_index=node_index,
                                     deterministic=deterministic, rngs={"dropout": k_drop})
            return emb, nodes

        return jax.vmap(one_view)(jax.random.split(rng, 2))

    def view_losses(self, params, graph: HeteroGraph, rng: Array, deterministic: bool,
                    node_index: Mapping[str, Array] | None = None,
                    node_mask: Mapping[str, Array] | None = None) -> dict[str, Array]:
        """Per node type NT-Xent between two augmented views of ``graph`` (rng decides everything).

        ``node_index``, ``node_mask`` ({type: [N] bool}, False for padding): those of a sampled
        subgraph; padding nodes are never contrasted.
        """
        cfg = self.cfg
        k_views, k_batch = jax.random.split(rng)
        emb, nodes = self.encode_views(params, graph, k_views, deterministic, node_index)
        batch_keys = jax.random.split(k_batch, len(self.node_types))
        batch, valid = {}, {}
        for t, key in zip(self.node_types, batch_keys):
            n = graph.num_nodes[t]
            if n > cfg.batch_size:
                idx = jax.random.choice(key, n, (cfg.batch_size,), replace=False)
            else:
                idx = jnp.arange(n)
            batch[t] = emb[t][:, idx]  # [2, B, hidden]
            # A node dropped from either view has no neighbourhood there: it is not contrasted.
            valid[t] = nodes[t][0, idx] & nodes[t][1, idx]
            if node_mask is not None and t in node_mask:
                valid[t] = valid[t] & jnp.asarray(node_mask[t])[idx]
        z = self.projection.apply({"params": params["projection"]}, batch)  # [2, B, proj]
        return {t: nt_xent_loss(z[t][0], z[t][1], valid[t], cfg.temperature, cfg.hard_negative_beta)
                for t in self.node_types}

    def total_loss(self, losses: Mapping[str, Array]) -> Array:
        return sum(self.cfg.loss_weights[t] * losses[t] for t in self.node_types)


def make_model(graph: HeteroGraph, cfg: PretrainConfig) -> PretrainModel:
    node_types = contrast_node_types(cfg, graph)
    if not node_types:
        raise ConfigError(f"loss_weights: none of {sorted(cfg.loss_weights)} is a node type of the graph")
    return PretrainModel(encoder=make_encoder(graph, cfg.encoder),
                         projection=ProjectionHead(node_types, cfg.projection_hidden, cfg.projection_dim),
                         cfg=cfg, node_types=node_types)


#: The step index of :meth:`PretrainSampler.validation_batches` (training steps count from 0).
VALIDATION_STEP = 1 << 40


class PretrainSampler:
    """Neighbour-sampled subgraphs for GraphCL, each with its own candidate pool for edge adding.

    Subgraphs come from a :class:`~jaxfood.graph.sampling.NeighbourSampler` over the pretraining
    graph without a global candidate pool (candidate edges must not shape neighbourhoods); every
    sample may be a seed (no labels are used). Each subgraph then gets ``K`` candidate edges per
    ``edge_add`` relation among its own nodes (:func:`~jaxfood.train.augment.add_candidate_edges`),
    ``K`` fixed by the edge budget, so shapes never change. :meth:`batch` is deterministic in
    ``(seed, step, shard)``: the ``make_shard`` of :func:`jaxfood.train.loop.train_loop`.
    """

    def __init__(self, graph: HeteroGraph, cfg: PretrainConfig, sampler_cfg: SamplerConfig = SamplerConfig()):
        base = prepare_pretrain_graph(graph, dataclasses.replace(cfg.augment, edge_add={}), seed=cfg.seed)
        sampler_cfg = dataclasses.replace(sampler_cfg, num_hops=cfg.encoder.num_layers)
        self.sampler = NeighbourSampler(base, sampler_cfg, seed_pool=np.arange(base.num_nodes[schema.SAMPLE]))
        self.counts = subgraph_candidate_counts(cfg.augment, self.sampler)
        self.seed = int(sampler_cfg.seed)
        meta = self.sampler.meta
        # One static meta object for every subgraph: one compilation.
        self.meta = dataclasses.replace(meta, extra={**meta.extra, CANDIDATES_KEY: dict(self.counts)})

    def batch(self, step: int, shard: int = 0) -> SampledSubgraph:
        sub = self.sampler.batch(step, shard)
        rng = np.random.default_rng([self.seed, 0xADD, int(step), int(shard)])
        return add_candidate_edges(sub, self.counts, rng, self.meta)

    def validation_batches(self, count: int) -> list[SampledSubgraph]:
        """``count`` fixed subgraphs for the held-out view loss: the shards of a step index no run
        reaches (:data:`VALIDATION_STEP`), so they are the same in every epoch and run, and apart
        from the training stream."""
        return [self.batch(VALIDATION_STEP, i) for i in range(count)]


def make_pretrain_step(model: PretrainModel, optimizer: optax.GradientTransformation, *,
                       axis_name: str | tuple[str, ...]):
    """``step(state, batch, rng) -> (state, metrics)``, pure; run it with
    :func:`~jaxfood.train.data_parallel.data_parallel` (one device is a mesh of size 1).

    ``state``: ``{"params": {"encoder", "projection"}, "opt_state"}``. ``batch``: the full
    pretraining graph (:func:`prepare_pretrain_graph`; every shard contrasts its own pair of views)
    or a :class:`~jaxfood.graph.sampling.SampledSubgraph` of :class:`PretrainSampler` (every shard
    contrasts views of its own subgraph; padding nodes are never contrasted). ``metrics``: ``loss``
    (weighted total), ``loss/<Type>``, ``grad_norm`` (before clipping). Gradients and losses are
    averaged over ``axis_name`` (the layout's :attr:`~jaxfood.train.data_parallel.ShardLayout.axes`)
    with ``lax.pmean``: every shard applies the same update.
    """

    def loss_fn(params, graph, rng, node_index, node_mask):
        losses = model.view_losses(params, graph, rng, deterministic=not model.cfg.encoder_dropout,
                                   node_index=node_index, node_mask=node_mask)
        return model.total_loss(losses), losses

    def step(state, batch, rng):
        if isinstance(batch, SampledSubgraph):
            graph, node_index, node_mask = batch.graph, batch.node_index, batch.node_mask
        else:
            graph, node_index, node_mask = batch, None, None
        params = state["params"]
        (loss, losses), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, graph, rng, node_index, node_mask)
        grads = jax.lax.pmean(grads, axis_name)
        loss, losses = jax.lax.pmean((loss, losses), axis_name)
        updates, opt_state = optimizer.update(grads, state["opt_state"], params)
        metrics = {"loss": loss, "grad_norm": jnp.sqrt(squared_norm(grads))}
        metrics.update({f"loss/{t}": v for t, v in losses.items()})
        return {"params": optax.apply_updates(params, updates), "opt_state": opt_state}, metrics

    return step


def make_embed_fn(model: PretrainModel, readout_types: tuple[str, ...] = (schema.SAMPLE, schema.FOOD)):
    """``embed(params, graph) -> {type: [N, hidden]}``: the encoder's embeddings of ``readout_types``
    in the un-augmented graph (label and candidate edges off), without dropout, for the read-outs."""
    def embed(params, graph):
        embeddings = model.encoder.apply({"params": params["encoder"]}, graph, edge_masks=base_edge_masks(graph),
                                         deterministic=True)
        return {t: embeddings[t] for t in readout_types if t in embeddings}

    return embed


def make_eval_fn(model: PretrainModel, val_keys: Array,
                 readout_types: tuple[str, ...] = (schema.SAMPLE, schema.FOOD)):
    """``evaluate(params, graph) -> (val_metrics, embeddings)``: one compiled function for both.

    ``val_metrics`` = ``{"loss", "loss/<Type>"}``, the held-out view loss: the contrastive loss of
    fixed view pairs (``val_keys`` [V] keys, fixed for the run, so epochs are comparable), without
    dropout. ``embeddings``: :func:`make_embed_fn`. For full-graph runs; a sampled run's held-out
    view loss is :func:`make_subgraph_val_fn` on :meth:`PretrainSampler.validation_batches`.
    """
    embed = make_embed_fn(model, readout_types)

    def evaluate(params, graph):
        def one(key):
            losses = model.view_losses(params, graph, key, deterministic=True)
            return model.total_loss(losses), losses

        totals, losses = jax.vmap(one)(val_keys)
        val = {"loss": totals.mean()}
        val.update({f"loss/{t}": v.mean() for t, v in losses.items()})
        return val, embed(params, graph)

    return evaluate


def make_subgraph_val_fn(model: PretrainModel):
    """``val(params, subgraph, key) -> {"loss", "loss/<Type>"}``: the contrastive loss of one fixed
    pair of views of one sampled subgraph, without dropout (padding nodes are never contrasted).
    A sampled run's held-out view loss is its mean over
    :meth:`PretrainSampler.validation_batches` (one key each): the full graph's views would hold
    every edge's attention several times over (22 GB for the ``large`` preset's 36 M edges)."""
    def val(params, sub: SampledSubgraph, key):
        losses = model.view_losses(params, sub.graph, key, deterministic=True, node_index=sub.node_index,
                                   node_mask=sub.node_mask)
        return {"loss": model.total_loss(losses), **{f"loss/{t}": v for t, v in losses.items()}}

    return val
