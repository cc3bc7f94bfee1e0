"""Orbax checkpoints: one format for GraphCL, fine-tuning and converted PyTorch weights.

A checkpoint directory is an orbax ``CheckpointManager`` directory: one numbered subdirectory per
saved step, each with two items,

* ``state`` -- a pytree of arrays. Its ``params`` entry is ``{"encoder": <HeteroGATEncoder
  params>, <head name>: <head params>, ...}``; training adds ``opt_state`` etc.
* ``meta`` -- JSON: ``{"kind": "graphcl"|"finetune"|"converted", "encoder_config": {...},
  "step": int, ...}`` plus whatever the writer needs to rebuild the run (config, id maps).

:func:`load_encoder` reads the encoder part of any of them, which is what ``finetune
--pretrained`` and ``embed`` need.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from jaxfood.errors import CheckpointError

#: ``scheme:/rest``: what ``pathlib.Path("gs://bucket/run")`` leaves of a URL ("gs:/bucket/run").
_COLLAPSED_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:/(?!/)")


def checkpoint_path(directory: str | os.PathLike) -> Path | epath.Path:
    """``directory`` as orbax gets it: a URL (``gs://bucket/run/checkpoints``, as a string or an
    ``etils.epath.Path``) stays an ``epath.Path``; a local path (also given as ``epath.Path``)
    becomes an absolute ``pathlib.Path``, as before.

    ``pathlib.Path`` collapses ``gs://b/x`` to ``gs:/b/x``, which would silently become a local
    directory named ``gs:``: such a path is refused (pass URLs as strings or ``epath.Path``).
    """
    text = os.fspath(directory)
    if "://" in text:
        return epath.Path(text)
    if isinstance(directory, Path) and not isinstance(directory, epath.Path) and _COLLAPSED_URL.match(text):
        raise CheckpointError(f"{text}: looks like a URL that pathlib.Path collapsed ('//' lost); pass "
                              f"'{text.replace(':/', '://', 1)}' as a string or an etils.epath.Path")
    return Path(text).absolute()


def _is_remote(directory) -> bool:
    return "://" in os.fspath(directory)


def _shown(directory) -> Path | epath.Path:
    """The path as the caller gave it (relative stays relative): for messages and return values."""
    return epath.Path(os.fspath(directory)) if _is_remote(directory) else Path(os.fspath(directory))


class Checkpointer:
    """The orbax ``CheckpointManager`` of one checkpoint directory (local path or URL).

    Every process of a multi-host job calls :meth:`save` and :meth:`restore` with host (numpy)
    state; orbax writes the replicated arrays from process 0 and synchronises the others, so the
    directory must be shared storage (a ``gs://`` bucket on TPU pods). Saves are asynchronous
    (:meth:`wait`); a save cut short (SIGKILL) leaves only a temporary directory that restore ignores.
    """

    def __init__(self, directory: str | os.PathLike, max_to_keep: int | None = 3, create: bool = True):
        self.shown = _shown(directory)  # as the caller gave it: for messages
        self.directory = checkpoint_path(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=create)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Starts saving ``state`` (pytree of arrays) and ``meta`` (JSON; ``step`` added) as ``step``."""
        state = jax.tree_util.tree_map(np.asarray, jax.device_get(state))
        self._manager.save(int(step), args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta, step=int(step)))), force=True)

    def restore(self, step: int | None = None, target: Any = None) -> tuple[Any, dict]:
        """``(state, meta)`` of ``step`` (default: latest); ``target`` fixes structure and shapes."""
        self._manager.wait_until_finished()
        step = self._manager.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"{self.shown}: no checkpoint steps found (expected an orbax checkpoint directory)")
        if target is not None:
            target = jax.tree_util.tree_map(np.asarray, target)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        except Exception as err:  # orbax raises many types for shape/structure mismatches
            _quiet_aborted_reads()
            raise _restore_error(f"{self.shown}/{step}", err) from None
        return jax.tree_util.tree_map(np.asarray, restored["state"]), dict(restored["meta"])

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def save_checkpoint(directory: str | os.PathLike, step: int, state: Any, meta: dict[str, Any],
                    max_to_keep: int | None = 3) -> Path | epath.Path:
    """Saves ``state`` (pytree of arrays) and ``meta`` (JSON) as step ``step`` of ``directory``
    (a local path or a URL such as ``gs://bucket/run/checkpoints``, see :func:`checkpoint_path`)
    and waits until it is written."""
    with Checkpointer(directory, max_to_keep) as ckpt:
        ckpt.save(step, state, meta)
    return _shown(directory) / str(int(step))


def latest_step(directory: str | os.PathLike) -> int | None:
    """The latest saved step of ``directory`` (local or URL), None when it has none."""
    path = checkpoint_path(directory)
    if not _is_remote(path) and not path.is_dir():
        return None
    with Checkpointer(directory, create=False) as ckpt:
        return ckpt.latest_step()


def restore_checkpoint(directory: str | os.PathLike, step: int | None = None,
                       target: Any = None) -> tuple[Any, dict]:
    """Returns ``(state, meta)`` of ``step`` (default: latest). ``target`` fixes structure/shapes.

    ``directory``: a local path or a URL (``gs://...``, see :func:`checkpoint_path`)."""
    path = checkpoint_path(directory)
    if not _is_remote(path) and not path.is_dir():
        raise CheckpointError(f"{_shown(directory)}: checkpoint directory not found")
    with Checkpointer(directory, create=False) as ckpt:
        return ckpt.restore(step, target)


