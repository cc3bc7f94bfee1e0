"""Heterogeneous graph attention: one bipartite GAT per relation, summed per destination type.

Implements GAT (Velickovic et al., "Graph Attention Networks", ICLR 2018) in its bipartite,
edge-attributed form as PyTorch Geometric's ``GATConv((d_src, d_dst), C, heads=H, edge_dim=F,
add_self_loops=False)``, wrapped per relation like PyG's ``HeteroConv`` (relation-wise message
passing as in R-GCN, Schlichtkrull et al. 2018). For a relation ``r = (Src, rel, Dst)`` with
source features ``x_s`` [N_src, d_src], destination features ``x_d`` [N_dst, d_dst] and edge
attributes ``a`` [E, F]::

    h_s = x_s W_src                      [N_src, H, C]      (no bias)
    e_ij = LeakyReLU_0.2(<h_s[j], att_src> + <x_d[i] W_dst, att_dst> + <a_ij W_edge, att_edge>)
    alpha_ij = softmax_j(e_ij)           over the (unmasked) incoming edges j of i
    alpha_ij = dropout(alpha_ij)         training only
    out_i = concat_h (sum_j alpha_ij h_s[j]) + bias      (or the mean over heads)
          (+ x_d[i] W_res with ``residual``: PyG ``GATConv(residual=True)``, a root weight)

No self loops. A destination without (unmasked) incoming edges gets the bias only, as in PyG.
The outputs of every relation that ends in a node type are combined by ``aggr`` (``sum`` default,
``mean``, ``max`` or ``min``, like ``HeteroConv``); node types that are the destination of no
relation are absent from the output, exactly as in ``HeteroConv``.

Parameters of one relation (under the relation key ``"Src|rel|Dst"``)::

    lin_src  {"kernel": [d_src, H*C]}     PyG lin_src.weight.T
    lin_dst  {"kernel": [d_dst, H*C]}     PyG lin_dst.weight.T
    att_src  [H, C]                        PyG att_src[0]
    att_dst  [H, C]                        PyG att_dst[0]
    lin_edge {"kernel": [F, H*C]}         PyG lin_edge.weight.T    only where F > 0
    att_edge [H, C]                        PyG att_edge[0]          only where F > 0
    bias     [H*C] (concat) or [C]         PyG bias
    res      {"kernel": [d_dst, H*C or C]} PyG res.weight.T          only with ``residual``

How it is computed (the numbers are PyG's up to float rounding; ``benchmarks/bench_step.py``
measures the speed, ``docs/benchmarks.md`` has the figures):

- attention scores are per node: each kernel is folded with its attention vector
  ([d, H*C] x [H, C] -> [d, H]) so an edge gathers H scalars per side, and the [E, H*C] edge
  projection PyG builds never exists;
- attention dropout is applied before the softmax division, so the [E, H] coefficients are
  materialised once rather than recomputed inside every [E, H, C] consumer;
- the neighbour sum (:func:`aggregate_messages`) runs over blocks of edges with a hand-written
  VJP: the [E, H, C] messages and their gradients exist one block at a time.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxfood.graph import schema

Array = Any

AGGREGATIONS = ("sum", "mean", "max", "min")

# PyG adds this to every softmax denominator; kept so that the numbers agree to the last digit.
_SOFTMAX_EPS = 1e-16

#: Edges per block of the neighbour sum on CPU (see :func:`aggregate_messages`).
CPU_EDGE_BLOCK = 8192


def default_edge_block() -> int | None:
    """Edge block size for the current backend: blocks on CPU, one block on GPU/TPU."""
    return CPU_EDGE_BLOCK if jax.default_backend() == "cpu" else None


def segment_softmax(logits: Array, segment_ids: Array, num_segments: int, mask: Array | None = None,
                    dropout_keep: Array | None = None, dropout_rate: float = 0.0) -> Array:
    """Softmax of ``logits`` [E, H] over the edges of each segment (destination node).

    As ``jraph.segment_softmax`` (max-shifted for stability, the max treated as a constant like
    PyG's ``softmax``), plus:

    - ``mask`` [E] bool: masked edges get 0 and the other edges of their segment are renormalised;
      segments without (unmasked) edges produce nothing;
    - ``dropout_keep`` [E, H] bool: dropout of the normalised coefficients (dropped -> 0, kept ->
      scaled by ``1 / (1 - dropout_rate)``), as PyG applies it after the softmax.
    """
    if mask is not None:
        masked_logits = jnp.where(mask[:, None], logits, -jnp.inf)
    else:
        masked_logits = logits
    seg_max = jax.ops.segment_max(jax.lax.stop_gradient(masked_logits), segment_ids, num_segments)
    # Empty segments have max -inf; any finite shift works for them (they have no edges).
    seg_max = jnp.where(jnp.isfinite(seg_max), seg_max, 0.0)
    shifted = logits - seg_max[segment_ids]
    if mask is not None:
        # -inf (not a where after exp) keeps gradients of masked edges exactly zero, never NaN.
        shifted = jnp.where(mask[:, None], shifted, -jnp.inf)
    weights = jnp.exp(shifted)
    denom = jax.ops.segment_sum(weights, segment_ids, num_segments) + _SOFTMAX_EPS
    if dropout_keep is not None:
        # Dropout folded in before the division, so that the division is the last operation: XLA
        # then materialises the [E, H] coefficients once instead of recomputing the random mask
        # inside every [E, H, C] consumer.
        weights = jnp.where(dropout_keep, weights, 0.0)
        denom = denom * (1.0 - dropout_rate)
    return weights / denom[segment_ids]


def _edge_blocks(alpha: Array, senders: Array, receivers: Array, block: int):
    """Pads the edges to whole blocks ([num_blocks, block, ...]); padding edges have alpha 0."""
    num_edges = alpha.shape[0]
    num_blocks = -(-num_edges // block)
    pad = num_blocks * block - num_edges
    alpha = jnp.pad(alpha, ((0, pad), (0, 0))).reshape(num_blocks, block, alpha.shape[1])
    senders = jnp.pad(senders, (0, pad)).reshape(num_blocks, block)
    receivers = jnp.pad(receivers, (0, pad)).reshape(num_blocks, block)
    return alpha, senders, receivers


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def aggregate_messages(h_src: Array, alpha: Array, senders: Array, receivers: Array, num_dst: int,
                       block: int | None) -> Array:
    """``out[i] = sum_{e: receivers[e] = i} alpha[e] * h_src[senders[e]]`` -> [num_dst, H, C] float32.

    ``h_src`` [N_src, H, C], ``alpha`` [E, H] (float32). With ``block`` set and more edges than
    that, a scan over blocks of ``block`` edges accumulates into the output, and the hand-written
    VJP does the same, so the per-edge [E, H, C] messages and their gradients never exist at full
    size: on CPU they stay in cache and the step does not page-fault fresh gigabytes every time
    (3-4x faster for the benchmark graph). The VJP also gathers from tables computed once per node,
    where XLA's own would fuse the incoming gradient's elementwise chain into every edge.
    """
    return _aggregate_fwd(h_src, alpha, senders, receivers, num_dst, block)[0]


def _messages(h_src, alpha, senders):
    return alpha[:, :, None] * h_src[senders].astype(alpha.dtype)


def _aggregate_fwd(h_src, alpha, senders, receivers, num_dst, block):
    residuals = (h_src, alpha, senders, receivers)
    if block is None or alpha.shape[0] <= block:
        return jax.ops.segment_sum(_messages(h_src, alpha, senders), receivers, num_dst), residuals

    def add_block(out, edges):
        a, s, r = edges
        return out.at[r].add(_messages(h_src, a, s)), None

    zeros = jnp.zeros((num_dst,) + h_src.shape[1:], alpha.dtype)
    out, _ = jax.lax.scan(add_block, zeros, _edge_blocks(alpha, senders, receivers, block))
    return out, residuals


def _aggregate_bwd(num_dst, block, residuals, grad_out):
    h_src, alpha, senders, receivers = residuals
    num_edges, heads = alpha.shape

    def block_grads(grad_h, edges):
        a, s, r = edges
        grad_messages = grad_out[r]
        grad_alpha = jnp.einsum("ehc,ehc->eh", grad_messages, h_src[s].astype(grad_out.dtype))
        return grad_h.at[s].add(a[:, :, None] * grad_messages), grad_alpha

    grad_h = jnp.zeros(h_src.shape, grad_out.dtype)
    if block is None or num_edges <= block:
        grad_h, grad_alpha = block_grads(grad_h, (alpha, senders, receivers))
    else:
        grad_h, grad_alpha = jax.lax.scan(block_grads, grad_h, _edge_blocks(alpha, senders, receivers, block))
        grad_alpha = grad_alpha.reshape(-1, heads)[:num_edges]
    return grad_h.astype(h_src.dtype), grad_alpha.astype(alpha.dtype), None, None


aggregate_messages.defvjp(_aggregate_fwd, _aggregate_bwd)


def combine_relations(outputs: Sequence[Array], aggr: str) -> Array:
    """Combines the outputs of the relations ending in one node type (``HeteroConv``'s ``group``)."""
    if len(outputs) == 1:
        return outputs[0]
    if aggr == "sum":
        return sum(outputs[1:], outputs[0])
    stacked = jnp.stack(outputs, axis=0)
    if aggr == "mean":
        return jnp.mean(stacked, axis=0)
    if aggr == "max":
        return jnp.max(stacked, axis=0)
    if aggr == "min":
        return jnp.min(stacked, axis=0)
    raise ValueError(f"aggr must be one of {AGGREGATIONS}, got {aggr!r}")


class _Kernel(nn.Module):
    """A bias-free linear map's weight, stored as ``{"kernel": [d_in, d_out]}`` like ``nn.Dense``."""

    features: int
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, in_features: int) -> Array:
        return self.param("kernel", nn.initializers.glorot_uniform(), (in_features, self.features),
                          self.param_dtype)


class RelationParams(nn.Module):
    """Declares (and returns) the parameters of one relation's bipartite GAT; see the module doc."""

    heads: int
    channels: int
    concat: bool = True
    param_dtype: Any = jnp.float32
    residual: bool = False

    @nn.compact
    def __call__(self, src_dim: int, dst_dim: int, edge_dim: int) -> dict[str, Array]:
        hc = self.heads * self.channels
        # PyG initialises att_* with glorot on [1, H, C], i.e. U(+-sqrt(6 / (H + C))): the same as
        # Flax's glorot_uniform on [H, C].
        att_init = nn.initializers.glorot_uniform()
        p = {
            "lin_src": _Kernel(hc, self.param_dtype, name="lin_src")(src_dim),
            "lin_dst": _Kernel(hc, self.param_dtype, name="lin_dst")(dst_dim),
            "att_src": self.param("att_src", att_init, (self.heads, self.channels), self.param_dtype),
            "att_dst": self.param("att_dst", att_init, (self.heads, self.channels), self.param_dtype),
        }
        if edge_dim > 0:
            p["lin_edge"] = _Kernel(hc, self.param_dtype, name="lin_edge")(edge_dim)
            p["att_edge"] = self.param("att_edge", att_init, (self.heads, self.channels), self.param_dtype)
        out_dim = hc if self.concat else self.channels
        if self.residual:
            p["res"] = _Kernel(out_dim, self.param_dtype, name="res")(dst_dim)
        p["bias"] = self.param("bias", nn.initializers.zeros, (out_dim,), self.param_dtype)
        return p


def fold_attention(kernel: Array, att: Array) -> Array:
    """``kernel`` [d, H*C] folded with ``att`` [H, C] -> [d, H]: ``x @ fold == <x @ kernel, att>``."""
    heads, channels = att.shape
    return jnp.einsum("dhc,hc->dh", kernel.reshape(-1, heads, channels), att)


def relation_attention_logits(p: Mapping[str, Array], x_src: Array, x_dst: Array, senders: Array,
                              receivers: Array, attributes: Array, negative_slope: float,
                              dtype: Any) -> Array:
    """Unnormalised attention ``e`` [E, H] of one relation (LeakyReLU applied), float32.

    The attention terms only ever need the scores <x W, att>, never the projections themselves,
    so the kernels are folded with the attention vectors first ([d, H*C] x [H, C] -> [d, H]):
    per-node scores are one small matmul, and each edge gathers H scalars per side. The same
    numbers as PyG's order of operations up to float rounding, without PyG's [E, H*C] edge
    projection.
    """
    score_src = x_src @ fold_attention(p["lin_src"], p["att_src"]).astype(dtype)
    score_dst = x_dst @ fold_attention(p["lin_dst"], p["att_dst"]).astype(dtype)
    logits = score_src[senders].astype(jnp.float32) + score_dst[receivers].astype(jnp.float32)
    if "lin_edge" in p and attributes.shape[-1] > 0:
        w_edge = fold_attention(p["lin_edge"], p["att_edge"]).astype(dtype)
        logits = logits + (attributes.astype(dtype) @ w_edge).astype(jnp.float32)
    return nn.leaky_relu(logits, negative_slope)


class HeteroGATConv(nn.Module):
    """One heterogeneous GAT layer: a bipartite ``GATConv`` per relation, combined per node type.

    Attributes:
      relations: relation keys ``"Src|rel|Dst"`` this layer has parameters for (in this order).
      heads: attention heads H.
      channels: channels per head C.
      concat: concatenate the heads ([N, H*C]) or average them ([N, C]).
      dropout_rate: dropout on the attention coefficients (training only).
      aggr: how relations ending in the same node type are combined (``sum``/``mean``/``max``/``min``).
      negative_slope: of the LeakyReLU on attention logits.
      dtype: compute dtype (softmax and neighbour sums stay float32).
      param_dtype: dtype of the parameters.
      edge_block: edges per block of the neighbour sum; ``None`` picks by backend
        (:func:`default_edge_block`), 0 means one block. Only speed and memory depend on it.
      residual: every relation adds ``x_dst W_res`` (PyG ``GATConv(residual=True)``): a node's own
        features reach its output, which messages alone (no self loops) never carry.
    """

    relations: tuple[str, ...]
    heads: int
    channels: int
    concat: bool = True
    dropout_rate: float = 0.0
    aggr: str = "sum"
    negative_slope: float = 0.2
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    edge_block: int | None = None
    residual: bool = False

    @nn.compact
    def __call__(self, node_features: Mapping[str, Array], edges: Mapping[str, Any],
                 edge_masks: Mapping[str, Array] | None = None, *, deterministic: bool = True,
                 return_attention: bool = False):
        """Runs the layer.

        Args:
          node_features: node type -> [N_type, d_type] input features.
          edges: relation key -> ``EdgeSet`` (senders [E], receivers [E], attributes [E, F]).
          edge_masks: optional relation key -> [E] bool; False edges contribute nothing and the
            softmax renormalises over the others. A missing key means all edges are on.
          deterministic: no dropout when True; otherwise needs a ``dropout`` rng.
          return_attention: also return the attention coefficients.

        Returns:
          dict node type -> [N_type, H*C] (or [N_type, C]); with ``return_attention`` also
          dict relation key -> [E, H] attention coefficients (after dropout, 0 on masked edges).
        """
        if self.aggr not in AGGREGATIONS:
            raise ValueError(f"aggr must be one of {AGGREGATIONS}, got {self.aggr!r}")
        edge_masks = edge_masks or {}
        dtype = self.dtype
        block = default_edge_block() if self.edge_block is None else (self.edge_block or None)
        per_dst: dict[str, list[Array]] = {}
        attention: dict[str, Array] = {}
        for key in self.relations:
            src, _, dst = schema.split_key(key)
            edge_set = edges[key]
            x_src = jnp.asarray(node_features[src]).astype(dtype)
            x_dst = jnp.asarray(node_features[dst]).astype(dtype)
            senders, receivers = jnp.asarray(edge_set.senders), jnp.asarray(edge_set.receivers)
            attributes = jnp.asarray(edge_set.attributes)
            p = RelationParams(self.heads, self.channels, self.concat, self.param_dtype, self.residual, name=key)(
                x_src.shape[-1], x_dst.shape[-1], attributes.shape[-1])
            num_dst = x_dst.shape[0]
            logits = relation_attention_logits(p, x_src, x_dst, senders, receivers, attributes,
                                               self.negative_slope, dtype)
            keep = None
            if not deterministic and self.dropout_rate > 0.0:
                keep = jax.random.bernoulli(self.make_rng("dropout"), 1.0 - self.dropout_rate, logits.shape)
            alpha = segment_softmax(logits, receivers, num_dst, edge_masks.get(key), keep, self.dropout_rate)
            h_src = (x_src @ p["lin_src"].astype(dtype)).reshape(-1, self.heads, self.channels)
            out = aggregate_messages(h_src, alpha, senders, receivers, num_dst, block)
            if self.concat:
                out = out.reshape(num_dst, self.heads * self.channels)
            else:
                out = out.mean(axis=1)
            if self.residual:
                out = out + (x_dst @ p["res"].astype(dtype)).astype(out.dtype)
            per_dst.setdefault(dst, []).append((out + p["bias"]).astype(dtype))
            if return_attention:
                attention[key] = alpha
        outputs = {t: combine_relations(outs, self.aggr) for t, outs in per_dst.items()}
        if return_attention:
            return outputs, attention
        return outputs
