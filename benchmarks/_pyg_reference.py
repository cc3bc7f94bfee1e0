"""The PyTorch Geometric reference of jaxfood's encoder, and weight copies between the two.

Used by the parity tests (``tests/test_gat_parity.py``) and the speed benchmark
(``benchmarks/bench_step.py``). Needs ``torch`` and ``torch_geometric`` (the ``[convert]`` /
test extras). The production PyTorch -> Flax checkpoint converter lives in
``checkpoints_convert/``; this module only serves tests and benchmarks.

Relation keys are jaxfood's ``"Src|rel|Dst"`` strings; PyG edge types are ``(Src, rel, Dst)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch_geometric.nn import GATConv, HeteroConv


def edge_type(key: str) -> tuple[str, str, str]:
    src, rel, dst = key.split("|")
    return src, rel, dst


def make_hetero_conv(relations: Sequence[str], in_dims: Mapping[str, int], edge_dims: Mapping[str, int],
                     heads: int, channels: int, *, concat: bool = True, dropout: float = 0.0,
                     aggr: str = "sum", residual: bool = False) -> HeteroConv:
    """``HeteroConv({rel: GATConv((d_src, d_dst), C, heads=H, edge_dim=F or None, add_self_loops=False,
    residual=residual)})``."""
    convs = {}
    for key in relations:
        src, _, dst = edge_type(key)
        convs[edge_type(key)] = GATConv((in_dims[src], in_dims[dst]), channels, heads=heads, concat=concat,
                                        dropout=dropout, edge_dim=edge_dims.get(key) or None,
                                        add_self_loops=False, residual=residual)
    return HeteroConv(convs, aggr=aggr)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().astype(np.float32)


def gat_conv_to_flax(conv: GATConv, *, grads: bool = False) -> dict:
    """One ``GATConv``'s weights (or, with ``grads``, their ``.grad``) in the jaxfood layout."""

    def get(p: torch.Tensor) -> np.ndarray:
        return _np(p.grad if grads else p)

    out = {
        "lin_src": {"kernel": get(conv.lin_src.weight).T},
        "lin_dst": {"kernel": get(conv.lin_dst.weight).T},
        "att_src": get(conv.att_src)[0],
        "att_dst": get(conv.att_dst)[0],
        "bias": get(conv.bias),
    }
    if conv.lin_edge is not None:
        out["lin_edge"] = {"kernel": get(conv.lin_edge.weight).T}
        out["att_edge"] = get(conv.att_edge)[0]
    if getattr(conv, "res", None) is not None:
        out["res"] = {"kernel": get(conv.res.weight).T}
    return out


def hetero_conv_to_flax(hetero_conv: HeteroConv, relations: Sequence[str], *, grads: bool = False) -> dict:
    """``{relation key: GATConv params}`` of one ``HeteroConv`` (a ``layer_<i>`` subtree)."""
    return {key: gat_conv_to_flax(hetero_conv.convs[edge_type(key)], grads=grads) for key in relations}


def edges_to_pyg(edges: Mapping[str, object]) -> tuple[dict, dict]:
    """jaxfood ``EdgeSet``s -> PyG ``edge_index_dict`` and ``edge_attr_dict`` (attributed relations only)."""
    edge_index, edge_attr = {}, {}
    for key, e in edges.items():
        et = edge_type(key)
        edge_index[et] = torch.as_tensor(np.stack([np.asarray(e.senders), np.asarray(e.receivers)]).astype(np.int64))
        attributes = np.asarray(e.attributes, np.float32)
        if attributes.shape[1] > 0:
            edge_attr[et] = torch.as_tensor(attributes)
    return edge_index, edge_attr


class PygHeteroGATEncoder(torch.nn.Module):
    """The PyTorch original: a learned embedding per node id, then ``num_layers`` ``HeteroConv``
    layers of ``GATConv`` (heads concatenated), each followed by dropout then ELU."""

    def __init__(self, num_nodes: Mapping[str, int], relations: Sequence[str], edge_dims: Mapping[str, int], *,
                 hidden_dim: int, num_heads: int, num_layers: int, embedding_dim: int, dropout: float,
                 aggr: str = "sum", residual: bool = False):
        super().__init__()
        self.relations = list(relations)
        self.dropout = dropout
        self.embeddings = torch.nn.ParameterDict(
            {t: torch.nn.Parameter(torch.randn(n, embedding_dim) / np.sqrt(embedding_dim))
             for t, n in num_nodes.items()})
        self.convs = torch.nn.ModuleList()
        for i in range(num_layers):
            d = embedding_dim if i == 0 else hidden_dim
            self.convs.append(make_hetero_conv(relations, dict.fromkeys(num_nodes, d), edge_dims, num_heads,
                                               hidden_dim // num_heads, dropout=dropout, aggr=aggr,
                                               residual=residual))

    def forward(self, edge_index_dict: dict, edge_attr_dict: dict, x_dict: dict | None = None) -> dict:
        x = dict(self.embeddings) if x_dict is None else x_dict
        for conv in self.convs:
            x = conv(x, edge_index_dict, edge_attr_dict=edge_attr_dict)
            x = {t: torch.nn.functional.elu(torch.nn.functional.dropout(h, self.dropout, self.training))
                 for t, h in x.items()}
        return x

    def to_flax(self, *, grads: bool = False) -> dict:
        """The jaxfood ``HeteroGATEncoder`` params (all input modes ``embedding``)."""

        def get(p: torch.Tensor) -> np.ndarray:
            return _np(p.grad if grads else p)

        params = {f"embed_{t}": {"embedding": get(p)} for t, p in self.embeddings.items()}
        for i, conv in enumerate(self.convs):
            params[f"layer_{i}"] = hetero_conv_to_flax(conv, self.relations, grads=grads)
        return params
