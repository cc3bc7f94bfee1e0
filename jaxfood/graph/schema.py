"""The canonical schema of the food metabolomics graph.

Node types: ``Sample``, ``Molecule``, ``Food``, ``Nutrient``. Relations are addressed by a string
key ``"Src|rel|Dst"`` (the form used in ``summary.json``, in parameter paths and in file names);
every relation has a reverse ``"Dst|rev_rel|Src"`` with the same attributes.
"""

from __future__ import annotations

from jaxfood.errors import GraphError

SAMPLE, MOLECULE, FOOD, NUTRIENT = "Sample", "Molecule", "Food", "Nutrient"
NODE_TYPES: tuple[str, ...] = (SAMPLE, MOLECULE, FOOD, NUTRIENT)
#: Node types every graph has (``Nutrient`` only with a nutrient table).
REQUIRED_NODE_TYPES: tuple[str, ...] = (SAMPLE, MOLECULE, FOOD)

CONTAINS = f"{SAMPLE}|contains_molecule|{MOLECULE}"
IS_INSTANCE_OF = f"{SAMPLE}|is_instance_of|{FOOD}"
HAS_NUTRIENT = f"{FOOD}|has_nutrient|{NUTRIENT}"
IS_SIMILAR_TO = f"{MOLECULE}|is_similar_to|{MOLECULE}"

#: Forward relations, and whether each must be present in every graph. ``has_nutrient`` exists
#: exactly when the graph has ``Nutrient`` nodes (a nutrient table was given).
FORWARD_RELATIONS: dict[str, bool] = {
    CONTAINS: True,
    IS_INSTANCE_OF: True,
    HAS_NUTRIENT: False,
    IS_SIMILAR_TO: False,
}

#: What the columns of each relation's attribute matrix mean.
EDGE_ATTRIBUTES: dict[str, str] = {
    CONTAINS: "intensity (log1p, z-scored per molecule)",
    IS_INSTANCE_OF: "none (the label edge)",
    HAS_NUTRIENT: "quantity (z-scored per nutrient) followed by a one-hot of the unit",
    IS_SIMILAR_TO: "similarity in [0, 1]",
}

#: Names of the PyTorch project this design comes from -> canonical names.
UPSTREAM_ALIASES: dict[str, str] = {
    "Feature": MOLECULE,
    "Contains": "contains_molecule",
    "Is_of_type": "is_instance_of",
    "Has_nutrient": "has_nutrient",
    "Is_similar_to": "is_similar_to",
}


def edge_key(src: str, rel: str, dst: str) -> str:
    return f"{src}|{rel}|{dst}"


def split_key(key: str) -> tuple[str, str, str]:
    parts = key.split("|")
    if len(parts) != 3 or not all(parts):
        raise GraphError(f"relation '{key}': expected 'Src|rel|Dst'")
    return parts[0], parts[1], parts[2]


def reverse_key(key: str) -> str:
    """``Src|rel|Dst`` -> ``Dst|rev_rel|Src`` and back."""
    src, rel, dst = split_key(key)
    rel = rel[len("rev_"):] if rel.startswith("rev_") else f"rev_{rel}"
    return edge_key(dst, rel, src)


def is_reverse(key: str) -> bool:
    return split_key(key)[1].startswith("rev_")


def forward_key(key: str) -> str:
    return reverse_key(key) if is_reverse(key) else key


KNOWN_RELATIONS: tuple[str, ...] = tuple(
    k for fwd in FORWARD_RELATIONS for k in (fwd, reverse_key(fwd))
)
LABEL_RELATIONS: tuple[str, ...] = (IS_INSTANCE_OF, reverse_key(IS_INSTANCE_OF))
