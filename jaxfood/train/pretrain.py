"""GraphCL pretraining, the run: :func:`pretrain` trains the encoder with the loop of
:mod:`jaxfood.train.loop` (1..N devices, 1..N hosts, full graph or sampled subgraphs) and keeps
the epoch with the lowest held-out view loss. The pure parts (configuration, model, loss, step)
are in :mod:`jaxfood.train.graphcl`; read-outs of the embeddings are evaluation
(:func:`jaxfood.workflows.pretrain` composes both).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np

from jaxfood.compile_cache import Background
from jaxfood.config import config_from_dict, config_to_dict, dump_config
from jaxfood.errors import CheckpointError, ConfigError
from jaxfood.graph.hetero_graph import HeteroGraph
from jaxfood.graph.sampling import SamplerConfig
from jaxfood.io_utils import write_text
from jaxfood.models.encoder import EncoderConfig
from jaxfood.train.augment import prepare_pretrain_graph
from jaxfood.train.checkpoint import load_encoder, restore_checkpoint
from jaxfood.train.data_parallel import ShardLayout, data_parallel
from jaxfood.train.graphcl import (  # noqa: F401  (PretrainConfig, PretrainSampler: the names callers know)
    PretrainConfig,
    PretrainSampler,
    check_pretrain_config,
    make_embed_fn,
    make_eval_fn,
    make_model,
    make_pretrain_step,
    make_subgraph_val_fn,
)
from jaxfood.train.loop import LoopConfig, prepare_run, train_loop
from jaxfood.train.monitoring import TensorBoard
from jaxfood.train.optimizer import make_graphcl_optimizer
from jaxfood.train.parallel_options import DataParallelOptions
from jaxfood.train.preemption import Preempted
from jaxfood.train.processes import is_primary

CHECKPOINT_KIND = "graphcl"


@dataclasses.dataclass
class PretrainResult:
    """What :func:`pretrain` returns. ``embeddings``: ``{"pretrained" | "random": {type: [N, hidden]}}``
    of Sample and Food nodes in the un-augmented graph, for the read-outs."""

    encoder_config: EncoderConfig
    params: dict[str, Any]            # {"encoder": ..., "projection": ...} of the best epoch
    history: dict[str, list[float]]   # {"loss": per epoch (train), "val_loss": per epoch}
    best_epoch: int
    checkpoint_dir: Path
    num_step_compilations: int
    runtime_s: float
    embeddings: dict[str, dict[str, np.ndarray]]
    start_step: int = 0
    edges_per_second: float = 0.0
    spread: dict = dataclasses.field(default_factory=dict)
    metrics: dict = dataclasses.field(default_factory=dict)   # read-outs, filled by the workflow
    figures: dict = dataclasses.field(default_factory=dict)


def sampled_edges(batch) -> int:
    """Real (not padding) edges of a local batch of sampled subgraphs."""
    return int(sum(np.asarray(m).sum() for m in batch.edge_masks.values()))


def pretrain(graph: HeteroGraph, cfg: PretrainConfig, workdir: str | Path, *,
             options: DataParallelOptions = DataParallelOptions(), progress: bool = True,
             log: Callable[[str], None] | None = None) -> PretrainResult:
    """Runs GraphCL pretraining on ``graph``; every process of a job calls it with the same arguments.

    ``epochs x steps_per_epoch`` steps of ``num_shards`` shards (``options``: one pair of views of
    the full graph per device, or with ``options.sampled`` of each shard's own neighbour-sampled
    subgraph); after every epoch the held-out view loss (fixed view pairs of the full graph; of
    ``val_views`` fixed subgraphs when sampled) is computed, the best epoch kept, and ``patience``
    epochs without improvement stop the run.
    Writes ``pretrain_config.yaml`` (process 0, once the configuration and graph passed their
    checks), ``checkpoints/`` (orbax, the best epoch: ``params`` {encoder, projection},
    ``opt_state``; meta kind ``graphcl``), ``resume/`` while running (removed at the end) and, on
    process 0, ``tb/`` (loss per node type, learning rate, gradient norm, held-out view loss).
    Raises :class:`~jaxfood.train.preemption.Preempted` when stopped by SIGTERM (rerun to resume).
    """
    start = time.perf_counter()
    workdir = Path(workdir)
    check_pretrain_config(cfg, graph)
    log = log or (lambda _msg: None)
    pre_graph = prepare_pretrain_graph(graph, cfg.augment, seed=cfg.seed).to_numpy()
    model = make_model(pre_graph, cfg)
    total_steps = cfg.epochs * cfg.steps_per_epoch
    optimizer, schedule = make_graphcl_optimizer(cfg, total_steps)
    k_init, _, k_val = jax.random.split(jax.random.key(cfg.seed), 3)
    initial_params = jax.device_get(model.init(k_init, pre_graph))
    state = {"params": initial_params, "opt_state": jax.device_get(jax.jit(optimizer.init)(initial_params))}
    if is_primary():
        write_text(workdir / "pretrain_config.yaml", dump_config(cfg))
    layout = ShardLayout.current(options.per_device, options.local_devices)
    if options.sampled:
        views = PretrainSampler(graph, cfg, SamplerConfig(batch_size=options.batch_size, seed=cfg.seed))
        make_shard, count_edges = views.batch, sampled_edges
    else:
        full_edges = sum(e.num_edges for e in pre_graph.edges.values()) * layout.local_shards

        def make_shard(step, shard):
            return pre_graph

        def count_edges(batch):
            return full_edges
    step = data_parallel(make_pretrain_step(model, optimizer, axis_name=layout.axes), layout, seed=cfg.seed)
    val_keys = jax.random.split(k_val, cfg.val_views)
    device_graph = jax.device_put(pre_graph)
    if options.sampled:
        # The held-out view loss on fixed subgraphs (a full graph's views need not fit in memory);
        # the read-out embeddings of the full graph, once at the start and once at the end.
        val_one = jax.jit(make_subgraph_val_fn(model))
        val_batches = views.validation_batches(cfg.val_views)
        embed_fn = jax.jit(make_embed_fn(model))

        def held_out(params) -> dict[str, float]:
            rows = [jax.device_get(val_one(params, sub, key)) for sub, key in zip(val_batches, val_keys)]
            return {k: float(np.mean([row[k] for row in rows])) for k in rows[0]}

        def read_out(params):
            return jax.device_get(embed_fn(params, device_graph))
    else:
        eval_fn = jax.jit(make_eval_fn(model, val_keys))

        def held_out(params) -> dict[str, float]:
            return {k: float(v) for k, v in jax.device_get(eval_fn(params, device_graph)[0]).items()}

        def read_out(params):
            return jax.device_get(eval_fn(params, device_graph)[1])

    def random_embeddings():
        return read_out(initial_params)

    # The initial parameters' embeddings (reported at the end) compile their program (with the
    # full graph's held-out views unless sampled) in a thread while the first step compiles (one
    # process: see Background).
    random_view = Background(random_embeddings, name="jaxfood-graphcl-eval") if jax.process_count() == 1 else None
    spread = dict(layout.describe(), sampled=options.sampled,
                  batch_size=options.batch_size if options.sampled else None)

    loop = LoopConfig(num_steps=total_steps, checkpoint_dir=workdir / "checkpoints", resume_dir=workdir / "resume",
                      checkpoint_every=options.checkpoint_every, eval_every=cfg.steps_per_epoch,
                      patience=cfg.patience)
    prepare_run(loop, stale=[workdir / "tb"])
    tensorboard = TensorBoard(workdir / "tb" if is_primary() else None)

    def on_train(done: int, metrics: dict[str, float]) -> None:
        if not math.isfinite(metrics.get("loss", 0.0)):
            raise FloatingPointError(f"pretraining diverged at step {done} (loss {metrics['loss']})")
        tensorboard.write(done, metrics, "pretrain/")
        tensorboard.write(done, {"learning_rate": float(schedule(done - 1))}, "pretrain/")

    def evaluate(state, done: int) -> tuple[float, dict[str, float]]:
        val = held_out(state["params"])
        tensorboard.write(done, val, "pretrain_val/")
        log(f"epoch {done // cfg.steps_per_epoch}/{cfg.epochs}: held-out view loss {val['loss']:.4f}")
        return -val["loss"], val

    meta = {"kind": CHECKPOINT_KIND, "encoder_config": config_to_dict(cfg.encoder), "config": config_to_dict(cfg),
            "data_parallel": spread}
    try:
        result = train_loop(step, state, make_shard, loop, fixed_batch=not options.sampled, evaluate=evaluate,
                            meta=meta, on_train=on_train, count_edges=count_edges, progress=progress, log=log)
    finally:
        tensorboard.close()
        if random_view is not None:
            random_view.join()
    if result.preempted:
        raise Preempted(result.end_step, loop.resume_dir)

    best, _ = restore_checkpoint(loop.checkpoint_dir)
    per_step = {row["step"]: row["loss"] for row in result.history["train"]}
    epochs = len(result.history["val"])
    history = {"loss": [float(np.mean([per_step[s] for s in range(e * cfg.steps_per_epoch + 1,
                                                                   (e + 1) * cfg.steps_per_epoch + 1)
                                       if s in per_step])) for e in range(epochs)],
               "val_loss": [float(row["loss"]) for row in result.history["val"]]}
    embeddings = {"pretrained": read_out(best["params"]),
                  "random": random_view.result() if random_view is not None else random_embeddings()}
    return PretrainResult(encoder_config=cfg.encoder, params=best["params"], history=history,
                          best_epoch=result.best_step // cfg.steps_per_epoch, checkpoint_dir=loop.checkpoint_dir,
                          num_step_compilations=step.compile_count(), runtime_s=time.perf_counter() - start,
                          embeddings=embeddings, start_step=result.start_step,
                          edges_per_second=result.edges_per_second, spread=spread)


def load_pretrained_encoder(ckpt_dir: str | Path, step: int | None = None) -> tuple[EncoderConfig, Any]:
    """``(EncoderConfig, encoder_params)`` from a GraphCL (or any jaxfood encoder) checkpoint directory.

    Build the encoder with ``make_encoder(graph, config)``; the parameter tree matches it.
    """
    config_dict, params, _meta = load_encoder(ckpt_dir, step)
    try:
        config = config_from_dict(EncoderConfig(), config_dict, source=f"{ckpt_dir}: meta 'encoder_config'")
    except ConfigError as err:
        raise CheckpointError(str(err)) from None
    return config.validate(f"{ckpt_dir}: meta 'encoder_config'"), params
