"""``jaxfood build-graph``: files (or the embedded default) -> a validated graph directory."""

from __future__ import annotations

import argparse
import sys
import time
import warnings

from jaxfood.errors import UserError

NAME = "build-graph"
HELP = "build the Sample-Molecule-Food-Nutrient graph from your files or the embedded default"
DESCRIPTION = """\
Builds the heterogeneous graph and writes OUT/graph.npz, OUT/graph.json (schema, id maps,
normalisation statistics) and OUT/summary.json (node, edge and split counts).

Inputs, one of:
  (none)                        the embedded default: simulated samples of real USDA foods,
                                written to real file formats and read back like your files
  --feature-table F --metadata F [--nutrients F|DIR] [--molecule-embeddings F [--molecule-ids F]]
                                a GNPS/MZmine feature table (CSV: 'row ID', 'row m/z',
                                'row retention time', '<filename> Peak area'; or jaxfood .npz),
                                sample metadata (CSV: 'filename' + the label column), optional
                                nutrients (wide CSV: 'food' + 'Name (unit)' columns, or a USDA
                                FoodData Central CSV directory joined through the metadata's
                                ndb_number). Without --nutrients the graph has no Nutrient nodes
                                and the nutrition task is off; everything else works.
  --mwtab F [--label-column FACTOR] [--nutrients F|DIR]
                                a Metabolomics Workbench study (mwTab text or JSON, mwtab package)
                                in place of the feature table and metadata
  with either, --network F      GNPS molecular networking edges (CLUSTERID1, CLUSTERID2, Cosine)
                                -> (Molecule, is_similar_to, Molecule) with the cosine as attribute
  with either, --spectra F.mgf  MS/MS spectra exported by GNPS FBMN beside the quant table
                                (FEATURE_ID or SCANS = 'row ID'; needs matchms:
                                pip install -e ".[spectra]"), cleaned with matchms, binned (1 Da),
                                sqrt-scaled and reduced by truncated SVD to <= 64 dims: the Molecule
                                input features (in place of --molecule-embeddings; a molecule
                                without a spectrum gets a zero row)
    [--spectra-network [--min-cosine X] [--min-matched-peaks N]]
                                also link molecules whose spectra have a matchms CosineGreedy score
                                >= X (default 0.7) with >= N matched peaks (default 6): the
                                is_similar_to relation, as --network would (in place of --network)
  --upstream-json F             the intermediate JSON of the PyTorch project (compatibility mode:
                                the same graph it builds; also writes hetero_graph_mappings.json)

Intensities are log1p-transformed and z-scored per molecule; nutrient amounts are z-scored per
nutrient; samples are split train/val/test stratified by food and only training samples keep
their is_instance_of (label) edge. Problems the data survives are printed as counted warnings;
bad input stops with one 'error:' line (exit status 2) and writes nothing."""


