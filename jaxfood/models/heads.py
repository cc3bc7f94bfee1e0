"""Task heads on top of the heterogeneous GAT encoder, and the multi-task model that joins them.

The attention poolings of each sample's molecules (:class:`~jaxfood.models.pooling.GatedAttentionPool`,
:class:`~jaxfood.models.pooling.ClassAttentionPool`) are in :mod:`jaxfood.models.pooling`.

* :class:`FoodPosteriorNutrients` -- the nutrient profile expected under the food posterior.
* :class:`FoodClassifier` -- sample embedding + pooled molecule representation -> food logits.
* :class:`NutrientHead` -- sample embedding -> normalised nutrient profile (a nutrient estimate for
  an unknown sample).
* :class:`FoodProjection` -- Food embedding -> the space of the nutrition triplet loss.
* :class:`MultiTaskModel` -- encoder + the four heads; params
  ``{"encoder", "classifier", "nutrient_head", "food_projection", "salient_pool"}``.

Everything here is a pure function of (params, graph); no file is read (``models`` never reads files).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxfood.graph import schema
from jaxfood.graph.hetero_graph import HeteroGraph
from jaxfood.graph.sampling import mask_relation_padding
from jaxfood.models.encoder import init_encoder, make_encoder
from jaxfood.models.initialise import init_params
from jaxfood.models.pooling import (
    ClassAttentionPool,
    GatedAttentionPool,
    branch_weights,
)
from jaxfood.models.profile import sample_profile


class _MLP(nn.Module):
    hidden_dim: int
    out_dim: int
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        x = nn.elu(nn.Dense(self.hidden_dim, name="hidden")(x))
        x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
        return nn.Dense(self.out_dim, name="out")(x)


class _WideAndDeep(nn.Module):
    """``MLP([sample embedding, pooled]) + profile @ W_wide`` -> [S, out_dim].

    The wide path (``num_molecules`` > 0) is a linear map of the sample's standardised intensity
    profile (:class:`~jaxfood.models.profile.SampleProfile`), the features of the logistic
    regression / ridge baselines, so those baselines are special cases of the head (deep path 0).
    Its kernel ``wide_kernel`` [M, out_dim] starts at 0 (like the baselines' solvers) and is
    L2-regularised by the loss (``LossConfig.wide_l2``): 5-10 training samples per food and
    hundreds to thousands of molecules. Without a profile (``profile=None``) only the deep path
    runs (the kernel must still be created at ``init``: pass one there).
    """

    out_dim: int
    hidden_dim: int = 64
    dropout: float = 0.0
    num_molecules: int = 0

    @nn.compact
    def __call__(self, sample_embeddings, pooled, profile=None, deterministic: bool = True):
        x = jnp.concatenate([sample_embeddings, pooled], -1)
        # A graph without nutrients asks for [S, 0]: one unused output keeps the parameter tree the
        # same shape of tree (a Dense of width 0 cannot be initialised).
        width = max(self.out_dim, 1)
        out = _MLP(self.hidden_dim, width, self.dropout, name="mlp")(x, deterministic)
        if self.num_molecules:
            kernel = self.param("wide_kernel", nn.initializers.zeros, (self.num_molecules, width))
            if profile is not None:
                out = out + profile.linear(kernel)
        return out[..., :self.out_dim]


class FoodClassifier(_WideAndDeep):
    """[S, hidden] sample embeddings + [S, pool_dim] pooled molecules (+ the samples' intensity
    profiles, wide path) -> [S, num_foods] logits."""


class NutrientHead(_WideAndDeep):
    """[S, hidden] sample embeddings + [S, pool_dim] pooled molecules (+ the samples' intensity
    profiles, wide path) -> [S, num_nutrients] normalised nutrient profile."""


class FoodPosteriorNutrients(nn.Module):
    """The nutrient profile a sample is expected to have under the classifier's posterior:
    ``softmax(food_logits * exp(log_scale)) @ food_nutrients`` -> [S, N].

    A sample's nutrient profile *is* its food's (the MSE target), so a good food posterior is a
    good nutrient estimate; a ridge on the intensities cannot use that structure. The logits enter
    under a stop-gradient (the nutrition task does not train the classifier); ``log_scale`` (a
    learned inverse temperature, starting at 1) lets the nutrition loss sharpen or soften the
    posterior. ``visible`` [F] bool: foods whose profiles the model may use (the others get no
    mass; the posterior is renormalised over the visible foods).
    """

    @nn.compact
    def __call__(self, food_logits, food_nutrients, visible=None):
        log_scale = self.param("log_scale", nn.initializers.zeros, ())
        logits = jax.lax.stop_gradient(food_logits).astype(jnp.float32) * jnp.exp(log_scale)
        if visible is not None:
            logits = jnp.where(visible[None, :], logits, -jnp.inf)
        return jax.nn.softmax(logits, -1) @ jnp.asarray(food_nutrients, jnp.float32)


class FoodProjection(nn.Module):
    """[F, hidden] Food embeddings -> [F, projection_dim] (space of the nutrition triplet loss)."""

    projection_dim: int = 32
    hidden_dim: int = 64

    @nn.compact
    def __call__(self, food_embeddings):
        return _MLP(self.hidden_dim, self.projection_dim, 0.0, name="mlp")(food_embeddings)


# ---- the multi-task model --------------------------------------------------------------------------
#: Key of the encoder's *input* molecule embeddings in a representation dict (see
#: :meth:`MultiTaskModel.represent`).
MOLECULE_INPUT = "Molecule:input"
#: Key of the class-attention pooling's parameters inside ``params["salient_pool"]``.
CLASS_ATTENTION = "class_attention"
#: Key of :class:`FoodPosteriorNutrients`' parameters inside ``params["nutrient_head"]``.
POSTERIOR = "food_posterior"
#: Names of the molecule-importance scorers, implemented in :mod:`jaxfood.eval.molecules` (named
#: here, below train/ and eval/, so that the fine-tuning config can list and check them).
SCORER_NAMES: tuple[str, ...] = ("intensity_attribution", "input_gradient", "class_attention", "attention",
                                  "gat_attention", "gradient")


@dataclasses.dataclass(frozen=True)
class HeadsConfig:
    """Sizes of the task heads (the encoder has its own ``EncoderConfig``).

    ``pool_molecule_inputs``: the attention pooling reads each molecule's final encoder embedding
    *and* its input embedding (the encoder's own ``embed_Molecule`` / ``project_Molecule``, a skip
    connection). The GAT messages carry no root/self term, so with one shared input vector for all
    samples every molecule leaves the first layer with the same vector, and an even number of
    layers leaves no molecule identity in the sample embeddings; the skip connection restores it.

    ``class_attention``: food logits from :class:`ClassAttentionPool` (one attention branch per
    food; its weights are the molecule importances), added to the MLP classifier's logits where
    ``classifier_mlp`` (the MLP on [sample embedding, gated-pooled molecules]; without it the food
    prediction rests on the class branches alone, and the gated pooling feeds the nutrient head).
    Without ``class_attention`` the MLP classifier alone predicts and the importances are the
    gated pooling's weights.

    ``wide``: the classifier and the nutrient head add a linear map of the sample's standardised
    intensity profile (the logistic-regression / ridge features; see :class:`_WideAndDeep`).

    ``nutrients_from_foods``: the nutrient head adds the nutrient profile expected under the food
    posterior (:class:`FoodPosteriorNutrients`); its MLP and wide path then learn the residual.
    """

    hidden_dim: int = 64
    pool_dim: int = 64
    attention_dim: int = 32
    projection_dim: int = 32
    dropout: float = 0.1
    pool_molecule_inputs: bool = True
    standardise_pooled: bool = True
    attention_logit_bound: float = 3.0
    pool_top_k: int = 0
    pool_temperature: float = 0.1
    class_attention: bool = True
    class_readout: str = "lse"
    classifier_mlp: bool = True
    wide: bool = True
    nutrients_from_foods: bool = True


@flax.struct.dataclass
class ModelOutputs:
    """Everything one forward pass of :class:`MultiTaskModel` produces.

    ``embeddings``: node type -> [N_type, hidden]; ``food_logits`` [S, F]; ``nutrient_profile``
    [S, N]; ``food_projection`` [F, P]; ``pooled`` [S, pool_dim]; ``molecule_weights`` [E] the
    attention weight of every ``contains_molecule`` edge (sums to 1 over a sample's edges): in the
    class-attention branch of the sample's explained (default: predicted) food, or without class
    attention the gated pooling's; ``molecule_logits`` [E] their logits; ``attention``: list over layers of
    relation key -> [E_rel, heads] (empty unless requested); ``wide_food_logits`` [S, F] and
    ``wide_nutrient_profile`` [S, N] the wide paths' own parts of ``food_logits`` /
    ``nutrient_profile`` (None without ``heads_config.wide``).
    """

    embeddings: dict[str, Any]
    food_logits: Any
    nutrient_profile: Any
    food_projection: Any
    pooled: Any
    molecule_weights: Any
    molecule_logits: Any
    attention: Any = None
    wide_food_logits: Any = None
    wide_nutrient_profile: Any = None


#: The top-level entries of a :class:`MultiTaskModel`'s parameters.
MODEL_PARAMS: tuple[str, ...] = ("encoder", "classifier", "nutrient_head", "food_projection", "salient_pool")


@dataclasses.dataclass(frozen=True, eq=False)
class MultiTaskModel:
    """Encoder + task heads as pure functions of ``params``.

    ``params = {"encoder": <HeteroGATEncoder params>, "classifier": ..., "nutrient_head": ...,
    "food_projection": ..., "salient_pool": ...}``; with class attention its parameters are
    ``salient_pool["class_attention"]`` (the salient-molecule head's optimizer group). Extra top-level entries (e.g. the task-weighting
    parameters that training keeps beside them) are ignored by :meth:`apply`.
    """

    encoder: nn.Module
    classifier: FoodClassifier
    nutrient_head: NutrientHead
    food_projection: FoodProjection
    salient_pool: GatedAttentionPool
    encoder_config: Any
    heads_config: HeadsConfig
    class_pool: ClassAttentionPool | None = None
    food_posterior: FoodPosteriorNutrients | None = None

    def init(self, rng, graph: HeteroGraph) -> dict[str, Any]:
        """Parameters of the encoder and of every head, each module's drawn parameter by parameter
        (:func:`~jaxfood.models.initialise.init_params`): the encoder's as pretraining draws them
        (:func:`~jaxfood.models.encoder.init_encoder`), then :meth:`init_heads`."""
        keys = jax.random.split(rng, 5)
        return {"encoder": init_encoder(self.encoder, keys[0], graph), **self.init_heads(keys, graph)}

    def init_heads(self, keys, graph: HeteroGraph) -> dict[str, Any]:
        """The heads' parameters (:meth:`init` without the encoder's), from :meth:`init`'s 5 keys.
        Initialisers read shapes only: the inputs are zeros of the shapes the heads see."""
        _, k_cls, k_nut, k_proj, k_pool = keys
        hidden = self._hidden_dim()
        S = graph.num_nodes[schema.SAMPLE]
        contains = graph.edges[schema.CONTAINS]
        width = hidden + (int(self.encoder_config.embedding_dim) if self.heads_config.pool_molecule_inputs else 0)
        mol = np.zeros((graph.num_nodes[schema.MOLECULE], width), np.float32)
        edges = (contains.senders, contains.receivers, contains.attributes)
        pool_params = init_params(self.salient_pool, k_pool, mol, *edges, S)
        if self.class_pool is not None:
            pool_params = {**pool_params, CLASS_ATTENTION: init_params(
                self.class_pool, jax.random.fold_in(k_pool, 1), mol, *edges, S)}
        sample = np.zeros((S, hidden), np.float32)
        pooled = np.zeros((S, self.heads_config.pool_dim), np.float32)
        profile = None
        if self.heads_config.wide:
            profile = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype), jax.eval_shape(sample_profile, graph))
        nutrient_params = init_params(self.nutrient_head, k_nut, sample, pooled, profile)
        if self.food_posterior is not None:
            F = graph.num_nodes[schema.FOOD]
            nutrient_params = {**nutrient_params, POSTERIOR: init_params(
                self.food_posterior, k_nut, np.zeros((S, F), np.float32), graph.food_nutrients)}
        return {
            "classifier": init_params(self.classifier, k_cls, sample, pooled, profile),
            "nutrient_head": nutrient_params,
            "food_projection": init_params(self.food_projection, k_proj, sample),
            "salient_pool": pool_params,
        }

    def own_params(self, params) -> dict[str, Any]:
        """``params`` without the extra top-level entries (:data:`MODEL_PARAMS` only): what
        :meth:`apply` reads, in one structure whoever holds them (a jitted function then compiles
        once for a trained state and for initial weights)."""
        return {k: params[k] for k in MODEL_PARAMS if k in params}

    def _hidden_dim(self) -> int:
        return int(self.encoder_config.hidden_dim)

    def encode(self, params, graph: HeteroGraph, *, edge_masks=None, node_index=None, deterministic=True,
               rng=None, return_attention=False):
        """Node embeddings (and attention) of the encoder alone; see the encoder contract."""
        rngs = {"dropout": rng} if (rng is not None and not deterministic) else {}
        return self.encoder.apply({"params": params["encoder"]}, graph, edge_masks=edge_masks,
                                  node_index=node_index, deterministic=deterministic, rngs=rngs,
                                  return_attention=return_attention)

    def molecule_inputs(self, params, graph: HeteroGraph, node_index=None):
        """[M, embedding_dim] the encoder's input embedding of every molecule (its documented layout:
        ``embed_Molecule``, ``project_Molecule``, ``shared_Molecule`` by input mode)."""
        enc = params["encoder"]
        mode = self.encoder_config.input_mode(schema.MOLECULE)
        count = graph.num_nodes[schema.MOLECULE]
        parts = []
        if mode in ("embedding", "both"):
            table = enc[f"embed_{schema.MOLECULE}"]["embedding"]
            index = None if node_index is None else node_index.get(schema.MOLECULE)
            parts.append(table if index is None else table[index])
        if mode in ("features", "both"):
            dense = enc[f"project_{schema.MOLECULE}"]
            parts.append(jnp.asarray(graph.node_features[schema.MOLECULE], jnp.float32) @ dense["kernel"] + dense["bias"])
        if mode == "shared":
            parts.append(jnp.broadcast_to(enc[f"shared_{schema.MOLECULE}"], (count, enc[f"shared_{schema.MOLECULE}"].shape[-1])))
        return sum(parts[1:], parts[0]).astype(jnp.float32)

    def represent(self, params, graph: HeteroGraph, *, edge_masks=None, node_index=None, deterministic=True,
                  rng=None, return_attention=False):
        """Encoder embeddings (node type -> [N, hidden]) plus, under :data:`MOLECULE_INPUT`, the
        molecule input embeddings the pooling reads; with ``return_attention`` also the attention."""
        out = self.encode(params, graph, edge_masks=edge_masks, node_index=node_index,
                          deterministic=deterministic, rng=rng, return_attention=return_attention)
        embeddings, attention = (out if return_attention else (out, None))
        embeddings = dict(embeddings)
        if self.heads_config.pool_molecule_inputs:
            embeddings[MOLECULE_INPUT] = self.molecule_inputs(params, graph, node_index)
        return (embeddings, attention) if return_attention else embeddings

    def pool_features(self, representation):
        """[M, d] what the pooling reads of each molecule."""
        final = representation[schema.MOLECULE].astype(jnp.float32)
        if self.heads_config.pool_molecule_inputs:
            return jnp.concatenate([final, representation[MOLECULE_INPUT]], -1)
        return final

    def pool(self, params, graph: HeteroGraph, molecule_features, edge_mask=None, gate=None, stats_mask=None):
        """Attention pooling of every sample's molecules -> ``(pooled [S, P], weights [E], logits [E])``;
        see :class:`GatedAttentionPool`. ``molecule_features``: :meth:`pool_features`."""
        contains = graph.edges[schema.CONTAINS]
        gated = {k: v for k, v in params["salient_pool"].items() if k != CLASS_ATTENTION}
        return self.salient_pool.apply({"params": gated}, molecule_features,
                                       contains.senders, contains.receivers, contains.attributes,
                                       graph.num_nodes[schema.SAMPLE], edge_mask, gate, stats_mask)

    def class_branches(self, params, graph: HeteroGraph, molecule_features, edge_mask=None, gate=None,
                       stats_mask=None):
        """Class-attention pooling -> ``(class_logits [S, F], ClassBranches)``; see
        :class:`ClassAttentionPool` (requires ``heads_config.class_attention``)."""
        contains = graph.edges[schema.CONTAINS]
        return self.class_pool.apply({"params": params["salient_pool"][CLASS_ATTENTION]}, molecule_features,
                                     contains.senders, contains.receivers, contains.attributes,
                                     graph.num_nodes[schema.SAMPLE], edge_mask, gate, stats_mask)

    def profile(self, graph: HeteroGraph, pool_mask=None, gate=None):
        """The samples' :class:`~jaxfood.models.profile.SampleProfile` the wide paths read (None
        without ``heads_config.wide``): the molecules the pooling sees (``pool_mask``, and those a
        ``gate`` keeps) are the ones detected."""
        if not self.heads_config.wide:
            return None
        mask = pool_mask
        if gate is not None:
            kept = jax.lax.stop_gradient(gate) > 0.5
            mask = kept if mask is None else mask & kept
        return sample_profile(graph, mask)

    def classify(self, params, sample_embeddings, pooled, profile=None, *, deterministic=True, rng=None):
        """[S, hidden], [S, pool_dim] (+ :meth:`profile`) -> [S, F] food logits."""
        rngs = {"dropout": rng} if (rng is not None and not deterministic) else {}
        return self.classifier.apply({"params": params["classifier"]}, sample_embeddings, pooled, profile,
                                     deterministic=deterministic, rngs=rngs)

    def apply(self, params, graph: HeteroGraph, *, edge_masks: Mapping[str, Any] | None = None,
              node_index=None, deterministic: bool = True, rng=None, return_attention: bool = False,
              pool_mask=None, stats_mask=None, explain_class=None) -> ModelOutputs:
        """Full forward pass.

        ``edge_masks``: relation key -> [E] bool for the encoder (missing key = all edges);
        ``pool_mask``: [E_contains] bool for the attention pooling, default
        ``edge_masks[CONTAINS]`` (a molecule removed from a sample is removed from both);
        ``stats_mask``: [S] samples that define the pooled standardisation (default all);
        ``explain_class``: [S] food whose class-attention branch gives ``molecule_weights`` (-1 /
        None: the predicted food).
        """
        if rng is not None and not deterministic:
            k_enc, k_heads = jax.random.split(rng)
        else:
            k_enc = k_heads = None
        out = self.represent(params, graph, edge_masks=edge_masks, node_index=node_index,
                             deterministic=deterministic, rng=k_enc, return_attention=return_attention)
        representation, attention = (out if return_attention else (out, None))
        if pool_mask is None and edge_masks is not None:
            pool_mask = edge_masks.get(schema.CONTAINS)
        outputs = self.heads(params, graph, representation, pool_mask=pool_mask, deterministic=deterministic,
                             rng=k_heads, stats_mask=stats_mask, explain_class=explain_class)
        return outputs.replace(attention=attention)

    def heads(self, params, graph: HeteroGraph, representation, *, pool_mask=None, deterministic: bool = True,
              rng=None, stats_mask=None, gate=None, explain_class=None) -> ModelOutputs:
        """All heads on a :meth:`represent` output (encoder embeddings + molecule inputs).

        ``gate``: [E] weights in [0, 1] restricting both poolings (see :func:`jaxfood.models.pooling.restricted_softmax`);
        ``explain_class``: see :meth:`apply`.
        """
        if rng is not None and not deterministic:
            k_cls, k_nut = jax.random.split(rng)
        else:
            k_cls = k_nut = None
        # Padding edges of a sampled subgraph never enter the poolings (nor their standardisation).
        pool_mask = mask_relation_padding(graph, schema.CONTAINS, pool_mask)
        features = self.pool_features(representation)
        pooled, weights, logits = self.pool(params, graph, features, pool_mask, gate=gate, stats_mask=stats_mask)
        samples = representation[schema.SAMPLE]
        profile = self.profile(graph, pool_mask, gate)
        if self.class_pool is None or self.heads_config.classifier_mlp:
            food_logits = self.classify(params, samples, pooled, profile, deterministic=deterministic, rng=k_cls)
        else:
            food_logits = 0.0
        if self.class_pool is not None:
            class_logits, branches = self.class_branches(params, graph, features, pool_mask, gate, stats_mask)
            food_logits = food_logits + class_logits
            predicted = jnp.argmax(jax.lax.stop_gradient(food_logits), -1)
            chosen = predicted if explain_class is None else jnp.where(explain_class >= 0, explain_class, predicted)
            contains = graph.edges[schema.CONTAINS]
            weights, logits = branch_weights(branches, contains.senders, contains.receivers, chosen)
        nut_rngs = {"dropout": k_nut} if k_nut is not None else {}
        nutrient_params = {k: v for k, v in params["nutrient_head"].items() if k != POSTERIOR}
        nutrient_profile = self.nutrient_head.apply({"params": nutrient_params}, samples, pooled, profile,
                                                    deterministic=deterministic, rngs=nut_rngs)
        expected = None
        if self.food_posterior is not None:
            expected = self.food_posterior.apply({"params": params["nutrient_head"][POSTERIOR]}, food_logits,
                                                 graph.food_nutrients)
            nutrient_profile = nutrient_profile + expected
        projection = self.food_projection.apply({"params": params["food_projection"]}, representation[schema.FOOD])
        embeddings = {t: v for t, v in representation.items() if t != MOLECULE_INPUT}
        wide_food = wide_nutrients = None
        if profile is not None:
            wide_food = profile.linear(params["classifier"]["wide_kernel"])
            wide_nutrients = profile.linear(params["nutrient_head"]["wide_kernel"])[..., :nutrient_profile.shape[-1]]
            if expected is not None:  # the wide path is a residual on the expected profile too
                wide_nutrients = wide_nutrients + expected
        return ModelOutputs(embeddings=embeddings, food_logits=food_logits, nutrient_profile=nutrient_profile,
                            food_projection=projection, pooled=pooled, molecule_weights=weights,
                            molecule_logits=logits, attention=None, wide_food_logits=wide_food,
                            wide_nutrient_profile=wide_nutrients)


def make_multitask_model(graph: HeteroGraph, encoder_config, heads_config: HeadsConfig | None = None) -> MultiTaskModel:
    """Builds the encoder from ``encoder_config`` (an ``EncoderConfig``) and the heads for ``graph``."""
    heads_config = heads_config or HeadsConfig()
    num_foods = graph.num_nodes[schema.FOOD]
    num_nutrients = int(graph.food_nutrients.shape[1])
    wide = graph.num_nodes[schema.MOLECULE] if heads_config.wide else 0
    return MultiTaskModel(
        encoder=make_encoder(graph, encoder_config),
        classifier=FoodClassifier(num_foods, heads_config.hidden_dim, heads_config.dropout, wide),
        nutrient_head=NutrientHead(num_nutrients, heads_config.hidden_dim, heads_config.dropout, wide),
        food_projection=FoodProjection(heads_config.projection_dim, heads_config.hidden_dim),
        salient_pool=GatedAttentionPool(heads_config.pool_dim, heads_config.attention_dim,
                                        heads_config.standardise_pooled, heads_config.attention_logit_bound,
                                        heads_config.pool_top_k, heads_config.pool_temperature),
        encoder_config=encoder_config,
        heads_config=heads_config,
        class_pool=(ClassAttentionPool(num_foods, heads_config.pool_dim, heads_config.attention_dim,
                                       heads_config.attention_logit_bound,
                                       readout=heads_config.class_readout) if heads_config.class_attention else None),
        food_posterior=FoodPosteriorNutrients() if heads_config.nutrients_from_foods and num_nutrients else None,
    )
