"""Figures of a run: numpy / dicts in, one PNG out per function (matplotlib, Agg backend).

Every function writes its PNG atomically (a temporary sibling renamed into place, so a failure
leaves no half-written image), closes its figure, and returns the path. Sizes and font sizes
grow with the number of foods so that ~64 food names stay readable.

* :func:`plot_confusion` — confusion matrix, foods grouped by USDA food category;
* :func:`plot_embedding_categories` / :func:`plot_embedding_nutrient` — 2-D map (PCA or t-SNE,
  :func:`embedding_2d`) of Food embeddings coloured by category / by one nutrient;
* :func:`plot_top_molecules` — the top-k molecules of each food, reference biomarkers highlighted;
* :func:`plot_model_vs_baselines` — grouped bars, the model beside each baseline.
"""

from __future__ import annotations

import math
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from jaxfood.io_utils import atomic_path

DPI = 120


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)  # files only, never a window (CI, servers, pods)
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: str | os.PathLike) -> Path:
    plt = _pyplot()
    path = Path(path)
    try:
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight")
    finally:
        plt.close(fig)
    return path


def _label_fontsize(n: int) -> float:
    """Tick label size for ``n`` labels on one axis: 9 pt for a few, 5 pt at 64 and beyond."""
    return float(np.clip(9.0 - (n - 16) * 4.0 / 48.0, 5.0, 9.0))


def category_order(class_names: Sequence[str], class_categories: Sequence[str] | None) -> np.ndarray:
    """Indices of ``class_names`` sorted by (category, name): foods of one category side by side."""
    cats = list(class_categories) if class_categories is not None else [""] * len(class_names)
    return np.asarray(
        sorted(range(len(class_names)), key=lambda i: (str(cats[i]), str(class_names[i]))), dtype=np.int64
    )


# --------------------------------------------------------------------------------------------
# Confusion matrix
# --------------------------------------------------------------------------------------------


def plot_confusion(
    matrix: Any,
    class_names: Sequence[str],
    path: str | os.PathLike,
    class_categories: Sequence[str] | None = None,
    *,
    normalise: bool = True,
    title: str = "Food classification: confusion matrix (held-out samples)",
) -> Path:
    """Confusion matrix ``[C, C]`` (row = true food, column = predicted), ordered by category.

    Rows are normalised to recall (fraction of each true food) when ``normalise``; foods are
    grouped by ``class_categories`` with a line between categories and the category names along
    the right edge. Returns ``path``.
    """
    plt = _pyplot()
    cm = np.asarray(matrix, dtype=np.float64)
    n = len(class_names)
    if cm.shape != (n, n):
        raise ValueError(f"confusion matrix must be [{n}, {n}] for {n} class names; got {cm.shape}")
    order = category_order(class_names, class_categories)
    cm = cm[np.ix_(order, order)]
    if normalise:
        support = cm.sum(axis=1, keepdims=True)
        cm = cm / np.where(support > 0, support, 1.0)
    names = [str(class_names[i]) for i in order]
    size = float(np.clip(0.16 * n + 3.0, 5.0, 16.0))
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    image = ax.imshow(cm, cmap="Blues", vmin=0.0, vmax=1.0 if normalise else None, interpolation="nearest")
    fs = _label_fontsize(n)
    ax.set_xticks(np.arange(n), names, rotation=90, fontsize=fs)
    ax.set_yticks(np.arange(n), names, fontsize=fs)
    ax.set_xlabel("predicted food")
    ax.set_ylabel("true food")
    ax.set_title(title)
    if class_categories is not None:
        cats = [str(class_categories[i]) for i in order]
        starts = [i for i in range(n) if i == 0 or cats[i] != cats[i - 1]]
        for s in starts[1:]:
            ax.axhline(s - 0.5, color="0.4", linewidth=0.6)
            ax.axvline(s - 0.5, color="0.4", linewidth=0.6)
        ends = starts[1:] + [n]
        for s, e in zip(starts, ends):
            ax.text(n - 0.3, (s + e - 1) / 2, f" {cats[s]}", va="center", ha="left", fontsize=fs + 1, clip_on=False)
    if n <= 20:  # counts in the cells only where they stay legible
        for i in range(n):
            for j in range(n):
                if cm[i, j] > 0:
                    ax.text(j, i, f"{cm[i, j]:.2f}" if normalise else f"{int(cm[i, j])}",
                            ha="center", va="center", fontsize=fs - 1,
                            color="white" if cm[i, j] > 0.5 * (cm.max() or 1) else "black")
    fig.colorbar(image, ax=ax, fraction=0.035, pad=0.12 if class_categories is not None else 0.03,
                 label="fraction of true food" if normalise else "samples")
    return _save(fig, path)


