"""Builds the :class:`~jaxfood.graph.hetero_graph.HeteroGraph` from read tables (the native path).

Node order (``meta.node_ids`` holds the user's identifiers in this order):

* ``Molecule`` -- feature-table row order (every row, detected or not);
* ``Sample``   -- feature-table column order, restricted to samples present in the metadata;
* ``Food``     -- sorted food labels of those samples;
* ``Nutrient`` -- nutrient-table column order (columns with no value for any food are dropped).
  Without a nutrient table the graph has no ``Nutrient`` nodes, no ``has_nutrient`` relation, no
  ``Food`` input features and ``food_nutrients`` is [F, 0]: the nutrition task is off.

Normalisation (statistics are kept in ``meta.normalisation`` so that new samples can be put on
the same scale later):

* ``contains_molecule`` intensity: ``log1p(peak area)``, then z-scored per molecule over the
  samples where it is detected (population std, ddof=0). A molecule with one detection or a
  constant area gets 0; its stored std is 1. ``normalisation["contains_molecule"]`` =
  ``{"transform": "log1p", "mean": [M], "std": [M]}``: ``z = (log1p(area) - mean[m]) / std[m]``.
* ``has_nutrient`` quantity: z-scored per nutrient over the graph's foods that have a value
  (ddof=0, constant -> 0, stored std 1), then a one-hot of the unit (vocabulary
  ``meta.nutrient_units``, first appearance in column order).
  ``normalisation["has_nutrient"]`` = ``{"mean": [N], "std": [N], "missing": "..."}``.
* Missing nutrient values: no ``has_nutrient`` edge; in ``food_nutrients`` (and the ``Food``
  input features) the value is imputed with the nutrient's mean, i.e. 0 after z-scoring. A food
  without any nutrients has an all-zero row.

Input features: ``Molecule`` = spectral embeddings or features made from spectra
(:mod:`jaxfood.data.spectra`) where given (zero vector for molecules without one; described in
``meta.extra["molecule_features"]``), ``Food`` = its normalised nutrient profile ``food_nutrients`` [F, N].
``food_category`` comes from the nutrient table's ``food_category`` column, else from the
metadata hierarchy column one level above the label column (``sample_type_group4`` for
``sample_type_group5``) where every food has a single value.

Splits: samples are split train/val/test stratified by food (seeded) and only training samples
keep their ``is_instance_of`` edge (:mod:`jaxfood.graph.splits`).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

from jaxfood.data.tables import FeatureTable, MoleculeSimilarity, RawTables
from jaxfood.errors import UserError
from jaxfood.graph import schema
from jaxfood.graph.hetero_graph import (
    GraphMeta,
    HeteroGraph,
    make_edge_set,
    validate,
    with_reverse_edges,
)
from jaxfood.graph.splits import NUTRITION_HOLDOUT_FRACTION, with_splits

INTENSITY_TRANSFORM = "log1p"
MISSING_NUTRIENT_POLICY = "no edge; mean-imputed (z = 0) in food_nutrients and Food features"


class BuildWarning(UserWarning):
    """A counted problem the builder works around (printed by the CLI)."""


def _examples(items, k: int = 3) -> str:
    items = list(items)
    shown = ", ".join(f"'{x}'" for x in items[:k])
    return shown + (f", ... ({len(items) - k} more)" if len(items) > k else "")


def _warn(message: str) -> None:
    warnings.warn(" ".join(message.split()), BuildWarning, stacklevel=3)


def grouped_zscore(values: np.ndarray, group: np.ndarray, num_groups: int,
                   ddof: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Z-scores ``values`` [E] within groups ``group`` [E] (ints in ``[0, num_groups)``).

    Returns ``(z [E], mean [G], std [G])``; groups with fewer than ``ddof + 1`` values or zero
    spread get z = 0 and a stored std of 1 (so ``(x - mean) / std`` stays finite for new data).
    """
    values = np.asarray(values, np.float64)
    group = np.asarray(group, np.int64)
    count = np.bincount(group, minlength=num_groups).astype(np.float64)
    total = np.bincount(group, weights=values, minlength=num_groups)
    mean = np.divide(total, count, out=np.zeros(num_groups), where=count > 0)
    dev = values - mean[group]
    sq = np.bincount(group, weights=dev * dev, minlength=num_groups)
    denom = count - ddof
    var = np.divide(sq, denom, out=np.zeros(num_groups), where=denom > 0)
    std = np.sqrt(var)
    # Relative threshold: a constant group can leave float noise of ~1e-16 * |mean|.
    constant = std <= 1e-12 * np.maximum(1.0, np.abs(mean))
    std = np.where(constant, 1.0, std)
    z = np.where(constant[group], 0.0, dev / std[group])
    return z, mean, std


