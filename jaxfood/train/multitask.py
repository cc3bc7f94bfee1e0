"""The multi-task training step: all task losses, the balanced total, gradients and metrics.

One pure function ``step(state, graph, batch) -> (state, metrics)`` made by
:func:`make_train_step`. It has no Python-side state: randomness comes from ``batch.rng``, the
samples it may supervise from ``batch.seed_mask``, so it runs unchanged under ``jax.jit`` (one
compilation per run) and under ``jax.pmap`` over sampled subgraphs -- give the step the pmap axis
name and it averages gradients, task losses and the weighting statistics with ``lax.pmean``.

Tasks (``TASKS``): ``food_classification`` (cross-entropy), ``nutrition`` (semi-hard triplet loss
on projected Food embeddings of the foods not held out of the nutrition training + MSE of the
nutrient head), ``salient_molecules`` (sufficiency of the
top-k molecules of each supervised sample's own food branch, optional sparsity and comprehensiveness). Per-task gradients are obtained from one forward pass
and a ``vmap`` over the task axis of its VJP; the balanced gradient is their combination with the
derivative of the weighting's total, and the per-task gradients on the shared encoder give the
monitoring statistics (norms, pairwise cosine similarities: conflict between tasks) and GradNorm's
norms on the last shared layer.

Label hygiene: in every step a random fraction (``supervised_fraction``) of the seed samples with a
known food is supervised, and exactly those samples' label edges (``is_instance_of`` and its
reverse) are switched off through the encoder's edge masks -- the label trick of Wang et al.
("Bag of Tricks for Node Classification with GNNs", 2021): no sample is ever supervised while it
sees its own food, and the other training samples keep their label edges as they do at test time.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Literal

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxfood.graph import schema
from jaxfood.graph.hetero_graph import HeteroGraph
from jaxfood.graph.splits import held_out_food_mask
from jaxfood.models.heads import CLASS_ATTENTION, MultiTaskModel
from jaxfood.train import salient_molecules as sal
from jaxfood.train import task_weighting as tw
from jaxfood.train.food_classification import accuracy, cross_entropy_loss
from jaxfood.train.nutrition_alignment import nutrient_mse_loss, semi_hard_triplet_loss
from jaxfood.train.optimizer import squared_norm

TASKS = tw.TASKS
WEIGHTING_KEY = "task_weighting"


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Task losses.

    ``supervised_fraction``: fraction of the seed samples supervised (and label-masked) per step.
    ``mask_label_edges``: switch the supervised samples' label edges off (the label trick); False
    only for ablations -- the leakage test shows what it prevents.
    ``class_weighting``: none | balanced (inverse class frequency among the training samples).
    ``num_positives``: nearest foods by nutrient profile that count as triplet positives (capped at
    the number of foods - 2). 20 of the 65 embedded foods: with only the 3 nearest the triplets
    shaped the neighbourhoods alone, and fine-tuning kept the global Food-distance ranking below
    the pretrained-only probe (Spearman 0.39 vs 0.42); with 20 it is 0.80 vs 0.69 (seed 0).
    ``salient_top_k``: molecules kept by the sufficiency term; ``salient_temperature``: softness of
    the straight-through top-k; ``salient_sparsity``: topk_mass (attention mass outside each
    sample's top-k) or entropy (normalised entropy of the weights), weighted by
    ``salient_sparsity_weight`` (default 0: with the class-attention log-sum-exp readout the
    importances are the logit's own gradient, and forcing them onto k molecules cost accuracy and
    precision on the embedded data); ``salient_warmup_steps``: the salient loss is ramped in linearly
    over these steps (counted in calls of the step). ``salient_comprehensiveness_weight``: weight of
    the comprehensiveness term (ERASER, DeYoung et al. 2020): the probability of a supervised
    sample's food with its top-k molecules removed (both edge directions and the pooling) is
    minimised, so the prediction must rest on the molecules the scores name (fidelity+); costs
    one more encoder pass (0: not computed).
    ``wide_l2``: L2 penalty ``wide_l2 * ||W||^2`` on the wide (linear) paths of the classifier and
    the nutrient head, added to their task's loss (the logistic regression's ``C = 1`` on ~400
    samples is ~1e-3 per mean-loss unit; 1e-2 was as good or better on the embedded data with the
    ``wide`` optimizer group, docs/experiments.md). ``wide_aux_weight``: the wide paths alone are
    also trained on each task (cross-entropy / MSE of the linear prediction), so that they reach
    what the baselines reach even where the deep path fits the training samples first and leaves
    the sum no gradient (0: off). ``label_smoothing``: 0 by default: with the classifier starting at
    the logistic regression (``wide_init=fit``), smoothing the targets moved it away from that fit
    and cost test accuracy (docs/experiments.md §5).
    """

    label_smoothing: float = 0.0
    mask_label_edges: bool = True
    class_weighting: Literal["none", "balanced"] = "none"
    supervised_fraction: float = 0.5
    triplet_margin: float = 0.2
    num_positives: int = 20
    triplet_weight: float = 1.0
    nutrient_mse_weight: float = 1.0
    salient_top_k: int = 10
    salient_temperature: float = 0.1
    salient_sparsity: Literal["topk_mass", "entropy"] = "topk_mass"
    salient_sparsity_weight: float = 0.0
    salient_warmup_steps: int = 0
    sufficiency_trains: Literal["scores", "heads"] = "heads"
    salient_comprehensiveness_weight: float = 0.0
    wide_l2: float = 1e-2
    wide_aux_weight: float = 1.0


