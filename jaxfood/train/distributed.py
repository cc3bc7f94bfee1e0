"""Data-parallel and multi-host training: one code path for one device, many devices, many hosts.

Layout. Every step trains on ``num_shards = process_count x local_devices x per_device`` sampled
subgraphs (or full-graph replicas with different random streams). Shard ``i`` is a global index;
process ``p`` owns shards ``[p * L, (p + 1) * L)`` with ``L = local_devices x per_device``. What a
shard contains and its random key are functions of ``(seed, step, shard)`` only, so the same
``num_shards`` gives the same training whichever way the shards are spread over devices and
hosts, and a run resumed from a checkpoint continues exactly as an uninterrupted one.

Step. A step function ``step(state, batch, rng) -> (state, metrics)`` averages its gradients (and
whatever statistics must agree, e.g. task-weighting norms) with ``jax.lax.pmean(x, axis_name)``
where ``axis_name`` is :data:`DATA_AXES`. :func:`data_parallel` runs it as
``pmap(vmap(step))`` over ``[local_devices, per_device]`` batches: ``pmap`` spans every device of
every process (Krizhevsky-style synchronous data parallelism, all-reduce of gradients), ``vmap``
stacks several subgraphs on one device; the averaged update is identical on every device.

Multi-host. :func:`initialize_distributed` wraps ``jax.distributed.initialize`` (automatic on TPU
pods; ``--coordinator HOST:PORT --num-processes N --process-id I`` elsewhere, see
:func:`add_distributed_arguments`). Only the primary process (:func:`is_primary`) writes logs and
reports; every process takes part in orbax checkpoint saves (:class:`Checkpointer`), which orbax
coordinates (process 0 writes replicated arrays, the others wait at its barriers).

Preemption. :func:`fit` checkpoints every ``checkpoint_every`` steps and when the job is told to
stop (SIGTERM; on several processes through JAX's preemption sync point, so every host saves the
same step); rerun with the same workdir, it restores the latest checkpoint and continues.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxfood.errors import CheckpointError, ConfigError
from jaxfood.graph.sampling import SamplerConfig
from jaxfood.models.encoder import EncoderConfig
from jaxfood.models.heads import HeadsConfig
from jaxfood.train.finetune import FinetuneResult
from jaxfood.train.multitask import LossConfig
from jaxfood.train.optimizer import OptimizerConfig
from jaxfood.train.parallel_options import (  # noqa: F401  (re-exported)
    DataParallelOptions,
    add_data_parallel_arguments,
    add_distributed_arguments,
    options_from_args,
)
from jaxfood.train.task_weighting import WeightingConfig

#: Axis names of the data-parallel step: devices of all processes (pmap), subgraphs per device (vmap).
DEVICE_AXIS = "devices"
SUBGRAPH_AXIS = "subgraphs"
DATA_AXES: tuple[str, str] = (DEVICE_AXIS, SUBGRAPH_AXIS)

PyTree = Any


# ---- processes -----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DistributedInfo:
    """Where this process stands in the job."""

    process_index: int
    process_count: int
    local_device_count: int
    device_count: int

    @property
    def is_primary(self) -> bool:
        return self.process_index == 0


def _on_tpu_pod() -> bool:
    """True on a multi-host Cloud TPU VM slice, where ``jax.distributed.initialize()`` needs no arguments."""
    hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return "," in hosts or bool(os.environ.get("MEGASCALE_COORDINATOR_ADDRESS"))


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, *, local_device_ids: Sequence[int] | None = None,
                           auto: bool | None = None) -> DistributedInfo:
    """Joins the multi-process job (``jax.distributed.initialize``) when there is one.

    Args:
      coordinator: ``HOST:PORT`` of process 0; with ``num_processes`` and ``process_id``.
      num_processes, process_id: job size and this process's index.
      local_device_ids: devices this process drives (default: all it sees).
      auto: call ``jax.distributed.initialize()`` without arguments (cluster auto-detection: TPU
        pods, SLURM, ...). Default: on a multi-host TPU slice only.

    Must run before anything else touches JAX devices. Calling it again is a no-op. CPU
    collectives are routed through gloo, so CPU-only multi-process jobs (tests) work too.
    """
    explicit = (coordinator, num_processes, process_id)
    if any(v is not None for v in explicit):
        if any(v is None for v in explicit):
            raise ConfigError("multi-host: --coordinator, --num-processes and --process-id go together "
                              f"(got coordinator={coordinator!r}, num_processes={num_processes!r}, "
                              f"process_id={process_id!r})")
        host, _, port = str(coordinator).rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"--coordinator {coordinator!r}: expected HOST:PORT, e.g. 10.0.0.2:8476")
        if num_processes < 1:
            raise ConfigError(f"--num-processes {num_processes}: expected a positive integer")
        if not 0 <= process_id < num_processes:
            raise ConfigError(f"--process-id {process_id}: expected 0 .. {num_processes - 1}")
    do_init = (coordinator is not None and num_processes > 1) or (auto if auto is not None else _on_tpu_pod())
    if do_init and not jax.distributed.is_initialized():
        # CPU-only jobs need a collectives implementation for cross-process all-reduce.
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        if coordinator is not None:
            jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                       process_id=process_id, local_device_ids=local_device_ids)
        else:
            jax.distributed.initialize(local_device_ids=local_device_ids)
    return distributed_info()


def init_from_args(args: argparse.Namespace) -> DistributedInfo:
    """:func:`initialize_distributed` from the options of :func:`add_distributed_arguments`."""
    return initialize_distributed(getattr(args, "coordinator", None), getattr(args, "num_processes", None),
                                  getattr(args, "process_id", None))


def distributed_info() -> DistributedInfo:
    return DistributedInfo(jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())


def is_primary() -> bool:
    """Whether this process writes logs, reports and TensorBoard events (process 0)."""
    return jax.process_index() == 0


# ---- layout --------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ShardLayout:
    """How the ``num_shards`` subgraphs of a step are spread: processes x local devices x per device."""

    process_index: int
    process_count: int
    local_devices: int
    per_device: int = 1

    @classmethod
    def current(cls, per_device: int = 1, local_devices: int | None = None) -> ShardLayout:
        n = jax.local_device_count() if local_devices is None else int(local_devices)
        if per_device < 1 or n < 1:
            raise ConfigError(f"per_device ({per_device}) and local_devices ({n}) must be positive")
        return cls(jax.process_index(), jax.process_count(), n, int(per_device))

    @property
    def local_shards(self) -> int:
        return self.local_devices * self.per_device

    @property
    def num_shards(self) -> int:
        return self.process_count * self.local_shards

    def shard_ids(self) -> np.ndarray:
        """[local_devices, per_device] int32 global shard index of each local slot."""
        first = self.process_index * self.local_shards
        return (first + np.arange(self.local_shards, dtype=np.int32)).reshape(self.local_devices, self.per_device)


def stack_trees(trees: Sequence[PyTree]) -> PyTree:
    """Stacks pytrees of equal structure (e.g. sampled subgraphs of one sampler) on a new axis 0."""
    return jax.tree_util.tree_map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *trees)


def local_batch(make_shard: Callable[[int, int], PyTree], step: int, layout: ShardLayout) -> PyTree:
    """``[local_devices, per_device, ...]`` stack of ``make_shard(step, shard)`` for this process's shards."""
    ids = layout.shard_ids()
    shards = [make_shard(int(step), int(i)) for i in ids.reshape(-1)]
    stacked = stack_trees(shards)
    return jax.tree_util.tree_map(lambda x: x.reshape(ids.shape + x.shape[1:]), stacked)