def _food_categories(tables: RawTables, foods: list[str]) -> tuple[np.ndarray, list[str], str]:
    """[F] category index, sorted category names, and where they came from."""
    nt = tables.nutrients
    per_food: dict[str, str] = {}
    source = ""
    if nt is not None and nt.food_category is not None:
        per_food = {f: c for f, c in zip(nt.foods, nt.food_category) if c}
        source = f"{nt.source} column 'food_category'"
    else:
        md = tables.metadata
        col = md.label_column
        if col.startswith("sample_type_group") and col[-1].isdigit():
            parent = f"sample_type_group{int(col[-1]) - 1}"
            values = md.hierarchy.get(parent)
            if values is not None:
                seen: dict[str, set[str]] = {}
                for label, v in zip(md.food_labels, values):
                    if label and v:
                        seen.setdefault(label, set()).add(v)
                if seen and all(len(v) == 1 for v in seen.values()):
                    per_food = {f: next(iter(v)) for f, v in seen.items()}
                    source = f"{md.source} column '{parent}'"
    names = sorted({per_food[f] for f in foods if f in per_food})
    index = {c: i for i, c in enumerate(names)}
    cat = np.asarray([index.get(per_food.get(f, ""), -1) for f in foods], np.int32)
    return cat, names, source


def _molecule_info(ft: FeatureTable) -> dict[str, list]:
    """m/z, RT and annotation per molecule (None where unknown; a column the table lacks is absent)."""
    info: dict[str, list] = {}
    for key, values in (("mz", ft.molecule_mz), ("rt", ft.molecule_rt)):
        if values is not None:
            info[key] = [float(v) if np.isfinite(v) else None for v in np.asarray(values, np.float64)]
    if ft.molecule_annotation is not None:
        info["annotation"] = [a or None for a in ft.molecule_annotation]
    return info


def _similarity_edges(sim: MoleculeSimilarity, molecule_ids: list[str]):
    pos = {m: i for i, m in enumerate(molecule_ids)}
    src = np.asarray([pos.get(s, -1) for s in sim.source_ids])
    dst = np.asarray([pos.get(t, -1) for t in sim.target_ids])
    val = np.asarray(sim.similarity, np.float64).reshape(-1)
    if not (src.shape == dst.shape == val.shape):
        raise UserError(f"{sim.source}: source, target and similarity have different lengths")
    if not np.all(np.isfinite(val)) or (val < 0).any() or (val > 1).any():
        raise UserError(f"{sim.source}: similarity values must be finite numbers in [0, 1]")
    ok = (src >= 0) & (dst >= 0)
    if not ok.all():
        _warn(f"{sim.source}: {int((~ok).sum())} similarity edge(s) name molecules absent from the feature table; dropped")
    return make_edge_set(src[ok], dst[ok], val[ok])