def _split(text: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(x) for x in text.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3 or any(not p > 0 for p in parts) or abs(sum(parts) - 1.0) > 1e-6:
        # A zero validation or test fraction leaves model selection or every test metric without samples.
        raise UserError(f"--split '{text}': expected three positive fractions (train, validation, test) summing "
                        "to 1, e.g. 0.7,0.15,0.15")
    return parts  # type: ignore[return-value]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--out", default="runs/graph", metavar="DIR",
                        help="output directory (created; files of the same name are replaced) [default: runs/graph]")
    files = parser.add_argument_group("your files")
    files.add_argument("--feature-table", metavar="F", help="GNPS/MZmine feature table (.csv) or jaxfood sparse table (.npz)")
    files.add_argument("--metadata", metavar="F", help="sample metadata CSV/TSV with 'filename' and the label column")
    files.add_argument("--nutrients", metavar="F|DIR", help="wide nutrient CSV or USDA FoodData Central CSV directory (optional: without it, no Nutrient "
                            "nodes and no nutrition task)")
    files.add_argument("--molecule-embeddings", metavar="F", help="spectral embeddings, .npy matrix [molecules, dim]")
    files.add_argument("--molecule-ids", metavar="F",
                       help="molecule ids of the embedding rows, one per line [default: molecule_ids.txt beside the .npy]")
    files.add_argument("--network", metavar="F",
                       help="GNPS molecular networking edge file (CLUSTERID1, CLUSTERID2, Cosine): "
                            "Molecule-is_similar_to-Molecule edges")
    files.add_argument("--spectra", metavar="F.mgf",
                       help="MS/MS spectra (MGF; FEATURE_ID or SCANS = row ID) as Molecule input features; "
                            "needs matchms: pip install -e \".[spectra]\"")
    files.add_argument("--spectra-network", action="store_true",
                       help="with --spectra: is_similar_to edges between molecules whose spectra match "
                            "(matchms CosineGreedy, see --min-cosine and --min-matched-peaks)")
    files.add_argument("--min-cosine", type=float, default=None, metavar="X",
                       help="--spectra-network: lowest cosine score of an edge [default: 0.7]")
    files.add_argument("--min-matched-peaks", type=int, default=None, metavar="N",
                       help="--spectra-network: fewest matched peaks of an edge [default: 6]")
    files.add_argument("--label-column", default=None, metavar="C",
                       help="metadata column holding the food label [default: sample_type_group5]")
    files.add_argument("--mwtab", metavar="F",
                       help="a Metabolomics Workbench study (mwTab text or JSON; needs the mwtab package) in place "
                            "of --feature-table and --metadata; --label-column names the class factor")
    up = parser.add_argument_group("compatibility mode")
    up.add_argument("--upstream-json", metavar="F", help="intermediate JSON of the PyTorch project")
    up.add_argument("--per-unit", action="store_true",
                    help="z-score amounts per (nutrient, unit) as upstream's --zscore-nutrients-by nutrient_unit")
    parser.add_argument("--preset", default="default", choices=("default", "large"),
                        help="embedded dataset size when no input files are given [default: default]")
    parser.add_argument("--seed", type=int, default=0, help="seed of the split (and of the embedded simulation) [default: 0]")
    parser.add_argument("--split", default=None, metavar="TRAIN,VAL,TEST",
                        help="split fractions [default: 0.7,0.15,0.15]")


def _check_args(args) -> str:
    native = [args.feature_table, args.metadata, args.nutrients]
    if args.upstream_json:
        given = [f"--{n}" for n, v in (("feature-table", args.feature_table), ("metadata", args.metadata),
                                       ("nutrients", args.nutrients), ("molecule-embeddings", args.molecule_embeddings),
                                       ("network", args.network), ("spectra", args.spectra),
                                       ("mwtab", args.mwtab),
                                       ("label-column", args.label_column), ("split", args.split)) if v]
        if given:
            raise UserError(f"--upstream-json cannot be combined with {', '.join(given)} "
                            "(compatibility mode takes everything from the JSON and splits nothing)")
        return "upstream"
    if args.per_unit:
        raise UserError("--per-unit applies only with --upstream-json")
    if args.spectra and args.molecule_embeddings:
        raise UserError("--spectra and --molecule-embeddings both give Molecule features; give one of them")
    if args.spectra_network and not args.spectra:
        raise UserError("--spectra-network needs --spectra (the MGF whose spectra are compared)")
    if args.spectra_network and args.network:
        raise UserError("--spectra-network and --network both give is_similar_to edges; give one of them")
    if (args.min_cosine is not None or args.min_matched_peaks is not None) and not args.spectra_network:
        raise UserError("--min-cosine and --min-matched-peaks apply only with --spectra-network")
    if args.mwtab:
        if args.feature_table or args.metadata:
            raise UserError("--mwtab replaces --feature-table and --metadata (the study file has both)")
        return "files"
    if any(native):
        missing = [f"--{n}" for n, v in zip(("feature-table", "metadata"), native) if not v]
        if missing:
            raise UserError(f"missing {', '.join(missing)} (--feature-table and --metadata go together; "
                            "--nutrients is optional)")
        return "files"
    if args.molecule_embeddings or args.label_column or args.network or args.spectra:
        raise UserError("--molecule-embeddings, --network, --spectra and --label-column need --feature-table and "
                        "--metadata")
    return "default"


