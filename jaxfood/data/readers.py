"""Readers for the files food metabolomics users have, into the tables of :mod:`jaxfood.data.tables`.

Formats:

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
  (see :func:`read_nutrients`).
* **Molecule embeddings** -- ``.npy`` matrix [K, d] + a text file of K molecule ids.
* **Molecular network** -- the GNPS FBMN edge file (``CLUSTERID1``, ``CLUSTERID2``, ``Cosine``):
  ``(Molecule, is_similar_to, Molecule)`` edges with the cosine as attribute.

Bad input policy. Problems that make the data unusable or ambiguous raise
:class:`~jaxfood.errors.UserError` with one line naming the file, the column/line and what was
expected: missing column, non-numeric, negative or infinite value, duplicate sample file name,
duplicate molecule id or food row, empty table, unparseable nutrient header, embedding count
mismatch. Problems the data survives are reported as a counted warning (Python ``warnings``:
:class:`DataWarning` from here, :class:`jaxfood.data.build.BuildWarning` for what the builder
decides -- foods without nutrients, unlabelled samples, molecules without an embedding; the CLI
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

import csv
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from jaxfood.data.tables import (
    FeatureTable,
    MoleculeEmbeddings,
    MoleculeSimilarity,
    NutrientTable,
    RawTables,
    SampleMetadata,
)
from jaxfood.errors import UserError

PEAK_AREA_SUFFIX = " Peak area"
ROW_ID, ROW_MZ, ROW_RT = "row ID", "row m/z", "row retention time"
#: Columns naming a molecule (GNPS library hit, MZmine identity), first present wins (case-insensitive).
ANNOTATION_COLUMNS = ("Compound_Name", "compound name", "row identity (main ID)", "row identity", "annotation")
HIERARCHY_COLUMNS = tuple(f"sample_type_group{i}" for i in range(1, 7))
DEFAULT_LABEL_COLUMN = "sample_type_group5"
#: Non-nutrient columns a wide nutrient CSV may carry (provenance of each food's values).
NUTRIENT_PROVENANCE_COLUMNS = ("food_category", "usda_data_type", "fdc_id", "ndb_number", "usda_description")
#: Files of the USDA FoodData Central CSV download that :func:`read_nutrients` joins.
FDC_REQUIRED_FILES = ("food_nutrient.csv", "nutrient.csv", "sr_legacy_food.csv")
FDC_OPTIONAL_FILES = ("food.csv", "food_category.csv")
_NUTRIENT_HEADER = re.compile(r"^(.*\S)\s+\(([^()]*\S[^()]*)\)$")


class DataWarning(UserWarning):
    """A problem in the input that the data survives (counted; the CLI prints these)."""


def _warn(message: str) -> None:
    warnings.warn(" ".join(message.split()), DataWarning, stacklevel=3)


def _examples(items: Sequence, k: int = 3) -> str:
    items = list(items)
    shown = ", ".join(f"'{x}'" for x in items[:k])
    return shown + (f", ... ({len(items) - k} more)" if len(items) > k else "")


# ---- generic CSV helpers -------------------------------------------------------------------------
def _check_file(path: Path, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: {what} not found")
    if not path.is_file():
        raise UserError(f"{path}: {what} must be a file")
    return path


def sniff_delimiter(path: Path) -> str:
    """The delimiter: the one of ',', tab and ';' that splits the header line most (a '.csv' saved by
    a spreadsheet in a ';' locale, or tab-separated), else the extension's ('.tsv': tab, else ',')."""
    default = "\t" if path.suffix.lower() in (".tsv", ".tab", ".txt") else ","
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            header = f.readline()
    except (OSError, UnicodeDecodeError):
        return default  # the reader names the problem
    counts = {sep: header.count(sep) for sep in (",", "\t", ";")}
    best = max(counts, key=lambda sep: (counts[sep], sep == default))
    return best if counts[best] > 0 else default


def _read_header(path: Path, sep: str) -> list[str]:
    with open(path, newline="", encoding="utf-8-sig") as f:
        try:
            return next(csv.reader(f, delimiter=sep))
        except StopIteration:
            raise UserError(f"{path}: file is empty (expected a header line)") from None
        except UnicodeDecodeError as err:
            raise UserError(f"{path}: {_encoding_problem(path, err)}") from None
        except csv.Error as err:
            raise UserError(f"{path}: cannot be read as CSV ({err})") from None


