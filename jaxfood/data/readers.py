"""Readers for the files food metabolomics users have, into the tables of :mod:`jaxfood.data.tables`;
:func:`read_tables` reads and cross-checks them all.

Formats (feature table and metadata here; nutrients in :mod:`jaxfood.data.nutrients`, molecule
embeddings and the molecular network in :mod:`jaxfood.data.molecule_files`, mwTab in
:mod:`jaxfood.data.workbench`):

* **Feature table** -- GNPS / MZmine quantification CSV: ``row ID``, ``row m/z``, ``row retention
  time``, then one ``<filename> Peak area`` column per sample, optionally an annotation column
  (:data:`ANNOTATION_COLUMNS`: GNPS ``Compound_Name``, ``compound name``, MZmine ``row identity``);
  m/z, RT and annotation follow each molecule into every output that names it. Other columns
  (``row ion mobility``, MZmine's trailing empty column) are ignored. Or the jaxfood sparse ``.npz``
  (keys ``sample_ids``, ``molecule_ids``, ``sample_index``, ``molecule_index``, ``intensity``,
  optional ``mz``, ``rt``) used for large data sets.
* **Sample metadata** -- CSV (or TSV): ``filename``, the food label column (default
  ``sample_type_group5`` as in Global FoodOmics), optional ``sample_type_group1..6`` and
  ``ndb_number``.
* **Nutrients** -- a wide CSV (``food`` + optional provenance columns + one ``Name (unit)``
  column per nutrient, amounts per 100 g), or a directory in the USDA FoodData Central CSV layout
  (see :func:`~jaxfood.data.nutrients.read_nutrients`).
* **Molecule embeddings** -- ``.npy`` matrix [K, d] + a text file of K molecule ids.
* **Molecular network** -- the GNPS FBMN edge file (``CLUSTERID1``, ``CLUSTERID2``, ``Cosine``):
  ``(Molecule, is_similar_to, Molecule)`` edges with the cosine as attribute.

Bad input policy. Problems that make the data unusable or ambiguous raise
:class:`~jaxfood.errors.UserError` with one line naming the file, the column/line and what was
expected: missing column, non-numeric, negative or infinite value, duplicate sample file name,
duplicate molecule id or food row, empty table, unparseable nutrient header, embedding count
mismatch. Problems the data survives are reported as a counted warning (Python ``warnings``:
:class:`~jaxfood.data.csv_input.DataWarning` from the readers, :class:`jaxfood.data.build.BuildWarning`
for what the builder decides -- foods without nutrients, unlabelled samples, molecules without an embedding; the CLI
prints them) and handled as documented:

==========================================  =====================================================
empty cell (NaN) in a ``Peak area`` column  counted warning; treated as not detected (area 0)
feature-table sample absent from metadata   counted warning; the sample is dropped (blanks, QCs)
metadata sample absent from feature table   counted warning; the sample is dropped (no spectra)
sample with an empty food label             counted warning; kept with an unknown food (-1)
food without nutrients                      counted warning; no ``has_nutrient`` edges, its
                                            nutrient profile is the per-nutrient mean (z = 0)
missing nutrient value                      no edge; mean imputation in ``food_nutrients``
molecule without an embedding               counted warning; zero vector
==========================================  =====================================================

Line numbers in messages are 1-based lines of the file (the header is line 1).
"""


from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from jaxfood.data.csv_input import (
    check_file,
    examples,
    id_strings,
    numeric_column,
    read_csv,
    require_columns,
    unique_ids,
    warn,
)
from jaxfood.data.molecule_files import read_molecular_network, read_molecule_embeddings
from jaxfood.data.nutrients import read_nutrients
from jaxfood.data.tables import FeatureTable, RawTables, SampleMetadata
from jaxfood.data.workbench import read_mwtab
from jaxfood.errors import UserError