def replicate(tree: PyTree, local_devices: int | None = None) -> PyTree:
    """One copy of ``tree`` per local device (leading axis), the state layout of :func:`data_parallel`."""
    n = jax.local_device_count() if local_devices is None else int(local_devices)
    devices = jax.local_devices()[:n]
    return jax.tree_util.tree_map(lambda x: _put_replicated(np.asarray(x), devices), tree)


def _put_replicated(x: np.ndarray, devices) -> jax.Array:
    mesh = jax.sharding.Mesh(np.asarray(devices), (DEVICE_AXIS,))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(DEVICE_AXIS))
    return jax.device_put(np.broadcast_to(x, (len(devices),) + x.shape), sharding)


def unreplicate(tree: PyTree) -> PyTree:
    """Host (numpy) copy of the first local replica of a replicated tree."""
    def first(x):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            return np.asarray(x.addressable_shards[0].data).reshape(x.shape[1:])
        return np.asarray(x[0])

    return jax.tree_util.tree_map(first, tree)


# ---- the data-parallel step ----------------------------------------------------------------------
StepFn = Callable[[PyTree, PyTree, jax.Array], tuple[PyTree, PyTree]]


@dataclasses.dataclass
class ParallelStep:
    """A compiled ``pmap(vmap(step))``; call with replicated state, a local batch and the step number."""

    fn: Callable
    layout: ShardLayout
    seed: int
    traces: list = dataclasses.field(default_factory=list)

    def __call__(self, state: PyTree, batch: PyTree, step: int) -> tuple[PyTree, PyTree]:
        shard_ids = self.layout.shard_ids()
        steps = np.full(shard_ids.shape, int(step), np.int32)
        return self.fn(state, batch, steps, shard_ids)

    def compile_count(self) -> int:
        """How many times the step has been traced and compiled (1 for a run with static shapes)."""
        return len(self.traces)


def shard_rng(seed: int, step, shard) -> jax.Array:
    """The random key of one shard at one step: ``fold_in(fold_in(key(seed), step), shard)``."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), step), shard)


def data_parallel(step_fn: StepFn, layout: ShardLayout | None = None, seed: int = 0,
                  donate_state: bool = False) -> ParallelStep:
    """Runs ``step_fn(state, batch, rng) -> (state, metrics)`` on every shard of a step at once.

    ``step_fn`` must average gradients (and any statistics that drive the update) with
    ``jax.lax.pmean(..., DATA_AXES)``, so its new ``state`` is the same for every shard; metrics it
    leaves per shard come back as ``[local_devices, per_device, ...]``.

    Returns a :class:`ParallelStep`: ``(state [D, ...], batch [D, K, ...], step) -> (state [D, ...],
    metrics [D, K, ...])`` with ``D`` local devices and ``K = layout.per_device``.
    """
    layout = layout or ShardLayout.current()
    traces: list = []

    def per_device(state, batch, steps, shard_ids):
        traces.append(1)  # runs once per trace (compilation), never per step
        def one(batch_k, step_k, shard_k):
            return step_fn(state, batch_k, shard_rng(seed, step_k, shard_k))

        return jax.vmap(one, axis_name=SUBGRAPH_AXIS, out_axes=(None, 0))(batch, steps, shard_ids)

    # pmap over all devices of all processes (devices=None): collectives are then global. Naming
    # devices restricts the collectives to them, which only one process may do (fewer local devices).
    devices = None
    if layout.local_devices != jax.local_device_count():
        if jax.process_count() > 1:
            raise ConfigError(f"local_devices = {layout.local_devices}: a multi-process job uses every local "
                              f"device ({jax.local_device_count()})")
        devices = jax.local_devices()[: layout.local_devices]
    fn = jax.pmap(per_device, axis_name=DEVICE_AXIS, devices=devices, donate_argnums=(0,) if donate_state else ())
    return ParallelStep(fn=fn, layout=layout, seed=seed, traces=traces)


def aggregate_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Mean of each metric over local shards and all processes (every process gets the same values).

    Collective when there are several processes: every process must call it at the same step.
    """
    names = sorted(metrics)
    local = [np.asarray(jax.device_get(metrics[k]), np.float64) for k in names]
    totals = np.array([[v.sum(), v.size] for v in local], np.float64).reshape(-1, 2)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        totals = np.asarray(multihost_utils.process_allgather(totals)).reshape(-1, len(names), 2).sum(0)
    return {k: float(s / max(c, 1)) for k, (s, c) in zip(names, totals)}


def host_sum(value: float) -> float:
    """Sum of a host-side number (e.g. edges processed) over all processes."""
    if jax.process_count() == 1:
        return float(value)
    from jax.experimental import multihost_utils

    return float(np.asarray(multihost_utils.process_allgather(np.asarray([value], np.float64))).sum())


