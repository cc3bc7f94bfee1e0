"""Defaults that follow the graph: one function adapts a run's configuration to what a graph has.

A lab's graph may lack parts of the schema: no ``Nutrient`` nodes (no nutrient table), no
``Molecule`` input features (no spectra or embeddings), no molecular network. The defaults assume
the embedded graph, which has all of them; :func:`adapt_to_graph` changes exactly the settings that
cannot work on the given graph and says what it changed:

* ``encoder.input_modes``: ``features`` / ``both`` for a node type without input features ->
  ``embedding`` (a learned vector per node id);
* ``augment``: feature masking of a type without features, node dropping of an absent type and
  edge augmentations of an absent relation are removed; a molecular network
  (``is_similar_to``) gets the edge dropping ``contains_molecule`` has, unless the config names it;
* pretraining ``loss_weights`` of absent node types are removed;
* without nutrients the nutrition task is off: its static task weight, the triplet and nutrient
  MSE weights are 0 and ``selection`` keeps only metrics of the other tasks.

Settings that work on the graph are never touched, so a user's explicit choice survives unless
the graph makes it impossible (then the note names it).
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

from jaxfood.errors import ConfigError
from jaxfood.graph import schema
from jaxfood.graph.hetero_graph import HeteroGraph, absent_parts
from jaxfood.models.encoder import EncoderConfig
from jaxfood.train import multitask as mt
from jaxfood.train import task_weighting as tw
from jaxfood.train.augment import AugmentConfig, relation_key

T = TypeVar("T")

NUTRITION = "nutrition"


def has_nutrients(graph: HeteroGraph) -> bool:
    """Whether the graph has a nutrient table behind it (``Nutrient`` nodes, ``food_nutrients`` [F, N>0])."""
    return schema.NUTRIENT not in absent_parts(graph)


class _Notes:
    """Collects ``key: old -> new (why)`` once per change, with the config sections it applied to."""

    def __init__(self) -> None:
        self.changes: dict[tuple[str, str], list[str]] = {}

    def add(self, section: str, key: str, change: str, why: str) -> None:
        self.changes.setdefault((f"{key}: {change}", why), []).append(section.rstrip("."))

    def lines(self) -> list[str]:
        out = []
        for (what, why), sections in self.changes.items():
            where = [s for s in sections if s]
            out.append(f"{what} ({why})" + (f" [{', '.join(where)}]" if where else ""))
        return out


def _encoder(cfg: EncoderConfig, graph: HeteroGraph, section: str, notes: _Notes) -> EncoderConfig:
    modes = dict(cfg.input_modes)
    for t in graph.node_types:
        mode = cfg.input_mode(t)
        if mode in ("features", "both") and t not in graph.node_features:
            modes[t] = "embedding"
            notes.add(section, f"input_modes.{t}", f"{mode!r} -> 'embedding'", f"the graph has no {t} input features")
    return cfg if modes == cfg.input_modes else dataclasses.replace(cfg, input_modes=modes)


def _augment(cfg: AugmentConfig, graph: HeteroGraph, section: str, notes: _Notes) -> AugmentConfig:
    changes: dict[str, Any] = {}
    for field in ("node_drop", "feature_mask"):
        rates = dict(getattr(cfg, field))
        for t, rate in getattr(cfg, field).items():
            if rate <= 0:
                continue
            if t in schema.NODE_TYPES and t not in graph.num_nodes:
                why = f"the graph has no {t} nodes"
            elif field == "feature_mask" and t not in graph.node_features:
                why = f"the graph has no {t} input features"
            else:
                continue
            del rates[t]
            notes.add(section, f"{field}.{t}", f"{rate} -> off", why)
        if rates != getattr(cfg, field):
            changes[field] = rates
    for field in ("edge_drop", "edge_add", "edge_attr_mask"):
        rates = dict(getattr(cfg, field))
        for name, rate in getattr(cfg, field).items():
            if not _known(name):  # an unknown name stays: the config check names it
                continue
            key = relation_key(name)
            if rate > 0 and key not in graph.edges:
                del rates[name]
                notes.add(section, f"{field}.{name}", f"{rate} -> off", f"the graph has no relation '{key}'")
        if rates != getattr(cfg, field):
            changes[field] = rates
    similar = schema.split_key(schema.IS_SIMILAR_TO)[1]
    named = {relation_key(n) for n in cfg.edge_drop if _known(n)}
    if schema.IS_SIMILAR_TO in graph.edges and schema.IS_SIMILAR_TO not in named:
        rate = float(cfg.edge_drop.get("contains_molecule", 0.0))
        if rate > 0:
            changes["edge_drop"] = {**changes.get("edge_drop", cfg.edge_drop), similar: rate}
            notes.add(section, f"edge_drop.{similar}", f"off -> {rate}", "the graph has a molecular network")
    return dataclasses.replace(cfg, **changes) if changes else cfg


def _known(name: str) -> bool:
    try:
        relation_key(name)
    except ConfigError:
        return False
    return True


def _nutrition_off(cfg: Any, section: str, notes: _Notes) -> Any:
    """Switches the nutrition task off in a fine-tuning config (fields ``loss``, ``weighting``, ``selection``)."""
    why = "the graph has no nutrient table"
    changes: dict[str, Any] = {}
    loss = getattr(cfg, "loss", None)
    if isinstance(loss, mt.LossConfig) and (loss.triplet_weight or loss.nutrient_mse_weight):
        changes["loss"] = dataclasses.replace(loss, triplet_weight=0.0, nutrient_mse_weight=0.0)
        notes.add(section, "loss.triplet_weight, loss.nutrient_mse_weight", "-> 0", why)
    weighting = getattr(cfg, "weighting", None)
    if isinstance(weighting, tw.WeightingConfig) and weighting.static_weights.get(NUTRITION, 1.0) != 0:
        changes["weighting"] = dataclasses.replace(
            weighting, static_weights={**weighting.static_weights, NUTRITION: 0.0})
        notes.add(section, f"weighting.static_weights.{NUTRITION}", "-> 0", why)
    selection = getattr(cfg, "selection", None)
    if isinstance(selection, dict):
        kept = {k: v for k, v in selection.items() if not k.startswith(f"{NUTRITION}.")}
        if kept != selection:
            changes["selection"] = kept or {"food_classification.accuracy": 1.0}
            notes.add(section, "selection", f"{sorted(selection)} -> {sorted(changes['selection'])}", why)
    return dataclasses.replace(cfg, **changes) if changes else cfg


def _adapt(cfg: Any, graph: HeteroGraph, section: str, notes: _Notes) -> Any:
    if isinstance(cfg, EncoderConfig):
        return _encoder(cfg, graph, section, notes)
    if isinstance(cfg, AugmentConfig):
        return _augment(cfg, graph, section, notes)
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
        return cfg
    changes = {}
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            new = _adapt(value, graph, f"{section}{field.name}.", notes)
            if new is not value:
                changes[field.name] = new
    cfg = dataclasses.replace(cfg, **changes) if changes else cfg
    weights = getattr(cfg, "loss_weights", None)  # GraphCL: node type -> weight of its contrastive loss
    if isinstance(weights, dict):
        kept = {t: w for t, w in weights.items() if t not in schema.NODE_TYPES or t in graph.num_nodes}
        for t in set(weights) - set(kept):
            notes.add(section, f"loss_weights.{t}", f"{weights[t]} -> off", f"the graph has no {t} nodes")
        if kept != weights:
            cfg = dataclasses.replace(cfg, loss_weights=kept)
    if not has_nutrients(graph) and hasattr(cfg, "selection") and hasattr(cfg, "weighting"):
        cfg = _nutrition_off(cfg, section, notes)
    return cfg


def adapt_to_graph(cfg: T, graph: HeteroGraph) -> tuple[T, list[str]]:
    """``cfg`` (a pretraining, fine-tuning or whole-run config, any dataclass holding them) with
    the settings that cannot work on ``graph`` changed, and one note per change.

    Notes read ``key: old -> new (why) [sections]``; an empty list means nothing changed.
    """
    notes = _Notes()
    return _adapt(cfg, graph, "", notes), notes.lines()


def describe(notes: list[str]) -> str:
    """The one message a run prints about what it adapted ('' when nothing)."""
    return ("defaults adapted to the graph: " + "; ".join(notes)) if notes else ""


def adapt_and_report(cfg: T, graph: HeteroGraph, log=None) -> T:
    """:func:`adapt_to_graph`, saying once what changed through ``log`` (default: stderr)."""
    import sys

    cfg, notes = adapt_to_graph(cfg, graph)
    if notes:
        (log or (lambda msg: print(msg, file=sys.stderr)))(describe(notes))
    return cfg
