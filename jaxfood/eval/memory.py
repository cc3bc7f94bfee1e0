"""Whether the evaluation of a whole graph fits in memory, checked before a run trains.

Validation and the test evaluation run the model on the whole graph, also when training runs on
sampled subgraphs. On a graph of tens of millions of edges the gradient scorers (a backward pass
through every edge: ``input_gradient``, which is the headline ``intensity_attribution`` without
the wide path, and ``gradient``) need several times a forward pass: 30.7 GB of temporaries on the
``large`` preset's 30 M edges, against 4.3 GB to predict and 10.3 GB for fidelity.
:func:`fit_scorers` measures each evaluation program (compiled ahead of time, not run) against
the memory left, and keeps the scorers that fit; what every evaluation needs (the forward pass,
fidelity) must fit, or the run stops before it trains (:class:`EvaluationMemoryError`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxfood.errors import UserError
from jaxfood.eval import molecules as mol
from jaxfood.graph import schema
from jaxfood.graph.hetero_graph import HeteroGraph

#: Graphs with more edges than this (every relation, reverses included) have their evaluation
#: programs measured before a run; smaller ones cannot come near a machine's memory (the embedded
#: default graph has 0.2 M edges).
CHECK_ABOVE_EDGES = 2_000_000
#: Share of the available memory one evaluation program may take: the run's own state (parameters,
#: optimizer, the graph on the device) is allocated after the measurement, and in one process the
#: scorers besides the headline one compile and run once in a thread while the model trains.
HEADROOM = 0.75
#: Headline scorers to fall back on, in this order, when the configured one does not fit.
FALLBACK = ("intensity_attribution", "input_gradient", "class_attention", "gat_attention", "attention", "gradient")


class EvaluationMemoryError(UserError):
    """The whole-graph evaluation cannot fit in this machine's memory (exit status 2)."""


def available_bytes() -> int:
    """Memory a program can still allocate: the accelerator's free memory, or on the CPU the
    host's available memory (``MemAvailable``); the smallest over the processes of a job."""
    device = jax.local_devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    if stats and "bytes_limit" in stats:
        free = int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    else:
        try:
            with open("/proc/meminfo") as f:
                free = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
        except (OSError, StopIteration, ValueError):  # not Linux: free pages
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if jax.process_count() > 1:  # one decision for every process (they must run the same programs)
        from jax.experimental import multihost_utils
        # In MiB: the gather goes through a device, where integers are 32-bit (x64 is off).
        mib = np.asarray(min(free >> 20, np.iinfo(np.int32).max), np.int32)
        free = int(np.min(multihost_utils.process_allgather(mib))) << 20
    return int(free)


def program_bytes(fn, *args) -> int:
    """Temporaries + outputs of ``jax.jit(fn)(*args)``, compiled ahead of time (not run)."""
    analysis = jax.jit(fn).lower(*args).compile().memory_analysis()
    return int(analysis.temp_size_in_bytes + analysis.output_size_in_bytes)


def fit_scorers(model, params, graph: HeteroGraph, scorer: str, scorers: Sequence[str], salient_k: int,
                available: int | None = None) -> tuple[str, tuple[str, ...], dict[str, int]]:
    """``(headline scorer, scorers, bytes per program)`` that the whole-graph evaluation of
    ``graph`` (a :func:`~jaxfood.graph.splits.prepare_graph` output) can run in ``available`` bytes
    (default :func:`available_bytes`; :data:`HEADROOM` of it per program): the configured ones
    where they fit, else the first that fits of :data:`FALLBACK` as headline and the scorers that
    fit (the fallbacks are measured only when the headline does not fit). Graphs of at most
    :data:`CHECK_ABOVE_EDGES` edges are returned unchanged without measuring. Raises
    :class:`EvaluationMemoryError` when the forward pass or fidelity does not fit."""
    if sum(e.num_edges for e in graph.edges.values()) <= CHECK_ABOVE_EDGES:
        return scorer, tuple(scorers), {}
    available = int(HEADROOM * (available_bytes() if available is None else int(available)))
    gb = 1024 ** 3
    needs: dict[str, int] = {}

    def require(name, fn, *args):
        needs[name] = program_bytes(fn, *args)
        if needs[name] > available:
            raise EvaluationMemoryError(f"graph: evaluating the whole graph ({name}) needs {needs[name] / gb:.1f} GiB, "
                                        f"{available / gb:.1f} GiB usable: run on a machine with more memory")

    params = model.own_params(params)
    require("predict", lambda p, g: model.apply(p, g), params, graph)
    num_edges = graph.edges[schema.CONTAINS].num_edges
    scores = jax.ShapeDtypeStruct((num_edges,), jnp.float32)
    mask = jax.ShapeDtypeStruct((graph.num_nodes[schema.SAMPLE],), jnp.bool_)
    require("fidelity", lambda p, g, s, m: mol.fidelity_probabilities(model, p, g, s, salient_k, m),
            params, graph, scores, mask)

    def measure(name):
        if name not in needs:
            needs[name] = program_bytes(lambda p, g: mol.score_molecules(name, model, p, g), params, graph)
        return needs[name]

    fits = [name for name in dict.fromkeys([scorer, *scorers]) if measure(name) <= available]
    headline = scorer if scorer in fits else next((n for n in FALLBACK if measure(n) <= available), None)
    if headline is None:
        raise EvaluationMemoryError(f"graph: no molecule scorer fits the {available / gb:.1f} GiB usable "
                                    f"(the smallest needs {min(needs[n] for n in FALLBACK) / gb:.1f} GiB)")
    # The scorers besides the headline one run as one program (they share the forward pass).
    others = [n for n in dict.fromkeys(scorers) if n in fits and n != headline]
    while others:
        key = "scores " + ",".join(others)
        needs[key] = program_bytes(lambda p, g, ns=tuple(others): {n: mol.score_molecules(n, model, p, g) for n in ns},
                                   params, graph)
        if needs[key] <= available:
            break
        others.remove(max(others, key=needs.get))
    return headline, tuple(n for n in scorers if n == headline or n in others), needs
