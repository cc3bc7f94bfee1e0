"""``--verify``: the PyG original and the converted jaxfood encoder on the same graph.

The PyG module is rebuilt from the checkpoint's own tensors (not from the conversion), both run
in eval mode on a random graph of the checkpoint's shapes (or on the graph that the upstream
intermediate JSON builds in compatibility mode), and the largest absolute difference of the
node embeddings is reported per node type.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from checkpoints_convert.convert import Conversion
from checkpoints_convert.errors import ConvertError
from checkpoints_convert.load import (
    UNINITIALIZED,
    TorchCheckpoint,
    numpy_to_tensor,
    require_pyg,
    require_torch,
)
from checkpoints_convert.mapping import RelationName
from jaxfood.graph import schema

#: Conversion is correct when every node type agrees to this (float32 rounding is ~1e-7).
TOLERANCE = 1e-5
#: Samples of the random verification graph when their input is their intensity profile.
PROFILE_SAMPLES = 64


def checkpoint_order_params(conversion: Conversion) -> dict[str, Any]:
    """The converted params with embedding rows in the checkpoint's order (undoing ``--mappings``)."""
    from checkpoints_convert.export import _restore_rows

    params = {k: v for k, v in conversion.params.items()}
    for t, rows in conversion.torch_source.get("rows", {}).items():
        table = np.asarray(params[f"embed_{t}"]["embedding"])
        params[f"embed_{t}"] = {"embedding": _restore_rows(table, rows, "conversion", t).astype(np.float32)}
    return params


def random_graph(num_nodes: Mapping[str, int], relations: list[str], edge_dims: Mapping[str, int], seed: int = 0,
                 feature_dims: Mapping[str, int] | None = None):
    """A :class:`HeteroGraph` with the given shapes: random edges (reverses mirror their forward
    relation, as in real graphs), standard-normal edge attributes and node features
    (``feature_dims``), and random train/val/test sample splits (the ``profile`` statistics)."""
    from jaxfood.graph.hetero_graph import EdgeSet, GraphMeta, HeteroGraph

    rng = np.random.default_rng(seed)
    edges: dict[str, EdgeSet] = {}
    for key in relations:
        rkey = schema.reverse_key(key)
        if rkey in edges:
            e = edges[rkey]
            edges[key] = EdgeSet(senders=e.receivers, receivers=e.senders, attributes=e.attributes)
            continue
        src, _, dst = schema.split_key(key)
        n_src, n_dst = int(num_nodes[src]), int(num_nodes[dst])
        num_edges = 3 * max(n_src, n_dst)
        senders = rng.integers(0, n_src, num_edges).astype(np.int32)
        receivers = rng.integers(0, n_dst, num_edges).astype(np.int32)
        attributes = rng.normal(size=(num_edges, int(edge_dims.get(key, 0)))).astype(np.float32)
        edges[key] = EdgeSet(senders=senders, receivers=receivers, attributes=attributes)
    types = [t for t in schema.NODE_TYPES if t in num_nodes]
    F = int(num_nodes.get(schema.FOOD, 0))
    S = int(num_nodes.get(schema.SAMPLE, 0))
    node_features = {t: rng.normal(size=(int(num_nodes[t]), int(w))).astype(np.float32)
                     for t, w in (feature_dims or {}).items()}
    split = rng.integers(0, 3, S).astype(np.int32)
    split[:1] = 0  # at least one training sample
    return HeteroGraph(node_features=node_features, edges={k: edges[k] for k in relations},
                       sample_food=np.zeros(S, np.int32), sample_split=split,
                       food_nutrients=np.zeros((F, 0), np.float32), food_category=np.zeros(F, np.int32),
                       meta=GraphMeta(num_nodes={t: int(num_nodes[t]) for t in types}))


def reference_from_checkpoint(conversion: Conversion, ckpt: TorchCheckpoint,
                              num_nodes: Mapping[str, int] | None = None):
    """The original PyG encoder with the checkpoint's tensors loaded (strictly), canonical names.

    ``num_nodes``: node counts of the graph it will run on (needed for node types without an
    embedding table; by default the tables' rows, the profile kernel's for molecules)."""
    require_pyg()
    from checkpoints_convert.reference import build_reference_encoder

    arch = conversion.architecture
    relations = [k for k in conversion.params.get("layer_0", {})]
    inert_keys = set(conversion.report["inert"])
    has_inert: dict[str, bool] = {}
    state = {}
    counts = dict(num_nodes or {})
    modes = {t: m for t, m in (conversion.encoder_config.get("input_modes") or {}).items()}
    feature_dims = {}
    for key, where in conversion.located.items():
        t = where.get("node_type")
        if where["kind"] == "embedding":
            state[f"embeddings.{t}.weight"] = ckpt.state[key]
            counts.setdefault(t, int(np.shape(ckpt.state[key])[0]))
            continue
        if where["kind"] == "input":
            state[f"inputs.{t}.{where['param']}"] = ckpt.state[key]
            if where["param"] == "weight":
                feature_dims[t] = int(np.shape(ckpt.state[key])[1])
            continue
        if where["kind"] in ("shared", "profile"):
            state[f"{where['kind']}.{t}"] = ckpt.state[key]
            if where["kind"] == "profile":
                counts.setdefault(schema.MOLECULE, int(np.shape(ckpt.state[key])[0]))
            continue
        rel = where["relation"]
        if key in inert_keys:
            has_inert[rel] = True
        module_key = RelationName(*schema.split_key(rel), style="new").module_key()
        state[f"layers.{where['layer']}.convs.{module_key}.{where['param']}"] = ckpt.state[key]
    edge_dims = {}
    for k in relations:
        w = int(arch.edge_dims.get(k, 0))
        edge_dims[tuple(schema.split_key(k))] = w if w > 0 else (0 if has_inert.get(k) else None)
    types = {t for k in relations for t in (schema.split_key(k)[0], schema.split_key(k)[2])}
    missing = sorted(t for t in types if t not in counts)
    if missing:
        raise ConvertError(f"{ckpt.path}: --verify: no node count for {missing} (no embedding table)")
    module = build_reference_encoder({t: counts[t] for t in schema.NODE_TYPES if t in types},
                                     [tuple(schema.split_key(k)) for k in relations], edge_dims,
                                     arch.embedding_dim, arch.hidden_dim, arch.num_heads, arch.num_layers,
                                     float(conversion.encoder_config.get("dropout", 0.0)),
                                     residual=bool(conversion.encoder_config.get("residual", False)),
                                     input_modes=modes, feature_dims=feature_dims)
    tensors = {k: numpy_to_tensor(v, "uninitialized" if v is UNINITIALIZED else "float32") for k, v in state.items()}
    try:
        module.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        raise ConvertError(f"{ckpt.path}: the original PyG encoder cannot load these tensors "
                           f"({str(err).splitlines()[0]})") from None
    module.eval()
    return module


