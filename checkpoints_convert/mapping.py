"""Key parsing and naming: PyTorch Geometric state-dict keys <-> jaxfood parameter paths.

The original PyTorch project saves its ``HeteroGATEncoder`` as

* ``[module.]*[encoder.]embeddings.<NodeType>.weight``  -- ``nn.Embedding`` tables [N, d];
* ``[module.]*[encoder.]layers.<i>.convs.<Src___rel___Dst>.<param>`` -- one ``GATConv`` per
  relation inside a ``HeteroConv`` (PyG >= 2.4 ``ModuleDict`` key style; ``.`` in names is
  stored as ``#``); older PyG wrote ``convs.Src__rel__Dst.<param>``;
* for jaxfood's other input modes (:mod:`checkpoints_convert.reference`):
  ``[encoder.]inputs.<NodeType>.weight|bias`` (``nn.Linear``, mode ``features``/``both``),
  ``[encoder.]shared.<NodeType>`` [1, d] (mode ``shared``), ``[encoder.]profile.<NodeType>``
  [M, d] (mode ``profile``).

Node and relation names of the original (``Feature``, ``Contains``, ``Is_of_type``, ``rev_...``)
are translated into the canonical jaxfood schema by :class:`NameMap`: a default alias table
(:data:`jaxfood.graph.schema.UPSTREAM_ALIASES` plus whole-relation aliases, because the original
uses ``Contains`` for both ``Sample->Feature`` and ``Food->Nutrient``), overridable by the user's
``--rename Old=New`` pairs.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence

from checkpoints_convert.errors import ConvertError
from jaxfood.graph import schema

#: GATConv parameters the original stores per relation, and their jaxfood names.
GAT_PARAMS: dict[str, tuple[str, ...]] = {
    "lin_src.weight": ("lin_src", "kernel"),
    "lin_dst.weight": ("lin_dst", "kernel"),
    "lin_edge.weight": ("lin_edge", "kernel"),
    "att_src": ("att_src",),
    "att_dst": ("att_dst",),
    "att_edge": ("att_edge",),
    "bias": ("bias",),
    "res.weight": ("res", "kernel"),
}
#: Parameters every relation must have (``lin_edge``/``att_edge`` only where edge_dim > 0).
REQUIRED_GAT_PARAMS: tuple[str, ...] = ("lin_src.weight", "lin_dst.weight", "att_src", "att_dst", "bias")
EDGE_GAT_PARAMS: tuple[str, ...] = ("lin_edge.weight", "att_edge")
#: The root weight of ``GATConv(residual=True)`` (PyG >= 2.5): in every relation of every layer, or in none.
RESIDUAL_GAT_PARAMS: tuple[str, ...] = ("res.weight",)

#: Whole-relation aliases of the original project (its ``Contains`` names two relations).
UPSTREAM_RELATION_ALIASES: dict[str, str] = {
    "Sample|Contains|Feature": schema.CONTAINS,
    "Sample|Is_of_type|Food": schema.IS_INSTANCE_OF,
    "Food|Contains|Nutrient": schema.HAS_NUTRIENT,
    "Feature|Is_similar_to|Feature": schema.IS_SIMILAR_TO,
}

_PARAM_RE = "|".join(re.escape(p) for p in GAT_PARAMS)
_EMBED_RE = re.compile(r"^(?P<prefix>(?:.+\.)?)embeddings\.(?P<type>[^.]+)\.weight$")
#: Input layers of jaxfood's other input modes: kind -> key pattern.
_INPUT_RES = {
    "input": re.compile(r"^(?P<prefix>(?:.+\.)?)inputs\.(?P<type>[^.]+)\.(?P<param>weight|bias)$"),
    "shared": re.compile(r"^(?P<prefix>(?:.+\.)?)shared\.(?P<type>[^.]+)$"),
    "profile": re.compile(r"^(?P<prefix>(?:.+\.)?)profile\.(?P<type>[^.]+)$"),
}
#: Input-layer kind (and param) -> jaxfood parameter path of node type ``T`` and the transform.
INPUT_PARAMS: dict[tuple[str, str | None], tuple[str, str]] = {
    ("input", "weight"): ("project_{}/kernel", "transpose"),
    ("input", "bias"): ("project_{}/bias", "none"),
    ("shared", None): ("shared_{}", "none"),
    ("profile", None): ("profile_{}", "none"),
}
_CONV_RE = re.compile(
    rf"^(?P<prefix>(?:.+\.)?)(?P<list>layers|convs)\.(?P<layer>\d+)\.convs\.(?P<rel>.+)\.(?P<param>{_PARAM_RE})$"
)


def strip_module_prefix(keys: Iterable[str]) -> tuple[str, dict[str, str]]:
    """Removes the ``module.`` prefixes DistributedDataParallel adds (possibly nested).

    Returns ``(prefix, {stripped_key: original_key})``; the prefix is removed only when every key
    carries it, so a state dict that merely has a submodule called ``module`` is left alone.
    """
    keys = list(keys)
    prefix = ""
    while keys and all(k.startswith(prefix + "module.") for k in keys):
        prefix += "module."
    return prefix, {k[len(prefix):]: k for k in keys}


@dataclasses.dataclass(frozen=True)
class RelationName:
    """A relation as the checkpoint spells it: ``(src, rel, dst)`` and the key style it used."""

    src: str
    rel: str
    dst: str
    style: str  # "new" (<S___r___D>) or "old" (S__r__D)

    @property
    def triple(self) -> str:
        return schema.edge_key(self.src, self.rel, self.dst)

    def module_key(self, style: str | None = None) -> str:
        """The ``HeteroConv.convs`` key of this relation in ``style`` (default: its own)."""
        style = style or self.style
        if style == "new":
            return "<" + "___".join((self.src, self.rel, self.dst)).replace(".", "#") + ">"
        return "__".join((self.src, self.rel, self.dst))


def parse_relation(text: str) -> RelationName | None:
    """``<S___r___D>`` (PyG >= 2.4) or ``S__r__D`` (older PyG) -> :class:`RelationName`."""
    if text.startswith("<") and text.endswith(">") and "___" in text:
        parts = text[1:-1].replace("#", ".").split("___")
        if len(parts) == 3 and all(parts):
            return RelationName(*parts, style="new")
        return None
    parts = text.split("__")
    if len(parts) == 3 and all(parts):
        return RelationName(*parts, style="old")
    return None


@dataclasses.dataclass(frozen=True)
class ParsedKey:
    """One encoder tensor of the checkpoint, located in the encoder's structure."""

    key: str  # as stored in the file (with any module. prefix)
    prefix: str  # encoder prefix, e.g. "encoder." or ""
    kind: str  # "embedding" | "conv" | "input" | "shared" | "profile"
    node_type: str | None = None  # original node type (embeddings and input layers)
    layer: int | None = None
    list_name: str | None = None  # "layers" (or "convs" in some older code)
    relation: RelationName | None = None
    param: str | None = None  # GATConv parameter, e.g. "lin_src.weight"; "weight"/"bias" of inputs.<T>


