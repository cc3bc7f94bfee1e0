"""Prediction for new samples, and its out-of-library flag (the scores: :mod:`jaxfood.eval.ool`).

A new sample (or many, from a GNPS feature table) is appended to the graph a model was fine-tuned
on as new ``Sample`` nodes with ``contains_molecule`` edges (and their reverse) and no label edge.
Its intensities are normalised exactly as the builder normalised training intensities
(:func:`jaxfood.data.build.grouped_zscore`: ``log1p`` then the per-molecule z-score of the
graph's ``normalisation["contains_molecule"]`` mean/std). The encoder's Sample input mode must be
inductive (``shared``: one learned vector for every sample; ``profile``: a map of the sample's own
intensities), so no per-sample parameter is needed.

Why the new samples' ``contains_molecule`` edges (Sample -> Molecule) are masked in the encoder
(they stay on in the attention pooling, and the reverse Molecule -> Sample edges carry the
molecules' messages to the new sample): with them on, every new sample would send
messages to its molecules and change their embeddings, so predictions of the training graph's
samples -- and of one new sample -- would depend on which other new samples came in the same
batch. Masked (the encoder renormalises the attention softmax over the remaining edges), the
molecule embeddings are exactly those of the training graph, the pooled standardisation uses the
training graph's samples only (``stats_mask``), and a new sample with the same molecules and
intensities as a sample of the graph gets exactly that sample's prediction (tested).

Out-of-library score (default ``mahalanobis``): the Mahalanobis distance of a sample's embedding to
the nearest food (Lee et al., NeurIPS 2018, "A simple unified framework for detecting
out-of-distribution samples and adversarial attacks"): one Gaussian per food with a shared
covariance, fitted on the training samples' Sample embeddings computed *without their label
edges* (a new sample has none, so the reference is seen the same way), Ledoit-Wolf shrinkage
because a food has only a handful of training samples. ``msp`` is ``1 - max softmax probability``
(Hendrycks & Gimpel, ICLR 2017), the earlier default. A sample is flagged when its score is above
the ``quantile`` (default 95th percentile) of the scores of the graph's labelled validation
samples, so about 5% of samples of known foods are flagged by construction.
:func:`out_of_library_rates` measures detection on foods held out entirely from training
(``benchmarks/bench_ool.py``; the figures are in ``jaxfood predict --help``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxfood.compile_cache import shared_program
from jaxfood.data.build import build_graph
from jaxfood.data.csv_input import sniff_delimiter
from jaxfood.data.readers import read_feature_table
from jaxfood.data.tables import FeatureTable
from jaxfood.errors import CheckpointError, UserError
from jaxfood.eval.ool import DEFAULT_OOL_SCORE, OOL_SCORES, score_samples, softmax
from jaxfood.graph import schema
from jaxfood.graph.hetero_graph import SPLIT_CODES, EdgeSet, HeteroGraph, molecule_details
from jaxfood.graph.splits import prepare_graph
from jaxfood.models.encoder import INDUCTIVE_MODES

DEFAULT_QUANTILE = 0.95
SAMPLE_COLUMNS = ("molecule_id", "intensity")
GNPS_ROW_ID = "row ID"


# ---- reading new samples ----------------------------------------------------------------------------
def _row_error(path, column: str, row: int, what: str) -> UserError:
    return UserError(f"{path}: column '{column}', line {row + 2}: {what}")


def read_sample_file(path: str | Path, sample_id: str | None = None) -> FeatureTable:
    """Reads ``F.csv`` of one sample (columns ``molecule_id,intensity``) or a GNPS/MZmine feature
    table of many (``row ID`` + ``<file> Peak area`` columns) into a sparse :class:`FeatureTable`
    (detected entries, intensity > 0, only). Errors are one-line :class:`UserError` naming file,
    column and line."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: sample file not found")
    if path.suffix.lower() == ".npz":
        return read_feature_table(path)

    sep = sniff_delimiter(path)
    try:
        header = pd.read_csv(path, nrows=0, sep=sep, engine="python").columns.tolist()
    except Exception as err:  # noqa: BLE001 -- any parse failure is the user's file
        raise UserError(f"{path}: not a readable CSV ({str(err).splitlines()[0] if str(err) else type(err).__name__})") from None
    header = [str(c).strip() for c in header]
    if GNPS_ROW_ID in header:
        return read_feature_table(path)
    missing = [c for c in SAMPLE_COLUMNS if c not in header]
    if missing:
        raise UserError(f"{path}: missing column '{missing[0]}' (expected columns 'molecule_id,intensity' for one "
                        f"sample, or a GNPS feature table with '{GNPS_ROW_ID}' and '<file> Peak area' columns)")
    try:
        df = pd.read_csv(path, sep=sep, dtype=str, keep_default_na=False)
    except Exception as err:  # noqa: BLE001
        raise UserError(f"{path}: not a readable CSV ({str(err).splitlines()[0]})") from None
    df.columns = [str(c).strip() for c in df.columns]
    ids = [str(x).strip() for x in df["molecule_id"].tolist()]
    seen: dict[str, int] = {}
    for i, mid in enumerate(ids):
        if not mid:
            raise _row_error(path, "molecule_id", i, "empty molecule id")
        if mid in seen:
            raise _row_error(path, "molecule_id", i, f"duplicate molecule id '{mid}' (first on line {seen[mid] + 2})")
        seen[mid] = i
    values = np.empty(len(ids), np.float64)
    for i, raw in enumerate(df["intensity"].tolist()):
        text = str(raw).strip()
        try:
            v = float(text)
        except ValueError:
            raise _row_error(path, "intensity", i, f"'{text}' is not a number (expected a peak area >= 0)") from None
        if math.isnan(v) or math.isinf(v):
            raise _row_error(path, "intensity", i, f"'{text}' is not a finite number (expected a peak area >= 0)")
        if v < 0:
            raise _row_error(path, "intensity", i, f"negative intensity {text} (expected a peak area >= 0)")
        values[i] = v
    if not ids:
        raise UserError(f"{path}: no rows (expected one 'molecule_id,intensity' row per detected molecule)")
    detected = np.nonzero(values > 0)[0]
    return FeatureTable(molecule_ids=ids, sample_ids=[sample_id or path.stem],
                        sample_index=np.zeros(detected.size, np.int64), molecule_index=detected.astype(np.int64),
                        intensity=values[detected], source=str(path))


