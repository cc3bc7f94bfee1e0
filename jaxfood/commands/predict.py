"""``jaxfood predict``: foods, nutrients and driving molecules of new samples."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from jaxfood.errors import UserError

NAME = "predict"
HELP = "predict the food, nutrient profile and driving molecules of new samples with a fine-tuned checkpoint"
DESCRIPTION = """\
Adds the sample(s) of --sample to the graph the checkpoint was fine-tuned on as new Sample nodes
(contains_molecule edges, no label edge), normalised exactly as training (log1p, then the
per-molecule z-score stored with the graph), and runs the model in eval mode.

--sample F.csv is either one sample, columns 'molecule_id,intensity' (raw peak areas >= 0; rows with
0 are not detected), or a GNPS/MZmine feature table ('row ID' + '<file> Peak area' columns) of many
samples. Molecule ids the graph lacks are counted, reported and ignored; a sample with none known
is an error.

Per sample: the top-k foods with probabilities, the estimated nutrient profile in real units per
100 g (de-normalised with the graph's nutrient statistics), the molecules that drove the
prediction (ranked by the model's headline attribution: each measured intensity's share of the
predicted food's logit through the classifier's linear path, positive = for that food; models
without that path rank by their attention-pooling weights), and an out-of-library score: high
when the sample looks like no food the model was trained on. It is flagged above the 95th
percentile of the scores of the graph's validation samples (about 5% false alarms by design).

--ool-score mahalanobis (default): squared Mahalanobis distance of the sample's embedding to the
nearest food (one Gaussian per food, shared Ledoit-Wolf covariance, fitted on the training samples
seen without their label edges; Lee et al. 2018). msp: 1 - max softmax probability (the earlier
default); energy: -logsumexp(logits); knn: cosine distance to the 5th nearest training sample.
Measured on the embedded data (5 foods held out entirely from training, 40 of their samples vs 60
samples of known foods the model never saw, 3 draws; python benchmarks/bench_ool.py): mahalanobis
detects 37.5/7.5/5% with 5/6.7/0% false alarms (AUROC 0.76/0.67/0.72); knn 22.5/0/10% with
5/1.7/3.3% (AUROC 0.81/0.66/0.79); msp 7.5/17.5/25% with 11.7/10/5% (AUROC 0.55/0.66/0.63).
A weak detector on these data: treat the flag as a hint, not a verdict.

Graph: --graph, else CHECKPOINT/../graph (saved by experiments/run_mtl.py), else the embedded
default graph with the seed recorded in the checkpoint; it must match the checkpoint's node ids.

--json prints {"checkpoint", "graph", "source", "num_samples", "molecule_ranking"
("intensity_attribution" or "attention"), "out_of_library": {score, method,
threshold, quantile, calibration}, "samples": [{sample_id, molecules_detected, molecules_known,
molecules_unknown, unknown_examples, top_foods: [{food, probability}], nutrients_per_100g: {name:
value}, nutrients_outside_training_range: [name], top_molecules: [{molecule_id, mz, rt, annotation
(null where the table lacks them), attribution, weight, intensity}],
out_of_library_score, out_of_library}], "nutrient_training_range": {name: [low, high]}}.
Nutrient amounts are >= 0; an estimate outside the range of the foods with training samples is an
extrapolation and is flagged."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--checkpoint", metavar="DIR", required=True,
                        help="checkpoint directory written by 'jaxfood finetune' (WORKDIR/checkpoints)")
    parser.add_argument("--sample", metavar="F", required=True,
                        help="CSV 'molecule_id,intensity' (one sample) or a GNPS feature table (many samples)")
    parser.add_argument("--graph", metavar="GRAPH_DIR", default=None,
                        help="graph directory the checkpoint was fine-tuned on [default: CHECKPOINT/../graph, "
                             "else the embedded default graph]")
    parser.add_argument("--top-k", type=int, default=5, help="number of foods listed per sample [default: 5]")
    parser.add_argument("--top-molecules", type=int, default=10,
                        help="number of driving molecules listed per sample [default: 10]")
    parser.add_argument("--ool-score", default="mahalanobis", choices=("mahalanobis", "msp", "energy", "knn"),
                        help="out-of-library score (see above) [default: mahalanobis]")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