PEAK_AREA_SUFFIX = " Peak area"
ROW_ID, ROW_MZ, ROW_RT = "row ID", "row m/z", "row retention time"
#: Columns naming a molecule (GNPS library hit, MZmine identity), first present wins (case-insensitive).
ANNOTATION_COLUMNS = ("Compound_Name", "compound name", "row identity (main ID)", "row identity", "annotation")
HIERARCHY_COLUMNS = tuple(f"sample_type_group{i}" for i in range(1, 7))
DEFAULT_LABEL_COLUMN = "sample_type_group5"


# ---- feature table -------------------------------------------------------------------------------
def read_feature_table(path: str | Path) -> FeatureTable:
    """Reads a GNPS/MZmine feature table (``.csv``) or a jaxfood sparse feature table (``.npz``).

    Returns a sparse :class:`FeatureTable`: only detected entries (area > 0) are kept, ordered
    by sample column, then molecule row.
    """
    path = Path(path)
    if path.suffix.lower() == ".npz":
        return _read_feature_npz(path)
    df, header = read_csv(path, "feature table", low_memory=False)
    require_columns(df, path, [ROW_ID], hint="expected a GNPS/MZmine feature table with 'row ID', 'row m/z', "
                                                "'row retention time' and '<filename> Peak area' columns")
    area_cols = [c for c in df.columns if c.endswith(PEAK_AREA_SUFFIX)]
    if not area_cols:
        raise UserError(f"{path}: no '<filename>{PEAK_AREA_SUFFIX}' columns (expected one per sample)")
    sample_ids = [c[: -len(PEAK_AREA_SUFFIX)].strip() for c in area_cols]
    for col, sid in zip(area_cols, sample_ids):
        if not sid:
            raise UserError(f"{path}: column '{col}' has no file name before '{PEAK_AREA_SUFFIX.strip()}'")
    seen: dict[str, str] = {}
    for col, sid in zip(area_cols, sample_ids):
        if sid in seen:
            raise UserError(f"{path}: columns '{seen[sid]}' and '{col}' name the same sample file '{sid}' "
                            "(expected one column per sample)")
        seen[sid] = col
    molecule_ids = id_strings(df[ROW_ID].tolist())
    unique_ids(molecule_ids, path, ROW_ID, "row ID")
    mz = numeric_column(df, ROW_MZ, path, allow_nan=True, allow_negative=False) if ROW_MZ in df else None
    rt = numeric_column(df, ROW_RT, path, allow_nan=True, allow_negative=False) if ROW_RT in df else None

    annotation = _annotation_column(df)
    areas = np.empty((len(df), len(area_cols)), np.float64)
    for j, col in enumerate(area_cols):
        areas[:, j] = numeric_column(df, col, path, allow_nan=True, allow_negative=False,
                                      what="a peak area")
    n_nan = int(np.isnan(areas).sum())
    if n_nan:
        cols = sorted({area_cols[j] for j in np.nonzero(np.isnan(areas).any(0))[0]})
        warn(f"{path}: {n_nan} empty or NaN peak area cell(s) in {len(cols)} column(s) ({examples(cols)}) "
              "treated as not detected (0)")
        areas = np.nan_to_num(areas, nan=0.0)
    samp_idx, mol_idx = np.nonzero(areas.T > 0)  # sample-major, the order the builder keeps
    return FeatureTable(
        molecule_ids=molecule_ids,
        sample_ids=sample_ids,
        sample_index=samp_idx.astype(np.int64),
        molecule_index=mol_idx.astype(np.int64),
        intensity=areas[mol_idx, samp_idx],
        molecule_mz=mz,
        molecule_rt=rt,
        molecule_annotation=annotation,
        source=str(path),
    )


def _annotation_column(df: pd.DataFrame) -> list[str] | None:
    """The first of :data:`ANNOTATION_COLUMNS` the table has, '' where a row has no annotation."""
    lower = {str(c).strip().lower(): c for c in df.columns}
    for name in ANNOTATION_COLUMNS:
        col = lower.get(name.lower())
        if col is not None:
            return ["" if pd.isna(v) else str(v).strip() for v in df[col].tolist()]
    return None


