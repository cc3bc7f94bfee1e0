"""Training-step speed of the jitted JAX encoder vs the PyTorch Geometric original, on one graph.

    python benchmarks/bench_step.py [--steps 10] [--scales 0.25,0.5,1,2] [--skip-scaling]

Builds one synthetic graph at the scale of the food metabolomics data -- 1,500 samples, 20,000
molecules, 500 foods, 38 nutrients, 300 molecules per sample (intensity attribute), every food
with all nutrients (quantity + unit one-hot attribute), reverse relations: about 0.94 M edges --
and times a full training step (forward, backward, AdamW update) of

- jaxfood's ``HeteroGATEncoder`` under ``jax.jit`` and
- the PyG equivalent (``HeteroConv`` of ``GATConv`` per relation, ``add_self_loops=False``),

both with 2 layers, hidden 128, 4 heads, dropout 0.2 (training mode), learned node embeddings of
width 128 and the same loss: food cross-entropy of a linear head on the sample embeddings plus the
mean squared embedding of every node type (so no side can skip computing any node type).

Each side runs in its own subprocess (so thread pools and peak memory do not mix), builds the
same graph from the same seed, compiles / warms up, then times ``--steps`` steps. Printed: median
(and min) wall-clock step time of each, CPU time per step (user + system, all threads: less
sensitive than wall time to other load on a shared machine), peak resident memory of each
process, XLA's temporary buffers of the compiled JAX step, the JAX step time at 0.25x, 0.5x, 1x
and 2x the edges (molecules per sample scaled; node counts fixed) and, last,
``speedup_vs_pyg: X.XX`` (PyG median / JAX median wall-clock step time at 1x).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NUM_SAMPLES, NUM_MOLECULES, NUM_FOODS, NUM_NUTRIENTS = 1500, 20_000, 500, 38
MOLECULES_PER_SAMPLE = 300
NUM_UNITS = 3
HIDDEN, HEADS, LAYERS, DROPOUT = 128, 4, 2, 0.2
LEARNING_RATE, WEIGHT_DECAY = 1e-3, 1e-2

CONTAINS = "Sample|contains_molecule|Molecule"
IS_INSTANCE_OF = "Sample|is_instance_of|Food"
HAS_NUTRIENT = "Food|has_nutrient|Nutrient"


def reverse(key: str) -> str:
    src, rel, dst = key.split("|")
    return f"{dst}|rev_{rel}|{src}"


def make_arrays(scale: float = 1.0, seed: int = 0) -> dict:
    """The benchmark graph as plain numpy arrays (both workers build it identically)."""
    rng = np.random.default_rng(seed)
    per_sample = int(round(MOLECULES_PER_SAMPLE * scale))
    # Distinct molecules per sample: the first `per_sample` of a random ordering (Gumbel top-k).
    keys = rng.random((NUM_SAMPLES, NUM_MOLECULES), dtype=np.float32)
    molecules = np.argpartition(keys, per_sample, axis=1)[:, :per_sample]
    contains_s = np.repeat(np.arange(NUM_SAMPLES), per_sample)
    contains_m = molecules.reshape(-1)
    intensity = rng.normal(size=(contains_s.size, 1)).astype(np.float32)
    sample_food = rng.integers(0, NUM_FOODS, NUM_SAMPLES)
    food = np.repeat(np.arange(NUM_FOODS), NUM_NUTRIENTS)
    nutrient = np.tile(np.arange(NUM_NUTRIENTS), NUM_FOODS)
    quantity = rng.normal(size=(food.size, 1)).astype(np.float32)
    unit = np.eye(NUM_UNITS, dtype=np.float32)[nutrient % NUM_UNITS]
    forward = {
        CONTAINS: (contains_s, contains_m, intensity),
        IS_INSTANCE_OF: (np.arange(NUM_SAMPLES), sample_food, np.zeros((NUM_SAMPLES, 0), np.float32)),
        HAS_NUTRIENT: (food, nutrient, np.concatenate([quantity, unit], axis=1)),
    }
    edges = dict(forward)
    for key, (s, r, a) in forward.items():
        edges[reverse(key)] = (r, s, a)
    edges = {k: (s.astype(np.int32), r.astype(np.int32), a) for k, (s, r, a) in edges.items()}
    return {
        "edges": edges,
        "num_nodes": {"Sample": NUM_SAMPLES, "Molecule": NUM_MOLECULES, "Food": NUM_FOODS, "Nutrient": NUM_NUTRIENTS},
        "sample_food": sample_food.astype(np.int32),
    }


def cpu_seconds() -> float:
    """User + system CPU time of this process (all threads): robust to other load on the machine."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


