"""Per-molecule inputs beside the feature table: spectral embeddings (``.npy`` + ids) and the GNPS
molecular network (``is_similar_to`` edges). Molecules are named by the feature table's ``row ID``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from jaxfood.data.csv_input import check_file, id_strings, numeric_column, read_csv, require_columns
from jaxfood.data.tables import MoleculeEmbeddings, MoleculeSimilarity
from jaxfood.errors import UserError


# ---- molecule embeddings -------------------------------------------------------------------------
def read_molecule_embeddings(npy_path: str | Path, ids_path: str | Path | None = None) -> MoleculeEmbeddings:
    """Reads a ``.npy`` matrix [K, d] and the K molecule ids (one per line, matching ``row ID``).

    ``ids_path`` defaults to ``molecule_ids.txt`` next to the matrix. Without any ids file the
    rows are taken to follow the feature table's row order (``molecule_ids`` is then empty and
    :func:`~jaxfood.data.readers.read_tables` checks that the counts agree).
    """
    npy_path = check_file(Path(npy_path), "molecule embeddings")
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
        ids_path = check_file(Path(ids_path), "molecule ids file")
        lines = [ln.strip() for ln in ids_path.read_text(encoding="utf-8-sig").splitlines()]
        while lines and not lines[-1]:
            lines.pop()
        ids = id_strings(lines)
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



#: Columns of the GNPS feature-based molecular networking edge file (``networkedges_selfloop``, .pairsinfo).
NETWORK_COLUMNS = ("CLUSTERID1", "CLUSTERID2", "Cosine")


def read_molecular_network(path: str | Path) -> MoleculeSimilarity:
    """Reads a GNPS FBMN edge file (TSV/CSV with ``CLUSTERID1``, ``CLUSTERID2``, ``Cosine``; the
    cluster ids are the feature table's ``row ID``) into ``is_similar_to`` edges.

    Self loops (GNPS lists singletons as ``i -> i``) are dropped; a pair listed twice (either
    direction) keeps its highest cosine. Cosines must lie in [0, 1].
    """
    path = Path(path)
    df, _ = read_csv(path, "molecular network", dtype={c: str for c in NETWORK_COLUMNS[:2]})
    require_columns(df, path, NETWORK_COLUMNS, hint="expected a GNPS molecular networking edge file with "
                                                     "'CLUSTERID1', 'CLUSTERID2' and 'Cosine'")
    cosine = numeric_column(df, "Cosine", path, allow_nan=False, allow_negative=False, what="a cosine")
    if (cosine > 1 + 1e-6).any():
        i = int(np.nonzero(cosine > 1 + 1e-6)[0][0])
        raise UserError(f"{path}: column 'Cosine', line {i + 2}: value {cosine[i]:g} is above 1 (expected a cosine in [0, 1])")
    a = id_strings(df["CLUSTERID1"].tolist())
    b = id_strings(df["CLUSTERID2"].tolist())
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
