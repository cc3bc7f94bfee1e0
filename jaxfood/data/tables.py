"""In-memory tables between the readers (or the simulator) and the graph builder.

Readers turn user files into these; the simulator produces the same; :mod:`jaxfood.data.build`
turns them into a :class:`~jaxfood.graph.hetero_graph.HeteroGraph`. Values here are raw
(peak areas, nutrient amounts per 100 g); normalisation happens in the builder.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass
class FeatureTable:
    """Sample x molecule peak areas, sparse (COO): only detected (area > 0) entries are stored.

    ``sample_index``/``molecule_index``/``intensity`` are ``[nnz]``; indices point into
    ``sample_ids`` (file names) and ``molecule_ids`` (feature ``row ID`` as strings).
    """

    molecule_ids: list[str]
    sample_ids: list[str]
    sample_index: np.ndarray
    molecule_index: np.ndarray
    intensity: np.ndarray
    molecule_mz: np.ndarray | None = None  # [M]
    molecule_rt: np.ndarray | None = None  # [M]
    molecule_annotation: list[str] | None = None  # [M] library hit / compound name ('' = none)
    source: str = "feature table"


@dataclasses.dataclass
class SampleMetadata:
    """One row per sample: its file name and food label (and optional hierarchy / NDB number)."""

    sample_ids: list[str]
    food_labels: list[str]
    label_column: str = "sample_type_group5"
    hierarchy: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # sample_type_group1..6
    ndb_number: list[str] | None = None
    source: str = "metadata"


@dataclasses.dataclass
class NutrientTable:
    """Nutrient amounts per food: ``values`` [F, N] (NaN = missing), one column per nutrient."""

    foods: list[str]
    nutrient_names: list[str]  # "Protein"
    units: list[str]  # "g", per nutrient column
    values: np.ndarray
    food_category: list[str] | None = None  # USDA food category per food
    provenance: dict[str, list[str]] = dataclasses.field(default_factory=dict)  # e.g. usda_data_type, fdc_id
    source: str = "nutrients"

    @property
    def column_names(self) -> list[str]:
        return [f"{n} ({u})" for n, u in zip(self.nutrient_names, self.units)]


@dataclasses.dataclass
class MoleculeEmbeddings:
    """Molecule input features: ``vectors`` [K, d] of ``molecule_ids``.

    Spectral embeddings computed elsewhere (dreaMS, spec2vec; ``kind`` "embedding") or features
    made from an MGF by :mod:`jaxfood.data.spectra` (``kind`` "spectrum"). ``record`` describes
    them for ``summary.json`` (source, file, how they were made).
    """

    molecule_ids: list[str]
    vectors: np.ndarray
    source: str = "molecule embeddings"
    kind: str = "embedding"
    record: dict = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class MoleculeSimilarity:
    """Optional ``is_similar_to`` edges between molecules, similarity in [0, 1]."""

    source_ids: list[str]
    target_ids: list[str]
    similarity: np.ndarray
    source: str = "molecule similarity"


@dataclasses.dataclass
class RawTables:
    """Everything the builder reads; only the feature table and the metadata are mandatory."""

    features: FeatureTable
    metadata: SampleMetadata
    nutrients: NutrientTable | None = None  # None: no Nutrient nodes, the nutrition task is off
    embeddings: MoleculeEmbeddings | None = None
    similarity: MoleculeSimilarity | None = None