_NPZ_REQUIRED = ("sample_ids", "molecule_ids", "sample_index", "molecule_index", "intensity")


def _read_feature_npz(path: Path) -> FeatureTable:
    check_file(path, "feature table")
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: z[k] for k in z.files}
    except Exception as err:  # zipfile.BadZipFile, ValueError (object arrays), OSError
        raise UserError(f"{path}: cannot be read as .npz ({type(err).__name__}: {err})") from None
    for key in _NPZ_REQUIRED:
        if key not in data:
            raise UserError(f"{path}: missing array '{key}' (expected keys {list(_NPZ_REQUIRED)}, optional 'mz', 'rt')")
    sample_ids = [str(x) for x in data["sample_ids"].reshape(-1)]
    molecule_ids = [str(x) for x in data["molecule_ids"].reshape(-1)]
    if not sample_ids or not molecule_ids:
        raise UserError(f"{path}: arrays 'sample_ids'/'molecule_ids' are empty (expected at least one of each)")
    for key, ids in (("sample_ids", sample_ids), ("molecule_ids", molecule_ids)):
        if len(set(ids)) != len(ids):
            dup = next(x for i, x in enumerate(ids) if x in ids[:i])
            raise UserError(f"{path}: array '{key}' has duplicate entry '{dup}' (expected unique ids)")
    si, mi, val = data["sample_index"], data["molecule_index"], data["intensity"]
    for key, arr in (("sample_index", si), ("molecule_index", mi), ("intensity", val)):
        if arr.ndim != 1 or arr.shape != si.shape:
            raise UserError(f"{path}: array '{key}' has shape {arr.shape}, expected ({si.shape[0]},) like 'sample_index'")
    for key, arr, n in (("sample_index", si, len(sample_ids)), ("molecule_index", mi, len(molecule_ids))):
        if not np.issubdtype(arr.dtype, np.integer):
            raise UserError(f"{path}: array '{key}' has dtype {arr.dtype}, expected integers")
        if arr.size and (arr.min() < 0 or arr.max() >= n):
            raise UserError(f"{path}: array '{key}' has an index outside [0, {n})")
    if not np.issubdtype(val.dtype, np.number):
        raise UserError(f"{path}: array 'intensity' has dtype {val.dtype}, expected numbers")
    val = val.astype(np.float64)
    if not np.all(np.isfinite(val)):
        i = int(np.nonzero(~np.isfinite(val))[0][0])
        raise UserError(f"{path}: array 'intensity', entry {i}: value {val[i]} is not finite (expected a peak area >= 0)")
    if (val < 0).any():
        i = int(np.nonzero(val < 0)[0][0])
        raise UserError(f"{path}: array 'intensity', entry {i}: value {val[i]:g} is negative (expected a peak area >= 0)")
    pair = si.astype(np.int64) * len(molecule_ids) + mi.astype(np.int64)
    if not np.all(pair[1:] > pair[:-1]):  # sorted input (the usual case) needs no sort to check
        pair = np.sort(pair)
    if np.any(pair[1:] == pair[:-1]):
        raise UserError(f"{path}: arrays 'sample_index'/'molecule_index' list a (sample, molecule) pair twice "
                        "(expected one entry per detected peak)")
    keep = val > 0
    extras = {}
    for key in ("mz", "rt"):
        if key in data:
            arr = np.asarray(data[key], np.float64).reshape(-1)
            if arr.shape[0] != len(molecule_ids):
                raise UserError(f"{path}: array '{key}' has {arr.shape[0]} entries, expected {len(molecule_ids)} (one per molecule)")
            extras[key] = arr
    return FeatureTable(
        molecule_ids=molecule_ids,
        sample_ids=sample_ids,
        sample_index=si[keep].astype(np.int64),
        molecule_index=mi[keep].astype(np.int64),
        intensity=val[keep],
        molecule_mz=extras.get("mz"),
        molecule_rt=extras.get("rt"),
        source=str(path),
    )