def _encoding_problem(path: Path, err: UnicodeDecodeError) -> str:
    """Names the encoding a spreadsheet or Windows tool most likely saved instead of UTF-8."""
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head[:2] in (b"\xff\xfe", b"\xfe\xff"):
        found = "UTF-16 text"
    else:
        found = f"not UTF-8 text (byte 0x{err.object[err.start]:02x} at position {err.start}; e.g. Latin-1 or binary)"
    return f"{found}; expected a UTF-8 CSV (re-save it as 'CSV UTF-8')"


def _read_csv(path: Path, what: str, **kwargs) -> tuple[pd.DataFrame, list[str]]:
    """Reads a CSV/TSV, refusing duplicate column names (pandas would silently rename them)."""
    path = _check_file(path, what)
    sep = sniff_delimiter(path)
    header = [h.strip() for h in _read_header(path, sep)]
    seen: set[str] = set()
    for col in header:
        if col and col in seen:
            raise UserError(f"{path}: column '{col}' appears more than once (expected unique column names)")
        seen.add(col)
    try:
        df = pd.read_csv(path, sep=sep, encoding="utf-8-sig", **kwargs)
    except pd.errors.EmptyDataError:
        raise UserError(f"{path}: file is empty (expected a header line and data rows)") from None
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as err:
        msg = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
        raise UserError(f"{path}: cannot be parsed as CSV ({msg})") from None
    df.columns = [str(c).strip() for c in df.columns]
    if len(df) == 0:
        raise UserError(f"{path}: no data rows (expected at least one row after the header)")
    return df, header


def _require_columns(df: pd.DataFrame, path: Path, columns: Sequence[str], hint: str = "") -> None:
    for col in columns:
        if col not in df.columns:
            extra = f"; {hint}" if hint else ""
            raise UserError(f"{path}: missing column '{col}'{extra}")


def _numeric_column(df: pd.DataFrame, col: str, path: Path, *, allow_nan: bool, allow_negative: bool,
                    what: str = "a number") -> np.ndarray:
    """Column as float64; a non-numeric/negative/inf cell raises naming column and line."""
    raw = df[col]
    values = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=np.float64)
    bad = np.isnan(values) & raw.notna().to_numpy()
    if bad.any():
        i = int(np.nonzero(bad)[0][0])
        raise UserError(f"{path}: column '{col}', line {i + 2}: value {str(raw.iloc[i])!r} is not {what}")
    if not allow_nan and np.isnan(values).any():
        i = int(np.nonzero(np.isnan(values))[0][0])
        raise UserError(f"{path}: column '{col}', line {i + 2}: empty or NaN value (expected {what})")
    if np.isinf(values).any():
        i = int(np.nonzero(np.isinf(values))[0][0])
        raise UserError(f"{path}: column '{col}', line {i + 2}: value '{str(raw.iloc[i]).strip()}' is infinite "
                        f"(expected {what})")
    if not allow_negative and (values < 0).any():
        i = int(np.nonzero(values < 0)[0][0])
        raise UserError(f"{path}: column '{col}', line {i + 2}: value {values[i]:g} is negative (expected {what} >= 0)")
    return values


def _id_strings(values) -> list[str]:
    """Identifiers as strings; floats that are whole numbers lose their '.0' (NDB 9003.0 -> '9003')."""
    out = []
    for v in values:
        if v is None or (isinstance(v, float) and np.isnan(v)) or v is pd.NA:
            out.append("")
        elif isinstance(v, (float, np.floating)) and float(v).is_integer():
            out.append(str(int(v)))
        else:
            s = str(v).strip()
            if re.fullmatch(r"-?\d+\.0+", s):
                s = s.split(".")[0]
            out.append(s)
    return out


def _unique_ids(ids: list[str], path: Path, column: str, what: str) -> None:
    seen: dict[str, int] = {}
    for i, x in enumerate(ids):
        if x == "":
            raise UserError(f"{path}: column '{column}', line {i + 2}: empty {what} (expected a value)")
        if x in seen:
            raise UserError(
                f"{path}: column '{column}', line {i + 2}: duplicate {what} '{x}' (first on line {seen[x] + 2}; expected unique values)"
            )
        seen[x] = i


