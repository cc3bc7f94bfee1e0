"""Data parallelism: pmap over 4 devices == one device on the same 4 subgraphs; the helpers.

XLA flags must be set before JAX initialises, so the 4-device runs happen in a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=4``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import forced_devices

from jaxfood.errors import CheckpointError, ConfigError
from jaxfood.train import data_parallel as dp
from jaxfood.train import processes
from jaxfood.train.checkpoint import Checkpointer
from jaxfood.train.parallel_options import add_distributed_arguments

ROOT = Path(__file__).resolve().parents[1]


#: Runs the parts named in argv for each layout in LAYOUTS, one after the other, each part as a
#: script writing OUT.
DRIVER = """
import os, runpy, sys
from jaxfood.compile_cache import collect_less
collect_less()  # as the commands and the pod job
for layout in os.environ["LAYOUTS"].split(","):
    os.environ["LAYOUT"] = layout
    for name in sys.argv[1:]:
        os.environ["OUT"] = os.path.join(os.environ["PARTS"], f"{name}-{layout}.json")
        runpy.run_path(os.path.join(os.environ["PARTS"], f"{name}.py"), run_name="__main__")
"""


def run_with_devices(tmp_path: Path, parts: dict[str, str], layouts=("4x1", "1x4"), devices: int = 4,
                     timeout: int = 900) -> dict:
    """Runs each part's code for each layout (``LAYOUT`` set), in one fresh Python with ``devices``
    CPU devices; returns {part: {layout: the JSON it writes to OUT}}. One process runs everything:
    each process start costs its imports, JAX's start and its compilations (the layouts share
    those of the programs that run on one device, e.g. the initialisation)."""
    for name, code in parts.items():
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(code))
    (tmp_path / "driver.py").write_text(DRIVER)
    env = dict(os.environ, XLA_FLAGS=forced_devices(devices), JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]), LAYOUTS=",".join(layouts),
               PARTS=str(tmp_path))
    done = subprocess.run([sys.executable, str(tmp_path / "driver.py"), *parts], env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-4000:]
    return {name: {layout: json.loads((tmp_path / f"{name}-{layout}.json").read_text()) for layout in layouts}
            for name in parts}


# A small multi-task model on a toy graph; the equivalence is what is tested, not the model.
# The optimizer is SGD with momentum: Adam turns rounding-level noise in gradients that are zero
# in exact arithmetic (e.g. GAT attention vectors of a relation whose messages are all equal) into
# full-size +-lr steps, so two correct runs that round differently could not agree to 1e-5.
MULTITASK_WORKER = """
    import json, os
    import jax, numpy as np, optax
    from conftest import make_toy_graph
    from jaxfood.graph.sampling import NeighbourSampler, SamplerConfig
    from jaxfood.models.encoder import EncoderConfig
    from jaxfood.models.heads import HeadsConfig, make_multitask_model
    from jaxfood.train import multitask, task_weighting as tw
    from jaxfood.train.data_parallel import ShardLayout, data_parallel
    from jaxfood.train.finetune_step import multitask_step_fn, train_state_to_dict
    from jaxfood.train.loop import LoopConfig, train_loop

    assert jax.local_device_count() == 4
    graph = make_toy_graph(num_samples=60, num_molecules=40, per_sample=6, seed=1)
    sampler = NeighbourSampler(graph, SamplerConfig(batch_size=4, num_hops=1, seed=3))
    enc = EncoderConfig(hidden_dim=8, num_heads=2, num_layers=1, embedding_dim=8, dropout=0.1,
                        input_modes={"Sample": "embedding", "Molecule": "both", "Food": "both"})
    # wide=False: the wide path reads whole-graph profiles and is off on sampled subgraphs (train.finetune).
    model = make_multitask_model(graph, enc, HeadsConfig(hidden_dim=8, pool_dim=8, attention_dim=4,
                                                         projection_dim=4, dropout=0.1, wide=False))
    weighting = tw.WeightingConfig(method="gradnorm")  # its statistics must be averaged too
    tx = optax.chain(optax.clip_by_global_norm(5.0), optax.sgd(0.05, momentum=0.9))
    loss_cfg = multitask.LossConfig(salient_top_k=3)
    state = multitask.init_train_state(model, weighting, tx, jax.random.key(0), sampler.batch(0).graph)
    state = jax.tree_util.tree_map(np.asarray, train_state_to_dict(state))
    layout = ShardLayout(0, 1, *map(int, os.environ["LAYOUT"].split("x")))
    step = data_parallel(multitask_step_fn(model, loss_cfg, weighting, tx, axis_name=layout.axes), layout, seed=11)
    result = train_loop(step, state, sampler.batch, LoopConfig(num_steps=3))
    seeds = [sorted(sampler.seeds_for(0, s).tolist()) for s in range(4)]
    json.dump({"params": jax.tree_util.tree_map(lambda x: np.asarray(x).tolist(), result.state["params"]),
               "loss": [h["loss/total"] for h in result.history["train"]], "compilations": step.compile_count(),
               "weights": [result.history["train"][-1][f"weight/{t}"] for t in multitask.TASKS],
               "distinct_subgraphs": len({tuple(s) for s in seeds})}, open(os.environ["OUT"], "w"))