# ---- metadata ------------------------------------------------------------------------------------
def read_metadata(path: str | Path, label_column: str = DEFAULT_LABEL_COLUMN) -> SampleMetadata:
    """Reads sample metadata: ``filename``, ``label_column``, optional hierarchy and ``ndb_number``.

    Empty labels are kept as ``""`` (unknown food; the builder warns and keeps the sample
    without a label edge).
    """
    path = Path(path)
    df, _ = read_csv(path, "metadata", dtype=str, keep_default_na=False)
    require_columns(df, path, ["filename"], hint="expected one row per sample with its file name")
    if label_column not in df.columns:
        candidates = [c for c in df.columns if c.startswith("sample_type")]
        hint = f" (available: {examples(candidates, 6)})" if candidates else ""
        raise UserError(f"{path}: missing food label column '{label_column}'{hint}; choose it with --label-column")
    sample_ids = [s.strip() for s in df["filename"].tolist()]
    unique_ids(sample_ids, path, "filename", "sample file name")
    labels = [s.strip() for s in df[label_column].tolist()]
    hierarchy = {c: [s.strip() for s in df[c].tolist()] for c in HIERARCHY_COLUMNS if c in df.columns}
    ndb = id_strings([s.strip() for s in df["ndb_number"].tolist()]) if "ndb_number" in df.columns else None
    return SampleMetadata(sample_ids=sample_ids, food_labels=labels, label_column=label_column,
                          hierarchy=hierarchy, ndb_number=ndb, source=str(path))


# ---- all together --------------------------------------------------------------------------------
def _match_samples(features: FeatureTable, metadata: SampleMetadata) -> list[int]:
    """For each feature-table sample the metadata row, or -1. Exact file names first; names that
    differ only in extension (``a.mzML`` vs ``a.mzXML``) match where that is unambiguous."""
    exact = {s: i for i, s in enumerate(metadata.sample_ids)}
    stems: dict[str, list[int]] = {}
    for i, s in enumerate(metadata.sample_ids):
        stems.setdefault(Path(s).stem, []).append(i)
    out = []
    for s in features.sample_ids:
        if s in exact:
            out.append(exact[s])
        else:
            cand = stems.get(Path(s).stem, [])
            out.append(cand[0] if len(cand) == 1 else -1)
    return out



def align_tables(features: FeatureTable, metadata: SampleMetadata) -> tuple[FeatureTable, SampleMetadata]:
    """Restricts both tables to the samples they share, in feature-table order (counted warnings)."""
    match = _match_samples(features, metadata)
    missing = [s for s, m in zip(features.sample_ids, match) if m < 0]
    if len(missing) == len(features.sample_ids):
        raise UserError(
            f"{metadata.source}: column 'filename' matches none of the {len(missing)} sample columns of "
            f"{features.source} (e.g. {examples(missing, 2)}; expected the file names before ' Peak area')"
        )
    if missing:
        warn(f"{features.source}: {len(missing)} sample(s) absent from {metadata.source} column 'filename' "
              f"({examples(missing)}); dropped")
    used = {m for m in match if m >= 0}
    unused = [s for i, s in enumerate(metadata.sample_ids) if i not in used]
    if unused:
        warn(f"{metadata.source}: {len(unused)} sample(s) have no '<filename> Peak area' column in "
              f"{features.source} ({examples(unused)}); dropped")
    keep = [j for j, m in enumerate(match) if m >= 0]
    rows = [match[j] for j in keep]
    new_index = np.full(len(features.sample_ids), -1, np.int64)
    new_index[keep] = np.arange(len(keep))
    entry_keep = new_index[features.sample_index] >= 0
    feats = FeatureTable(
        molecule_ids=features.molecule_ids,
        sample_ids=[features.sample_ids[j] for j in keep],
        sample_index=new_index[features.sample_index[entry_keep]],
        molecule_index=features.molecule_index[entry_keep],
        intensity=features.intensity[entry_keep],
        molecule_mz=features.molecule_mz,
        molecule_rt=features.molecule_rt,
        molecule_annotation=features.molecule_annotation,
        source=features.source,
    )
    meta = SampleMetadata(
        sample_ids=[features.sample_ids[j] for j in keep],
        food_labels=[metadata.food_labels[i] for i in rows],
        label_column=metadata.label_column,
        hierarchy={c: [v[i] for i in rows] for c, v in metadata.hierarchy.items()},
        ndb_number=[metadata.ndb_number[i] for i in rows] if metadata.ndb_number is not None else None,
        source=metadata.source,
    )
    return feats, meta