@flax.struct.dataclass
class Batch:
    """What varies between steps: ``seed_mask`` [S] bool samples eligible for supervision (the
    training split, or the seed samples of a sampled subgraph), ``rng`` a PRNG key (derive it from
    the step for reproducible resumes), ``node_index`` type -> [n] rows of the per-id tables
    (sampled subgraphs; None for the full graph)."""

    seed_mask: Any
    rng: Any
    node_index: Any = None


@flax.struct.dataclass
class TrainState:
    """``step`` counts calls of the step (micro-batches); ``params`` = model params + ``task_weighting``."""

    step: Any
    params: Any
    opt_state: Any
    weighting_state: Any


def split_params(params):
    """``(model_params, weighting_params)`` of the training params."""
    model_params = {k: v for k, v in params.items() if k != WEIGHTING_KEY}
    return model_params, params.get(WEIGHTING_KEY, {})


def init_train_state(model: MultiTaskModel, weighting: tw.WeightingConfig, tx: optax.GradientTransformation,
                     rng, graph: HeteroGraph, encoder_params=None) -> TrainState:
    """Fresh state; ``encoder_params`` (pretrained) replaces the initial encoder where given.
    :meth:`MultiTaskModel.init` draws the parameters (:func:`jaxfood.models.initialise.init_params`)."""
    params = model.init(rng, graph)
    if encoder_params is not None:
        params["encoder"] = jax.device_put(encoder_params)
    wparams, wstate = tw.init_weighting(weighting, TASKS)
    params[WEIGHTING_KEY] = wparams
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      weighting_state=wstate)


def last_shared_layer(encoder_params) -> str:
    """Name of the encoder's last GAT layer (GradNorm's ``W``)."""
    layers = sorted((k for k in encoder_params if k.startswith("layer_")), key=lambda k: int(k.split("_")[1]))
    return layers[-1]


def _triplet_masks(food_nutrients, num_positives: int, trained=None):
    """Nutrient-similarity positives/negatives in jnp (inside the step; see nutrition_alignment).

    ``trained`` [F] bool (static numpy; None: every food): the foods whose profiles training may
    see -- the others (held out, :func:`jaxfood.graph.splits.held_out_food_mask`) are neither anchor,
    positive nor negative. ``num_positives`` is capped at ``num_trained_foods - 2``: every anchor
    keeps at least one negative, so the triplet term does not silently vanish on a graph with few foods.
    """
    x = food_nutrients.astype(jnp.float32)
    num_foods = x.shape[0]
    trained = np.ones(num_foods, bool) if trained is None else np.asarray(trained, bool)
    sq = jnp.sum(x * x, 1)
    d2 = jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * x @ x.T, 0.0)
    eye = jnp.eye(num_foods, dtype=bool)
    d2 = jnp.where(eye | ~trained[None, :], jnp.inf, d2)
    k = min(max(num_positives, 0), max(int(trained.sum()) - 2, 0))
    order = jnp.argsort(d2, axis=1, stable=True)[:, :k]
    pair = jnp.asarray(trained[:, None] & trained[None, :])
    positive = jnp.zeros((num_foods, num_foods), bool).at[jnp.arange(num_foods)[:, None], order].set(True) & pair
    negative = ~positive & ~eye & pair
    return positive, negative


