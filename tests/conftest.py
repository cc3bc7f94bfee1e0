"""Shared fixtures: small synthetic graphs built directly from arrays (no readers involved), and
one XLA compilation cache for the whole session (this process and the subprocesses tests start)."""

from __future__ import annotations

import atexit
import fcntl
import importlib
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests check what programs compute, not how fast they run: XLA's backend at its lowest optimisation
# level compiles the suite's hundreds of small programs about a quarter faster (subprocesses inherit it).
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# matchms (build-graph --spectra) compiles its numba functions again in every process that uses
# them (up to 20 s in a fresh environment); on the tests' few peaks plain Python takes no time.
os.environ.setdefault("NUMBA_DISABLE_JIT", "1")
# XLA's CPU backend compiles faster with its older fusion emitters, on one thread per program (the
# suite runs one pytest worker per core): the main job's end-to-end test took 131 s instead of 156 s.
if "xla_cpu_use_fusion_emitters" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (f"{os.environ.get('XLA_FLAGS', '')} --xla_cpu_use_fusion_emitters=false"
                               " --xla_cpu_parallel_codegen_split_count=1").strip()
# Commands enable a persistent compilation cache; tests keep it out of the user's cache directory.
# JAXFOOD_TEST_SHARED: a directory the session's pytest workers share (see once_per_session). Both
# are made by the process that starts the workers, which inherit its environment.
if not os.environ.get("JAXFOOD_COMPILE_CACHE"):
    os.environ["JAXFOOD_COMPILE_CACHE"] = tempfile.mkdtemp(prefix="jaxfood-test-xla-")
    atexit.register(shutil.rmtree, os.environ["JAXFOOD_COMPILE_CACHE"], True)
# The suite's thousands of programs that compile in a few seconds or less cost more to write to the
# cache than to compile again (the suite: 556 s writing every program, 507 s from 1 s, 488 s from 3 s,
# 503 s from 10 s); the training steps that subprocesses compile again are kept, and the pod jobs
# (test_multihost.job_env) cache every program, since test_resume runs the same job again.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "3")
if not os.environ.get("JAXFOOD_TEST_SHARED"):
    os.environ["JAXFOOD_TEST_SHARED"] = tempfile.mkdtemp(prefix="jaxfood-test-shared-")
    atexit.register(shutil.rmtree, os.environ["JAXFOOD_TEST_SHARED"], True)

import jax
import numpy as np
import pytest

from jaxfood.compile_cache import collect_less, enable_compile_cache
from jaxfood.graph import schema
from jaxfood.graph.hetero_graph import GraphMeta, HeteroGraph, make_edge_set, with_reverse_edges
from jaxfood.graph.splits import with_splits

