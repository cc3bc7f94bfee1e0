"""The original PyTorch Geometric encoder, rebuilt for ``--verify`` and as the ``--to-torch`` layout.

As the PyTorch project builds it: a learned ``nn.Embedding`` per node type, then ``num_layers``
``HeteroConv`` layers (``aggr="sum"``) of one ``GATConv((d, d), hidden // heads, heads=heads,
dropout=dropout, add_self_loops=False, concat=True, edge_dim=width or 0)`` per relation, each
layer followed by dropout then ELU (the last one included).

jaxfood's other input modes (:mod:`jaxfood.models.encoder`) are added as optional input layers,
exactly as jaxfood computes them; a node type in mode ``embedding`` keeps the original's keys.
State-dict keys per node type ``T`` and mode (``d`` = ``embedding_dim``)::

    embedding  embeddings.T.weight   [N_T, d]       nn.Embedding       = jaxfood embed_T/embedding
    features   inputs.T.weight       [d, d_feat]    nn.Linear          = jaxfood project_T/kernel.T
               inputs.T.bias         [d]                               = jaxfood project_T/bias
    both       embeddings.T.weight + inputs.T.*     (summed)
    shared     shared.T              [1, d]         one row for every node = jaxfood shared_T
    profile    profile.T             [M, d]         (Sample only; M molecules) = jaxfood profile_T

``features`` reads ``x_dict[T]`` (the graph's ``node_features[T]``). ``profile`` is
:func:`profile_linear`, a torch re-implementation of :mod:`jaxfood.models.profile`: the sample's
standardised ``log1p(1e4 * area / TIC)`` profile times ``profile.T``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

#: jaxfood input modes the reference encoder implements (all of them).
INPUT_MODES = ("embedding", "features", "both", "shared", "profile")
#: Constants of :mod:`jaxfood.models.profile` / :mod:`jaxfood.graph.hetero_graph` (copied, not
#: imported, so the module stands on its own next to the original's code).
TIC_SCALE = 1.0e4
TRAIN_SPLIT = 0


def profile_linear(kernel, edge_index, edge_attr, num_samples: int, sample_is_dst: bool, sample_split=None,
                   normalisation: Mapping[str, Any] | None = None):
    """``[S, M] standardised intensity profile @ kernel [M, d]`` -> ``[S, d]``, as jaxfood.

    Args:
      kernel: ``[M, d]`` (``profile.<Type>``).
      edge_index: ``[2, E]`` of the relation between samples and molecules (jaxfood reads the
        ``Molecule -> Sample`` reverse relation, ``sample_is_dst=True``).
      edge_attr: ``[E, w >= 1]``; column 0 is the stored intensity ``z``.
      sample_split: ``[S]`` split codes (0 = train); the per-molecule mean and scale are taken over
        the training samples (absent molecules count as 0). ``None``: every sample is training.
      normalisation: the graph's ``meta.normalisation["contains_molecule"]``; with
        ``transform == "log1p"`` and ``mean``/``std`` the areas are ``expm1(z * std + mean)``
        (clipped at 60), otherwise ``z - min(z) + 1``.
    """
    import torch

    kernel = kernel.float()
    num_molecules = kernel.shape[0]
    edge_index = edge_index.long()
    samples, molecules = (edge_index[1], edge_index[0]) if sample_is_dst else (edge_index[0], edge_index[1])
    z = edge_attr[:, 0].float()
    stats = normalisation or {}
    if stats.get("transform") == "log1p" and "mean" in stats and "std" in stats:
        mean = torch.as_tensor(stats["mean"], dtype=torch.float32)
        std = torch.as_tensor(stats["std"], dtype=torch.float32)
        area = torch.expm1(torch.clamp(z * std[molecules] + mean[molecules], max=60.0))
    else:
        area = z - z.min() + 1.0 if z.shape[0] else z
    area = torch.clamp(area, min=0.0)
    tic = torch.zeros(num_samples).index_add_(0, samples, area)
    values = torch.log1p(TIC_SCALE * area / torch.where(tic > 0, tic, torch.ones_like(tic))[samples])
    if sample_split is None:
        train = torch.ones(num_samples, dtype=torch.bool)
    else:
        train = torch.as_tensor(sample_split) == TRAIN_SPLIT
    n_train = torch.clamp(train.sum(), min=1).float()
    on_train = train[samples]
    zero = torch.zeros_like(values)
    mean = torch.zeros(num_molecules).index_add_(0, molecules, torch.where(on_train, values, zero)) / n_train
    second = torch.zeros(num_molecules).index_add_(0, molecules, torch.where(on_train, values * values, zero)) / n_train
    var = torch.clamp(second - mean * mean, min=0.0)
    scale = torch.where(var > 1e-10, torch.sqrt(var), torch.ones_like(var))
    matrix = torch.zeros(num_samples, num_molecules).index_put_((samples, molecules), values, accumulate=True)
    return matrix @ (kernel / scale[:, None]) - ((mean / scale) @ kernel)[None, :]


def build_reference_encoder(num_nodes: Mapping[str, int], relations: Sequence[tuple[str, str, str]],
                            edge_dims: Mapping[tuple[str, str, str], int | None], embedding_dim: int,
                            hidden_dim: int, num_heads: int, num_layers: int, dropout: float = 0.0,
                            residual: bool = False, input_modes: Mapping[str, str] | None = None,
                            feature_dims: Mapping[str, int] | None = None,
                            profile_edges: tuple[str, str, str] | None = None):
    """A ``torch.nn.Module`` with ``embeddings.<Type>.weight`` and ``layers.<i>.convs.<...>`` keys
    (plus ``inputs.<Type>.*``, ``shared.<Type>``, ``profile.<Type>`` for other input modes).

    ``num_nodes``: node count of every node type the encoder embeds (its input, and the rows of
    embedding tables and of the profile kernel). ``edge_dims[rel]`` is the width of the
    relation's edge attributes: ``0`` builds PyG's lazy ``lin_edge`` (as the original does for
    relations without attributes), ``None`` none at all. ``residual``: ``GATConv(residual=True)``
    (root weights ``res.weight``, PyG >= 2.5). ``input_modes``: node type -> jaxfood input mode
    (default ``embedding``); ``feature_dims[T]``: input width of ``features``/``both`` types.
    ``profile_edges``: the relation a ``profile`` type reads its intensities from (default: the
    relation into it from another node type whose name has ``contains`` in it, else out of it).

    ``forward(edge_index_dict, edge_attr_dict, x_dict=None, sample_split=None, normalisation=None)``
    returns ``{type: [N_type, hidden_dim]}``; ``x_dict`` holds the input features, the other two
    are what :func:`profile_linear` needs.
    """
    import torch
    import torch.nn.functional as F
    from torch_geometric.nn import GATConv, HeteroConv

    modes = {t: (input_modes or {}).get(t, "embedding") for t in num_nodes}
    for t, m in modes.items():
        if m not in INPUT_MODES:
            raise ValueError(f"input mode {m!r} of '{t}': expected one of {list(INPUT_MODES)}")
        if m in ("features", "both") and t not in (feature_dims or {}):
            raise ValueError(f"input mode {m!r} of '{t}' needs feature_dims['{t}']")
    profiled = [t for t, m in modes.items() if m == "profile"]
    profile_rel: dict[str, tuple[tuple[str, str, str], bool, str]] = {}
    for t in profiled:
        rel = profile_edges or next((r for r in relations if r[2] == t and r[0] != t and "contains" in r[1].lower()),
                                    None) or next((r for r in relations if r[0] == t and r[2] != t
                                                   and "contains" in r[1].lower()), None)
        if rel is None or t not in (rel[0], rel[2]):
            raise ValueError(f"input mode 'profile' of '{t}': no relation between '{t}' and its molecules "
                             "(pass profile_edges)")
        sample_is_dst = rel[2] == t
        profile_rel[t] = (tuple(rel), sample_is_dst, rel[0] if sample_is_dst else rel[2])

    class OriginalHeteroGATEncoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.dropout = dropout
            self.embeddings = torch.nn.ModuleDict(
                {t: torch.nn.Embedding(int(n), embedding_dim) for t, n in num_nodes.items()
                 if modes[t] in ("embedding", "both")})
            inputs = {t: torch.nn.Linear(int(feature_dims[t]), embedding_dim) for t in num_nodes
                      if modes[t] in ("features", "both")}
            if inputs:
                self.inputs = torch.nn.ModuleDict(inputs)
            if profiled:
                self.profile = torch.nn.ParameterDict(
                    {t: torch.nn.Parameter(torch.zeros(int(num_nodes[profile_rel[t][2]]), embedding_dim))
                     for t in profiled})
            shared = {t: torch.nn.Parameter(torch.zeros(1, embedding_dim)) for t in num_nodes if modes[t] == "shared"}
            if shared:
                self.shared = torch.nn.ParameterDict(shared)
            self.layers = torch.nn.ModuleList()
            for i in range(num_layers):
                d = embedding_dim if i == 0 else hidden_dim
                self.layers.append(HeteroConv({
                    rel: GATConv((d, d), hidden_dim // num_heads, heads=num_heads, dropout=dropout,
                                 add_self_loops=False, concat=True, edge_dim=edge_dims.get(rel),
                                 **({"residual": True} if residual else {}))
                    for rel in relations}, aggr="sum"))

        def input_embeddings(self, edge_index_dict, edge_attr_dict, x_dict=None, sample_split=None,
                             normalisation=None):
            x = {}
            for t, n in num_nodes.items():
                mode = modes[t]
                parts = []
                if mode in ("embedding", "both"):
                    parts.append(self.embeddings[t].weight)
                if mode in ("features", "both"):
                    if not x_dict or t not in x_dict:
                        raise ValueError(f"x_dict['{t}'] is missing (input mode '{mode}')")
                    parts.append(self.inputs[t](x_dict[t].float()))
                if mode == "profile":
                    rel, sample_is_dst, _ = profile_rel[t]
                    parts.append(profile_linear(self.profile[t], edge_index_dict[rel], edge_attr_dict[rel], int(n),
                                                sample_is_dst, sample_split, normalisation))
                if mode == "shared":
                    parts.append(self.shared[t].expand(int(n), embedding_dim))
                x[t] = parts[0] if len(parts) == 1 else parts[0] + parts[1]
            return x

        def forward(self, edge_index_dict, edge_attr_dict, x_dict=None, sample_split=None, normalisation=None):
            x = self.input_embeddings(edge_index_dict, edge_attr_dict, x_dict, sample_split, normalisation)
            for conv in self.layers:
                x = conv(x, edge_index_dict, edge_attr_dict=edge_attr_dict)
                x = {t: F.elu(F.dropout(h, p=self.dropout, training=self.training)) for t, h in x.items()}
            return x

    return OriginalHeteroGATEncoder()
