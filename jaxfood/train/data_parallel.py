"""One training step on 1..N devices of 1..N processes: shard layout, replication, the ``pmap``.

Layout. Every step trains on ``num_shards = process_count x local_devices x per_device`` batches
(sampled subgraphs, or full-graph replicas with different random streams). Shard ``i`` is a
global index; process ``p`` owns shards ``[p * L, (p + 1) * L)`` with ``L = local_devices x
per_device``. What a shard contains and its random key are functions of ``(seed, step, shard)``
only, so the same ``num_shards`` gives the same training whichever way the shards are spread over
devices and hosts, and a resumed run continues exactly as an uninterrupted one. (With ``rbg`` keys,
fine-tuning's default, the same holds for the same ``per_device``: random numbers drawn under
``vmap`` from a stack of rbg keys differ from those drawn key by key, so 4 shards on one device
draw other dropout masks than 4 shards on 4 devices. ``threefry2x32`` keys draw the same either way.)

Step. A step function ``step(state, batch, rng) -> (state, metrics)`` averages its gradients (and
whatever statistics must agree, e.g. task-weighting norms) with ``jax.lax.pmean(x, layout.axes)``.
:func:`data_parallel` runs it as ``pmap(vmap(step))`` over ``[local_devices, per_device]``
batches: ``pmap`` spans every device of every process (synchronous data parallelism, all-reduce
of gradients), ``vmap`` stacks several batches on one device. With one batch per device there is
no ``vmap`` (it would only add a size-1 axis to every operation: the step traces 60 % slower), and
``layout.axes`` names the devices alone. One device, one shard is the single-device run: the same
program.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from jaxfood.compile_cache import shared_program
from jaxfood.errors import ConfigError

#: Axis names of the data-parallel step: devices of all processes (pmap), batches per device (vmap).
DEVICE_AXIS = "devices"
SUBGRAPH_AXIS = "subgraphs"
DATA_AXES: tuple[str, str] = (DEVICE_AXIS, SUBGRAPH_AXIS)

PyTree = Any
StepFn = Callable[[PyTree, PyTree, jax.Array], tuple[PyTree, PyTree]]


@dataclasses.dataclass(frozen=True)
class ShardLayout:
    """How the ``num_shards`` batches of a step are spread: processes x local devices x per device."""

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
    def axes(self) -> str | tuple[str, str]:
        """The axis names a step run by :func:`data_parallel` averages over: :data:`DATA_AXES`, or
        :data:`DEVICE_AXIS` alone with one shard per device (no per-device axis then)."""
        return DATA_AXES if self.per_device > 1 else DEVICE_AXIS

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

    def describe(self) -> dict[str, int]:
        """What a checkpoint and the logs record of the spread."""
        return {"num_shards": self.num_shards, "per_device": self.per_device,
                "process_count": self.process_count, "device_count": self.process_count * self.local_devices}


def local_batch(make_shard: Callable[[int, int], PyTree], step: int, layout: ShardLayout) -> PyTree:
    """``[local_devices, per_device, ...]`` numpy stack of ``make_shard(step, shard)`` for this process's shards."""
    ids = layout.shard_ids()
    shards = [make_shard(int(step), int(i)) for i in ids.reshape(-1)]
    stacked = jax.tree_util.tree_map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *shards)
    return jax.tree_util.tree_map(lambda x: x.reshape(ids.shape + x.shape[1:]), stacked)


def replicate(tree: PyTree, local_devices: int | None = None) -> PyTree:
    """One copy of ``tree`` per local device (leading axis), the state layout of :func:`data_parallel`."""
    n = jax.local_device_count() if local_devices is None else int(local_devices)
    devices = jax.local_devices()[:n]
    return jax.tree_util.tree_map(lambda x: _put_per_device(np.broadcast_to(np.asarray(x), (n,) + np.shape(x)),
                                                            devices), tree)


def put_local_batch(batch: PyTree, layout: ShardLayout) -> PyTree:
    """A ``[local_devices, per_device, ...]`` batch moved to the devices once (a batch that does not
    change between steps, e.g. the full graph: no host-to-device copy per step)."""
    devices = jax.local_devices()[: layout.local_devices]
    return jax.tree_util.tree_map(lambda x: _put_per_device(np.asarray(x), devices), batch)


def _put_per_device(x: np.ndarray, devices: Sequence) -> jax.Array:
    mesh = jax.sharding.Mesh(np.asarray(devices), (DEVICE_AXIS,))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(DEVICE_AXIS))
    return jax.device_put(x, sharding)


