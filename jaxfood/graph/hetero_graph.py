"""``HeteroGraph``: the heterogeneous food metabolomics graph as a JAX pytree.

Arrays (node features, edge indices and attributes, labels, splits) are pytree leaves, so a graph
passes through ``jax.jit``/``jax.pmap`` and can be edited functionally with ``graph.replace(...)``
(augmentations and label masking do this). Everything that is not an array -- node counts, the
user's identifiers, vocabularies, normalisation statistics -- lives in :class:`GraphMeta`, a
static, identity-hashed part of the tree: it never enters a trace.

Relations are keyed by ``"Src|rel|Dst"`` (see :mod:`jaxfood.graph.schema`). Each relation's
:class:`EdgeSet` holds ``senders`` (indices into the source type), ``receivers`` (indices into the
destination type) and ``attributes`` ``[num_edges, attribute_dim]`` (``attribute_dim`` may be 0).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import jraph
import numpy as np

from jaxfood.errors import GraphError
from jaxfood.graph import schema
from jaxfood.io_utils import _json_default, atomic_dir

Array = Any  # np.ndarray or jax.Array

SPLIT_NAMES = ("train", "val", "test")
SPLIT_CODES = {"train": 0, "val": 1, "test": 2}
FORMAT_NAME = "jaxfood-graph"
FORMAT_VERSION = 1


@flax.struct.dataclass
class EdgeSet:
    """One relation's edges: ``senders`` [E] int32, ``receivers`` [E] int32, ``attributes`` [E, F]."""

    senders: Array
    receivers: Array
    attributes: Array

    @property
    def num_edges(self) -> int:
        return int(self.senders.shape[0])

    @property
    def attribute_dim(self) -> int:
        return int(self.attributes.shape[1])