def _local_step_dir(directory: str | os.PathLike, step: int | None) -> Path | None:
    """``<directory>/<step>`` (default: the latest step) of a local checkpoint directory; None for a
    URL, a missing directory or step (the callers then go through orbax, which says what is wrong)."""
    path = checkpoint_path(directory)
    if _is_remote(path) or not path.is_dir():
        return None
    steps = [int(p.name) for p in Path(path).iterdir() if p.name.isdigit() and p.is_dir()]
    chosen = step if step is not None else (max(steps) if steps else None)
    return Path(path) / str(chosen) if chosen in steps else None


def read_meta(directory: str | os.PathLike, step: int | None = None) -> dict:
    """The JSON ``meta`` of ``step`` (default: latest) without reading the state: for a local
    directory straight from ``<step>/meta/metadata`` (milliseconds, where a restore takes ~1 s);
    otherwise, or when that file is not plain JSON, through :func:`restore_checkpoint`."""
    step_dir = _local_step_dir(directory, step)
    if step_dir is not None and (step_dir / "meta" / "metadata").is_file():
        try:
            meta = json.loads((step_dir / "meta" / "metadata").read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError):
            meta = None
        if isinstance(meta, dict):
            return meta
    return restore_checkpoint(directory, step)[1]


def restore_params(directory: str | os.PathLike, step: int | None = None) -> tuple[Any, dict]:
    """``(state["params"], meta)`` of ``step`` (default: latest), reading the parameters only: all
    that evaluating, embedding and predicting need. A training checkpoint also holds the optimizer
    state (twice as many arrays again); on the default model a local restore of the parameters alone
    takes ~0.3 s where the whole state takes ~1.3 s. URLs, and layouts not recognised here, restore
    the whole state. ``params`` is None when the state has none."""
    step_dir = _local_step_dir(directory, step)
    item = _params_item(step_dir / "state") if step_dir is not None else None
    if item is None:
        state, meta = restore_checkpoint(directory, step)
        return (state.get("params") if isinstance(state, dict) else None), meta
    meta = read_meta(directory, int(step_dir.name))
    restore_args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), item)
    checkpointer = ocp.PyTreeCheckpointer()
    try:
        restored = checkpointer.restore(step_dir / "state", args=ocp.args.PyTreeRestore(
            item=item, restore_args=restore_args, partial_restore=True))
    except Exception as err:  # as in Checkpointer.restore
        _quiet_aborted_reads()
        raise _restore_error(f"{_shown(directory)}/{step_dir.name}", err) from None
    finally:
        checkpointer.close()
    return jax.tree_util.tree_map(np.asarray, restored["params"]), meta


def _params_item(state_dir: Path) -> dict | None:
    """The ``{"params": nested dict}`` tree of a saved state, from orbax's ``_METADATA`` file (the
    restore target of a partial restore; reading it through orbax's metadata API opens every array,
    ~0.4 s). None when the file or its layout is not the one recognised here, or there is no ``params``."""
    try:
        tree = json.loads((state_dir / "_METADATA").read_text(encoding="utf-8"))["tree_metadata"]
        params: dict = {}
        for entry in tree.values():
            keys = entry["key_metadata"]
            if keys[0]["key"] != "params":
                continue
            value = entry["value_metadata"]
            empty_dict = value.get("skip_deserialize") and value.get("value_type") == "Dict"
            if any(k["key_type"] != 2 for k in keys) or (value.get("skip_deserialize") and not empty_dict):
                return None  # not a nested dict of arrays: let orbax restore the whole state
            node = params
            for k in keys[1:-1]:
                node = node.setdefault(k["key"], {})
            node[keys[-1]["key"]] = {} if empty_dict else 0
    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError):
        return None
    return {"params": params} if params else None


def _restore_error(where: str, err: Exception) -> CheckpointError:
    """One short line: damaged files are named as such, without tensorstore's spec dump."""
    text = str(err).strip()
    first = text.splitlines()[0] if text else type(err).__name__
    damaged = re.search(r"DATA_LOSS|FAILED_PRECONDITION|Error (?:reading|decoding|opening)|ZSTD|Expecting (?:value|property name|.,. delimiter)|"
                        r"Unterminated string|Invalid control character|Extra data", first)
    if damaged:
        item = re.search(r'Error reading "([^"/]+)', first)
        what = f" (reading {item.group(1)})" if item else ""
        return CheckpointError(f"{where}: the checkpoint files are damaged or incomplete{what}; copy or save the "
                               "checkpoint again")
    first = re.sub(r"\s*\[tensorstore_spec=.*", "", first)
    return CheckpointError(f"{where}: cannot restore ({first[:300]})")


def _quiet_aborted_reads() -> None:
    """After a failed restore, orbax closes its event loop while tensorstore still finishes the other
    reads; their callbacks then raise 'Event loop is closed' as unraisable exceptions (tracebacks on
    stderr after the one-line error). Those, and only those, are dropped."""
    previous = sys.unraisablehook
    if getattr(previous, "_jaxfood_quiet", False):
        return

    def hook(unraisable):
        if isinstance(unraisable.exc_value, RuntimeError) and "Event loop is closed" in str(unraisable.exc_value):
            return
        previous(unraisable)

    hook._jaxfood_quiet = True
    sys.unraisablehook = hook


def load_encoder(directory: str | os.PathLike, step: int | None = None) -> tuple[dict[str, Any], Any, dict]:
    """``(encoder_config_dict, encoder_params, meta)`` from any jaxfood checkpoint directory."""
    state, meta = restore_checkpoint(directory, step)
    if "encoder_config" not in meta:
        raise CheckpointError(f"{directory}: meta has no 'encoder_config' (not a jaxfood encoder checkpoint)")
    params = state.get("params", {}) if isinstance(state, dict) else {}
    if "encoder" not in params:
        raise CheckpointError(f"{directory}: state has no 'params/encoder' (not a jaxfood encoder checkpoint)")
    return meta["encoder_config"], params["encoder"], meta
