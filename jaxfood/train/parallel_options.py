"""Command-line options of multi-host, data-parallel training, without importing JAX.

``jaxfood`` builds every command's parser on each call, so the options live here, apart from
:mod:`jaxfood.train.processes` and the loop: ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import os

from jaxfood.errors import ConfigError


def add_distributed_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Adds ``--coordinator HOST:PORT --num-processes N --process-id I`` (multi-host jobs).

    Defaults come from ``JAXFOOD_COORDINATOR``, ``JAXFOOD_NUM_PROCESSES`` and
    ``JAXFOOD_PROCESS_ID``; with none of them a job runs as one process (or, on a TPU pod slice,
    discovers its peers itself). Pass the parsed args to :func:`jaxfood.train.processes.init_from_args`.
    """
    group = parser.add_argument_group(
        "multi-host", "Run one process per host; all processes get the same coordinator address. "
                      "On a TPU pod slice leave these out: the processes find each other.")
    group.add_argument("--coordinator", metavar="HOST:PORT", default=os.environ.get("JAXFOOD_COORDINATOR"),
                       help="address of process 0's coordination service")
    group.add_argument("--num-processes", metavar="N", type=int,
                       default=_env_int("JAXFOOD_NUM_PROCESSES"), help="number of processes in the job")
    group.add_argument("--process-id", metavar="I", type=int, default=_env_int("JAXFOOD_PROCESS_ID"),
                       help="index of this process, 0 .. N-1 (0 writes logs and reports)")
    return parser


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value in (None, ""):
        return None
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name} = {value!r}: expected an integer") from None


@dataclasses.dataclass(frozen=True)
class DataParallelOptions:
    """How ``jaxfood finetune`` / ``jaxfood pretrain`` / ``run_mtl.py`` / ``pod/train.py`` spread a
    run over devices and hosts (every run takes the same loop; one device is the smallest mesh).

    Command-line options, not configuration keys: they change how the work is split, not the model.
    ``sampled``: every shard trains on a neighbour-sampled subgraph of ``batch_size`` seed samples
    (False: every shard holds the full graph, with its own random stream). ``per_device``: shards
    per device per step. ``checkpoint_every``: also snapshot the training state every N steps for
    resuming (0: only when preempted). ``local_devices``: use only the first N local devices
    (default all; one process only).
    """

    sampled: bool = False
    batch_size: int = 32
    per_device: int = 1
    checkpoint_every: int = 0
    local_devices: int | None = None


def add_data_parallel_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """:func:`add_distributed_arguments` plus ``--data-parallel --sampled --batch-size --per-device
    --checkpoint-every``; read them back with :func:`options_from_args` after :func:`init_from_args`."""
    add_distributed_arguments(parser)
    group = parser.add_argument_group(
        "data parallel", "Every run uses all local devices (GPUs, TPU cores) of every process: one shard per "
                         "device per step, the full graph unless --sampled.")
    group.add_argument("--data-parallel", action="store_true",
                       help="accepted for compatibility: every run takes the same data-parallel loop "
                            "(on one device, a mesh of one)")
    group.add_argument("--sampled", action="store_true",
                       help="train on neighbour-sampled subgraphs (one per device per step) instead of "
                            "full-graph replicas: graphs that do not fit one device")
    group.add_argument("--batch-size", metavar="N", type=int, default=32,
                       help="seed samples per sampled subgraph (with --sampled)")
    group.add_argument("--per-device", metavar="K", type=int, default=1, help="subgraphs per device per step")
    group.add_argument("--checkpoint-every", metavar="N", type=int, default=0,
                       help="checkpoint every N steps as well (rerunning with the same workdir resumes)")
    return parser


def options_from_args(args: argparse.Namespace) -> DataParallelOptions:
    """The :class:`DataParallelOptions` of parsed :func:`add_data_parallel_arguments` options."""
    for name in ("batch_size", "per_device"):
        if getattr(args, name, 1) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(args, name)}: expected a positive integer")
    if getattr(args, "checkpoint_every", 0) < 0:
        raise ConfigError(f"--checkpoint-every {args.checkpoint_every}: expected a non-negative integer")
    return DataParallelOptions(sampled=bool(getattr(args, "sampled", False)), batch_size=getattr(args, "batch_size", 32),
                               per_device=getattr(args, "per_device", 1),
                               checkpoint_every=getattr(args, "checkpoint_every", 0))