# --------------------------------------------------------------------------------------------
# Embedding maps
# --------------------------------------------------------------------------------------------


def embedding_2d(embeddings: Any, method: str = "pca", seed: int = 0) -> np.ndarray:
    """2-D coordinates ``[n, 2]`` of ``embeddings`` ``[n, d]`` by PCA or t-SNE (fixed seed).

    Rows are L2-normalised first (the nutrition metrics use cosine geometry). t-SNE perplexity is
    ``min(30, (n - 1) / 3)`` so it also works for 64 foods.
    """
    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"embeddings must be [n, d]; got {x.shape}")
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    x = x / np.where(norm > 0, norm, 1.0)
    n = x.shape[0]
    if n < 3 or x.shape[1] < 2:
        coords = np.zeros((n, 2))
        coords[:, : min(2, x.shape[1])] = x[:, :2] - x[:, :2].mean(axis=0)
        return coords
    if method == "pca":
        from sklearn.decomposition import PCA

        return PCA(n_components=2, random_state=seed).fit_transform(x)
    if method == "tsne":
        from sklearn.manifold import TSNE

        perplexity = float(min(30.0, max(2.0, (n - 1) / 3.0)))
        # Exact gradients are faster than Barnes-Hut below a few hundred points (64 foods: ~0.3 s).
        algorithm = "exact" if n <= 500 else "barnes_hut"
        return TSNE(n_components=2, perplexity=perplexity, init="pca", method=algorithm,
                    random_state=seed).fit_transform(x)
    raise ValueError(f"method must be 'pca' or 'tsne'; got {method!r}")


def _annotate(ax: Any, coords: np.ndarray, point_labels: Sequence[str] | None, n: int) -> None:
    if point_labels is None:
        return
    fs = _label_fontsize(n)
    for (x, y), text in zip(coords, point_labels):
        ax.annotate(str(text), (x, y), xytext=(2, 2), textcoords="offset points", fontsize=fs, alpha=0.8)


def _axis_names(method: str) -> tuple[str, str]:
    return ("PC 1", "PC 2") if method == "pca" else ("t-SNE 1", "t-SNE 2")