# ---- adapters: the multi-task and GraphCL steps as data-parallel step functions -------------------
class PaddingAwareEncoder:
    """Wraps an encoder so that sampled subgraphs need nothing from the step that calls it.

    ``apply`` switches off the subgraph's padding edges (:func:`~jaxfood.graph.sampling.padding_edge_masks`,
    merged with the caller's masks; nothing changes on a full graph) and ``init`` fills a dummy
    ``node_index`` on a subgraph (parameter shapes come from the encoder, not the subgraph).
    Parameters are those of the wrapped encoder, unchanged.
    """

    def __init__(self, encoder):
        self.encoder = encoder

    def init(self, rngs, graph, *args, **kwargs):
        if "node_index" not in kwargs and graph.meta.extra.get("sampled"):
            kwargs["node_index"] = {t: np.zeros(n, np.int32) for t, n in graph.num_nodes.items()}
        return self.encoder.init(rngs, graph, *args, **kwargs)

    def apply(self, variables, graph, *args, edge_masks=None, **kwargs):
        if "method" in kwargs:  # another entry point of the module: nothing to mask
            return self.encoder.apply(variables, graph, *args, **kwargs)
        return self.encoder.apply(variables, graph, *args, edge_masks=_with_padding(graph, edge_masks), **kwargs)

    def __getattr__(self, name):
        if name == "encoder":  # not yet set (copy/unpickle): no recursion
            raise AttributeError(name)
        return getattr(self.encoder, name)


def _with_padding(graph, edge_masks):
    """``edge_masks`` AND the padding masks of a sampled subgraph (``None`` when nothing is masked)."""
    from jaxfood.graph.sampling import padding_edge_masks

    masks = dict(padding_edge_masks(graph))
    for key, m in (edge_masks or {}).items():
        masks[key] = m if key not in masks else masks[key] & m
    return masks or None


def padding_aware_model(model):
    """``model`` (a :class:`~jaxfood.models.heads.MultiTaskModel`) made blind to subgraph padding.

    Its encoder becomes a :class:`PaddingAwareEncoder` and its attention pooling ignores padding
    ``contains_molecule`` edges (so the padding sample has no molecules and stays out of the pooled
    standardisation statistics). Parameters and results on full graphs are unchanged.
    """
    from jaxfood.graph import schema
    from jaxfood.models.heads import MultiTaskModel

    if getattr(model, "_padding_aware", False):
        return model

    class PaddingAwareModel(type(model)):
        _padding_aware = True

        def pool(self, params, graph, molecule_features, edge_mask=None, gate=None, stats_mask=None):
            padding = _with_padding(graph, None) or {}
            if schema.CONTAINS in padding:
                edge_mask = padding[schema.CONTAINS] if edge_mask is None else edge_mask & padding[schema.CONTAINS]
            return super().pool(params, graph, molecule_features, edge_mask, gate=gate, stats_mask=stats_mask)

    assert isinstance(model, MultiTaskModel)
    fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(model)}
    fields["encoder"] = PaddingAwareEncoder(model.encoder)
    return PaddingAwareModel(**fields)


def as_graph_and_index(batch):
    """``(graph, node_index, seed_mask)`` of a :class:`SampledSubgraph` or a full ``HeteroGraph``.

    A full graph supervises its training split (``sample_split == 0``) with ``node_index`` None.
    """
    if hasattr(batch, "seed_mask") and hasattr(batch, "graph"):
        return batch.graph, batch.node_index, batch.seed_mask
    return batch, None, batch.sample_split == 0


def multitask_step_fn(model, loss_cfg, weighting, tx, **step_options) -> StepFn:
    """The multi-task step of :mod:`jaxfood.train.multitask` as ``step(state, batch, rng)``.

    ``state`` is the ``TrainState`` as a plain dict (:func:`train_state_to_dict`; checkpoints
    hold that form, which ``load_encoder`` reads). ``batch`` is a
    :class:`~jaxfood.graph.sampling.SampledSubgraph` (its seeds are supervised) or a full graph
    (its training split is). Gradients, task losses and weighting statistics are averaged over
    :data:`DATA_AXES` by the step itself. ``step_options`` go to ``make_train_step``
    (e.g. ``task_gradient_scope``).
    """
    from jaxfood.train import multitask

    step = multitask.make_train_step(padding_aware_model(model), loss_cfg, weighting, tx, axis_name=DATA_AXES,
                                     **step_options)

    def run(state, batch, rng):
        graph, node_index, seed_mask = as_graph_and_index(batch)
        new_state, metrics = step(multitask.TrainState(**state), graph,
                                  multitask.Batch(seed_mask=seed_mask, rng=rng, node_index=node_index))
        return train_state_to_dict(new_state), metrics

    return run


def train_state_to_dict(state) -> dict[str, Any]:
    """A multi-task ``TrainState`` as ``{"step", "params", "opt_state", "weighting_state"}``."""
    return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}


def pretrain_step_fn(model, optimizer) -> StepFn:
    """The GraphCL step of :mod:`jaxfood.train.pretrain` as ``step({"params", "opt_state"}, batch, rng)``.

    ``batch``: the full pretraining graph (each shard contrasts its own pair of views, different
    ``rng``) or a sampled subgraph of :class:`~jaxfood.train.pretrain.PretrainSampler` (each shard
    contrasts views of its own subgraph). Gradients and losses are averaged over :data:`DATA_AXES`.
    """
    from jaxfood.train import pretrain

    step = pretrain.make_pretrain_step(model, optimizer, axis_name=DATA_AXES)

    def run(state, batch, rng):
        if hasattr(batch, "node_mask") and hasattr(batch, "graph"):
            graph, node_index, node_mask = batch.graph, batch.node_index, batch.node_mask
        else:
            graph, node_index, node_mask = batch, None, None
        params, opt_state, metrics = step(state["params"], state["opt_state"], graph, rng, node_index, node_mask)
        return {"params": params, "opt_state": opt_state}, metrics

    return run


