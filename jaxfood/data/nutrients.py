"""Nutrient tables: a wide CSV (one row per food, ``Name (unit)`` columns, amounts per 100 g) or
a directory in the USDA FoodData Central CSV layout (see :func:`read_nutrients`)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from jaxfood.data.csv_input import (
    examples,
    id_strings,
    numeric_column,
    read_csv,
    require_columns,
    unique_ids,
    warn,
)
from jaxfood.data.tables import NutrientTable, SampleMetadata
from jaxfood.errors import UserError

#: Non-nutrient columns a wide nutrient CSV may carry (provenance of each food's values).
NUTRIENT_PROVENANCE_COLUMNS = ("food_category", "usda_data_type", "fdc_id", "ndb_number", "usda_description")
#: Files of the USDA FoodData Central CSV download that :func:`read_nutrients` joins.
FDC_REQUIRED_FILES = ("food_nutrient.csv", "nutrient.csv", "sr_legacy_food.csv")
FDC_OPTIONAL_FILES = ("food.csv", "food_category.csv")
_NUTRIENT_HEADER = re.compile(r"^(.*\S)\s+\(([^()]*\S[^()]*)\)$")


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
    df, _ = read_csv(path, "nutrient table", dtype=str, keep_default_na=False)
    require_columns(df, path, ["food"], hint="expected one row per food label, then 'Name (unit)' columns")
    foods = [s.strip() for s in df["food"].tolist()]
    unique_ids(foods, path, "food", "food")
    provenance = {c: [s.strip() for s in df[c].tolist()] for c in NUTRIENT_PROVENANCE_COLUMNS
                  if c in df.columns and c != "food_category"}
    if "ndb_number" in provenance:
        provenance["ndb_number"] = id_strings(provenance["ndb_number"])
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
    values = np.stack([numeric_column(numeric, c, path, allow_nan=True, allow_negative=False,
                                       what="an amount per 100 g") for c in nutrient_cols], axis=1)
    return NutrientTable(foods=foods, nutrient_names=list(names), units=list(units), values=values,
                         food_category=category, provenance=provenance, source=str(path))


def _fdc_csv(directory: Path, name: str, columns: Sequence[str], **kwargs) -> pd.DataFrame:
    path = directory / name
    if not path.is_file():
        raise UserError(f"{path}: not found (a FoodData Central directory needs {', '.join(FDC_REQUIRED_FILES)})")
    df, _ = read_csv(path, name, **kwargs)
    require_columns(df, path, columns, hint="expected the USDA FoodData Central CSV layout")
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
    for ndb, fdc in zip(id_strings(sr["NDB_number"].tolist()), id_strings(sr["fdc_id"].tolist())):
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
                warn(f"{metadata.source}: food '{label}' has {len(counts)} different ndb_number values "
                      f"({examples(sorted(counts))}); using the most frequent, {ndb}")
            food_to_ndb[label] = ndb
        unmatched = [f for f, n in food_to_ndb.items() if n not in ndb_to_fdc]
        if unmatched:
            warn(f"{directory / 'sr_legacy_food.csv'}: {len(unmatched)} food(s) have an ndb_number without an "
                  f"SR Legacy entry ({examples(unmatched)}); they get no nutrients")
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
    fn_fdc = np.asarray(id_strings(fn["fdc_id"].tolist()), dtype=object)
    rows = np.asarray([fdc_row.get(x, -1) for x in fn_fdc])
    fn = fn[rows >= 0].reset_index(drop=True)
    rows = rows[rows >= 0]
    amounts = numeric_column(fn.replace("", np.nan), "amount", directory / "food_nutrient.csv",
                              allow_nan=True, allow_negative=False, what="an amount per 100 g")
    nid = id_strings(fn["nutrient_id"].tolist())

    nut = _fdc_csv(directory, "nutrient.csv", ["id", "name", "unit_name"], dtype=str, keep_default_na=False)
    nut_info = {i: (n.strip(), _fdc_units(u)) for i, n, u in
                zip(id_strings(nut["id"].tolist()), nut["name"].tolist(), nut["unit_name"].tolist())}
    unknown = sorted({x for x in nid if x not in nut_info})
    if unknown:
        raise UserError(f"{directory / 'food_nutrient.csv'}: column 'nutrient_id' has id(s) {examples(unknown)} "
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
        info = {i: r for i, r in zip(id_strings(fd["fdc_id"].tolist()), fd.to_dict("records"))}
        provenance["usda_data_type"] = [info.get(f, {}).get("data_type", "") for f in food_fdc]
        provenance["usda_description"] = [info.get(f, {}).get("description", "") for f in food_fdc]
        if "food_category_id" in fd.columns:
            cat_ids = id_strings([info.get(f, {}).get("food_category_id", "") for f in food_fdc])
            cat_names: dict[str, str] = {}
            cat_csv = directory / "food_category.csv"
            if cat_csv.is_file():
                fc = _fdc_csv(directory, "food_category.csv", ["id", "description"], dtype=str, keep_default_na=False)
                cat_names = dict(zip(id_strings(fc["id"].tolist()), fc["description"].tolist()))
            category = [cat_names.get(c, c) for c in cat_ids]
    return NutrientTable(foods=foods, nutrient_names=names, units=units, values=values,
                         food_category=category, provenance=provenance, source=str(directory))