def plot_embedding_categories(
    embeddings: Any,
    categories: Sequence[str],
    path: str | os.PathLike,
    *,
    point_labels: Sequence[str] | None = None,
    method: str = "pca",
    seed: int = 0,
    title: str = "Food embeddings by USDA food category",
) -> Path:
    """2-D map of ``embeddings`` ``[n, d]`` coloured by ``categories`` ``[n]`` (legend outside).

    ``point_labels`` (e.g. food names) are written beside the points. Returns ``path``.
    """
    plt = _pyplot()
    coords = embedding_2d(embeddings, method, seed)
    cats = [str(c) for c in categories]
    if len(cats) != coords.shape[0]:
        raise ValueError(f"categories has {len(cats)} entries for {coords.shape[0]} embeddings")
    unique = sorted(set(cats))
    cmap = plt.get_cmap("tab20" if len(unique) > 10 else "tab10")
    markers = "osD^v<>ph*"
    fig, ax = plt.subplots(figsize=(9.5, 7.0))
    for i, cat in enumerate(unique):
        rows = np.asarray([c == cat for c in cats])
        ax.scatter(coords[rows, 0], coords[rows, 1], s=36, color=cmap(i % cmap.N),
                   marker=markers[(i // cmap.N) % len(markers)], label=cat, edgecolor="k", linewidth=0.3)
    _annotate(ax, coords, point_labels, coords.shape[0])
    xl, yl = _axis_names(method)
    ax.set_xlabel(xl)
    ax.set_ylabel(yl)
    ax.set_title(title)
    ax.legend(title="category", fontsize=8, title_fontsize=9, loc="upper left", bbox_to_anchor=(1.01, 1.0),
              frameon=False)
    return _save(fig, path)


def plot_embedding_nutrient(
    embeddings: Any,
    values: Any,
    path: str | os.PathLike,
    *,
    value_name: str = "nutrient",
    point_labels: Sequence[str] | None = None,
    method: str = "pca",
    seed: int = 0,
    title: str | None = None,
) -> Path:
    """2-D map of ``embeddings`` ``[n, d]`` coloured by one nutrient ``values`` ``[n]`` (colorbar).

    NaN values (nutrient missing) are drawn as hollow grey points. Returns ``path``.
    """
    plt = _pyplot()
    coords = embedding_2d(embeddings, method, seed)
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if values.shape[0] != coords.shape[0]:
        raise ValueError(f"values has {values.shape[0]} entries for {coords.shape[0]} embeddings")
    known = np.isfinite(values)
    fig, ax = plt.subplots(figsize=(8.5, 7.0))
    points = ax.scatter(coords[known, 0], coords[known, 1], c=values[known], cmap="viridis", s=36,
                        edgecolor="k", linewidth=0.3)
    if (~known).any():
        ax.scatter(coords[~known, 0], coords[~known, 1], s=36, facecolor="none", edgecolor="0.5",
                   label="missing")
        ax.legend(fontsize=8, frameon=False)
    _annotate(ax, coords, point_labels, coords.shape[0])
    fig.colorbar(points, ax=ax, label=value_name)
    xl, yl = _axis_names(method)
    ax.set_xlabel(xl)
    ax.set_ylabel(yl)
    ax.set_title(title or f"Food embeddings coloured by {value_name}")
    return _save(fig, path)


# --------------------------------------------------------------------------------------------
# Salient molecules
# --------------------------------------------------------------------------------------------


def _scored(items: Sequence[Any], k: int) -> tuple[list[str], np.ndarray, bool]:
    """(ids, scores, has_scores) of the first k items: ``(id, score)`` pairs or bare ids."""
    items = list(items)[:k]
    if items and isinstance(items[0], (tuple, list)) and len(items[0]) == 2:
        return [str(i) for i, _ in items], np.asarray([float(s) for _, s in items]), True
    return [str(i) for i in items], np.arange(len(items), 0, -1, dtype=np.float64), False


def plot_top_molecules(
    rankings: Mapping[Hashable, Sequence[Any]],
    path: str | os.PathLike,
    *,
    k: int = 10,
    reference: Mapping[Hashable, set] | None = None,
    foods: Sequence[Hashable] | None = None,
    max_foods: int = 24,
    title: str = "Top salient molecules per food",
) -> Path:
    """Grid of bar charts, one panel per food, of its ``k`` most salient molecules.

    ``rankings[food]`` is either ``[(molecule_id, score), ...]`` (bar length = score) or a plain
    ranked list of ids (bar length = k - rank). Molecules in ``reference[food]`` (known
    biomarkers) are drawn orange, others grey. ``foods`` picks and orders the panels (default:
    the order of ``rankings``), at most ``max_foods`` of them so that labels stay legible; the title says
    when foods were left out. Returns ``path``.
    """
    plt = _pyplot()
    chosen = list(foods) if foods is not None else list(rankings)
    chosen = [f for f in chosen if f in rankings]
    total = len(chosen)
    chosen = chosen[:max_foods]
    n = max(1, len(chosen))
    cols = min(4, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 0.22 * k * rows + 0.9 * rows + 0.6), squeeze=False)
    any_scores = False
    for ax in axes.ravel()[len(chosen):]:
        ax.axis("off")
    for ax, food in zip(axes.ravel(), chosen):
        ids, scores, has_scores = _scored(rankings[food], k)
        any_scores |= has_scores
        markers = set(map(str, reference.get(food, ()))) if reference is not None else set()
        colours = ["tab:orange" if i in markers else "0.6" for i in ids]
        y = np.arange(len(ids))
        ax.barh(y, scores, color=colours)
        ax.set_yticks(y, ids, fontsize=6.5)
        ax.invert_yaxis()
        ax.tick_params(axis="x", labelsize=6)
        if not has_scores:
            ax.set_xticks([])
        hits = sum(i in markers for i in ids)
        ax.set_title(f"{food}" + (f"  ({hits}/{len(ids)} known)" if reference is not None else ""), fontsize=8)
    suffix = f" (first {len(chosen)} of {total} foods)" if total > len(chosen) else ""
    fig.suptitle(title + suffix + ("" if any_scores else ": bar = rank"), fontsize=11)
    if reference is not None:
        from matplotlib.patches import Patch

        fig.legend(handles=[Patch(color="tab:orange", label="reference biomarker"), Patch(color="0.6", label="other")],
                   loc="lower center", ncol=2, fontsize=8, frameon=False, bbox_to_anchor=(0.5, -0.01))
    fig.tight_layout(rect=(0, 0.02, 1, 0.97))
    return _save(fig, path)


# --------------------------------------------------------------------------------------------
# Model vs baselines
# --------------------------------------------------------------------------------------------


def plot_model_vs_baselines(
    results: Mapping[str, Mapping[str, float]],
    path: str | os.PathLike,
    *,
    errors: Mapping[str, Mapping[str, float]] | None = None,
    title: str = "jaxfood vs baselines",
    ylabel: str = "score",
) -> Path:
    """Grouped bar chart: one group per metric, one bar per method, value written on each bar.

    ``results[method][metric]`` (e.g. ``{"jaxfood": {"accuracy": .9}, "logistic regression":
    {"accuracy": .8}}``); a method without a metric (missing or NaN)
    is left out of that group, the others centred. ``errors`` (same layout, e.g. the
    std over seeds) adds error bars. Metrics keep their first-seen order. Returns ``path``.
    """
    plt = _pyplot()
    methods = list(results)
    metrics: list[str] = []
    for method in methods:
        for metric in results[method]:
            if metric not in metrics:
                metrics.append(metric)
    if not methods or not metrics:
        raise ValueError("results must map at least one method to at least one metric")
    cmap = plt.get_cmap("tab10")
    colour = {method: cmap(i % 10) for i, method in enumerate(methods)}
    # Each metric group shows only the methods that report it, centred: baselines often cover a
    # single metric, and empty slots would make the chart mostly gaps.
    per_group = max(
        sum(np.isfinite(float(results[m].get(metric, np.nan))) for m in methods) for metric in metrics
    )
    width = 0.8 / max(1, per_group)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(metrics) * max(1, per_group) + 2.5), 4.5))
    x = np.arange(len(metrics))
    for g, metric in enumerate(metrics):
        present = [m for m in methods if np.isfinite(float(results[m].get(metric, np.nan)))]
        for i, method in enumerate(present):
            value = float(results[method][metric])
            err = float(errors.get(method, {}).get(metric, np.nan)) if errors is not None else np.nan
            err = err if np.isfinite(err) else 0.0
            pos = x[g] - width * len(present) / 2 + width * (i + 0.5)
            ax.bar(pos, value, width, yerr=err if err else None, color=colour[method], capsize=2)
            tip = value + err if value >= 0 else value - err
            ax.annotate(f"{value:.2f}", (pos, tip), xytext=(0, 2 if value >= 0 else -2), textcoords="offset points",
                        ha="center", va="bottom" if value >= 0 else "top", fontsize=7)
    from matplotlib.patches import Patch

    handles = [Patch(color=colour[m], label=m) for m in methods]
    ax.set_xticks(x, metrics, rotation=20 if len(metrics) > 4 else 0, ha="right" if len(metrics) > 4 else "center")
    ax.set_ylabel(ylabel)
    ax.axhline(0.0, color="k", linewidth=0.6)
    ax.margins(y=0.15)
    ax.set_title(title)
    ax.legend(handles=handles, fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.grid(axis="y", alpha=0.3)
    return _save(fig, path)