# ---- checkpoints ---------------------------------------------------------------------------------
class Checkpointer:
    """Orbax checkpoints of a (possibly multi-host) run, in the format of :mod:`jaxfood.train.checkpoint`.

    Every process calls :meth:`save` and :meth:`restore` with host (numpy) state; orbax writes the
    replicated arrays from process 0 and synchronises the others, so the directory must be shared
    storage (a ``gs://`` bucket on TPU pods). Saves are asynchronous; a save cut short (SIGKILL)
    leaves only a temporary directory that restore ignores.
    """

    def __init__(self, directory: str | os.PathLike, max_to_keep: int | None = 3):
        import orbax.checkpoint as ocp

        from jaxfood.train.checkpoint import checkpoint_path

        self._ocp = ocp
        self.directory = checkpoint_path(directory)  # gs:// (or any epath URL) or an absolute local path
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: PyTree, meta: Mapping[str, Any]) -> None:
        ocp = self._ocp
        state = jax.tree_util.tree_map(np.asarray, state)
        self._manager.save(int(step), args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta, step=int(step)))), force=True)

    def restore(self, step: int | None = None, target: PyTree = None) -> tuple[PyTree, dict]:
        ocp = self._ocp
        self._manager.wait_until_finished()
        step = self._manager.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{self.directory}: no checkpoint steps found")
        if target is not None:
            target = jax.tree_util.tree_map(np.asarray, target)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        except Exception as err:  # orbax raises many types for shape/structure mismatches
            msg = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise CheckpointError(f"{self.directory}/{step}: cannot restore ({msg})") from None
        return jax.tree_util.tree_map(np.asarray, restored["state"]), dict(restored["meta"])

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


class PreemptionGuard:
    """Tells the loop when to checkpoint and stop because the job is being preempted.

    One process: SIGTERM sets a flag (the handler is installed for the guard's lifetime). Several
    processes: JAX's preemption sync point (its coordination service catches SIGTERM on any host
    and picks one step at which every host stops), so all hosts save the same step.
    """

    def __init__(self):
        self._flag = threading.Event()
        self._previous = None
        self._multi = jax.process_count() > 1

    def __enter__(self) -> PreemptionGuard:
        if not self._multi and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, lambda *_: self._flag.set())
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def request_stop(self) -> None:
        self._flag.set()

    def should_stop(self, step: int) -> bool:
        if self._multi:
            from jax.experimental import multihost_utils

            return bool(multihost_utils.reached_preemption_sync_point(int(step))) or self._flag.is_set()
        return self._flag.is_set()


# ---- the resumable loop --------------------------------------------------------------------------
@dataclasses.dataclass
class FitResult:
    """What :func:`fit` returns: host state, metric history, where it started and why it stopped."""

    state: PyTree
    history: list[dict[str, float]]
    start_step: int
    end_step: int
    preempted: bool
    edges_per_second: float = 0.0
    seconds: float = 0.0


def fit(parallel_step: ParallelStep, init_state: PyTree, make_shard: Callable[[int, int], PyTree],
        num_steps: int, checkpoint_dir: str | os.PathLike | None = None, checkpoint_every: int = 0,
        meta: Mapping[str, Any] | None = None, log_every: int = 1,
        on_log: Callable[[int, dict[str, float]], None] | None = None,
        count_edges: Callable[[PyTree], int] | None = None, progress: bool = False,
        max_to_keep: int | None = 3) -> FitResult:
    """Trains ``num_steps`` data-parallel steps, resuming from ``checkpoint_dir`` when it has a checkpoint.

    Args:
      parallel_step: from :func:`data_parallel`.
      init_state: host pytree (params, optimizer state, ...); also the restore target.
      make_shard: ``(step, shard) -> batch`` of one shard (deterministic: e.g.
        ``NeighbourSampler.batch``).
      num_steps: total steps of the run (a resumed run stops at the same step).
      checkpoint_dir: orbax directory; ``None`` disables checkpoints and resume.
      checkpoint_every: save every N completed steps (0: only at the end and on preemption).
      meta: JSON stored with each checkpoint (``kind``, configs, id maps); ``step`` and
        ``history`` are added.
      log_every: fetch metrics every N steps (fetching waits for the device).
      on_log: ``(step, metrics)`` callback with metrics averaged over shards and processes; the
        caller decides who writes (see :func:`is_primary`).
      count_edges: real edges of one local batch (for throughput); default: none counted.

    Checkpoints hold ``state`` after ``step`` completed steps; data and random keys of step ``s``
    depend only on ``(seed, s, shard)``, so resuming reproduces the uninterrupted run.
    """
    layout = parallel_step.layout
    meta = dict(meta or {})
    ckpt = Checkpointer(checkpoint_dir, max_to_keep=max_to_keep) if checkpoint_dir is not None else None
    start, history = 0, []
    state_host = init_state
    try:
        if ckpt is not None and ckpt.latest_step() is not None:
            state_host, saved = ckpt.restore(target=init_state)
            start = int(saved.get("step", ckpt.latest_step()))
            history = list(saved.get("history", []))
        state = replicate(state_host, layout.local_devices)
        step, preempted, edges, t0 = start, False, 0.0, None
        bar = _progress(range(start, num_steps), progress and is_primary())
        with PreemptionGuard() as guard:
            for step in bar:
                batch = local_batch(make_shard, step, layout)
                if count_edges is not None:
                    edges += count_edges(batch) if t0 is not None else 0
                state, metrics = parallel_step(state, batch, step)
                if t0 is None:  # the first step compiles: throughput counts from the second
                    jax.block_until_ready(state)
                    t0 = time.perf_counter()
                done = step + 1
                if done % log_every == 0 or done == num_steps:
                    logged = dict(aggregate_metrics(metrics), step=done)
                    history.append(logged)
                    if on_log is not None:
                        on_log(done, logged)
                    if hasattr(bar, "set_postfix"):
                        bar.set_postfix({k: f"{v:.4g}" for k, v in logged.items() if k != "step"}, refresh=False)
                stop = guard.should_stop(done)
                if ckpt is not None and (stop or done == num_steps
                                         or (checkpoint_every and done % checkpoint_every == 0)):
                    ckpt.save(done, unreplicate(state), dict(meta, history=history))
                if stop and done < num_steps:
                    preempted = True
                    step = done
                    break
                step = done
        jax.block_until_ready(state)
        seconds = time.perf_counter() - t0 if t0 is not None else 0.0
        if ckpt is not None:
            ckpt.wait()
        total_edges = host_sum(edges)
        return FitResult(state=unreplicate(state), history=history, start_step=start, end_step=step,
                         preempted=preempted, edges_per_second=total_edges / seconds if seconds > 0 else 0.0,
                         seconds=seconds)
    finally:
        if ckpt is not None:
            ckpt.close()