def _nutrients(tables: RawTables, foods: list[str]):
    """Nutrient names, unit vocabulary, ``has_nutrient`` edges, ``food_nutrients`` [F, N], mean [N], std [N]."""
    nt, md, F = tables.nutrients, tables.metadata, len(foods)
    nt_row = {f: i for i, f in enumerate(nt.foods)}
    rows = np.asarray([nt_row.get(f, -1) for f in foods])
    values = np.full((F, len(nt.nutrient_names)), np.nan)
    values[rows >= 0] = np.asarray(nt.values, np.float64)[rows[rows >= 0]]
    without = [f for f, r in zip(foods, rows) if r < 0]
    if len(without) == F:
        raise UserError(f"{nt.source}: none of the {F} foods has nutrients (e.g. '{foods[0]}'; expected it in column 'food')")
    if without:
        _warn(f"{nt.source}: {len(without)} food(s) of {md.source} column '{md.label_column}' have no nutrients "
              f"({_examples(without)}); their profile is the mean (z = 0), no has_nutrient edges")
    has_value = ~np.isnan(values)
    cols = np.nonzero(has_value.any(0))[0]
    if cols.size < len(nt.nutrient_names):
        dropped = [nt.column_names[j] for j in range(len(nt.nutrient_names)) if j not in set(cols)]
        _warn(f"{nt.source}: {len(dropped)} nutrient column(s) have no value for any food of the graph "
              f"({_examples(dropped)}); dropped")
    if cols.size == 0:
        raise UserError(f"{nt.source}: no nutrient value for any food of the graph")
    values, has_value = values[:, cols], has_value[:, cols]
    nutrient_names = [nt.column_names[j] for j in cols]
    units = [nt.units[j] for j in cols]
    unit_vocab = list(dict.fromkeys(units))
    N = len(nutrient_names)
    f_idx, n_idx = np.nonzero(has_value)  # food-major order
    z_nut, nut_mean, nut_std = grouped_zscore(values[f_idx, n_idx], n_idx, N)
    unit_onehot = np.eye(len(unit_vocab))[[unit_vocab.index(units[n]) for n in n_idx]].reshape(-1, len(unit_vocab))
    has_nutrient = make_edge_set(f_idx, n_idx, np.concatenate([z_nut[:, None], unit_onehot], 1))
    food_nutrients = np.zeros((F, N), np.float64)
    food_nutrients[f_idx, n_idx] = z_nut
    return nutrient_names, unit_vocab, has_nutrient, food_nutrients.astype(np.float32), nut_mean, nut_std


