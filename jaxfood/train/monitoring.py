"""Monitoring of training runs: the TensorBoard writer, curves as PNG, reading event files back.

Fine-tuning logs everything its step reports every step (every task loss and its components, the
total, task weights and uncertainty log-variances, gradient norms per parameter group, each task's
gradient norm on the shared encoder and the pairwise cosine similarity of task gradients), plus
each group's learning rate and the validation metrics; its history (from the loop) is drawn as
``losses.png``, ``task_weights.png`` and ``gradient_conflict.png``. GraphCL logs its losses,
learning rate and held-out view loss.

This is the side-effect edge of training: files only, no JAX.
"""

from __future__ import annotations

import importlib
import math
import struct
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jaxfood.io_utils import atomic_path


def _tensorboardx(module: str):
    """``importlib.import_module(module)`` of tensorboardX without importing torch: tensorboardX
    imports it, when installed, only to accept torch tensors, which jaxfood never logs (1.3-1.8 s
    at every start of a run that writes events). Where torch is already imported, nothing changes."""
    if "torch" in sys.modules:
        return importlib.import_module(module)
    sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX catches
    try:
        return importlib.import_module(module)
    finally:
        del sys.modules["torch"]


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Nested dict of numbers -> ``{"a/b/c": float}`` (non-numeric leaves are skipped)."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten_metrics(value, f"{name}/"))
        elif isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
            out[name] = float(value)
        elif hasattr(value, "shape") and np.ndim(value) == 0:
            out[name] = float(value)
    return out


class TensorBoard:
    """The one TensorBoard writer of a run (tensorboardX): ``write(step, row, prefix)`` logs the
    finite numbers of a flat or nested dict as ``prefix + name`` scalars. ``tb_dir`` None (no
    events: TensorBoard off, or not the primary process) makes every call a no-op."""

    def __init__(self, tb_dir: str | Path | None):
        self._writer = None
        if tb_dir is not None:
            Path(tb_dir).mkdir(parents=True, exist_ok=True)
            # Imported here: predict, evaluate and embed, which write no events, do not pay for it.
            self._writer = _tensorboardx("tensorboardX").SummaryWriter(str(tb_dir))

    def write(self, step: int, row: Mapping[str, Any], prefix: str = "") -> None:
        if self._writer is None:
            return
        for name, value in flatten_metrics(row).items():
            if name != "step" and math.isfinite(value):
                self._writer.add_scalar(f"{prefix}{name}", value, int(step))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None


def _series(rows: list[dict[str, float]], prefix: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    names = sorted({k for r in rows for k in r if k.startswith(prefix)})
    out = {}
    for name in names:
        pts = [(r["step"], r[name]) for r in rows if name in r and math.isfinite(r[name])]
        if pts:
            steps, values = zip(*pts)
            out[name[len(prefix):]] = (np.asarray(steps), np.asarray(values))
    return out


def write_curves(history: Mapping[str, list[dict[str, float]]], out_dir: str | Path) -> list[Path]:
    """PNG curves of a run's history: task losses (+ validation score), task weights, gradient conflict."""
    # matplotlib (heavy) is imported here: only runs that draw figures pay for it.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train, val = history.get("train", []), history.get("val", [])
    paths: list[Path] = []

    def save(fig, name: str) -> None:
        path = out_dir / name
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        paths.append(path)

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    losses = _series(train, "loss/")
    # A run logs more loss terms than the default cycle has colours (10): curves would share one.
    axes[0].set_prop_cycle(color=[plt.get_cmap("tab20")(i % 20) for i in range(max(len(losses), 1))])
    for name, (s, v) in losses.items():
        axes[0].plot(s, v, label=name, lw=1.2 if name in ("total",) else 0.9)
    axes[0].set_yscale("log")
    axes[0].set_xlabel("step")
    axes[0].set_title("training losses")
    axes[0].legend(fontsize=7)
    for name, (s, v) in _series(val, "").items():
        if name in ("selection_score", "food_classification/accuracy", "nutrition/nutrient_r2",
                    "nutrition/spearman", "nutrition/knn_purity"):
            axes[1].plot(s, v, marker="o", label=name)
    axes[1].set_xlabel("step")
    axes[1].set_title("validation")
    axes[1].legend(fontsize=7)
    save(fig, "losses.png")

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, (s, v) in _series(train, "weight/").items():
        axes[0].plot(s, v, label=name)
    axes[0].set_title("task weights")
    axes[0].set_xlabel("step")
    axes[0].legend(fontsize=7)
    for name, (s, v) in _series(train, "learning_rate/").items():
        axes[1].plot(s, v, label=name)
    axes[1].set_title("learning rates")
    axes[1].set_xlabel("step")
    axes[1].legend(fontsize=7)
    save(fig, "task_weights.png")

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, (s, v) in _series(train, "task_grad_cosine/").items():
        axes[0].plot(s, v, label=name.replace("__", " vs "), lw=0.9)
    axes[0].axhline(0.0, color="k", lw=0.6)
    axes[0].set_ylim(-1.05, 1.05)
    axes[0].set_title("cosine similarity of task gradients (shared encoder, per task_gradient_scope)")
    axes[0].set_xlabel("step")
    axes[0].legend(fontsize=7)
    for name, (s, v) in _series(train, "task_grad_norm/").items():
        axes[1].plot(s, v, label=name, lw=0.9)
    axes[1].set_yscale("log")
    axes[1].set_title("task gradient norms (shared encoder, per task_gradient_scope)")
    axes[1].set_xlabel("step")
    axes[1].legend(fontsize=7)
    save(fig, "gradient_conflict.png")
    return paths


def read_scalars(tb_dir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """All scalars of the TensorBoard event files under ``tb_dir``: ``{tag: [(step, value), ...]}``.

    Reads the TFRecord framing directly (tensorboardX writes it; no TensorBoard install needed).
    """
    event_pb2 = _tensorboardx("tensorboardX.proto.event_pb2")
    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(Path(tb_dir).rglob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos + 12 <= len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            record = data[pos + 12:pos + 12 + length]
            pos += 12 + length + 4
            event = event_pb2.Event()
            event.ParseFromString(record)
            for value in event.summary.value:
                out.setdefault(value.tag, []).append((int(event.step), float(value.simple_value)))
    return out
