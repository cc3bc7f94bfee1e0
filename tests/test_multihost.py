"""Two processes on 127.0.0.1 (jax.distributed + gloo CPU collectives), 2 devices each, run the
fine-tuning workflow (experiments/pod/train.py, `jaxfood finetune`) to the end: they agree on the
parameters, train them as one process does, only process 0 writes logs and metrics, and the
checkpoint serves evaluate/predict/embed.

The one-process run they are compared with (:func:`pod_reference`) is also the uninterrupted run
test_resume compares its interrupted runs with: it runs once per test session."""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import forced_devices, make_toy_graph, once_per_session

from jaxfood import cli
from jaxfood.graph.hetero_graph import save_graph
from jaxfood.train.checkpoint import restore_checkpoint

ROOT = Path(__file__).resolve().parents[1]

# A tiny model (FinetuneConfig keys): what is tested is the job, not the model. Sample inputs are
# inductive (shared) so that `jaxfood predict` can use the checkpoint.
TINY_CONFIG = """
encoder: {hidden_dim: 8, num_heads: 2, num_layers: 1, embedding_dim: 8, dropout: 0.1,
          input_modes: {Sample: shared, Molecule: both, Food: both}}
heads: {hidden_dim: 8, pool_dim: 8, attention_dim: 4, projection_dim: 4}
loss: {salient_top_k: 3}
steps: 8
scorers: [intensity_attribution]
salient_k: 3
stability_perturbations: 0
figures: false
"""
STEPS = 8
#: Pod options of the tiny job: 4 seed samples per subgraph, a resume snapshot every step.
BATCH_OPTIONS = ["--batch-size", "4"]
TINY_OPTIONS = [*BATCH_OPTIONS, "--checkpoint-every", "1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_env(tmp_path: Path, devices: int) -> dict:
    """Environment of a CPU job with ``devices`` devices; compilations go to the session's cache
    (conftest), else under tmp_path. Every program of a job is cached, however small: the same job
    runs again (test_resume's reruns of the reference job) and then compiles nothing."""
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=forced_devices(devices),
                PYTHONPATH=str(ROOT),
                JAX_COMPILATION_CACHE_DIR=os.environ.get("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "xla_cache")),
                JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0", JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")


def run_two_processes(make_cmd, env: dict, timeout: int = 900) -> list[str]:
    """Starts ``make_cmd(process_id, port)`` for process ids 0 and 1 against one coordinator port,
    waits for both, asserts both exit 0 and returns their standard outputs."""
    port = free_port()
    procs = [subprocess.Popen(make_cmd(pid, port), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for pid in range(2)]
    outputs = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=timeout)
            outputs.append(out)
            assert proc.returncode == 0, err[-4000:]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    return outputs


def write_job_inputs(root: Path) -> None:
    """``root/graph`` and ``root/tiny.yaml``: the tiny job's graph and configuration."""
    toy = make_toy_graph(num_samples=60, num_molecules=40, per_sample=6, seed=1)
    # The toy graph's edge attributes are already normalised; predict needs the statistics that put
    # a new sample's peak areas on that scale (build-graph stores them): identity-like ones here.
    stats = {"transform": "log1p", "mean": [0.0] * 40, "std": [1.0] * 40}
    toy = dataclasses.replace(toy, meta=dataclasses.replace(
        toy.meta, normalisation={**(toy.meta.normalisation or {}), "contains_molecule": stats}))
    save_graph(toy, root / "graph")
    (root / "tiny.yaml").write_text(TINY_CONFIG)


def pod_job(root: Path, name: str, checkpoint_every: int = 1) -> list[str]:
    """The tiny job on the inputs in ``root`` (:func:`write_job_inputs`) in the workdir ``root/name``,
    a resume snapshot every ``checkpoint_every`` steps; it writes its initial and final parameters to
    ``root/{name}_initial_{process}.npz`` and ``root/{name}_final_{process}.npz``."""
    options = [*BATCH_OPTIONS, "--checkpoint-every", str(checkpoint_every)]
    return [sys.executable, str(ROOT / "experiments/pod/train.py"), "--graph", str(root / "graph"),
            "--workdir", str(root / name), "--config", str(root / "tiny.yaml"), "--no-progress", *options,
            "--final-params", str(root / f"{name}_final_{{process}}.npz"),
            "--initial-params", str(root / f"{name}_initial_{{process}}.npz")]


def _reference_run(root: Path) -> None:
    write_job_inputs(root)
    # One process, 4 devices, one subgraph each: the same 4 subgraphs per step as 2 processes x 2
    # devices (shards are numbered globally, each shard's subgraph and rng depend on step and shard
    # only) and the same mean gradient, all-reduced within one process. (4 subgraphs side by side on
    # one device, --per-device 4, train the same: test_distributed; the step's vmap traces slower.)
    single = subprocess.run(pod_job(root, "reference"), env=job_env(root, 4),
                            capture_output=True, text=True, timeout=900)
    assert single.returncode == 0, single.stderr[-4000:]
    assert f"complete: step {STEPS} on 1 process(es), 4 device(s), 4 shard(s) per step" in single.stdout


def pod_reference() -> Path:
    """The tiny job's uninterrupted run in one process on 4 devices, made once per test session (the first test
    that asks runs it): the directory with its inputs (:func:`write_job_inputs`), its workdir
    ``reference/`` and parameters ``reference_initial_0.npz``, ``reference_final_0.npz``."""
    return once_per_session("pod_reference", _reference_run)


@pytest.mark.slow
def test_two_processes_train_to_the_end_agree_and_only_process_0_writes(tmp_path, capsys):
    write_job_inputs(tmp_path)
    graph_dir, workdir = tmp_path / "graph", tmp_path / "work"

    def cmd(pid, port):  # a resume snapshot every 4 steps: two written by both processes together
        return [*pod_job(tmp_path, "work", checkpoint_every=4), "--coordinator", f"127.0.0.1:{port}",
                "--num-processes", "2", "--process-id", str(pid)]

    # The reference first, so that process 0 can take from the compilation cache the programs the
    # reference compiled for one device (initialisation, evaluation; process 1's device ids differ).
    reference = pod_reference()
    outputs = run_two_processes(cmd, job_env(tmp_path, 2))
    final = [np.load(tmp_path / f"work_final_{pid}.npz") for pid in range(2)]
    initial = np.load(tmp_path / "work_initial_0.npz")
    # Same parameters on both hosts (the all-reduce spans both processes)...
    assert final[0].files == final[1].files and len(final[0].files) > 10
    for name in final[0].files:
        np.testing.assert_array_equal(final[0][name], final[1][name], err_msg=name)
    # ...as one process trains them (up to the order of the float sums of the all-reduce)...
    one = np.load(reference / "reference_final_0.npz")
    assert one.files == final[0].files
    for name in one.files:
        # (8 Adam steps turn the all-reduce's float-order differences, ~1e-7 in a gradient, into up
        # to ~1e-5 in a weight; a process missing from the mean changes the updates by up to the
        # learning rate, 1e-3 and more)
        np.testing.assert_allclose(final[0][name], one[name], rtol=1e-4, atol=5e-5, err_msg=name)
    # ...from the same start, and well beyond that tolerance away from it (the comparisons can fail).
    initial_one = np.load(reference / "reference_initial_0.npz")
    assert initial.files == final[0].files
    for name in initial.files:
        np.testing.assert_array_equal(initial[name], initial_one[name], err_msg=name)
    moved = [n for n in initial.files if not np.array_equal(initial[n], final[0][n])]
    assert len(moved) > len(initial.files) / 2, sorted(set(initial.files) - set(moved))
    assert max(float(np.max(np.abs(final[0][n] - initial[n]))) for n in moved) > 1e-3

    # Process 0 alone wrote the metrics, the history (each step once) and TensorBoard events.
    assert f"complete: step {STEPS} on 2 process(es), 4 device(s), 4 shard(s) per step" in outputs[0]
    assert "1 compilation(s)" in outputs[0] and "complete" not in outputs[1]
    history = json.loads((workdir / "history.json").read_text())
    assert [row["step"] for row in history["train"]] == list(range(1, STEPS + 1))
    assert len(list((workdir / "tb").glob("events.out.tfevents.*"))) == 1
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert metrics["best_step"] == STEPS and not (workdir / "resume").exists()  # completed: no snapshots left

    # The checkpoint written together by both processes holds those parameters...
    state, meta = restore_checkpoint(workdir / "checkpoints")
    assert meta["step"] == STEPS and meta["kind"] == "finetune" and meta["data_parallel"]["num_shards"] == 4
    np.testing.assert_array_equal(state["params"]["encoder"]["layer_0"]["Sample|contains_molecule|Molecule"]["bias"],
                                  final[0]["encoder/layer_0/Sample|contains_molecule|Molecule/bias"])
    # ...and is a checkpoint like any other: evaluate reproduces metrics.json, predict and embed use it.
    assert cli.main(["evaluate", "--checkpoint", str(workdir / "checkpoints"), "--graph", str(graph_dir),
                     "--out", str(tmp_path / "m.json")]) == 0
    evaluated = json.loads((tmp_path / "m.json").read_text())
    assert set(evaluated) == set(metrics) and evaluated["best_step"] == STEPS
    np.testing.assert_allclose(evaluated["food_classification"]["accuracy"], metrics["food_classification"]["accuracy"])
    (tmp_path / "sample.csv").write_text("molecule_id,intensity\nm0,100\nm1,50\nm3,20\n")
    capsys.readouterr()
    assert cli.main(["predict", "--checkpoint", str(workdir / "checkpoints"), "--graph", str(graph_dir),
                     "--sample", str(tmp_path / "sample.csv"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["samples"][0]["molecules_known"] == 3
    assert cli.main(["embed", "--checkpoint", str(workdir / "checkpoints"), "--graph", str(graph_dir),
                     "--out", str(tmp_path / "emb.npz")]) == 0
    assert np.load(tmp_path / "emb.npz")["Sample"].shape[0] == 60
