"""Warm ``jaxfood predict`` of one sample: wall time of the command as a user runs it.

    python benchmarks/bench_predict.py [--checkpoint runs/mtl/checkpoints] [--runs 5]

Writes two one-sample CSVs from the checkpoint's graph (``CHECKPOINT/../graph``, as run_mtl saves
it): the raw peak areas of two of its test samples with different numbers of molecules. Runs
``jaxfood predict --json`` once on the first to warm the caches (the persistent compilation cache
of ``jaxfood.compile_cache``, in a temporary directory unless ``--user-cache``), then ``--runs``
times on each, and prints every wall time (process start to exit) and, last, the median over all
timed runs (goal: <= 4 s on the 2-core development machine). The second sample has another
number of molecules padded to the same shapes where the test samples allow it: its first run
shows that a sample never predicted before reuses the compiled program.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def write_sample(graph, index: int, path: Path) -> int:
    """Sample ``index`` of ``graph`` as a one-sample CSV of raw peak areas; its molecule count."""
    from jaxfood.eval.predict import graph_sample_intensities

    ids, area = graph_sample_intensities(graph, index)
    path.write_text("molecule_id,intensity\n" + "".join(f"{m},{float(a)!r}\n" for m, a in zip(ids, area)))
    return len(ids)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="runs/mtl/checkpoints", help="a fine-tuning checkpoint directory "
                        "with its graph in CHECKPOINT/../graph [default: runs/mtl/checkpoints]")
    parser.add_argument("--runs", type=int, default=5, help="timed runs per sample [default: 5]")
    parser.add_argument("--user-cache", action="store_true", help="use the user's compilation cache, not a new one")
    args = parser.parse_args(argv)
    from jaxfood.eval.predict import padded_size
    from jaxfood.graph import schema
    from jaxfood.graph.hetero_graph import SPLIT_CODES, load_graph

    checkpoint = Path(args.checkpoint)
    graph_dir = checkpoint.resolve().parent / "graph"
    if not checkpoint.is_dir() or not graph_dir.is_dir():
        print(f"error: {checkpoint}: expected a checkpoint directory with its graph in {graph_dir} "
              "(run 'python experiments/run_mtl.py' first)", file=sys.stderr)
        return 2
    graph = load_graph(graph_dir)
    tmp = Path(tempfile.mkdtemp(prefix="bench-predict-"))
    env = dict(os.environ)
    if not args.user_cache:
        env["JAXFOOD_COMPILE_CACHE"] = str(tmp / "xla")
    try:
        test = np.nonzero(np.asarray(graph.sample_split) == SPLIT_CODES["test"])[0]
        sizes = {int(i): int(np.sum(np.asarray(graph.edges[schema.CONTAINS].senders) == i))
                 for i in test}
        first = max(sizes, key=sizes.get)
        # Another size padded to the same shapes if there is one (its first run then compiles
        # nothing), else the smallest (a new padded size: its first run compiles).
        same = [i for i in sizes if sizes[i] != sizes[first] and padded_size(sizes[i] + 1, 64) ==
                padded_size(sizes[first] + 1, 64)]
        second = max(same, key=sizes.get) if same else min(sizes, key=sizes.get)
        samples = [(tmp / "a.csv", write_sample(graph, first, tmp / "a.csv")),
                   (tmp / "b.csv", write_sample(graph, second, tmp / "b.csv"))]
        script = Path(sys.executable).parent / "jaxfood"  # the console script of this environment
        jaxfood = [str(script)] if script.is_file() else [sys.executable, "-m", "jaxfood.cli"]

        def run(path: Path) -> float:
            start = time.perf_counter()
            done = subprocess.run([*jaxfood, "predict", "--checkpoint", str(checkpoint), "--sample", str(path), "--json"],
                                  env=env, capture_output=True, text=True)
            seconds = time.perf_counter() - start
            if done.returncode != 0:
                raise SystemExit(f"jaxfood predict failed ({done.returncode}): {done.stderr.strip()[-500:]}")
            return seconds

        print(f"checkpoint {checkpoint}; samples of {samples[0][1]} and {samples[1][1]} molecules", flush=True)
        print(f"first run (empty caches unless --user-cache): {run(samples[0][0]):.2f} s", flush=True)
        times = []
        for path, molecules in samples:
            runs = [run(path) for _ in range(args.runs)]  # the second sample's first run: its first ever
            times += runs
            print(f"{molecules} molecules: " + " ".join(f"{t:.2f}" for t in runs) + " s", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"warm_predict_median_s: {statistics.median(times):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