def unreplicate(tree: PyTree) -> PyTree:
    """Host (numpy) copy of the first local replica of a replicated tree."""
    def first(x):
        if isinstance(x, jax.Array):
            data = x.addressable_shards[0].data
            if data.size * x.shape[0] == x.size:  # one replica a device: copy the first, no indexing program
                return np.asarray(data).reshape(x.shape[1:])
        return np.asarray(x[0])

    return jax.tree_util.tree_map(first, tree)


def shard_rng(seed: int, step, shard, impl: str | None = None) -> jax.Array:
    """The random key of one shard at one step: ``fold_in(fold_in(key(seed), step), shard)`` (typed key)."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed, impl=impl), step), shard)


@dataclasses.dataclass
class ParallelStep:
    """A compiled ``pmap(vmap(step))``; call with replicated state, a local batch and the step number."""

    fn: Callable
    layout: ShardLayout
    seed: int
    traces: list = dataclasses.field(default_factory=list)
    #: Traces of the (possibly shared) program before this step was made.
    earlier_traces: int = 0

    def __call__(self, state: PyTree, batch: PyTree, step: int) -> tuple[PyTree, PyTree]:
        shard_ids = self.layout.shard_ids()
        steps = np.full(shard_ids.shape, int(step), np.int32)
        seeds = np.full(shard_ids.shape, int(self.seed), np.int32)
        return self.fn(state, batch, steps, shard_ids, seeds)

    def compile_count(self) -> int:
        """How many times this step has been traced and compiled: 1 for a run with static shapes, 0
        where an earlier run of this process compiled the same program (``data_parallel(share=...)``)."""
        return len(self.traces) - self.earlier_traces


def data_parallel(step_fn: StepFn, layout: ShardLayout | None = None, seed: int = 0,
                  donate_state: bool = False, prng_impl: str | None = None, share: Any = None) -> ParallelStep:
    """Runs ``step_fn(state, batch, rng) -> (state, metrics)`` on every shard of a step at once.

    ``step_fn`` must average gradients (and any statistics that drive the update) with
    ``jax.lax.pmean(..., layout.axes)``, so its new ``state`` is the same for every shard; metrics it
    leaves per shard come back as ``[local_devices, per_device, ...]``. ``rng`` is
    :func:`shard_rng` ``(seed, step, shard)`` of PRNG implementation ``prng_impl``; the seed is an
    argument of the program, not a constant in it.

    ``share``: what ``step_fn`` is a function of (model, configs, ...). Runs with equal ``share``
    (:func:`jaxfood.compile_cache.shared_program`) use one compiled program in this process.

    Returns a :class:`ParallelStep`: ``(state [D, ...], batch [D, K, ...], step) -> (state [D, ...],
    metrics [D, K, ...])`` with ``D`` local devices and ``K = layout.per_device``.
    """
    layout = layout or ShardLayout.current()
    # pmap over all devices of all processes (devices=None): collectives are then global. Naming
    # devices restricts the collectives to them, which only one process may do (fewer local devices).
    devices = None
    if layout.local_devices != jax.local_device_count():
        if jax.process_count() > 1:
            raise ConfigError(f"local_devices = {layout.local_devices}: a multi-process job uses every local "
                              f"device ({jax.local_device_count()})")
        devices = jax.local_devices()[: layout.local_devices]

    def build() -> tuple[Callable, list]:
        traces: list = []

        def per_device(state, batch, steps, shard_ids, seeds):
            traces.append(1)  # runs once per trace (compilation), never per step

            def one(batch_k, step_k, shard_k, seed_k):
                return step_fn(state, batch_k, shard_rng(seed_k, step_k, shard_k, prng_impl))

            if layout.per_device == 1:
                new_state, metrics = one(*jax.tree_util.tree_map(lambda x: x[0], (batch, steps, shard_ids, seeds)))
                return new_state, jax.tree_util.tree_map(lambda x: x[None], metrics)
            return jax.vmap(one, axis_name=SUBGRAPH_AXIS, out_axes=(None, 0))(batch, steps, shard_ids, seeds)

        return jax.pmap(per_device, axis_name=DEVICE_AXIS, devices=devices,
                        donate_argnums=(0,) if donate_state else ()), traces

    if share is None:
        fn, traces = build()
    else:
        fn, traces = shared_program("data_parallel_step", (share, prng_impl, donate_state, layout.local_devices,
                                                           layout.per_device == 1, jax.local_device_count()), build)
    return ParallelStep(fn=fn, layout=layout, seed=seed, traces=traces, earlier_traces=len(traces))
