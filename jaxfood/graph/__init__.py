"""The heterogeneous graph: container, schema, splits, sampling, save/load (builders live in jaxfood.data)."""

from jaxfood.graph.hetero_graph import (  # noqa: F401
    EdgeSet,
    GraphMeta,
    HeteroGraph,
    load_graph,
    make_edge_set,
    save_graph,
    summary,
    validate,
    with_reverse_edges,
)