# ---- JAX worker ----------------------------------------------------------------------------------
def run_jax(scale: float, steps: int) -> dict:
    import jax
    import jax.numpy as jnp
    import optax

    from jaxfood.graph.hetero_graph import GraphMeta, HeteroGraph, make_edge_set
    from jaxfood.models.encoder import EncoderConfig, make_encoder

    data = make_arrays(scale)
    num_nodes = data["num_nodes"]
    graph = HeteroGraph(
        node_features={},
        edges={k: make_edge_set(s, r, a) for k, (s, r, a) in data["edges"].items()},
        sample_food=data["sample_food"],
        sample_split=np.zeros(NUM_SAMPLES, np.int32),
        food_nutrients=np.zeros((NUM_FOODS, NUM_NUTRIENTS), np.float32),
        food_category=np.zeros(NUM_FOODS, np.int32),
        meta=GraphMeta(num_nodes=num_nodes),
    )
    graph = jax.device_put(graph)
    cfg = EncoderConfig(hidden_dim=HIDDEN, num_heads=HEADS, num_layers=LAYERS, embedding_dim=HIDDEN,
                        dropout=DROPOUT, input_modes={})
    encoder = make_encoder(graph, cfg)
    rng = jax.random.key(0)
    params = {
        "encoder": encoder.init(rng, graph)["params"],
        "head": {"kernel": jax.random.normal(rng, (HIDDEN, NUM_FOODS)) / np.sqrt(HIDDEN),
                 "bias": jnp.zeros(NUM_FOODS)},
    }
    optimizer = optax.adamw(LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    opt_state = optimizer.init(params)
    labels = jnp.asarray(data["sample_food"])

    def loss_fn(p, g, key):
        emb = encoder.apply({"params": p["encoder"]}, g, deterministic=False, rngs={"dropout": key})
        logits = emb["Sample"] @ p["head"]["kernel"] + p["head"]["bias"]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return ce + sum(jnp.mean(h * h) for h in emb.values())

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def train_step(p, o, g, key):
        loss, grads = jax.value_and_grad(loss_fn)(p, g, key)
        updates, o = optimizer.update(grads, o, p)
        return optax.apply_updates(p, updates), o, loss

    compiled = train_step.lower(params, opt_state, graph, rng).compile()
    memory = compiled.memory_analysis()
    keys = jax.random.split(jax.random.key(1), steps + 2)
    for i in range(2):  # warm-up
        params, opt_state, loss = compiled(params, opt_state, graph, keys[i])
    jax.block_until_ready(loss)
    times = []
    cpu0 = cpu_seconds()
    for i in range(steps):
        t0 = time.perf_counter()
        params, opt_state, loss = compiled(params, opt_state, graph, keys[i + 2])
        jax.block_until_ready(loss)
        times.append(time.perf_counter() - t0)
    out = {"times": times, "cpu_per_step": (cpu_seconds() - cpu0) / steps, "loss": float(loss),
           "peak_rss_mib": peak_rss_mib(),
           "edges": int(sum(e.num_edges for e in graph.edges.values()))}
    if memory is not None:
        out["xla_temp_mib"] = memory.temp_size_in_bytes / 2**20
        out["xla_argument_mib"] = memory.argument_size_in_bytes / 2**20
    return out


# ---- PyG worker ----------------------------------------------------------------------------------
def run_pyg(scale: float, steps: int) -> dict:
    import torch

    from benchmarks._pyg_reference import PygHeteroGATEncoder, edges_to_pyg

    torch.manual_seed(0)
    data = make_arrays(scale)
    edges = {k: SimpleNamespace(senders=s, receivers=r, attributes=a) for k, (s, r, a) in data["edges"].items()}
    edge_index, edge_attr = edges_to_pyg(edges)
    model = PygHeteroGATEncoder(data["num_nodes"], list(edges), {k: e.attributes.shape[1] for k, e in edges.items()},
                                hidden_dim=HIDDEN, num_heads=HEADS, num_layers=LAYERS, embedding_dim=HIDDEN,
                                dropout=DROPOUT)
    head = torch.nn.Linear(HIDDEN, NUM_FOODS)
    model.train()
    optimizer = torch.optim.AdamW(list(model.parameters()) + list(head.parameters()), lr=LEARNING_RATE,
                                  weight_decay=WEIGHT_DECAY)
    labels = torch.as_tensor(data["sample_food"]).long()

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        emb = model(edge_index, edge_attr)
        ce = torch.nn.functional.cross_entropy(head(emb["Sample"]), labels)
        loss = ce + sum((h * h).mean() for h in emb.values())
        loss.backward()
        optimizer.step()
        return float(loss)

    for _ in range(2):
        step()
    times = []
    cpu0 = cpu_seconds()
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
    return {"times": times, "cpu_per_step": (cpu_seconds() - cpu0) / steps, "loss": loss, "peak_rss_mib": peak_rss_mib(), "threads": torch.get_num_threads()}


# ---- driver -------------------------------------------------------------------------------------
def worker(side: str, scale: float, steps: int) -> dict:
    """Runs one side in a fresh interpreter and returns its JSON result."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", side, "--scale", str(scale),
           "--steps", str(steps)]
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"{side} worker failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per side (default 10)")
    parser.add_argument("--scales", default="0.25,0.5,1,2", help="edge scales of the JAX scaling table")
    parser.add_argument("--skip-scaling", action="store_true", help="only the 1x comparison")
    parser.add_argument("--worker", choices=["jax", "pyg"], help=argparse.SUPPRESS)
    parser.add_argument("--scale", type=float, default=1.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        result = (run_jax if args.worker == "jax" else run_pyg)(args.scale, args.steps)
        print(json.dumps(result))
        return 0

    load = os.getloadavg()
    print(f"cpus: {os.cpu_count()}  load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    jax_result = worker("jax", 1.0, args.steps)
    pyg_result = worker("pyg", 1.0, args.steps)
    jax_median, pyg_median = float(np.median(jax_result["times"])), float(np.median(pyg_result["times"]))
    print(f"graph: {NUM_SAMPLES} samples, {NUM_MOLECULES} molecules, {NUM_FOODS} foods, {NUM_NUTRIENTS} nutrients, "
          f"{jax_result['edges']:,} edges (with reverses)")
    print(f"model: {LAYERS} layers, hidden {HIDDEN}, {HEADS} heads, dropout {DROPOUT}, AdamW; {args.steps} timed steps")
    print(f"jax step:  median {jax_median * 1e3:8.1f} ms  min {min(jax_result['times']) * 1e3:8.1f} ms  "
          f"cpu {jax_result['cpu_per_step'] * 1e3:8.1f} ms  peak RSS {jax_result['peak_rss_mib']:7.0f} MiB  (XLA temp buffers {jax_result.get('xla_temp_mib', 0):.0f} MiB)")
    print(f"pyg step:  median {pyg_median * 1e3:8.1f} ms  min {min(pyg_result['times']) * 1e3:8.1f} ms  "
          f"cpu {pyg_result['cpu_per_step'] * 1e3:8.1f} ms  peak RSS {pyg_result['peak_rss_mib']:7.0f} MiB  (torch threads {pyg_result['threads']})")
    if not args.skip_scaling:
        print("jax step time vs edges:")
        print(f"  {'scale':>6} {'edges':>11} {'median ms':>10} {'cpu ms':>8} {'cpu ms / 100k edges':>20}")
        for scale in [float(s) for s in args.scales.split(",")]:
            r = jax_result if scale == 1.0 else worker("jax", scale, max(3, args.steps // 2))
            med, cpu = float(np.median(r["times"])) * 1e3, r["cpu_per_step"] * 1e3
            print(f"  {scale:>6.2f} {r['edges']:>11,} {med:>10.1f} {cpu:>8.1f} {cpu / (r['edges'] / 1e5):>20.1f}")
    print(f"cpu-time ratio (pyg / jax, per step): {pyg_result['cpu_per_step'] / jax_result['cpu_per_step']:.2f}")
    load = os.getloadavg()
    print(f"load average at end: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"speedup_vs_pyg: {pyg_median / jax_median:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
