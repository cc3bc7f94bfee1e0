"""Compatibility mode: the intermediate JSON of the PyTorch project this design comes from.

Input (``intermediate_samples.json``)::

    {"samples": [{"id": 0, "food_name": "apple",
                  "features": [{"id": 123, "intensity": 456.7}, ...],
                  "nutrients": [{"id": 1003, "name": "Protein", "amount": 0.3, "unit": "g"}, ...]}],
     "metadata": {"features": {"unique_feature_ids": [...]},          # optional
                  "nutrients": {"unique_nutrient_units": ["g", ...],
                                "unique_nutrients": [{"id": 1003, "name": "Protein"}, ...]}}}

:func:`build_graph_from_upstream_json` builds exactly the graph that project builds (its
``build_hetero_graph``), in jaxfood's schema names (``Feature`` -> ``Molecule``, ``Contains`` ->
``contains_molecule`` / ``has_nutrient``, ``Is_of_type`` -> ``is_instance_of``):

* node order: molecules = ``metadata.features.unique_feature_ids`` as listed (sorted ids of all
  samples' features when absent); foods = sorted ``food_name`` (missing -> ``"unknown"``);
  nutrients = sorted ids of ``metadata.nutrients.unique_nutrients`` (else of all samples'
  nutrients); samples in file order;
* edge order: samples in file order, each sample's features as listed (ids not among the
  molecules skipped); ``has_nutrient`` keeps the first entry per (food, nutrient) in file order;
* intensities z-scored per feature with the sample standard deviation (ddof=1; zero std or one
  value -> 0), NO log transform; amounts z-scored per nutrient id (or per (nutrient id, unit)
  with ``per_unit=True``); then a one-hot of the unit in ``unique_nutrient_units`` order (an
  unlisted unit is all zeros). Statistics use Python floats summed in file order, as upstream,
  then cast to float32;
* ``is_instance_of`` edges for ALL samples (so every sample is split ``train``); reverse edges
  copy the attributes. No node input features (upstream uses learned embeddings only).

``food_nutrients`` [F, N] holds the normalised amounts (0 where a food has no value), and
``food_category`` is unknown (-1). :func:`upstream_mappings` / :func:`write_upstream_mappings`
produce the original ``hetero_graph_mappings.json``; :func:`read_upstream_mappings` reads one.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from jaxfood.errors import UserError
from jaxfood.graph import schema
from jaxfood.graph.hetero_graph import GraphMeta, HeteroGraph, make_edge_set, validate, with_reverse_edges
from jaxfood.io_utils import write_json

#: Upstream edge types (as PyG triples) -> jaxfood relation keys. Note that upstream calls both
#: Sample->Feature and Food->Nutrient "Contains", so relations map by the whole triple.
UPSTREAM_RELATIONS: dict[tuple[str, str, str], str] = {
    ("Sample", "Contains", "Feature"): schema.CONTAINS,
    ("Sample", "Is_of_type", "Food"): schema.IS_INSTANCE_OF,
    ("Food", "Contains", "Nutrient"): schema.HAS_NUTRIENT,
    ("Feature", "rev_Contains", "Sample"): schema.reverse_key(schema.CONTAINS),
    ("Food", "rev_Is_of_type", "Sample"): schema.reverse_key(schema.IS_INSTANCE_OF),
    ("Nutrient", "rev_Contains", "Food"): schema.reverse_key(schema.HAS_NUTRIENT),
}
UPSTREAM_NODE_TYPES: dict[str, str] = {"Sample": schema.SAMPLE, "Feature": schema.MOLECULE,
                                       "Food": schema.FOOD, "Nutrient": schema.NUTRIENT}
MAPPING_KEYS = ("feature_ids", "food_names", "nutrient_ids", "sample_ids")


def _int(value: Any, path: Path, where: str) -> int:
    try:
        if isinstance(value, bool):
            raise ValueError
        return int(value)
    except (TypeError, ValueError):
        raise UserError(f"{path}: {where} = {value!r} is not an integer id") from None


def _float(value: Any, path: Path, where: str) -> float:
    try:
        if isinstance(value, bool):
            raise ValueError
        out = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{path}: {where} = {value!r} is not a number") from None
    if not math.isfinite(out):
        raise UserError(f"{path}: {where} = {value!r} is not finite (expected a number)")
    return out


def _zscore_groups(values: list[float], groups: list) -> list[float]:
    """Upstream's ``_mean``/``_std`` per group: Python sums in order, ddof=1 (n=1 -> var 0)."""
    positions: dict[Any, list[int]] = {}
    for i, g in enumerate(groups):
        positions.setdefault(g, []).append(i)
    out = list(values)
    for pos in positions.values():
        vals = [values[i] for i in pos]
        mean = float(sum(vals) / len(vals))
        var = sum((v - mean) ** 2 for v in vals) / max(1, len(vals) - 1)
        std = float(math.sqrt(var))
        for i in pos:
            out[i] = (values[i] - mean) / std if std > 0 else 0.0
    return out


