"""``jaxfood embed``: node embeddings of a graph from any encoder checkpoint, in eval mode."""

from __future__ import annotations

from typing import Any

NAME = "embed"
HELP = "write the node embeddings of a graph computed by a checkpoint's encoder (.npz)"
DESCRIPTION = (
    "Runs the encoder of a jaxfood checkpoint (GraphCL pretraining, fine-tuning, or a PyTorch checkpoint "
    "converted with 'python -m checkpoints_convert') on a graph, in eval mode (no dropout), and writes one "
    "array [num_nodes, hidden_dim] per node type (Sample, Molecule, Food, Nutrient) in the graph's node "
    "order to an .npz file. With --upstream-json the graph is built from the original PyTorch project's "
    "intermediate JSON in compatibility mode, so the embeddings line up row for row with that project's."
)


def add_arguments(parser) -> None:
    parser.add_argument("--checkpoint", required=True, metavar="DIR", help="jaxfood checkpoint directory (orbax)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--graph", metavar="GRAPH_DIR", help="graph directory written by 'jaxfood build-graph'")
    source.add_argument("--upstream-json", metavar="F", help="the original project's intermediate JSON "
                        "(graph built in compatibility mode)")
    parser.add_argument("--out", required=True, metavar="EMB.npz", help="output file (one array per node type)")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step to read (None: the latest)")


def check_compatible(params: dict[str, Any], graph, checkpoint: str, graph_name: str) -> None:
    """Raises :class:`CheckpointError` naming both shapes when ``params`` do not fit ``graph``."""
    import numpy as np

    from jaxfood.errors import CheckpointError
    from jaxfood.graph import schema

    for t in schema.NODE_TYPES:
        table = params.get(f"embed_{t}", {}).get("embedding") if isinstance(params.get(f"embed_{t}"), dict) else None
        if table is not None and t in graph.num_nodes and np.shape(table)[0] != graph.num_nodes[t]:
            raise CheckpointError(
                f"{checkpoint}: embed_{t}/embedding has shape {list(np.shape(table))} but {graph_name} has "
                f"{graph.num_nodes[t]} '{t}' nodes (expected [{graph.num_nodes[t]}, {np.shape(table)[1]}]); "
                "per-id embeddings only fit the graph they were trained on (in its node order)")
        project = params.get(f"project_{t}")
        if isinstance(project, dict) and "kernel" in project:
            want = np.shape(project["kernel"])[0]
            have = graph.feature_dims().get(t)
            if have is None:
                raise CheckpointError(f"{checkpoint}: the encoder reads input features of '{t}' "
                                      f"(project_{t}/kernel {list(np.shape(project['kernel']))}) but {graph_name} has none")
            if have != want:
                raise CheckpointError(f"{checkpoint}: project_{t}/kernel has shape {list(np.shape(project['kernel']))} "
                                      f"but {graph_name}'s '{t}' features have {have} columns (expected [{have}, ...])")
    dims = graph.edge_dims()
    layer0 = params.get("layer_0", {})
    for key in layer0:
        if key not in graph.edges:
            raise CheckpointError(f"{checkpoint}: the encoder has relation '{key}' but {graph_name} does not "
                                  f"(graph relations: {list(graph.edges)})")
    for key in [k for k in graph.edges if k in layer0]:  # the graph's order: forward relations first
        p = layer0[key]
        width = int(np.shape(p["lin_edge"]["kernel"])[0]) if "lin_edge" in p else 0
        if width != dims[key]:
            shape = list(np.shape(p["lin_edge"]["kernel"])) if "lin_edge" in p else "none"
            raise CheckpointError(f"{checkpoint}: layer_0/{key}/lin_edge/kernel has shape {shape} but {graph_name}'s "
                                  f"'{key}' edges have {dims[key]} attributes (shape [{graph.edges[key].num_edges}, "
                                  f"{dims[key]}])")
    extra = [k for k in graph.edges if layer0 and k not in layer0]
    if extra:
        raise CheckpointError(f"{checkpoint}: {graph_name} has relation(s) {extra} the encoder has no parameters for "
                              f"(encoder relations: {list(layer0)})")


def compute_embeddings(params, encoder_config, graph) -> dict[str, Any]:
    """``{node type: [N_type, hidden_dim] float32}`` in eval mode (deterministic)."""
    import jax
    import numpy as np

    from jaxfood.models.encoder import make_encoder

    encoder = make_encoder(graph, encoder_config)
    out = jax.jit(lambda p, g: encoder.apply({"params": p}, g, deterministic=True))(params, graph)
    out = jax.device_get(out)
    return {t: np.asarray(out[t], dtype=np.float32) for t in graph.node_types if t in out}


def run(args) -> int:
    import numpy as np

    from jaxfood.config import config_from_dict
    from jaxfood.errors import CheckpointError
    from jaxfood.io_utils import atomic_path, check_output_file
    from jaxfood.models.encoder import EncoderConfig
    from jaxfood.train.checkpoint import load_encoder

    check_output_file(args.out, "--out")
    if args.upstream_json:
        from jaxfood.data.upstream import build_graph_from_upstream_json

        graph = build_graph_from_upstream_json(args.upstream_json)
        graph_name = args.upstream_json
    else:
        from jaxfood.graph.hetero_graph import load_graph

        graph = load_graph(args.graph)
        graph_name = args.graph
    cfg_dict, params, meta = load_encoder(args.checkpoint, args.step)
    cfg = config_from_dict(EncoderConfig(), cfg_dict, f"{args.checkpoint}: meta 'encoder_config'")
    check_compatible(params, graph, args.checkpoint, graph_name)
    try:
        embeddings = compute_embeddings(params, cfg, graph)
    except (KeyError, TypeError, ValueError) as err:  # a params tree that does not fit the encoder
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise CheckpointError(f"{args.checkpoint}: the encoder parameters do not fit {graph_name} ({msg})") from None
    with atomic_path(args.out) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **embeddings)
    shapes = ", ".join(f"{t} {list(v.shape)}" for t, v in embeddings.items())
    print(f"wrote {args.out}: {shapes} (checkpoint {args.checkpoint}, kind {meta.get('kind', '?')}, eval mode)")
    return 0
