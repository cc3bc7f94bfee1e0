"""Metabolomics Workbench studies (mwTab text or JSON) into a feature table and sample metadata.

Read through the ``mwtab`` package (optional extra: ``pip install -e ".[mwtab]"``). A study's
``MS_METABOLITE_DATA`` block gives the sample x metabolite table (empty cells: not detected), its
``Metabolites`` block m/z (``moverz_quant``) and retention time (``retention_time`` or ``ri`` of
``ri_type`` RT) per metabolite, and ``SUBJECT_SAMPLE_FACTORS`` the factors of each sample; the
class label is one factor (``label_column``; the only one when the study has one).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jaxfood.data.tables import FeatureTable, SampleMetadata
from jaxfood.errors import UserError

EXTRA_HINT = "pip install mwtab, or pip install -e \".[mwtab]\" in a checkout"


def _load(path: Path):
    try:
        import mwtab
    except ImportError:
        raise UserError(f"--mwtab {path}: reading Metabolomics Workbench files needs the mwtab package "
                        f"({EXTRA_HINT})") from None
    if not path.is_file():
        raise UserError(f"{path}: mwTab file not found")
    try:
        studies = list(mwtab.read_files(str(path)))
    except Exception as err:  # the package raises assorted errors on malformed files
        raise UserError(f"{path}: cannot be read as mwTab text or JSON ({type(err).__name__}: {err})") from None
    studies = [s for s in studies if isinstance(s, dict) and "MS_METABOLITE_DATA" in s]
    if not studies:
        raise UserError(f"{path}: no MS_METABOLITE_DATA block (expected a Metabolomics Workbench MS study "
                        "in mwTab text or JSON)")
    return studies[0]


def _number(text, path: Path, where: str) -> float:
    text = str(text).strip()
    if text in ("", "NA", "NaN", "nan", "ND", "-"):
        return 0.0
    try:
        value = float(text)
    except ValueError:
        raise UserError(f"{path}: MS_METABOLITE_DATA, {where}: value {text!r} is not a number") from None
    if not np.isfinite(value) or value < 0:
        raise UserError(f"{path}: MS_METABOLITE_DATA, {where}: value {text!r} is not a peak area >= 0")
    return value


def _optional_float(text) -> float:
    try:
        value = float(str(text).strip())
    except ValueError:
        return float("nan")
    return value if np.isfinite(value) else float("nan")


def read_mwtab(path: str | Path, label_column: str | None = None) -> tuple[FeatureTable, SampleMetadata]:
    """``(FeatureTable, SampleMetadata)`` of the mwTab study at ``path``.

    Molecule ids are the metabolite names (they are the study's identifiers and also become the
    annotation); samples are the ``Sample ID`` columns. ``label_column`` names the factor that is
    each sample's class; every problem is a one-line :class:`UserError` naming the file and block.
    """
    path = Path(path)
    study = _load(path)
    block = study["MS_METABOLITE_DATA"]
    # The package's rows are DuplicatesDict, whose .get ignores keys: plain dicts from here on.
    rows = [dict(r.items()) for r in block.get("Data") or []]
    if not rows:
        raise UserError(f"{path}: MS_METABOLITE_DATA has no metabolite rows")
    names = [str(r.get("Metabolite", "")).strip() for r in rows]
    seen: set[str] = set()
    for i, name in enumerate(names):
        if not name:
            raise UserError(f"{path}: MS_METABOLITE_DATA, row {i + 1}: empty metabolite name")
        if name in seen:
            raise UserError(f"{path}: MS_METABOLITE_DATA: metabolite '{name}' appears twice (expected unique names)")
        seen.add(name)
    samples = [k for k in rows[0] if k != "Metabolite"]
    if not samples:
        raise UserError(f"{path}: MS_METABOLITE_DATA has no sample columns")
    areas = np.asarray([[_number(r.get(s, ""), path, f"metabolite '{n}', sample '{s}'") for s in samples]
                        for n, r in zip(names, rows)], np.float64)  # [M, S]
    s_idx, m_idx = np.nonzero(areas.T > 0)

    info = {str(m.get("Metabolite", "")).strip(): m
            for m in (dict(x.items()) for x in block.get("Metabolites") or [])}
    mz = np.asarray([_optional_float(info.get(n, {}).get("moverz_quant", "")) for n in names])

    def rt_of(n: str) -> float:
        m = info.get(n, {})
        if "retention_time" in m:
            return _optional_float(m["retention_time"])
        return _optional_float(m.get("ri", "")) if "rt" in str(m.get("ri_type", "")).lower() else float("nan")

    rt = np.asarray([rt_of(n) for n in names])
    features = FeatureTable(
        molecule_ids=names, sample_ids=samples, sample_index=s_idx.astype(np.int64),
        molecule_index=m_idx.astype(np.int64), intensity=areas[m_idx, s_idx],
        molecule_mz=mz if np.isfinite(mz).any() else None, molecule_rt=rt if np.isfinite(rt).any() else None,
        molecule_annotation=list(names), source=f"{path} (MS_METABOLITE_DATA)")

    factors = {str(f.get("Sample ID", "")).strip(): dict((f.get("Factors") or {}).items())
               for f in (dict(x.items()) for x in study.get("SUBJECT_SAMPLE_FACTORS") or [])}
    names_seen = sorted({k for f in factors.values() for k in f})
    if not names_seen:
        raise UserError(f"{path}: SUBJECT_SAMPLE_FACTORS has no factors (expected 'Name:value' pairs per sample)")
    if label_column is None:
        if len(names_seen) > 1:
            raise UserError(f"{path}: the study has factors {names_seen}; pass --label-column with the one that "
                            "is each sample's class")
        label_column = names_seen[0]
    if label_column not in names_seen:
        raise UserError(f"{path}: --label-column '{label_column}' is not a factor of the study "
                        f"(expected one of {names_seen})")
    metadata = SampleMetadata(
        sample_ids=list(factors), food_labels=[str(f.get(label_column, "")).strip() for f in factors.values()],
        label_column=label_column, source=f"{path} (SUBJECT_SAMPLE_FACTORS)")
    return features, metadata
