"""``jaxfood evaluate``: the test metrics of a fine-tuned checkpoint, reproduced exactly."""

from __future__ import annotations

import argparse
from pathlib import Path

from jaxfood.errors import UserError

NAME = "evaluate"
HELP = "score a fine-tuned checkpoint on a graph (the metrics 'jaxfood finetune' reported)"
DESCRIPTION = """\
Rebuilds the multi-task model from a 'jaxfood finetune' checkpoint directory and scores it on the
graph it was trained on: food classification on the test split (accuracy, weighted F1, macro
AUROC, top-3 accuracy, calibration error), nutrition (k-NN purity of Food embeddings by USDA
category, Spearman of embedding vs. nutrient distances, R² of estimated nutrient profiles) and
salient molecules (precision/recall@k of per-food rankings against reference biomarkers,
fidelity+ and fidelity- of every scorer). With the same graph the numbers equal those of the
run's metrics.json. Reference biomarkers: --biomarkers F, else those the checkpoint was scored
with."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--checkpoint", metavar="DIR", required=True,
                        help="checkpoint directory written by 'jaxfood finetune' (WORKDIR/checkpoints)")
    parser.add_argument("--graph", metavar="GRAPH_DIR", default=None,
                        help="graph directory written by 'jaxfood build-graph' [default: the embedded default graph]")
    parser.add_argument("--out", metavar="F", default=None, help="write the metrics as JSON to F")
    parser.add_argument("--split", choices=("test", "val", "train"), default="test", help="samples to score")
    add_reference_arguments(parser)


def add_reference_arguments(parser: argparse.ArgumentParser) -> None:
    """Options about the reference the salient molecules are scored against (extended by evaluation)."""
    parser.add_argument("--biomarkers", metavar="F", default=None,
                        help="reference biomarkers, CSV with columns feature,category "
                             "[default: those stored in the checkpoint]")


def evaluate_from_args(args) -> dict:
    """The metrics dict for parsed arguments (hook for extensions: seeds, baselines)."""
    from jaxfood.commands.finetune import load_graph_arg
    from jaxfood.workflows import evaluate

    if not Path(args.checkpoint).is_dir():
        raise UserError(f"--checkpoint {args.checkpoint}: checkpoint directory not found")
    graph = load_graph_arg(args.graph)
    check_biomarkers_arg(args.biomarkers, graph)
    return evaluate(args.checkpoint, graph, biomarkers=args.biomarkers, split=args.split)


def check_biomarkers_arg(path: str | None, graph) -> None:
    """Reads ``--biomarkers`` and reports how many rows match ``graph`` (none: UserError)."""
    import sys

    from jaxfood.eval.metrics import match_biomarkers, read_biomarkers
    from jaxfood.graph import schema

    if not path:
        return
    matched, total = match_biomarkers(read_biomarkers(path), graph.meta.node_ids[schema.FOOD],
                                      graph.meta.node_ids[schema.MOLECULE], path)
    if matched < total:
        print(f"warning: --biomarkers {path}: {matched} of {total} rows match the graph's foods and molecule ids; "
              "the others are ignored", file=sys.stderr)


def run(args) -> int:
    from jaxfood.commands.finetune import print_summary
    from jaxfood.io_utils import check_output_file, write_json

    if args.out:
        check_output_file(args.out, "--out")
    metrics = evaluate_from_args(args)
    print_summary(metrics)
    if args.out:
        write_json(args.out, metrics)
        print(f"wrote {args.out}")
    return 0
