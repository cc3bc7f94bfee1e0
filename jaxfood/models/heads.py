"""Task heads on top of the heterogeneous GAT encoder, and the multi-task model that joins them.

* :class:`GatedAttentionPool` -- gated attention multiple-instance pooling (Ilse, Tomczak & Welling,
  "Attention-based Deep Multiple Instance Learning", ICML 2018) over each sample's molecules: one
  weight per ``contains_molecule`` edge, softmax-normalised over the sample's edges with segment
  operations. The weights are the molecule importances of salient molecule discovery.
* :class:`ClassAttentionPool` -- class-specific multi-branch attention (CLAM, Lu et al. 2021):
  one attention branch per food, each food's logit from its own branch; branch ``c``'s weights are
  the molecule importances for food ``c``.
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

from jaxfood.graph import schema
from jaxfood.graph.hetero_graph import HeteroGraph
from jaxfood.graph.sampling import mask_relation_padding
from jaxfood.models.profile import sample_profile


# ---- segment helpers ---------------------------------------------------------------------------
def segment_softmax(logits, segment_ids, num_segments: int, mask=None):
    """Softmax of ``logits`` [E] over the entries of each segment; masked entries get weight 0.

    A segment with no unmasked entry gets all-zero weights (never NaN).
    """
    logits = logits.astype(jnp.float32)
    if mask is None:
        mask = jnp.ones(logits.shape, bool)
    neg = jnp.finfo(jnp.float32).min
    masked = jnp.where(mask, logits, neg)
    seg_max = jax.ops.segment_max(masked, segment_ids, num_segments)
    seg_max = jnp.where(jnp.isfinite(seg_max), seg_max, 0.0)
    # Stop-gradient on the shift: it cancels analytically and keeps ties from splitting gradients.
    shifted = masked - jax.lax.stop_gradient(seg_max)[segment_ids]
    expd = jnp.where(mask, jnp.exp(jnp.minimum(shifted, 0.0)), 0.0)
    denom = jax.ops.segment_sum(expd, segment_ids, num_segments)
    return expd / jnp.where(denom > 0, denom, 1.0)[segment_ids]


def weighted_segment_sum(weights, values, segment_ids, num_segments: int):
    """``out[s] = sum_{e in s} weights[e] * values[e]``: [E], [E, D] -> [num_segments, D]."""
    return jax.ops.segment_sum(weights[:, None] * values, segment_ids, num_segments)


# ---- heads -------------------------------------------------------------------------------------
def restricted_softmax(logits, gate, segment_ids, num_segments: int, mask=None):
    """``gate_e exp(logit_e) / sum_{e' in s} gate_e' exp(logit_e')`` for a gate [E] in [0, 1].

    With a hard 0/1 gate this is the softmax over the gated-in entries. The softmax is taken over
    all (``mask``-valid) entries before gating, so a straight-through gate (hard forward, soft
    backward) passes gradient to entries it currently gates out.
    """
    base = segment_softmax(logits, segment_ids, num_segments, mask)
    weighted = base * gate
    denom = jax.ops.segment_sum(weighted, segment_ids, num_segments)
    return weighted / jnp.where(denom > 0, denom, 1.0)[segment_ids]


def segment_topk_mask(scores, segment_ids, num_segments: int, k: int, valid=None):
    """[E] bool: the ``k`` highest ``scores`` of each segment (ties by edge order), within ``valid``."""
    num_edges = scores.shape[0]
    valid = jnp.ones((num_edges,), bool) if valid is None else jnp.asarray(valid)
    keyed = jnp.where(valid, scores.astype(jnp.float32), -jnp.inf)
    order = jnp.lexsort((-keyed, segment_ids))  # by segment, then by descending score
    seg_sorted = segment_ids[order]
    pos = jnp.arange(num_edges)
    start = jax.ops.segment_min(pos, seg_sorted, num_segments)
    rank_sorted = pos - start[seg_sorted]
    rank = jnp.zeros((num_edges,), rank_sorted.dtype).at[order].set(rank_sorted)
    return (rank < k) & valid


def straight_through_topk(logits, hard_mask, segment_ids, num_segments: int, temperature: float = 0.1):
    """Hard top-k mask in the forward pass, sigmoid-relaxed gradient in the backward pass.

    The relaxation is ``sigmoid((logit - t_s) / temperature)`` with ``t_s`` halfway between the
    lowest kept and the highest dropped logit of segment ``s``. Returns [E] float.
    """
    neg = jnp.finfo(jnp.float32).min
    lowest_kept = -jax.ops.segment_max(jnp.where(hard_mask, -logits, neg), segment_ids, num_segments)
    highest_dropped = jax.ops.segment_max(jnp.where(hard_mask, neg, logits), segment_ids, num_segments)
    lowest_kept = jnp.where(jnp.abs(lowest_kept) < 1e30, lowest_kept, 0.0)
    highest_dropped = jnp.where(jnp.abs(highest_dropped) < 1e30, highest_dropped, lowest_kept - 1.0)
    threshold = jax.lax.stop_gradient(0.5 * (lowest_kept + highest_dropped))[segment_ids]
    soft = jax.nn.sigmoid((logits - threshold) / temperature)
    hard = hard_mask.astype(jnp.float32)
    return hard + soft - jax.lax.stop_gradient(soft)


#: Largest [samples x molecules] for which pooling uses a dense weight matrix (faster on CPU than
#: gathers over edges; 16M float32 = 64 MB). Larger graphs use segment sums over the edges.
DENSE_POOL_LIMIT = 16_000_000


def standardise_over_samples(x, valid, reference=None, eps: float = 1e-5):
    """[S, D] -> zero mean, unit variance per feature, statistics over the ``reference`` [S] rows
    (default ``valid``); rows outside ``valid`` -> 0."""
    w = (valid if reference is None else reference).astype(x.dtype)[:, None]
    n = jnp.maximum(jnp.sum(w), 1.0)
    mean = jnp.sum(w * x, 0) / n
    var = jnp.sum(w * jnp.square(x - mean), 0) / n
    return jnp.where(valid[:, None], (x - mean) * jax.lax.rsqrt(var + eps), 0.0)


class GatedAttentionPool(nn.Module):
    """Gated attention pooling over each sample's molecules (Ilse et al. 2018, eq. 9).

    For edge ``e = (s, m)`` with molecule embedding ``z_m`` and intensity attributes ``x_e``:

    * instance ``h_e = h_m + W_x x_e`` with ``h_m = W_z z_m + b``;
    * attention logit ``a_e = w^T (tanh(V h_m) * sigmoid(U h_m)) + x_e^T B h_m`` -- Ilse's gated
      attention on the molecule, modulated by the intensity of the molecule in that sample;
    * weights ``alpha = softmax_{e in s}(a)`` (the molecule importances); pooled over the ``top_k``
      molecules of the sample, ``p_s = sum_{e in topk(s)} alpha_e h_e / sum_{e in topk(s)} alpha_e``
      (hard in the forward pass, straight-through in the backward pass; ``top_k = 0``: all
      molecules) -- the prediction rests on the molecules the scores name, so they are faithful
      by construction (Chen et al., "Learning to Explain", ICML 2018, select-then-predict);
      standardised over the graph's samples (``standardise``): every
      sample shares most of its molecules (background), so the pooled vectors differ by little
      around a large common part; removing it makes the food-specific part visible to the heads
      from the first step. Logits are centred per sample and bounded, ``a <- c tanh(a / c)``
      (``logit_bound``): the
      classifier cannot collapse a sample onto one molecule that happens to identify it
      (memorisation); at most a factor ``exp(2c)`` separates two molecules of a sample.

    Every dense layer runs once per molecule, never per edge; per edge only scalars are gathered,
    and the weighted sum is a [samples x molecules] matrix product where that matrix is small.
    """

    pool_dim: int = 64
    attention_dim: int = 32
    standardise: bool = True
    logit_bound: float = 3.0
    top_k: int = 0
    temperature: float = 0.1

    @nn.compact
    def __call__(self, molecule_embeddings, senders, receivers, intensities, num_samples: int,
                 edge_mask=None, gate=None, stats_mask=None):
        """Args:
          molecule_embeddings: [M, hidden]; senders / receivers: [E] sample / molecule index of
          each ``contains_molecule`` edge; intensities: [E, A] edge attributes; edge_mask: [E] bool;
          gate: optional [E] weights in [0, 1] restricting the pooling softmax (see
          :func:`restricted_softmax`), replacing the module's own top-k; stats_mask: optional [S] bool, the samples whose pooled
          vectors define the standardisation (those with all their molecules, when some samples
          are restricted to a few: sufficiency, fidelity).

        Returns ``(pooled [num_samples, pool_dim], weights [E], logits [E])``.
        """
        x = intensities.astype(jnp.float32)
        num_attr = x.shape[-1]
        # Parameters the output cannot depend on are left out (a bias before the standardisation,
        # a shift of softmax logits): their gradient is pure rounding noise, which Adam would turn
        # into full-size random steps.
        h_mol = nn.Dense(self.pool_dim, use_bias=not self.standardise, name="instance")(
            molecule_embeddings.astype(jnp.float32))                                                # [M, P]
        w_x = self.param("instance_intensity", nn.initializers.lecun_normal(), (num_attr, self.pool_dim))
        gated = (jnp.tanh(nn.Dense(self.attention_dim, name="attention_v")(h_mol))
                 * nn.sigmoid(nn.Dense(self.attention_dim, name="attention_u")(h_mol)))
        mol_logit = nn.Dense(1, use_bias=False, name="attention_w")(gated)[:, 0]                  # [M]
        logits = mol_logit[receivers]
        if num_attr:
            slope = nn.Dense(num_attr, use_bias=False, name="attention_intensity")(h_mol)          # [M, A]
            logits = logits + jnp.sum(slope[receivers] * x, axis=-1)
        if self.logit_bound:
            # Centred per sample first: a shift common to all of a sample's molecules changes no
            # weight, and must not push the logits into tanh's flat region.
            valid = jnp.ones(logits.shape, bool) if edge_mask is None else edge_mask
            count = jax.ops.segment_sum(valid.astype(jnp.float32), senders, num_samples)
            mean = jax.ops.segment_sum(jnp.where(valid, logits, 0.0), senders, num_samples) / jnp.maximum(count, 1.0)
            logits = self.logit_bound * jnp.tanh((logits - mean[senders]) / self.logit_bound)
        weights = segment_softmax(logits, senders, num_samples, edge_mask)   # the importances
        if gate is None and self.top_k > 0:
            hard = segment_topk_mask(jax.lax.stop_gradient(logits), senders, num_samples, self.top_k, edge_mask)
            gate = straight_through_topk(logits, hard, senders, num_samples, self.temperature)
        pool_weights = weights if gate is None else restricted_softmax(logits, gate, senders, num_samples, edge_mask)
        num_molecules = h_mol.shape[0]
        if num_samples * num_molecules <= DENSE_POOL_LIMIT:
            matrix = jnp.zeros((num_samples, num_molecules), jnp.float32).at[senders, receivers].add(pool_weights)
            pooled = matrix @ h_mol
        else:
            pooled = weighted_segment_sum(pool_weights, h_mol[receivers], senders, num_samples)
        if num_attr:
            pooled = pooled + jax.ops.segment_sum(pool_weights[:, None] * x, senders, num_samples) @ w_x
        if self.standardise:
            has_edges = jax.ops.segment_sum(weights, senders, num_samples) > 0
            reference = has_edges if stats_mask is None else (has_edges & stats_mask)
            reference = jnp.where(jnp.any(reference), reference, has_edges)
            pooled = standardise_over_samples(pooled, has_edges, reference)
        return pooled, weights, logits


class ClassAttentionPool(nn.Module):
    """Class-specific multi-branch attention pooling (CLAM: Lu et al., "Data-efficient and weakly
    supervised computational pathology on whole-slide images", Nat. Biomed. Eng. 2021).

    One attention branch per food ``c`` over each sample's molecules, and the food's logit read
    from that branch's pooled vector alone:

    * ``h_m = W_z z_m`` (instance embedding), ``g_m = tanh(V h_m) * sigmoid(U h_m)`` (Ilse's gate);
    * attention logit of edge ``e = (s, m)`` for food ``c``: ``a_ec = A_mc + b_e`` with
      ``A = bound tanh(g W_a / bound)`` [M, C] and a class-shared intensity modulation
      ``b_e = bound tanh(x_e^T B h_m / bound)``;
    * ``alpha_ec = softmax_{e in s}(a_ec)`` -- the importance of molecule ``m`` *for food c*;
    * ``readout="lse"`` (default): the attention logit *is* the evidence, ``logit_sc =
      log sum_{e in s} exp(a_ec)`` (log-sum-exp pooling, Pinheiro & Collobert, CVPR 2015), whose
      gradient in ``a_ec`` is exactly ``alpha_ec``. It is monotone in the molecule set: a sample
      restricted to branch ``c``'s top molecules keeps nearly all of food ``c``'s logit while every
      other food's logit can only fall, and removing them lowers food ``c``'s logit most -- the
      top molecules are faithful by construction (fidelity+ above fidelity-).
    * ``readout="mean"``: ``logit_sc = sum_{e in s} alpha_ec (u_mc + x_e^T q_c)`` with ``u = h W_u
      + b_u`` [M, C], CLAM's per-class bag classifier ``w_c^T p_sc`` on the pooled ``p_sc = sum
      alpha_ec h_e`` (linear, so it decomposes exactly over the molecules the branch attends to).

    The softmax factorises, ``exp(a_ec) = exp(A_mc) exp(b_e)``, so every branch is two
    [samples x molecules] @ [molecules x foods] products (no [edges x foods] array) where that
    matrix is small (:data:`DENSE_POOL_LIMIT`); larger graphs use segment sums over the edges.
    Both logit parts are bounded (``bound``), so the exponentials cannot overflow.

    ``standardise``: each food's logit is standardised over the graph's samples and scaled by a
    learned per-food factor (init 1): every sample shares most of its molecules, so the raw
    logits differ by little around a large common part (as the gated pooling's vectors do); an
    increasing affine map per food (``s_c = exp(learned)``) keeps the decomposition and the
    monotonicity.
    """

    num_classes: int
    pool_dim: int = 64
    attention_dim: int = 32
    logit_bound: float = 3.0
    standardise: bool = True
    readout: str = "lse"

    @nn.compact
    def __call__(self, molecule_embeddings, senders, receivers, intensities, num_samples: int,
                 edge_mask=None, gate=None, stats_mask=None):
        """Args as :class:`GatedAttentionPool`; ``gate`` [E] in [0, 1] multiplies each edge's
        softmax term (restricted softmax); ``stats_mask`` [S] the samples whose logits define the
        standardisation (``standardise``).

        Returns ``(class_logits [S, C], branches)``: every food's logit from its own branch, and
        the :class:`ClassBranches` from which :func:`branch_weights` gives any branch's weights.
        """
        bound = float(self.logit_bound) or 1e6
        x = intensities.astype(jnp.float32)
        num_attr = x.shape[-1]
        h_mol = nn.Dense(self.pool_dim, name="instance")(molecule_embeddings.astype(jnp.float32))        # [M, P]
        gated = (jnp.tanh(nn.Dense(self.attention_dim, name="attention_v")(h_mol))
                 * nn.sigmoid(nn.Dense(self.attention_dim, name="attention_u")(h_mol)))
        # No bias on the class logits of the attention: a per-class shift changes no weight.
        mol_logits = bound * jnp.tanh(nn.Dense(self.num_classes, use_bias=False, name="attention_w")(gated) / bound)
        mean_readout = self.readout == "mean"
        if mean_readout:
            evidence = nn.Dense(self.num_classes, name="evidence")(h_mol)                               # [M, C]
        if num_attr:
            slope = nn.Dense(num_attr, use_bias=False, name="attention_intensity")(h_mol)               # [M, A]
            edge_logit = bound * jnp.tanh(jnp.sum(slope[receivers] * x, -1) / bound)                  # [E]
            if mean_readout:
                w_q = self.param("evidence_intensity", nn.initializers.zeros, (num_attr, self.num_classes))
        else:
            edge_logit = jnp.zeros(receivers.shape, jnp.float32)
        edge_term = jnp.exp(edge_logit)
        if edge_mask is not None:
            edge_term = jnp.where(edge_mask, edge_term, 0.0)
        if gate is not None:
            edge_term = edge_term * gate
        mol_term = jnp.exp(mol_logits)                                                                  # [M, C]
        num_molecules = h_mol.shape[0]
        if num_samples * num_molecules <= DENSE_POOL_LIMIT:
            def pool(values):  # [E] per-edge factor -> [S, C] sum_e factor_e exp(A_mc) (rhs)_mc
                matrix = jnp.zeros((num_samples, num_molecules), jnp.float32).at[senders, receivers].add(values)
                return lambda rhs: matrix @ rhs
        else:
            def pool(values):
                return lambda rhs: jax.ops.segment_sum(values[:, None] * rhs[receivers], senders, num_samples)
        by_edge = pool(edge_term)
        denom = by_edge(mol_term)                                                                       # [S, C]
        safe = jnp.where(denom > 0, denom, 1.0)
        if mean_readout:
            numer = by_edge(mol_term * evidence)
            if num_attr:
                for a in range(num_attr):
                    numer = numer + pool(edge_term * x[:, a])(mol_term) * w_q[a][None, :]
            class_logits = jnp.where(denom > 0, numer / safe, 0.0)
        else:
            class_logits = jnp.where(denom > 0, jnp.log(safe), 0.0)
        if self.standardise:
            has_edges = jnp.any(denom > 0, -1)
            reference = has_edges if stats_mask is None else (has_edges & stats_mask)
            reference = jnp.where(jnp.any(reference), reference, has_edges)
            log_scale = self.param("logit_log_scale", nn.initializers.zeros, (self.num_classes,))
            class_logits = standardise_over_samples(class_logits, has_edges, reference) * jnp.exp(log_scale)
        return class_logits, ClassBranches(edge_logit=edge_logit, edge_term=edge_term, mol_logits=mol_logits,
                                           denom=denom)


@flax.struct.dataclass
class ClassBranches:
    """What :class:`ClassAttentionPool` needs to give any branch's weights: ``edge_logit`` [E]
    ``b_e``; ``edge_term`` [E] ``exp(b_e)`` times mask and gate; ``mol_logits`` [M, C] ``A``;
    ``denom`` [S, C] each branch's softmax normaliser."""

    edge_logit: Any
    edge_term: Any
    mol_logits: Any
    denom: Any


def branch_weights(branches: ClassBranches, senders, receivers, explain_class):
    """Attention weight and logit of every ``contains_molecule`` edge in the branch of its sample's
    ``explain_class`` [S] food: ``(weights [E] summing to 1 per sample, logits [E])``."""
    cls = explain_class[senders]
    logits = branches.mol_logits[receivers, cls] + branches.edge_logit
    denom = branches.denom[senders, cls]
    weights = branches.edge_term * jnp.exp(branches.mol_logits[receivers, cls]) / jnp.where(denom > 0, denom, 1.0)
    return weights, logits


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
        k_enc, k_cls, k_nut, k_proj, k_pool = jax.random.split(rng, 5)
        enc_params = self.encoder.init(k_enc, graph)["params"]
        hidden = self._hidden_dim()
        S = graph.num_nodes[schema.SAMPLE]
        contains = graph.edges[schema.CONTAINS]
        width = hidden + (int(self.encoder_config.embedding_dim) if self.heads_config.pool_molecule_inputs else 0)
        mol = jnp.zeros((graph.num_nodes[schema.MOLECULE], width), jnp.float32)
        pool_params = self.salient_pool.init(k_pool, mol, jnp.asarray(contains.senders), jnp.asarray(contains.receivers),
                                             jnp.asarray(contains.attributes), S)["params"]
        if self.class_pool is not None:
            pool_params = {**pool_params, CLASS_ATTENTION: self.class_pool.init(
                jax.random.fold_in(k_pool, 1), mol, jnp.asarray(contains.senders), jnp.asarray(contains.receivers),
                jnp.asarray(contains.attributes), S)["params"]}
        sample = jnp.zeros((S, hidden), jnp.float32)
        pooled = jnp.zeros((S, self.heads_config.pool_dim), jnp.float32)
        profile = sample_profile(graph) if self.heads_config.wide else None
        nutrient_params = self.nutrient_head.init(k_nut, sample, pooled, profile)["params"]
        if self.food_posterior is not None:
            F = graph.num_nodes[schema.FOOD]
            nutrient_params = {**nutrient_params, POSTERIOR: self.food_posterior.init(
                k_nut, jnp.zeros((S, F), jnp.float32), graph.food_nutrients)["params"]}
        return {
            "encoder": enc_params,
            "classifier": self.classifier.init(k_cls, sample, pooled, profile)["params"],
            "nutrient_head": nutrient_params,
            "food_projection": self.food_projection.init(k_proj, sample)["params"],
            "salient_pool": pool_params,
        }

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

        ``gate``: [E] weights in [0, 1] restricting both poolings (see :func:`restricted_softmax`);
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
    from jaxfood.models.encoder import make_encoder

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
