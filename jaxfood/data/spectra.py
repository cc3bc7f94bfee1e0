"""MS/MS spectra (MGF, read and cleaned with matchms) -> Molecule input features and a molecular network.

``jaxfood build-graph --spectra F.mgf`` reads the MGF that GNPS feature-based molecular
networking exports beside the quant table: one spectrum per feature, ``FEATURE_ID`` (else
``SCANS``) = the table's ``row ID``. matchms is an optional extra (``pip install -e ".[spectra]"``),
imported only here and only when ``--spectra`` is given.

Cleaning (matchms filters, in this order): ``default_filters`` (metadata harmonisation, precursor
m/z from ``PEPMASS``), ``require_precursor_mz``, ``normalize_intensities`` (max 1),
``select_by_relative_intensity`` (peaks >= 1 % of the base peak), ``reduce_to_number_of_peaks``
(the 100 most intense), ``require_minimum_number_of_peaks`` (3). MS1 spectra (``MSLEVEL=1``) are
skipped; of several spectra of one feature the first is kept.

Features (:func:`binned_spectra` then :func:`reduce_spectra`): intensities summed in 1 Da bins
``[k, k + 1)`` over m/z ``[0, 2000)``, square-root-scaled, each spectrum L2-normalised
([K, 2000]); then projected on the top right singular vectors of that matrix (uncentred SVD, i.e.
truncated SVD, fitted on the spectra present; at most 64 dims, fewer when the matrix has lower
rank; signs fixed so the largest entry of each singular vector is positive: deterministic).
A molecule without a spectrum keeps a zero row (the builder counts them). The features reach
the graph through the same path as ``--molecule-embeddings``
(:class:`~jaxfood.data.tables.MoleculeEmbeddings`).

Network (:func:`spectral_network`, ``--spectra-network``): pairs of cleaned spectra whose matchms
``CosineGreedy`` score (tolerance 0.1 Da) is >= ``min_cosine`` with >= ``min_matched_peaks``
matched peaks become ``is_similar_to`` edges with the score as attribute, through the same
builder as the GNPS edge file (``--network``). Only pairs that can reach both thresholds (upper
bounds of the matched peaks and of the cosine, from tolerance-wide m/z bins: exact, no edge is
lost) are scored by matchms, so a few thousand spectra do not cost an all-pairs Python loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from jaxfood.data.csv_input import DataWarning
from jaxfood.data.csv_input import check_file as _check_file
from jaxfood.data.csv_input import examples as _examples
from jaxfood.data.tables import MoleculeEmbeddings, MoleculeSimilarity, RawTables
from jaxfood.errors import UserError

#: The extra that brings matchms, named in the error when it is missing.
EXTRA_HINT = 'pip install -e ".[spectra]"'

BIN_WIDTH = 1.0  # Da
MZ_RANGE = (0.0, 2000.0)
MAX_WIDTH = 64
MIN_RELATIVE_INTENSITY = 0.01
MAX_PEAKS = 100
MIN_PEAKS = 3

DEFAULT_MIN_COSINE = 0.7
DEFAULT_MIN_MATCHED_PEAKS = 6
COSINE_TOLERANCE = 0.1  # Da, matchms' CosineGreedy default


def _warn(message: str) -> None:
    import warnings

    warnings.warn(" ".join(message.split()), DataWarning, stacklevel=3)


def _matchms():
    try:
        import matchms  # noqa: F401
        import matchms.filtering  # noqa: F401
        import matchms.importing  # noqa: F401
        import matchms.similarity  # noqa: F401
    except ImportError:
        raise UserError(f"--spectra needs matchms: {EXTRA_HINT}") from None
    return matchms


@contextlib.contextmanager
def _quiet_matchms():
    """matchms logs a line per filtered spectrum; the command reports counts instead."""
    logger = logging.getLogger("matchms")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@dataclasses.dataclass
class Spectra:
    """Cleaned MS/MS spectra, one per molecule id: ``mz[i]``/``intensities[i]`` (max 1) of ``ids[i]``."""

    ids: list[str]
    mz: list[np.ndarray]
    intensities: list[np.ndarray]
    precursor_mz: np.ndarray  # [K]
    source: str = "spectra"


def _spectrum_id(spectrum) -> str:
    for key in ("feature_id", "scans"):
        value = spectrum.get(key)
        if value is not None and str(value).strip() not in ("", "-1"):
            text = str(value).strip()
            # SCANS written as a float by some exporters
            return text[:-2] if text.endswith(".0") and text[:-2].isdigit() else text
    return ""


def read_spectra(path: str | Path, molecule_ids: Sequence[str], table_source: str = "feature table") -> Spectra:
    """Reads and cleans the MGF at ``path``; keeps the spectra whose id is one of ``molecule_ids``.

    Raises :class:`UserError` (one line naming the file) when the file is missing, unreadable,
    not MGF, has no spectrum with ``FEATURE_ID``/``SCANS``, none matching a ``row ID``, or none
    left after cleaning. Ids absent from the table, duplicates and spectra removed by cleaning
    are counted warnings.
    """
    path = _check_file(Path(path), "spectra (MGF)")
    _matchms()
    from matchms.filtering import (
        default_filters,
        normalize_intensities,
        reduce_to_number_of_peaks,
        require_minimum_number_of_peaks,
        require_precursor_mz,
        select_by_relative_intensity,
    )
    from matchms.importing import load_from_mgf

    expected = "expected an MGF file: BEGIN IONS ... END IONS blocks with FEATURE_ID or SCANS = the feature table's 'row ID'"
    wanted = set(molecule_ids)
    total = ms1 = no_id = absent = duplicate = removed = 0
    absent_ids: list[str] = []
    kept: dict[str, object] = {}
    with _quiet_matchms():
        try:
            for spectrum in load_from_mgf(str(path)):
                total += 1
                if str(spectrum.get("ms_level") or "2").strip() == "1":
                    ms1 += 1
                    continue
                sid = _spectrum_id(spectrum)
                if not sid:
                    no_id += 1
                    continue
                if sid not in wanted:
                    absent += 1
                    absent_ids.append(sid)
                    continue
                if sid in kept:
                    duplicate += 1
                    continue
                spectrum = default_filters(spectrum)
                spectrum = require_precursor_mz(spectrum)
                spectrum = normalize_intensities(spectrum)
                spectrum = select_by_relative_intensity(spectrum, intensity_from=MIN_RELATIVE_INTENSITY)
                spectrum = reduce_to_number_of_peaks(spectrum, n_max=MAX_PEAKS)
                spectrum = require_minimum_number_of_peaks(spectrum, n_required=MIN_PEAKS)
                kept[sid] = spectrum
        except UnicodeDecodeError as err:
            raise UserError(f"{path}: not a text file at byte {err.start} ({expected})") from None
        except Exception as err:  # pyteomics raises its own error types on malformed blocks
            detail = " ".join(str(err).split())[:200]
            raise UserError(f"{path}: cannot be read as MGF ({type(err).__name__}: {detail}); {expected}") from None
    if total == 0:
        raise UserError(f"{path}: no spectrum found ({expected})")
    if no_id == total - ms1:
        raise UserError(f"{path}: none of its {total} spectra has FEATURE_ID or SCANS ({expected})")
    if not kept:
        raise UserError(f"{path}: none of its spectrum ids match {table_source} column 'row ID' "
                        f"(e.g. {_examples(absent_ids, 2)}); {expected}")
    if no_id:
        _warn(f"{path}: {no_id} spectrum(s) have no FEATURE_ID or SCANS; ignored")
    if absent:
        _warn(f"{path}: {absent} spectrum id(s) are not in {table_source} column 'row ID' "
              f"({_examples(absent_ids)}); ignored")
    if duplicate:
        _warn(f"{path}: {duplicate} spectrum(s) repeat the id of an earlier one; the first is kept")
    clean = {sid: s for sid, s in kept.items() if s is not None}
    removed = len(kept) - len(clean)
    if not clean:
        raise UserError(f"{path}: no spectrum is left after cleaning (expected a precursor m/z (PEPMASS) and at "
                        f"least {MIN_PEAKS} peaks >= {MIN_RELATIVE_INTENSITY:.0%} of the base peak)")
    if removed:
        _warn(f"{path}: {removed} spectrum(s) removed by cleaning (no precursor m/z, or fewer than {MIN_PEAKS} "
              f"peaks >= {MIN_RELATIVE_INTENSITY:.0%} of the base peak); their molecules get a zero vector")
    ids = list(clean)
    return Spectra(ids=ids,
                   mz=[np.asarray(clean[i].peaks.mz, np.float64) for i in ids],
                   intensities=[np.asarray(clean[i].peaks.intensities, np.float64) for i in ids],
                   precursor_mz=np.asarray([float(clean[i].get("precursor_mz")) for i in ids], np.float64),
                   source=str(path))


def binned_spectra(mz: Sequence[np.ndarray], intensities: Sequence[np.ndarray], *,
                   bin_width: float = BIN_WIDTH, mz_range: tuple[float, float] = MZ_RANGE) -> np.ndarray:
    """Binned, square-root-scaled, L2-normalised spectra: [K, num_bins] float64.

    Intensities of the peaks in bin ``[lo + k w, lo + (k + 1) w)`` are summed, then square-rooted;
    peaks outside ``mz_range`` are ignored; a spectrum with no peak in range is a zero row.
    """
    lo, hi = mz_range
    num_bins = int(np.ceil((hi - lo) / bin_width))
    out = np.zeros((len(mz), num_bins), np.float64)
    for i, (m, a) in enumerate(zip(mz, intensities)):
        k = np.floor((np.asarray(m, np.float64) - lo) / bin_width).astype(np.int64)
        ok = (k >= 0) & (k < num_bins)
        np.add.at(out[i], k[ok], np.asarray(a, np.float64)[ok])
    out = np.sqrt(out)
    norm = np.linalg.norm(out, axis=1, keepdims=True)
    return np.divide(out, norm, out=np.zeros_like(out), where=norm > 0)


def reduce_spectra(binned: np.ndarray, max_width: int = MAX_WIDTH) -> tuple[np.ndarray, dict]:
    """Truncated SVD of ``binned`` [K, B]: the projections [K, d] (d <= ``max_width``) and a record.

    Uncentred, so a zero row stays zero; d is the numerical rank capped at ``max_width``; each
    right singular vector's sign makes its largest-magnitude entry positive (deterministic).
    Record: ``{"width": d, "explained_variance": fraction of the squared norm kept}``.
    """
    used = np.nonzero(np.any(binned != 0, axis=0))[0]
    x = binned[:, used]
    # Eigenvectors of the smaller Gram matrix give the right singular vectors (much faster than a
    # full SVD for thousands of spectra); only the top ones are kept, so its squared condition is harmless.
    if x.shape[0] < x.shape[1]:
        eigval, u = np.linalg.eigh(x @ x.T)
        eigval, u = eigval[::-1], u[:, ::-1]
        s = np.sqrt(np.clip(eigval, 0, None))
        vt = (u / np.where(s > 0, s, 1.0)).T @ x
    else:
        eigval, v = np.linalg.eigh(x.T @ x)
        eigval, vt = eigval[::-1], v[:, ::-1].T
        s = np.sqrt(np.clip(eigval, 0, None))
    rank = int(np.sum(s > s[0] * 1e-6)) if s.size else 0
    d = max(1, min(max_width, rank))
    vt = vt[:d]
    flip = np.sign(vt[np.arange(d), np.argmax(np.abs(vt), axis=1)])
    vt = vt * flip[:, None]
    projected = x @ vt.T
    total = float(np.sum(s ** 2))
    record = {"width": d, "explained_variance": float(np.sum(s[:d] ** 2) / total) if total > 0 else 0.0}
    return projected, record


def spectral_features(spectra: Spectra, max_width: int = MAX_WIDTH) -> MoleculeEmbeddings:
    """The spectra as Molecule input features (see the module docstring), one row per spectrum."""
    projected, record = reduce_spectra(binned_spectra(spectra.mz, spectra.intensities), max_width)
    record = {"source": "spectra", "file": spectra.source, "molecules_with_spectrum": len(spectra.ids),
              "binning": f"{BIN_WIDTH:g} Da bins over m/z [{MZ_RANGE[0]:g}, {MZ_RANGE[1]:g}), sqrt, L2",
              "reduction": "truncated SVD fitted on the spectra present", **record}
    return MoleculeEmbeddings(molecule_ids=list(spectra.ids), vectors=projected.astype(np.float32),
                              source=spectra.source, kind="spectrum", record=record)


def candidate_pairs(spectra: Spectra, min_matched_peaks: int, min_cosine: float = 0.0,
                    tolerance: float = COSINE_TOLERANCE) -> np.ndarray:
    """Pairs (i < j) [P, 2] that could reach ``min_matched_peaks`` and ``min_cosine`` (greedy cosine, ``tolerance``).

    Peaks that match within the tolerance fall in the same or neighbouring bins of width
    ``tolerance``. Two upper bounds of the one-to-one matching follow, each a sparse product:
    the number of peaks of one spectrum with a peak of the other in those bins (bounds the
    matched peaks), and the sum over its peaks of intensity x the other's largest intensity in
    those bins, over both norms (bounds the cosine). A pair failing either bound cannot be an
    edge, so no qualifying pair is missed.
    """
    from scipy import sparse

    width = tolerance * (1 + 1e-6)
    row = np.concatenate([np.full(len(m), i) for i, m in enumerate(spectra.mz)])
    col = np.concatenate([np.floor(np.asarray(m) / width).astype(np.int64) for m in spectra.mz]) + 1
    value = np.concatenate([np.asarray(a, np.float64) for a in spectra.intensities])
    norm = np.asarray([np.linalg.norm(a) for a in spectra.intensities])
    shape = (len(spectra.mz), int(col.max()) + 2)

    def near(values: np.ndarray) -> sparse.csr_matrix:
        """Per spectrum and bin: the largest of ``values`` in that bin and its two neighbours."""
        v = np.tile(values, 3)
        order = np.argsort(-v, kind="stable")  # largest first: np.unique keeps the first of each key
        key = (np.tile(row, 3) * shape[1] + np.concatenate([col - 1, col, col + 1]))[order]
        key, first = np.unique(key, return_index=True)
        return sparse.csr_matrix((v[order][first], (key // shape[1], key % shape[1])), shape=shape)

    counts = sparse.csr_matrix((np.ones(row.size), (row, col)), shape=shape)
    matched = (counts @ near(np.ones(row.size)).T).tocsr()
    ok = matched.minimum(matched.T) >= min_matched_peaks
    if min_cosine > 0:
        inverse_norm = sparse.diags(1.0 / np.maximum(norm, 1e-300))
        sums = sparse.csr_matrix((value, (row, col)), shape=shape)
        bound = (inverse_norm @ (sums @ near(value).T) @ inverse_norm).tocsr()
        ok = ok.multiply(bound.minimum(bound.T) >= min_cosine * (1 - 1e-9))
    ok = sparse.triu(ok, k=1).tocoo()
    pairs = np.stack([ok.row, ok.col], axis=1).astype(np.int64)
    return pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))] if len(pairs) else pairs.reshape(0, 2)


def spectral_network(spectra: Spectra, *, min_cosine: float = DEFAULT_MIN_COSINE,
                     min_matched_peaks: int = DEFAULT_MIN_MATCHED_PEAKS,
                     tolerance: float = COSINE_TOLERANCE) -> MoleculeSimilarity:
    """``is_similar_to`` edges: pairs with matchms ``CosineGreedy`` >= ``min_cosine`` and >= ``min_matched_peaks``.

    Each qualifying pair appears once (the builder adds the reverse relation); the score, clipped
    to [0, 1] against float rounding, is the edge attribute.
    """
    _matchms()
    from matchms import Spectrum
    from matchms.similarity import CosineGreedy

    pairs = candidate_pairs(spectra, min_matched_peaks, min_cosine, tolerance)
    source = (f"{spectra.source} (matchms CosineGreedy >= {min_cosine:g}, >= {min_matched_peaks} matched peaks, "
              f"tolerance {tolerance:g} Da)")
    if not len(pairs):
        return MoleculeSimilarity([], [], np.zeros(0), source=source)
    objects = [Spectrum(mz=m, intensities=a, metadata={"precursor_mz": float(p)})
               for m, a, p in zip(spectra.mz, spectra.intensities, spectra.precursor_mz)]
    with _quiet_matchms():
        scores = CosineGreedy(tolerance=tolerance).sparse_array(objects, objects, pairs[:, 0], pairs[:, 1],
                                                                 is_symmetric=True, progress_bar=False)
    ok = (scores["score"] >= min_cosine) & (scores["matches"] >= min_matched_peaks)
    pairs, score = pairs[ok], np.clip(scores["score"][ok], 0.0, 1.0)
    return MoleculeSimilarity(source_ids=[spectra.ids[i] for i in pairs[:, 0]],
                              target_ids=[spectra.ids[j] for j in pairs[:, 1]],
                              similarity=score.astype(np.float64), source=source)


def with_spectra(tables: RawTables, path: str | Path, *, network: bool = False,
                 min_cosine: float = DEFAULT_MIN_COSINE,
                 min_matched_peaks: int = DEFAULT_MIN_MATCHED_PEAKS) -> RawTables:
    """``tables`` with Molecule features (and, with ``network``, ``is_similar_to`` edges) from the MGF."""
    if tables.embeddings is not None:
        raise UserError("--spectra and --molecule-embeddings both give Molecule features; give one of them")
    if network and tables.similarity is not None:
        raise UserError("--spectra-network and --network both give is_similar_to edges; give one of them")
    if not 0.0 <= min_cosine <= 1.0:
        raise UserError(f"--min-cosine {min_cosine}: expected a number in [0, 1]")
    if min_matched_peaks < 1:
        raise UserError(f"--min-matched-peaks {min_matched_peaks}: expected an integer >= 1")
    spectra = read_spectra(path, tables.features.molecule_ids, tables.features.source)
    similarity = tables.similarity
    if network:
        similarity = spectral_network(spectra, min_cosine=min_cosine, min_matched_peaks=min_matched_peaks)
        if not len(similarity.source_ids):
            _warn(f"{spectra.source}: no pair of spectra reaches cosine {min_cosine:g} with {min_matched_peaks} "
                  "matched peaks; the graph has no is_similar_to relation")
            similarity = None
    return dataclasses.replace(tables, embeddings=spectral_features(spectra), similarity=similarity)
