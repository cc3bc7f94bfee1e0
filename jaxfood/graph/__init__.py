"""The heterogeneous graph: container, schema, builders, splits, sampling, save/load."""

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
