"""Preemption: when a job is told to stop (SIGTERM), every process checkpoints the same step and exits."""

from __future__ import annotations

import signal
import threading

import jax
from jax.experimental import multihost_utils

#: Exit status of a run stopped by preemption (SIGTERM); rerunning the same command resumes it.
PREEMPTED_EXIT = 143


class Preempted(Exception):
    """A run stopped by preemption after ``step`` steps; rerunning the same command resumes it."""

    def __init__(self, step: int, checkpoint_dir):
        super().__init__(f"preempted: step {step} checkpointed in {checkpoint_dir}; rerun the same command to resume")
        self.step, self.checkpoint_dir = int(step), checkpoint_dir


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

    def should_stop(self, step: int) -> bool:
        if self._multi:
            return bool(multihost_utils.reached_preemption_sync_point(int(step))) or self._flag.is_set()
        return self._flag.is_set()