# ---- appending new samples to the graph --------------------------------------------------------------
@dataclasses.dataclass
class MatchedSamples:
    """New samples mapped onto the graph's molecules (unknown ids dropped and counted)."""

    sample_ids: list[str]
    sample_index: np.ndarray      # [E_new] local index of the new sample
    molecule_index: np.ndarray    # [E_new] graph molecule index
    intensity: np.ndarray         # [E_new] raw peak areas
    detected: np.ndarray          # [n] detected molecules per sample (known + unknown)
    unknown: np.ndarray           # [n] detected molecules the graph does not have
    unknown_examples: list[list[str]]


def match_molecules(table: FeatureTable, graph: HeteroGraph, source: str | None = None) -> MatchedSamples:
    """Maps ``table``'s molecule ids onto ``graph``'s; a sample with no known molecule is a UserError."""
    source = source or table.source
    pos = {m: i for i, m in enumerate(graph.meta.node_ids[schema.MOLECULE])}
    col = np.asarray([pos.get(m, -1) for m in table.molecule_ids], np.int64)
    s = np.asarray(table.sample_index, np.int64)
    m = col[np.asarray(table.molecule_index, np.int64)] if s.size else np.zeros(0, np.int64)
    x = np.asarray(table.intensity, np.float64)
    n = len(table.sample_ids)
    detected = np.bincount(s, minlength=n)
    known = m >= 0
    unknown = np.bincount(s[~known], minlength=n)
    examples = [[] for _ in range(n)]
    for si, mi in zip(s[~known], np.asarray(table.molecule_index)[~known]):
        if len(examples[si]) < 3:
            examples[si].append(table.molecule_ids[mi])
    for j in range(n):
        if detected[j] == 0:
            raise UserError(f"{source}: sample '{table.sample_ids[j]}' has no detected molecule (every intensity is 0)")
        if detected[j] == unknown[j]:
            raise UserError(f"{source}: sample '{table.sample_ids[j]}': none of its {detected[j]} molecule id(s) is in "
                            f"the graph (e.g. '{examples[j][0]}'); expected ids like "
                            f"'{graph.meta.node_ids[schema.MOLECULE][0]}' (the graph's molecule ids)")
    return MatchedSamples(sample_ids=list(table.sample_ids), sample_index=s[known], molecule_index=m[known],
                          intensity=x[known], detected=detected, unknown=unknown, unknown_examples=examples)


