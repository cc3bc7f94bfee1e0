"""THE training loop: one loop for GraphCL pretraining and multi-task fine-tuning, on 1..N
devices of 1..N processes, on the full graph or on sampled subgraphs.

:func:`train_loop` runs a :class:`~jaxfood.train.data_parallel.ParallelStep` (``step(state,
batch, rng) -> (state, metrics)`` under ``pmap(vmap)``; one device is a mesh of size 1) for
``num_steps`` steps and owns what every run needs:

* evaluation: every ``eval_every`` steps (and after the last) an ``evaluate(state, step) ->
  (score, row)`` hook passed in by the caller (training never imports evaluation) scores the
  state (with ``eval_initial`` also the state before the first step, step 0: a model that starts
  at a fitted baseline is kept when no step beats it; a ``compose`` hook then gives that kept start
  what it takes from the best-scoring trained state, e.g. its encoder); the best score's state is
  kept in ``checkpoint_dir``; ``patience`` evaluations without improvement stop the run early. Without a
  hook the last step's state is kept.
* resume: every ``checkpoint_every`` steps and when preempted (SIGTERM, see
  :mod:`jaxfood.train.preemption`) the training state, the history and the early-stopping
  bookkeeping go to ``resume_dir``; rerun, the loop continues from there and ends where an
  uninterrupted run would (batches and keys depend on ``(seed, step, shard)`` only). A completed
  run removes ``resume_dir``: the next run in the workdir starts afresh.
* history: ``{"train": [row per logged step], "val": [row per evaluation]}`` (rows carry ``step``).

Every process of a multi-host job calls it with the same arguments; metrics and scores are
averaged over processes, so all processes take the same decisions and save the same steps.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
from tqdm.auto import tqdm

from jaxfood.compile_cache import Background
from jaxfood.train.checkpoint import Checkpointer, checkpoint_path, latest_step
from jaxfood.train.data_parallel import ParallelStep, local_batch, put_local_batch, replicate, unreplicate
from jaxfood.train.preemption import PreemptionGuard
from jaxfood.train.processes import aggregate_metrics, barrier, host_sum, is_primary

PyTree = Any
#: ``(host state, step) -> (score, row)``: higher scores are better; ``row`` (flat numbers) goes to the history.
EvaluateFn = Callable[[PyTree, int], tuple[float, dict[str, float]]]
#: ``(start host state, trained host state) -> (host state, meta)``: the kept start with parts of a
#: trained state, and what to add to the kept checkpoint's meta about them (e.g. which parts).
ComposeFn = Callable[[PyTree, PyTree], tuple[PyTree, Mapping[str, Any]]]


@dataclasses.dataclass(frozen=True)
class LoopConfig:
    """Settings of one run of :func:`train_loop` (steps count calls of the step)."""

    num_steps: int
    checkpoint_dir: str | os.PathLike | None = None  # the kept state: best evaluation, or the last step
    resume_dir: str | os.PathLike | None = None      # training-state snapshots (None: no resume)
    checkpoint_every: int = 0                        # resume snapshot every N steps (0: only when preempted)
    eval_every: int = 0                              # evaluate every N steps and after the last (with a hook)
    patience: int = 0                                # evaluations without improvement before stopping (0: never)
    log_every: int = 1                               # fetch and log metrics every N steps
    eval_initial: bool = False                       # also evaluate (and possibly keep) the state before step 1


@dataclasses.dataclass
class LoopResult:
    """How a run went. ``state``: host state after ``end_step`` steps (not necessarily the kept one)."""

    state: PyTree
    history: dict[str, list[dict[str, float]]]
    start_step: int
    end_step: int
    best_step: int
    best_score: float | None
    preempted: bool
    stopped_early: bool
    edges_per_second: float = 0.0
    seconds: float = 0.0
    #: With ``compose``: the trained step whose parts the kept start took (None: none taken).
    composed_step: int | None = None


def prepare_run(loop: LoopConfig, stale: Sequence[str | os.PathLike] = ()) -> int:
    """The step a run in ``loop``'s directories resumes from (0: a fresh run). A fresh run removes
    the kept checkpoint and the ``stale`` directories (e.g. TensorBoard events) of an earlier run
    there: they would clash with (or, at a later step, win over) this run's. Collective."""
    resume_from = latest_step(loop.resume_dir) if loop.resume_dir is not None else None
    if resume_from is None:
        if is_primary():
            for directory in ([loop.checkpoint_dir] if loop.checkpoint_dir is not None else []) + list(stale):
                _remove_local(directory)
        barrier("jaxfood-prepare-run")
    return int(resume_from or 0)


