"""Data-parallel multi-task fine-tuning on one or many hosts (TPU pod slices, multi-GPU hosts).

Every host runs this same command: ``jaxfood finetune``'s workflow (:func:`jaxfood.workflows.finetune`,
the one training loop) with pod defaults: neighbour-sampled subgraphs (``--full-graph`` to train on
full-graph replicas), a resume snapshot every 50 steps. Each step trains on ``processes x local
devices x per_device`` subgraphs (one compilation for the whole run); gradients and task-weighting
statistics are averaged over all devices of all hosts. Process 0 writes ``WORKDIR/config.yaml``,
``metrics.json``, ``history.json``, ``tb/`` and ``figures/``; all processes write
``WORKDIR/checkpoints/`` (the kept model: ``jaxfood evaluate|predict|embed`` read it) and
``WORKDIR/resume/`` (shared storage: a gs:// bucket on pods). Rerunning with the same WORKDIR
resumes from the latest snapshot (every ``--checkpoint-every`` steps and on SIGTERM) and ends
where an uninterrupted run would.

    python experiments/pod/train.py --preset large --workdir runs/large
    python experiments/pod/train.py --graph GRAPH_DIR --workdir W --set steps=500 --per-device 2
    # two hosts:
    python experiments/pod/train.py ... --coordinator 10.0.0.2:8476 --num-processes 2 --process-id 0

Exit status: 0 complete, 143 stopped by preemption (rerun to resume), 2 bad input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from jaxfood.compile_cache import collect_less  # noqa: E402
from jaxfood.errors import UserError  # noqa: E402
from jaxfood.train.parallel_options import (  # noqa: E402
    add_distributed_arguments,
    options_from_args,
)
from jaxfood.train.preemption import PREEMPTED_EXIT  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--graph", help="graph directory written by 'jaxfood build-graph'")
    source.add_argument("--preset", default="default",
                        help="simulator preset to build in memory when --graph is not given (default, large)")
    parser.add_argument("--workdir", required=True, help="logs, checkpoints and reports (shared storage)")
    parser.add_argument("--pretrained", help="checkpoint directory whose encoder starts the fine-tuning")
    parser.add_argument("--config", help="YAML file of fine-tuning configuration keys (as 'jaxfood finetune')")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a configuration key (dotted for sections, e.g. optimizer.accumulation_steps=2)")
    parser.add_argument("--full-graph", action="store_true",
                        help="every device trains on the full graph (own random stream) instead of sampled subgraphs")
    parser.add_argument("--batch-size", metavar="N", type=int, default=32, help="seed samples per sampled subgraph")
    parser.add_argument("--per-device", metavar="K", type=int, default=1, help="subgraphs per device per step")
    parser.add_argument("--checkpoint-every", metavar="N", type=int, default=50,
                        help="resume snapshot every N steps (and on SIGTERM)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--final-params", metavar="FILE",
                        help="also write the kept parameters to FILE (.npz; '{process}' in the name is replaced "
                             "by the process index): check that hosts agree")
    parser.add_argument("--initial-params", metavar="FILE",
                        help="also write the parameters training started from to FILE (as --final-params): "
                             "check that training moved them")
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    add_distributed_arguments(parser)
    return parser


def load_graph_from_args(args):
    if args.graph:
        from jaxfood.graph.hetero_graph import load_graph

        return load_graph(args.graph)
    from jaxfood.data.build import build_graph
    from jaxfood.data.simulate import simulate

    return build_graph(simulate(args.preset, seed=0).tables, seed=0)


def save_params(params, path: str) -> None:
    """Flat ``.npz`` of a parameter tree, one array per path (``encoder/layer_0/...``)."""
    import jax
    import numpy as np

    from jaxfood.io_utils import atomic_path

    flat = {"/".join(str(getattr(k, "key", k)) for k in p): np.asarray(v)
            for p, v in jax.tree_util.tree_flatten_with_path(params)[0]}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **flat)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    collect_less()
    try:
        # Joins the job before anything touches a device.
        from jaxfood.train.processes import init_from_args

        info = init_from_args(args)
        from tqdm import tqdm

        from jaxfood import workflows
        from jaxfood.config import load_config
        from jaxfood.train.adapt import adapt_and_report
        from jaxfood.train.finetune import FinetuneConfig
        from jaxfood.train.preemption import Preempted

        options = options_from_args(argparse.Namespace(sampled=not args.full_graph, batch_size=args.batch_size,
                                                       per_device=args.per_device,
                                                       checkpoint_every=args.checkpoint_every))
        cfg = load_config(FinetuneConfig(), args.config, args.set)
        graph = load_graph_from_args(args)
        # Defaults follow the graph (no nutrient table: no nutrition task), as in `jaxfood finetune`.
        cfg = adapt_and_report(cfg, graph, log=None if info.is_primary else (lambda _msg: None))
        try:
            result = workflows.finetune(graph, cfg, args.workdir, pretrained=args.pretrained, options=options,
                                        progress=not args.no_progress,
                                        log=(lambda msg: tqdm.write(msg, file=sys.stderr)) if info.is_primary else None)
        except Preempted as stopped:
            if info.is_primary:
                print(stopped, flush=True)
            return PREEMPTED_EXIT
    except UserError as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path, params in ((args.final_params, result.params), (args.initial_params, result.initial_params)):
        if path:
            save_params(params, path.replace("{process}", str(info.process_index)))
    if info.is_primary:
        spread, fc = result.spread, result.metrics["food_classification"]
        print(f"complete: step {result.history['train'][-1]['step']} on {spread['process_count']} process(es), "
              f"{spread['device_count']} device(s), {spread['num_shards']} shard(s) per step"
              f"{f', resumed from step {result.start_step}' if result.start_step else ''}; "
              f"kept step {result.best_step}, test accuracy {fc['accuracy']:.3f}; "
              f"{result.edges_per_second:.3g} edges/s; {result.num_step_compilations} compilation(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