def _class_weights(graph: HeteroGraph, seed_mask, mode: str):
    if mode == "none":
        return None
    num_foods = graph.num_nodes[schema.FOOD]
    labels = graph.sample_food
    use = seed_mask & (labels >= 0)
    counts = jax.ops.segment_sum(use.astype(jnp.float32), jnp.where(use, labels, 0), num_foods)
    present = counts > 0
    n = jnp.sum(use)
    return jnp.where(present, n / (jnp.maximum(jnp.sum(present), 1) * jnp.where(present, counts, 1.0)), 0.0)


def supervision(cfg: LossConfig, graph: HeteroGraph, batch: Batch):
    """``(supervised [S] bool, label_masks, rng)``: this step's supervised samples, whose label
    edges are switched off, and the key left for dropout."""
    S = graph.num_nodes[schema.SAMPLE]
    k_sup, rng = jax.random.split(batch.rng)
    eligible = jnp.asarray(batch.seed_mask) & (graph.sample_food >= 0)
    if cfg.supervised_fraction >= 1.0:
        supervised = eligible
    else:
        supervised = eligible & (jax.random.uniform(k_sup, (S,)) < cfg.supervised_fraction)
    hidden = supervised if cfg.mask_label_edges else jnp.zeros_like(supervised)
    return supervised, sal.label_edge_masks(graph, hidden), rng


