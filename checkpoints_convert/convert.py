"""PyTorch Geometric ``HeteroGATEncoder`` state dict -> jaxfood ``HeteroGATEncoder`` params.

The architecture (embedding width ``d``, heads ``H``, channels ``C``, layers ``L``, relations,
edge-attribute widths, embedding rows) is inferred from the tensors -- each quantity by the shape
most tensors agree on, so that a single odd tensor is reported as *that* tensor's problem -- and
checked against the checkpoint's ``config`` and, when given, against a jaxfood graph. Then every
tensor is mapped (PyG ``Linear.weight`` [out, in] -> Flax ``kernel`` [in, out]; ``att_*``
[1, H, C] -> [H, C]; embeddings and biases as they are).

Input layers of jaxfood's other input modes (the keys of
:func:`checkpoints_convert.reference.build_reference_encoder`: ``inputs.<T>.weight|bias``,
``shared.<T>``, ``profile.<T>``) set the node type's input mode: ``inputs`` alone ``features``,
with an embedding ``both``; ``shared`` and ``profile`` (Sample only) as named.

Tensors of relations without edge attributes (``edge_dim=0`` in the original: PyG keeps a lazy,
possibly uninitialised ``lin_edge`` and an ``att_edge`` it never uses) are *inert*: they do not
enter the jaxfood params, but are kept in the checkpoint's meta so ``--to-torch`` can write the
file back bit for bit.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Mapping
from typing import Any

import numpy as np

from checkpoints_convert.errors import ConvertError
from checkpoints_convert.load import UNINITIALIZED, TorchCheckpoint
from checkpoints_convert.mapping import (
    EDGE_GAT_PARAMS,
    GAT_PARAMS,
    INPUT_PARAMS,
    REQUIRED_GAT_PARAMS,
    RESIDUAL_GAT_PARAMS,
    NameMap,
    ParsedKey,
    parse_key,
    strip_module_prefix,
)
from jaxfood.graph import schema

#: ``config`` keys of the original GraphCL checkpoint checked against the tensors.
CONFIG_KEYS = ("embedding_dim", "hidden_dim", "num_heads", "num_layers")


@dataclasses.dataclass
class Problem:
    """One reason the checkpoint does not convert cleanly."""

    kind: str  # "missing" | "unexpected" | "shape" | "config" | "duplicate"
    key: str
    expected: str | None = None
    found: str | None = None
    why: str | None = None

    def text(self) -> str:
        if self.kind == "missing":
            return f"missing '{self.key}' (expected shape {self.expected})"
        if self.kind == "shape":
            return f"'{self.key}' has shape {self.found}, expected {self.expected}" + (f" ({self.why})" if self.why else "")
        if self.kind == "config":
            return f"{self.key} = {self.found} but the tensors say {self.expected}" + (f" ({self.why})" if self.why else "")
        what = f" {self.found}" if self.found else ""
        return f"{self.kind} '{self.key}'{what}" + (f": {self.why}" if self.why else "")

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclasses.dataclass
class Architecture:
    """What the tensors say the encoder is."""

    embedding_dim: int
    num_heads: int
    head_channels: int
    num_layers: int
    num_nodes: dict[str, int]
    relations: list[str]
    edge_dims: dict[str, int]
    input_modes: dict[str, str] = dataclasses.field(default_factory=dict)
    feature_dims: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def hidden_dim(self) -> int:
        return self.num_heads * self.head_channels

    def to_json(self) -> dict[str, Any]:
        return {"embedding_dim": self.embedding_dim, "hidden_dim": self.hidden_dim, "num_heads": self.num_heads,
                "head_channels": self.head_channels, "num_layers": self.num_layers, "num_nodes": self.num_nodes,
                "relations": self.relations, "edge_dims": self.edge_dims, "input_modes": self.input_modes,
                "feature_dims": self.feature_dims}


@dataclasses.dataclass
class Conversion:
    """Result of :func:`convert_checkpoint`.

    Attributes:
      params: jaxfood encoder params (numpy float32 arrays), see :mod:`jaxfood.models.encoder`.
      encoder_config: ``config_to_dict(EncoderConfig)``.
      architecture: inferred :class:`Architecture`.
      report: the ``conversion_report.json`` content.
      torch_source: what :func:`checkpoints_convert.export.export_state_dict` needs to write the
        original file back exactly (stored in the orbax meta).
      located: original key -> where it sits in the encoder, for the mapped and inert tensors:
        ``{"kind": "embedding", "node_type": T}``, ``{"kind": "input"|"shared"|"profile",
        "node_type": T, "param": "weight"|"bias"|None}`` or ``{"kind": "conv", "layer": i, "relation":
        "Src|rel|Dst", "param": "lin_src.weight"}`` (canonical names).
    """

    params: dict[str, Any]
    encoder_config: dict[str, Any]
    architecture: Architecture
    report: dict[str, Any]
    torch_source: dict[str, Any]
    located: dict[str, dict[str, Any]]


def _shape(x: Any) -> str:
    if x is UNINITIALIZED:
        return "uninitialized"
    return str(list(np.shape(x)))


def _mode(values: list) -> Any:
    counts = collections.Counter(values)
    return max(counts, key=lambda v: (counts[v], -values.index(v))) if counts else None


def _param_path(layer: int, relation: str, param: str) -> str:
    return "/".join((f"layer_{layer}", relation, *GAT_PARAMS[param]))


def _to_jax(param: str, x: np.ndarray) -> np.ndarray:
    if param.endswith(".weight"):
        x = x.T
    elif param.startswith("att_"):
        x = x[0]
    return np.ascontiguousarray(x, dtype=np.float32)


def _transform(param: str) -> str:
    return "transpose" if param.endswith(".weight") else "unsqueeze0" if param.startswith("att_") else "none"


def _set_path(tree: dict, path: str, value: Any) -> None:
    parts = path.split("/")
    node = tree
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value


def _norm_id(x: Any) -> str:
    s = str(x).strip()
    try:
        f = float(s)
        if f.is_integer() and s.lstrip("+-").replace(".", "", 1).isdigit():
            return str(int(f))
    except ValueError:
        pass
    return s


#: hetero_graph_mappings.json field -> jaxfood node type.
MAPPING_FIELDS = {"sample_ids": schema.SAMPLE, "feature_ids": schema.MOLECULE, "food_names": schema.FOOD,
                  "nutrient_ids": schema.NUTRIENT}


def convert_checkpoint(ckpt: TorchCheckpoint, *, renames: Mapping[str, str] | None = None,
                       allow_partial: bool = False, graph=None, mappings: Mapping[str, list] | None = None,
                       mappings_source: str | None = None, seed: int = 0) -> Conversion:
    """Maps the encoder tensors of ``ckpt`` onto jaxfood params.

    Args:
      ckpt: a loaded checkpoint (:func:`checkpoints_convert.load.load_checkpoint`).
      renames: ``--rename`` pairs (see :class:`checkpoints_convert.mapping.NameMap`).
      allow_partial: convert what maps and report the rest instead of failing.
      graph: optional jaxfood ``HeteroGraph`` the encoder must fit (relations, edge widths, node
        counts); with ``allow_partial`` its fresh initialisation fills what is missing.
      mappings: optional original ``hetero_graph_mappings.json`` lists (``sample_ids``,
        ``feature_ids``, ``food_names``, ``nutrient_ids``, index order); with ``graph``, the
        embedding rows are reordered to the graph's node order.
      seed: seed of that fresh initialisation (and of new embedding rows).

    Raises:
      ConvertError: listing every missing, unexpected or wrongly shaped tensor with both shapes
        (unless ``allow_partial``), or when nothing usable is left.
    """
    src = str(ckpt.path)
    if mappings is not None and graph is None:
        raise ConvertError("--mappings needs --graph (the jaxfood graph whose node order the rows are put in)")
    names = NameMap(dict(renames or {}))
    module_prefix, stripped = strip_module_prefix(ckpt.state)
    parsed_all = {orig: parse_key(s, orig) for s, orig in stripped.items()}
    prefixes = [p.prefix for p in parsed_all.values() if p is not None]
    if not prefixes:
        examples = ", ".join(f"'{k}'" for k in list(ckpt.state)[:3])
        raise ConvertError(
            f"{src}: no encoder tensors found (expected keys like 'encoder.embeddings.<NodeType>.weight' and "
            f"'encoder.layers.<i>.convs.<Src___rel___Dst>.lin_src.weight'; found {examples})")
    counts = collections.Counter(prefixes)
    enc_prefix = max(counts, key=lambda p: (counts[p], -len(p)))

    problems: list[Problem] = []
    skipped: dict[str, str] = {}
    emb: dict[str, tuple[str, Any]] = {}
    inp: dict[tuple[str, str, str | None], tuple[str, Any]] = {}  # (type, kind, param) -> (key, value)
    conv: dict[tuple[int, str, str], tuple[str, Any]] = {}
    parsed: dict[str, ParsedKey] = {}
    located: dict[str, dict[str, Any]] = {}
    original_names: dict[str, str] = {}  # canonical type/relation -> as in the file
    for s, orig in stripped.items():
        p = parsed_all[orig]
        value = ckpt.state[orig]
        if p is None or p.prefix != enc_prefix:
            if enc_prefix and not s.startswith(enc_prefix):
                skipped[orig] = "not part of the encoder (e.g. a decoder head); not converted"
            elif p is not None:
                skipped[orig] = f"encoder-like tensor outside '{enc_prefix}'; not converted"
            else:
                problems.append(Problem("unexpected", orig, found=_shape(value),
                                        why="not a HeteroGATEncoder tensor (embeddings.<Type>.weight, "
                                            "inputs.<Type>.weight|bias, shared.<Type>, profile.<Type> or "
                                            "layers.<i>.convs.<Src___rel___Dst>.<param>)"))
            continue
        if p.kind in ("embedding", "input", "shared", "profile"):  # a tensor of one node type
            t = names.node_type(p.node_type)
            if t not in schema.NODE_TYPES:
                problems.append(Problem("unexpected", orig, found=_shape(value),
                                        why=f"node type '{p.node_type}' is not a jaxfood node type; map it with "
                                            f"--rename {p.node_type}=<one of {', '.join(schema.NODE_TYPES)}>"))
                continue
        if p.kind == "embedding":
            if t in emb:
                problems.append(Problem("duplicate", orig, why=f"'{emb[t][0]}' also maps to node type '{t}'"))
                continue
            emb[t] = (orig, value)
            original_names[t] = p.node_type
            located[orig] = {"kind": "embedding", "node_type": t}
        elif p.kind in ("input", "shared", "profile"):
            loc = (t, p.kind, p.param)
            if loc in inp:
                problems.append(Problem("duplicate", orig, why=f"'{inp[loc][0]}' also maps to node type '{t}'"))
                continue
            inp[loc] = (orig, value)
            original_names.setdefault(t, p.node_type)
            located[orig] = {"kind": p.kind, "node_type": t, "param": p.param}
        else:
            rel = p.relation
            key = names.relation(rel.src, rel.rel, rel.dst)
            if key is None:
                problems.append(Problem("unexpected", orig, found=_shape(value),
                                        why=f"relation '{rel.triple}' has no jaxfood equivalent; map it with "
                                            f"--rename '{rel.triple}=Src|rel|Dst'"))
                continue
            loc = (p.layer, key, p.param)
            if loc in conv:
                problems.append(Problem("duplicate", orig, why=f"'{conv[loc][0]}' also maps to {key} layer {p.layer}"))
                continue
            conv[loc] = (orig, value)
            original_names.setdefault(key, rel.triple)
            located[orig] = {"kind": "conv", "layer": p.layer, "relation": key, "param": p.param}
        parsed[orig] = p

    arch = _infer_architecture(emb, conv, graph, mappings, src, problems, inp)
    H, C, d, L = arch.num_heads, arch.head_channels, arch.embedding_dim, arch.num_layers
    if "profile" in arch.input_modes.values() and mappings is not None and "feature_ids" in mappings:
        key = next(o for (_, kind, _), (o, _) in inp.items() if kind == "profile")
        raise ConvertError(f"{src}: '{key}' has one row per molecule; reordering its rows by --mappings "
                           "'feature_ids' is not supported (convert without --mappings)")
    HC = H * C
    _check_config(ckpt.config, arch, problems)

    # ---- expected tensors vs present ones ---------------------------------------------------
    ok_emb: dict[str, np.ndarray] = {}
    ok_conv: dict[tuple[int, str, str], np.ndarray] = {}
    inert: dict[str, str] = {}
    types_needed = {t for k in arch.relations for t in (schema.split_key(k)[0], schema.split_key(k)[2])}
    ok_inp: dict[tuple[str, str, str | None], np.ndarray] = {}
    for t in sorted(types_needed | set(emb) | {t for t, _, _ in inp}, key=_type_rank):
        rows = arch.num_nodes.get(t)
        expected = f"[{rows}, {d}]"
        mode = arch.input_modes.get(t, "embedding")
        for (it, kind, param), (orig, value) in inp.items():
            if it != t:
                continue
            if kind == "input":
                f = arch.feature_dims.get(t)
                want = (d, f) if param == "weight" else (d,)
                why = "--graph node_features width" if graph is not None and param == "weight" else None
            elif kind == "shared":
                want, why = (1, d), None
            else:
                want = (arch.num_nodes.get(schema.MOLECULE), d)
                why = f"one row per '{schema.MOLECULE}' node"
            if mode == "invalid":
                continue
            if value is UNINITIALIZED or tuple(np.shape(value)) != want:
                problems.append(Problem("shape", orig, expected=str(list(want)).replace("None", "?"),
                                        found=_shape(value), why=why))
                continue
            ok_inp[(it, kind, param)] = value
        if mode == "invalid":
            keys = ([emb[t][0]] if t in emb else []) + [o for (it, _, _), (o, _) in inp.items() if it == t]
            problems.append(Problem("unexpected", keys[-1], why=f"node type '{t}' has the input tensors {keys}, "
                                    "which no jaxfood input mode combines (embedding; inputs (features); "
                                    f"embedding + inputs (both); shared; profile, '{schema.SAMPLE}' only)"))
            continue
        if mode in ("features", "both"):
            for param in ("weight", "bias"):
                if (t, "input", param) not in inp:
                    problems.append(Problem("missing", f"{enc_prefix}inputs.{_orig_type(t, names)}.{param}",
                                            expected=str([d, arch.feature_dims.get(t, "?")] if param == "weight"
                                                         else [d])))
        if mode not in ("embedding", "both"):
            continue
        if t not in emb:
            problems.append(Problem("missing", f"{enc_prefix}embeddings.{_orig_type(t, names)}.weight", expected=expected))
            continue
        orig, value = emb[t]
        if value is UNINITIALIZED or np.ndim(value) != 2 or tuple(np.shape(value)) != (rows, d):
            why = None
            field = next((f for f, ft in MAPPING_FIELDS.items() if ft == t), None)
            if graph is not None and mappings is None and np.ndim(value) == 2 and np.shape(value)[1] == d:
                why = f"the graph has {rows} '{t}' nodes; pass --mappings to reorder rows by id"
            elif mappings is not None and field in mappings:
                why = f"{mappings_source or 'mappings'} '{field}' lists {rows} ids"
            problems.append(Problem("shape", orig, expected=expected, found=_shape(value), why=why))
            continue
        ok_emb[t] = value
    present_layers = {layer for layer, _, _ in conv}
    conv_keys = [p for p in parsed.values() if p.kind == "conv"]
    style = _mode([p.relation.style for p in conv_keys]) or "new"
    list_name = _mode([p.list_name for p in conv_keys]) or "layers"
    # GATConv(residual=True) checkpoints: then every relation of every layer needs its root weight.
    residual = any(param in RESIDUAL_GAT_PARAMS for _, _, param in conv)
    required = REQUIRED_GAT_PARAMS + (RESIDUAL_GAT_PARAMS if residual else ())
    for layer in sorted(present_layers | set(range(L))):
        d_in = d if layer == 0 else HC
        for key in arch.relations:
            w = arch.edge_dims.get(key, 0)
            expected_shapes = {"lin_src.weight": (HC, d_in), "lin_dst.weight": (HC, d_in), "att_src": (1, H, C),
                               "att_dst": (1, H, C), "bias": (HC,)}
            if w > 0:
                expected_shapes.update({"lin_edge.weight": (HC, w), "att_edge": (1, H, C)})
            if residual:
                expected_shapes["res.weight"] = (HC, d_in)
            for param in GAT_PARAMS:
                loc = (layer, key, param)
                present = loc in conv
                orig = conv[loc][0] if present else _orig_conv_key(enc_prefix, list_name, style, layer, key, param,
                                                                   original_names)
                if param in expected_shapes and layer < L:
                    want = expected_shapes[param]
                    if not present:
                        problems.append(Problem("missing", orig, expected=str(list(want))))
                        continue
                    value = conv[loc][1]
                    if value is UNINITIALIZED or tuple(np.shape(value)) != want:
                        problems.append(Problem("shape", orig, expected=str(list(want)), found=_shape(value)))
                        continue
                    ok_conv[loc] = value
                elif present:
                    value = conv[loc][1]
                    if param in EDGE_GAT_PARAMS and layer < L and w == 0 and (
                            value is UNINITIALIZED or tuple(np.shape(value)) in ((HC, 0), (1, H, C))):
                        inert[orig] = "edge_dim=0 in the original: unused without edge attributes (kept for --to-torch)"
                    elif param in EDGE_GAT_PARAMS and layer < L and w == 0:
                        problems.append(Problem("shape", orig, expected=f"[{HC}, 0] or uninitialized",
                                                found=_shape(value),
                                                why=f"relation '{key}' has no edge attributes"
                                                    + (" in the graph" if graph is not None else "")))
                    else:
                        problems.append(Problem("unexpected", orig, found=_shape(value),
                                                why=f"the encoder has no {key} layer {layer} parameter '{param}'"))
    # relations in the file but not in the graph
    for (_, key, _), (orig, value) in conv.items():
        if key not in arch.relations:
            problems.append(Problem("unexpected", orig, found=_shape(value),
                                    why=f"relation '{key}' is not in the graph"))

    if problems and not allow_partial:
        listing = "; ".join(p.text() for p in problems[:20])
        more = f"; and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise ConvertError(f"{src}: {len(problems)} problem(s): {listing}{more} "
                           "(--allow-partial converts what maps and reports the rest)")
    for p in problems:
        if p.kind in ("missing", "shape", "unexpected", "duplicate") and p.key in ckpt.state and p.key not in skipped:
            skipped[p.key] = p.text()

    # ---- params -------------------------------------------------------------------------------
    complete = [k for k in arch.relations
                if all((layer, k, prm) in ok_conv for layer in range(L) for prm in required)
                and all((layer, k, prm) in ok_conv for layer in range(L) for prm in EDGE_GAT_PARAMS
                        if arch.edge_dims.get(k, 0) > 0)]
    params: dict[str, Any] = {}
    mapped: dict[str, str] = {}
    source_keys: list[dict[str, Any]] = []
    transforms: dict[str, str] = {}
    for t, value in ok_emb.items():
        params[f"embed_{t}"] = {"embedding": np.ascontiguousarray(value, dtype=np.float32)}
        mapped[emb[t][0]] = f"embed_{t}/embedding"
    for (t, kind, param), value in ok_inp.items():
        path, transform = INPUT_PARAMS[(kind, param)]
        path = path.format(t)
        x = np.asarray(value).T if transform == "transpose" else np.asarray(value)
        _set_path(params, path, np.ascontiguousarray(x, dtype=np.float32))
        mapped[inp[(t, kind, param)][0]] = path
        transforms[inp[(t, kind, param)][0]] = transform
    for (layer, key, param), value in ok_conv.items():
        if key not in complete and graph is None:
            skipped.setdefault(conv[(layer, key, param)][0],
                               f"relation '{key}' is incomplete; dropped from the converted encoder")
            continue
        path = _param_path(layer, key, param)
        _set_path(params, path, _to_jax(param, value))
        mapped[conv[(layer, key, param)][0]] = path
    relations_out = list(arch.relations) if graph is not None else complete
    if not relations_out:
        raise ConvertError(f"{src}: no relation converted completely; nothing usable to write")

    # ---- row reordering -----------------------------------------------------------------------
    rows_meta, reordered = {}, {}
    if mappings is not None:
        rows_meta, reordered = _reorder_rows(params, graph, mappings, mappings_source or "mappings",
                                             ckpt, emb, seed)

    # ---- encoder config, fill-ins ---------------------------------------------------------------
    from jaxfood.config import config_to_dict
    from jaxfood.models.encoder import EncoderConfig

    node_types = sorted({t for k in relations_out for t in (schema.split_key(k)[0], schema.split_key(k)[2])},
                        key=_type_rank)

    cfg_json = ckpt.config or {}
    dropout = cfg_json.get("dropout", EncoderConfig.dropout)
    encoder_config = EncoderConfig(hidden_dim=HC, num_heads=H, num_layers=L, embedding_dim=d,
                                   dropout=float(dropout) if isinstance(dropout, (int, float)) else EncoderConfig.dropout,
                                   aggr="sum", input_modes={t: _config_mode(arch.input_modes.get(t))
                                                            for t in node_types},
                                   compute_dtype="float32", residual=residual)
    initialised: list[str] = []
    if graph is not None:
        initialised = _fill_from_fresh_init(params, graph, encoder_config, seed)
        if initialised and not allow_partial:  # pragma: no cover - strict checks leave nothing to fill
            raise ConvertError(f"{src}: parameters missing after conversion: {initialised[:5]}")

    for orig in ckpt.state:
        if orig in mapped:
            p = parsed[orig]
            source_keys.append({"key": orig, "dtype": ckpt.dtypes[orig], "path": mapped[orig],
                                "transform": _transform(p.param) if p.kind == "conv" else
                                transforms.get(orig, "none")})
        elif orig in inert:
            value = ckpt.state[orig]
            entry: dict[str, Any] = {"key": orig, "dtype": ckpt.dtypes[orig]}
            if value is UNINITIALIZED:
                entry["inert"] = "uninitialized"
            else:
                entry["inert"] = {"shape": list(np.shape(value)), "values": np.asarray(value).reshape(-1).tolist()}
            source_keys.append(entry)
    torch_source = {
        "format": ckpt.format, "wrapper_key": ckpt.wrapper_key, "envelope": ckpt.envelope,
        "module_prefix": module_prefix, "encoder_prefix": enc_prefix, "keys": source_keys, "rows": rows_meta,
    }
    lossy = sorted(k for k in mapped if ckpt.dtypes[k] not in ("float32",))
    report = {
        "source": src,
        "format": ckpt.format,
        "wrapper_key": ckpt.wrapper_key,
        "module_prefix": module_prefix,
        "encoder_prefix": enc_prefix,
        "key_style": sorted({p.relation.style for p in parsed.values() if p.relation is not None}),
        "strict": not allow_partial,
        "architecture": arch.to_json(),
        "checkpoint_config": ckpt.config,
        "encoder_config": config_to_dict(encoder_config),
        "renamed": {**{original_names[t]: t for t in ok_emb if original_names.get(t, t) != t},
                    **{original_names[k]: k for k in relations_out if original_names.get(k, k) != k}},
        "mapped": mapped,
        "inert": inert,
        "skipped": skipped,
        "problems": [p.to_json() for p in problems],
        "reordered": reordered,
        "initialised": initialised,
        "cast_to_float32": lossy,
        "counts": {"tensors": len(ckpt.state), "mapped": len(mapped), "inert": len(inert), "skipped": len(skipped)},
    }
    return Conversion(params=params, encoder_config=config_to_dict(encoder_config), architecture=arch,
                      report=report, torch_source=torch_source,
                      located={k: v for k, v in located.items() if k in mapped or k in inert})


def _type_rank(t: str) -> tuple[int, str]:
    return (schema.NODE_TYPES.index(t) if t in schema.NODE_TYPES else len(schema.NODE_TYPES), t)


def _orig_type(t: str, names: NameMap) -> str:
    from checkpoints_convert.mapping import export_node_name

    return export_node_name(t) if names.node_type(export_node_name(t)) == t else t


def _orig_conv_key(prefix: str, list_name: str, style: str, layer: int, key: str, param: str,
                   original_names: Mapping[str, str]) -> str:
    """The key a missing tensor would have had, in the file's own naming and key style."""
    from checkpoints_convert.mapping import RelationName, export_relation_name

    triple = original_names.get(key) or schema.edge_key(*export_relation_name(key))
    rel = RelationName(*schema.split_key(triple), style=style)
    return f"{prefix}{list_name}.{layer}.convs.{rel.module_key()}.{param}"