def build_graph(tables: RawTables, *, seed: int = 0,
                split_fractions: Sequence[float] = (0.7, 0.15, 0.15),
                nutrition_holdout_fraction: float = NUTRITION_HOLDOUT_FRACTION) -> HeteroGraph:
    """Builds the validated graph from ``tables`` (see the module docstring for order and scales).

    Args:
      tables: :class:`~jaxfood.data.tables.RawTables` from :func:`jaxfood.data.readers.read_tables`
        or the simulator. Samples of ``tables.features`` and ``tables.metadata`` are matched by
        id; feature-table samples absent from the metadata are dropped (counted warning).
      seed: seed of the stratified train/val/test split.
      split_fractions: train, val, test fractions.
      nutrition_holdout_fraction: share of the foods whose nutrient profiles training never sees
        (drawn with ``seed``; :func:`jaxfood.graph.splits.num_held_out_foods`).

    Returns:
      A :class:`HeteroGraph` with every node type the tables give (no ``Nutrient`` without a
      nutrient table), every relation and its reverse, splits assigned and label edges for
      training samples only.
    """
    ft, md, nt = tables.features, tables.metadata, tables.nutrients
    if not ft.molecule_ids or not ft.sample_ids:
        raise UserError(f"{ft.source}: empty feature table (expected at least one molecule and one sample)")

    # ---- samples and foods --------------------------------------------------------------------
    label_of = dict(zip(md.sample_ids, md.food_labels))
    kept = [j for j, s in enumerate(ft.sample_ids) if s in label_of]
    if len(kept) < len(ft.sample_ids):
        n_drop = len(ft.sample_ids) - len(kept)
        if not kept:
            raise UserError(f"{md.source}: none of the {n_drop} samples of {ft.source} is in the metadata")
        absent = [s for s in ft.sample_ids if s not in label_of]
        _warn(f"{ft.source}: {n_drop} sample(s) absent from {md.source} ({_examples(absent)}); dropped")
    # A sample without any detected peak has no molecule edge: nothing to learn from, and predict
    # refuses such a sample too.
    detected = set(np.asarray(ft.sample_index, np.int64)[np.asarray(ft.intensity, np.float64) > 0].tolist())
    empty = [ft.sample_ids[j] for j in kept if j not in detected]
    if empty and len(empty) < len(kept):
        _warn(f"{ft.source}: {len(empty)} sample(s) have no detected peak (every area is 0) ({_examples(empty)}); "
              "dropped")
        kept = [j for j in kept if j in detected]
    sample_ids = [ft.sample_ids[j] for j in kept]
    sample_labels = [label_of[s] for s in sample_ids]
    unlabelled = [s for s, lab in zip(sample_ids, sample_labels) if not lab]
    if unlabelled:
        _warn(f"{md.source}: {len(unlabelled)} sample(s) have an empty '{md.label_column}' "
              f"({_examples(unlabelled)}); kept with unknown food and no label edge")
    foods = sorted({lab for lab in sample_labels if lab})
    if not foods:
        raise UserError(f"{md.source}: column '{md.label_column}' has no food label for any sample")
    food_pos = {f: i for i, f in enumerate(foods)}
    sample_food = np.asarray([food_pos.get(lab, -1) for lab in sample_labels], np.int32)
    few = [f for f, n in zip(foods, np.bincount(sample_food[sample_food >= 0], minlength=len(foods))) if n < 3]
    if few:
        _warn(f"{md.source}: {len(few)} food(s) have fewer than 3 samples ({_examples(few)}); all their samples "
              "go to training, so none of them is validated or tested")

    # ---- contains_molecule ---------------------------------------------------------------------
    M, S, F = len(ft.molecule_ids), len(sample_ids), len(foods)
    new_sample = np.full(len(ft.sample_ids), -1, np.int64)
    new_sample[kept] = np.arange(S)
    s_idx = new_sample[np.asarray(ft.sample_index, np.int64)]
    m_idx = np.asarray(ft.molecule_index, np.int64)
    area = np.asarray(ft.intensity, np.float64)
    keep = (s_idx >= 0) & (area > 0)
    s_idx, m_idx, area = s_idx[keep], m_idx[keep], area[keep]
    if s_idx.size == 0:
        raise UserError(f"{ft.source}: no detected peak (area > 0) in any kept sample")
    # Sample-major order, deterministic whatever the input order (readers usually give it sorted).
    pair = s_idx * M + m_idx
    if not np.all(pair[1:] > pair[:-1]):
        order = np.argsort(pair, kind="stable")
        s_idx, m_idx, area, pair = s_idx[order], m_idx[order], area[order], pair[order]
    if np.any(pair[1:] == pair[:-1]):
        raise UserError(f"{ft.source}: a (sample, molecule) pair has more than one peak area")
    z_int, mol_mean, mol_std = grouped_zscore(np.log1p(area), m_idx, M)
    contains = make_edge_set(s_idx, m_idx, z_int[:, None])

    # ---- nutrients (optional: without a table there are no Nutrient nodes) ------------------------
    nut = _nutrients(tables, foods) if nt is not None else None
    if nut is None:
        nutrient_names, unit_vocab, N = [], [], 0
        food_nutrients = np.zeros((F, 0), np.float32)
    else:
        nutrient_names, unit_vocab, has_nutrient, food_nutrients, nut_mean, nut_std = nut
        N = len(nutrient_names)

    # ---- features, categories, optional similarity -----------------------------------------------
    node_features = {}
    feature_names: dict[str, list[str]] = {}
    emb = tables.embeddings
    if emb is not None:
        pos = {m: i for i, m in enumerate(emb.molecule_ids)}
        rows_e = np.asarray([pos.get(m, -1) for m in ft.molecule_ids])
        mol_x = np.zeros((M, emb.vectors.shape[1]), np.float32)
        mol_x[rows_e >= 0] = np.asarray(emb.vectors, np.float32)[rows_e[rows_e >= 0]]
        n_missing = int((rows_e < 0).sum())
        if n_missing:
            lacking = [m for m, r in zip(ft.molecule_ids, rows_e) if r < 0]
            _warn(f"{emb.source}: {n_missing} of {M} molecule(s) of {ft.source} have no {emb.kind} "
                  f"({_examples(lacking)}); they get a zero vector")
        node_features[schema.MOLECULE] = mol_x
        feature_names[schema.MOLECULE] = [f"{emb.kind}_{i}" for i in range(mol_x.shape[1])]
    if N:
        node_features[schema.FOOD] = food_nutrients
        feature_names[schema.FOOD] = list(nutrient_names)

    edges = {schema.CONTAINS: contains,
             schema.IS_INSTANCE_OF: make_edge_set(np.nonzero(sample_food >= 0)[0], sample_food[sample_food >= 0])}
    if N:
        edges[schema.HAS_NUTRIENT] = has_nutrient
    if tables.similarity is not None:
        edges[schema.IS_SIMILAR_TO] = _similarity_edges(tables.similarity, ft.molecule_ids)
    edges = with_reverse_edges(edges)
    category, category_names, category_source = _food_categories(tables, foods)

    attribute_names = {schema.CONTAINS: ["intensity"], schema.IS_INSTANCE_OF: []}
    if N:
        attribute_names[schema.HAS_NUTRIENT] = ["quantity"] + [f"unit={u}" for u in unit_vocab]
    if schema.IS_SIMILAR_TO in edges:
        attribute_names[schema.IS_SIMILAR_TO] = ["similarity"]
    for key in list(attribute_names):
        attribute_names[schema.reverse_key(key)] = attribute_names[key]

    num_nodes = {schema.SAMPLE: S, schema.MOLECULE: M, schema.FOOD: F}
    node_ids = {schema.SAMPLE: sample_ids, schema.MOLECULE: list(ft.molecule_ids), schema.FOOD: foods}
    normalisation = {"contains_molecule": {"transform": INTENSITY_TRANSFORM, "mean": mol_mean.tolist(),
                                           "std": mol_std.tolist(), "ddof": 0}}
    if N:
        num_nodes[schema.NUTRIENT], node_ids[schema.NUTRIENT] = N, nutrient_names
        normalisation["has_nutrient"] = {"mean": nut_mean.tolist(), "std": nut_std.tolist(), "ddof": 0,
                                         "missing": MISSING_NUTRIENT_POLICY}
    meta = GraphMeta(
        molecule_info=_molecule_info(ft),
        num_nodes=num_nodes,
        node_ids=node_ids,
        food_categories=category_names,
        nutrient_names=nutrient_names,
        nutrient_units=unit_vocab,
        attribute_names=attribute_names,
        feature_names=feature_names,
        normalisation=normalisation,
        extra={
            "mode": "native",
            "sources": {"feature_table": ft.source, "metadata": md.source, "nutrients": nt.source if nt is not None else None,
                        "molecule_embeddings": emb.source if emb is not None and emb.kind == "embedding" else None,
                        "spectra": emb.source if emb is not None and emb.kind == "spectrum" else None,
                        "molecular_network": tables.similarity.source if tables.similarity is not None else None},
            "label_column": md.label_column,
            "food_category_source": category_source,
            "seed": int(seed),
            "split_fractions": [float(x) for x in split_fractions],
        },
    )
    if emb is not None:
        meta.extra["molecule_features"] = {"source": "embeddings", "file": emb.source, **emb.record,
                                           "molecules_without_features": n_missing}
    graph = HeteroGraph(
        node_features=node_features,
        edges=edges,
        sample_food=sample_food,
        sample_split=np.zeros(S, np.int32),
        food_nutrients=food_nutrients,
        food_category=category,
        meta=meta,
    )
    graph = with_splits(graph, fractions=split_fractions, seed=seed,
                        nutrition_holdout_fraction=nutrition_holdout_fraction)
    return validate(graph, source=f"graph built from {ft.source}")
