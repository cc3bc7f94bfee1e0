"""Preemption-safe resume: a run killed mid-training (SIGKILL: no handler, maybe mid-save) and rerun
with the same workdir ends with the parameters of an uninterrupted run; a preempted one (SIGTERM)
exits with status 143 and says where it stopped.

(The SIGTERM handler that checkpoints the step the loop is at and stops it is the loop's own,
tested in-process with a real signal: test_distributed.test_loop_preempted_then_rerun_ends_where_an_
uninterrupted_run_does; here the pod job's and the commands' exit status for it.)"""

from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_multihost import STEPS, TINY_OPTIONS, job_env, pod_reference

from jaxfood.train.checkpoint import latest_step
from jaxfood.train.preemption import PREEMPTED_EXIT, Preempted

ROOT = Path(__file__).resolve().parents[1]

# experiments/pod/train.py with a delay before each subgraph is drawn (STEP_DELAY seconds), so that
# the test can interrupt the run while it trains rather than race a run that ends at once.
WORKER = f"""
import os, sys, time
sys.path.insert(0, {str(ROOT / "experiments/pod")!r})
from jaxfood.graph import sampling
draw = sampling.NeighbourSampler.batch
def slow_batch(self, step, shard=0):
    time.sleep(float(os.environ.get("STEP_DELAY", "0")))
    return draw(self, step, shard)
sampling.NeighbourSampler.batch = slow_batch
import train
sys.exit(train.main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """The tiny job of test_multihost, its uninterrupted run (:func:`pod_reference`: one process, 4
    devices, 4 subgraphs a step) and how to start it interrupted; the reference run has also filled
    the compilation cache."""
    root, reference = tmp_path_factory.mktemp("resume"), pod_reference()
    (root / "worker.py").write_text(WORKER)

    def start(name: str, delay: float = 0.0) -> subprocess.Popen:
        cmd = [sys.executable, str(root / "worker.py"), "--graph", str(reference / "graph"), "--workdir",
               str(root / name), "--config", str(reference / "tiny.yaml"), "--no-progress", *TINY_OPTIONS,
               "--final-params", str(root / f"{name}.npz")]
        env = dict(job_env(root, 4), STEP_DELAY=str(delay))
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def finish(proc: subprocess.Popen) -> str:
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, err[-4000:]
        return out

    def saved_step(workdir: Path) -> int:
        try:
            return latest_step(workdir / "resume") or 0
        except FileNotFoundError:  # the job removed an old snapshot while it was being listed
            return 0

    def wait_for_checkpoint(proc: subprocess.Popen, workdir: Path, step: int) -> None:
        deadline = time.monotonic() + 900
        while saved_step(workdir) < step:
            assert proc.poll() is None, proc.communicate()[1][-4000:]
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.05)

    return {"root": root, "start": start, "finish": finish, "wait": wait_for_checkpoint,
            "reference": np.load(reference / "reference_final_0.npz"),
            "reference_metrics": json.loads((reference / "reference" / "metrics.json").read_text())}


def _assert_same_params(final, reference) -> None:
    assert final.files == reference.files
    worst = max(float(np.max(np.abs(final[k] - reference[k]))) for k in final.files)
    assert worst <= 1e-6, worst


@pytest.mark.slow
def test_sigkill_then_rerun_ends_where_an_uninterrupted_run_does(job):
    root, workdir = job["root"], job["root"] / "interrupted"
    # 1. Killed outright (SIGKILL: no handler, maybe mid-save) after its second snapshot.
    proc = job["start"]("interrupted", delay=0.3)
    job["wait"](proc, workdir, 2)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    killed_at = latest_step(workdir / "resume")
    assert 2 <= killed_at < STEPS - 1 and not (workdir / "metrics.json").exists()

    # 2. Rerun to the end: it resumes from the last snapshot and ends where the reference did.
    out = job["finish"](job["start"]("interrupted"))
    assert f"complete: step {STEPS} on 1 process(es)" in out and f"resumed from step {killed_at}" in out
    _assert_same_params(np.load(root / "interrupted.npz"), job["reference"])
    # The history continues across the interruption and has every step once; metrics are those
    # of the reference (same kept state, same evaluation).
    history = json.loads((workdir / "history.json").read_text())
    assert [row["step"] for row in history["train"]] == list(range(1, STEPS + 1))
    assert json.loads((workdir / "metrics.json").read_text()) == job["reference_metrics"]


def _preempted(*args, **kwargs):
    raise Preempted(3, "W/resume")


@pytest.mark.parametrize("command", ["pod", "finetune", "pretrain"])
def test_a_preempted_run_exits_143_and_says_where_it_stopped(command, monkeypatch, tmp_path, capsys):
    """The loop raises Preempted once SIGTERM's snapshot is written; the pod job and the commands turn
    it into exit status 143 and one line naming the step (the same graph and workdir resume it)."""
    from test_multihost import write_job_inputs

    from jaxfood import cli, workflows

    write_job_inputs(tmp_path)
    monkeypatch.setattr(workflows, "finetune", _preempted)
    monkeypatch.setattr(workflows, "pretrain", _preempted)
    common = ["--graph", str(tmp_path / "graph"), "--workdir", str(tmp_path / "w")]
    if command == "pod":
        spec = importlib.util.spec_from_file_location("pod_train", ROOT / "experiments/pod/train.py")
        pod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(pod)
        code = pod.main([*common, "--config", str(tmp_path / "tiny.yaml"), "--no-progress"])
    else:
        code = cli.main([command, *common, "--quiet"])
    assert code == PREEMPTED_EXIT == 143
    assert "preempted: step 3 checkpointed in W/resume; rerun the same command to resume" in capsys.readouterr().out