def read_tables(
    feature_table: str | Path | None,
    metadata: str | Path | None,
    nutrients: str | Path | None = None,
    molecule_embeddings: str | Path | None = None,
    label_column: str = DEFAULT_LABEL_COLUMN,
    molecule_ids: str | Path | None = None,
    network: str | Path | None = None,
    mwtab: str | Path | None = None,
) -> RawTables:
    """Reads and cross-checks all inputs; samples are aligned to the feature table's order.

    ``nutrients`` is optional: without it the graph has no Nutrient nodes (the nutrition task is off).
    ``mwtab``: a Metabolomics Workbench study (:func:`jaxfood.data.workbench.read_mwtab`) in place of
    ``feature_table`` and ``metadata``; ``label_column`` then names one of its factors (None: its only one).
    Cross-file checks: samples of the feature table against the metadata (see
    :func:`align_tables`), food labels against the nutrient table and embedding ids against
    feature-table ``row ID`` values (no overlap at all is an error; foods without nutrients and
    molecules without an embedding are counted warnings of :func:`jaxfood.data.build.build_graph`).
    """
    if mwtab is not None:
        features, meta = read_mwtab(mwtab, label_column)
        label_column = meta.label_column
    else:
        features = read_feature_table(feature_table)
        meta = read_metadata(metadata, label_column=label_column)
    features, meta = align_tables(features, meta)
    nutrient_table = read_nutrients(nutrients, metadata=meta) if nutrients is not None else None
    labels = sorted({x for x in meta.food_labels if x})
    if not labels:
        raise UserError(f"{meta.source}: column '{label_column}' is empty for every matched sample "
                        "(expected a food label per sample)")
    # Foods without nutrients and molecules without an embedding are usable: the builder, which
    # decides what they get, warns about them (once, also for tables that come from elsewhere).
    if nutrient_table is not None and not set(labels) & set(nutrient_table.foods):
        raise UserError(f"{nutrient_table.source}: none of the {len(labels)} food labels of {meta.source} column "
                        f"'{label_column}' has nutrients (e.g. {examples(labels, 2)}; expected them in column 'food')")
    embeddings = None
    if molecule_embeddings is not None:
        embeddings = read_molecule_embeddings(molecule_embeddings, molecule_ids)
        if not embeddings.molecule_ids:
            if embeddings.vectors.shape[0] != len(features.molecule_ids):
                raise UserError(
                    f"{embeddings.source}: {embeddings.vectors.shape[0]} rows but {features.source} has "
                    f"{len(features.molecule_ids)} molecules (without an ids file rows must follow the 'row ID' order; "
                    "pass --molecule-ids)")
            embeddings.molecule_ids = list(features.molecule_ids)
        if not set(embeddings.molecule_ids) & set(features.molecule_ids):
            raise UserError(f"{embeddings.source}: none of its molecule ids match {features.source} column "
                            f"'{ROW_ID}' (e.g. {examples(embeddings.molecule_ids, 2)})")
    similarity = None
    if network is not None:
        similarity = read_molecular_network(network)
        if not set(similarity.source_ids + similarity.target_ids) & set(features.molecule_ids):
            raise UserError(f"{similarity.source}: none of its cluster ids match {features.source} column "
                            f"'{ROW_ID}' (e.g. {examples(similarity.source_ids, 2)})")
    return RawTables(features=features, metadata=meta, nutrients=nutrient_table, embeddings=embeddings,
                     similarity=similarity)