@dataclasses.dataclass(eq=False)
class GraphMeta:
    """Static description of a graph (the ``meta`` of :class:`HeteroGraph`: part of what a jitted
    function is compiled for). Compared and hashed by content, through a digest computed once: the
    same study loaded twice, or two graphs alike in everything static, share compiled programs.
    Fill it in before the graph is used; a change made afterwards is not seen."""

    num_nodes: dict[str, int]
    node_ids: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    #: Names of the USDA food categories, indexed by ``HeteroGraph.food_category``.
    food_categories: list[str] = dataclasses.field(default_factory=list)
    #: Nutrient column names (``Protein (g)``), in the order of ``food_nutrients`` columns.
    nutrient_names: list[str] = dataclasses.field(default_factory=list)
    #: Unit vocabulary of the ``has_nutrient`` one-hot.
    nutrient_units: list[str] = dataclasses.field(default_factory=list)
    #: Column names of each relation's attribute matrix.
    attribute_names: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    #: Column names of each node type's input features.
    feature_names: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    #: Statistics needed to normalise new data like the training data (see ``jaxfood.data``).
    normalisation: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: Provenance: source files, label column, seed, mode.
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    #: What the lab knows of each molecule: ``"mz"``, ``"rt"`` (numbers or None), ``"annotation"``
    #: (library hit / compound name or None), each a list in ``Molecule`` order; keys the feature
    #: table lacks are absent. Read with :func:`molecule_details`.
    molecule_info: dict[str, list] = dataclasses.field(default_factory=dict)

    def digest(self) -> str:
        """SHA-256 of the content (computed on first use, then kept)."""
        cached = self.__dict__.get("_digest")
        if cached is None:
            text = json.dumps(dataclasses.asdict(self), sort_keys=True, default=_json_default)
            cached = self.__dict__["_digest"] = hashlib.sha256(text.encode()).hexdigest()
        return cached

    def __hash__(self) -> int:
        return hash(self.digest())

    def __eq__(self, other) -> bool:
        if self is other:
            return True
        return isinstance(other, GraphMeta) and self.digest() == other.digest()

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@flax.struct.dataclass
class HeteroGraph:
    """The graph. Shapes: ``S`` samples, ``M`` molecules, ``F`` foods, ``N`` nutrients.

    Attributes:
      node_features: input features of the node types that have them, e.g. ``Molecule``
        [M, d_spec] spectral embeddings, ``Food`` [F, N] nutrient profile.
      edges: relation key -> :class:`EdgeSet`, forward relations and their reverses.
      sample_food: [S] int32 food index of each sample, -1 where unknown. Known labels of held-out
        samples are kept for evaluation; they are never edges.
      sample_split: [S] int32, 0 train, 1 val, 2 test, -1 unassigned.
      food_nutrients: [F, N] float32 normalised nutrient profile of each food.
      food_category: [F] int32 index into ``meta.food_categories`` (-1 unknown).
      meta: static :class:`GraphMeta`.
    """

    node_features: dict[str, Array]
    edges: dict[str, EdgeSet]
    sample_food: Array
    sample_split: Array
    food_nutrients: Array
    food_category: Array
    meta: GraphMeta = flax.struct.field(pytree_node=False)

    # ---- static queries -------------------------------------------------------------------
    @property
    def num_nodes(self) -> dict[str, int]:
        return self.meta.num_nodes

    @property
    def node_types(self) -> tuple[str, ...]:
        return tuple(t for t in schema.NODE_TYPES if t in self.meta.num_nodes)

    def edge_dims(self) -> dict[str, int]:
        return {k: int(e.attributes.shape[1]) for k, e in self.edges.items()}

    def feature_dims(self) -> dict[str, int]:
        return {t: int(x.shape[1]) for t, x in self.node_features.items()}

    def to_numpy(self) -> HeteroGraph:
        return jax.tree_util.tree_map(np.asarray, self)

    def to_jraph(self, key: str) -> jraph.GraphsTuple:
        """One relation as a bipartite ``jraph.GraphsTuple`` (source nodes first, then destinations)."""
        src, _, dst = schema.split_key(key)
        edges = self.edges[key]
        n_src, n_dst = self.num_nodes[src], self.num_nodes[dst]
        return jraph.GraphsTuple(
            nodes=None,
            edges=edges.attributes,
            senders=jnp.asarray(edges.senders),
            receivers=jnp.asarray(edges.receivers) + n_src,
            n_node=jnp.array([n_src + n_dst]),
            n_edge=jnp.array([edges.num_edges]),
            globals=None,
        )


# ---- construction ----------------------------------------------------------------------------
def with_reverse_edges(edges: Mapping[str, EdgeSet]) -> dict[str, EdgeSet]:
    """Adds ``Dst|rev_rel|Src`` for every forward relation (same attributes), keeping order."""
    out: dict[str, EdgeSet] = {}
    for key, e in edges.items():
        out[key] = e
    for key, e in edges.items():
        if schema.is_reverse(key):
            continue
        rkey = schema.reverse_key(key)
        if rkey not in out:
            out[rkey] = EdgeSet(senders=e.receivers, receivers=e.senders, attributes=e.attributes)
    return out


