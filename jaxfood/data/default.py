"""The embedded default graph: simulated FoodOmics-like data with real USDA nutrients.

The simulator (:mod:`jaxfood.data.simulate`) writes the real file formats to a temporary
directory and the graph is built from them with the same readers and builder as user files, so the
default exercises exactly the path a user's data takes.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path

from jaxfood.data.build import build_graph
from jaxfood.data.readers import read_tables
from jaxfood.data.simulate import simulate
from jaxfood.data.simulated_files import write_dataset
from jaxfood.graph.hetero_graph import HeteroGraph

#: Keys of ``write_dataset``'s returned paths that :func:`read_tables` needs, with file-name
#: fallbacks (used when a key is absent from the returned dict).
_FILES = {
    "feature_table": ("feature_table.csv", "feature_table.npz"),
    "metadata": ("metadata.csv",),
    "nutrients": ("nutrients.csv",),
    "molecule_embeddings": ("molecule_embeddings.npy",),
    "molecule_ids": ("molecule_ids.txt",),
}


def dataset_files(paths: dict[str, Path] | None, directory: Path) -> dict[str, Path | None]:
    """Finds the reader inputs among the simulator's written files (by key, else by file name)."""
    paths = {k: Path(v) for k, v in (paths or {}).items()}
    by_name = {p.name: p for p in paths.values()}
    out: dict[str, Path | None] = {}
    for key, names in _FILES.items():
        found = paths.get(key)
        if found is None or not found.is_file():
            found = next((by_name.get(n) or directory / n for n in names
                          if (by_name.get(n) or directory / n).is_file()), None)
        out[key] = found
    return out


def build_default_graph(seed: int = 0, preset: str = "default",
                        split_fractions=(0.7, 0.15, 0.15)) -> HeteroGraph:
    """Simulates ``preset`` with ``seed``, writes its files, reads them back and builds the graph.

    The same ``seed`` drives the simulation and the train/val/test split. Reader/builder warnings
    propagate as Python warnings (the embedded data itself raises none).
    """
    ds = simulate(preset=preset, seed=seed)
    with tempfile.TemporaryDirectory(prefix="jaxfood-default-") as tmp:
        files = dataset_files(write_dataset(ds, tmp), Path(tmp))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tables = read_tables(
                files["feature_table"], files["metadata"], files["nutrients"],
                molecule_embeddings=files["molecule_embeddings"],
                label_column=ds.tables.metadata.label_column,
                molecule_ids=files["molecule_ids"],
            )
            graph = build_graph(tables, seed=seed, split_fractions=split_fractions)
    # Re-issue warnings naming the embedded files rather than a temporary directory that is gone.
    for w in caught:
        message = str(w.message).replace(f"{tmp}/", f"<embedded {preset}>/")
        warnings.warn(message, w.category, stacklevel=2)
    # Temporary paths mean nothing once the directory is gone; record what the data is instead.
    graph.meta.extra["sources"] = {"embedded_default": {"preset": preset, "seed": int(seed)}}
    graph.meta.extra["mode"] = "embedded-default"
    return graph
