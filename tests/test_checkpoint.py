"""Checkpoint paths: local paths (str, pathlib or etils.epath) round-trip as before; URLs such as
gs://bucket/run reach orbax as etils.epath.Path, never collapsed by pathlib into "gs:/bucket/run"."""

from __future__ import annotations

from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from etils import epath

from jaxfood.errors import CheckpointError
from jaxfood.train import checkpoint as ck

STATE = {"params": {"encoder": {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}}, "step": np.int32(7)}
META = {"kind": "graphcl", "encoder_config": {"hidden_dim": 3}}


@pytest.mark.parametrize("kind", ["str", "pathlib", "epath"])
def test_local_checkpoint_round_trips_whatever_the_path_type(tmp_path, kind, monkeypatch):
    monkeypatch.chdir(tmp_path)
    wrap = {"str": str, "pathlib": Path, "epath": epath.Path}[kind]
    directory = wrap("runs/ck")  # relative: made absolute for orbax, as before
    written = ck.save_checkpoint(directory, 7, STATE, META)
    assert isinstance(written, Path) and str(written) == "runs/ck/7"
    assert (tmp_path / "runs/ck/7").is_dir()
    assert ck.latest_step(directory) == 7 and ck.latest_step(wrap("runs/none")) is None
    state, meta = ck.restore_checkpoint(directory)
    np.testing.assert_array_equal(state["params"]["encoder"]["w"], STATE["params"]["encoder"]["w"])
    assert meta == dict(META, step=7)
    config, params, _ = ck.load_encoder(directory)
    assert config == {"hidden_dim": 3} and params["w"].shape == (2, 3)
    with pytest.raises(CheckpointError, match="runs/missing: checkpoint directory not found"):
        ck.restore_checkpoint(wrap("runs/missing"))


def test_local_paths_become_absolute_pathlib_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for given in ("a/b", Path("a/b"), epath.Path("a/b")):
        path = ck.checkpoint_path(given)
        assert type(path) is type(Path()) and path == tmp_path / "a/b"


class FakeManager:
    """Stands in for orbax's CheckpointManager (no network): records the directory it is given."""

    seen: list = []

    def __init__(self, directory, options=None, **_):
        FakeManager.seen.append(directory)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def save(self, step, args=None, force=False):
        self.saved = step

    def wait_until_finished(self):
        pass

    def latest_step(self):
        return 3

    def restore(self, step, args=None):
        return {"state": STATE, "meta": dict(META, step=step)}

    def close(self):
        pass


@pytest.mark.parametrize("given", ["gs://bucket/run/ck", epath.Path("gs://bucket/run/ck")])
def test_gs_urls_reach_orbax_unmangled(given, monkeypatch):
    FakeManager.seen = []
    monkeypatch.setattr(ocp, "CheckpointManager", FakeManager)
    written = ck.save_checkpoint(given, 3, STATE, META)
    assert str(written) == "gs://bucket/run/ck/3"
    assert ck.latest_step(given) == 3
    state, meta = ck.restore_checkpoint(given)
    assert meta["step"] == 3 and state["step"] == 7
    _, params, _ = ck.load_encoder(given)
    assert params["w"].shape == (2, 3)
    # The Checkpointer behind both (and the training loop) takes the same paths.
    from jaxfood.train.checkpoint import Checkpointer

    Checkpointer(given).close()
    assert len(FakeManager.seen) == 5
    for directory in FakeManager.seen:
        assert isinstance(directory, epath.Path) and str(directory) == "gs://bucket/run/ck"


def test_a_url_collapsed_by_pathlib_is_refused():
    collapsed = Path("gs://bucket/run")  # pathlib drops one slash: "gs:/bucket/run"
    assert str(collapsed) == "gs:/bucket/run"
    with pytest.raises(CheckpointError, match="gs://bucket/run' as a string"):
        ck.save_checkpoint(collapsed, 1, STATE, META)
    with pytest.raises(CheckpointError, match="collapsed"):
        ck.latest_step(collapsed)


def test_read_meta_is_the_restored_meta_without_reading_the_state(tmp_path):
    read_meta, restore_checkpoint, save_checkpoint = ck.read_meta, ck.restore_checkpoint, ck.save_checkpoint

    state = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
    save_checkpoint(tmp_path / "c", 3, state, {"kind": "toy", "x": [1, 2]}, max_to_keep=None)
    save_checkpoint(tmp_path / "c", 7, state, {"kind": "toy", "x": [3]}, max_to_keep=None)
    assert read_meta(tmp_path / "c") == restore_checkpoint(tmp_path / "c")[1]
    assert read_meta(tmp_path / "c")["step"] == 7 and read_meta(tmp_path / "c", 3)["x"] == [1, 2]
    # A damaged meta file is not trusted: the full restore reports it.
    (tmp_path / "c" / "7" / "meta" / "metadata").write_text("{not json", encoding="utf-8")
    with pytest.raises(CheckpointError, match="damaged or incomplete"):
        read_meta(tmp_path / "c")


def test_restore_params_reads_only_the_params_as_the_full_restore_gives_them(tmp_path, monkeypatch):
    state = {"params": {"encoder": {"layer_0": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}},
                        "task_weighting": {}, "head": {"bias": np.ones(4, np.float32)}},
             "opt_state": {"mu": np.zeros(5, np.float32)}, "step": np.int32(9)}
    ck.save_checkpoint(tmp_path / "c", 2, state, {"kind": "toy"})
    full, meta = ck.restore_checkpoint(tmp_path / "c")

    def no_full_restore(*args, **kwargs):
        raise AssertionError("restore_params read the whole state")

    with monkeypatch.context() as m:
        m.setattr(ck, "restore_checkpoint", no_full_restore)
        params, params_meta = ck.restore_params(tmp_path / "c")
    assert params_meta == meta and meta["step"] == 2
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(full["params"])
    assert params["task_weighting"] == {}
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(full["params"])):
        assert isinstance(a, np.ndarray) and a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    # A state without params: None (the loaders say what is missing); a damaged one: one line.
    ck.save_checkpoint(tmp_path / "d", 1, {"w": np.ones(3, np.float32)}, {"kind": "toy"})
    assert ck.restore_params(tmp_path / "d")[0] is None
    for f in (tmp_path / "c" / "2" / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(b"\0" * f.stat().st_size)
    with pytest.raises(CheckpointError, match="damaged or incomplete"):
        ck.restore_params(tmp_path / "c")