def parse_key(stripped: str, original: str) -> ParsedKey | None:
    """Recognises an encoder tensor key (``module.`` prefixes already stripped)."""
    m = _EMBED_RE.match(stripped)
    if m:
        return ParsedKey(original, m["prefix"], "embedding", node_type=m["type"])
    for kind, pattern in _INPUT_RES.items():
        m = pattern.match(stripped)
        if m:
            return ParsedKey(original, m["prefix"], kind, node_type=m["type"],
                             param=m["param"] if kind == "input" else None)
    m = _CONV_RE.match(stripped)
    if m:
        rel = parse_relation(m["rel"])
        if rel is None:
            return None
        return ParsedKey(original, m["prefix"], "conv", layer=int(m["layer"]), list_name=m["list"],
                         relation=rel, param=m["param"])
    return None


def parse_renames(pairs: Sequence[str]) -> dict[str, str]:
    """``["Old=New", ...]`` -> dict; names (``Compound=Molecule``) or relations (``A|r|B=A|s|B``)."""
    out: dict[str, str] = {}
    for pair in pairs:
        old, sep, new = pair.partition("=")
        old, new = old.strip(), new.strip()
        if not sep or not old or not new:
            raise ConvertError(f"--rename {pair!r}: expected Old=New (a node type, a relation name, "
                               "or a whole relation 'Src|rel|Dst=Src|rel|Dst')")
        if ("|" in old) != ("|" in new):
            raise ConvertError(f"--rename {pair!r}: rename a whole relation to a whole relation "
                               "('Src|rel|Dst=Src|rel|Dst') or a name to a name")
        if "|" in new and new not in schema.KNOWN_RELATIONS:
            raise ConvertError(f"--rename {pair!r}: '{new}' is not a jaxfood relation "
                               f"(expected one of {list(schema.KNOWN_RELATIONS)})")
        out[old] = new
    return out


