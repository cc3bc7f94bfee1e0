"""Training with neighbour-sampled minibatches on the ``large`` simulator preset: memory and throughput.

    python benchmarks/bench_scale.py [--steps 20] [--batch-size 64] [--per-device 2] [--set heads.hidden_dim=64 ...]
    python benchmarks/bench_scale.py --task graphcl [--batch-size 64] [--set encoder.hidden_dim=64 ...]

Simulates the ``large`` preset in memory (5,200 samples, 200,000 molecules, ~15 M
``contains_molecule`` peaks, ~30 M edges with the reverses; no CSV is written), builds the graph,
and runs multi-task fine-tuning (:func:`jaxfood.train.finetune.finetune`, the one training loop,
as ``experiments/pod/train.py`` runs it) on sampled subgraphs over every local device (one compiled
step for the whole run; checkpoints in a temporary directory; no validation). The full graph never enters a
device: each step moves only its padded subgraphs (per-id embedding tables are indexed by
``node_index``).

Printed: graph size, subgraph budgets, host sampling time per subgraph, compile and step times,
the sustained training throughput in real (unpadded) edges per second and seed samples per
second, and, last, ``peak_rss_gb: X.X`` (peak resident
memory of this process, which holds the whole graph and its CSR adjacency).

``--task graphcl``: GraphCL pretraining steps on sampled subgraphs instead
(:class:`jaxfood.train.graphcl.PretrainSampler`, the GraphCL step in the same loop; ``--set`` then
addresses ``PretrainConfig``): steps per second and edges per second, then ``peak_rss_gb``.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: KiB


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="large", help="simulator preset")
    parser.add_argument("--steps", type=int, default=20, help="training steps (the first one compiles)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="FinetuneConfig override, e.g. heads.hidden_dim=64 (graphcl: PretrainConfig)")
    parser.add_argument("--task", choices=("finetune", "graphcl"), default="finetune",
                        help="multi-task fine-tuning or GraphCL pretraining on sampled subgraphs")
    parser.add_argument("--batch-size", type=int, default=64, help="seed samples per subgraph")
    parser.add_argument("--per-device", type=int, default=1, help="subgraphs per device per step")
    args = parser.parse_args(argv)

    import jax

    from jaxfood.config import load_config
    from jaxfood.data.build import build_graph
    from jaxfood.data.simulate import simulate
    from jaxfood.graph.sampling import NeighbourSampler, SamplerConfig
    from jaxfood.train.finetune import FinetuneConfig, finetune, prepare_graph
    from jaxfood.train.graphcl import PretrainConfig
    from jaxfood.train.parallel_options import DataParallelOptions

    options = DataParallelOptions(sampled=True, batch_size=args.batch_size, per_device=args.per_device)
    if args.task == "graphcl":
        cfg = load_config(PretrainConfig(), None, ["epochs=1", f"steps_per_epoch={args.steps}"] + args.set)
    else:
        cfg = load_config(FinetuneConfig(), None, [f"steps={args.steps}", "tensorboard=false"] + args.set)
    t0 = time.perf_counter()
    dataset = simulate(args.preset, seed=0)
    t_sim = time.perf_counter() - t0
    t0 = time.perf_counter()
    graph = build_graph(dataset.tables, seed=0)
    t_build = time.perf_counter() - t0
    del dataset
    edges = {k: e.num_edges for k, e in graph.edges.items()}
    print(f"device: {jax.devices()[0].device_kind} x {jax.local_device_count()} ({jax.default_backend()})")
    print(f"graph ({args.preset}): {graph.num_nodes}, {sum(edges.values()):,} edges "
          f"({edges['Sample|contains_molecule|Molecule']:,} contains_molecule); simulate {t_sim:.1f} s, "
          f"build {t_build:.1f} s")
    if args.task == "graphcl":
        return bench_graphcl(graph, cfg, options)

    sampler_cfg = SamplerConfig(batch_size=args.batch_size, num_hops=cfg.encoder.num_layers, seed=cfg.seed)
    t0 = time.perf_counter()
    sampler = NeighbourSampler(prepare_graph(graph).to_numpy(), sampler_cfg)
    t_csr = time.perf_counter() - t0
    t0 = time.perf_counter()
    subs = [sampler.batch(i) for i in range(10)]
    t_sample = (time.perf_counter() - t0) / 10
    real = np.mean([s.num_real_edges for s in subs])
    budget = sum(sampler.edge_budget.values())
    print(f"sampler: CSR built in {t_csr:.1f} s; {sampler_cfg.batch_size} seeds/subgraph, fan-outs "
          f"{ {k.split('|')[1]: v for k, v in sampler.fanouts.items() if any(v)} }")
    print(f"subgraph budget: nodes {sampler.node_budget}, {budget:,} edges; real edges {real:,.0f} "
          f"({real / budget:.0%} of the budget); sampling {t_sample * 1e3:.1f} ms/subgraph on the host")
    del subs, sampler

    with tempfile.TemporaryDirectory() as workdir:
        t0 = time.perf_counter()
        result = finetune(graph, cfg, workdir, options=options, progress=False)
        t_total = time.perf_counter() - t0
    report_run(result, t_total, args.steps, args.batch_size)
    print(f"final loss/total {result.history['train'][-1]['loss/total']:.4f}")
    print(f"peak_rss_gb: {peak_rss_gb():.1f}")
    return 0


def report_run(result, t_total: float, steps: int, batch_size: int) -> None:
    spread = result.spread
    # Throughput counts from the second step (the first compiles): edges/s gives the train time.
    seeds_per_step = spread["num_shards"] * batch_size
    print(f"run: {steps} steps x {spread['num_shards']} subgraph(s) ({seeds_per_step} seeds/step), "
          f"{result.num_step_compilations} compilation(s); total {t_total:.1f} s")
    print(f"throughput: {result.edges_per_second:,.0f} edges/s sustained")


def bench_graphcl(graph, cfg, options) -> int:
    """Sampled GraphCL steps over every local device (one subgraph per device per step)."""
    from jaxfood.graph.sampling import SamplerConfig
    from jaxfood.train.graphcl import PretrainSampler
    from jaxfood.train.pretrain import pretrain

    t0 = time.perf_counter()
    views = PretrainSampler(graph, cfg, SamplerConfig(batch_size=options.batch_size, seed=cfg.seed))
    t_sampler = time.perf_counter() - t0
    t0 = time.perf_counter()
    subs = [views.batch(i) for i in range(5)]
    t_sample = (time.perf_counter() - t0) / 5
    real = np.mean([int(sum(np.asarray(m).sum() for m in s.edge_masks.values())) for s in subs])
    print(f"sampler: built in {t_sampler:.1f} s; {options.batch_size} seeds/subgraph, budgets "
          f"{views.sampler.node_budget}, {sum(s.senders.shape[0] for s in subs[0].graph.edges.values()):,} edge "
          f"slots ({views.counts} candidates); {real:,.0f} real edges; sampling {t_sample * 1e3:.1f} ms/subgraph")
    del subs, views
    with tempfile.TemporaryDirectory() as workdir:
        t0 = time.perf_counter()
        result = pretrain(graph, cfg, workdir, options=options, progress=False)
        total = time.perf_counter() - t0
    print(f"run: {cfg.steps_per_epoch} steps x {result.spread['num_shards']} subgraph(s), "
          f"{result.num_step_compilations} compilation(s); total {total:.1f} s (with the held-out view loss on "
          f"fixed subgraphs and the read-out embeddings of the full graph)")
    print(f"final loss {result.history['loss'][-1]:.4f}; {result.edges_per_second:,.0f} edges/s sustained")
    print(f"peak_rss_gb: {peak_rss_gb():.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