def mirror_permutation(key: str, fwd: EdgeSet, rev: EdgeSet) -> np.ndarray:
    """[E] index, in the reverse relation ``rev``, of the mirror of each edge of ``fwd`` (relation ``key``).

    Pairs edges by (source, destination, attributes), so parallel edges with different attributes
    pair up as well. The identity when ``rev`` already lists the mirrors in the forward order (as
    :func:`with_reverse_edges` builds them). Raises :class:`GraphError` if ``rev`` is not ``fwd`` reversed.
    """
    fs, fr = np.asarray(fwd.senders), np.asarray(fwd.receivers)
    rs, rr = np.asarray(rev.senders), np.asarray(rev.receivers)
    rkey = schema.reverse_key(key)
    if fs.shape == rr.shape and np.array_equal(fs, rr) and np.array_equal(fr, rs):
        return np.arange(fs.size, dtype=np.int64)
    if fs.shape != rs.shape:
        raise GraphError(f"relation '{rkey}' has {rs.size} edges but '{key}' has {fs.size}; "
                         "expected the same edges reversed")
    fa = np.asarray(fwd.attributes).reshape(fs.size, -1)
    ra = np.asarray(rev.attributes).reshape(rs.size, -1)
    f_order = np.lexsort((*fa.T[::-1], fr, fs)) if fa.shape[1] == ra.shape[1] else None
    r_order = np.lexsort((*ra.T[::-1], rs, rr)) if f_order is not None else None
    if f_order is None or not (np.array_equal(fs[f_order], rr[r_order]) and np.array_equal(fr[f_order], rs[r_order])):
        raise GraphError(f"relation '{rkey}' is not relation '{key}' reversed (edge sets differ)")
    perm = np.empty(fs.size, np.int64)
    perm[f_order] = r_order  # reverse edge paired with forward edge i
    return perm


def align_reverse_edges(graph: HeteroGraph, keys=None) -> HeteroGraph:
    """Reorders each reverse relation (of the forward relations ``keys``, default all) so that
    reverse edge ``i`` is the mirror of forward edge ``i``.

    Message passing sums over edges, so the order changes nothing but floating-point rounding;
    afterwards one ``[E]`` mask serves both directions (edge dropping, removing a sample's
    molecules). Raises :class:`GraphError` if a reverse relation is not its forward one reversed.
    """
    edges = dict(graph.edges)
    keys = [k for k in graph.edges if not schema.is_reverse(k)] if keys is None else list(keys)
    for key in keys:
        rkey = schema.reverse_key(key)
        if key not in graph.edges or rkey not in graph.edges:
            continue
        rev = graph.edges[rkey]
        perm = mirror_permutation(key, graph.edges[key], rev)
        if np.array_equal(perm, np.arange(perm.size)):
            continue
        edges[rkey] = EdgeSet(senders=np.asarray(rev.senders)[perm], receivers=np.asarray(rev.receivers)[perm],
                              attributes=np.asarray(rev.attributes)[perm])
    return graph.replace(edges=edges)


def make_edge_set(senders, receivers, attributes=None) -> EdgeSet:
    senders = np.asarray(senders, dtype=np.int32).reshape(-1)
    receivers = np.asarray(receivers, dtype=np.int32).reshape(-1)
    if attributes is None:
        attributes = np.zeros((senders.shape[0], 0), np.float32)
    attributes = np.asarray(attributes, dtype=np.float32)
    if attributes.ndim == 1:
        attributes = attributes[:, None]
    return EdgeSet(senders=senders, receivers=receivers, attributes=attributes)


