"""``jaxfood pretrain``: GraphCL self-supervised pretraining of the heterogeneous GAT encoder."""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

from jaxfood.errors import UserError

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
  tb/                      TensorBoard scalars: loss per node type, learning rate, gradient norm
  pretrain_history.json    {"loss": [...], "val_loss": [...]} per epoch
  pretrain_metrics.json    read-outs of the pretrained and of a randomly initialised encoder:
                           k-NN purity of Food embeddings by USDA category, linear-probe food
                           accuracy of frozen Sample embeddings (train split -> test split)
  figures/                 PCA maps of Food embeddings coloured by USDA food category

Several devices or hosts: with more than one local device (GPUs, TPU cores), with
--coordinator/--num-processes/--process-id (one process per host, same command on every host) or
with --data-parallel / --sampled, every step averages the gradients of one pair of views per
device over all devices of all hosts: views of the full graph, or with --sampled of each device's
own neighbour-sampled subgraph (--batch-size seed samples; edges are added from a candidate pool
of that subgraph). Process 0 alone writes the JSON files, tb/ and figures/; all processes write
checkpoints/ (shared storage), at the end, every --checkpoint-every steps and on SIGTERM:
rerunning the same command resumes. That path keeps the last step (no early stopping; the
held-out view loss is that of the final encoder). Exit status 143: preempted, rerun to resume.

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
    from jaxfood.train.parallel_options import add_data_parallel_arguments

    add_data_parallel_arguments(parser)


#: Exit status of a run stopped by preemption (SIGTERM); rerunning the same command resumes it.
PREEMPTED_EXIT = 143


def run(args) -> int:
    # Joins a multi-host job before anything touches a device.
    from jaxfood.train.distributed import init_from_args, options_from_args

    info = init_from_args(args)
    options = options_from_args(args)
    from tqdm import tqdm

    from jaxfood.config import dump_config, load_config
    from jaxfood.io_utils import write_text
    from jaxfood.train.adapt import adapt_and_report
    from jaxfood.train.pretrain import PretrainConfig, pretrain

    start = time.perf_counter()
    workdir = Path(args.workdir)
    if workdir.exists() and not workdir.is_dir():
        raise UserError(f"--workdir {workdir}: exists and is not a directory")
    cfg = load_config(PretrainConfig(), args.config, args.overrides)
    if args.graph:
        from jaxfood.graph.hetero_graph import load_graph

        graph = load_graph(args.graph)
    else:
        from jaxfood.data.default import build_default_graph

        with warnings.catch_warnings():
            # The embedded data's deliberate gaps (molecules without a spectrum) are not news here.
            warnings.simplefilter("ignore")
            graph = build_default_graph(seed=0)
    progress = not args.quiet and sys.stderr.isatty()
    log = None if args.quiet else (lambda msg: tqdm.write(msg, file=sys.stderr))
    cfg = adapt_and_report(cfg, graph, log or (lambda msg: None))  # defaults follow the graph
    if info.is_primary:
        write_text(workdir / "pretrain_config.yaml", dump_config(cfg))
    if options.wanted(info):
        from jaxfood.train.distributed import pretrain_job

        result, fit_result = pretrain_job(graph, cfg, workdir, options=options, progress=progress and info.is_primary,
                                          log=log if info.is_primary else None)
        if fit_result.preempted:
            if info.is_primary:
                print(f"preempted at step {fit_result.end_step}: checkpoint in {result.checkpoint_dir}; "
                      "rerun the same command to resume")
            return PREEMPTED_EXIT
        if not info.is_primary:
            return 0
        print(f"data parallel GraphCL: {fit_result.end_step} steps on {info.process_count} process(es), "
              f"{info.device_count} device(s), {'sampled subgraphs' if options.sampled else 'full graph'}"
              f"{f', resumed from step {fit_result.start_step}' if fit_result.start_step else ''}; "
              f"{fit_result.edges_per_second:.3g} edges/s")
    else:
        result = pretrain(graph, cfg, workdir, progress=progress, log=log)
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
