"""The original PyTorch project's graph and encoder, rebuilt independently for the converter tests.

``build_original_graph`` follows the original ``build_hetero_graph`` (node order, z-scores with
ddof=1, unit one-hot, reverse edges with copied attributes) in the original's names (``Feature``,
``Contains``, ``Is_of_type``); ``OriginalEncoder`` is its ``HeteroGATEncoder`` (learned
embeddings per node type, ``HeteroConv`` of ``GATConv((d, d), hidden // heads, heads=heads,
dropout=..., add_self_loops=False, concat=True, edge_dim=width or 0)`` with ``aggr="sum"``,
dropout then ELU after every layer). Deliberately not shared with ``checkpoints_convert``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch_geometric.nn import GATConv, HeteroConv


def write_intermediate_json(path: Path, seed: int = 0, num_samples: int = 9) -> Path:
    """A small intermediate JSON: 3 foods, 12 features (listed unsorted), 4 nutrients, 2 units."""
    rng = np.random.default_rng(seed)
    feature_ids = [int(x) for x in rng.permutation(np.arange(100, 112))]
    foods = ["tomato", "apple", "cheddar"]
    nutrients = [(1003, "Protein", "g"), (1004, "Fat", "g"), (1008, "Energy", "kcal"), (1093, "Sodium", "mg")]
    samples = []
    for i in range(num_samples):
        food = foods[i % 3]
        feats = rng.choice(feature_ids, size=5, replace=False)
        samples.append({
            "id": 500 + 7 * i,
            "food_name": food,
            "features": [{"id": int(f), "intensity": float(rng.lognormal(8, 1))} for f in feats],
            "nutrients": [{"id": nid, "name": name, "amount": float(rng.uniform(0, 50) + 10 * (i % 3)),
                           "unit": unit} for nid, name, unit in nutrients[: 3 + (i % 2)]],
        })
    data = {"samples": samples,
            "metadata": {"features": {"unique_feature_ids": feature_ids},
                         "nutrients": {"unique_nutrient_units": ["g", "mg", "kcal"],
                                       "unique_nutrients": [{"id": n, "name": m} for n, m, _ in nutrients]}}}
    path.write_text(json.dumps(data))
    return path


def _zscore(values, groups):
    out = list(values)
    by = {}
    for i, g in enumerate(groups):
        by.setdefault(g, []).append(i)
    for pos in by.values():
        vals = [values[i] for i in pos]
        mean = sum(vals) / len(vals)
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / max(1, len(vals) - 1))
        for i in pos:
            out[i] = (values[i] - mean) / std if std > 0 else 0.0
    return out


def build_original_graph(path: Path):
    """``(num_nodes, edge_index_dict, edge_attr_dict, mappings)`` as the original builds them."""
    data = json.loads(Path(path).read_text())
    samples, md = data["samples"], data.get("metadata", {})
    feature_ids = [int(x) for x in md["features"]["unique_feature_ids"]]
    fidx = {f: i for i, f in enumerate(feature_ids)}
    foods = sorted({s.get("food_name", "unknown") for s in samples})
    food_idx = {f: i for i, f in enumerate(foods)}
    nutrient_ids = sorted(int(n["id"]) for n in md["nutrients"]["unique_nutrients"])
    nidx = {n: i for i, n in enumerate(nutrient_ids)}
    units = md["nutrients"]["unique_nutrient_units"]
    sf_s, sf_f, sf_v, sf_g, is_s, is_f = [], [], [], [], [], []
    for i, s in enumerate(samples):
        is_s.append(i)
        is_f.append(food_idx[s["food_name"]])
        for feat in s["features"]:
            sf_s.append(i)
            sf_f.append(fidx[int(feat["id"])])
            sf_v.append(float(feat["intensity"]))
            sf_g.append(int(feat["id"]))
    fn_f, fn_n, fn_a, fn_u, seen = [], [], [], [], set()
    for s in samples:
        for n in s["nutrients"]:
            key = (s["food_name"], int(n["id"]))
            if key in seen:
                continue
            seen.add(key)
            fn_f.append(food_idx[s["food_name"]])
            fn_n.append(nidx[int(n["id"])])
            fn_a.append(float(n["amount"]))
            fn_u.append(n["unit"])
    sf_attr = torch.tensor(_zscore(sf_v, sf_g), dtype=torch.float32)[:, None]
    amounts = torch.tensor(_zscore(fn_a, [nutrient_ids[d] for d in fn_n]), dtype=torch.float32)[:, None]
    onehot = torch.zeros(len(fn_u), len(units))
    for i, u in enumerate(fn_u):
        onehot[i, units.index(u)] = 1.0
    fn_attr = torch.cat([amounts, onehot], 1)
    ei = {("Sample", "Contains", "Feature"): torch.tensor([sf_s, sf_f]),
          ("Sample", "Is_of_type", "Food"): torch.tensor([is_s, is_f]),
          ("Food", "Contains", "Nutrient"): torch.tensor([fn_f, fn_n])}
    ea = {("Sample", "Contains", "Feature"): sf_attr, ("Food", "Contains", "Nutrient"): fn_attr}
    for (s, r, d), idx in list(ei.items()):
        ei[(d, f"rev_{r}", s)] = idx.flip(0)
        if (s, r, d) in ea:
            ea[(d, f"rev_{r}", s)] = ea[(s, r, d)].clone()
    num_nodes = {"Sample": len(samples), "Feature": len(feature_ids), "Food": len(foods),
                 "Nutrient": len(nutrient_ids)}
    mappings = {"feature_ids": feature_ids, "food_names": foods, "nutrient_ids": nutrient_ids,
                "sample_ids": [int(s["id"]) for s in samples]}
    return num_nodes, ei, ea, mappings


class OriginalEncoder(torch.nn.Module):
    """The original ``HeteroGATEncoder``; ``edge_dims[rel]`` None builds GATConv without edge_dim."""

    def __init__(self, num_nodes, edge_types, edge_dims, embedding_dim=8, hidden_dim=8, num_heads=2,
                 num_layers=2, dropout=0.1, residual=False):
        super().__init__()
        self.dropout = dropout
        self.embeddings = torch.nn.ModuleDict({t: torch.nn.Embedding(n, embedding_dim) for t, n in num_nodes.items()})
        self.layers = torch.nn.ModuleList()
        for i in range(num_layers):
            d = embedding_dim if i == 0 else hidden_dim
            self.layers.append(HeteroConv({
                et: GATConv((d, d), hidden_dim // num_heads, heads=num_heads, dropout=dropout,
                            add_self_loops=False, concat=True, edge_dim=edge_dims[et], residual=residual)
                for et in edge_types}, aggr="sum"))

    def forward(self, edge_index_dict, edge_attr_dict):
        x = {t: e.weight for t, e in self.embeddings.items()}
        for conv in self.layers:
            x = conv(x, edge_index_dict, edge_attr_dict=edge_attr_dict)
            x = {t: F.elu(F.dropout(h, p=self.dropout, training=self.training)) for t, h in x.items()}
        return x


class GraphCLModel(torch.nn.Module):
    """Wrapper whose ``state_dict`` keys start with ``encoder.`` (as the GraphCL checkpoint's)."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder


class LinkPredModel(torch.nn.Module):
    """Fine-tuned model: encoder plus decoder heads (which have no jaxfood equivalent)."""

    def __init__(self, encoder, hidden_dim):
        super().__init__()
        self.encoder = encoder
        self.decoders = torch.nn.ModuleDict({"food": torch.nn.Linear(hidden_dim, hidden_dim),
                                             "nutrient": torch.nn.Bilinear(hidden_dim, hidden_dim, 1)})


def make_original(json_path: Path, *, seed=0, zero_width="lazy", embedding_dim=8, hidden_dim=8, num_heads=2,
                  num_layers=2, dropout=0.1, residual=False):
    """Builds, runs once (train mode) and returns ``(encoder, eval_outputs, graph_parts)``.

    ``zero_width``: how relations without edge attributes are built -- ``"lazy"`` (edge_dim=0,
    no edge_attr passed: PyG leaves ``lin_edge`` uninitialised), ``"empty"`` (edge_dim=0 and an
    [E, 0] edge_attr: ``lin_edge.weight`` becomes [H*C, 0]) or ``"none"`` (edge_dim=None).
    ``residual``: ``GATConv(residual=True)`` (a root weight ``res.weight`` per relation).
    """
    torch.manual_seed(seed)
    num_nodes, ei, ea, mappings = build_original_graph(json_path)
    dims = {et: (ea[et].shape[1] if et in ea else (None if zero_width == "none" else 0)) for et in ei}
    enc = OriginalEncoder(num_nodes, list(ei), dims, embedding_dim, hidden_dim, num_heads, num_layers, dropout,
                          residual)
    ea_run = dict(ea)
    if zero_width == "empty":
        ea_run.update({et: torch.zeros(ei[et].shape[1], 0) for et in ei if et not in ea})
    enc.train()
    enc(ei, ea_run)  # one training-mode forward, as after pretraining
    enc.eval()
    with torch.no_grad():
        out = {t: v.numpy() for t, v in enc(ei, ea).items()}
    return enc, out, (num_nodes, ei, ea, mappings)


def torch_load(path):
    from torch.nn.parameter import UninitializedParameter

    with torch.serialization.safe_globals([UninitializedParameter]):
        return torch.load(path, weights_only=True)