def format_summary(summary: dict) -> str:
    """The summary as an aligned plain-text table."""
    rows = [("node type", "count")] + [(t, str(n)) for t, n in summary["nodes"].items()]
    rows += [("", ""), ("relation", "edges")] + [(k, str(n)) for k, n in summary["edges"].items()]
    rows += [("", ""), ("split", "samples")] + [(k, str(n)) for k, n in summary["splits"].items()]
    features = summary.get("molecule_features")
    if features:
        rows += [("", ""), (f"Molecule features ({features.get('source', 'given')})", str(features["width"]))]
    rows += [("", "")] + [(f"{what}: absent", why) for what, why in summary.get("absent", {}).items()]
    width = max(len(a) for a, _ in rows)
    return "\n".join(f"{a:<{width}}  {b:>8}" if a else "" for a, b in rows).rstrip()


def run(args) -> int:
    from tqdm import tqdm

    from jaxfood.graph.hetero_graph import save_graph, summary
    from jaxfood.io_utils import atomic_dir, check_output_dir

    mode = _check_args(args)
    if args.preset != "default" and mode != "default":
        raise UserError(f"--preset {args.preset} applies only to the embedded default (no input files)")
    if args.molecule_ids and not args.molecule_embeddings:
        raise UserError("--molecule-ids needs --molecule-embeddings")
    fractions = _split(args.split) if args.split else (0.7, 0.15, 0.15)
    out = check_output_dir(args.out, "--out")
    start = time.perf_counter()
    stages = tqdm(total=2, desc="build-graph", unit="step", file=sys.stderr, leave=False,
                  disable=not sys.stderr.isatty())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        stages.set_postfix_str("reading inputs and building")
        if mode == "upstream":
            from jaxfood.data.upstream import build_graph_from_upstream_json

            graph = build_graph_from_upstream_json(args.upstream_json, per_unit=args.per_unit)
        elif mode == "files":
            from jaxfood.data.build import build_graph
            from jaxfood.data.readers import DEFAULT_LABEL_COLUMN, read_tables

            tables = read_tables(args.feature_table, args.metadata, args.nutrients,
                                 molecule_embeddings=args.molecule_embeddings,
                                 label_column=args.label_column or (None if args.mwtab else DEFAULT_LABEL_COLUMN),
                                 molecule_ids=args.molecule_ids, network=args.network, mwtab=args.mwtab)
            if args.spectra:
                from jaxfood.data import spectra

                tables = spectra.with_spectra(
                    tables, args.spectra, network=args.spectra_network,
                    min_cosine=spectra.DEFAULT_MIN_COSINE if args.min_cosine is None else args.min_cosine,
                    min_matched_peaks=(spectra.DEFAULT_MIN_MATCHED_PEAKS if args.min_matched_peaks is None
                                       else args.min_matched_peaks))
            graph = build_graph(tables, seed=args.seed, split_fractions=fractions)
        else:
            from jaxfood.data.default import build_default_graph

            graph = build_default_graph(seed=args.seed, preset=args.preset, split_fractions=fractions)
        stages.update()
    messages = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    graph.meta.extra["warnings"] = messages
    stages.set_postfix_str("writing")
    with atomic_dir(out) as tmp:
        save_graph(graph, tmp)
        if mode == "upstream":
            from jaxfood.data.upstream import write_upstream_mappings

            write_upstream_mappings(graph, tmp / "hetero_graph_mappings.json")
    stages.update()
    stages.close()
    elapsed = time.perf_counter() - start
    for msg in messages:
        print(f"warning: {msg}", file=sys.stderr)
    if messages:
        print(f"{len(messages)} warning(s)", file=sys.stderr)
    print(format_summary(summary(graph)))
    print(f"\ngraph written to {out}/ (graph.npz, graph.json, summary.json) in {elapsed:.1f} s")
    return 0