def normalise_intensity(intensity, molecule_index, normalisation: dict[str, Any]) -> np.ndarray:
    """[E] raw peak areas -> [E] edge attribute as in training: ``(log1p(x) - mean[m]) / std[m]``."""
    stats = normalisation.get("contains_molecule") if normalisation else None
    if not stats or "mean" not in stats or "std" not in stats:
        raise CheckpointError("graph meta 'normalisation': no 'contains_molecule' mean/std (rebuild the graph with "
                              "'jaxfood build-graph')")
    if stats.get("transform", "log1p") != "log1p":
        raise CheckpointError(f"graph meta 'normalisation': unknown intensity transform '{stats.get('transform')}'")
    mean, std = np.asarray(stats["mean"], np.float64), np.asarray(stats["std"], np.float64)
    return (np.log1p(np.asarray(intensity, np.float64)) - mean[molecule_index]) / std[molecule_index]


def graph_sample_intensities(graph: HeteroGraph, index: int) -> tuple[list[str], np.ndarray]:
    """``(molecule ids, raw peak areas)`` of sample ``index`` of a built graph: its
    ``contains_molecule`` attributes with :func:`normalise_intensity` inverted, i.e. what a
    one-sample ``molecule_id,intensity`` file of that sample holds."""
    contains = graph.edges[schema.CONTAINS]
    edges = np.nonzero(np.asarray(contains.senders) == index)[0]
    mols = np.asarray(contains.receivers)[edges]
    z = np.asarray(contains.attributes, np.float64)[edges, 0]
    stats = graph.meta.normalisation["contains_molecule"]
    area = np.expm1(z * np.asarray(stats["std"])[mols] + np.asarray(stats["mean"])[mols])
    ids = graph.meta.node_ids[schema.MOLECULE]
    return [ids[m] for m in mols], area