def resolve_graph(checkpoint: Path, graph_dir: str | None, meta: dict):
    """``(graph, description)``: --graph, else CHECKPOINT/../graph, else the embedded default."""
    import warnings

    from jaxfood.graph.hetero_graph import load_graph

    if graph_dir:
        if not Path(graph_dir).is_dir():
            raise UserError(f"--graph {graph_dir}: graph directory not found")
        return load_graph(graph_dir), str(graph_dir)
    sibling = checkpoint.resolve().parent / "graph"
    if sibling.is_dir():
        return load_graph(sibling), str(sibling)
    from jaxfood.data.default import build_default_graph

    sources = meta.get("graph_sources") or {}
    embedded = sources.get("embedded_default") if isinstance(sources, dict) else None
    seed = int((embedded or {}).get("seed", (meta.get("config") or {}).get("seed", 0)))
    preset = str((embedded or {}).get("preset", "default"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the embedded data's deliberate gaps are not news here
        return build_default_graph(seed=seed, preset=preset), f"embedded default (preset {preset}, seed {seed})"


def print_table(result: dict, out=None) -> None:
    out = out or sys.stdout
    ool = result["out_of_library"]
    print(f"{result['num_samples']} sample(s) from {result['source']}; graph: {result['graph']}", file=out)
    print(f"out-of-library score: {ool['score']}; flagged above {ool['threshold']:.3f} ({ool['calibration']})",
          file=out)
    for s in result["samples"]:
        flag = "  ** OUT OF LIBRARY? **" if s["out_of_library"] else ""
        print(f"\n== {s['sample_id']}: {s['molecules_known']} known molecule(s), {s['molecules_unknown']} unknown "
              f"(ignored{': e.g. ' + ', '.join(s['unknown_examples']) if s['unknown_examples'] else ''}); "
              f"out-of-library score {s['out_of_library_score']:.3f}{flag}", file=out)
        print(f"  {'food':<40} probability", file=out)
        for f in s["top_foods"]:
            print(f"  {f['food'][:40]:<40} {f['probability']:.3f}", file=out)
        print(f"  {'nutrient (per 100 g)':<40} estimate", file=out)
        outside = set(s.get("nutrients_outside_training_range", ()))
        ranges = result.get("nutrient_training_range", {})
        for name, v in s["nutrients_per_100g"].items():
            note = ""
            if name in outside and name in ranges:
                lo, hi = ranges[name]
                note = f"  ** outside the training foods' range {lo:.4g}-{hi:.4g}: an extrapolation **"
            print(f"  {name[:40]:<40} {v:.4g}{note}", file=out)
        if s["top_molecules"]:
            by_attribution = result.get("molecule_ranking") == "intensity_attribution"
            print(f"  {'driving molecule':<40} {'attribution' if by_attribution else 'weight'}", file=out)
            for m in s["top_molecules"]:
                value = m["attribution"] if by_attribution else m["weight"]
                print(f"  {m['molecule_id'][:40]:<40} {value:+.3f}" if by_attribution else
                      f"  {m['molecule_id'][:40]:<40} {value:.3f}", file=out)


def _json_ready(x):
    """NaN/inf (no validation sample, no training food) become null: they are not JSON."""
    if isinstance(x, dict):
        return {k: _json_ready(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json_ready(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def run(args) -> int:
    from jaxfood.eval.predict import predict_samples, read_sample_file
    from jaxfood.train.checkpoint import read_meta
    from jaxfood.train.finetune import load_finetuned

    if args.top_k < 1 or args.top_molecules < 0:
        raise UserError("--top-k must be >= 1 and --top-molecules >= 0")
    checkpoint = Path(args.checkpoint)
    if not checkpoint.is_dir():
        raise UserError(f"--checkpoint {args.checkpoint}: checkpoint directory not found")
    table = read_sample_file(args.sample)
    meta = read_meta(checkpoint)  # the state is read once, by load_finetuned
    graph, graph_desc = resolve_graph(checkpoint, args.graph, meta)
    loaded = load_finetuned(checkpoint, graph)  # checks the graph against the checkpoint's id maps
    result = predict_samples(loaded, graph, table, top_k=args.top_k, top_molecules=args.top_molecules,
                             ool_score=args.ool_score)
    result = {"checkpoint": str(checkpoint), "graph": graph_desc, **result}
    if args.json:
        print(json.dumps(_json_ready(result), indent=2, allow_nan=False))
    else:
        print_table(result)
    return 0