def head_losses(model: MultiTaskModel, cfg: LossConfig, params, embeddings, graph: HeteroGraph, batch: Batch,
                supervised, label_masks, rng, deterministic: bool = False, step=None):
    """``(losses [T], aux)`` of the three tasks given the encoder's ``embeddings`` of this step.

    ``params`` must hold the heads and the encoder; the encoder enters only the forward pass that
    re-encodes the graph with each supervised sample restricted to its top-k molecules
    (sufficiency), under a stop-gradient: that pass measures the encoder, it does not train it.
    """
    S = graph.num_nodes[schema.SAMPLE]
    contains = graph.edges[schema.CONTAINS]
    labels = graph.sample_food
    # With class attention the importances of a supervised sample are those of its own food's branch.
    explain = jnp.where(supervised, labels, -1)
    out = model.heads(params, graph, embeddings, deterministic=deterministic, rng=rng, explain_class=explain)
    # -- food classification
    ce = cross_entropy_loss(out.food_logits, labels, supervised, cfg.label_smoothing,
                            _class_weights(graph, batch.seed_mask, cfg.class_weighting))
    # -- nutrition alignment
    if graph.food_nutrients.shape[1] == 0:  # no nutrient table: the task is off (a mean over 0 nutrients is NaN)
        mse = triplet = jnp.zeros((), jnp.float32)
    else:
        safe_labels = jnp.where(labels >= 0, labels, 0)
        mse = nutrient_mse_loss(out.nutrient_profile, graph.food_nutrients[safe_labels], supervised)
        mse = mse + cfg.wide_l2 * wide_penalty(params["nutrient_head"])
        if cfg.wide_aux_weight > 0 and out.wide_nutrient_profile is not None:
            mse = mse + cfg.wide_aux_weight * nutrient_mse_loss(out.wide_nutrient_profile,
                                                                graph.food_nutrients[safe_labels], supervised)
        # Held-out foods: their profiles are test data (Food-level metrics), never a triplet.
        positive, negative = _triplet_masks(graph.food_nutrients, cfg.num_positives, ~held_out_food_mask(graph))
        triplet = semi_hard_triplet_loss(out.food_projection, positive, negative, cfg.triplet_margin)
    ce = ce + cfg.wide_l2 * wide_penalty(params["classifier"])
    if cfg.wide_aux_weight > 0 and out.wide_food_logits is not None:
        ce = ce + cfg.wide_aux_weight * cross_entropy_loss(out.wide_food_logits, labels, supervised,
                                                           cfg.label_smoothing)
    nutrition = cfg.triplet_weight * triplet + cfg.nutrient_mse_weight * mse
    # -- salient molecules: the top-k molecules alone must reproduce the prediction
    senders = contains.senders
    hard = sal.segment_topk_mask(jax.lax.stop_gradient(out.molecule_logits), senders, S, cfg.salient_top_k)
    on_supervised = supervised[senders]
    keep = hard | ~on_supervised
    gate = sal.straight_through_topk(out.molecule_logits, hard, senders, S, cfg.salient_temperature)
    if model.heads_config.pool_top_k <= 0:
        gate = jnp.where(on_supervised, gate, 1.0)  # the others pool as in the full pass
    # Only the attention scores learn from sufficiency: encoder, instance embeddings and classifier
    # are held fixed in this branch, so it cannot be satisfied by making the classifier ignore
    # its input (a constant prediction is trivially "sufficient").
    fixed = jax.lax.stop_gradient(params)
    if cfg.sufficiency_trains == "heads":
        scorer_params = {**fixed, "salient_pool": params["salient_pool"], "classifier": params["classifier"]}
    else:
        scorer_params = {**fixed, "salient_pool": _attention_only(params["salient_pool"], fixed["salient_pool"])}
    emb_k = model.encode(fixed, graph, edge_masks=sal.merge_edge_masks(label_masks, sal.contains_edge_masks(keep)),
                         node_index=batch.node_index, deterministic=True)
    emb_k = jax.lax.stop_gradient({**embeddings, **emb_k})  # molecule inputs do not depend on edges
    food_logits_k = model.heads(scorer_params, graph, emb_k, gate=gate, stats_mask=~supervised,
                                explain_class=explain).food_logits
    sufficiency = sal.sufficiency_loss(out.food_logits, food_logits_k, supervised)
    if cfg.salient_comprehensiveness_weight > 0:
        removed = ~(hard & on_supervised)
        emb_r = model.encode(fixed, graph, edge_masks=sal.merge_edge_masks(label_masks, sal.contains_edge_masks(removed)),
                             node_index=batch.node_index, deterministic=True)
        emb_r = jax.lax.stop_gradient({**embeddings, **emb_r})
        logits_r = model.heads(scorer_params, graph, emb_r, pool_mask=removed, stats_mask=~supervised,
                               explain_class=explain).food_logits
        comprehensiveness = sal.comprehensiveness_loss(logits_r, labels, supervised)
    else:
        comprehensiveness = jnp.zeros((), jnp.float32)
    entropy = sal.attention_entropy(out.molecule_weights, senders, S, supervised)
    outside_mass = sal.mass_outside_topk(out.molecule_weights, hard, senders, S, supervised)
    sparsity = entropy if cfg.salient_sparsity == "entropy" else outside_mass
    salient = sufficiency + cfg.salient_sparsity_weight * sparsity + cfg.salient_comprehensiveness_weight * comprehensiveness
    if cfg.salient_warmup_steps > 0 and step is not None:
        # Importances mean something once the classifier does: ramp the salient task in.
        salient = salient * jnp.minimum(1.0, (step + 1.0) / cfg.salient_warmup_steps)

    losses = jnp.stack([ce, nutrition, salient])
    n_sup = jnp.maximum(jnp.sum(supervised), 1)
    agree = (jnp.argmax(food_logits_k, -1) == jnp.argmax(out.food_logits, -1)) & supervised
    aux = {
        "loss/cross_entropy": ce, "loss/triplet": triplet, "loss/nutrient_mse": mse,
        "loss/sufficiency": sufficiency, "loss/comprehensiveness": comprehensiveness, "loss/attention_entropy": entropy, "loss/outside_topk_mass": outside_mass,
        "train/accuracy": accuracy(out.food_logits, labels, supervised),
        "train/topk_agreement": jnp.sum(agree) / n_sup,
        "train/supervised": jnp.sum(supervised).astype(jnp.float32),
    }
    return losses, aux