# The variable takes effect only where it is set before JAX is first imported; a pytest plugin that
# imports JAX earlier (a profiler, say) would otherwise run the suite at the default level.
jax.config.update("jax_disable_most_optimizations",
                  os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"].lower() not in ("0", "false", ""))
# Tests trace programs as the commands do: with the commands' garbage collection thresholds.
collect_less()


def once_per_session(name: str, build) -> Path:
    """``build(directory)`` once per test session, whichever pytest worker asks first (the others
    wait for it, under a file lock): returns the directory it filled. For an expensive output two
    tests compare against (e.g. a reference training run), so that it is not computed twice."""
    root = Path(os.environ["JAXFOOD_TEST_SHARED"])
    directory = root / name
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (directory / ".complete").exists():
            shutil.rmtree(directory, ignore_errors=True)  # a build that failed in another worker
            directory.mkdir()
            build(directory)
            (directory / ".complete").touch()
    return directory


class LazyModule:
    """Module ``name``, imported when one of its public attributes is first read. Every pytest
    worker imports every test module to collect the suite; PyTorch and PyG (~5 s) are held this way
    so that only a worker that runs a test comparing with them pays for them. Private and dunder
    attributes (``_mock_name``, ``__wrapped__``: pytest probes every module-level object for
    wrapped fixtures while it collects) are not forwarded and import nothing."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str):
        if attr.startswith("_"):
            raise AttributeError(attr)
        return getattr(importlib.import_module(self._name), attr)

    def __repr__(self) -> str:
        return f"<lazy module {self._name!r}>"


def forced_devices(devices: int) -> str:
    """``XLA_FLAGS`` for a subprocess with ``devices`` CPU devices and the suite's compiler flags."""
    return f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()


def make_toy_graph(num_samples=30, num_molecules=40, num_foods=5, num_nutrients=6, per_sample=8,
                   molecule_dim=4, seed=0, similar=False) -> HeteroGraph:
    """A random graph with the full schema; samples of a food share a few marker molecules."""
    rng = np.random.default_rng(seed)
    sample_food = np.arange(num_samples) % num_foods
    s, m = [], []
    for i in range(num_samples):
        markers = [(sample_food[i] * 3 + j) % num_molecules for j in range(2)]
        others = rng.choice(num_molecules, per_sample - 2, replace=False)
        mols = np.unique(np.concatenate([markers, others]))
        s += [i] * len(mols)
        m += list(mols)
    edges = {
        schema.CONTAINS: make_edge_set(s, m, rng.normal(size=(len(s), 1))),
        schema.IS_INSTANCE_OF: make_edge_set(np.arange(num_samples), sample_food),
    }
    fn_f = np.repeat(np.arange(num_foods), num_nutrients)
    fn_n = np.tile(np.arange(num_nutrients), num_foods)
    qty = rng.normal(size=(len(fn_f), 1))
    unit = np.eye(2)[fn_n % 2]
    edges[schema.HAS_NUTRIENT] = make_edge_set(fn_f, fn_n, np.concatenate([qty, unit], 1))
    if similar:
        a = rng.integers(0, num_molecules, 50)
        b = rng.integers(0, num_molecules, 50)
        edges[schema.IS_SIMILAR_TO] = make_edge_set(a, b, rng.uniform(size=50))
    edges = with_reverse_edges(edges)
    counts = {schema.SAMPLE: num_samples, schema.MOLECULE: num_molecules, schema.FOOD: num_foods,
              schema.NUTRIENT: num_nutrients}
    meta = GraphMeta(
        num_nodes=counts,
        node_ids={t: [f"{t[0].lower()}{i}" for i in range(n)] for t, n in counts.items()},
        food_categories=["cat_a", "cat_b"],
        nutrient_names=[f"N{i} (g)" for i in range(num_nutrients)],
        nutrient_units=["g", "mg"],
    )
    food_nutrients = qty.reshape(num_foods, num_nutrients).astype(np.float32)
    graph = HeteroGraph(
        node_features={schema.MOLECULE: rng.normal(size=(num_molecules, molecule_dim)).astype(np.float32),
                       schema.FOOD: food_nutrients},
        edges=edges,
        sample_food=sample_food.astype(np.int32),
        sample_split=np.zeros(num_samples, np.int32),
        food_nutrients=food_nutrients,
        food_category=(np.arange(num_foods) % 2).astype(np.int32),
        meta=meta,
    )
    return with_splits(graph, seed=seed)


@pytest.fixture
def toy_graph():
    return make_toy_graph()


TINY_FINETUNE = [
    "steps=3", "eval_every=3", "patience=0", "scorers=[intensity_attribution]", "figures=false", "tensorboard=false",
    "encoder.hidden_dim=8", "encoder.num_heads=2", "encoder.embedding_dim=8", "encoder.num_layers=1",
    "heads.hidden_dim=8", "heads.pool_dim=8", "heads.attention_dim=4", "heads.projection_dim=4",
    "loss.salient_top_k=3", "salient_k=3", "stability_perturbations=0",
]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """``(root, graph, checkpoint_dir, params)``: a small simulated graph saved in ``root/graph``
    beside a fine-tuning checkpoint of the tiny model at its initial parameters (the bad-input and
    fuzz tests need a valid checkpoint, not a good one; training would only cost time)."""
    import warnings

    from jaxfood.config import load_config
    from jaxfood.data.build import build_graph
    from jaxfood.data.simulate import SimConfig, simulate
    from jaxfood.graph.hetero_graph import save_graph
    from jaxfood.models.heads import make_multitask_model
    from jaxfood.train.checkpoint import save_checkpoint
    from jaxfood.train.finetune import FinetuneConfig, checkpoint_meta, prepare_graph

    root = tmp_path_factory.mktemp("tiny_run")
    sim = SimConfig(replicates_per_food=4, num_molecules=400, nutrient_linked_per_class=20, background=40,
                    contaminants=20, embedding_dim=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = build_graph(simulate(sim, seed=0).tables, seed=0)
    save_graph(graph, root / "graph")
    cfg = load_config(FinetuneConfig(), None, TINY_FINETUNE)
    dgraph = prepare_graph(graph)
    params = make_multitask_model(dgraph, cfg.encoder, cfg.heads).init(jax.random.key(1), dgraph)
    ckpt = root / "checkpoints"
    save_checkpoint(ckpt, 1, {"params": params}, checkpoint_meta(cfg, cfg.encoder, graph, None, None))
    return root, graph, ckpt, params


@pytest.fixture(scope="session", autouse=True)
def compilation_cache():
    """Most of the suite's time is XLA compiling programs that other tests (and the subprocesses of
    the multi-device, multi-process and resume tests) compile again: library calls in this process,
    the commands (which enable the cache themselves) and subprocesses all share the session's
    cache directory above, so each program that took 3 s or more to compile (every program of a
    pod job) is compiled once per session. Within a pytest worker,
    tests that run the same model on the same graph also share its jitted functions (no tracing,
    no lowering; :func:`jaxfood.compile_cache.shared_program` keeps the 16 last used)."""
    cache = enable_compile_cache()
    if cache is None:  # switched off (JAXFOOD_NO_COMPILE_CACHE)
        yield None
        return
    # (JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS is set above, for this process and its subprocesses)
    env = {"JAX_COMPILATION_CACHE_DIR": str(cache), "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
    os.environ.update(env)  # subprocesses started by tests
    yield cache


#: Modules dealt to the same worker as their partner: they run the same programs (test_protocol
#: fine-tunes test_finetune's graph with its configuration: compiled once), wait for the same
#: once-per-session output (the pod reference of test_multihost and test_resume) or import the same
#: heavy module (PyTorch and PyG: test_gat_parity, test_convert, test_bad_input and test_spectra
#: compare with the PyTorch original or write its checkpoints). A partner holds a slow test.
TOGETHER = {"tests/test_protocol.py": "tests/test_finetune.py", "tests/test_resume.py": "tests/test_multihost.py",
            "tests/test_gat_parity.py": "tests/test_spectra.py", "tests/test_convert.py": "tests/test_spectra.py",
            "tests/test_bad_input.py": "tests/test_spectra.py"}


def pytest_collection_modifyitems(config, items):
    """The order that keeps both pytest workers busy to the end. ``--dist worksteal`` gives each of
    the n workers one contiguous part of the collection (the first ``len // n`` tests, then an equal
    share of the rest) and lets a worker that runs out take the far end of another's part. So each
    part starts with its share of the modules that hold a test marked ``slow`` (dealt out in turn,
    each module kept together so that its fixtures are set up once, a module of :data:`TOGETHER`
    with its partner) and is filled up with the other modules: the long tests start early on every
    worker and what is left at the end is short work that moves to whichever worker is free.
    Without pytest-xdist the file order is kept."""
    workers = int(getattr(config, "workerinput", {}).get("workercount", 1))
    if workers < 2:
        return
    modules: dict[str, list] = {}
    for item in items:
        modules.setdefault(item.nodeid.split("::")[0], []).append(item)
    heavy = [m for m, members in modules.items() if any(i.get_closest_marker("slow") for i in members)]
    parts: list[list] = [[] for _ in range(workers)]
    groups: dict[str, list[str]] = {}  # each heavy module under its partner's name, if heavy
    for module in heavy:
        groups.setdefault(TOGETHER[module] if TOGETHER.get(module) in heavy else module, []).append(module)
    leader = {module: name for name, members in groups.items() for module in members}
    for module in modules:  # light modules after their heavy partner's group
        if module not in heavy and TOGETHER.get(module) in leader:
            groups[leader[TOGETHER[module]]].append(module)
    grouped = {module for members in groups.values() for module in members}
    for i, members in enumerate(groups.values()):
        for module in members:
            parts[i % workers].extend(modules[module])
    light = [item for module, members in modules.items() if module not in grouped for item in members]
    remaining, taken = len(items), 0
    for k, part in enumerate(parts):  # worksteal's first shares: len(pending) // idle workers
        fill = max(remaining // (workers - k) - len(part), 0) if k < workers - 1 else len(light) - taken
        part.extend(light[taken:taken + fill])
        taken += fill
        remaining -= len(part)
    items[:] = [item for part in parts for item in part]
