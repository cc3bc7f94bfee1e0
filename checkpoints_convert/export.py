"""jaxfood encoder params -> the original project's PyTorch state dict (``--to-torch``).

A converted checkpoint carries ``meta["torch_source"]`` (written by
:func:`checkpoints_convert.convert.convert_checkpoint`): the original keys in file order, dtypes,
envelope (GraphCL ``config``/``graph_path``), the inert ``edge_dim=0`` tensors and the id order of
reordered embedding tables. With it the export reproduces the original file bit for bit (as long
as the params were not changed). A jaxfood encoder that was never converted is exported in the
original's default layout: a GraphCL dict ``{"encoder_state", "config", "graph_path"}`` with keys
``encoder.embeddings.<Type>.weight`` and ``encoder.layers.<i>.convs.<Src___rel___Dst>.<param>``
in the original's names (``Feature``, ``Contains``, ``Is_of_type``, ``rev_...``); relations
without edge attributes get the ``lin_edge.weight`` [H*C, 0] and ``att_edge`` (zeros) that
PyG's ``GATConv(edge_dim=0)`` has. Node types in jaxfood's other input modes get the input layers
of :func:`checkpoints_convert.reference.build_reference_encoder`: ``encoder.inputs.<Type>.weight``
/ ``.bias`` (``project_<Type>``, features/both), ``encoder.shared.<Type>`` (``shared_<Type>``),
``encoder.profile.<Type>`` (``profile_<Type>``); the file loads strictly into that module.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from checkpoints_convert.errors import ConvertError
from checkpoints_convert.load import UNINITIALIZED, numpy_to_tensor, require_torch
from checkpoints_convert.mapping import GAT_PARAMS, RelationName, export_node_name, export_relation_name

_PARAM_BY_PATH = {"/".join(v): k for k, v in GAT_PARAMS.items()}
#: Top-level names of jaxfood encoder params.
_TOP_LEVEL = ("embed_", "project_", "shared_", "profile_", "layer_")


def _get_path(tree: Mapping, path: str, source: str) -> np.ndarray:
    node: Any = tree
    for part in path.split("/"):
        if not isinstance(node, Mapping) or part not in node:
            raise ConvertError(f"{source}: encoder parameter '{path}' is missing (the checkpoint no longer has "
                               "the layout it was converted from)")
        node = node[part]
    return np.asarray(node)


def _leaf_paths(tree: Mapping, prefix: str = "") -> list[str]:
    out = []
    for k, v in tree.items():
        p = f"{prefix}/{k}" if prefix else k
        out.extend(_leaf_paths(v, p) if isinstance(v, Mapping) else [p])
    return out


def _from_jax(transform: str, x: np.ndarray) -> np.ndarray:
    if transform == "transpose":
        return x.T
    if transform == "unsqueeze0":
        return x[None]
    return x


def _restore_rows(table: np.ndarray, rows: Mapping[str, Any], source: str, node_type: str) -> np.ndarray:
    """Undoes the row reordering of a converted embedding table (see ``convert._reorder_rows``)."""
    graph_ids, ck_ids = rows["graph_ids"], rows["checkpoint_ids"]
    if table.shape[0] != len(graph_ids):
        raise ConvertError(f"{source}: embed_{node_type} has {table.shape[0]} rows, the converted layout "
                           f"{len(graph_ids)}")
    index = {x: i for i, x in enumerate(graph_ids)}
    dropped = dict(zip(rows["dropped"]["ids"], rows["dropped"]["values"]))
    out = np.empty((len(ck_ids), table.shape[1]), table.dtype)
    for k, x in enumerate(ck_ids):
        out[k] = table[index[x]] if x in index else np.asarray(dropped[x], table.dtype)
    return out


def state_dict_arrays(params: Mapping, encoder_config: Mapping[str, Any],
                      torch_source: Mapping[str, Any] | None, source: str = "checkpoint") -> tuple[dict, dict]:
    """``({key: numpy array or UNINITIALIZED}, {key: torch dtype})`` in the original layout."""
    from checkpoints_convert.reference import INPUT_MODES

    modes = encoder_config.get("input_modes", {}) or {}
    bad = {t: m for t, m in modes.items() if m not in INPUT_MODES}
    if bad:
        raise ConvertError(f"{source}: encoder_config input_modes {bad} have no PyTorch equivalent "
                           f"(known: {list(INPUT_MODES)})")
    if encoder_config.get("aggr", "sum") != "sum":
        raise ConvertError(f"{source}: encoder_config aggr = {encoder_config.get('aggr')!r}; the original uses 'sum'")
    unknown = [k for k in params if not k.startswith(_TOP_LEVEL)]
    if unknown:
        raise ConvertError(f"{source}: encoder parameters {unknown[:4]} have no PyTorch equivalent (expected "
                           "embed_/project_/shared_/profile_<Type> and layer_<i>)")
    arrays: dict[str, Any] = {}
    dtypes: dict[str, str] = {}
    if torch_source:
        used = set()
        rows = torch_source.get("rows", {}) or {}
        for entry in torch_source["keys"]:
            key, dtype = entry["key"], entry["dtype"]
            dtypes[key] = dtype
            if "inert" in entry:
                inert = entry["inert"]
                arrays[key] = UNINITIALIZED if inert == "uninitialized" else np.asarray(
                    inert["values"], dtype=np.float64).reshape(inert["shape"])
                continue
            x = _from_jax(entry["transform"], _get_path(params, entry["path"], source))
            used.add(entry["path"])
            node_type = entry["path"][len("embed_"):].split("/")[0] if entry["path"].startswith("embed_") else None
            if node_type in rows:
                x = _restore_rows(x, rows[node_type], source, node_type)
            arrays[key] = x
        extra = sorted(set(_leaf_paths(params)) - used)
        if extra:
            raise ConvertError(f"{source}: encoder parameters {extra[:4]} are not in the layout the checkpoint was "
                               "converted from; export it without that layout by removing meta 'torch_source'")
        return arrays, dtypes
    # default layout of the original project
    prefix = "encoder."
    # in the order of the reference module: embeddings, inputs, profile, shared, layers
    for name in params:
        if name.startswith("embed_"):
            t = name[len("embed_"):]
            key = f"{prefix}embeddings.{export_node_name(t)}.weight"
            arrays[key], dtypes[key] = np.asarray(_get_path(params, f"{name}/embedding", source)), "float32"
    for name in params:
        if name.startswith("project_"):
            t = export_node_name(name[len("project_"):])
            for param, path in (("weight", "kernel"), ("bias", "bias")):
                key = f"{prefix}inputs.{t}.{param}"
                x = np.asarray(_get_path(params, f"{name}/{path}", source))
                arrays[key], dtypes[key] = (x.T if param == "weight" else x), "float32"
    for kind in ("profile", "shared"):
        for name in params:
            if name.startswith(f"{kind}_"):
                key = f"{prefix}{kind}.{export_node_name(name[len(kind) + 1:])}"
                arrays[key], dtypes[key] = np.asarray(params[name]), "float32"
    heads = int(encoder_config["num_heads"])
    channels = int(encoder_config["hidden_dim"]) // heads
    for i in range(int(encoder_config["num_layers"])):
        layer = params.get(f"layer_{i}", {})
        for rel_key, p in layer.items():
            s, r, d = export_relation_name(rel_key)
            module_key = RelationName(s, r, d, style="new").module_key()
            base = f"{prefix}layers.{i}.convs.{module_key}."
            for path in ("lin_src/kernel", "lin_dst/kernel", "att_src", "att_dst", "lin_edge/kernel", "att_edge",
                         "bias", "res/kernel"):
                param = _PARAM_BY_PATH[path]
                if path == "res/kernel" and "res" not in p:
                    continue  # GATConv(residual=False): no root weight
                if path.split("/")[0] in p:
                    x = np.asarray(_get_path(p, path, source))
                    x = x.T if path.endswith("kernel") else x[None] if path.startswith("att_") else x
                elif param == "lin_edge.weight":
                    x = np.zeros((heads * channels, 0), np.float32)
                elif param == "att_edge":
                    x = np.zeros((1, heads, channels), np.float32)
                else:
                    raise ConvertError(f"{source}: layer_{i}/{rel_key}/{path} is missing")
                arrays[base + param], dtypes[base + param] = x, "float32"
    return arrays, dtypes


def default_envelope(encoder_config: Mapping[str, Any]) -> dict[str, Any]:
    return {"config": {"embedding_dim": int(encoder_config["embedding_dim"]),
                       "hidden_dim": int(encoder_config["hidden_dim"]),
                       "num_layers": int(encoder_config["num_layers"]),
                       "num_heads": int(encoder_config["num_heads"]),
                       "dropout": float(encoder_config.get("dropout", 0.0))},
            "graph_path": ""}


def export_object(params: Mapping, encoder_config: Mapping[str, Any], torch_source: Mapping[str, Any] | None,
                  source: str = "checkpoint") -> Any:
    """The Python object to ``torch.save``: the GraphCL dict or a bare/wrapped state dict."""
    import collections

    arrays, dtypes = state_dict_arrays(params, encoder_config, torch_source, source)
    module_prefix = (torch_source or {}).get("module_prefix", "")
    state = collections.OrderedDict()
    for key, x in arrays.items():
        state[key if key.startswith(module_prefix) else module_prefix + key] = numpy_to_tensor(x, dtypes[key])
    if not torch_source:
        return {"encoder_state": state, **default_envelope(encoder_config)}
    fmt = torch_source.get("format")
    if fmt == "state_dict":
        return state
    out = {torch_source["wrapper_key"]: state}
    out.update(torch_source.get("envelope", {}))
    return out


def write_torch(obj: Any, path: str | Path) -> Path:
    """``torch.save`` to ``path`` atomically."""
    torch = require_torch()
    from jaxfood.io_utils import atomic_path

    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
    return path


def compare_state_dicts(a: Mapping[str, Any], b: Mapping[str, Any]) -> list[str]:
    """Differences between two state dicts (keys, order, dtypes, values; bit-exact). Empty: equal."""
    torch = require_torch()
    from torch.nn.parameter import UninitializedParameter

    diffs = []
    if list(a) != list(b):
        only_a, only_b = sorted(set(a) - set(b)), sorted(set(b) - set(a))
        diffs.append(f"keys differ (only in first: {only_a[:3]}, only in second: {only_b[:3]})"
                     if only_a or only_b else "key order differs")
    for k in a:
        if k not in b:
            continue
        x, y = a[k], b[k]
        ux, uy = isinstance(x, UninitializedParameter), isinstance(y, UninitializedParameter)
        if ux or uy:
            if ux != uy:
                diffs.append(f"'{k}': uninitialized in one only")
            continue
        if x.dtype != y.dtype or tuple(x.shape) != tuple(y.shape) or not torch.equal(x, y):
            diffs.append(f"'{k}': {x.dtype}{list(x.shape)} vs {y.dtype}{list(y.shape)} differ")
    return diffs