def wide_penalty(head_params) -> Any:
    """``||W_wide||^2`` of a head (0 without a wide path)."""
    kernel = head_params.get("wide_kernel") if hasattr(head_params, "get") else None
    return jnp.zeros((), jnp.float32) if kernel is None else jnp.sum(jnp.square(kernel.astype(jnp.float32)))


def _attention_only(pool_params, fixed_pool_params):
    """The pooling parameters with only the attention-scoring ones (``attention*``, also inside the
    class-attention pooling) trainable, the rest from ``fixed_pool_params``."""
    out = {}
    for name, p in pool_params.items():
        if name == CLASS_ATTENTION:
            out[name] = _attention_only(p, fixed_pool_params[name])
        else:
            out[name] = p if name.startswith("attention") else fixed_pool_params[name]
    return out


def encode_for_step(model: MultiTaskModel, encoder_params, graph: HeteroGraph, batch: Batch, label_masks, rng,
                    deterministic: bool = False):
    """The shared representation of one step: encoder embeddings with the label masks applied (and
    the molecule input embeddings the pooling reads)."""
    return model.represent({"encoder": encoder_params}, graph, edge_masks=label_masks, node_index=batch.node_index,
                           deterministic=deterministic, rng=rng)


def task_losses(model: MultiTaskModel, cfg: LossConfig, params, graph: HeteroGraph, batch: Batch,
                deterministic: bool = False, step=None):
    """``(losses [T], aux)``: the three task losses of one step (encoder + heads)."""
    supervised, label_masks, rng = supervision(cfg, graph, batch)
    k_enc, k_heads = jax.random.split(rng)
    embeddings = encode_for_step(model, params["encoder"], graph, batch, label_masks, k_enc, deterministic)
    return head_losses(model, cfg, params, embeddings, graph, batch, supervised, label_masks, k_heads, deterministic,
                       step)


def _flatten_rows(tree):
    """Pytree with leaves [T, ...] -> [T, P] (the leaves' entries concatenated)."""
    leaves = jax.tree_util.tree_leaves(tree)
    return jnp.concatenate([x.reshape(x.shape[0], -1).astype(jnp.float32) for x in leaves], axis=1)