def _config_mode(mode: str | None) -> str:
    return "embedding" if mode in (None, "invalid") else mode


def _input_modes(emb, inp) -> dict[str, str]:
    """Node type -> jaxfood input mode, from which input tensors it has ("invalid": no mode fits)."""
    modes = {}
    for t in sorted(set(emb) | {t for t, _, _ in inp}, key=_type_rank):
        kinds = {kind for it, kind, _ in inp if it == t}
        if not kinds:
            modes[t] = "embedding"
        elif kinds == {"input"}:
            modes[t] = "both" if t in emb else "features"
        elif kinds == {"shared"} and t not in emb:
            modes[t] = "shared"
        elif kinds == {"profile"} and t not in emb and t == schema.SAMPLE:
            modes[t] = "profile"
        else:
            modes[t] = "invalid"
    return modes


def _infer_architecture(emb, conv, graph, mappings, src: str, problems: list[Problem], inp=None) -> Architecture:
    inp = inp or {}
    ok = [(k, v) for k, (_, v) in inp.items() if v is not UNINITIALIZED and np.ndim(v) == 2]
    emb_dims = [int(np.shape(v)[1]) for _, v in emb.values() if v is not UNINITIALIZED and np.ndim(v) == 2]
    emb_dims += [int(np.shape(v)[0]) if kind == "input" else int(np.shape(v)[1]) for (_, kind, _), v in ok]
    att_shapes = [tuple(np.shape(v)[1:]) for (_, _, p), (_, v) in conv.items()
                  if p.startswith("att_") and v is not UNINITIALIZED and np.ndim(v) == 3 and np.shape(v)[0] == 1]
    if not att_shapes:
        raise ConvertError(f"{src}: cannot infer heads and channels: no 'att_src'/'att_dst' tensors of shape "
                           "[1, heads, channels] found")
    H, C = _mode(att_shapes)
    d = _mode(emb_dims)
    if d is None:
        lin0 = [int(np.shape(v)[1]) for (layer, _, p), (_, v) in conv.items()
                if layer == 0 and p in ("lin_src.weight", "lin_dst.weight") and np.ndim(v) == 2]
        d = _mode(lin0) or H * C
    L = max(layer for layer, _, _ in conv) + 1
    file_relations = list(dict.fromkeys(k for _, k, _ in conv))
    edge_dims: dict[str, int] = {}
    for key in file_relations:
        widths = [int(np.shape(v)[1]) for (_, k, p), (_, v) in conv.items()
                  if k == key and p == "lin_edge.weight" and v is not UNINITIALIZED and np.ndim(v) == 2]
        edge_dims[key] = _mode(widths) or 0
    num_nodes = {t: int(np.shape(v)[0]) for t, (_, v) in emb.items() if v is not UNINITIALIZED and np.ndim(v) == 2}
    relations = file_relations
    if graph is not None:
        relations = list(graph.edges.keys())
        graph_dims = graph.edge_dims()
        edge_dims = {k: graph_dims[k] for k in relations}
        if mappings is None:
            num_nodes = {t: int(n) for t, n in graph.num_nodes.items()}
        else:
            for field, t in MAPPING_FIELDS.items():
                if field in mappings:
                    num_nodes[t] = len(mappings[field])
    feature_dims = {t: int(np.shape(v)[1]) for (t, kind, param), v in ok if kind == "input" and param == "weight"}
    profile_rows = [int(np.shape(v)[0]) for (_, kind, _), v in ok if kind == "profile"]
    if profile_rows and schema.MOLECULE not in num_nodes:
        num_nodes[schema.MOLECULE] = profile_rows[0]
    modes = _input_modes(emb, inp)
    if graph is not None:
        for t, mode in modes.items():
            if mode in ("features", "both"):
                if t in graph.node_features:
                    feature_dims[t] = int(np.shape(graph.node_features[t])[1])
                else:
                    problems.append(Problem("config", f"input mode of '{t}'", expected=repr(mode),
                                            found="a graph without node_features for it",
                                            why=f"'inputs.{t}.weight' projects node features"))
    return Architecture(embedding_dim=int(d), num_heads=int(H), head_channels=int(C), num_layers=int(L),
                        num_nodes=num_nodes, relations=relations, edge_dims=edge_dims,
                        input_modes={t: m for t, m in modes.items()}, feature_dims=feature_dims)


