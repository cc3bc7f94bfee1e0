"""Training with neighbour-sampled minibatches on the ``large`` simulator preset: memory and throughput.

    python benchmarks/bench_scale.py [--steps 20] [--set sampler.batch_size=64 --set per_device=2 ...]
    python benchmarks/bench_scale.py --task graphcl [--batch-size 64] [--set encoder.hidden_dim=64 ...]

Simulates the ``large`` preset in memory (5,200 samples, 200,000 molecules, ~15 M
``contains_molecule`` peaks, ~30 M edges with the reverses; no CSV is written), builds the graph,
and runs the data-parallel multi-task fine-tuning of :mod:`jaxfood.train.distributed` -- the same
job as ``experiments/pod/train.py`` -- on sampled subgraphs over every local device (one compiled
step for the whole run; checkpoints in a temporary directory). The full graph never enters a
device: each step moves only its padded subgraphs (per-id embedding tables are indexed by
``node_index``).

Printed: graph size, subgraph budgets, host sampling time per subgraph, compile and step times,
the sustained training throughput in real (unpadded) edges per second and seed samples per
second, the validation accuracy after the run, and, last, ``peak_rss_gb: X.X`` (peak resident
memory of this process, which holds the whole graph and its CSR adjacency).

``--task graphcl``: GraphCL pretraining steps on sampled subgraphs instead
(:class:`jaxfood.train.pretrain.PretrainSampler`, the data-parallel GraphCL step; ``--set`` then
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
                        help="DataParallelConfig override, e.g. sampler.batch_size=64 (graphcl: PretrainConfig)")
    parser.add_argument("--task", choices=("finetune", "graphcl"), default="finetune",
                        help="multi-task fine-tuning or GraphCL pretraining on sampled subgraphs")
    parser.add_argument("--batch-size", type=int, default=64, help="graphcl: seed samples per subgraph")
    args = parser.parse_args(argv)

    import jax

    from jaxfood.config import load_config
    from jaxfood.data.build import build_graph
    from jaxfood.data.simulate import simulate
    from jaxfood.graph.sampling import NeighbourSampler
    from jaxfood.train.distributed import DataParallelConfig, finetune_data_parallel

    if args.task == "graphcl":
        from jaxfood.train.pretrain import PretrainConfig

        cfg = load_config(PretrainConfig(), None, args.set)
    else:
        cfg = load_config(DataParallelConfig(), None, [f"steps={args.steps}", "checkpoint_every=0",
                                                       "log_every=5", "eval_batches=8"] + args.set)
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
        return bench_graphcl(graph, cfg, args)

    sampler_cfg = cfg.sampler.__class__(**{**cfg.sampler.__dict__, "num_hops": cfg.encoder.num_layers,
                                           "seed": cfg.seed})
    t0 = time.perf_counter()
    sampler = NeighbourSampler(graph, sampler_cfg)
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
    del subs

    with tempfile.TemporaryDirectory() as workdir:
        t0 = time.perf_counter()
        report = finetune_data_parallel(graph, cfg, workdir, progress=False)
        t_total = time.perf_counter() - t0
    steps = report["steps"]
    train_s = report["train_seconds"]
    per_step = train_s / max(steps - 1, 1)
    seeds_per_step = report["seeds_per_step"]
    final = report["final_metrics"]
    print(f"run: {steps} steps x {report['num_shards']} subgraph(s) ({seeds_per_step} seeds/step), "
          f"{report['compilations']} compilation(s); total {t_total:.1f} s, of which first step + setup "
          f"{t_total - train_s:.1f} s; {per_step:.3f} s/step after it")
    print(f"final loss/total {final.get('loss/total', float('nan')):.4f}; val accuracy "
          f"{report.get('evaluation', {}).get('val/accuracy', float('nan')):.3f} "
          f"(chance {1 / graph.num_nodes['Food']:.3f})")
    print(f"throughput: {report['edges_per_second']:,.0f} edges/s sustained, "
          f"{seeds_per_step / per_step:,.1f} seed samples/s")
    print(f"peak_rss_gb: {peak_rss_gb():.1f}")
    return 0


def bench_graphcl(graph, cfg, args) -> int:
    """Sampled GraphCL steps over every local device (one subgraph per device per step)."""
    import jax

    from jaxfood.graph.sampling import SamplerConfig
    from jaxfood.train import distributed as dist
    from jaxfood.train import pretrain as pt

    t0 = time.perf_counter()
    views = pt.PretrainSampler(graph, cfg, SamplerConfig(batch_size=args.batch_size, seed=cfg.seed))
    t_sampler = time.perf_counter() - t0
    t0 = time.perf_counter()
    subs = [views.batch(i) for i in range(5)]
    t_sample = (time.perf_counter() - t0) / 5
    real = np.mean([int(sum(np.asarray(m).sum() for m in s.edge_masks.values())) for s in subs])
    print(f"sampler: built in {t_sampler:.1f} s; {args.batch_size} seeds/subgraph, budgets "
          f"{views.sampler.node_budget}, {sum(s.senders.shape[0] for s in subs[0].graph.edges.values()):,} edge "
          f"slots ({views.counts} candidates); {real:,.0f} real edges; sampling {t_sample * 1e3:.1f} ms/subgraph")
    del subs
    # Per-id tables sized by the full graph (the sampler's graph: no global candidate pool to draw);
    # parameters initialised on a subgraph, so the full graph never enters a device.
    model = pt.make_model(views.sampler.graph, cfg)
    optimizer, _ = pt.make_optimizer(cfg, args.steps)
    example = views.batch(0)
    params = model.init(jax.random.PRNGKey(0), example.graph, node_index=example.node_index)
    state = jax.tree_util.tree_map(np.asarray, {"params": params, "opt_state": optimizer.init(params)})
    step = dist.data_parallel(dist.pretrain_step_fn(model, optimizer), seed=cfg.seed)

    def count_edges(batch):
        return int(sum(np.asarray(m).sum() for m in batch.edge_masks.values()))

    t0 = time.perf_counter()
    result = dist.fit(step, state, views.batch, args.steps, log_every=args.steps, count_edges=count_edges)
    total = time.perf_counter() - t0
    per_step = result.seconds / max(args.steps - 1, 1)
    print(f"run: {args.steps} steps x {step.layout.num_shards} subgraph(s), {step.compile_count()} compilation(s); "
          f"total {total:.1f} s, first step + setup {total - result.seconds:.1f} s; {per_step:.3f} s/step after it")
    print(f"final loss {result.history[-1]['loss']:.4f}; throughput {1 / per_step:.2f} steps/s, "
          f"{result.edges_per_second:,.0f} edges/s sustained")
    print(f"peak_rss_gb: {peak_rss_gb():.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
