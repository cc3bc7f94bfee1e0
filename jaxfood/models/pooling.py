"""Attention pooling of each sample's molecules (multiple-instance learning) and its segment helpers.

* :class:`GatedAttentionPool` -- gated attention multiple-instance pooling (Ilse, Tomczak & Welling,
  "Attention-based Deep Multiple Instance Learning", ICML 2018) over each sample's molecules: one
  weight per ``contains_molecule`` edge, softmax-normalised over the sample's edges with segment
  operations.
* :class:`ClassAttentionPool` -- class-specific multi-branch attention (CLAM, Lu et al. 2021):
  one attention branch per food, each food's logit from its own branch; branch ``c``'s weights are
  the molecule importances for food ``c``.
* Segment helpers (softmax, top-k masks, straight-through top-k) over the edges of each sample.

Pure functions of their inputs; the task heads and the multi-task model that use them are in
:mod:`jaxfood.models.heads`.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp


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
