"""The original PyTorch Geometric encoder, rebuilt for ``--verify``.

As the PyTorch project builds it: a learned ``nn.Embedding`` per node type, then ``num_layers``
``HeteroConv`` layers (``aggr="sum"``) of one ``GATConv((d, d), hidden // heads, heads=heads,
dropout=dropout, add_self_loops=False, concat=True, edge_dim=width or 0)`` per relation, each
layer followed by dropout then ELU (the last one included).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def build_reference_encoder(num_nodes: Mapping[str, int], relations: Sequence[tuple[str, str, str]],
                            edge_dims: Mapping[tuple[str, str, str], int | None], embedding_dim: int,
                            hidden_dim: int, num_heads: int, num_layers: int, dropout: float = 0.0,
                            residual: bool = False):
    """A ``torch.nn.Module`` with ``embeddings.<Type>.weight`` and ``layers.<i>.convs.<...>`` keys.

    ``edge_dims[rel]`` is the width of the relation's edge attributes: ``0`` builds PyG's lazy
    ``lin_edge`` (as the original does for relations without attributes), ``None`` none at all.
    ``residual``: ``GATConv(residual=True)`` (root weights ``res.weight``, PyG >= 2.5).
    ``forward(edge_index_dict, edge_attr_dict)`` returns ``{type: [N_type, hidden_dim]}``.
    """
    import torch
    import torch.nn.functional as F
    from torch_geometric.nn import GATConv, HeteroConv

    class OriginalHeteroGATEncoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.dropout = dropout
            self.embeddings = torch.nn.ModuleDict(
                {t: torch.nn.Embedding(int(n), embedding_dim) for t, n in num_nodes.items()})
            self.layers = torch.nn.ModuleList()
            for i in range(num_layers):
                d = embedding_dim if i == 0 else hidden_dim
                self.layers.append(HeteroConv({
                    rel: GATConv((d, d), hidden_dim // num_heads, heads=num_heads, dropout=dropout,
                                 add_self_loops=False, concat=True, edge_dim=edge_dims.get(rel),
                                 **({"residual": True} if residual else {}))
                    for rel in relations}, aggr="sum"))

        def forward(self, edge_index_dict, edge_attr_dict):
            x = {t: emb.weight for t, emb in self.embeddings.items()}
            for conv in self.layers:
                x = conv(x, edge_index_dict, edge_attr_dict=edge_attr_dict)
                x = {t: F.elu(F.dropout(h, p=self.dropout, training=self.training)) for t, h in x.items()}
            return x

    return OriginalHeteroGATEncoder()
