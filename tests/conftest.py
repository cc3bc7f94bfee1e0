"""Shared fixtures: small synthetic graphs built directly from arrays (no readers involved)."""

from __future__ import annotations

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Commands enable a persistent compilation cache; tests keep it out of the user's cache directory.
if not os.environ.get("JAXFOOD_COMPILE_CACHE"):
    import atexit
    import shutil
    import tempfile

    os.environ["JAXFOOD_COMPILE_CACHE"] = tempfile.mkdtemp(prefix="jaxfood-test-xla-")
    atexit.register(shutil.rmtree, os.environ["JAXFOOD_COMPILE_CACHE"], True)

import numpy as np
import pytest

from jaxfood.graph import schema
from jaxfood.graph.hetero_graph import GraphMeta, HeteroGraph, make_edge_set, with_reverse_edges
from jaxfood.graph.splits import with_splits


def make_toy_graph(num_samples=30, num_molecules=40, num_foods=5, num_nutrients=6, per_sample=8,
                   molecule_dim=4, seed=0, similar=False) -> HeteroGraph:
    """A random graph with the full schema; samples of a food share a few marker molecules."""
    rng = np.random.default_rng(seed)
    sample_food = np.arange(num_samples) % num_foods
    s, m = [], []
    for i in range(num_samples):
        markers = [(sample_food[i] * 3 + j) % num_molecules for j in range(2)]
        others = rng.choice(num_molecules, per_sample - 2, replace=False)
        mols = np.unique(np.concatenate([markers, others]))
        s += [i] * len(mols)
        m += list(mols)
    edges = {
        schema.CONTAINS: make_edge_set(s, m, rng.normal(size=(len(s), 1))),
        schema.IS_INSTANCE_OF: make_edge_set(np.arange(num_samples), sample_food),
    }
    fn_f = np.repeat(np.arange(num_foods), num_nutrients)
    fn_n = np.tile(np.arange(num_nutrients), num_foods)
    qty = rng.normal(size=(len(fn_f), 1))
    unit = np.eye(2)[fn_n % 2]
    edges[schema.HAS_NUTRIENT] = make_edge_set(fn_f, fn_n, np.concatenate([qty, unit], 1))
    if similar:
        a = rng.integers(0, num_molecules, 50)
        b = rng.integers(0, num_molecules, 50)
        edges[schema.IS_SIMILAR_TO] = make_edge_set(a, b, rng.uniform(size=50))
    edges = with_reverse_edges(edges)
    counts = {schema.SAMPLE: num_samples, schema.MOLECULE: num_molecules, schema.FOOD: num_foods,
              schema.NUTRIENT: num_nutrients}
    meta = GraphMeta(
        num_nodes=counts,
        node_ids={t: [f"{t[0].lower()}{i}" for i in range(n)] for t, n in counts.items()},
        food_categories=["cat_a", "cat_b"],
        nutrient_names=[f"N{i} (g)" for i in range(num_nutrients)],
        nutrient_units=["g", "mg"],
    )
    food_nutrients = qty.reshape(num_foods, num_nutrients).astype(np.float32)
    graph = HeteroGraph(
        node_features={schema.MOLECULE: rng.normal(size=(num_molecules, molecule_dim)).astype(np.float32),
                       schema.FOOD: food_nutrients},
        edges=edges,
        sample_food=sample_food.astype(np.int32),
        sample_split=np.zeros(num_samples, np.int32),
        food_nutrients=food_nutrients,
        food_category=(np.arange(num_foods) % 2).astype(np.int32),
        meta=meta,
    )
    return with_splits(graph, seed=seed)


@pytest.fixture
def toy_graph():
    return make_toy_graph()
