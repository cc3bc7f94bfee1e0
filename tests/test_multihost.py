"""Two processes on 127.0.0.1 (jax.distributed + gloo CPU collectives), 2 devices each, run the
data-parallel fine-tuning (experiments/pod/train.py) to the end: they agree on the final
parameters and only process 0 writes logs and the report."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import make_toy_graph

from jaxfood.graph.hetero_graph import save_graph
from jaxfood.train.checkpoint import restore_checkpoint

ROOT = Path(__file__).resolve().parents[1]

# A tiny model: what is tested is the job, not the model.
TINY_CONFIG = """
encoder: {hidden_dim: 8, num_heads: 2, num_layers: 1, embedding_dim: 8, dropout: 0.1,
          input_modes: {Sample: embedding, Molecule: both, Food: both}}
heads: {hidden_dim: 8, pool_dim: 8, attention_dim: 4, projection_dim: 4}
loss: {salient_top_k: 3}
sampler: {batch_size: 4}
steps: 6
checkpoint_every: 3
log_every: 1
eval_batches: 1
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_env(tmp_path: Path, devices: int) -> dict:
    """Environment of a CPU job with ``devices`` devices; compilations are cached under tmp_path."""
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                PYTHONPATH=str(ROOT), JAX_COMPILATION_CACHE_DIR=str(tmp_path / "xla_cache"),
                JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def run_two_processes(make_cmd, env: dict, timeout: int = 400) -> list[str]:
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


@pytest.mark.slow
def test_two_processes_train_to_the_end_agree_and_only_process_0_writes(tmp_path):
    graph_dir, workdir, config = tmp_path / "graph", tmp_path / "work", tmp_path / "tiny.yaml"
    save_graph(make_toy_graph(num_samples=60, num_molecules=40, per_sample=6, seed=1), graph_dir)
    config.write_text(TINY_CONFIG)
    def cmd(pid, port):
        return [sys.executable, str(ROOT / "experiments/pod/train.py"), "--graph", str(graph_dir),
                "--workdir", str(workdir), "--config", str(config), "--no-progress",
                "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(pid),
                "--final-params", str(tmp_path / "final_{process}.npz")]

    outputs = run_two_processes(cmd, job_env(tmp_path, 2))

    # Same parameters on both hosts (the all-reduce spans both processes), and they trained.
    final = [np.load(tmp_path / f"final_{pid}.npz") for pid in range(2)]
    assert final[0].files == final[1].files and len(final[0].files) > 10
    for name in final[0].files:
        np.testing.assert_array_equal(final[0][name], final[1][name], err_msg=name)

    # Process 0 alone wrote the report, the log (each step once) and TensorBoard events.
    report = json.loads((workdir / "report.json").read_text())
    assert report["status"] == "complete" and report["steps"] == 6
    assert report["process_count"] == 2 and report["device_count"] == 4 and report["num_shards"] == 4
    assert report["compilations"] == 1 and report["seeds_per_step"] == 16
    log = [json.loads(line) for line in (workdir / "train_log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log] == [1, 2, 3, 4, 5, 6]
    assert len(list((workdir / "tb").glob("events.out.tfevents.*"))) == 1
    assert "complete: step 6 on 2 process(es), 4 device(s)" in outputs[0] and "complete" not in outputs[1]

    # The checkpoints written together by both processes hold those parameters.
    state, meta = restore_checkpoint(workdir / "checkpoints")
    assert meta["step"] == 6 and meta["num_shards"] == 4
    np.testing.assert_array_equal(state["params"]["encoder"]["layer_0"]["Sample|contains_molecule|Molecule"]["bias"],
                                  final[0]["encoder/layer_0/Sample|contains_molecule|Molecule/bias"])


# FinetuneConfig keys of a tiny run of `jaxfood finetune` (few steps, one scorer).
TINY_FINETUNE_CONFIG = """
steps: 4
scorers: [attention]
salient_k: 3
encoder: {hidden_dim: 8, num_heads: 2, num_layers: 1, embedding_dim: 8, dropout: 0.1,
          input_modes: {Sample: embedding, Molecule: both, Food: both}}
heads: {hidden_dim: 8, pool_dim: 8, attention_dim: 4, projection_dim: 4}
loss: {salient_top_k: 3}
"""


@pytest.mark.slow
def test_finetune_command_on_two_processes_runs_to_the_end_and_only_process_0_writes(tmp_path):
    """`jaxfood finetune --coordinator ... --sampled`: 2 processes x 2 devices, data parallel."""
    graph_dir, workdir, config = tmp_path / "graph", tmp_path / "work", tmp_path / "tiny.yaml"
    save_graph(make_toy_graph(num_samples=60, num_molecules=40, per_sample=6, seed=1), graph_dir)
    config.write_text(TINY_FINETUNE_CONFIG)
    def cmd(pid, port):
        return [sys.executable, "-m", "jaxfood.cli", "finetune", "--graph", str(graph_dir), "--workdir", str(workdir),
                "--config", str(config), "--quiet", "--sampled", "--batch-size", "4",
                "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(pid)]

    outputs = run_two_processes(cmd, job_env(tmp_path, 2))

    # Process 0 alone reported and wrote metrics, history, figures and TensorBoard events.
    assert "fine-tuned:" in outputs[0] and "4 shard(s) per step on 2 process(es), 4 device(s)" in outputs[0]
    assert "fine-tuned" not in outputs[1] and "data parallel" not in outputs[1]
    metrics = json.loads((workdir / "metrics.json").read_text())
    assert metrics["best_step"] == 4
    assert {"food_classification", "nutrition", "salient_molecules", "task_weights"} <= set(metrics)
    history = json.loads((workdir / "history.json").read_text())
    assert [row["step"] for row in history["train"]] == [1, 2, 3, 4]  # each step logged once
    assert sorted(p.name for p in (workdir / "figures").glob("*.png")) == [
        "gradient_conflict.png", "losses.png", "task_weights.png"]
    assert len(list((workdir / "tb").glob("events.out.tfevents.*"))) == 1
    # Both processes wrote the checkpoint together; `jaxfood evaluate` reads its kind and config.
    state, meta = restore_checkpoint(workdir / "checkpoints")
    assert meta["step"] == 4 and meta["kind"] == "finetune"
    assert meta["data_parallel"]["num_shards"] == 4 and meta["data_parallel"]["process_count"] == 2
    assert "encoder" in state["params"]