"""

PRETRAIN_WORKER = """
    import json, os
    import jax, numpy as np
    from conftest import make_toy_graph
    from jaxfood.models.encoder import EncoderConfig
    from jaxfood.train import graphcl as pretrain
    from jaxfood.train.augment import prepare_pretrain_graph
    from jaxfood.train.data_parallel import ShardLayout, data_parallel
    from jaxfood.train.loop import LoopConfig, train_loop

    graph = make_toy_graph(num_samples=30, num_molecules=30, per_sample=6, seed=2)
    enc = EncoderConfig(hidden_dim=8, num_heads=2, num_layers=1, embedding_dim=8, dropout=0.0,
                        input_modes={"Sample": "embedding", "Molecule": "both", "Food": "both"})
    cfg = pretrain.PretrainConfig(encoder=enc, batch_size=16, projection_hidden=8, projection_dim=4,
                                  warmup_steps=0)
    pre_graph = prepare_pretrain_graph(graph, cfg.augment, seed=0)
    model = pretrain.make_model(pre_graph, cfg)
    import optax
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.05, momentum=0.9))
    params = model.init(jax.random.key(0), pre_graph)
    state = jax.tree_util.tree_map(np.asarray, {"params": params, "opt_state": optimizer.init(params)})
    layout = ShardLayout(0, 1, *map(int, os.environ["LAYOUT"].split("x")))
    step = data_parallel(pretrain.make_pretrain_step(model, optimizer, axis_name=layout.axes), layout, seed=5)
    initial_l1 = float(sum(np.abs(x).sum() for x in jax.tree_util.tree_leaves(state["params"])))
    result = train_loop(step, state, lambda s, shard: pre_graph, LoopConfig(num_steps=3), fixed_batch=True)
    json.dump({"params": jax.tree_util.tree_map(lambda x: np.asarray(x).tolist(), result.state["params"]),
               "loss": [h["loss"] for h in result.history["train"]], "initial_l1": initial_l1,
               "final_l1": float(sum(np.abs(x).sum() for x in jax.tree_util.tree_leaves(result.state["params"]))),
               "mapped_devices": step.layout.local_devices, "device_count": jax.local_device_count()},
              open(os.environ["OUT"], "w"))