def load_upstream_json(path: str | Path) -> dict[str, Any]:
    """Parses the intermediate JSON and checks its top-level shape."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: upstream intermediate JSON not found")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text (expected the intermediate JSON)") from None
    if not isinstance(data, dict) or "samples" not in data:
        raise UserError(f"{path}: missing key 'samples' (expected the intermediate JSON of the PyTorch project)")
    if not isinstance(data["samples"], list) or not data["samples"]:
        raise UserError(f"{path}: key 'samples' must be a non-empty list")
    if not isinstance(data.get("metadata", {}), dict):
        raise UserError(f"{path}: key 'metadata' must be an object")
    return data


def build_graph_from_upstream_json(path: str | Path, per_unit: bool = False) -> HeteroGraph:
    """The graph the PyTorch project builds from its intermediate JSON (see the module docstring).

    Args:
      path: ``intermediate_samples.json``.
      per_unit: z-score amounts per (nutrient, unit) -- upstream's ``--zscore-nutrients-by
        nutrient_unit`` -- instead of per nutrient.

    Returns:
      A validated :class:`HeteroGraph`, every sample ``train`` with its label edge.
    """
    path = Path(path)
    data = load_upstream_json(path)
    samples: list[dict[str, Any]] = data["samples"]
    metadata: dict[str, Any] = data.get("metadata", {}) or {}
    for i, s in enumerate(samples):
        if not isinstance(s, dict):
            raise UserError(f"{path}: samples[{i}] must be an object")
        for key in ("features", "nutrients"):
            if not isinstance(s.get(key, []), list):
                raise UserError(f"{path}: samples[{i}].{key} must be a list")

    # ---- node index maps ------------------------------------------------------------------------
    sample_ids: list[int] = []
    seen_sample: dict[int, int] = {}
    for i, s in enumerate(samples):
        if "id" not in s:
            raise UserError(f"{path}: samples[{i}] has no key 'id'")
        sid = _int(s["id"], path, f"samples[{i}].id")
        if sid in seen_sample:
            raise UserError(f"{path}: samples[{i}].id = {sid} repeats samples[{seen_sample[sid]}].id (expected unique ids)")
        seen_sample[sid] = i
        sample_ids.append(sid)

    features_md = metadata.get("features", {}) if isinstance(metadata.get("features", {}), dict) else {}
    listed = features_md.get("unique_feature_ids", [])
    if isinstance(listed, list) and listed:
        feature_ids = [_int(x, path, f"metadata.features.unique_feature_ids[{k}]") for k, x in enumerate(listed)]
        if len(set(feature_ids)) != len(feature_ids):
            raise UserError(f"{path}: metadata.features.unique_feature_ids has duplicate ids")
    else:
        feature_ids = sorted({_int(f.get("id"), path, f"samples[{i}].features[{k}].id")
                              for i, s in enumerate(samples) for k, f in enumerate(s.get("features", []))})
    feature_index = {fid: i for i, fid in enumerate(feature_ids)}

    food_names = sorted({str(s.get("food_name", "unknown")) for s in samples})
    food_index = {name: i for i, name in enumerate(food_names)}

    nutrients_md = metadata.get("nutrients", {}) if isinstance(metadata.get("nutrients", {}), dict) else {}
    nutrient_names_md: dict[int, str] = {}
    md_unique = nutrients_md.get("unique_nutrients", [])
    nutrient_ids: list[int] | None = None
    if isinstance(md_unique, list) and md_unique:
        try:  # upstream falls back to the samples' ids when this list is malformed
            nutrient_ids = sorted(int(item["id"]) for item in md_unique)
            nutrient_names_md = {int(item["id"]): str(item.get("name", "")) for item in md_unique}
        except (KeyError, TypeError, ValueError):
            nutrient_ids = None
    if nutrient_ids is None:
        nutrient_ids = sorted({_int(n.get("id"), path, f"samples[{i}].nutrients[{k}].id")
                               for i, s in enumerate(samples) for k, n in enumerate(s.get("nutrients", []))})
    nutrient_index = {nid: i for i, nid in enumerate(nutrient_ids)}

    unit_values = nutrients_md.get("unique_nutrient_units", [])
    unit_values = [str(u) for u in unit_values] if isinstance(unit_values, list) else []
    unit_index = {u: i for i, u in enumerate(unit_values)}

    # ---- edges ----------------------------------------------------------------------------------
    sf_src: list[int] = []
    sf_dst: list[int] = []
    sf_vals: list[float] = []
    sf_fid: list[int] = []
    for s_idx, s in enumerate(samples):
        for k, feat in enumerate(s.get("features", [])):
            if not isinstance(feat, dict) or "id" not in feat:
                raise UserError(f"{path}: samples[{s_idx}].features[{k}] must be an object with key 'id'")
            fid = _int(feat["id"], path, f"samples[{s_idx}].features[{k}].id")
            if fid not in feature_index:
                continue
            sf_src.append(s_idx)
            sf_dst.append(feature_index[fid])
            sf_vals.append(_float(feat.get("intensity", 0.0), path, f"samples[{s_idx}].features[{k}].intensity"))
            sf_fid.append(fid)

    fn_src: list[int] = []
    fn_dst: list[int] = []
    fn_amounts: list[float] = []
    fn_units: list[str] = []
    first_name: dict[int, str] = {}
    first_unit: dict[int, str] = {}
    seen_pair: set[tuple[str, int]] = set()
    for s_idx, s in enumerate(samples):
        food_name = str(s.get("food_name", "unknown"))
        for k, n in enumerate(s.get("nutrients", [])):
            if not isinstance(n, dict) or "id" not in n:
                raise UserError(f"{path}: samples[{s_idx}].nutrients[{k}] must be an object with key 'id'")
            nid = _int(n["id"], path, f"samples[{s_idx}].nutrients[{k}].id")
            key = (food_name, nid)
            if key in seen_pair:
                continue
            seen_pair.add(key)
            if nid not in nutrient_index:
                continue
            fn_src.append(food_index[food_name])
            fn_dst.append(nutrient_index[nid])
            fn_amounts.append(_float(n.get("amount", 0.0), path, f"samples[{s_idx}].nutrients[{k}].amount"))
            unit = str(n.get("unit", ""))
            fn_units.append(unit)
            first_name.setdefault(nid, str(n.get("name", "")))
            first_unit.setdefault(nid, unit)

    if not sf_src:
        raise UserError(f"{path}: no sample has a feature listed among the molecules (relation 'Sample|Contains|Feature' would be empty)")
    if not fn_src:
        raise UserError(f"{path}: no sample has nutrients (relation 'Food|Contains|Nutrient' would be empty)")

    sf_norm = _zscore_groups(sf_vals, sf_fid)
    groups = [(nutrient_ids[d], u) if per_unit else (nutrient_ids[d],) for d, u in zip(fn_dst, fn_units)]
    fn_norm = _zscore_groups(fn_amounts, groups)
    onehot = np.zeros((len(fn_units), len(unit_values)), np.float32)
    for i, u in enumerate(fn_units):
        if u in unit_index:
            onehot[i, unit_index[u]] = 1.0

    S, M, F, N = len(samples), len(feature_ids), len(food_names), len(nutrient_ids)
    sample_food = np.asarray([food_index[str(s.get("food_name", "unknown"))] for s in samples], np.int32)
    amount_col = np.asarray(fn_norm, np.float32)[:, None]
    edges = with_reverse_edges({
        schema.CONTAINS: make_edge_set(sf_src, sf_dst, np.asarray(sf_norm, np.float32)[:, None]),
        schema.IS_INSTANCE_OF: make_edge_set(np.arange(S), sample_food),
        schema.HAS_NUTRIENT: make_edge_set(fn_src, fn_dst, np.concatenate([amount_col, onehot], 1)),
    })
    food_nutrients = np.zeros((F, N), np.float32)
    food_nutrients[np.asarray(fn_src), np.asarray(fn_dst)] = amount_col[:, 0]

    def nutrient_label(nid: int) -> str:
        name = first_name.get(nid) or nutrient_names_md.get(nid) or str(nid)
        unit = first_unit.get(nid, "")
        return f"{name} ({unit})" if unit else name

    attribute_names = {schema.CONTAINS: ["intensity"], schema.IS_INSTANCE_OF: [],
                       schema.HAS_NUTRIENT: ["quantity"] + [f"unit={u}" for u in unit_values]}
    for key in list(attribute_names):
        attribute_names[schema.reverse_key(key)] = attribute_names[key]
    meta = GraphMeta(
        num_nodes={schema.SAMPLE: S, schema.MOLECULE: M, schema.FOOD: F, schema.NUTRIENT: N},
        node_ids={schema.SAMPLE: [str(x) for x in sample_ids], schema.MOLECULE: [str(x) for x in feature_ids],
                  schema.FOOD: food_names, schema.NUTRIENT: [str(x) for x in nutrient_ids]},
        food_categories=[],
        nutrient_names=[nutrient_label(nid) for nid in nutrient_ids],
        nutrient_units=unit_values,
        attribute_names=attribute_names,
        feature_names={},
        normalisation={
            "contains_molecule": {"transform": "none", "zscore": "per feature id", "ddof": 1},
            "has_nutrient": {"zscore": "per nutrient id and unit" if per_unit else "per nutrient id", "ddof": 1},
        },
        extra={"mode": "upstream", "sources": {"upstream_json": str(path)},
               "zscore_nutrients_by": "nutrient_unit" if per_unit else "nutrient", "zscore_features": True},
    )
    graph = HeteroGraph(
        node_features={},
        edges=edges,
        sample_food=sample_food,
        sample_split=np.zeros(S, np.int32),
        food_nutrients=food_nutrients,
        food_category=np.full(F, -1, np.int32),
        meta=meta,
    )
    return validate(graph, source=str(path))


# ---- hetero_graph_mappings.json -----------------------------------------------------------------
def _as_upstream_id(x: str) -> int | str:
    try:
        return int(x)
    except ValueError:
        return x


def upstream_mappings(graph: HeteroGraph) -> dict[str, Any]:
    """The content of the original ``hetero_graph_mappings.json`` for ``graph`` (index order).

    Numeric ids are written as integers, as upstream does; ``*_to_index`` maps are included.
    """
    ids = graph.meta.node_ids
    feature_ids = [_as_upstream_id(x) for x in ids.get(schema.MOLECULE, [])]
    nutrient_ids = [_as_upstream_id(x) for x in ids.get(schema.NUTRIENT, [])]
    sample_ids = [_as_upstream_id(x) for x in ids.get(schema.SAMPLE, [])]
    food_names = list(ids.get(schema.FOOD, []))
    units = list(graph.meta.nutrient_units)
    return {
        "food_names": food_names,
        "food_name_to_index": {n: i for i, n in enumerate(food_names)},
        "feature_ids": feature_ids,
        "feature_id_to_index": {str(x): i for i, x in enumerate(feature_ids)},
        "nutrient_ids": nutrient_ids,
        "nutrient_id_to_index": {str(x): i for i, x in enumerate(nutrient_ids)},
        "unit_values": units,
        "unit_name_to_index": {u: i for i, u in enumerate(units)},
        "sample_ids": sample_ids,
        "sample_id_to_index": {str(x): i for i, x in enumerate(sample_ids)},
        "zscore_nutrients_by": graph.meta.extra.get("zscore_nutrients_by", "nutrient"),
        "zscore_features": bool(graph.meta.extra.get("zscore_features", True)),
    }


def write_upstream_mappings(graph: HeteroGraph, path: str | Path) -> Path:
    """Writes ``hetero_graph_mappings.json`` (atomically)."""
    path = Path(path)
    write_json(path, upstream_mappings(graph))
    return path


def read_upstream_mappings(path: str | Path) -> dict[str, list[str]]:
    """Reads ``hetero_graph_mappings.json``: ``{feature_ids, food_names, nutrient_ids, sample_ids}``
    as lists of strings in index order (plus ``unit_values`` when present).

    Lists are checked to be unique; ``*_to_index`` maps, where present, must agree with them.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: mappings file not found (expected hetero_graph_mappings.json)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise UserError(f"{path}: not valid JSON ({err.msg} at line {err.lineno})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object with keys {list(MAPPING_KEYS)}")
    out: dict[str, list[str]] = {}
    inverse = {"feature_ids": "feature_id_to_index", "food_names": "food_name_to_index",
               "nutrient_ids": "nutrient_id_to_index", "sample_ids": "sample_id_to_index",
               "unit_values": "unit_name_to_index"}
    for key in (*MAPPING_KEYS, "unit_values"):
        if key not in data:
            if key == "unit_values":
                continue
            raise UserError(f"{path}: missing key '{key}' (expected a list in index order)")
        values = data[key]
        if not isinstance(values, list):
            raise UserError(f"{path}: key '{key}' must be a list")
        strs = [str(v) for v in values]
        if len(set(strs)) != len(strs):
            raise UserError(f"{path}: key '{key}' has duplicate entries (expected unique ids)")
        inv = data.get(inverse[key])
        if isinstance(inv, dict):
            for name, idx in inv.items():
                if not isinstance(idx, int) or not 0 <= idx < len(strs) or strs[idx] != str(name):
                    raise UserError(f"{path}: '{inverse[key]}' maps '{name}' to {idx!r}, which disagrees with '{key}'")
        out[key] = strs
    return out
