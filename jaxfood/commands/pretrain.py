"""``jaxfood pretrain``: GraphCL self-supervised pretraining of the heterogeneous GAT encoder."""

from __future__ import annotations

import argparse
import sys
import time

from jaxfood.train.parallel_options import add_data_parallel_arguments

NAME = "pretrain"
HELP = "pretrain the graph encoder self-supervised (GraphCL: contrast two augmented views)"
DESCRIPTION = """\
GraphCL pretraining (You et al., NeurIPS 2020) of the heterogeneous GAT encoder: two random views
of the graph (node dropping, edge removal/addition, feature and edge-attribute masking; label
edges are never used) are encoded, and NT-Xent pulls the two views of each node together against
the other nodes of a random batch. No food label is used; fine-tuning starts from the result
('jaxfood finetune --pretrained WORKDIR/checkpoints').

Writes to WORKDIR:
  pretrain_config.yaml     the resolved configuration (defaults <- --config <- --set)
  checkpoints/             orbax checkpoint of the best epoch (by held-out view loss)
  resume/                  training-state snapshots while running (removed at the end)
  tb/                      TensorBoard scalars: loss per node type, learning rate, gradient norm
  pretrain_history.json    {"loss": [...], "val_loss": [...]} per epoch
  pretrain_metrics.json    read-outs of the pretrained and of a randomly initialised encoder:
                           k-NN purity of Food embeddings by USDA category, linear-probe food
                           accuracy of frozen Sample embeddings (train split -> test split)
  figures/                 PCA maps of Food embeddings coloured by USDA food category

One loop for every setting: one device, several local devices (GPUs, TPU cores) or several hosts
(--coordinator/--num-processes/--process-id, the same command on every host). Every step averages
the gradients of one pair of views per device (--per-device K: K per device) over all devices of
all hosts: views of the full graph, or with --sampled of each shard's own neighbour-sampled
subgraph (--batch-size seed samples; edges are added from a candidate pool of that subgraph).
Process 0 alone writes the JSON files, tb/ and figures/; all processes write checkpoints/ (shared
storage). The training state goes to resume/ every --checkpoint-every steps and on SIGTERM
(exit status 143): rerunning the same command resumes; a completed run removes resume/.

Configuration keys (--set key=value, dotted for nested sections), e.g.:
  epochs=15  steps_per_epoch=10  learning_rate=1e-2  temperature=0.2  batch_size=256
  hard_negative_beta=1.0  patience=5  seed=0  encoder.hidden_dim=64  encoder.num_layers=1
  'loss_weights={Sample: 1.0, Food: 1.0}'  'augment.edge_drop={contains_molecule: 0.3}'
A dict-valued key given with --set replaces the whole dict. Set JAX_COMPILATION_CACHE_DIR to
reuse compiled programs between runs."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--graph", metavar="GRAPH_DIR", default=None,
                        help="graph directory written by 'jaxfood build-graph' [default: the embedded default graph]")
    parser.add_argument("--workdir", metavar="W", required=True, help="output directory (created)")
    parser.add_argument("--config", metavar="F", default=None, help="YAML file of configuration keys")
    parser.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], dest="overrides",
                        help="override one configuration key (repeatable)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    add_data_parallel_arguments(parser)


def run(args) -> int:
    # Joins a multi-host job before anything touches a device.
    from jaxfood.train.processes import init_from_args

    info = init_from_args(args)
    from tqdm import tqdm

    from jaxfood import workflows
    from jaxfood.commands.finetune import load_graph_arg, spread_line
    from jaxfood.config import load_config
    from jaxfood.io_utils import check_output_dir
    from jaxfood.train.adapt import adapt_and_report
    from jaxfood.train.graphcl import PretrainConfig
    from jaxfood.train.parallel_options import options_from_args
    from jaxfood.train.preemption import PREEMPTED_EXIT, Preempted

    start = time.perf_counter()
    options = options_from_args(args)
    workdir = check_output_dir(args.workdir, "--workdir")
    cfg = load_config(PretrainConfig(), args.config, args.overrides)
    graph = load_graph_arg(args.graph)
    progress = not args.quiet and sys.stderr.isatty()
    log = None if args.quiet else (lambda msg: tqdm.write(msg, file=sys.stderr))
    cfg = adapt_and_report(cfg, graph, log or (lambda msg: None))  # defaults follow the graph
    try:
        result = workflows.pretrain(graph, cfg, workdir, options=options, progress=progress, log=log)
    except Preempted as stopped:
        if info.is_primary:
            print(stopped)
        return PREEMPTED_EXIT
    if not info.is_primary:
        return 0
    print(spread_line("GraphCL", result))
    m = result.metrics
    print(f"pretrained encoder: {result.checkpoint_dir} (epoch {result.best_epoch} of "
          f"{len(result.history['loss'])}, held-out view loss {min(result.history['val_loss']):.4f})")
    print(f"{'read-out':<34}{'pretrained':>12}{'random':>10}")
    for key, label in (("knn_purity", "k-NN purity (Food, USDA category)"),
                       ("linear_probe_accuracy", "linear probe accuracy (Sample)")):
        print(f"{label:<34}{m['pretrained'][key]:>12.3f}{m['random'][key]:>10.3f}")
    print(f"wrote {workdir}/pretrain_metrics.json, pretrain_history.json, tb/, figures/ "
          f"in {time.perf_counter() - start:.1f} s")
    return 0