def run_verify(conversion: Conversion, ckpt: TorchCheckpoint, graph=None, seed: int = 0) -> dict[str, Any]:
    """``{"graph": "random"|path, "max_abs_diff": {type: float}, "tolerance", "passed"}``."""
    torch = require_torch()
    import jax

    from jaxfood.config import config_from_dict
    from jaxfood.models.encoder import EncoderConfig, make_encoder

    params = checkpoint_order_params(conversion)
    relations = list(params.get("layer_0", {}))
    num_nodes = {t: int(params[f"embed_{t}"]["embedding"].shape[0]) for t in schema.NODE_TYPES
                 if f"embed_{t}" in params}
    arch = conversion.architecture
    feature_dims = {t: int(np.shape(params[f"project_{t}"]["kernel"])[0]) for t in schema.NODE_TYPES
                    if f"project_{t}" in params}
    where = "random graph of the checkpoint's shapes"
    if graph is None:
        sizes = dict(num_nodes)
        for t in schema.NODE_TYPES:
            if f"profile_{t}" in params:
                sizes.setdefault(schema.MOLECULE, int(np.shape(params[f"profile_{t}"])[0]))
        for k in relations:  # node types without a table: any count (the shapes do not depend on it)
            for t in (schema.split_key(k)[0], schema.split_key(k)[2]):
                # profile inputs: enough samples that the per-molecule standardisation is well
                # conditioned (with a handful, a molecule near-constant over the training samples
                # makes float32 itself, in jaxfood as in torch, unreliable beyond ~1e-5)
                sizes.setdefault(t, PROFILE_SAMPLES if f"profile_{t}" in params else int(arch.num_nodes.get(t) or 7))
        graph = random_graph(sizes, relations, arch.edge_dims, seed, feature_dims)
    else:
        where = str(graph.meta.extra.get("sources", {}).get("upstream_json", "given graph"))
        for t, n in num_nodes.items():
            if graph.num_nodes.get(t) != n:
                raise ConvertError(f"{where}: has {graph.num_nodes.get(t)} '{t}' nodes but the checkpoint's "
                                   f"embedding table has {n} rows")
        dims = graph.edge_dims()
        for k in relations:
            if k not in graph.edges:
                raise ConvertError(f"{where}: relation '{k}' of the checkpoint is missing from the graph")
            if dims[k] != arch.edge_dims.get(k, 0):
                raise ConvertError(f"{where}: relation '{k}' has {dims[k]} edge attributes, the checkpoint "
                                   f"expects {arch.edge_dims.get(k, 0)}")
        graph = graph.replace(edges={k: graph.edges[k] for k in relations})
    module = reference_from_checkpoint(conversion, ckpt, {t: int(n) for t, n in graph.num_nodes.items()})
    cfg = config_from_dict(EncoderConfig(), conversion.encoder_config, "converted encoder_config")
    encoder = make_encoder(graph, cfg)
    # one compiled program instead of hundreds of op-by-op dispatches
    ours = jax.jit(lambda p, g: encoder.apply({"params": p}, g, deterministic=True))(params, graph)
    ours = {t: np.asarray(jax.device_get(v)) for t, v in ours.items()}

    edge_index, edge_attr = {}, {}
    for k in relations:
        e = graph.edges[k]
        triple = tuple(schema.split_key(k))
        edge_index[triple] = torch.from_numpy(np.stack([np.asarray(e.senders), np.asarray(e.receivers)]).astype(np.int64))
        if int(np.shape(e.attributes)[1]) > 0:  # as the original: no edge_attr for attribute-less relations
            edge_attr[triple] = torch.from_numpy(np.asarray(e.attributes, np.float32))
    x_dict = {t: torch.from_numpy(np.asarray(graph.node_features[t], np.float32)) for t in feature_dims
              if t in graph.node_features}
    normalisation = (graph.meta.normalisation or {}).get("contains_molecule")
    with torch.no_grad():
        theirs = {t: v.numpy() for t, v in module(edge_index, edge_attr, x_dict, torch.from_numpy(
            np.asarray(graph.sample_split)), normalisation).items()}
    diffs = {}
    for t in sorted(set(ours) | set(theirs), key=lambda t: schema.NODE_TYPES.index(t)):
        if t not in ours or t not in theirs or ours[t].shape != theirs[t].shape:
            diffs[t] = float("inf")
            continue
        diffs[t] = float(np.max(np.abs(ours[t] - theirs[t]))) if ours[t].size else 0.0
    return {"graph": where, "max_abs_diff": diffs, "tolerance": TOLERANCE,
            "passed": bool(diffs) and all(v <= TOLERANCE for v in diffs.values())}