def make_train_step(model: MultiTaskModel, loss_cfg: LossConfig, weighting: tw.WeightingConfig,
                    tx: optax.GradientTransformation, axis_name: str | None = None,
                    task_gradient_scope: Literal["representation", "encoder"] = "representation"):
    """Returns ``step(state, graph, batch) -> (state, metrics)``; wrap it in ``jax.jit`` or
    ``jax.pmap(..., axis_name=axis_name)``. ``metrics`` is a flat dict of scalars.

    ``task_gradient_scope`` says where the per-task gradients (monitoring norms and cosines,
    GradNorm's ``G_t``) are taken:

    * ``representation`` (default, cheap): on the shared representation, the encoder output
      (Sample, Molecule and Food embeddings). The heads are differentiated once per task, the
      encoder once, with the balanced cotangent.
    * ``encoder``: on all encoder parameters (GradNorm on the last GAT layer, as in Chen et al.);
      costs one encoder backward pass per task.
    """
    T = len(TASKS)
    if task_gradient_scope not in ("representation", "encoder"):
        raise ValueError(f"task_gradient_scope must be 'representation' or 'encoder', got {task_gradient_scope!r}")

    def pmean(x):
        return jax.lax.pmean(x, axis_name) if axis_name is not None else x

    def balance(losses, wparams):
        def total_fn(task_loss, w):
            return tw.weighted_total(weighting, task_loss, w, TASKS)

        return jax.value_and_grad(total_fn, argnums=(0, 1))(losses, wparams)

    def combine(d_losses, per_task):
        return jax.tree_util.tree_map(lambda g: jnp.tensordot(d_losses, g, axes=1), per_task)

    def step(state: TrainState, graph: HeteroGraph, batch: Batch):
        model_params, wparams = split_params(state.params)
        eye = jnp.eye(T, dtype=jnp.float32)
        if task_gradient_scope == "representation":
            supervised, label_masks, rng = supervision(loss_cfg, graph, batch)
            k_enc, k_heads = jax.random.split(rng)
            head_params = {k: v for k, v in model_params.items() if k != "encoder"}
            embeddings, encoder_vjp = jax.vjp(
                lambda pe: encode_for_step(model, pe, graph, batch, label_masks, k_enc), model_params["encoder"])

            def heads_fn(hp, emb):
                return head_losses(model, loss_cfg, {**hp, "encoder": model_params["encoder"]}, emb, graph, batch,
                                   supervised, label_masks, k_heads, step=state.step)

            losses, heads_vjp, aux = jax.vjp(heads_fn, head_params, embeddings, has_aux=True)
            per_task_heads, per_task_repr = jax.vmap(heads_vjp)(eye)
            losses, aux = pmean(losses), pmean(aux)
            total, (d_losses, w_grads) = balance(losses, wparams)
            grads = combine(d_losses, per_task_heads)
            (grads["encoder"],) = encoder_vjp(combine(d_losses, per_task_repr))
            shared_rows = _flatten_rows(per_task_repr)
            gram = pmean(shared_rows @ shared_rows.T)
            shared_gram = gram
        else:
            losses, vjp_fn, aux = jax.vjp(lambda p: task_losses(model, loss_cfg, p, graph, batch, step=state.step),
                                          model_params, has_aux=True)
            (per_task,) = jax.vmap(vjp_fn)(eye)
            losses, aux = pmean(losses), pmean(aux)
            total, (d_losses, w_grads) = balance(losses, wparams)
            grads = combine(d_losses, per_task)
            last = pmean(_flatten_rows(per_task["encoder"][last_shared_layer(model_params["encoder"])]))
            shared_gram = last @ last.T
            rows = _flatten_rows(per_task["encoder"])
            gram = pmean(rows @ rows.T)
        wstate = tw.update_state(state.weighting_state, losses)
        shared_norms = jnp.sqrt(jnp.maximum(jnp.diagonal(shared_gram), 0.0))
        extra = {}
        if weighting.method == "gradnorm":
            w_grads, gn = tw.gradnorm_gradient(weighting, wparams, wstate, losses, shared_norms)
            w_grads = {"weights": w_grads}
            extra["gradnorm/loss"] = gn["gradnorm_loss"]
        grads = pmean(grads)
        grads[WEIGHTING_KEY] = w_grads
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        params[WEIGHTING_KEY] = tw.renormalise(weighting, params[WEIGHTING_KEY])

        # Task balancing analysis: per-task gradient norms and pairwise cosines (conflict).
        norms = jnp.sqrt(jnp.maximum(jnp.diagonal(gram), 0.0))
        cosine = gram / jnp.maximum(norms[:, None] * norms[None, :], 1e-12)
        weights = tw.task_weights(weighting, wparams, TASKS)
        metrics = {"loss/total": total, **aux, **extra}
        for i, task in enumerate(TASKS):
            metrics[f"loss/{task}"] = losses[i]
            metrics[f"weight/{task}"] = weights[i]
            metrics[f"task_grad_norm/{task}"] = norms[i]
            if weighting.method == "uncertainty":
                metrics[f"log_var/{task}"] = wparams["log_vars"][i]
        for i, j in itertools.combinations(range(T), 2):
            metrics[f"task_grad_cosine/{TASKS[i]}__{TASKS[j]}"] = cosine[i, j]
        squared = {group: squared_norm(g) for group, g in grads.items()}
        metrics["grad_norm/total"] = jnp.sqrt(sum(squared.values()))
        for group, value in squared.items():
            metrics[f"grad_norm/{group}"] = jnp.sqrt(value)
        new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state, weighting_state=wstate)
        return new_state, metrics

    return step


def make_predict_fn(model: MultiTaskModel):
    """Jitted deterministic forward pass ``predict(params, graph, edge_masks=None) -> ModelOutputs``."""

    @jax.jit
    def predict(params, graph, edge_masks=None):
        model_params, _ = split_params(params)
        return model.apply(model_params, graph, edge_masks=edge_masks)

    return predict