"""


def _max_diff(a, b) -> float:
    diffs = jax.tree_util.tree_map(lambda x, y: float(np.max(np.abs(np.asarray(x) - np.asarray(y)))), a, b)
    return max(jax.tree_util.tree_leaves(diffs))


# ---- helpers in this process (one device) --------------------------------------------------------
def test_shard_layout_numbers_shards_globally():
    layouts = [dp.ShardLayout(p, 2, 2, 3) for p in range(2)]
    ids = np.concatenate([lay.shard_ids().reshape(-1) for lay in layouts])
    np.testing.assert_array_equal(ids, np.arange(12))
    assert layouts[1].shard_ids().shape == (2, 3) and layouts[0].num_shards == 12


def test_local_batch_stacks_shards_in_device_major_order():
    layout = dp.ShardLayout(1, 2, 2, 2)
    batch = dp.local_batch(lambda step, shard: {"x": np.array([step, shard])}, 7, layout)
    np.testing.assert_array_equal(batch["x"][..., 1], [[4, 5], [6, 7]])
    assert np.all(batch["x"][..., 0] == 7)


def test_replicate_and_unreplicate_round_trip():
    tree = {"a": np.arange(6.0).reshape(2, 3), "b": np.int32(4)}
    rep = dp.replicate(tree)
    assert rep["a"].shape == (jax.local_device_count(), 2, 3)
    back = dp.unreplicate(rep)
    np.testing.assert_array_equal(back["a"], tree["a"])
    assert int(back["b"]) == 4
    # An array whose leading axis is not one replica a device (all of it on one device): its first row.
    np.testing.assert_array_equal(dp.unreplicate(jax.numpy.arange(12.0).reshape(3, 4)), [0.0, 1.0, 2.0, 3.0])


def test_aggregate_metrics_is_the_mean_over_shards():
    metrics = {"loss": np.array([[1.0, 3.0]]), "acc": np.array([[0.5, 0.5]])}
    assert processes.aggregate_metrics(metrics) == {"acc": 0.5, "loss": 2.0}


def test_shard_rng_depends_on_step_and_shard_only():
    def bits(key):
        return np.asarray(jax.random.key_data(key))

    a, b = bits(dp.shard_rng(0, 3, 1)), bits(dp.shard_rng(0, 3, 1))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, bits(dp.shard_rng(0, 3, 2))) and not np.array_equal(a, bits(dp.shard_rng(0, 4, 1)))


def test_distributed_arguments_parse_and_bad_values_are_one_line_errors(monkeypatch):
    for name in ("JAXFOOD_COORDINATOR", "JAXFOOD_NUM_PROCESSES", "JAXFOOD_PROCESS_ID"):
        monkeypatch.delenv(name, raising=False)
    parser = add_distributed_arguments(argparse.ArgumentParser())
    args = parser.parse_args(["--coordinator", "10.0.0.2:8476", "--num-processes", "4", "--process-id", "3"])
    assert (args.coordinator, args.num_processes, args.process_id) == ("10.0.0.2:8476", 4, 3)
    assert parser.parse_args([]).coordinator is None
    info = processes.init_from_args(parser.parse_args([]))  # no flags: one process, nothing to join
    assert info.process_count == 1 and info.is_primary and processes.is_primary()
    with pytest.raises(ConfigError, match="go together"):
        processes.initialize_distributed("127.0.0.1:1234", None, 0)
    with pytest.raises(ConfigError, match="expected HOST:PORT"):
        processes.initialize_distributed("localhost", 2, 0)
    with pytest.raises(ConfigError, match=r"--process-id 2: expected 0 \.\. 1"):
        processes.initialize_distributed("127.0.0.1:1234", 2, 2)
    monkeypatch.setenv("JAXFOOD_NUM_PROCESSES", "two")
    with pytest.raises(ConfigError, match="JAXFOOD_NUM_PROCESSES"):
        add_distributed_arguments(argparse.ArgumentParser())


def test_checkpointer_round_trip_and_resume_target(tmp_path):
    state = {"params": {"w": np.arange(4, dtype=np.float32)}, "step": np.int32(3)}
    ckpt = Checkpointer(tmp_path / "ck")
    assert ckpt.latest_step() is None
    ckpt.save(3, state, {"kind": "test", "history": [{"loss": 1.0}]})
    ckpt.save(5, {"params": {"w": np.ones(4, np.float32)}, "step": np.int32(5)}, {"kind": "test"})
    ckpt.wait()
    assert ckpt.latest_step() == 5
    restored, meta = ckpt.restore(3, target=state)
    np.testing.assert_array_equal(restored["params"]["w"], state["params"]["w"])
    assert meta["step"] == 3 and meta["history"] == [{"loss": 1.0}]
    ckpt.close()
    # The core reader understands the format (load_encoder, evaluate use it).
    from jaxfood.train.checkpoint import restore_checkpoint

    core_state, core_meta = restore_checkpoint(tmp_path / "ck")
    assert core_meta["step"] == 5 and np.all(core_state["params"]["w"] == 1)
    with pytest.raises(CheckpointError):
        Checkpointer(tmp_path / "empty").restore()


def test_padding_changes_nothing_for_the_real_nodes():
    """The same draws padded to two budgets give the same multi-task outputs on the real nodes
    (the padding-aware model masks padding edges in the encoder and in the attention pooling)."""
    from conftest import make_toy_graph

    from jaxfood.graph import schema
    from jaxfood.graph.sampling import NeighbourSampler, SamplerConfig
    from jaxfood.models.encoder import EncoderConfig
    from jaxfood.models.heads import HeadsConfig, make_multitask_model

    graph = make_toy_graph(num_samples=40, num_molecules=30, per_sample=6, seed=4)
    tight = NeighbourSampler(graph, SamplerConfig(batch_size=4, num_hops=1))
    loose = NeighbourSampler(graph, SamplerConfig(
        batch_size=4, num_hops=1, node_budget={t: n + 7 for t, n in tight.node_budget.items() if t != "Food"
                                               and t != "Nutrient"},
        edge_budget={k: n + 11 for k, n in tight.edge_budget.items() if "Sample" in k}))
    a, b = tight.batch(3), loose.batch(3)
    enc = EncoderConfig(hidden_dim=8, num_heads=2, num_layers=1, embedding_dim=8, dropout=0.0,
                        input_modes={"Sample": "embedding", "Molecule": "both", "Food": "both"})
    # wide=False: the wide path reads whole-graph profiles and is off on sampled subgraphs (train.finetune).
    model = make_multitask_model(graph, enc, HeadsConfig(hidden_dim=8, pool_dim=8, wide=False))
    params = model.init(jax.random.key(1), a.graph)
    apply = jax.jit(model.apply)  # one program a budget (op by op, each operation compiles alone)
    out_a = apply(params, a.graph, node_index=a.node_index)
    out_b = apply(params, b.graph, node_index=b.node_index)
    assert b.graph.num_nodes[schema.SAMPLE] > a.graph.num_nodes[schema.SAMPLE]
    np.testing.assert_allclose(out_a.food_logits[a.seed_mask], out_b.food_logits[b.seed_mask], atol=1e-5)
    np.testing.assert_allclose(out_a.pooled[a.seed_mask], out_b.pooled[b.seed_mask], atol=1e-5)
    np.testing.assert_allclose(out_a.food_projection, out_b.food_projection, atol=1e-5)
    real = a.edge_masks[schema.CONTAINS]
    np.testing.assert_allclose(np.sort(out_a.molecule_weights[real]),
                               np.sort(out_b.molecule_weights[b.edge_masks[schema.CONTAINS]]), atol=1e-6)


# GraphCL on sampled subgraphs: each shard contrasts views of its own subgraph (node_index into the
# full graph's embedding tables, its own candidate pool for edge adding).
SAMPLED_PRETRAIN_WORKER = """
    import json, os
    import jax, numpy as np, optax
    from conftest import make_toy_graph
    from jaxfood.graph.sampling import SamplerConfig
    from jaxfood.models.encoder import EncoderConfig
    from jaxfood.train import graphcl as pretrain
    from jaxfood.train.augment import prepare_pretrain_graph
    from jaxfood.train.data_parallel import ShardLayout, data_parallel
    from jaxfood.train.loop import LoopConfig, train_loop

    graph = make_toy_graph(num_samples=40, num_molecules=40, per_sample=6, seed=2)
    enc = EncoderConfig(hidden_dim=8, num_heads=2, num_layers=1, embedding_dim=8, dropout=0.0,
                        input_modes={"Sample": "embedding", "Molecule": "both", "Food": "both"})
    cfg = pretrain.PretrainConfig(encoder=enc, batch_size=16, projection_hidden=8, projection_dim=4,
                                  warmup_steps=0)
    pre_graph = prepare_pretrain_graph(graph, cfg.augment, seed=0)
    model = pretrain.make_model(pre_graph, cfg)
    views = pretrain.PretrainSampler(graph, cfg, SamplerConfig(batch_size=4, seed=3))
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.05, momentum=0.9))
    params = model.init(jax.random.key(0), pre_graph)
    state = jax.tree_util.tree_map(np.asarray, {"params": params, "opt_state": optimizer.init(params)})
    layout = ShardLayout(0, 1, *map(int, os.environ["LAYOUT"].split("x")))
    step = data_parallel(pretrain.make_pretrain_step(model, optimizer, axis_name=layout.axes), layout, seed=5)
    shapes = set()
    def make_shard(s, shard):
        sub = views.batch(s, shard)
        shapes.add(tuple(sorted((k, x.shape) for k, x in jax.tree_util.tree_flatten_with_path(sub)[0]
                                for k in [jax.tree_util.keystr(k)])))
        return sub
    result = train_loop(step, state, make_shard, LoopConfig(num_steps=3))
    seeds = [tuple(sorted(views.sampler.seeds_for(0, s).tolist())) for s in range(4)]
    json.dump({"params": jax.tree_util.tree_map(lambda x: np.asarray(x).tolist(), result.state["params"]),
               "loss": [h["loss"] for h in result.history["train"]], "compilations": step.compile_count(),
               "shapes": len(shapes), "distinct_subgraphs": len(set(seeds)),
               "initial_l1": float(sum(np.abs(x).sum() for x in jax.tree_util.tree_leaves(state["params"]))),
               "final_l1": float(sum(np.abs(np.asarray(x)).sum()
                                     for x in jax.tree_util.tree_leaves(result.state["params"])))},
              open(os.environ["OUT"], "w"))