# ---- validation --------------------------------------------------------------------------------
def validate(graph: HeteroGraph, source: str = "graph") -> HeteroGraph:
    """Checks the graph against the schema; raises :class:`GraphError` naming what is wrong."""
    nn = graph.meta.num_nodes
    for t, n in nn.items():
        if t not in schema.NODE_TYPES:
            raise GraphError(f"{source}: unknown node type '{t}' (expected one of {list(schema.NODE_TYPES)})")
        if int(n) < 0:
            raise GraphError(f"{source}: node type '{t}' has a negative count {n}")
        ids = graph.meta.node_ids.get(t)
        if ids is not None and len(ids) != int(n):
            raise GraphError(f"{source}: node_ids['{t}'] has {len(ids)} ids, expected {n}")
    M = nn.get(schema.MOLECULE, 0)
    for key, values in (graph.meta.molecule_info or {}).items():
        if key not in MOLECULE_DETAILS or len(values) != M:
            raise GraphError(f"{source}: meta 'molecule_info.{key}': expected one of {list(MOLECULE_DETAILS)} with "
                             f"{M} entries (one per molecule)")
    for t, x in graph.node_features.items():
        if t not in nn:
            raise GraphError(f"{source}: node features for unknown node type '{t}'")
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[0] != nn[t]:
            raise GraphError(f"{source}: node_features['{t}'] has shape {x.shape}, expected ({nn[t]}, d)")
        if not np.all(np.isfinite(x)):
            raise GraphError(f"{source}: node_features['{t}'] contains NaN or inf")
    for t in schema.REQUIRED_NODE_TYPES:
        if t not in nn:
            raise GraphError(f"{source}: required node type '{t}' is missing")
    for key in schema.FORWARD_RELATIONS:
        if schema.FORWARD_RELATIONS[key] and key not in graph.edges:
            raise GraphError(f"{source}: required relation '{key}' is missing")
    if (schema.NUTRIENT in nn) != (schema.HAS_NUTRIENT in graph.edges):
        raise GraphError(f"{source}: node type '{schema.NUTRIENT}' and relation '{schema.HAS_NUTRIENT}' must be "
                         "present together (both without a nutrient table)")
    for key, e in graph.edges.items():
        if key not in schema.KNOWN_RELATIONS:
            raise GraphError(f"{source}: unknown relation '{key}' (expected one of {list(schema.KNOWN_RELATIONS)})")
        src, _, dst = schema.split_key(key)
        if src not in nn or dst not in nn:
            raise GraphError(f"{source}: relation '{key}' links node type(s) absent from the graph")
        s, r, a = np.asarray(e.senders), np.asarray(e.receivers), np.asarray(e.attributes)
        if s.ndim != 1 or r.shape != s.shape:
            raise GraphError(f"{source}: relation '{key}': senders {s.shape} and receivers {r.shape} must be equal 1-D shapes")
        if a.ndim != 2 or a.shape[0] != s.shape[0]:
            raise GraphError(f"{source}: relation '{key}': attributes have shape {a.shape}, expected ({s.shape[0]}, F)")
        if s.shape[0] == 0 and key not in schema.LABEL_RELATIONS:
            raise GraphError(f"{source}: relation '{key}' is empty")
        for name, idx, t in (("senders", s, src), ("receivers", r, dst)):
            if idx.size and (idx.min() < 0 or idx.max() >= nn[t]):
                bad = int(idx[(idx < 0) | (idx >= nn[t])][0])
                raise GraphError(f"{source}: relation '{key}': {name} index {bad} out of range [0, {nn[t]}) for '{t}'")
        if not np.all(np.isfinite(a)):
            raise GraphError(f"{source}: relation '{key}': attributes contain NaN or inf")
        rkey = schema.reverse_key(key)
        if rkey not in graph.edges:
            raise GraphError(f"{source}: relation '{key}' has no reverse '{rkey}'")
    S, F = nn.get(schema.SAMPLE, 0), nn.get(schema.FOOD, 0)
    checks = (("sample_food", graph.sample_food, (S,)), ("sample_split", graph.sample_split, (S,)),
              ("food_category", graph.food_category, (F,)))
    for name, arr, shape in checks:
        if tuple(np.shape(arr)) != shape:
            raise GraphError(f"{source}: {name} has shape {np.shape(arr)}, expected {shape}")
    sf = np.asarray(graph.sample_food)
    if sf.size and (sf.min() < -1 or sf.max() >= F):
        raise GraphError(f"{source}: sample_food has a food index outside [-1, {F})")
    check_label_edges(graph, source)
    fn = np.asarray(graph.food_nutrients)
    if fn.ndim != 2 or fn.shape[0] != F:
        raise GraphError(f"{source}: food_nutrients has shape {fn.shape}, expected ({F}, num_nutrients)")
    if not np.all(np.isfinite(fn)):
        raise GraphError(f"{source}: food_nutrients contains NaN or inf")
    return graph


