"""Data-parallel multi-task fine-tuning on one or many hosts (TPU pod slices, multi-GPU hosts).

Every host runs this same command. Each step trains on ``processes x local devices x per_device``
neighbour-sampled subgraphs (one compilation for the whole run); gradients and task-weighting
statistics are averaged over all devices of all hosts. Process 0 writes ``WORKDIR/train_log.jsonl``,
``WORKDIR/tb/`` and ``WORKDIR/report.json``; all processes write ``WORKDIR/checkpoints/`` (shared
storage: a gs:// bucket on pods). Rerunning with the same WORKDIR resumes from the latest checkpoint
(saved every ``checkpoint_every`` steps and on SIGTERM) and ends where an uninterrupted run would.

    python experiments/pod/train.py --preset large --workdir runs/large
    python experiments/pod/train.py --graph GRAPH_DIR --workdir W --set steps=500 --set per_device=2
    # two hosts:
    python experiments/pod/train.py ... --coordinator 10.0.0.2:8476 --num-processes 2 --process-id 0

Exit status: 0 complete, 143 stopped by preemption (rerun to resume), 2 bad input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from jaxfood.errors import UserError  # noqa: E402
from jaxfood.train.distributed import add_distributed_arguments  # noqa: E402

PREEMPTED_EXIT = 143


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--graph", help="graph directory written by 'jaxfood build-graph'")
    source.add_argument("--preset", default="default",
                        help="simulator preset to build in memory when --graph is not given (default, large)")
    parser.add_argument("--workdir", required=True, help="logs, checkpoints and report (shared storage)")
    parser.add_argument("--pretrained", help="checkpoint directory whose encoder starts the fine-tuning")
    parser.add_argument("--config", help="YAML file of DataParallelConfig keys")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key (dotted for sections, e.g. sampler.batch_size=64)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--final-params", metavar="FILE",
                        help="also write this process's final parameters to FILE (.npz; '{process}' in the "
                             "name is replaced by the process index): check that hosts agree")
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
    try:
        # Joins the job before anything touches a device.
        from jaxfood.train.distributed import init_from_args

        info = init_from_args(args)
        from jaxfood.config import load_config
        from jaxfood.train.checkpoint import load_encoder
        from jaxfood.train.distributed import DataParallelConfig, finetune_data_parallel

        cfg = load_config(DataParallelConfig(), args.config, args.set)
        encoder_params = None
        if args.pretrained:
            _, encoder_params, _ = load_encoder(args.pretrained)
        graph = load_graph_from_args(args)
        report = finetune_data_parallel(graph, cfg, args.workdir, encoder_params=encoder_params,
                                        progress=not args.no_progress)
    except UserError as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.final_params and report["status"] == "complete":
        save_params(report["state"]["params"], args.final_params.replace("{process}", str(info.process_index)))
    if info.is_primary:
        final = report.get("final_metrics", {})
        print(f"{report['status']}: step {report['steps']} on {report['process_count']} process(es), "
              f"{report['device_count']} device(s); loss/total {final.get('loss/total', float('nan')):.4f}; "
              f"{report['edges_per_second']:.3g} edges/s")
    return PREEMPTED_EXIT if report["status"] == "preempted" else 0


if __name__ == "__main__":
    sys.exit(main())
