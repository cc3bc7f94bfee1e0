"""Read-outs of frozen embeddings (GraphCL pretraining): k-NN purity of Food embeddings, a linear
probe on Sample embeddings, and the PCA map of Food embeddings by USDA category."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from jaxfood.eval.figures import plot_embedding_categories
from jaxfood.eval.metrics import knn_purity
from jaxfood.graph import schema
from jaxfood.graph.hetero_graph import SPLIT_CODES, HeteroGraph


def embedding_readouts(embeddings: Mapping[str, np.ndarray], graph: HeteroGraph, knn_k: int = 5,
                       seed: int = 0) -> dict[str, float]:
    """Quality of frozen embeddings, without any fine-tuning.

    * ``knn_purity``: k-NN purity of Food embeddings [F, hidden] by USDA food category
      (:func:`jaxfood.eval.metrics.knn_purity`, cosine); foods without a category are left out.
    * ``linear_probe_accuracy``: a logistic regression (scikit-learn, standardised inputs) trained
      on the Sample embeddings of training-split samples to predict their food, scored on the
      test-split samples (NaN where either split has no labelled sample).
    """
    food = np.asarray(embeddings[schema.FOOD], np.float64)
    category = np.asarray(graph.food_category)
    known = category >= 0
    purity = knn_purity(food[known], category[known], k=knn_k) if known.sum() >= 2 else float("nan")

    samples = np.asarray(embeddings[schema.SAMPLE], np.float64)
    sample_food = np.asarray(graph.sample_food)
    split = np.asarray(graph.sample_split)
    train = (split == SPLIT_CODES["train"]) & (sample_food >= 0)
    test = (split == SPLIT_CODES["test"]) & (sample_food >= 0)
    if train.sum() == 0 or test.sum() == 0 or np.unique(sample_food[train]).size < 2:
        accuracy = float("nan")
    else:
        # scikit-learn (1.3 s to import) where it is used, as in eval.metrics: predict and embed never load it.
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler
        from threadpoolctl import threadpool_limits

        probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
        # One BLAS thread: on a [390, 64] problem, threads only spin against each other (15x slower).
        with threadpool_limits(1):
            probe.fit(samples[train], sample_food[train])
        accuracy = float(np.mean(probe.predict(samples[test]) == sample_food[test]))
    return {"knn_purity": float(purity), "linear_probe_accuracy": accuracy}


def food_embedding_figure(food_embeddings: np.ndarray, graph: HeteroGraph, path: Path, title: str) -> Path:
    """2-D PCA map of Food embeddings [F, hidden] coloured by USDA food category, written as PNG."""
    names = list(graph.meta.food_categories)
    categories = [names[c] if 0 <= c < len(names) else "unknown" for c in np.asarray(graph.food_category).tolist()]
    foods = graph.meta.node_ids.get(schema.FOOD)
    return plot_embedding_categories(food_embeddings, categories, path, point_labels=foods, method="pca",
                                     title=title)
