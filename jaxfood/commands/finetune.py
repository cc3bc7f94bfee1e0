"""``jaxfood finetune``: multi-task fine-tuning (food classification, nutrition, salient molecules)."""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

from jaxfood.errors import UserError
from jaxfood.train.parallel_options import add_data_parallel_arguments

NAME = "finetune"
HELP = "fine-tune the encoder on food classification, nutrition alignment and salient molecules at once"
DESCRIPTION = """\
Multi-task fine-tuning of the heterogeneous GAT encoder, from a pretrained checkpoint (GraphCL from
'jaxfood pretrain', or converted PyTorch weights from 'jaxfood-convert') or from scratch:

  food classification   sample -> food (cross-entropy; label smoothing, class weights)
  nutrition alignment   triplet loss on Food embeddings by nutrient-profile similarity, and an MSE
                        head estimating each sample's normalised nutrient profile
  salient molecules     class-attention pooling over each sample's molecules (one branch per food,
                        CLAM); the top-k molecules of a sample must reproduce its prediction
                        (sufficiency); scorers: class_attention, attention, gat_attention, gradient

Losses are balanced by static weights, uncertainty weighting (Kendall et al. 2018) or GradNorm
(Chen et al. 2018); each parameter group (encoder, each head, the weighting) has its own learning
rate, schedule and weight decay. A sample never sees its own food: held-out samples have no label
edge and the label edges of the samples supervised in a step are masked. Every eval_every steps
all tasks are validated; the best checkpoint by the combined validation score is kept and scored
on the test split.

Writes to WORKDIR:
  config.yaml            the resolved configuration (defaults <- --config <- --set)
  checkpoints/           orbax checkpoint of the best step (params of encoder and heads, optimizer
                         and weighting state, config, graph id maps); 'jaxfood evaluate' reads it
  metrics.json           test metrics of the kept checkpoint (food_classification, nutrition,
                         salient_molecules, task_weights)
  history.json           per-step training metrics and per-evaluation validation metrics
  tb/                    TensorBoard: every task loss, total, task weights, learning rates, gradient
                         norms, task-gradient cosine similarities, validation metrics
  figures/               losses.png, task_weights.png, gradient_conflict.png

One loop for every setting: one device, several local devices (GPUs, TPU cores) or several hosts
(--coordinator/--num-processes/--process-id, the same command on every host). Every step averages
the gradients of one full-graph replica (or, with --sampled, one neighbour-sampled subgraph of
--batch-size seed samples) per device (--per-device K: K per device) over all devices of all
hosts; validation, early stopping and the kept checkpoint are the same in every setting. Process 0
alone writes config.yaml, metrics.json, history.json, tb/ and figures/; all processes write
checkpoints/ (shared storage, e.g. gs://). The training state goes to resume/ every
--checkpoint-every steps and on SIGTERM (exit status 143): rerunning the same command resumes;
a completed run removes resume/.

Configuration keys (--set key=value, dotted for nested sections), e.g.:
  steps=150  eval_every=25  patience=3  seed=0  weighting.method=gradnorm  weighting.gradnorm_alpha=1.5
  'weighting.static_weights={food_classification: 1.0, nutrition: 0.5, salient_molecules: 1.0}'
  optimizer.encoder.learning_rate=1e-3  optimizer.freeze_encoder_steps=20  optimizer.accumulation_steps=2
  loss.label_smoothing=0.1  loss.class_weighting=balanced  loss.salient_top_k=10  heads.hidden_dim=64
  'selection={food_classification.accuracy: 1.0, nutrition.nutrient_r2: 0.5}'
Set JAX_COMPILATION_CACHE_DIR to reuse compiled programs between runs."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--graph", metavar="GRAPH_DIR", default=None,
                        help="graph directory written by 'jaxfood build-graph' [default: the embedded default graph]")
    parser.add_argument("--workdir", metavar="W", required=True, help="output directory (created)")
    parser.add_argument("--pretrained", metavar="DIR", default=None,
                        help="checkpoint directory of a pretrained encoder (e.g. PRETRAIN_WORKDIR/checkpoints) "
                             "[default: train from scratch]")
    parser.add_argument("--config", metavar="F", default=None, help="YAML file of configuration keys")
    parser.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], dest="overrides",
                        help="override one configuration key (repeatable)")
    parser.add_argument("--biomarkers", metavar="F", default=None,
                        help="reference biomarkers (CSV feature,category) for precision@k "
                             "[default: the simulator's ground truth for the embedded graph, else none]")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or log lines")
    add_data_parallel_arguments(parser)


def spread_line(what: str, result) -> str:
    """One line on how a training run was spread: shards, processes, devices, graph, resume, speed."""
    spread = result.spread
    return (f"{what}: {spread['num_shards']} shard(s) per step on {spread['process_count']} process(es), "
            f"{spread['device_count']} device(s), {'sampled subgraphs' if spread['sampled'] else 'full graph'}"
            f"{f', resumed from step {result.start_step}' if result.start_step else ''}; "
            f"{result.edges_per_second:.3g} edges/s")


def load_graph_arg(graph_dir: str | None):
    """The graph of ``--graph``, or the embedded default graph."""
    if graph_dir:
        from jaxfood.graph.hetero_graph import load_graph

        return load_graph(graph_dir)
    from jaxfood.data.default import build_default_graph

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the embedded data's deliberate gaps are not news here
        return build_default_graph(seed=0)


def print_summary(metrics: dict, out=None) -> None:
    """A short table of the headline metrics (to ``out``, default: the current ``sys.stdout``)."""
    out = out if out is not None else sys.stdout
    fc, nu, sm = metrics["food_classification"], metrics["nutrition"], metrics["salient_molecules"]
    k = sm.get("k", 10)
    rows = [
        ("food classification", "accuracy", fc["accuracy"]), ("", "weighted F1", fc["weighted_f1"]),
        ("", "AUROC (macro)", fc["auroc_macro"]), ("", "top-3 accuracy", fc["top3_accuracy"]),
        ("nutrition", "k-NN purity (held-out Food)", nu.get("knn_purity")),
        ("", "distance Spearman (held-out Food)", nu.get("spearman")),
        ("", "nutrient R²", nu.get("nutrient_r2")),
        ("salient molecules", f"precision@{k} ({sm.get('scorer')})", sm.get(f"precision_at_{k}")),
        ("", "fidelity+", sm["fidelity_plus"]), ("", "fidelity-", sm["fidelity_minus"]),
    ]
    for section, name, value in rows:
        shown = "n/a" if value is None or value != value else f"{value:.3f}"
        print(f"{section:<20}{name:<32}{shown:>8}", file=out)
    weights = metrics.get("task_weights", {})
    shown = ", ".join(f"{t} {w:.2f}" for t, w in weights.items() if isinstance(w, float))
    print(f"task weights ({weights.get('method', '?')}): {shown}", file=out)


def run(args) -> int:
    # Joins a multi-host job before anything touches a device.
    from jaxfood.train.processes import init_from_args

    info = init_from_args(args)
    from tqdm import tqdm

    from jaxfood import workflows
    from jaxfood.config import load_config
    from jaxfood.io_utils import check_output_dir
    from jaxfood.train.adapt import adapt_and_report
    from jaxfood.train.finetune import FinetuneConfig, check_config
    from jaxfood.train.parallel_options import options_from_args
    from jaxfood.train.preemption import PREEMPTED_EXIT, Preempted

    start = time.perf_counter()
    options = options_from_args(args)
    workdir = check_output_dir(args.workdir, "--workdir")
    cfg = check_config(load_config(FinetuneConfig(), args.config, args.overrides))  # before any work
    if args.pretrained is not None and not Path(args.pretrained).is_dir():
        raise UserError(f"--pretrained {args.pretrained}: checkpoint directory not found")
    graph = load_graph_arg(args.graph)
    from jaxfood.commands.evaluate import check_biomarkers_arg

    check_biomarkers_arg(args.biomarkers, graph)
    progress = not args.quiet and sys.stderr.isatty()
    log = None if args.quiet else (lambda msg: tqdm.write(msg, file=sys.stderr))
    cfg = adapt_and_report(cfg, graph, log or (lambda msg: None))  # defaults follow the graph
    try:
        result = workflows.finetune(graph, cfg, workdir, pretrained=args.pretrained, biomarkers=args.biomarkers,
                                    options=options, progress=progress, log=log)
    except Preempted as stopped:
        if info.is_primary:
            print(stopped)
        return PREEMPTED_EXIT
    if not info.is_primary:
        return 0
    print(spread_line("data parallel", result))
    composed = ("" if result.composed_step is None
                else f" with the {' and '.join(result.composed_parts or ())} of step {result.composed_step}")
    print(f"fine-tuned: {result.checkpoint_dir} (best step {result.best_step}{composed}, "
          f"{len(result.history['train'])} steps, {result.num_step_compilations} compilation)")
    print_summary(result.metrics)
    print(f"wrote {workdir}/metrics.json, history.json, tb/, figures/ in {time.perf_counter() - start:.1f} s")
    return 0