def _progress(steps: range, enabled: bool) -> Iterator[int]:
    if not enabled:
        return iter(steps)
    from tqdm import tqdm

    return tqdm(steps, initial=steps.start, total=steps.stop, desc="train", dynamic_ncols=True)


def global_mean(x: jax.Array, axis_name=DATA_AXES) -> jax.Array:
    """``lax.pmean`` over the data-parallel axes (inside a step run by :func:`data_parallel`)."""
    return jax.lax.pmean(x, axis_name)


__all__ = [
    "DATA_AXES", "DEVICE_AXIS", "SUBGRAPH_AXIS", "Checkpointer", "DistributedInfo", "FitResult", "ParallelStep",
    "PreemptionGuard", "ShardLayout", "add_distributed_arguments", "aggregate_metrics", "data_parallel",
    "DataParallelOptions", "DataParallelFinetuneResult", "add_data_parallel_arguments", "options_from_args",
    "finetune_job", "pretrain_job", "Preempted", "pretrain_on_devices", "finetune_on_devices",
    "distributed_info", "fit", "global_mean", "host_sum", "init_from_args", "initialize_distributed", "is_primary",
    "local_batch", "replicate", "shard_rng", "stack_trees", "unreplicate",
]


# ---- the data-parallel fine-tuning job -----------------------------------------------------------
def _default_encoder() -> EncoderConfig:
    return EncoderConfig(hidden_dim=64, num_heads=4, num_layers=2, embedding_dim=64, dropout=0.1,
                         input_modes={"Sample": "shared", "Molecule": "both", "Food": "both",
                                      "Nutrient": "embedding"})


