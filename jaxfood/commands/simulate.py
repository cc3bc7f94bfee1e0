"""``jaxfood simulate``: write the embedded simulated dataset in the formats users have."""

from __future__ import annotations

import argparse

NAME = "simulate"
HELP = "write the simulated FoodOmics-like dataset (real USDA foods and nutrients) as real-format files"
DESCRIPTION = """\
Simulates an untargeted LC-MS/MS food study over 65 real USDA foods (15 food categories, 33
nutrients per 100 g from USDA SR Legacy) and writes it in the formats jaxfood reads:

  feature_table.csv        GNPS/MZmine quantification table ('row ID', 'row m/z',
                           'row retention time', '<file> Peak area' per sample); for the large
                           preset feature_table.npz (jaxfood sparse format) instead
  metadata.csv             filename, sample_type_group1..5 (group5 = food label), ndb_number
  nutrients.csv            food, USDA provenance columns, one 'Name (unit)' column per nutrient
  molecule_embeddings.npy  synthetic spectral embeddings [K, 32] + molecule_ids.txt
  biomarkers.csv           feature,category: planted food biomarkers (ground truth)
  molecules.csv            feature,chemical_class,role,target: the full ground truth
  simulation.json          preset, seed and counts

Presets: 'default' (520 samples, 1,500 molecules, ~97k peaks; seconds) and 'large' (5,200
samples, 200,000 molecules, ~14.6M peaks; GNPS-scale, for the scale-out benchmarks). The same
seed gives identical files. Build a graph from them with:

  jaxfood build-graph --out GRAPH --feature-table DIR/feature_table.csv \\
      --metadata DIR/metadata.csv --nutrients DIR/nutrients.csv \\
      --molecule-embeddings DIR/molecule_embeddings.npy
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="directory to write into (created; files of the same names are replaced)")
    parser.add_argument("--preset", choices=("default", "large"), default="default",
                        help="dataset size (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; the same seed gives identical files "
                        "(default: %(default)s)")
    parser.add_argument("--feature-format", choices=("auto", "csv", "npz"), default="auto",
                        help="feature table as wide GNPS/MZmine CSV or jaxfood sparse .npz; auto: CSV unless "
                             "too large (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    import time

    from tqdm import tqdm

    from jaxfood.data.simulate import simulate
    from jaxfood.data.simulated_files import dataset_summary, write_dataset
    from jaxfood.io_utils import check_output_dir

    check_output_dir(args.out, "--out")
    start = time.perf_counter()
    with tqdm(total=2, desc=f"simulate ({args.preset})", unit="step", leave=False) as bar:
        dataset = simulate(preset=args.preset, seed=args.seed)
        bar.update(1)
        bar.set_description("write files")
        paths = write_dataset(dataset, args.out, feature_format=args.feature_format)
        bar.update(1)
    s = dataset_summary(dataset)
    per = s["peaks_per_sample"]
    print(f"simulated preset '{s['preset']}' (seed {s['seed']}) in {time.perf_counter() - start:.1f} s")
    print(f"  samples {s['samples']:,}  molecules {s['molecules']:,}  peaks {s['entries']:,} "
          f"(per sample: median {per['median']:.0f}, range {per['min']}-{per['max']})")
    print(f"  foods {s['foods']} in {s['food_categories']} USDA categories, {s['nutrients']} nutrients; "
          f"{s['biomarkers']} planted biomarkers, {s['molecules_without_embedding']} molecules without embedding")
    print(f"wrote {args.out}/")
    for path in paths.values():
        print(f"  {path.name}")
    return 0