@dataclasses.dataclass
class NameMap:
    """Translates the original's node and relation names into the canonical schema.

    Resolution order for a relation ``(S, r, D)``: a whole-relation ``--rename``; a ``--rename``
    of the relation name; the default whole-relation alias; the default name alias. The result
    must be a relation of the jaxfood schema; anything else is left unresolved (an error that
    asks for a ``--rename``) rather than guessed.
    """

    user: dict[str, str] = dataclasses.field(default_factory=dict)

    def node_type(self, name: str) -> str:
        if name in self.user and "|" not in self.user[name]:
            return self.user[name]
        return schema.UPSTREAM_ALIASES[name] if name in _NODE_ALIASES else name

    def relation(self, src: str, rel: str, dst: str) -> str | None:
        """Canonical ``Src|rel|Dst`` key, or None when nothing matches."""
        triple = schema.edge_key(src, rel, dst)
        if triple in self.user:
            return self.user[triple]
        reverse = rel.startswith("rev_")
        base = rel[len("rev_"):] if reverse else rel
        # a reverse relation (D, rev_r, S) is resolved through its forward (S, r, D)
        f_src, f_dst = (dst, src) if reverse else (src, dst)
        fwd_triple = schema.edge_key(f_src, base, f_dst)
        if fwd_triple in self.user:
            return schema.reverse_key(self.user[fwd_triple])
        n_src, n_dst = self.node_type(f_src), self.node_type(f_dst)
        if base in self.user:
            name = self.user[base]
        elif fwd_triple in UPSTREAM_RELATION_ALIASES:
            key = UPSTREAM_RELATION_ALIASES[fwd_triple]
            return schema.reverse_key(key) if reverse else key
        else:
            name = schema.UPSTREAM_ALIASES.get(base, base) if base not in _NODE_ALIASES else base
        key = schema.edge_key(n_src, name, n_dst)
        if key not in schema.KNOWN_RELATIONS:
            return None
        return schema.reverse_key(key) if reverse else key


_NODE_ALIASES = {k for k, v in schema.UPSTREAM_ALIASES.items() if v in schema.NODE_TYPES}

#: Default original-layout names for exporting a jaxfood encoder that was never converted.
EXPORT_NODE_NAMES: dict[str, str] = {v: k for k, v in schema.UPSTREAM_ALIASES.items() if v in schema.NODE_TYPES}


def export_relation_name(key: str) -> tuple[str, str, str]:
    """Canonical relation -> the original project's ``(src, rel, dst)`` (for ``--to-torch``)."""
    reverse = schema.is_reverse(key)
    fwd = schema.forward_key(key)
    inverse = {v: k for k, v in UPSTREAM_RELATION_ALIASES.items()}
    if fwd in inverse:
        s, r, d = schema.split_key(inverse[fwd])
    else:
        s, r, d = schema.split_key(fwd)
        s, d = EXPORT_NODE_NAMES.get(s, s), EXPORT_NODE_NAMES.get(d, d)
    return (d, f"rev_{r}", s) if reverse else (s, r, d)


def export_node_name(node_type: str) -> str:
    return EXPORT_NODE_NAMES.get(node_type, node_type)


def describe_renames(name_map: NameMap, node_types: Iterable[str],
                     relations: Iterable[RelationName]) -> dict[str, str]:
    """``{original: canonical}`` for every name that changed (for the report)."""
    out: dict[str, str] = {}
    for t in node_types:
        if name_map.node_type(t) != t:
            out[t] = name_map.node_type(t)
    for r in relations:
        key = name_map.relation(r.src, r.rel, r.dst)
        if key is not None and key != r.triple:
            out[r.triple] = key
    return out