def _remove_local(directory) -> None:
    if "://" in os.fspath(directory):
        return  # remote storage: orbax replaces steps itself (force=True)
    if Path(directory).is_dir():
        shutil.rmtree(directory)


def train_loop(step: ParallelStep, init_state: PyTree, make_shard: Callable[[int, int], PyTree], loop: LoopConfig,
               *, fixed_batch: bool = False, evaluate: EvaluateFn | None = None,
               meta: Mapping[str, Any] | None = None,
               on_train: Callable[[int, dict[str, float]], dict[str, float] | None] | None = None,
               count_edges: Callable[[PyTree], int] | None = None, progress: bool = False,
               log: Callable[[str], None] | None = None, compose: ComposeFn | None = None) -> LoopResult:
    """Trains ``loop.num_steps`` steps (see the module docstring).

    Args:
      step: from :func:`~jaxfood.train.data_parallel.data_parallel`.
      init_state: host pytree (params, optimizer state, ...); also the restore target.
      make_shard: ``(step, shard) -> batch`` of one shard, deterministic (e.g. ``NeighbourSampler.batch``).
      fixed_batch: ``make_shard`` gives the same batch at every step (the full graph): it is built
        and moved to the devices once.
      evaluate: the evaluation hook (see :data:`EvaluateFn`); None: keep the last step.
      meta: JSON stored with every checkpoint (``kind``, configs, id maps); the loop adds ``step``,
        ``best_step``, ``selection_score`` and ``validation`` (the kept state's evaluation row).
      on_train: ``(step, metrics averaged over shards and processes) -> row`` every ``log_every``
        steps (logging; may raise to stop a diverged run); the row it returns (default: the
        metrics) goes to the history.
      count_edges: real edges of one local batch (throughput); default: none counted.
      compose: with ``loop.eval_initial``: while the start (step 0) is the kept state, each trained
        state that scores best among the trained ones is composed into it, ``compose(init_state,
        trained)``, and saved as the kept state (as checkpoint step ``done``, meta ``best_step`` 0,
        ``composed_step`` ``done`` and the meta ``compose`` returns; its ``validation`` row stays the start's).
    """
    layout, meta = step.layout, dict(meta or {})
    log = log or (lambda _msg: None)
    history: dict[str, list[dict[str, float]]] = {"train": [], "val": []}
    start, best_step, best_score, stale = 0, 0, None, 0
    composed_step, composed_score, kept_row = None, None, {}
    resume = Checkpointer(loop.resume_dir, max_to_keep=1) if loop.resume_dir is not None else None
    kept = Checkpointer(loop.checkpoint_dir, max_to_keep=1) if loop.checkpoint_dir is not None else None
    state_host = init_state
    try:
        if resume is not None and resume.latest_step() is not None:
            state_host, saved = resume.restore(target=init_state)
            start = int(saved["step"])
            history = {k: list(v) for k, v in saved["history"].items()}
            best_step, best_score, stale = int(saved["best_step"]), saved["best_score"], int(saved["stale"])
            composed_step, composed_score = saved.get("composed_step"), saved.get("composed_score")
            kept_row = dict(saved.get("kept_validation") or {})
            log(f"resumed from step {start}")
        state = replicate(state_host, layout.local_devices)
        fixed = put_local_batch(local_batch(make_shard, 0, layout), layout) if fixed_batch else None
        done, preempted, stopped_early, edges, t0 = start, False, False, 0.0, None
        bar = tqdm(total=loop.num_steps, initial=start, desc="train", unit="step", dynamic_ncols=True,
                   disable=not (progress and is_primary()), leave=False)

        def consider(host, done: int) -> bool:
            """Evaluates ``host`` after ``done`` steps, keeps it if best; True when patience runs out."""
            nonlocal best_step, best_score, stale, composed_step, composed_score, kept_row
            score, row = evaluate(host, done)
            # The mean over processes: every process takes the same decision below.
            score = aggregate_metrics({"score": score})["score"]
            history["val"].append(dict(row, selection_score=score, step=done))
            if best_score is None or score > best_score:
                best_step, best_score, stale = done, score, 0
                composed_step, composed_score = None, None
                kept_row = {k: _finite(v) for k, v in row.items()}
                if kept is not None:
                    kept.save(done, host, dict(meta, best_step=done, selection_score=_finite(score),
                                               validation=kept_row))
                return False
            if (compose is not None and best_step == 0 and done > 0
                    and (composed_score is None or score > composed_score)):
                composed_step, composed_score = done, score
                if kept is not None:
                    composed, composed_meta = compose(init_state, host)
                    kept.save(done, composed, dict(meta, **composed_meta, best_step=0, selection_score=_finite(best_score),
                                                   validation=kept_row, composed_step=done))
            stale += 1
            return bool(loop.patience and stale >= loop.patience)

        first = None
        if evaluate is not None and loop.eval_initial and start == 0:
            if loop.num_steps > 0 and jax.process_count() == 1:
                # The first step (tracing and compiling the step, most of it) runs in a thread beside
                # the start's evaluation (compiling the evaluation programs): XLA compiles without
                # the GIL, so the two compilations share the cores. One process only: a pod's
                # collectives must run in the same order on every process.
                batch = fixed if fixed is not None else local_batch(make_shard, start, layout)
                first = Background(step, state, batch, start, name="jaxfood-first-step")
            try:
                consider(state_host, 0)
            finally:
                if first is not None:
                    first.join()
        with PreemptionGuard() as guard:
            for i in range(start, loop.num_steps):
                if first is not None:  # step ``start``, run on its batch beside the start's evaluation
                    (state, metrics), first = first.result(), None
                else:
                    batch = fixed if fixed is not None else local_batch(make_shard, i, layout)
                    if count_edges is not None and t0 is not None:
                        edges += count_edges(batch)
                    state, metrics = step(state, batch, i)
                if t0 is None:  # the first step compiles: throughput counts from the second
                    jax.block_until_ready(state)
                    t0 = time.perf_counter()
                done = i + 1
                bar.update(1)
                if done % loop.log_every == 0 or done == loop.num_steps:
                    logged = aggregate_metrics(metrics)
                    row = (on_train(done, logged) if on_train is not None else None) or logged
                    history["train"].append(dict(row, step=done))
                    bar.set_postfix({k: f"{v:.3g}" for k, v in list(logged.items())[:3]}, refresh=False)
                last = done == loop.num_steps
                if evaluate is not None and (last or (loop.eval_every and done % loop.eval_every == 0)):
                    if consider(unreplicate(state), done) and not last:
                        log(f"early stop at step {done}: no improvement for {loop.patience} evaluations")
                        stopped_early = True
                elif evaluate is None and last:
                    best_step = done
                    if kept is not None:
                        kept.save(done, unreplicate(state), dict(meta, best_step=done))
                stop = guard.should_stop(done) and not last
                if resume is not None and (stop or (loop.checkpoint_every and done % loop.checkpoint_every == 0
                                                    and not last)):
                    resume.save(done, unreplicate(state), dict(meta, history=history, best_step=best_step,
                                                               best_score=best_score, stale=stale,
                                                               composed_step=composed_step,
                                                               composed_score=composed_score,
                                                               kept_validation=kept_row))
                if stop:
                    preempted = True
                    break
                if stopped_early:
                    break
        bar.close()
        jax.block_until_ready(state)
        seconds = time.perf_counter() - t0 if t0 is not None else 0.0
        total_edges = host_sum(edges)
    finally:
        for ckpt in (resume, kept):
            if ckpt is not None:
                ckpt.close()
    if not preempted and loop.resume_dir is not None:
        barrier("jaxfood-run-complete")  # every process has finished saving before the snapshots go
        if is_primary():
            _remove_local(checkpoint_path(loop.resume_dir))
    return LoopResult(state=unreplicate(state), history=history, start_step=start, end_step=done,
                      best_step=best_step, best_score=best_score, preempted=preempted, stopped_early=stopped_early,
                      edges_per_second=total_edges / seconds if seconds > 0 else 0.0, seconds=seconds,
                      composed_step=composed_step)


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None
