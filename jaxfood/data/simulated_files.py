"""Writing a simulated study in the formats users have (:func:`write_dataset`), and its counts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from jaxfood.data.simulate import PROVENANCE_COLUMNS, SimulatedDataset
from jaxfood.data.simulated_world import ROLES
from jaxfood.data.tables import FeatureTable
from jaxfood.errors import UserError
from jaxfood.io_utils import atomic_dir

#: Largest samples x molecules for which ``write_dataset`` writes the wide CSV feature table.
MAX_WIDE_CELLS = 20_000_000


def write_dataset(ds: SimulatedDataset, out_dir: str | Path, feature_format: str = "auto") -> dict[str, Path]:
    """Writes a simulated study in the formats users have; returns ``{name: path}``.

    Files (all at once: on an error nothing is left half-written):

    * ``feature_table.csv`` -- GNPS/MZmine layout: ``row ID``, ``row m/z``, ``row retention time``,
      then ``<filename> Peak area`` per sample (0 = not detected); or, for data too large for a wide
      CSV (``feature_format="npz"``, or ``"auto"`` above :data:`MAX_WIDE_CELLS` cells),
      ``feature_table.npz``: ``sample_ids``, ``molecule_ids`` (str), ``sample_index``,
      ``molecule_index`` (int32), ``intensity`` (float32) [nnz], ``mz``, ``rt`` [M];
    * ``metadata.csv`` -- ``filename``, ``sample_type_group1..5`` (group5 = food label), ``ndb_number``;
    * ``nutrients.csv`` -- ``food``, provenance columns, one ``Name (unit)`` column per nutrient;
    * ``molecule_embeddings.npy`` [K, d] float32 + ``molecule_ids.txt`` (K ``row ID``s);
    * ``biomarkers.csv`` -- ``feature,category`` (category = the food the molecule marks);
    * ``molecules.csv`` -- ``feature,chemical_class,role,target`` (the full ground truth);
    * ``simulation.json`` -- preset, seed, counts.
    """
    import pandas as pd

    if feature_format not in ("auto", "csv", "npz"):
        raise UserError(f"write_dataset: feature_format '{feature_format}' (expected auto, csv or npz)")
    ft, md, nt = ds.tables.features, ds.tables.metadata, ds.tables.nutrients
    if feature_format == "auto":
        feature_format = "csv" if len(ft.sample_ids) * len(ft.molecule_ids) <= MAX_WIDE_CELLS else "npz"
    out_dir = Path(out_dir)
    names = {
        "feature_table": f"feature_table.{feature_format}",
        "metadata": "metadata.csv",
        "nutrients": "nutrients.csv",
        "molecule_embeddings": "molecule_embeddings.npy",
        "molecule_ids": "molecule_ids.txt",
        "biomarkers": "biomarkers.csv",
        "molecules": "molecules.csv",
        "simulation": "simulation.json",
    }
    with atomic_dir(out_dir) as tmp:
        if feature_format == "csv":
            _write_wide_feature_table(ft, tmp / names["feature_table"])
        else:
            np.savez(tmp / names["feature_table"], sample_ids=np.asarray(ft.sample_ids),
                     molecule_ids=np.asarray(ft.molecule_ids), sample_index=ft.sample_index.astype(np.int32),
                     molecule_index=ft.molecule_index.astype(np.int32),
                     intensity=ft.intensity.astype(np.float32), mz=ft.molecule_mz, rt=ft.molecule_rt)

        meta = pd.DataFrame({"filename": md.sample_ids, **md.hierarchy, "ndb_number": md.ndb_number})
        meta.to_csv(tmp / names["metadata"], index=False)

        columns = {"food": nt.foods, "food_category": nt.food_category,
                   **{c: nt.provenance[c] for c in PROVENANCE_COLUMNS if c in nt.provenance}}
        nutri = pd.concat([pd.DataFrame(columns), pd.DataFrame(nt.values, columns=nt.column_names)], axis=1)
        nutri.to_csv(tmp / names["nutrients"], index=False)

        emb = ds.tables.embeddings
        np.save(tmp / names["molecule_embeddings"], emb.vectors.astype(np.float32))
        (tmp / names["molecule_ids"]).write_text("".join(f"{m}\n" for m in emb.molecule_ids))

        pd.DataFrame(ds.biomarkers, columns=["feature", "category"]).to_csv(tmp / names["biomarkers"], index=False)
        targets = {m: t for m, t in ds.biomarkers + ds.category_markers}
        nutrient_of = {cls: n for cls, n in ds.nutrient_links.items()}
        molecules = pd.DataFrame({
            "feature": ft.molecule_ids,
            "chemical_class": [ds.molecule_classes[m] for m in ft.molecule_ids],
            "role": [ds.molecule_roles[m] for m in ft.molecule_ids],
        })
        molecules["target"] = [targets.get(m, nutrient_of.get(c, "") if r == "nutrient_linked" else "")
                               for m, c, r in zip(molecules["feature"], molecules["chemical_class"],
                                                  molecules["role"])]
        molecules.to_csv(tmp / names["molecules"], index=False)

        (tmp / names["simulation"]).write_text(json.dumps(dataset_summary(ds), indent=2) + "\n")
    return {k: out_dir / v for k, v in names.items()}


def _write_wide_feature_table(ft: FeatureTable, path: Path) -> None:
    """GNPS/MZmine quantification table; peak areas with 9 significant digits (exact for float32)."""
    num_mol, num_samples = len(ft.molecule_ids), len(ft.sample_ids)
    cells = np.full((num_mol, num_samples), "0", dtype=object)
    cells[ft.molecule_index, ft.sample_index] = np.char.mod("%.9g", ft.intensity.astype(np.float64))
    header = ["row ID", "row m/z", "row retention time"] + [f"{s} Peak area" for s in ft.sample_ids]
    lines = [",".join(header)]
    mz = ft.molecule_mz if ft.molecule_mz is not None else np.zeros(num_mol)
    rt = ft.molecule_rt if ft.molecule_rt is not None else np.zeros(num_mol)
    for i in range(num_mol):
        lines.append(f"{ft.molecule_ids[i]},{mz[i]:.4f},{rt[i]:.3f}," + ",".join(cells[i]))
    path.write_text("\n".join(lines) + "\n")


def dataset_summary(ds: SimulatedDataset) -> dict:
    """Counts of a simulated study (printed by ``jaxfood simulate``, written to ``simulation.json``)."""
    ft = ds.tables.features
    per_sample = np.bincount(ft.sample_index, minlength=len(ft.sample_ids))
    roles: dict[str, int] = {}
    for r in ds.molecule_roles.values():
        roles[r] = roles.get(r, 0) + 1
    return {
        "preset": ds.preset,
        "seed": ds.seed,
        "samples": len(ft.sample_ids),
        "molecules": len(ft.molecule_ids),
        "entries": int(ft.intensity.shape[0]),
        "peaks_per_sample": {"min": int(per_sample.min()), "median": float(np.median(per_sample)),
                             "max": int(per_sample.max())},
        "foods": len(ds.tables.nutrients.foods),
        "food_categories": len(set(ds.tables.nutrients.food_category)),
        "nutrients": len(ds.tables.nutrients.nutrient_names),
        "molecules_by_role": {r: roles.get(r, 0) for r in ROLES},
        "biomarkers": len(ds.biomarkers),
        "molecules_without_embedding": len(ft.molecule_ids) - len(ds.tables.embeddings.molecule_ids),
        "nutrient_links": ds.nutrient_links,
    }
