"""The heterogeneous GAT encoder: input encoders per node type, then L ``HeteroGATConv`` layers.

The design of the PyTorch original (PyG ``HeteroConv`` of one ``GATConv`` per relation,
``add_self_loops=False``, each layer followed by dropout then ELU, the last one included), with
input encoders chosen per node type:

- ``embedding``: a learned vector per node id (as the original);
- ``features``: a Dense projection of ``graph.node_features[type]`` (spectral embeddings,
  nutrient profiles);
- ``both``: their sum;
- ``shared``: one learned vector for every node of the type (inductive: new samples work);
- ``profile`` (Sample only): a Dense map of the sample's own standardised intensity profile
  (:mod:`jaxfood.models.profile`, read from the ``Molecule -> Sample`` edges it receives, under
  their edge mask): inductive, and samples start distinct, so Sample -> Molecule -> Sample paths
  carry which samples share which molecules instead of copies of one vector.

Layer 0 reads ``embedding_dim`` wide inputs, later layers ``hidden_dim``; every layer has
``num_heads`` heads of ``hidden_dim // num_heads`` channels, concatenated, so every node type leaves
each layer ``hidden_dim`` wide.

Parameter layout (``params`` of ``encoder.init``; the checkpoint converter maps PyG names onto it)::

    embed_<Type>    {"embedding": [num_nodes, embedding_dim]}          input mode embedding/both
    project_<Type>  {"kernel": [d_feat, embedding_dim], "bias": [embedding_dim]}  features/both
    shared_<Type>   [1, embedding_dim]                                 input mode shared
    profile_<Type>  [num_molecules, embedding_dim]                     input mode profile
    layer_<i>
      <Src|rel|Dst>
        lin_src   {"kernel": [d_in, H*C]}       = PyG convs[rel].lin_src.weight.T
        lin_dst   {"kernel": [d_in, H*C]}       = PyG convs[rel].lin_dst.weight.T
        att_src   [H, C]                         = PyG convs[rel].att_src[0]
        att_dst   [H, C]                         = PyG convs[rel].att_dst[0]
        lin_edge  {"kernel": [edge_dim, H*C]}   = PyG convs[rel].lin_edge.weight.T  (edge_dim > 0)
        att_edge  [H, C]                         = PyG convs[rel].att_edge[0]         (edge_dim > 0)
        bias      [H*C]                          = PyG convs[rel].bias
        res       {"kernel": [d_in, H*C]}       = PyG convs[rel].res.weight.T   (residual)

Node types that no relation of a layer ends in are not updated by that layer and, as in PyG's
``HeteroConv`` (whose output dict simply lacks them), are absent from its output; a later layer
that needs such a type as a source is an error. With the jaxfood schema every relation has a
reverse, so every node type is updated by every layer.

Full graphs and sampled (padded) subgraphs take the same code path: padding edges are masked edges
(the encoder merges :func:`~jaxfood.graph.sampling.padding_edge_masks` of the graph it gets into
``edge_masks`` itself) and ``node_index`` maps a subgraph's local nodes to rows of the per-id tables.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from jaxfood.errors import ConfigError, GraphError
from jaxfood.graph import schema
from jaxfood.graph.hetero_graph import EdgeSet, GraphMeta
from jaxfood.graph.sampling import mask_padding
from jaxfood.models.gat import AGGREGATIONS, HeteroGATConv
from jaxfood.models.initialise import init_params
from jaxfood.models.profile import sample_profile

Array = Any

INPUT_MODES = ("embedding", "features", "both", "shared", "profile")
#: Input modes with no per-node parameter: new nodes of the type embed without retraining.
INDUCTIVE_MODES = ("shared", "profile")
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """Hyperparameters of :class:`HeteroGATEncoder`.

    ``input_modes`` maps node types to an input mode (see the module doc); node types it does not
    name use ``embedding``, as the PyTorch original. ``compute_dtype`` ``bfloat16`` computes in
    bfloat16 with float32 parameters (GPU/TPU).
    """

    hidden_dim: int = 64
    num_heads: int = 4
    num_layers: int = 2
    embedding_dim: int = 64
    dropout: float = 0.2
    aggr: str = "sum"
    input_modes: dict[str, str] = dataclasses.field(default_factory=dict)
    compute_dtype: str = "float32"
    residual: bool = False

    def __hash__(self) -> int:  # the dict field would make the generated hash fail
        return hash((self.hidden_dim, self.num_heads, self.num_layers, self.embedding_dim, self.dropout,
                     self.aggr, tuple(sorted(self.input_modes.items())), self.compute_dtype, self.residual))

    def input_mode(self, node_type: str) -> str:
        return self.input_modes.get(node_type, "embedding")

    def validate(self, source: str = "encoder config") -> EncoderConfig:
        """Raises :class:`ConfigError` naming the first bad key."""
        for name in ("hidden_dim", "num_heads", "num_layers", "embedding_dim"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{source}: key '{name}' = {getattr(self, name)}: expected a positive integer")
        if self.hidden_dim % self.num_heads:
            raise ConfigError(f"{source}: key 'hidden_dim' = {self.hidden_dim}: expected a multiple of "
                              f"num_heads = {self.num_heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{source}: key 'dropout' = {self.dropout}: expected a number in [0, 1)")
        if self.aggr not in AGGREGATIONS:
            raise ConfigError(f"{source}: key 'aggr' = {self.aggr!r}: expected one of {list(AGGREGATIONS)}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ConfigError(f"{source}: key 'compute_dtype' = {self.compute_dtype!r}: expected one of "
                              f"{list(COMPUTE_DTYPES)}")
        for t, mode in self.input_modes.items():
            if t not in schema.NODE_TYPES:
                raise ConfigError(f"{source}: key 'input_modes.{t}': unknown node type (expected one of "
                                  f"{list(schema.NODE_TYPES)})")
            if mode not in INPUT_MODES:
                raise ConfigError(f"{source}: key 'input_modes.{t}' = {mode!r}: expected one of {list(INPUT_MODES)}")
            if mode == "profile" and t != schema.SAMPLE:
                raise ConfigError(f"{source}: key 'input_modes.{t}' = 'profile': only '{schema.SAMPLE}' nodes have an "
                                  "intensity profile")
        return self


class _Table(nn.Module):
    """A learned per-id table stored as ``{"embedding": [num, dim]}`` (the ``nn.Embed`` layout)."""

    num_embeddings: int
    features: int

    @nn.compact
    def __call__(self) -> Array:
        init = nn.initializers.variance_scaling(1.0, "fan_in", "normal", out_axis=0)
        return self.param("embedding", init, (self.num_embeddings, self.features), jnp.float32)


class HeteroGATEncoder(nn.Module):
    """Node embeddings of every node type from a :class:`~jaxfood.graph.hetero_graph.HeteroGraph`.

    Build it with :func:`make_encoder`. Attributes are static descriptions of the training graph:

    Attributes:
      config: the :class:`EncoderConfig`.
      relations: relation keys, in order.
      num_nodes: (type, count) pairs: sizes of the per-id embedding tables.
      feature_dims: (type, d_feat) pairs of the node types with input features.
      edge_block: edges per block of the neighbour sums (speed and memory only; ``None`` picks
        by backend, see :class:`~jaxfood.models.gat.HeteroGATConv`).
    """

    config: EncoderConfig
    relations: tuple[str, ...]
    num_nodes: tuple[tuple[str, int], ...]
    feature_dims: tuple[tuple[str, int], ...] = ()
    edge_block: int | None = None

    def _input_embeddings(self, graph, node_index: Mapping[str, Array] | None,
                          edge_masks: Mapping[str, Array] | None = None) -> dict[str, Array]:
        cfg = self.config
        dtype = COMPUTE_DTYPES[cfg.compute_dtype]
        feature_dims = dict(self.feature_dims)
        out = {}
        for node_type, table_size in self.num_nodes:
            mode = cfg.input_mode(node_type)
            if node_index is not None and node_type in node_index:
                index = jnp.asarray(node_index[node_type])
                count = index.shape[0]
            else:
                index, count = None, int(graph.meta.num_nodes[node_type])
            parts = []
            if mode in ("embedding", "both"):
                table = _Table(table_size, cfg.embedding_dim, name=f"embed_{node_type}")()
                if index is None:
                    if count != table_size:
                        raise GraphError(f"graph has {count} '{node_type}' nodes but the encoder's embedding "
                                         f"table has {table_size}; pass node_index for subgraphs")
                    parts.append(table)
                else:
                    parts.append(table[index])
            if mode in ("features", "both"):
                if node_type not in graph.node_features:
                    raise GraphError(f"graph: node_features['{node_type}'] is missing (input mode '{mode}')")
                x = jnp.asarray(graph.node_features[node_type])
                if x.shape[-1] != feature_dims.get(node_type, x.shape[-1]):
                    raise GraphError(f"graph: node_features['{node_type}'] has {x.shape[-1]} columns, the encoder "
                                     f"expects {feature_dims[node_type]}")
                parts.append(nn.Dense(cfg.embedding_dim, dtype=dtype, name=f"project_{node_type}")(x.astype(dtype)))
            if mode == "profile":
                num_molecules = dict(self.num_nodes)[schema.MOLECULE]
                incoming = schema.reverse_key(schema.CONTAINS)
                profile = sample_profile(graph, (edge_masks or {}).get(incoming), incoming=True)
                kernel = self.param(f"profile_{node_type}", nn.initializers.lecun_normal(),
                                    (num_molecules, cfg.embedding_dim), jnp.float32)
                if node_index is not None and schema.MOLECULE in node_index:  # a sampled subgraph's molecules
                    kernel = kernel[jnp.asarray(node_index[schema.MOLECULE])]
                elif profile.num_molecules != num_molecules:
                    raise GraphError(f"graph has {profile.num_molecules} '{schema.MOLECULE}' nodes but the encoder's "
                                     f"profile input reads {num_molecules}; pass node_index for subgraphs")
                parts.append(profile.linear(kernel))
            if mode == "shared":
                shared = self.param(f"shared_{node_type}", nn.initializers.normal(1.0), (1, cfg.embedding_dim),
                                    jnp.float32)
                parts.append(jnp.broadcast_to(shared, (count, cfg.embedding_dim)))
            x = parts[0] if len(parts) == 1 else parts[0] + parts[1]
            out[node_type] = x.astype(dtype)
        return out

    @nn.compact
    def __call__(self, graph, edge_masks: Mapping[str, Array] | None = None,
                 node_index: Mapping[str, Array] | None = None, deterministic: bool = True,
                 return_attention: bool = False):
        """Embeds every node of ``graph``.

        Args:
          graph: a ``HeteroGraph`` (full or sampled subgraph) with the encoder's relations.
          edge_masks: optional relation key -> [E] bool (False: the edge is off; augmentations and
            label masking use this). Missing keys: all edges on. A sampled subgraph's padding edges
            are off whatever the masks say (:func:`~jaxfood.graph.sampling.mask_padding`).
          node_index: optional node type -> [n] int32 rows of the per-id embedding tables for the
            graph's nodes (sampled subgraphs); default: the graph is the training graph itself.
            Initialising on a sampled subgraph needs none (parameter shapes come from the encoder).
          deterministic: disables dropout; with False, pass ``rngs={"dropout": key}``.
          return_attention: also return a list over layers of dict relation key -> [E, heads].

        Returns:
          dict node type -> [N_type, hidden_dim] (in the compute dtype), and the attention list
          when ``return_attention``.
        """
        cfg = self.config
        dtype = COMPUTE_DTYPES[cfg.compute_dtype]
        missing = [k for k in self.relations if k not in graph.edges]
        if missing:
            raise GraphError(f"graph: relation '{missing[0]}' is missing (the encoder was built with it)")
        edge_masks = mask_padding(graph, edge_masks)
        if node_index is None and self.is_initializing() and graph.meta.extra.get("sampled"):
            # Parameter shapes come from the encoder, not the subgraph: any rows of the tables do.
            node_index = {t: jnp.zeros(n, jnp.int32) for t, n in graph.num_nodes.items()}
        x = self._input_embeddings(graph, node_index, edge_masks)
        channels = cfg.hidden_dim // cfg.num_heads
        attention = []
        for i in range(cfg.num_layers):
            for key in self.relations:
                src, _, dst = schema.split_key(key)
                for t in (src, dst):
                    if t not in x:
                        raise GraphError(f"layer {i}: node type '{t}' of relation '{key}' was not updated by "
                                         f"layer {i - 1} (no relation ends in it)")
            conv = HeteroGATConv(self.relations, cfg.num_heads, channels, concat=True, dropout_rate=cfg.dropout,
                                 aggr=cfg.aggr, dtype=dtype, edge_block=self.edge_block, residual=cfg.residual,
                                 name=f"layer_{i}")
            result = conv(x, graph.edges, edge_masks, deterministic=deterministic, return_attention=return_attention)
            if return_attention:
                result, layer_attention = result
                attention.append(layer_attention)
            x = {t: nn.elu(nn.Dropout(cfg.dropout)(h, deterministic=deterministic)) for t, h in result.items()}
        if return_attention:
            return x, attention
        return x


def parameter_skeleton(graph):
    """``graph`` without edges and with only the node counts of its meta (and whether it is a
    sampled subgraph): all an encoder's initialisation reads. Parameter shapes and values come from
    the encoder and the key alone, so a pretraining graph and a fine-tuning graph of the same nodes
    initialise through the same compiled program."""

    edges = {k: EdgeSet(senders=np.zeros(0, np.int32), receivers=np.zeros(0, np.int32),
                        attributes=np.zeros((0, int(e.attributes.shape[1])), np.float32))
             for k, e in graph.edges.items()}
    return graph.replace(edges=edges, meta=_skeleton_meta(tuple(graph.meta.num_nodes.items()),
                                                          bool(graph.meta.extra.get("sampled"))))


@functools.lru_cache(maxsize=16)
def _skeleton_meta(num_nodes: tuple[tuple[str, int], ...], sampled: bool) -> GraphMeta:
    """One meta object per node counts (metas compare by identity: one trace for all skeletons)."""
    return GraphMeta(num_nodes=dict(num_nodes), extra={"sampled": True} if sampled else {})


def init_encoder(encoder: HeteroGATEncoder, rng, graph, node_index: Mapping[str, Array] | None = None):
    """``encoder.init(rng, graph, node_index=node_index)["params"]``, drawn parameter by parameter
    (:func:`~jaxfood.models.initialise.init_params`) on the graph's :func:`parameter_skeleton`:
    one recorded initialisation for every encoder of the same structure in the process."""
    return init_params(encoder, rng, parameter_skeleton(graph), node_index=node_index)


def make_encoder(graph, cfg: EncoderConfig) -> HeteroGATEncoder:
    """A :class:`HeteroGATEncoder` for ``graph``'s node counts, feature widths and relations."""
    cfg.validate()
    for t in graph.node_types:
        mode = cfg.input_mode(t)
        if mode in ("features", "both") and t not in graph.node_features:
            raise ConfigError(f"encoder config: key 'input_modes.{t}' = {mode!r}, but the graph has no "
                              f"input features for '{t}' (use 'embedding' or 'shared')")
    return HeteroGATEncoder(
        config=cfg,
        relations=tuple(graph.edges.keys()),
        num_nodes=tuple((t, int(graph.meta.num_nodes[t])) for t in graph.node_types),
        feature_dims=tuple((t, int(x.shape[1])) for t, x in graph.node_features.items()),
    )