def check_label_edges(graph: HeteroGraph, source: str = "graph") -> None:
    """Raises :class:`GraphError` if a held-out (val/test) sample has a label edge in either
    direction: ``Sample -> Food`` or a reverse-only ``Food -> Sample`` edge would each hand the
    sample its food through message passing."""
    split = np.asarray(graph.sample_split)
    for key, sample_end in ((schema.IS_INSTANCE_OF, "senders"), (schema.reverse_key(schema.IS_INSTANCE_OF), "receivers")):
        if key not in graph.edges:
            continue
        samples = np.asarray(getattr(graph.edges[key], sample_end))
        held_out = split[samples] != SPLIT_CODES["train"] if samples.size else np.zeros(0, bool)
        if held_out.any():
            raise GraphError(f"{source}: {int(held_out.sum())} held-out sample(s) have a label edge ('{key}'); "
                             "rebuild the graph with 'jaxfood build-graph'")
# ---- what outputs say about a molecule --------------------------------------------------------------
MOLECULE_DETAILS = ("mz", "rt", "annotation")


def molecule_details(graph: HeteroGraph, index: int) -> dict[str, Any]:
    """``{"molecule_id", "mz", "rt", "annotation"}`` of molecule ``index`` (None where unknown): the
    one record every output that names a molecule (predict, rankings.json, report tables) uses."""
    info = graph.meta.molecule_info or {}
    out: dict[str, Any] = {"molecule_id": graph.meta.node_ids[schema.MOLECULE][index]}
    for key in MOLECULE_DETAILS:
        values = info.get(key)
        out[key] = values[index] if values is not None and values[index] not in ("", None) else None
    return out


def molecule_label(graph: HeteroGraph, index: int) -> str:
    """A short human label: ``id (m/z 180.0634, RT 3.21, caffeine)``; just the id when nothing is known."""
    d = molecule_details(graph, index)
    parts = ([f"m/z {d['mz']:.4f}"] if d["mz"] is not None else []) + \
            ([f"RT {d['rt']:.2f}"] if d["rt"] is not None else []) + \
            ([str(d["annotation"])] if d["annotation"] else [])
    return f"{d['molecule_id']} ({', '.join(parts)})" if parts else str(d["molecule_id"])


# ---- summary, save, load ----------------------------------------------------------------------
def summary(graph: HeteroGraph) -> dict[str, Any]:
    """The ``summary.json`` content: node counts, edge counts per relation, split sizes,
    ``molecule_features`` (only when molecules have input features: ``width`` and, for graphs
    built from files, ``source`` "embeddings" or "spectra", ``file`` and how they were made), and
    ``absent``: optional parts of the schema the graph lacks -> why (what it turns off)."""
    split = np.asarray(graph.sample_split)
    out = {
        "nodes": {t: int(graph.num_nodes[t]) for t in graph.node_types},
        "edges": {k: int(e.num_edges) for k, e in graph.edges.items()},
        "splits": {name: int(np.sum(split == code)) for name, code in SPLIT_CODES.items()},
    }
    if schema.MOLECULE in graph.node_features:
        out["molecule_features"] = {**graph.meta.extra.get("molecule_features", {}),
                                    "width": int(np.shape(graph.node_features[schema.MOLECULE])[1])}
    out["absent"] = absent_parts(graph)
    return out


#: Why the nutrition task and its metrics are absent (``metrics.json["nutrition"]["absent"]``).
NO_NUTRIENTS = "no nutrient table: the graph has no Nutrient nodes, so the nutrition task is off"


def absent_parts(graph: HeteroGraph) -> dict[str, str]:
    """Optional parts of the schema ``graph`` lacks -> why and what that turns off (empty: none)."""
    absent = {}
    if schema.NUTRIENT not in graph.num_nodes or int(np.shape(graph.food_nutrients)[1]) == 0:
        absent[schema.NUTRIENT] = NO_NUTRIENTS
    if schema.MOLECULE not in graph.node_features:
        absent["Molecule features"] = "no spectra or embeddings: molecules are learned per id"
    if schema.IS_SIMILAR_TO not in graph.edges:
        absent[schema.IS_SIMILAR_TO] = "no molecular network or spectra"
    return absent