@dataclasses.dataclass(frozen=True)
class DataParallelConfig:
    """A data-parallel multi-task fine-tuning run (``--config`` / ``--set key=value`` address it).

    ``sampled``: train on neighbour-sampled subgraphs (``sampler``); False: every shard holds the
    full graph (different random streams). ``per_device``: subgraphs per device per step (the
    global batch is ``processes x devices x per_device x sampler.batch_size`` seed samples).
    ``steps`` is the total of the run, resumed or not. ``task_gradient_scope``: see
    ``multitask.make_train_step``. ``eval_batches``: val-split subgraphs
    scored at the end by process 0 (0: no evaluation).
    """

    encoder: EncoderConfig = dataclasses.field(default_factory=_default_encoder)
    heads: HeadsConfig = dataclasses.field(default_factory=HeadsConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    weighting: WeightingConfig = dataclasses.field(default_factory=WeightingConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    sampler: SamplerConfig = dataclasses.field(default_factory=SamplerConfig)
    task_gradient_scope: str = "representation"
    sampled: bool = True
    steps: int = 200
    per_device: int = 1
    checkpoint_every: int = 50
    log_every: int = 10
    eval_batches: int = 8
    seed: int = 0


def _evaluate_sampled(model, params, graph, cfg, sampler_cfg, num_batches: int) -> dict[str, float]:
    """Food accuracy of the val split on sampled subgraphs (deterministic seeds and draws)."""
    from jaxfood.graph.sampling import NeighbourSampler
    from jaxfood.train.multitask import split_params

    val = np.nonzero((np.asarray(graph.sample_split) == 1) & (np.asarray(graph.sample_food) >= 0))[0]
    if num_batches <= 0 or val.size == 0:
        return {}
    sampler = NeighbourSampler(graph, sampler_cfg, seed_pool=val)
    model_params, _ = split_params(params)

    @jax.jit
    def predict(p, sub):
        out = model.apply(p, sub.graph, node_index=sub.node_index, deterministic=True)
        return jnp.argmax(out.food_logits, -1)

    correct = total = 0
    b = sampler_cfg.batch_size
    for i in range(min(num_batches, -(-val.size // b))):
        seeds = val[i * b: (i + 1) * b]
        sub = sampler.sample(seeds, np.random.default_rng([cfg.seed, 0xE7A1, i]))
        pred = np.asarray(predict(model_params, sub))[: seeds.size]
        correct += int((pred == np.asarray(graph.sample_food)[seeds]).sum())
        total += seeds.size
    return {"val/accuracy": correct / max(total, 1), "val/samples": float(total)}


def finetune_data_parallel(graph, cfg: DataParallelConfig, workdir: str | os.PathLike, *,
                           encoder_params: PyTree = None, progress: bool = True,
                           local_devices: int | None = None) -> dict[str, Any]:
    """Multi-task fine-tuning, data parallel over every device of every process, resumable.

    Every process calls it with the same ``graph`` and ``cfg``. Writes (process 0 only)
    ``workdir/train_log.jsonl`` (metrics every ``log_every`` steps), ``workdir/tb/`` and, when the
    run completes, ``workdir/report.json``; checkpoints go to ``workdir/checkpoints`` (all
    processes). Returns the report (also on the other processes, unwritten); ``status`` is
    ``"preempted"`` when it stopped early (rerun to resume).
    """
    from jaxfood.config import config_to_dict
    from jaxfood.graph.sampling import NeighbourSampler
    from jaxfood.io_utils import write_json
    from jaxfood.models.heads import make_multitask_model
    from jaxfood.train import multitask
    from jaxfood.train.optimizer import make_optimizer

    workdir = str(workdir)
    primary = is_primary()
    layout = ShardLayout.current(cfg.per_device, local_devices)
    base_model = make_multitask_model(graph, cfg.encoder, cfg.heads)
    model = padding_aware_model(base_model)
    sampler_cfg = dataclasses.replace(cfg.sampler, num_hops=cfg.encoder.num_layers, seed=cfg.seed)
    if cfg.sampled:
        sampler = NeighbourSampler(graph, sampler_cfg)
        make_shard = sampler.batch
        example = sampler.batch(0).graph

        def count_edges(batch):
            return int(sum(np.asarray(m).sum() for m in batch.edge_masks.values()))
    else:
        graph = graph.to_numpy()

        def make_shard(step, shard):
            return graph

        example = graph
        full_edges = sum(e.num_edges for e in graph.edges.values())

        def count_edges(batch):
            return full_edges * layout.local_shards

    tx, _ = make_optimizer(cfg.optimizer, cfg.steps)
    state = multitask.init_train_state(model, cfg.weighting, tx, jax.random.PRNGKey(cfg.seed), example,
                                       encoder_params)
    state = jax.tree_util.tree_map(np.asarray, train_state_to_dict(state))
    step = data_parallel(multitask_step_fn(model, cfg.loss, cfg.weighting, tx,
                                           task_gradient_scope=cfg.task_gradient_scope), layout, seed=cfg.seed)
    meta = {"kind": "finetune", "encoder_config": config_to_dict(cfg.encoder), "config": config_to_dict(cfg),
            "num_shards": layout.num_shards, "node_ids": graph.meta.node_ids.get("Food", [])}

    log_path = os.path.join(workdir, "train_log.jsonl")
    writer = None
    if primary:
        os.makedirs(workdir, exist_ok=True)
        try:
            from tensorboardX import SummaryWriter

            writer = SummaryWriter(os.path.join(workdir, "tb"))
        except ImportError:  # TensorBoard logging is optional here
            writer = None

    def on_log(done: int, metrics: dict[str, float]) -> None:
        if not primary:
            return
        import json

        with open(log_path, "a") as fh:
            fh.write(json.dumps(metrics) + "\n")
        if writer is not None:
            for k, v in metrics.items():
                if k != "step":
                    writer.add_scalar(k, v, done)

    try:
        result = fit(step, state, make_shard, cfg.steps, os.path.join(workdir, "checkpoints"),
                     cfg.checkpoint_every, meta, cfg.log_every, on_log, count_edges, progress)
    finally:
        if writer is not None:
            writer.close()
    info = distributed_info()
    report: dict[str, Any] = {
        "status": "preempted" if result.preempted else "complete",
        "steps": result.end_step, "resumed_from_step": result.start_step,
        "process_count": info.process_count, "device_count": info.device_count,
        "num_shards": layout.num_shards, "per_device": layout.per_device, "sampled": cfg.sampled,
        "seeds_per_step": layout.num_shards * sampler_cfg.batch_size if cfg.sampled else None,
        "edges_per_second": result.edges_per_second, "train_seconds": result.seconds,
        "compilations": step.compile_count(),
        "final_metrics": result.history[-1] if result.history else {},
        "params_l1": float(sum(np.abs(np.asarray(x, np.float64)).sum()
                               for x in jax.tree_util.tree_leaves(result.state["params"]))),
    }
    if not result.preempted and primary and cfg.sampled:
        report["evaluation"] = _evaluate_sampled(model, result.state["params"], graph, cfg, sampler_cfg,
                                                 cfg.eval_batches)
    if primary and not result.preempted:
        write_json(os.path.join(workdir, "report.json"), report)
    report["state"] = result.state
    return report


# ---- the training commands' data-parallel path ---------------------------------------------------
def _noop(_msg: str) -> None:
    return None


def finetune_job(graph, cfg, workdir: str | os.PathLike, *, options: DataParallelOptions = DataParallelOptions(),
                 pretrained=None, evaluation, progress: bool = True, log=None):
    """``jaxfood finetune`` on every device of every process: :func:`jaxfood.train.finetune.finetune`'s
    outputs, trained by the data-parallel step of this module; ``evaluation`` as there.

    Every process calls it with the same arguments. ``cfg`` is a
    :class:`~jaxfood.train.finetune.FinetuneConfig`; its ``steps`` are data-parallel steps of
    ``num_shards`` shards (full-graph replicas, or sampled subgraphs with ``options.sampled``).
    There is no early stopping (every process must reach the same save points): the checkpoint is
    that of the last step, scored on the test split like the single-device run's kept checkpoint.

    Writes, process 0 only: ``config.yaml``, ``metrics.json`` (keys of the single-device run),
    ``history.json``, ``tb/``, ``figures/``. All processes write ``checkpoints/`` (orbax, kind
    ``finetune``: ``jaxfood evaluate`` reads it), every ``options.checkpoint_every`` steps, at the
    end and on SIGTERM; rerunning with the same workdir resumes. Returns a
    :class:`DataParallelFinetuneResult`, the same on every process (all evaluate the same final
    parameters); metrics empty when preempted, figures only on process 0.
    """
    from jaxfood.config import dump_config
    from jaxfood.graph.sampling import NeighbourSampler
    from jaxfood.io_utils import write_json, write_text
    from jaxfood.models.heads import make_multitask_model
    from jaxfood.train import finetune as ft
    from jaxfood.train import multitask as mt
    from jaxfood.train.finetune_monitoring import FinetuneMonitor
    from jaxfood.train.optimizer import learning_rates, make_optimizer

    start = time.perf_counter()
    log = log or _noop
    primary = is_primary()
    cfg = ft.check_config(cfg)
    workdir = os.fspath(workdir)
    if pretrained is not None:
        enc_cfg, enc_params, _ = ft._load_pretrained(pretrained, cfg)
        log(f"encoder from {pretrained}")
    else:
        enc_cfg, enc_params = cfg.encoder, None
    cfg = dataclasses.replace(cfg, encoder=enc_cfg)
    if primary:
        os.makedirs(workdir, exist_ok=True)
        write_text(os.path.join(workdir, "config.yaml"), dump_config(cfg))

    full = ft.prepare_graph(graph).to_numpy()
    base = make_multitask_model(full, enc_cfg, cfg.heads)
    evaluator = evaluation(base, jax.device_put(full), cfg)
    reference = evaluator.reference
    model = padding_aware_model(base)
    layout = ShardLayout.current(options.per_device, options.local_devices)
    if options.sampled:
        sampler = NeighbourSampler(full, SamplerConfig(batch_size=options.batch_size, num_hops=enc_cfg.num_layers,
                                                       seed=cfg.seed))
        make_shard, example = sampler.batch, sampler.batch(0).graph

        def count_edges(batch):
            return int(sum(np.asarray(m).sum() for m in batch.edge_masks.values()))
    else:
        full_edges = sum(e.num_edges for e in full.edges.values())

        def make_shard(step, shard):
            return full

        def count_edges(batch):
            return full_edges * layout.local_shards

        example = full
    accumulation = cfg.optimizer.accumulation_steps
    tx, schedules = make_optimizer(cfg.optimizer, -(-cfg.steps // accumulation))
    state = mt.init_train_state(model, cfg.weighting, tx, jax.random.PRNGKey(cfg.seed), example)
    if enc_params is not None:
        ft._check_encoder_params(enc_params, state.params["encoder"], pretrained)
        params = dict(state.params, encoder=jax.tree_util.tree_map(jnp.asarray, enc_params))
        state = state.replace(params=params, opt_state=tx.init(params))
    state = jax.tree_util.tree_map(np.asarray, train_state_to_dict(state))
    step = data_parallel(multitask_step_fn(base, cfg.loss, cfg.weighting, tx,
                                           task_gradient_scope=cfg.task_gradient_scope), layout, seed=cfg.seed)
    spread = {"num_shards": layout.num_shards, "per_device": layout.per_device, "sampled": options.sampled,
              "batch_size": options.batch_size if options.sampled else None,
              "process_count": jax.process_count(), "device_count": jax.device_count()}
    meta = ft.checkpoint_meta(cfg, enc_cfg, graph, reference, pretrained,
                              {"best_step": cfg.steps, "data_parallel": spread})

    def lr_at(done: int) -> dict[str, float]:
        return {g: float(v) for g, v in learning_rates(schedules, (done - 1) // accumulation).items()}

    # Every process keeps the history (and evaluates below: same parameters, same numbers), so all
    # return the same result; only process 0 writes TensorBoard events and files.
    monitor = FinetuneMonitor(os.path.join(workdir, "tb") if cfg.tensorboard and primary else None, lr_at,
                              cfg.steps, progress and primary)

    def on_log(done: int, metrics: dict[str, float]) -> None:
        # Metrics are averaged over all processes: every process sees a divergence and stops.
        if not np.isfinite(metrics.get("loss/total", 0.0)):
            raise FloatingPointError(f"fine-tuning diverged at step {done} (total loss {metrics['loss/total']})")
        monitor.train(done, {k: v for k, v in metrics.items() if k != "step"})

    figures: dict[str, Any] = {}
    metrics: dict[str, Any] = {}
    try:
        result = fit(step, state, make_shard, cfg.steps, os.path.join(workdir, "checkpoints"),
                     options.checkpoint_every, meta, 1, on_log, count_edges, progress=False, max_to_keep=1)
        if not result.preempted:
            # The kept checkpoint is the last step's: score it as the single-device run scores its best.
            params = result.state["params"]
            val, score = evaluator.validate(mt.split_params(params)[0], salient=False)
            monitor.validation(result.end_step, val, score)
            metrics = evaluator.test(mt.split_params(params)[0])
            metrics["task_weights"] = ft.task_weight_summary(cfg.weighting, params)
            metrics["best_step"] = result.end_step
    finally:
        monitor.close()
    if primary and not result.preempted:
        write_json(os.path.join(workdir, "metrics.json"), metrics)
        write_json(os.path.join(workdir, "history.json"), monitor.history)
        if cfg.figures:
            figures = {p.stem: p for p in monitor.figures(os.path.join(workdir, "figures"))}
    return DataParallelFinetuneResult(
        params=result.state["params"], history=monitor.history,
        metrics=metrics, best_step=result.end_step, checkpoint_dir=Path(workdir) / "checkpoints",
        runtime_s=time.perf_counter() - start, num_step_compilations=step.compile_count(), config=cfg,
        encoder_config=enc_cfg, figures=figures, preempted=result.preempted, start_step=result.start_step,
        edges_per_second=result.edges_per_second, spread=spread)


@dataclasses.dataclass
class DataParallelFinetuneResult(FinetuneResult):
    """:class:`~jaxfood.train.finetune.FinetuneResult` plus how the data-parallel run went."""

    preempted: bool = False
    start_step: int = 0
    edges_per_second: float = 0.0
    spread: dict = dataclasses.field(default_factory=dict)


def pretrain_job(graph, cfg, workdir: str | os.PathLike, *, options: DataParallelOptions = DataParallelOptions(),
                 progress: bool = True, log=None):
    """``jaxfood pretrain`` on every device of every process: GraphCL with the data-parallel step.

    ``cfg`` is a :class:`~jaxfood.train.pretrain.PretrainConfig`; the run has ``epochs x
    steps_per_epoch`` steps of ``num_shards`` shards, each a pair of views of the full graph or,
    with ``options.sampled``, of its own neighbour-sampled subgraph
    (:class:`~jaxfood.train.pretrain.PretrainSampler`). No early stopping: the checkpoint is the
    last step's. Process 0 writes ``tb/``, ``pretrain_history.json`` (``loss`` per epoch,
    ``val_loss`` of the final parameters), ``pretrain_metrics.json`` and ``figures/`` (read-outs of
    the full graph, as :func:`~jaxfood.train.pretrain.pretrain`); all processes write
    ``checkpoints/`` (kind ``graphcl``), resumable. Returns ``(PretrainResult, FitResult)``; every
    process computes the read-outs (figures only on process 0).
    """
    from jaxfood.config import config_to_dict
    from jaxfood.train import pretrain as pt

    start = time.perf_counter()
    log = log or _noop
    primary = is_primary()
    pt.check_pretrain_config(cfg, graph)
    workdir = Path(workdir)
    pre_graph = pt.prepare_pretrain_graph(graph, cfg.augment, seed=cfg.seed).to_numpy()
    model = pt.make_model(pre_graph, cfg)
    total_steps = cfg.epochs * cfg.steps_per_epoch
    optimizer, schedule = pt.make_optimizer(cfg, total_steps)
    k_init, _, k_val = jax.random.split(jax.random.PRNGKey(cfg.seed), 3)
    initial_params = jax.device_get(jax.jit(model.init)(k_init, pre_graph))
    state = jax.tree_util.tree_map(np.asarray, {"params": initial_params,
                                                "opt_state": jax.jit(optimizer.init)(initial_params)})
    layout = ShardLayout.current(options.per_device, options.local_devices)
    if options.sampled:
        views = pt.PretrainSampler(graph, cfg, SamplerConfig(batch_size=options.batch_size, seed=cfg.seed))
        make_shard = views.batch

        def count_edges(batch):
            return int(sum(np.asarray(m).sum() for m in batch.edge_masks.values()))
    else:
        full_edges = sum(e.num_edges for e in pre_graph.edges.values())

        def make_shard(step, shard):
            return pre_graph

        def count_edges(batch):
            return full_edges * layout.local_shards
    step = data_parallel(pretrain_step_fn(model, optimizer), layout, seed=cfg.seed)
    spread = {"num_shards": layout.num_shards, "per_device": layout.per_device, "sampled": options.sampled,
              "batch_size": options.batch_size if options.sampled else None,
              "process_count": jax.process_count(), "device_count": jax.device_count()}
    meta = {"kind": "graphcl", "encoder_config": config_to_dict(cfg.encoder), "config": config_to_dict(cfg),
            "epoch": cfg.epochs, "data_parallel": spread}
    writer = None
    if primary:
        from tensorboardX import SummaryWriter

        (workdir / "tb").mkdir(parents=True, exist_ok=True)
        writer = SummaryWriter(str(workdir / "tb"))

    def on_log(done: int, metrics: dict[str, float]) -> None:
        if not np.isfinite(metrics.get("loss", 0.0)):
            raise FloatingPointError(f"pretraining diverged at step {done} (loss {metrics['loss']})")
        if writer is not None:
            for name, value in metrics.items():
                if name != "step":
                    writer.add_scalar(f"pretrain/{name}", value, done)
            writer.add_scalar("pretrain/learning_rate", float(schedule(done - 1)), done)
        if done % cfg.steps_per_epoch == 0:
            log(f"epoch {done // cfg.steps_per_epoch}/{cfg.epochs}: loss {metrics.get('loss', float('nan')):.4f}")

    try:
        result = fit(step, state, make_shard, total_steps, workdir / "checkpoints", options.checkpoint_every, meta,
                     1, on_log, count_edges, progress=progress, max_to_keep=1)
    finally:
        if writer is not None:
            writer.flush()
            writer.close()
    losses = np.asarray([h["loss"] for h in result.history], np.float64)
    epochs = -(-losses.size // cfg.steps_per_epoch)
    history = {"loss": [float(losses[e * cfg.steps_per_epoch:(e + 1) * cfg.steps_per_epoch].mean())
                        for e in range(epochs)], "val_loss": []}
    metrics, figures = {}, {}
    if not result.preempted:
        # Every process computes the read-outs (same parameters, same numbers); process 0 writes them.
        eval_fn = jax.jit(pt.make_eval_fn(model, jax.random.split(k_val, cfg.val_views)))
        val, _ = jax.device_get(eval_fn(result.state["params"], pre_graph))
        history["val_loss"] = [float(val["loss"])]
        metrics, figures = pt.write_readouts(eval_fn, graph, pre_graph, cfg, workdir, result.state["params"],
                                             initial_params, history, write=primary)
    pre = pt.PretrainResult(encoder_config=cfg.encoder, params=result.state["params"], history=history,
                            metrics=metrics, best_epoch=epochs, checkpoint_dir=workdir / "checkpoints",
                            num_step_compilations=step.compile_count(), runtime_s=time.perf_counter() - start,
                            figures=figures)
    return pre, dataclasses.replace(result, state=None)


class Preempted(Exception):
    """A data-parallel run stopped by preemption (SIGTERM) after ``step`` steps; rerunning resumes it."""

    def __init__(self, step: int, checkpoint_dir):
        super().__init__(f"preempted at step {step}: checkpoint in {checkpoint_dir}; rerun the same command to resume")
        self.step, self.checkpoint_dir = int(step), checkpoint_dir


def pretrain_on_devices(graph, cfg, workdir, *, options: DataParallelOptions | None = None, progress: bool = True,
                        log=None):
    """:func:`jaxfood.train.pretrain.pretrain`, or :func:`pretrain_job` when ``options.wanted()``
    (several processes or devices, or asked for); returns its ``PretrainResult`` either way.
    Raises :class:`Preempted` when a data-parallel run was stopped (for ``run_mtl.py``)."""
    from jaxfood.train.pretrain import pretrain

    if options is None or not options.wanted():
        return pretrain(graph, cfg, workdir, progress=progress, log=log)
    result, fitted = pretrain_job(graph, cfg, workdir, options=options, progress=progress and is_primary(),
                                  log=log if is_primary() else None)
    if fitted.preempted:
        raise Preempted(fitted.end_step, result.checkpoint_dir)
    return result


def finetune_on_devices(graph, cfg, workdir, *, options: DataParallelOptions | None = None, pretrained=None,
                        evaluation, progress: bool = True, log=None):
    """:func:`jaxfood.train.finetune.finetune`, or :func:`finetune_job` when ``options.wanted()``;
    returns a ``FinetuneResult`` either way (the same on every process). Raises :class:`Preempted`."""
    from jaxfood.train.finetune import finetune

    if options is None or not options.wanted():
        return finetune(graph, cfg, workdir, pretrained=pretrained, evaluation=evaluation, progress=progress, log=log)
    result = finetune_job(graph, cfg, workdir, options=options, pretrained=pretrained, evaluation=evaluation,
                          progress=progress and is_primary(), log=log if is_primary() else None)
    if result.preempted:
        raise Preempted(result.best_step, result.checkpoint_dir)
    return result
