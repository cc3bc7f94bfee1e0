"""The evaluation that ``run_mtl.py`` reports: the model, its ablations and the baselines.

Everything is computed on the same graph and split: the fine-tuned model's metrics come from
:mod:`jaxfood.train.finetune`; the baselines (:mod:`jaxfood.eval.baselines`) are fitted on the
training samples and scored on the test split, from raw peak areas recovered from the graph's
normalised intensities (the graph keeps the per-molecule statistics, so this is exact).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from jaxfood.graph import schema
from jaxfood.graph.hetero_graph import HeteroGraph

#: The sections of metrics.json that the model, the probe and the from-scratch run share.
SECTIONS = ("food_classification", "nutrition", "salient_molecules")


def raw_peak_areas(graph: HeteroGraph) -> np.ndarray:
    """``[S, M]`` peak areas, undoing the builder's ``log1p`` + per-molecule z-score.

    Compatibility-mode graphs (no ``log1p``) and graphs without stored statistics return the
    edge attribute as is (absent pairs 0).
    """
    edges = graph.edges[schema.CONTAINS]
    senders, receivers = np.asarray(edges.senders), np.asarray(edges.receivers)
    z = np.asarray(edges.attributes[:, 0], np.float64)
    stats = graph.meta.normalisation.get("contains_molecule", {})
    if stats.get("transform") == "log1p" and "mean" in stats:
        mean, std = np.asarray(stats["mean"]), np.asarray(stats["std"])
        values = np.expm1(z * std[receivers] + mean[receivers])
    else:
        values = z - z.min() + 1.0 if z.size else z
    matrix = np.zeros((graph.num_nodes[schema.SAMPLE], graph.num_nodes[schema.MOLECULE]))
    np.add.at(matrix, (senders, receivers), values)
    return matrix


def run_baselines(graph: HeteroGraph, reference: Mapping[str, set[str]] | None, *, k: int = 10, seed: int = 0,
                  rf_estimators: int = 200) -> dict[str, float]:
    """``metrics.json["baselines"]`` for ``graph``'s test split."""
    from jaxfood.eval.baselines import baseline_metrics, preprocess_intensities
    from jaxfood.eval.metrics import samples_digest
    from jaxfood.graph.hetero_graph import SPLIT_CODES

    features = preprocess_intensities(raw_peak_areas(graph))
    food, split = np.asarray(graph.sample_food), np.asarray(graph.sample_split)
    out = baseline_metrics(
        features, food, split, np.asarray(graph.food_nutrients),
        graph.meta.node_ids[schema.MOLECULE], graph.meta.node_ids[schema.FOOD], reference,
        k=k, seed=seed, rf_estimators=rf_estimators, test_split=SPLIT_CODES["test"],
    )
    tested = np.nonzero((split == SPLIT_CODES["test"]) & (food >= 0))[0]
    out["samples_digest"] = samples_digest(graph.meta.node_ids[schema.SAMPLE][i] for i in tested)
    return out


