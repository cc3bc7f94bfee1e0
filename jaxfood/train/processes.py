"""The processes of a (possibly multi-host) job: joining it, who writes, host-side collectives.

:func:`initialize_distributed` wraps ``jax.distributed.initialize`` (automatic on TPU pods;
``--coordinator HOST:PORT --num-processes N --process-id I`` elsewhere, see
:func:`jaxfood.train.parallel_options.add_distributed_arguments`). Only the primary process
(:func:`is_primary`) writes logs and reports; every process takes part in checkpoint saves.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxfood.errors import ConfigError


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
    """:func:`initialize_distributed` from the options of ``add_distributed_arguments``."""
    return initialize_distributed(getattr(args, "coordinator", None), getattr(args, "num_processes", None),
                                  getattr(args, "process_id", None))


def distributed_info() -> DistributedInfo:
    return DistributedInfo(jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())


def is_primary() -> bool:
    """Whether this process writes logs, reports and TensorBoard events (process 0)."""
    return jax.process_index() == 0


def aggregate_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Mean of each metric over its entries (local shards) and all processes: every process gets
    the same values. Collective when there are several processes: all must call it at the same step."""
    names = sorted(metrics)
    local = [np.asarray(jax.device_get(metrics[k]), np.float64) for k in names]
    totals = np.array([[v.sum(), v.size] for v in local], np.float64).reshape(-1, 2)
    if jax.process_count() > 1:
        totals = np.asarray(multihost_utils.process_allgather(totals)).reshape(-1, len(names), 2).sum(0)
    return {k: float(s / max(c, 1)) for k, (s, c) in zip(names, totals)}


def host_sum(value: float) -> float:
    """Sum of a host-side number (e.g. edges processed) over all processes."""
    if jax.process_count() == 1:
        return float(value)
    return float(np.asarray(multihost_utils.process_allgather(np.asarray([value], np.float64))).sum())


def barrier(name: str) -> None:
    """Waits until every process reaches the barrier ``name`` (nothing to wait for with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