_ARRAY_FIELDS = ("sample_food", "sample_split", "food_nutrients", "food_category")


def save_graph(graph: HeteroGraph, directory: str | Path) -> Path:
    """Writes ``graph.npz``, ``graph.json`` and ``summary.json`` to ``directory`` (atomically)."""
    directory = Path(directory)
    graph = graph.to_numpy()
    arrays: dict[str, np.ndarray] = {}
    for t, x in graph.node_features.items():
        arrays[f"node_features/{t}"] = x
    for k, e in graph.edges.items():
        arrays[f"edges/{k}/senders"] = e.senders
        arrays[f"edges/{k}/receivers"] = e.receivers
        arrays[f"edges/{k}/attributes"] = e.attributes
    for name in _ARRAY_FIELDS:
        arrays[name] = getattr(graph, name)
    header = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "relations": list(graph.edges.keys()),
        "node_features": list(graph.node_features.keys()),
        "meta": graph.meta.to_json(),
    }
    with atomic_dir(directory) as tmp:
        np.savez(tmp / "graph.npz", **arrays)
        (tmp / "graph.json").write_text(json.dumps(header, default=_json_default) + "\n")
        (tmp / "summary.json").write_text(json.dumps(summary(graph), indent=2) + "\n")
    return directory


def load_graph(directory: str | Path) -> HeteroGraph:
    """Reads a graph written by :func:`save_graph`; every problem names the file and the field."""
    directory = Path(directory)
    jpath, npath = directory / "graph.json", directory / "graph.npz"
    for p in (jpath, npath):
        if not p.is_file():
            raise GraphError(f"{p}: not found (expected a graph directory written by 'jaxfood build-graph')")
    try:
        header = json.loads(jpath.read_text())
    except json.JSONDecodeError as err:
        raise GraphError(f"{jpath}: not valid JSON ({err.msg} at line {err.lineno})") from None
    except UnicodeDecodeError:
        raise GraphError(f"{jpath}: not UTF-8 text (expected the JSON written by 'jaxfood build-graph')") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
        raise GraphError(f"{jpath}: field 'format' must be '{FORMAT_NAME}'")
    if header.get("version") != FORMAT_VERSION:
        raise GraphError(f"{jpath}: field 'version' is {header.get('version')!r}, expected {FORMAT_VERSION}")
    try:
        meta_fields = {f.name for f in dataclasses.fields(GraphMeta)}
        meta_json = header["meta"]
        unknown = set(meta_json) - meta_fields
        if unknown:
            raise GraphError(f"{jpath}: unknown meta field(s) {sorted(unknown)}")
        meta = GraphMeta(**meta_json)
        meta.num_nodes = {t: int(n) for t, n in meta.num_nodes.items()}
        relations, feat_types = header["relations"], header["node_features"]
    except KeyError as err:
        raise GraphError(f"{jpath}: missing field {err}") from None
    try:
        with np.load(npath, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except Exception as err:  # zipfile/ValueError from a damaged file
        raise GraphError(f"{npath}: cannot be read as .npz ({type(err).__name__}: {err})") from None

    def get(name: str) -> np.ndarray:
        if name not in data:
            raise GraphError(f"{npath}: array '{name}' is missing")
        return data[name]

    graph = HeteroGraph(
        node_features={t: get(f"node_features/{t}") for t in feat_types},
        edges={
            k: EdgeSet(
                senders=get(f"edges/{k}/senders"),
                receivers=get(f"edges/{k}/receivers"),
                attributes=get(f"edges/{k}/attributes"),
            )
            for k in relations
        },
        meta=meta,
        **{name: get(name) for name in _ARRAY_FIELDS},
    )
    return validate(graph, source=str(directory))