def padded_size(k: int, least: int) -> int:
    """``k`` rounded up to a multiple of a quarter of the next power of two (a multiple of at least
    ``least``, and at least ``least``): new samples and their edges are padded to these sizes, so
    that predicting samples of other sizes reuses one compiled program (a shape never seen costs a
    compilation of ~5 s; the persistent cache keeps one per padded size), while a large table
    grows by at most a third."""
    least = max(int(least), 1)
    power = 1
    while power < k:
        power *= 2
    step = max(power // 4, least)
    return max(-(-int(k) // step) * step, least)


def extend_graph(dgraph: HeteroGraph, matched: MatchedSamples, attributes: np.ndarray):
    """Appends the new samples to ``dgraph`` (a :func:`~jaxfood.graph.splits.prepare_graph` output).

    Returns ``(graph, edge_masks, stats_mask, new_edges)``: ``edge_masks`` switches off the
    Sample -> Molecule edges of the new samples in the encoder (see the module docstring),
    ``stats_mask`` [S + n'] the old samples, ``new_edges`` [E_new] the positions of the new
    ``contains_molecule`` edges.

    Padding: the ``n`` new samples are followed by ``n' - n >= 1`` padding samples
    (:func:`padded_size`) that take the padding edges (to molecule 0, intensity 0; at least one
    each) up to a padded edge count. Like the new samples', their Sample -> Molecule edges are
    switched off, so a padding sample's messages reach no other node: the real nodes' outputs are
    those without padding, and :func:`predict_arrays` drops the padding rows.
    """
    S = int(dgraph.num_nodes[schema.SAMPLE])
    n = len(matched.sample_ids)
    n_pad = padded_size(n + 1, 2)
    rkey = schema.reverse_key(schema.CONTAINS)
    fwd, rev = dgraph.edges[schema.CONTAINS], dgraph.edges[rkey]
    old_e = int(np.asarray(fwd.senders).shape[0])
    real_e = int(matched.sample_index.shape[0])
    extra = padded_size(real_e + n_pad - n, 64) - real_e
    senders = np.concatenate([S + matched.sample_index, S + n + np.arange(extra) % (n_pad - n)]).astype(np.int32)
    receivers = np.concatenate([matched.molecule_index, np.zeros(extra)]).astype(np.int32)
    attr = np.concatenate([np.asarray(attributes, np.float32).reshape(-1), np.zeros(extra, np.float32)])[:, None]
    if np.asarray(fwd.attributes).shape[1] != attr.shape[1]:
        raise CheckpointError(f"graph relation '{schema.CONTAINS}' has {np.asarray(fwd.attributes).shape[1]} "
                              "attribute columns, expected 1 (intensity)")
    edges = dict(dgraph.edges)
    edges[schema.CONTAINS] = EdgeSet(np.concatenate([np.asarray(fwd.senders), senders]),
                                     np.concatenate([np.asarray(fwd.receivers), receivers]),
                                     np.concatenate([np.asarray(fwd.attributes), attr]))
    edges[rkey] = EdgeSet(np.concatenate([np.asarray(rev.senders), receivers]),
                          np.concatenate([np.asarray(rev.receivers), senders]),
                          np.concatenate([np.asarray(rev.attributes), attr]))
    meta = dgraph.meta
    num_nodes = dict(meta.num_nodes)
    num_nodes[schema.SAMPLE] = S + n_pad
    node_ids = dict(meta.node_ids)
    node_ids[schema.SAMPLE] = (list(node_ids.get(schema.SAMPLE, [])) + [f"new:{s}" for s in matched.sample_ids]
                               + [f"padding:{i}" for i in range(n_pad - n)])
    new_meta = dataclasses.replace(meta, num_nodes=num_nodes, node_ids=node_ids)
    node_features = dict(dgraph.node_features)
    if schema.SAMPLE in node_features:
        feats = np.asarray(node_features[schema.SAMPLE])
        node_features[schema.SAMPLE] = np.concatenate([feats, np.zeros((n_pad, feats.shape[1]), feats.dtype)])
    graph = dgraph.replace(
        edges=edges, node_features=node_features, meta=new_meta,
        sample_food=np.concatenate([np.asarray(dgraph.sample_food), np.full(n_pad, -1, np.int32)]),
        sample_split=np.concatenate([np.asarray(dgraph.sample_split), np.full(n_pad, SPLIT_CODES["test"], np.int32)]),
    )
    keep_fwd = np.concatenate([np.ones(old_e, bool), np.zeros(senders.size, bool)])
    stats_mask = np.concatenate([np.ones(S, bool), np.zeros(n_pad, bool)])
    return graph, {schema.CONTAINS: keep_fwd}, stats_mask, np.arange(old_e, old_e + real_e)


def _without_padding(outputs, num_samples: int, num_edges: int):
    """``outputs`` (a ``ModelOutputs``) with the padding rows of :func:`extend_graph` dropped: the
    first ``num_samples`` rows of every per-sample array, ``num_edges`` of every per-edge one."""
    if outputs is None:
        return None
    per_sample = {f: getattr(outputs, f)[:num_samples] for f in
                  ("food_logits", "nutrient_profile", "pooled", "wide_food_logits", "wide_nutrient_profile")
                  if getattr(outputs, f) is not None}
    per_edge = {f: getattr(outputs, f)[:num_edges] for f in ("molecule_weights", "molecule_logits")}
    embeddings = dict(outputs.embeddings, **{schema.SAMPLE: outputs.embeddings[schema.SAMPLE][:num_samples]})
    return outputs.replace(embeddings=embeddings, **per_sample, **per_edge)


def _forward_fn(model):
    """Jitted forward pass ``(params, graph, edge_masks, stats_mask) -> (outputs, attribution)``
    with the pooling on every edge; one compilation serves the prediction and the reference pass.
    ``attribution`` [E_contains]: each measured intensity's share of the predicted food's logit
    through the classifier's linear path (the headline scorer, :func:`~jaxfood.eval.molecules.wide_attribution`);
    None without the wide path."""
    import jax
    import jax.numpy as jnp

    from jaxfood.eval.molecules import wide_attribution

    @jax.jit
    def forward(params, graph, edge_masks, stats_mask):
        pool_mask = jnp.ones(graph.edges[schema.CONTAINS].senders.shape, bool)  # pooling sees every edge
        out = model.apply(params, graph, edge_masks=edge_masks, pool_mask=pool_mask, stats_mask=stats_mask)
        if not model.heads_config.wide:
            return out, None
        return out, wide_attribution(model, params, graph, jnp.argmax(out.food_logits, -1), pool_mask)

    return forward


def predict_arrays(loaded, graph: HeteroGraph, table: FeatureTable, normalisation: dict[str, Any],
                   reference: bool = False):
    """:class:`PredictArrays`: the model's outputs on the graph extended with the samples of
    ``table`` and, when ``reference``, the same pass with every training sample's label edges
    masked (the view of a training sample a new sample is compared with; else None)."""
    import jax

    if loaded.model.encoder_config.input_mode(schema.SAMPLE) not in INDUCTIVE_MODES:
        raise CheckpointError(f"the checkpoint's encoder reads Sample input mode "
                              f"'{loaded.model.encoder_config.input_mode(schema.SAMPLE)}'; predicting new samples needs "
                              "'shared' (inductive), fine-tune with encoder.input_modes.Sample=shared")
    matched = match_molecules(table, graph)
    attr = normalise_intensity(matched.intensity, matched.molecule_index, normalisation)
    dgraph = prepare_graph(graph)
    ext, edge_masks, stats_mask, new_edges = extend_graph(dgraph, matched, attr)
    # Predictions with models of the same structure (the same checkpoint again, another of the same
    # configuration) in this process share the jitted pass: traced and compiled once per shape.
    forward = shared_program("predict_forward", loaded.model, lambda: _forward_fn(loaded.model))
    params = loaded.params  # the model ignores the task-weighting entries beside its own
    ext = jax.device_put(ext)
    label_key, rev_label_key = schema.IS_INSTANCE_OF, schema.reverse_key(schema.IS_INSTANCE_OF)
    # The same mask keys in both passes (all-on here): one compilation. Masks are built in numpy:
    # every eager jax operation would be a program of its own to look up (~20 ms each).
    masks = {k: np.asarray(v) for k, v in edge_masks.items()}
    masks[label_key] = np.ones(ext.edges[label_key].senders.shape, bool)
    masks[rev_label_key] = np.ones(ext.edges[rev_label_key].senders.shape, bool)
    out, attribution = jax.device_get(forward(params, ext, masks, stats_mask))
    ref_out = None
    if reference:
        train = np.asarray(ext.sample_split) == SPLIT_CODES["train"]
        hidden = {label_key: ~train[np.asarray(ext.edges[label_key].senders)],
                  rev_label_key: ~train[np.asarray(ext.edges[rev_label_key].receivers)]}
        ref_out, _ = jax.device_get(forward(params, ext, {**masks, **hidden}, stats_mask))
    S = int(dgraph.num_nodes[schema.SAMPLE])
    num_edges = int(np.asarray(dgraph.edges[schema.CONTAINS].senders).shape[0]) + new_edges.size
    out = _without_padding(out, S + len(matched.sample_ids), num_edges)
    ref_out = _without_padding(ref_out, S + len(matched.sample_ids), num_edges)
    attribution = None if attribution is None else attribution[:num_edges]
    return PredictArrays(out, attribution, S, matched, new_edges, ref_out)


@dataclasses.dataclass
class PredictArrays:
    """What :func:`predict_arrays` computes: ``outputs`` (rows ``num_graph_samples:`` of the
    per-sample arrays are the new samples, ``new_edges`` their ``contains_molecule`` edges),
    ``attribution`` [E] (None without the wide path), ``reference_outputs`` (or None)."""

    outputs: Any
    attribution: Any
    num_graph_samples: int
    matched: Any
    new_edges: Any
    reference_outputs: Any


def predict_samples(loaded, graph: HeteroGraph, table: FeatureTable, top_k: int = 5, top_molecules: int = 10,
                    quantile: float = DEFAULT_QUANTILE, normalisation: dict[str, Any] | None = None,
                    ool_score: str = DEFAULT_OOL_SCORE) -> dict[str, Any]:
    """Predictions for the samples of ``table`` with a loaded fine-tuning checkpoint.

    Args:
      loaded: :class:`~jaxfood.train.finetune.LoadedFinetune` for ``graph``.
      graph: the graph the checkpoint was fine-tuned on (checked against its id maps by the loader).
      table: the new samples (raw peak areas), e.g. from :func:`read_sample_file`.
      normalisation: intensity / nutrient statistics (default: the checkpoint's, else the graph's).
      ool_score: out-of-library score, a key of ``OOL_SCORES`` (default Mahalanobis).

    Returns the JSON-ready dict documented in ``jaxfood predict --help``.
    """
    norm = normalisation or loaded.meta.get("normalisation") or graph.meta.normalisation
    if ool_score not in OOL_SCORES:
        raise UserError(f"--ool-score {ool_score}: expected one of {', '.join(OOL_SCORES)}")
    labels, split = np.asarray(graph.sample_food), np.asarray(graph.sample_split)
    train = np.nonzero((split == SPLIT_CODES["train"]) & (labels >= 0))[0]
    arrays = predict_arrays(loaded, graph, table, norm, reference=ool_score in ("mahalanobis", "knn"))
    out, S, matched, new_edges, ref_out = (arrays.outputs, arrays.num_graph_samples, arrays.matched,
                                           arrays.new_edges, arrays.reference_outputs)
    logits = np.asarray(out.food_logits, np.float64)
    scores = score_samples(out, ref_out, train, labels[train], ool_score)
    val = np.nonzero((split == SPLIT_CODES["val"]) & (labels >= 0))[0]
    threshold = float(np.quantile(scores[val], quantile)) if val.size else math.nan

    foods = list(graph.meta.node_ids[schema.FOOD])
    names = list(graph.meta.nutrient_names) or [str(i) for i in range(out.nutrient_profile.shape[1])]
    nstats = (norm or {}).get("has_nutrient") or {}
    n_mean = np.asarray(nstats.get("mean", np.zeros(len(names))), np.float64)
    n_std = np.asarray(nstats.get("std", np.ones(len(names))), np.float64)
    proba = softmax(logits[S:] / getattr(loaded, "temperature", 1.0))  # calibrated on val at training
    # Amounts per 100 g are never negative; the head's de-normalised output can be (z * std + mean).
    nutrients = np.maximum(np.asarray(out.nutrient_profile, np.float64)[S:] * n_std + n_mean, 0.0)
    low, high = nutrient_training_range(graph, n_mean, n_std)
    weights = np.asarray(out.molecule_weights, np.float64)[new_edges]
    # The molecules that drove the prediction: the headline attribution to the predicted food
    # where the model has the linear path, else the attention pooling's weights.
    attribution = None if arrays.attribution is None else np.asarray(arrays.attribution, np.float64)[new_edges]
    ranking = weights if attribution is None else attribution
    k = max(1, min(int(top_k), len(foods)))
    samples = []
    for j, sid in enumerate(matched.sample_ids):
        order = np.argsort(-proba[j], kind="stable")[:k]
        mine = np.nonzero(matched.sample_index == j)[0]
        top = mine[np.argsort(-ranking[mine], kind="stable")[:top_molecules]]
        score = float(scores[S + j])
        samples.append({
            "sample_id": sid,
            "molecules_detected": int(matched.detected[j]),
            "molecules_known": int(matched.detected[j] - matched.unknown[j]),
            "molecules_unknown": int(matched.unknown[j]),
            "unknown_examples": matched.unknown_examples[j],
            "top_foods": [{"food": foods[f], "probability": float(proba[j, f])} for f in order],
            "nutrients_per_100g": {name: float(v) for name, v in zip(names, nutrients[j])},
            "nutrients_outside_training_range": [
                name for name, v, lo, hi in zip(names, nutrients[j], low, high) if not lo - 1e-9 <= v <= hi + 1e-9],
            "top_molecules": [{**molecule_details(graph, int(matched.molecule_index[e])),
                               "attribution": None if attribution is None else float(attribution[e]),
                               "weight": float(weights[e]), "intensity": float(matched.intensity[e])} for e in top],
            "out_of_library_score": score,
            "out_of_library": bool(score > threshold) if math.isfinite(threshold) else None,
        })
    return {
        "source": table.source,
        "num_samples": len(samples),
        "molecule_ranking": "attention" if attribution is None else "intensity_attribution",
        "out_of_library": {"score": OOL_SCORES[ool_score], "method": ool_score, "threshold": threshold,
                           "quantile": quantile,
                           "calibration": f"quantile {quantile} of the scores of {val.size} validation samples"},
        "nutrient_training_range": {name: [float(lo), float(hi)] for name, lo, hi in zip(names, low, high)},
        "samples": samples,
    }


def nutrient_training_range(graph: HeteroGraph, n_mean, n_std) -> tuple[np.ndarray, np.ndarray]:
    """``([N], [N])``: the lowest and highest amount per 100 g of each nutrient among the foods that
    have training samples; an estimate outside is an extrapolation the model was never shown."""
    labels, split = np.asarray(graph.sample_food), np.asarray(graph.sample_split)
    foods = np.unique(labels[(split == SPLIT_CODES["train"]) & (labels >= 0)])
    profiles = np.asarray(graph.food_nutrients, np.float64)
    if foods.size == 0 or profiles.ndim != 2 or profiles.shape[1] != len(n_mean) or not len(n_mean):
        return np.full(len(n_mean), -np.inf), np.full(len(n_mean), np.inf)  # nothing to compare with
    amounts = profiles[foods] * n_std + n_mean
    return np.maximum(amounts.min(0), 0.0), amounts.max(0)


# ---- out-of-library detection on foods held out from training ------------------------------------------
def subset_samples(ft: FeatureTable, cols) -> FeatureTable:
    """The samples ``cols`` (indices into ``ft.sample_ids``, in that order) of a feature table."""
    cols = np.asarray(cols, np.int64)
    new_pos = np.full(len(ft.sample_ids), -1, np.int64)
    new_pos[cols] = np.arange(cols.size)
    s_new = new_pos[np.asarray(ft.sample_index, np.int64)]
    keep = s_new >= 0
    order = np.argsort(s_new[keep], kind="stable")
    return dataclasses.replace(ft, sample_ids=[ft.sample_ids[c] for c in cols], sample_index=s_new[keep][order],
                               molecule_index=np.asarray(ft.molecule_index)[keep][order],
                               intensity=np.asarray(ft.intensity)[keep][order])


def split_tables_by_food(tables, held_out: Sequence[str]):
    """``(tables without the samples of held_out foods, FeatureTable of those samples)``."""
    held = set(held_out)
    md = tables.metadata
    return split_tables(tables, [s for s, f in zip(md.sample_ids, md.food_labels) if f in held])


def split_tables(tables, samples: Sequence[str]):
    """``(tables without ``samples``, FeatureTable of those samples)``."""
    ft, md = tables.features, tables.metadata
    out = set(samples)
    out_cols = np.asarray([s in out for s in ft.sample_ids], bool)
    kept = np.nonzero(~out_cols)[0]
    keep_md = [i for i, s in enumerate(md.sample_ids) if s not in out]
    meta = dataclasses.replace(md, sample_ids=[md.sample_ids[i] for i in keep_md],
                               food_labels=[md.food_labels[i] for i in keep_md],
                               hierarchy={k: [v[i] for i in keep_md] for k, v in md.hierarchy.items()},
                               ndb_number=None if md.ndb_number is None else [md.ndb_number[i] for i in keep_md])
    return (dataclasses.replace(tables, features=subset_samples(ft, kept), metadata=meta),
            subset_samples(ft, np.nonzero(out_cols)[0]))


def known_food_holdout(tables, fraction: float = 0.15, seed: int = 0) -> list[str]:
    """Sample ids to keep out of the graph: ``fraction`` of each food's samples (at least one,
    random with ``seed``) where the food keeps at least two samples in the graph."""
    md = tables.metadata
    present = set(tables.features.sample_ids)
    by_food: dict[str, list[str]] = {}
    for s, f in zip(md.sample_ids, md.food_labels):
        if f and s in present:
            by_food.setdefault(f, []).append(s)
    rng = np.random.default_rng([int(seed), 1])  # a stream apart from the choice of held-out foods
    out: list[str] = []
    for food in sorted(by_food):
        ids = sorted(by_food[food])
        n = max(1, int(round(fraction * len(ids))))
        if len(ids) - n >= 2:
            out += sorted(rng.choice(ids, size=n, replace=False).tolist())
    return out


def out_of_library_rates(tables, fit, num_held_out: int = 5, seed: int = 0,
                         quantile: float = DEFAULT_QUANTILE, held_out: Sequence[str] | None = None,
                         known_fraction: float = 0.15) -> dict[str, Any]:
    """Detection and false-alarm rates of the out-of-library flag.

    ``num_held_out`` foods (random with ``seed``, or ``held_out``) lose all their samples, and every
    other food ``known_fraction`` of its samples (:func:`known_food_holdout`); the graph is built
    from the rest (:func:`jaxfood.data.build.build_graph`) and fine-tuned by ``fit(graph) -> loaded``
    (``.model``, ``.params``, ``.meta``; :func:`jaxfood.workflows.out_of_library_rates` fine-tunes
    with a config). Both groups of left-out samples -- unknown foods, and known foods' samples the
    model never saw (not even transductively, as the graph's own test samples are) -- are predicted
    as new samples. Detection rate: fraction of unknown-food samples flagged; false-alarm rate:
    fraction of known-food samples flagged (threshold: ``quantile`` of the validation scores).
    Also returns the AUROC of the score separating the two groups.
    """
    import warnings

    from sklearn.metrics import roc_auc_score

    foods = sorted(set(tables.metadata.food_labels) - {""})
    if held_out is None:
        rng = np.random.default_rng(seed)
        held_out = sorted(rng.choice(foods, size=min(num_held_out, len(foods) - 2), replace=False).tolist())
    train_tables, unknown = split_tables_by_food(tables, held_out)
    known_ids = known_food_holdout(train_tables, known_fraction, seed)
    train_tables, known = split_tables(train_tables, known_ids)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = build_graph(train_tables, seed=seed)
    loaded = fit(graph)

    label = dict(zip(tables.metadata.sample_ids, tables.metadata.food_labels))
    food_index = {f: i for i, f in enumerate(graph.meta.node_ids[schema.FOOD])}
    known_labels = np.asarray([food_index[label[s]] for s in known.sample_ids])
    norm = loaded.meta.get("normalisation") or graph.meta.normalisation
    split, labels = np.asarray(graph.sample_split), np.asarray(graph.sample_food)
    train = np.nonzero((split == SPLIT_CODES["train"]) & (labels >= 0))[0]
    val = np.nonzero((split == SPLIT_CODES["val"]) & (labels >= 0))[0]
    groups: dict[str, dict[str, np.ndarray]] = {}
    for name, ft_new in (("unknown", unknown), ("known", known)):
        arrays = predict_arrays(loaded, graph, ft_new, norm, reference=True)
        out, S, ref_out = arrays.outputs, arrays.num_graph_samples, arrays.reference_outputs
        all_scores = {key: score_samples(out, ref_out, train, labels[train], key) for key in OOL_SCORES}
        groups[name] = {k: v[S:] for k, v in all_scores.items()}
        groups["val"] = {k: v[val] for k, v in all_scores.items()}  # identical in both passes
        if name == "known":
            pred_known_top = np.argmax(np.asarray(out.food_logits)[S:], 1)
    per_score = {}
    for key in OOL_SCORES:
        su, sk, sv = groups["unknown"][key], groups["known"][key], groups["val"][key]
        threshold = float(np.quantile(sv, quantile))
        y = np.concatenate([np.ones(su.size), np.zeros(sk.size)])
        per_score[key] = {
            "threshold": threshold,
            "detection_rate": float(np.mean(su > threshold)),
            "false_alarm_rate": float(np.mean(sk > threshold)),
            "auroc": float(roc_auc_score(y, np.concatenate([su, sk]))) if su.size and sk.size else math.nan,
            "mean_score_unknown": float(su.mean()),
            "mean_score_known": float(sk.mean()),
        }
    return {
        "held_out_foods": list(held_out),
        "num_unknown_samples": int(groups["unknown"][DEFAULT_OOL_SCORE].size),
        "num_known_samples": int(groups["known"][DEFAULT_OOL_SCORE].size),
        **per_score[DEFAULT_OOL_SCORE],
        "score": OOL_SCORES[DEFAULT_OOL_SCORE],
        "method": DEFAULT_OOL_SCORE,
        "quantile": quantile,
        "known_samples": list(known.sample_ids),
        "known_test_accuracy": float(np.mean(pred_known_top == known_labels)),
        "alternative_scores": {k: v for k, v in per_score.items() if k != DEFAULT_OOL_SCORE},
    }