"""


@pytest.mark.slow
def test_steps_pmap_over_4_devices_equal_one_device(tmp_path):
    """The multi-task step on the same 4 subgraphs, the GraphCL step with 4 views, the GraphCL step
    on 4 sampled subgraphs: pmap over 4 devices (4x1) == 4 shards on one device (1x4)."""
    out = run_with_devices(tmp_path, {"multitask": MULTITASK_WORKER, "graphcl": PRETRAIN_WORKER,
                                      "sampled_graphcl": SAMPLED_PRETRAIN_WORKER})
    pmapped, single = out["multitask"]["4x1"], out["multitask"]["1x4"]
    assert pmapped["distinct_subgraphs"] == 4
    assert pmapped["compilations"] == single["compilations"] == 1
    assert _max_diff(pmapped["params"], single["params"]) < 1e-5
    np.testing.assert_allclose(pmapped["loss"], single["loss"], rtol=1e-5)
    np.testing.assert_allclose(pmapped["weights"], single["weights"], rtol=1e-5)
    # Training moved the parameters well beyond the tolerance (the comparison can fail).
    assert pmapped["loss"][0] != pmapped["loss"][-1]

    pmapped, single = out["graphcl"]["4x1"], out["graphcl"]["1x4"]
    assert _max_diff(pmapped["params"], single["params"]) < 1e-5
    np.testing.assert_allclose(pmapped["loss"], single["loss"], rtol=1e-5)
    # The pmapped run spread over 4 devices (the other one ran 4 views on 1), and training moved the
    # parameters well beyond the tolerance.
    assert pmapped["device_count"] == 4 and pmapped["mapped_devices"] == 4 and single["mapped_devices"] == 1
    assert abs(pmapped["final_l1"] - pmapped["initial_l1"]) > 1e-2

    pmapped, single = out["sampled_graphcl"]["4x1"], out["sampled_graphcl"]["1x4"]
    assert pmapped["distinct_subgraphs"] == 4
    assert pmapped["compilations"] == single["compilations"] == 1 and pmapped["shapes"] == single["shapes"] == 1
    assert _max_diff(pmapped["params"], single["params"]) < 1e-5
    np.testing.assert_allclose(pmapped["loss"], single["loss"], rtol=1e-5)
    assert abs(pmapped["final_l1"] - pmapped["initial_l1"]) > 1e-2


# ---- the loop (one device, a toy step: what is tested is the bookkeeping) -------------------------
def _toy_step(keep=()):
    """``w <- w + mean over shards of (batch + noise)``: depends on the step's batch and key; the
    ``keep`` entries of the state pass through unchanged."""
    layout = dp.ShardLayout(0, 1, 1, 1)

    def step(state, batch, rng):
        delta = jax.lax.pmean(batch["x"] + 0.01 * jax.random.normal(rng, ()), layout.axes)
        return {"w": state["w"] + delta, **{k: state[k] for k in keep}}, {"loss": delta}

    return dp.data_parallel(step, layout, seed=3)


def _toy_batch(step, shard):
    return {"x": np.float32(step % 3)}


def test_loop_keeps_the_best_evaluation_and_stops_early(tmp_path):
    from jaxfood.train.checkpoint import restore_checkpoint
    from jaxfood.train.loop import LoopConfig, train_loop

    scores = iter([1.0, 3.0, 2.0, 2.5, 9.0])
    loop = LoopConfig(num_steps=10, checkpoint_dir=tmp_path / "kept", eval_every=2, patience=2)
    result = train_loop(_toy_step(), {"w": np.float32(0)}, _toy_batch, loop,
                        evaluate=lambda state, step: (next(scores), {"w": float(state["w"])}), meta={"kind": "toy"})
    # Scores at steps 2, 4, 6, 8: best at 4, then two evaluations without improvement: stop at 8.
    assert result.stopped_early and result.end_step == 8 and result.best_step == 4 and result.best_score == 3.0
    assert [row["step"] for row in result.history["val"]] == [2, 4, 6, 8]
    kept, meta = restore_checkpoint(tmp_path / "kept")
    assert meta["step"] == 4 and meta["best_step"] == 4 and meta["kind"] == "toy"
    assert float(kept["w"]) == pytest.approx(result.history["val"][1]["w"])


def test_loop_preempted_then_rerun_ends_where_an_uninterrupted_run_does(tmp_path):
    import signal

    from jaxfood.train.loop import LoopConfig, prepare_run, train_loop

    def run(workdir, stop_at=None):
        loop = LoopConfig(num_steps=7, checkpoint_dir=workdir / "kept", resume_dir=workdir / "resume",
                          checkpoint_every=2)
        prepare_run(loop)

        def on_train(step, metrics):
            if step == stop_at:
                os.kill(os.getpid(), signal.SIGTERM)  # the guard's handler: checkpoint this step and stop
            return None

        return train_loop(_toy_step(), {"w": np.float32(0)}, _toy_batch, loop, on_train=on_train)

    reference = run(tmp_path / "a")
    first = run(tmp_path / "b", stop_at=5)
    assert first.preempted and first.end_step == 5 and (tmp_path / "b" / "resume" / "5").is_dir()
    second = run(tmp_path / "b")
    assert second.start_step == 5 and not second.preempted and second.end_step == 7
    assert float(second.state["w"]) == float(reference.state["w"])
    assert [row["step"] for row in second.history["train"]] == list(range(1, 8))
    assert not (tmp_path / "b" / "resume").exists()  # a completed run leaves no snapshots behind


def test_loop_evaluates_the_initial_state_and_keeps_it_when_no_step_beats_it(tmp_path):
    from jaxfood.train.checkpoint import restore_checkpoint
    from jaxfood.train.loop import LoopConfig, train_loop

    scores = iter([5.0, 1.0, 3.0, 2.0])
    loop = LoopConfig(num_steps=6, checkpoint_dir=tmp_path / "kept", eval_every=2, patience=0, eval_initial=True)
    result = train_loop(_toy_step(), {"w": np.float32(0.5)}, _toy_batch, loop,
                        evaluate=lambda state, step: (next(scores), {"w": float(state["w"])}), meta={"kind": "toy"})
    assert [row["step"] for row in result.history["val"]] == [0, 2, 4, 6]
    assert result.best_step == 0 and result.best_score == 5.0 and not result.stopped_early
    kept, meta = restore_checkpoint(tmp_path / "kept")
    assert meta["step"] == 0 and meta["best_step"] == 0
    assert float(kept["w"]) == pytest.approx(0.5) and float(result.state["w"]) != pytest.approx(0.5)


@pytest.mark.parametrize("preempt", [False, True])
def test_kept_start_takes_the_parts_compose_picks_from_the_best_trained_state(tmp_path, preempt):
    """While the start is kept, the best-scoring trained state (here step 4 of 2/4/6) is composed into
    it; a preempted and resumed run ends with the same kept state and the same bookkeeping."""
    import os
    import signal

    from jaxfood.train.checkpoint import restore_checkpoint
    from jaxfood.train.loop import LoopConfig, prepare_run, train_loop

    score_of = {0: 5.0, 2: 1.0, 4: 3.0, 6: 2.0}
    seen: dict[int, float] = {}

    def evaluate(state, step):
        seen[step] = float(state["w"])
        return score_of[step], {"w": float(state["w"])}

    def run(stop_at=None):
        loop = LoopConfig(num_steps=6, checkpoint_dir=tmp_path / "kept", resume_dir=tmp_path / "resume",
                          eval_every=2, eval_initial=True, checkpoint_every=0)
        if stop_at is None and not (tmp_path / "resume").exists():
            prepare_run(loop)

        def on_train(step, metrics):
            if step == stop_at:
                os.kill(os.getpid(), signal.SIGTERM)
            return None

        return train_loop(_toy_step(keep=("v",)), {"w": np.float32(0.5), "v": np.float32(7.0)}, _toy_batch, loop,
                          evaluate=evaluate, meta={"kind": "toy"}, on_train=on_train,
                          compose=lambda start, trained: (dict(start, w=trained["w"]), {"parts": ["w"]}))

    if preempt:
        assert run(stop_at=5).preempted
    result = run()
    assert result.best_step == 0 and result.composed_step == 4
    kept, meta = restore_checkpoint(tmp_path / "kept")
    assert meta["best_step"] == 0 and meta["composed_step"] == 4 and meta["validation"] == {"w": 0.5}
    assert meta["parts"] == ["w"]  # what compose added to the meta
    assert float(kept["v"]) == 7.0  # the start's own part
    assert float(kept["w"]) == pytest.approx(seen[4]) and seen[4] != pytest.approx(0.5)  # the trained part

    # A trained state that beats the start replaces it whole: nothing is composed.
    score_of.update({6: 9.0})
    for path in ("kept", "resume"):
        if (tmp_path / path).exists():
            import shutil
            shutil.rmtree(tmp_path / path)
    result = run()
    assert result.best_step == 6 and result.composed_step is None
    kept, meta = restore_checkpoint(tmp_path / "kept")
    assert "composed_step" not in meta and float(kept["w"]) == pytest.approx(seen[6])