def headline(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The shared sections of a run's metrics, without per-nutrient/per-scorer detail."""
    out: dict[str, Any] = {}
    for section in SECTIONS:
        if section in metrics:
            out[section] = {k: v for k, v in metrics[section].items() if not isinstance(v, (dict, list))}
    return out


def mean_and_std(runs: list[Mapping[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Element-wise mean and standard deviation of nested dicts of numbers (other leaves: first run)."""

    def combine(values: list[Any]) -> tuple[Any, Any]:
        first = values[0]
        if isinstance(first, Mapping):
            keys = [k for k in first if all(isinstance(v, Mapping) and k in v for v in values)]
            pairs = {k: combine([v[k] for v in values]) for k in keys}
            return {k: p[0] for k, p in pairs.items()}, {k: p[1] for k, p in pairs.items()}
        if isinstance(first, (int, float)) and not isinstance(first, bool):
            arr = np.asarray(values, np.float64)
            finite = arr[np.isfinite(arr)]
            if finite.size == 0:
                return math.nan, math.nan
            return float(finite.mean()), float(finite.std(ddof=1)) if finite.size > 1 else 0.0
        return first, None

    mean, std = combine(list(runs))
    return mean, _prune(std)


def _prune(tree: Any) -> Any:
    if isinstance(tree, Mapping):
        pruned = {k: _prune(v) for k, v in tree.items()}
        return {k: v for k, v in pruned.items() if v is not None and v != {}}
    return tree


# ---- salient-molecule stability -------------------------------------------------------------------
def seed_stability(rankings_per_seed: Sequence[Mapping[str, Sequence[str]]], k: int = 10) -> float:
    """Mean pairwise Jaccard overlap of the top-``k`` molecule lists of each food across seeds.

    ``rankings_per_seed[i]`` is ``{food: [molecule ids, best first]}`` of seed ``i``; for every pair
    of seeds the per-food Jaccard of the top-``k`` sets is averaged over the foods both rank, then
    over the pairs (:func:`jaxfood.eval.metrics.stability_jaccard`). 1.0 = the same top-k every
    time; NaN for fewer than two seeds.
    """
    from jaxfood.eval.metrics import stability_jaccard

    runs = list(rankings_per_seed)
    return stability_jaccard(runs, k) if len(runs) >= 2 else math.nan


def food_rankings(source: Any, graph: HeteroGraph, k: int = 10, scorer: str | None = None) -> dict[str, list[str]]:
    """``{food id: [top-k molecule ids]}`` of a fine-tuned model (``FinetuneResult`` or checkpoint
    checkpoint loaded by ``load_finetuned``) by ``scorer`` (default: its headline scorer), ranked as the metrics rank them
    (:func:`jaxfood.eval.molecules.rank_molecules_per_food`). One per seed feeds
    :func:`seed_stability`."""
    return next(iter(scorer_rankings(source, graph, k, None if scorer is None else (scorer,)).values()))


def scorer_rankings(source: Any, graph: HeteroGraph, k: int = 10,
                    scorers: Sequence[str] | None = None) -> dict[str, dict[str, list[str]]]:
    """``{scorer: {food id: [top-k molecule ids]}}`` for several scorers (default: the model's
    headline scorer), with the graph prepared and the model loaded once."""
    from jaxfood.eval import molecules as mol
    from jaxfood.eval.evaluator import molecule_scores
    from jaxfood.graph.splits import prepare_graph

    dgraph = prepare_graph(graph)
    model, params, default_scorer = _fine_tuned_model(source, dgraph)
    out = {}
    for name, scores in molecule_scores(model, params, dgraph, scorers or (default_scorer,), default_scorer).items():
        ranking, _ = mol.rank_molecules_per_food(np.asarray(scores), dgraph)
        out[name] = mol.rankings_by_id(ranking, dgraph, k)
    return out


def rankings_with_details(rankings: Mapping[str, Mapping[str, Sequence[str]]],
                          graph: HeteroGraph) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """``rankings.json``: :func:`scorer_rankings` with each molecule id replaced by its record
    ``{"molecule_id", "mz", "rt", "annotation"}`` (:func:`~jaxfood.graph.hetero_graph.molecule_details`)."""
    from jaxfood.graph.hetero_graph import molecule_details

    pos = {m: i for i, m in enumerate(graph.meta.node_ids[schema.MOLECULE])}
    return {scorer: {food: [molecule_details(graph, pos[m]) for m in ids] for food, ids in per_food.items()}
            for scorer, per_food in rankings.items()}


# ---- figures and extra sections of report.md --------------------------------------------------------
class ReportAssets(NamedTuple):
    """What :func:`report_assets` adds to ``report.md``.

    ``figures``: caption -> PNG path (for :func:`jaxfood.eval.report.render_report`);
    ``sections``: ``(title, markdown)`` pairs (its ``extra_sections``). The stability of the
    rankings under input perturbations is a metric of the fine-tuning evaluation
    (:meth:`jaxfood.eval.evaluator.Evaluator.stability_jaccard`), not computed here.
    """

    figures: dict[str, Path]
    sections: list[tuple[str, str]]


def food_category_names(graph: HeteroGraph) -> list[str]:
    """``[F]`` USDA category name of each food ('unknown' where the graph has none)."""
    names = list(graph.meta.food_categories)
    return [names[c] if 0 <= c < len(names) else "unknown" for c in np.asarray(graph.food_category).tolist()]


def choose_nutrient(graph: HeteroGraph, nutrient: str | None = None) -> int:
    """Index of the nutrient the second embedding map is coloured by.

    ``nutrient`` (an exact name, or the start of one, e.g. 'Protein') if given; else 'Protein' if
    the graph has it; else the nutrient whose (normalised) values vary most across foods.
    A name the graph lacks is a ValueError naming the available ones.
    """
    names = [str(n) for n in graph.meta.nutrient_names]
    wanted = nutrient if nutrient is not None else "Protein"
    for candidates in ([i for i, n in enumerate(names) if n == wanted],
                       [i for i, n in enumerate(names) if n.lower().startswith(wanted.lower())]):
        if candidates:
            return candidates[0]
    if nutrient is not None:
        raise ValueError(f"nutrient '{nutrient}' is not in the graph (has: {', '.join(names[:8])}"
                         f"{', ...' if len(names) > 8 else ''})")
    return int(np.argmax(np.var(np.asarray(graph.food_nutrients, np.float64), axis=0)))


def nutrient_values(graph: HeteroGraph, index: int) -> np.ndarray:
    """``[F]`` amounts of nutrient ``index`` in the graph's units (z-score undone when the graph
    keeps the statistics); NaN for foods without a ``has_nutrient`` edge for it (mean-imputed)."""
    values = np.asarray(graph.food_nutrients, np.float64)[:, index].copy()
    stats = graph.meta.normalisation.get("has_nutrient", {})
    if "mean" in stats and "std" in stats:
        values = values * float(np.asarray(stats["std"])[index]) + float(np.asarray(stats["mean"])[index])
    if schema.HAS_NUTRIENT in graph.edges:
        edges = graph.edges[schema.HAS_NUTRIENT]
        present = np.zeros(values.shape[0], bool)
        present[np.asarray(edges.senders)[np.asarray(edges.receivers) == index]] = True
        values[~present] = np.nan
    return values


def representative_foods(graph: HeteroGraph, reference: Mapping[str, set[str]] | None = None,
                         max_foods: int = 12) -> list[str]:
    """A readable subset of food ids: one per category in turn (foods with reference biomarkers
    first, then by name), round-robin over categories until ``max_foods``; ordered by category."""
    foods = list(graph.meta.node_ids[schema.FOOD])
    cats = food_category_names(graph)
    by_cat: dict[str, list[str]] = {}
    for food, cat in sorted(zip(foods, cats), key=lambda fc: (fc[1], not (reference and reference.get(fc[0])),
                                                               fc[0])):
        by_cat.setdefault(cat, []).append(food)
    chosen: list[str] = []
    depth = 0
    while len(chosen) < min(max_foods, len(foods)):
        for cat in sorted(by_cat):
            if depth < len(by_cat[cat]) and len(chosen) < max_foods:
                chosen.append(by_cat[cat][depth])
        depth += 1
    cat_of = dict(zip(foods, cats))
    return sorted(chosen, key=lambda f: (cat_of[f], f))


def per_class_markdown(y_true: np.ndarray, y_pred: np.ndarray, graph: HeteroGraph) -> str:
    """Per-food precision / recall / F1 / support (sklearn ``precision_recall_fscore_support``) on
    the given samples, foods grouped by category; foods the model never gets right are named."""
    from jaxfood.eval.metrics import per_class_table

    foods = list(graph.meta.node_ids[schema.FOOD])
    cats = food_category_names(graph)
    rows = per_class_table(y_true, y_pred, foods)
    order = sorted(range(len(foods)), key=lambda i: (cats[i], foods[i]))
    lines = ["| Food | Category | Precision | Recall | F1 | Support |", "|---|---|---|---|---|---|"]
    for i in order:
        r = rows[i]
        if r["support"] == 0 and r["precision"] == 0:
            continue  # neither in the split nor predicted: nothing to say
        lines.append(f"| {r['class']} | {cats[i]} | {r['precision']:.2f} | {r['recall']:.2f} | {r['f1']:.2f} | "
                     f"{r['support']} |")
    scored = [r for r in rows if r["support"] > 0]
    missed = sorted(r["class"] for r in scored if r["f1"] == 0)
    macro = float(np.mean([r["f1"] for r in scored])) if scored else math.nan
    summary = [f"Macro F1 over the {len(scored)} foods with test samples: **{macro:.3f}**."]
    if missed:
        summary.append(f"The model gets none of the test samples of {len(missed)} food(s) right: "
                       f"{', '.join(missed)}.")
    return "\n".join(summary) + "\n\n" + "\n".join(lines)


def biomarker_markdown(rankings: Mapping[str, Sequence[str]], foods: Sequence[str],
                       reference: Mapping[str, set[str]] | None, k: int,
                       baseline: Mapping[str, Sequence[str]] | None = None,
                       labels: Mapping[str, str] | None = None) -> str:
    """Table of the top-``k`` molecules of a few ``foods``; reference biomarkers in bold, hits counted,
    beside the fold-change + PLS-DA VIP ranking's hits when ``baseline`` is given. ``labels``: id ->
    the text shown (m/z, RT, annotation; :func:`~jaxfood.graph.hetero_graph.molecule_label`)."""
    labels = labels or {}
    ref = reference or {}
    header = f"| Food | jaxfood top-{k} (**reference biomarker**) | hits |"
    sep = "|---|---|---|"
    if baseline is not None:
        header += f" fold change + VIP hits in top-{k} |"
        sep += "---|"
    lines = [header, sep]
    for food in foods:
        top = list(rankings.get(food, []))[:k]
        markers = set(ref.get(food, ()))
        cells = ", ".join(f"**{labels.get(m, m)}**" if m in markers else labels.get(m, m) for m in top)
        hits = f"{sum(m in markers for m in top)}/{len(markers)}" if food in ref else "–"
        row = f"| {food} | {cells} | {hits} |"
        if baseline is not None:
            base = list(baseline.get(food, []))[:k]
            row += f" {sum(m in markers for m in base)}/{len(markers)} |" if food in ref else " – |"
        lines.append(row)
    note = ("Reference: the biomarkers given to the run (the simulator's ground truth on the embedded data); "
            "hits = reference biomarkers among the top-k / reference biomarkers of the food.")
    return note + "\n\n" + "\n".join(lines)


def model_vs_baselines(metrics: Mapping[str, Any]) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """``(results, errors)`` for :func:`jaxfood.eval.figures.plot_model_vs_baselines` from a run's
    metrics: the model, its ablations and every baseline on the metrics they share."""

    def get(*path: str) -> float:
        node: Any = metrics
        for key in path:
            if not isinstance(node, Mapping) or key not in node:
                return math.nan
            node = node[key]
        return float(node) if isinstance(node, (int, float)) else math.nan

    shared = {"accuracy": ("food_classification", "accuracy"), "weighted F1": ("food_classification", "weighted_f1"),
              "nutrient R²": ("nutrition", "nutrient_r2"), "precision@10": ("salient_molecules", "precision_at_10")}
    results: dict[str, dict[str, float]] = {
        "jaxfood": {m: get(*p) for m, p in shared.items()},
        "pretrained + probe": {m: get("pretrained_probe", *p) for m, p in shared.items()},
        "from scratch": {m: get("from_scratch", *p) for m, p in shared.items()},
        "untrained": {m: get("untrained", *p) for m, p in shared.items()},
        "logistic regression": {"accuracy": get("baselines", "logreg_accuracy"),
                                "weighted F1": get("baselines", "logreg_weighted_f1")},
        "random forest": {"accuracy": get("baselines", "rf_accuracy"),
                          "weighted F1": get("baselines", "rf_weighted_f1")},
        "ridge regression": {"nutrient R²": get("baselines", "ridge_nutrient_r2")},
        "fold change + VIP": {"precision@10": get("baselines", "fold_change_precision_at_10")},
        "random ranking": {"precision@10": get("baselines", "random_precision_at_10")},
    }
    results = {name: {m: v for m, v in row.items() if math.isfinite(v)} for name, row in results.items()}
    results = {name: row for name, row in results.items() if row}
    errors = {"jaxfood": {m: get("seed_std", *p) for m, p in shared.items()}}
    return results, errors


def _fine_tuned_model(source: Any, dgraph: HeteroGraph) -> tuple[Any, Any, str]:
    """``(model, params, headline scorer)`` of a ``FinetuneResult`` (no restore: its params are the
    kept checkpoint's) or of a loaded checkpoint (``jaxfood.train.finetune.load_finetuned``)."""
    import jax

    from jaxfood.models.heads import make_multitask_model

    if hasattr(source, "model"):
        return source.model, source.params, source.config.salient_scorer
    if hasattr(source, "params") and hasattr(source, "encoder_config"):
        model = make_multitask_model(dgraph, source.encoder_config, source.config.heads)
        return model, jax.device_put(source.params), source.config.salient_scorer
    raise TypeError(f"expected a FinetuneResult or a loaded fine-tuning checkpoint, got {type(source).__name__}")


def report_assets(source: Any, graph: HeteroGraph, workdir: str | Path,
                  metrics: Mapping[str, Any] | None = None, reference: Mapping[str, set[str]] | None = None, *,
                  scorer: str | None = None, k: int = 10, nutrient: str | None = None, max_foods: int = 12,
                  biomarker_foods: int = 6,
                  fold_change: bool = True) -> ReportAssets:
    """Figures and extra sections of ``report.md`` for a fine-tuned checkpoint, written to ``W/figures/``.

    Args:
      source: what :func:`jaxfood.train.finetune.finetune` returned (``FinetuneResult``), or a
        loaded fine-tuning checkpoint (``jaxfood.train.finetune.load_finetuned``), for ``graph``.
      graph: the graph it was fine-tuned on (test split = the samples scored).
      workdir: the run directory; PNGs go to ``workdir/figures/``.
      metrics: the run's metrics (model, ablations, ``baselines``) for the model-vs-baselines chart.
      reference: ``{food: {molecule ids}}`` reference biomarkers (marked in the figures/tables).
      scorer: salient-molecule scorer (default: the checkpoint's headline scorer); ``k``: top-k.
      nutrient: colour of the second embedding map (default 'Protein', else most variable).

    Writes confusion_matrix.png (test split, foods by USDA category), food_embeddings_category.png,
    food_embeddings_<nutrient>.png (2-D PCA of the nutrition projection of Food embeddings),
    top_molecules.png (``max_foods`` foods, one per category in turn) and model_vs_baselines.png
    (when ``metrics`` has comparisons). Sections: per-food precision/recall/F1 table and the
    biomarker list of ``biomarker_foods`` foods.
    """
    import jax

    from jaxfood.eval import figures as figs
    from jaxfood.eval import molecules as mol
    from jaxfood.eval.evaluator import model_programs, molecule_scores
    from jaxfood.eval.metrics import confusion
    from jaxfood.graph.hetero_graph import SPLIT_CODES, molecule_label
    from jaxfood.graph.splits import prepare_graph

    out_dir = Path(workdir) / "figures"
    out_dir.mkdir(parents=True, exist_ok=True)
    dgraph = prepare_graph(graph)
    model, params, default_scorer = _fine_tuned_model(source, dgraph)
    scorer = scorer or default_scorer
    outputs = jax.device_get(model_programs(model).predict(params, dgraph))
    foods = list(graph.meta.node_ids[schema.FOOD])
    cats = food_category_names(graph)
    figures: dict[str, Path] = {}
    sections: list[tuple[str, str]] = []

    labels, split = np.asarray(graph.sample_food), np.asarray(graph.sample_split)
    test = np.nonzero((split == SPLIT_CODES["test"]) & (labels >= 0))[0]
    y_pred = np.argmax(np.asarray(outputs.food_logits), axis=1)
    if test.size:
        cm = confusion(labels[test], y_pred[test], len(foods))
        figures["Confusion matrix (test split, foods grouped by USDA category)"] = figs.plot_confusion(
            cm, foods, out_dir / "confusion_matrix.png", cats)
        sections.append(("Food classification per food (test split)",
                         per_class_markdown(labels[test], y_pred[test], graph)))

    projection = np.asarray(outputs.food_projection)
    figures["Food embeddings by USDA category (PCA of the nutrition projection)"] = figs.plot_embedding_categories(
        projection, cats, out_dir / "food_embeddings_category.png", point_labels=foods)
    if np.shape(graph.food_nutrients)[1]:  # without a nutrient table there is nothing to colour by
        n_index = choose_nutrient(graph, nutrient)
        n_name = str(graph.meta.nutrient_names[n_index]) if graph.meta.nutrient_names else f"nutrient {n_index}"
        slug = "".join(c if c.isalnum() else "_" for c in n_name.split(" (")[0].lower()).strip("_") or "nutrient"
        figures[f"Food embeddings coloured by {n_name}"] = figs.plot_embedding_nutrient(
            projection, nutrient_values(graph, n_index), out_dir / f"food_embeddings_{slug}.png", value_name=n_name,
            point_labels=foods)

    edge_scores = np.asarray(molecule_scores(model, params, dgraph, (scorer,), default_scorer)[scorer])
    ranking, importance = mol.rank_molecules_per_food(edge_scores, dgraph)
    mol_ids = list(graph.meta.node_ids[schema.MOLECULE])
    scored = {foods[f]: [(mol_ids[m], float(importance[f, m])) for m in ranking[f, :k]] for f in range(len(foods))}
    shown = representative_foods(graph, reference, max_foods)
    figures[f"Top {k} molecules per food ({scorer} scorer; reference biomarkers in orange)"] = \
        figs.plot_top_molecules(scored, out_dir / "top_molecules.png", k=k, reference=reference, foods=shown,
                                max_foods=max_foods, title=f"Top salient molecules per food ({scorer} scorer)")
    baseline_rankings = None
    if fold_change and reference:
        from jaxfood.eval.baselines import fold_change_ranking, preprocess_intensities

        train = split == SPLIT_CODES["train"]
        baseline_rankings = fold_change_ranking(preprocess_intensities(raw_peak_areas(graph))[train],
                                                np.where(labels >= 0, labels, -1)[train], mol_ids, foods)
    listed = representative_foods(graph, reference, biomarker_foods)
    sections.append((f"Salient molecules of a few foods ({scorer} scorer)",
                     biomarker_markdown({f: [m for m, _ in v] for f, v in scored.items()}, listed, reference, k,
                                        baseline_rankings, labels={m: molecule_label(graph, i)
                                                                   for i, m in enumerate(mol_ids)})))

    if metrics is not None:
        results, errors = model_vs_baselines(metrics)
        if len(results) > 1:
            figures["jaxfood vs ablations and baselines (test split)"] = figs.plot_model_vs_baselines(
                results, out_dir / "model_vs_baselines.png", errors=errors,
                title="jaxfood vs ablations and baselines (test split)")
    return ReportAssets(figures=figures, sections=sections)