def _check_config(config: Mapping[str, Any] | None, arch: Architecture, problems: list[Problem]) -> None:
    if not config:
        return
    inferred = {"embedding_dim": arch.embedding_dim, "hidden_dim": arch.hidden_dim, "num_heads": arch.num_heads,
                "num_layers": arch.num_layers}
    evidence = {"embedding_dim": "embeddings.<Type>.weight [N, d]",
                "hidden_dim": f"att_src [1, {arch.num_heads}, {arch.head_channels}] -> heads * channels",
                "num_heads": f"att_src [1, {arch.num_heads}, {arch.head_channels}]",
                "num_layers": "layers.<i> indices"}
    for name in CONFIG_KEYS:
        if name not in config:
            continue
        value = config[name]
        if not isinstance(value, int) or isinstance(value, bool) or value != inferred[name]:
            problems.append(Problem("config", f"config['{name}']", expected=str(inferred[name]), found=repr(value),
                                    why=evidence[name]))


def _fresh_value(path: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """A fresh parameter initialised as PyTorch Geometric would: glorot for weights and
    attention vectors, zeros for biases, N(0, 1) for embedding tables (``nn.Embedding``)."""
    name = path.split("/")[-1]
    if name == "bias":
        return np.zeros(shape, np.float32)
    if name in ("kernel", "att_src", "att_dst", "att_edge"):
        fan_in, fan_out = (shape[0], shape[-1]) if len(shape) > 1 else (shape[0], shape[0])
        limit = np.sqrt(6.0 / max(1, fan_in + fan_out))
        return rng.uniform(-limit, limit, size=shape).astype(np.float32)
    return rng.normal(size=shape).astype(np.float32)


def _fill_from_fresh_init(params: dict, graph, encoder_config, seed: int) -> list[str]:
    """Adds what the graph's encoder needs but the checkpoint lacks (seeded, see :func:`_fresh_value`).

    Returns the added parameter paths. Converted entries the graph's encoder does not have are
    dropped (they would break ``apply``).
    """
    import jax

    from jaxfood.models.encoder import make_encoder

    encoder = make_encoder(graph, encoder_config)
    key = jax.random.PRNGKey(seed)
    expected = jax.eval_shape(lambda: encoder.init(key, graph))["params"]  # structure only: no compile
    rng = np.random.default_rng(seed)
    missing: list[str] = []

    def fill(dst: dict, ref: Mapping, path: str) -> None:
        for k, v in ref.items():
            p = f"{path}/{k}" if path else k
            if isinstance(v, Mapping):
                fill(dst.setdefault(k, {}), v, p)
            elif k not in dst:
                dst[k] = _fresh_value(p, tuple(v.shape), rng)
                missing.append(p)

    fill(params, expected, "")

    def prune(dst: dict, ref: Mapping) -> None:
        for k in list(dst):
            if k not in ref:
                del dst[k]
            elif isinstance(dst[k], dict):
                prune(dst[k], ref[k])

    prune(params, expected)
    return missing


def _reorder_rows(params: dict, graph, mappings: Mapping[str, list], mappings_source: str,
                  ckpt: TorchCheckpoint, emb, seed: int) -> tuple[dict, dict]:
    """Puts embedding rows in the graph's node order, matching ids through the mapping lists.

    Rows of ids only in the checkpoint are dropped (kept in the meta for ``--to-torch``); ids only
    in the graph get the mean of the matched rows (a neutral start; listed in the report).
    """
    rows_meta, report = {}, {}
    for field, t in MAPPING_FIELDS.items():
        if field not in mappings or f"embed_{t}" not in params:
            continue
        table = params[f"embed_{t}"]["embedding"]
        ck_ids = [_norm_id(x) for x in mappings[field]]
        if len(ck_ids) != table.shape[0]:
            raise ConvertError(f"{mappings_source}: '{field}' lists {len(ck_ids)} ids but "
                               f"'{emb[t][0]}' has {table.shape[0]} rows (shape {list(table.shape)})")
        graph_ids = [_norm_id(x) for x in graph.meta.node_ids.get(t, [])]
        if len(graph_ids) != graph.num_nodes[t]:
            raise ConvertError(f"graph: node type '{t}' has no ids to match '{field}' against")
        ck_index = {x: i for i, x in enumerate(ck_ids)}
        graph_set = set(graph_ids)
        matched = [ck_index.get(x, -1) for x in graph_ids]
        known = [i for i in matched if i >= 0]
        if not known:
            raise ConvertError(f"{mappings_source}: no id of '{field}' matches a '{t}' id of the graph "
                               f"(e.g. '{ck_ids[0] if ck_ids else ''}' vs '{graph_ids[0] if graph_ids else ''}')")
        fill = table[known].mean(axis=0)
        new = np.stack([table[i] if i >= 0 else fill for i in matched]).astype(np.float32)
        params[f"embed_{t}"]["embedding"] = new
        only_ck = [x for x in ck_ids if x not in graph_set]
        only_graph = [x for x, i in zip(graph_ids, matched) if i < 0]
        dropped_rows = [np.asarray(ckpt.state[emb[t][0]])[ck_index[x]].tolist() for x in only_ck]
        rows_meta[t] = {"checkpoint_ids": ck_ids, "graph_ids": graph_ids,
                        "dropped": {"ids": only_ck, "values": dropped_rows}}
        report[t] = {"mapping_field": field, "rows_in_checkpoint": len(ck_ids), "rows_in_graph": len(graph_ids),
                     "matched": len(known), "identity": matched == list(range(len(ck_ids))),
                     "only_in_checkpoint": only_ck, "only_in_graph": only_graph,
                     "only_in_graph_initialised_to": "mean of the matched rows" if only_graph else None}
    return rows_meta, report