# ---- feature table -------------------------------------------------------------------------------
def read_feature_table(path: str | Path) -> FeatureTable:
    """Reads a GNPS/MZmine feature table (``.csv``) or a jaxfood sparse feature table (``.npz``).

    Returns a sparse :class:`FeatureTable`: only detected entries (area > 0) are kept, ordered
    by sample column, then molecule row.
    """
    path = Path(path)
    if path.suffix.lower() == ".npz":
        return _read_feature_npz(path)
    df, header = _read_csv(path, "feature table", low_memory=False)
    _require_columns(df, path, [ROW_ID], hint="expected a GNPS/MZmine feature table with 'row ID', 'row m/z', "
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
    molecule_ids = _id_strings(df[ROW_ID].tolist())
    _unique_ids(molecule_ids, path, ROW_ID, "row ID")
    mz = _numeric_column(df, ROW_MZ, path, allow_nan=True, allow_negative=False) if ROW_MZ in df else None
    rt = _numeric_column(df, ROW_RT, path, allow_nan=True, allow_negative=False) if ROW_RT in df else None

    annotation = _annotation_column(df)
    areas = np.empty((len(df), len(area_cols)), np.float64)
    for j, col in enumerate(area_cols):
        areas[:, j] = _numeric_column(df, col, path, allow_nan=True, allow_negative=False,
                                      what="a peak area")
    n_nan = int(np.isnan(areas).sum())
    if n_nan:
        cols = sorted({area_cols[j] for j in np.nonzero(np.isnan(areas).any(0))[0]})
        _warn(f"{path}: {n_nan} empty or NaN peak area cell(s) in {len(cols)} column(s) ({_examples(cols)}) "
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
    _check_file(path, "feature table")
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
    df, _ = _read_csv(path, "metadata", dtype=str, keep_default_na=False)
    _require_columns(df, path, ["filename"], hint="expected one row per sample with its file name")
    if label_column not in df.columns:
        candidates = [c for c in df.columns if c.startswith("sample_type")]
        hint = f" (available: {_examples(candidates, 6)})" if candidates else ""
        raise UserError(f"{path}: missing food label column '{label_column}'{hint}; choose it with --label-column")
    sample_ids = [s.strip() for s in df["filename"].tolist()]
    _unique_ids(sample_ids, path, "filename", "sample file name")
    labels = [s.strip() for s in df[label_column].tolist()]
    hierarchy = {c: [s.strip() for s in df[c].tolist()] for c in HIERARCHY_COLUMNS if c in df.columns}
    ndb = _id_strings([s.strip() for s in df["ndb_number"].tolist()]) if "ndb_number" in df.columns else None
    return SampleMetadata(sample_ids=sample_ids, food_labels=labels, label_column=label_column,
                          hierarchy=hierarchy, ndb_number=ndb, source=str(path))


# ---- nutrients -----------------------------------------------------------------------------------
def parse_nutrient_header(column: str, path: Path | str = "nutrients") -> tuple[str, str]:
    """``'Protein (g)'`` -> ``('Protein', 'g')``; the unit is the last parenthesised group."""
    m = _NUTRIENT_HEADER.match(column.strip())
    if not m:
        raise UserError(f"{path}: column '{column}' is not a nutrient header (expected 'Name (unit)', "
                        f"e.g. 'Protein (g)', or one of 'food', {', '.join(NUTRIENT_PROVENANCE_COLUMNS)})")
    return m.group(1).strip(), m.group(2).strip()


def read_nutrients(path: str | Path, metadata: SampleMetadata | None = None) -> NutrientTable:
    """Reads nutrient amounts per food from a wide CSV or a USDA FoodData Central directory.

    Wide CSV: column ``food`` (the labels used in the metadata's label column), optional
    provenance columns (:data:`NUTRIENT_PROVENANCE_COLUMNS`) and one ``Name (unit)`` column per
    nutrient (amount per 100 g; empty = missing).

    FoodData Central directory (the CSV download): ``sr_legacy_food.csv`` (``fdc_id``,
    ``NDB_number``), ``food_nutrient.csv`` (``fdc_id``, ``nutrient_id``, ``amount``),
    ``nutrient.csv`` (``id``, ``name``, ``unit_name``) and optionally ``food.csv`` (``fdc_id``,
    ``data_type``, ``description``, ``food_category_id``) and ``food_category.csv`` (``id``,
    ``description``). The join: each food label of ``metadata`` takes the ``ndb_number`` of its
    samples (the most frequent one where samples disagree, with a warning); the NDB number finds
    the SR Legacy ``fdc_id``; ``food_nutrient`` gives the amounts, ``nutrient`` the names and
    units (unit names lower-cased, ``G`` -> ``g``). Nutrient columns are ordered by nutrient id
    and only those with a value for at least one of these foods are kept. Without ``metadata``
    every SR Legacy food is returned, labelled by its NDB number.
    """
    path = Path(path)
    if path.is_dir():
        return _read_fdc(path, metadata)
    df, _ = _read_csv(path, "nutrient table", dtype=str, keep_default_na=False)
    _require_columns(df, path, ["food"], hint="expected one row per food label, then 'Name (unit)' columns")
    foods = [s.strip() for s in df["food"].tolist()]
    _unique_ids(foods, path, "food", "food")
    provenance = {c: [s.strip() for s in df[c].tolist()] for c in NUTRIENT_PROVENANCE_COLUMNS
                  if c in df.columns and c != "food_category"}
    if "ndb_number" in provenance:
        provenance["ndb_number"] = _id_strings(provenance["ndb_number"])
    category = [s.strip() for s in df["food_category"].tolist()] if "food_category" in df.columns else None
    nutrient_cols = [c for c in df.columns if c != "food" and c not in NUTRIENT_PROVENANCE_COLUMNS
                     and not (c.startswith("Unnamed:") and (df[c] == "").all())]
    if not nutrient_cols:
        raise UserError(f"{path}: no nutrient columns (expected 'Name (unit)' columns such as 'Protein (g)')")
    names, units = zip(*(parse_nutrient_header(c, path) for c in nutrient_cols))
    seen: dict[tuple[str, str], str] = {}
    for col, name, unit in zip(nutrient_cols, names, units):
        if (name, unit) in seen:
            raise UserError(f"{path}: columns '{seen[(name, unit)]}' and '{col}' give the same nutrient "
                            f"'{name} ({unit})' (expected one column per nutrient and unit)")
        seen[(name, unit)] = col
    numeric = df[nutrient_cols].replace("", np.nan)
    values = np.stack([_numeric_column(numeric, c, path, allow_nan=True, allow_negative=False,
                                       what="an amount per 100 g") for c in nutrient_cols], axis=1)
    return NutrientTable(foods=foods, nutrient_names=list(names), units=list(units), values=values,
                         food_category=category, provenance=provenance, source=str(path))


def _fdc_csv(directory: Path, name: str, columns: Sequence[str], **kwargs) -> pd.DataFrame:
    path = directory / name
    if not path.is_file():
        raise UserError(f"{path}: not found (a FoodData Central directory needs {', '.join(FDC_REQUIRED_FILES)})")
    df, _ = _read_csv(path, name, **kwargs)
    _require_columns(df, path, columns, hint="expected the USDA FoodData Central CSV layout")
    return df


#: FoodData Central spells units in capitals; the wide tables (and the embedded data) use these.
FDC_UNITS = {"G": "g", "MG": "mg", "UG": "ug", "KCAL": "kcal", "KJ": "kJ", "IU": "IU",
             "MG_ATE": "mg_ATE", "MG_GAE": "mg_GAE", "SP_GR": "sp_gr", "PH": "pH"}


def _fdc_units(unit: str) -> str:
    unit = str(unit).strip()
    return FDC_UNITS.get(unit.upper(), unit)


def _read_fdc(directory: Path, metadata: SampleMetadata | None) -> NutrientTable:
    sr = _fdc_csv(directory, "sr_legacy_food.csv", ["fdc_id", "NDB_number"], dtype=str, keep_default_na=False)
    ndb_to_fdc: dict[str, str] = {}
    for ndb, fdc in zip(_id_strings(sr["NDB_number"].tolist()), _id_strings(sr["fdc_id"].tolist())):
        ndb_to_fdc.setdefault(ndb, fdc)

    if metadata is not None:
        if metadata.ndb_number is None:
            raise UserError(f"{metadata.source}: missing column 'ndb_number' (needed to join foods to the "
                            f"FoodData Central directory {directory})")
        by_food: dict[str, dict[str, int]] = {}
        for label, ndb in zip(metadata.food_labels, metadata.ndb_number):
            if label and ndb:
                by_food.setdefault(label, {}).setdefault(ndb, 0)
                by_food[label][ndb] += 1
        food_to_ndb: dict[str, str] = {}
        for label in sorted(by_food):
            counts = by_food[label]
            ndb = max(sorted(counts), key=lambda k: counts[k])
            if len(counts) > 1:
                _warn(f"{metadata.source}: food '{label}' has {len(counts)} different ndb_number values "
                      f"({_examples(sorted(counts))}); using the most frequent, {ndb}")
            food_to_ndb[label] = ndb
        unmatched = [f for f, n in food_to_ndb.items() if n not in ndb_to_fdc]
        if unmatched:
            _warn(f"{directory / 'sr_legacy_food.csv'}: {len(unmatched)} food(s) have an ndb_number without an "
                  f"SR Legacy entry ({_examples(unmatched)}); they get no nutrients")
        foods = [f for f in food_to_ndb if food_to_ndb[f] in ndb_to_fdc]
        food_ndb = [food_to_ndb[f] for f in foods]
    else:
        food_ndb = sorted(ndb_to_fdc, key=lambda s: (len(s), s))
        foods = list(food_ndb)
    if not foods:
        raise UserError(f"{directory / 'sr_legacy_food.csv'}: no food of the metadata has a matching 'NDB_number' "
                        "(expected the metadata's ndb_number values)")
    food_fdc = [ndb_to_fdc[n] for n in food_ndb]
    fdc_row = {fdc: i for i, fdc in enumerate(food_fdc)}

    fn = _fdc_csv(directory, "food_nutrient.csv", ["fdc_id", "nutrient_id", "amount"],
                  usecols=lambda c: c.strip() in ("fdc_id", "nutrient_id", "amount"), dtype=str,
                  keep_default_na=False)
    fn_fdc = np.asarray(_id_strings(fn["fdc_id"].tolist()), dtype=object)
    rows = np.asarray([fdc_row.get(x, -1) for x in fn_fdc])
    fn = fn[rows >= 0].reset_index(drop=True)
    rows = rows[rows >= 0]
    amounts = _numeric_column(fn.replace("", np.nan), "amount", directory / "food_nutrient.csv",
                              allow_nan=True, allow_negative=False, what="an amount per 100 g")
    nid = _id_strings(fn["nutrient_id"].tolist())

    nut = _fdc_csv(directory, "nutrient.csv", ["id", "name", "unit_name"], dtype=str, keep_default_na=False)
    nut_info = {i: (n.strip(), _fdc_units(u)) for i, n, u in
                zip(_id_strings(nut["id"].tolist()), nut["name"].tolist(), nut["unit_name"].tolist())}
    unknown = sorted({x for x in nid if x not in nut_info})
    if unknown:
        raise UserError(f"{directory / 'food_nutrient.csv'}: column 'nutrient_id' has id(s) {_examples(unknown)} "
                        f"missing from {directory / 'nutrient.csv'} column 'id'")
    present = sorted({x for x, a in zip(nid, amounts) if not np.isnan(a)},
                     key=lambda s: (0, int(s)) if s.isdigit() else (1, s))
    col = {x: j for j, x in enumerate(present)}
    values = np.full((len(foods), len(present)), np.nan)
    for r, x, a in zip(rows, nid, amounts):
        if x in col and not np.isnan(a) and np.isnan(values[r, col[x]]):
            values[r, col[x]] = a  # first entry per (food, nutrient) wins, as in FDC's own exports
    names = [nut_info[x][0] for x in present]
    units = [nut_info[x][1] for x in present]
    # A (name, unit) pair can repeat in FDC across analytical methods: add the nutrient id then.
    counts: dict[tuple[str, str], int] = {}
    for n, u in zip(names, units):
        counts[(n, u)] = counts.get((n, u), 0) + 1
    names = [f"{n} [{x}]" if counts[(n, u)] > 1 else n for n, u, x in zip(names, units, present)]

    provenance = {"fdc_id": food_fdc, "ndb_number": food_ndb}
    category = None
    food_csv = directory / "food.csv"
    if food_csv.is_file():
        fd = _fdc_csv(directory, "food.csv", ["fdc_id", "data_type", "description"], dtype=str, keep_default_na=False)
        info = {i: r for i, r in zip(_id_strings(fd["fdc_id"].tolist()), fd.to_dict("records"))}
        provenance["usda_data_type"] = [info.get(f, {}).get("data_type", "") for f in food_fdc]
        provenance["usda_description"] = [info.get(f, {}).get("description", "") for f in food_fdc]
        if "food_category_id" in fd.columns:
            cat_ids = _id_strings([info.get(f, {}).get("food_category_id", "") for f in food_fdc])
            cat_names: dict[str, str] = {}
            cat_csv = directory / "food_category.csv"
            if cat_csv.is_file():
                fc = _fdc_csv(directory, "food_category.csv", ["id", "description"], dtype=str, keep_default_na=False)
                cat_names = dict(zip(_id_strings(fc["id"].tolist()), fc["description"].tolist()))
            category = [cat_names.get(c, c) for c in cat_ids]
    return NutrientTable(foods=foods, nutrient_names=names, units=units, values=values,
                         food_category=category, provenance=provenance, source=str(directory))


# ---- molecule embeddings -------------------------------------------------------------------------
def read_molecule_embeddings(npy_path: str | Path, ids_path: str | Path | None = None) -> MoleculeEmbeddings:
    """Reads a ``.npy`` matrix [K, d] and the K molecule ids (one per line, matching ``row ID``).

    ``ids_path`` defaults to ``molecule_ids.txt`` next to the matrix. Without any ids file the
    rows are taken to follow the feature table's row order (``molecule_ids`` is then empty and
    :func:`read_tables` checks that the counts agree).
    """
    npy_path = _check_file(Path(npy_path), "molecule embeddings")
    try:
        vectors = np.load(npy_path, allow_pickle=False)
    except Exception as err:
        raise UserError(f"{npy_path}: cannot be read as .npy ({type(err).__name__}: {err})") from None
    if vectors.ndim != 2 or vectors.shape[0] == 0 or vectors.shape[1] == 0:
        raise UserError(f"{npy_path}: matrix has shape {vectors.shape}, expected (num_molecules, dim) with both > 0")
    if not np.issubdtype(vectors.dtype, np.number):
        raise UserError(f"{npy_path}: matrix has dtype {vectors.dtype}, expected numbers")
    vectors = vectors.astype(np.float32)
    if not np.all(np.isfinite(vectors)):
        row = int(np.nonzero(~np.isfinite(vectors).all(1))[0][0])
        raise UserError(f"{npy_path}: row {row} contains NaN or inf (expected finite embeddings)")
    if ids_path is None:
        sibling = npy_path.parent / "molecule_ids.txt"
        ids_path = sibling if sibling.is_file() else None
    ids: list[str] = []
    if ids_path is not None:
        ids_path = _check_file(Path(ids_path), "molecule ids file")
        lines = [ln.strip() for ln in ids_path.read_text(encoding="utf-8-sig").splitlines()]
        while lines and not lines[-1]:
            lines.pop()
        ids = _id_strings(lines)
        if ids and ids[0].lower() in ("row id", "molecule_id", "id", "feature", "feature_id") and len(ids) == vectors.shape[0] + 1:
            ids = ids[1:]  # a header line
        if len(ids) != vectors.shape[0]:
            raise UserError(f"{ids_path}: {len(ids)} ids, expected {vectors.shape[0]} (one per row of {npy_path})")
        seen: dict[str, int] = {}
        for i, x in enumerate(ids):
            if not x:
                raise UserError(f"{ids_path}: line {i + 1} is empty (expected a molecule id)")
            if x in seen:
                raise UserError(f"{ids_path}: line {i + 1}: duplicate molecule id '{x}' (first on line {seen[x] + 1})")
            seen[x] = i
    return MoleculeEmbeddings(molecule_ids=ids, vectors=vectors, source=str(npy_path))


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


# ---- molecular network ---------------------------------------------------------------------------
#: Columns of the GNPS feature-based molecular networking edge file (``networkedges_selfloop``, .pairsinfo).
NETWORK_COLUMNS = ("CLUSTERID1", "CLUSTERID2", "Cosine")


def read_molecular_network(path: str | Path) -> MoleculeSimilarity:
    """Reads a GNPS FBMN edge file (TSV/CSV with ``CLUSTERID1``, ``CLUSTERID2``, ``Cosine``; the
    cluster ids are the feature table's ``row ID``) into ``is_similar_to`` edges.

    Self loops (GNPS lists singletons as ``i -> i``) are dropped; a pair listed twice (either
    direction) keeps its highest cosine. Cosines must lie in [0, 1].
    """
    path = Path(path)
    df, _ = _read_csv(path, "molecular network", dtype={c: str for c in NETWORK_COLUMNS[:2]})
    _require_columns(df, path, NETWORK_COLUMNS, hint="expected a GNPS molecular networking edge file with "
                                                     "'CLUSTERID1', 'CLUSTERID2' and 'Cosine'")
    cosine = _numeric_column(df, "Cosine", path, allow_nan=False, allow_negative=False, what="a cosine")
    if (cosine > 1 + 1e-6).any():
        i = int(np.nonzero(cosine > 1 + 1e-6)[0][0])
        raise UserError(f"{path}: column 'Cosine', line {i + 2}: value {cosine[i]:g} is above 1 (expected a cosine in [0, 1])")
    a = _id_strings(df["CLUSTERID1"].tolist())
    b = _id_strings(df["CLUSTERID2"].tolist())
    best: dict[tuple[str, str], float] = {}
    for x, y, c in zip(a, b, np.minimum(cosine, 1.0)):
        if x == y:
            continue
        key = (x, y) if x < y else (y, x)
        best[key] = max(best.get(key, 0.0), float(c))
    if not best:
        raise UserError(f"{path}: no edge between two different molecules (expected rows with CLUSTERID1 != CLUSTERID2)")
    return MoleculeSimilarity(source_ids=[k[0] for k in best], target_ids=[k[1] for k in best],
                              similarity=np.asarray(list(best.values()), np.float64), source=str(path))


def align_tables(features: FeatureTable, metadata: SampleMetadata) -> tuple[FeatureTable, SampleMetadata]:
    """Restricts both tables to the samples they share, in feature-table order (counted warnings)."""
    match = _match_samples(features, metadata)
    missing = [s for s, m in zip(features.sample_ids, match) if m < 0]
    if len(missing) == len(features.sample_ids):
        raise UserError(
            f"{metadata.source}: column 'filename' matches none of the {len(missing)} sample columns of "
            f"{features.source} (e.g. {_examples(missing, 2)}; expected the file names before ' Peak area')"
        )
    if missing:
        _warn(f"{features.source}: {len(missing)} sample(s) absent from {metadata.source} column 'filename' "
              f"({_examples(missing)}); dropped")
    used = {m for m in match if m >= 0}
    unused = [s for i, s in enumerate(metadata.sample_ids) if i not in used]
    if unused:
        _warn(f"{metadata.source}: {len(unused)} sample(s) have no '<filename> Peak area' column in "
              f"{features.source} ({_examples(unused)}); dropped")
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
        from jaxfood.data.workbench import read_mwtab

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
                        f"'{label_column}' has nutrients (e.g. {_examples(labels, 2)}; expected them in column 'food')")
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
                            f"'{ROW_ID}' (e.g. {_examples(embeddings.molecule_ids, 2)})")
    similarity = None
    if network is not None:
        similarity = read_molecular_network(network)
        if not set(similarity.source_ids + similarity.target_ids) & set(features.molecule_ids):
            raise UserError(f"{similarity.source}: none of its cluster ids match {features.source} column "
                            f"'{ROW_ID}' (e.g. {_examples(similarity.source_ids, 2)})")
    return RawTables(features=features, metadata=meta, nutrients=nutrient_table, embeddings=embeddings,
                     similarity=similarity)
