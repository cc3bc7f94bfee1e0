"""Issue #14: bad input a new user still hit. Each case ends with exit status 2 and one ``error:``
line naming the file/key and what was expected, with nothing written -- or gives the right number
or the warning. Commands run in-process (``jaxfood.cli.main``, ``run_mtl.main``)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from jaxfood import cli
from jaxfood.graph import schema

ROOT = Path(__file__).resolve().parents[1]
#: A location nobody can write, root included (tests run as root in CI containers).
READ_ONLY = Path("/proc/jaxfood-test-out")


def run_cli(argv, capsys, main=cli.main):
    """``(exit status, stdout, stderr lines)``; never a traceback."""
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert "Traceback" not in captured.err, captured.err
    return code, captured.out, err


def assert_one_error(code, err, *fragments):
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("error: "), err
    for fragment in fragments:
        assert fragment in err[0], err


def _run_mtl():
    spec = importlib.util.spec_from_file_location("run_mtl", ROOT / "experiments" / "run_mtl.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["run_mtl"] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def a_file(tmp_path):
    path = tmp_path / "a_file"
    path.write_text("not a directory\n")
    return path


# ---- (1) output locations are checked before any work ----------------------------------------------
@pytest.mark.parametrize("where", ["under_file", "read_only", "is_file"])
@pytest.mark.parametrize("command", ["build-graph", "simulate", "pretrain", "finetune"])
def test_unwritable_output_directory_is_refused_first(command, where, a_file, capsys, monkeypatch):
    import jaxfood.graph.hetero_graph as hg

    def no_work(*_a, **_k):
        raise AssertionError("work started before the output location was checked")

    monkeypatch.setattr(hg, "load_graph", no_work)
    out = {"under_file": a_file / "out", "read_only": READ_ONLY, "is_file": a_file}[where]
    flag = "--workdir" if command in ("pretrain", "finetune") else "--out"
    args = [command, flag, out] + (["--graph", "unused"] if command in ("pretrain", "finetune") else [])
    code, _, err = run_cli(args, capsys)
    assert_one_error(code, err, f"{flag} {out}")
    assert a_file.read_text() == "not a directory\n"


def test_embed_and_evaluate_out_checked_before_loading_anything(tiny_run, tmp_path, capsys, monkeypatch):
    import jaxfood.workflows as workflows

    root, _, ckpt, _ = tiny_run
    monkeypatch.setattr(workflows, "evaluate", lambda *a, **k: pytest.fail("metrics computed first"))
    code, _, err = run_cli(["evaluate", "--checkpoint", ckpt, "--graph", root / "graph", "--out", tmp_path], capsys)
    assert_one_error(code, err, f"--out {tmp_path}: is a directory")
    code, _, err = run_cli(["embed", "--checkpoint", ckpt, "--graph", root / "graph", "--out", tmp_path], capsys)
    assert_one_error(code, err, f"--out {tmp_path}: is a directory")
    code, _, err = run_cli(["embed", "--checkpoint", ckpt, "--graph", root / "graph", "--out",
                            READ_ONLY / "e.npz"], capsys)
    assert_one_error(code, err, "not writable")


@pytest.mark.parametrize("where", ["is_file", "read_only"])
def test_run_mtl_workdir_checked_first(where, a_file, capsys):
    workdir = a_file if where == "is_file" else READ_ONLY
    code, _, err = run_cli(["--workdir", workdir, "--graph", "no/such/graph"], capsys, main=_run_mtl().main)
    assert_one_error(code, err, f"--workdir {workdir}")


# ---- (2) run_mtl.py checks every key before anything runs or is written --------------------------------
@pytest.mark.parametrize("override, key", [
    ("finetune.steps=-5", "'finetune.steps' = -5"),
    ("pretrain.epochs=-1", "'pretrain.epochs' = -1"),
    ("evaluation.rf_estimators=-3", "'evaluation.rf_estimators' = -3"),
    ("pretrain.augment.node_drop={Sample: 2}", "'pretrain.augment.node_drop.Sample' = 2"),
    ("finetune.optimizer.encoder.learning_rate=-1", "'finetune.optimizer.encoder.learning_rate' = -1"),
    # (10) a key that would do nothing does not exist.
    ("finetune.encoder.hidden_dim=32", "'finetune.encoder' has no effect"),
])
def test_run_mtl_config_checked_before_anything_runs(override, key, tiny_run, tmp_path, capsys, monkeypatch):
    module = _run_mtl()
    import jaxfood.workflows as workflows

    monkeypatch.setattr(workflows, "pretrain", lambda *a, **k: pytest.fail("pretraining ran"))
    workdir = tmp_path / "w"
    code, _, err = run_cli(["--workdir", workdir, "--graph", tiny_run[0] / "graph", "--no-progress",
                            "--set", override], capsys, main=module.main)
    assert_one_error(code, err, key)
    assert not workdir.exists()


# ---- (3) a negative learning rate ---------------------------------------------------------------
def test_finetune_refuses_negative_learning_rate(tiny_run, tmp_path, capsys):
    workdir = tmp_path / "w"
    code, _, err = run_cli(["finetune", "--workdir", workdir, "--graph", tiny_run[0] / "graph",
                            "--set", "optimizer.encoder.learning_rate=-1"], capsys)
    assert_one_error(code, err, "'optimizer.encoder.learning_rate' = -1.0", ">= 0")
    assert not workdir.exists()


@pytest.mark.parametrize("override, expect", [
    ("encoder.hidden_dim=-1", "key 'hidden_dim' = -1: expected a positive integer"),
    ("temperature=0", "temperature"),
])
def test_pretrain_refuses_a_bad_value_and_writes_nothing(override, expect, tiny_run, tmp_path, capsys):
    """A value the configuration checks refuse is one line and no workdir (pretrain_config.yaml
    used to be written before the checks)."""
    workdir = tmp_path / "w"
    code, _, err = run_cli(["pretrain", "--workdir", workdir, "--graph", tiny_run[0] / "graph", "--quiet",
                            "--set", override], capsys)
    assert_one_error(code, err, expect)
    assert not workdir.exists()


# ---- (10) --set finetune.steps=... on `jaxfood finetune` --------------------------------------------
def test_finetune_set_with_section_prefix_hints_the_key(tiny_run, tmp_path, capsys):
    code, _, err = run_cli(["finetune", "--workdir", tmp_path / "w", "--graph", tiny_run[0] / "graph",
                            "--set", "finetune.steps=5"], capsys)
    assert_one_error(code, err, "unknown key 'finetune'", "--set steps=")


# ---- (4) corrupted checkpoints ----------------------------------------------------------------------
def _corrupt_copy(ckpt: Path, dest: Path) -> Path:
    shutil.copytree(ckpt, dest)
    for f in (dest / "1" / "state").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(b"\0" * f.stat().st_size)
    return dest


def test_corrupted_checkpoint_is_one_short_line(tiny_run, tmp_path, capsys):
    root, _, ckpt, _ = tiny_run
    bad = _corrupt_copy(ckpt, tmp_path / "ckpt")
    for command in (["evaluate"], ["embed", "--out", tmp_path / "e.npz"]):
        code, _, err = run_cli([*command, "--checkpoint", bad, "--graph", root / "graph"], capsys)
        assert_one_error(code, err, str(bad), "damaged or incomplete")
        assert "tensorstore" not in err[0] and len(err[0]) < 300, err
    assert not (tmp_path / "e.npz").exists()


def test_reads_aborted_by_a_failed_restore_print_nothing(capsys):
    """orbax closes its event loop while tensorstore finishes the other reads; their callbacks then
    raise 'Event loop is closed' as unraisable exceptions (tracebacks after the error line)."""
    from jaxfood.train.checkpoint import _quiet_aborted_reads

    class Unraisable:
        def __init__(self, err):
            self.exc_type, self.exc_value, self.exc_traceback = type(err), err, None
            self.err_msg, self.object = None, None

    saved, seen = sys.unraisablehook, []
    try:
        sys.unraisablehook = seen.append
        _quiet_aborted_reads()
        sys.unraisablehook(Unraisable(RuntimeError("Event loop is closed")))
        sys.unraisablehook(Unraisable(ValueError("something else")))
    finally:
        sys.unraisablehook = saved
    assert [type(u.exc_value) for u in seen] == [ValueError]  # other problems still show


# ---- (5) a truncated .pt ------------------------------------------------------------------------------
def test_truncated_torch_checkpoint_says_not_complete(tmp_path, capsys):
    torch = pytest.importorskip("torch", reason="PyTorch is a test dependency ([convert] extra)")
    from checkpoints_convert.cli import main as convert_main

    full = tmp_path / "full.pt"
    torch.save({"encoder_state": {"w": torch.ones(64, 64)}, "config": {}}, full)
    data = full.read_bytes()
    for n in (10, len(data) // 2, len(data) - 1):
        cut = tmp_path / f"cut{n}.pt"
        cut.write_bytes(data[:n])
        code, _, err = run_cli([cut, "--out", tmp_path / f"out{n}"], capsys, main=convert_main)
        assert_one_error(code, err, str(cut), "not a complete PyTorch checkpoint")
        assert not (tmp_path / f"out{n}").exists()


def test_converter_names_itself_and_its_install_command(monkeypatch, capsys):
    from checkpoints_convert import cli as convert_cli
    from checkpoints_convert.errors import install_hint

    monkeypatch.setattr(sys, "argv", ["/venv/bin/jaxfood-convert", "--help"])
    assert convert_cli.build_parser().prog == "jaxfood-convert"
    monkeypatch.setattr(sys, "argv", ["/repo/checkpoints_convert/__main__.py"])
    assert convert_cli.build_parser().prog == "python -m checkpoints_convert"
    assert install_hint() == 'pip install -e ".[convert]"'  # this test runs from a checkout


# ---- (6) the split a checkpoint was trained on ----------------------------------------------------------
@pytest.mark.parametrize("command", ["evaluate", "predict"])
def test_graph_with_another_split_is_refused(command, tiny_run, tmp_path, capsys):
    from jaxfood.graph.hetero_graph import save_graph
    from jaxfood.graph.splits import with_splits

    root, graph, ckpt, _ = tiny_run
    resplit = with_splits(graph, seed=1)
    assert not np.array_equal(np.asarray(resplit.sample_split), np.asarray(graph.sample_split))
    save_graph(resplit, tmp_path / "graph")
    extra = ["--sample", _one_sample_csv(graph, tmp_path / "s.csv")] if command == "predict" else []
    code, _, err = run_cli([command, "--checkpoint", ckpt, "--graph", tmp_path / "graph", *extra], capsys)
    assert_one_error(code, err, str(ckpt), "splits its samples or foods differently", "test sample ids,")


def _one_sample_csv(graph, path: Path, scale: float = 1.0) -> Path:
    """Sample 0 of ``graph`` as raw peak areas (times ``scale``)."""
    contains = graph.edges[schema.CONTAINS]
    mols = np.asarray(contains.receivers)[np.asarray(contains.senders) == 0]
    ids = graph.meta.node_ids[schema.MOLECULE]
    path.write_text("molecule_id,intensity\n" + "".join(f"{ids[m]},{1e5 * scale}\n" for m in mols))
    return path


# ---- (7) biomarkers that match nothing ------------------------------------------------------------------
def test_biomarkers_matching_nothing_stop_with_counts(tiny_run, tmp_path, capsys, monkeypatch):
    import jaxfood.workflows as workflows

    root, graph, ckpt, _ = tiny_run
    monkeypatch.setattr(workflows, "evaluate", lambda *a, **k: pytest.fail("scored against nothing"))
    bad = tmp_path / "biomarkers.csv"
    bad.write_text("feature,category\nno_such_id,no_such_food\nanother,Apple\n")
    code, _, err = run_cli(["evaluate", "--checkpoint", ckpt, "--graph", root / "graph", "--biomarkers", bad], capsys)
    assert_one_error(code, err, str(bad), "none of the 2 biomarker rows matches", "'no_such_food'", "'no_such_id'")


def test_biomarker_match_counts_pairs_the_graph_has():
    from jaxfood.eval.metrics import match_biomarkers

    reference = {"apple": {"1", "2", "99"}, "pear": {"1"}, "nosuch": {"2"}}
    assert match_biomarkers(reference, ["apple", "pear"], ["1", "2", "3"], "f.csv") == (3, 5)


# ---- (8) predicted nutrient amounts ----------------------------------------------------------------------
def test_predict_nutrients_are_non_negative_and_extrapolations_flagged(tiny_run, tmp_path, capsys):
    import jax

    from jaxfood.train.checkpoint import restore_checkpoint, save_checkpoint

    root, graph, ckpt, params = tiny_run
    _, meta = restore_checkpoint(ckpt)
    # The head's last bias pushes nutrient 0 far below and nutrient 1 far above every food.
    def push(path, leaf):
        if jax.tree_util.keystr(path).endswith("['nutrient_head']['mlp']['out']['bias']"):
            leaf = np.asarray(leaf).copy()
            leaf[0], leaf[1] = -1e3, 1e3
        return leaf

    pushed = tmp_path / "run" / "checkpoints"
    save_checkpoint(pushed, 1, {"params": jax.tree_util.tree_map_with_path(push, params)}, meta)
    shutil.copytree(root / "graph", tmp_path / "run" / "graph")
    code, out, err = run_cli(["predict", "--checkpoint", pushed, "--sample", _one_sample_csv(graph, tmp_path / "s.csv"),
                              "--json"], capsys)
    assert code == 0, err
    result = json.loads(out)
    sample = result["samples"][0]
    names = list(graph.meta.nutrient_names)
    amounts = sample["nutrients_per_100g"]
    assert all(v >= 0 for v in amounts.values())
    assert amounts[names[0]] == 0.0
    low, high = result["nutrient_training_range"][names[1]]
    assert amounts[names[1]] > high and names[1] in sample["nutrients_outside_training_range"]
    for name in names:  # flagged exactly when outside the training foods' range
        lo, hi = result["nutrient_training_range"][name]
        assert (name in sample["nutrients_outside_training_range"]) == (not lo - 1e-9 <= amounts[name] <= hi + 1e-9)
    stats = graph.meta.normalisation["has_nutrient"]
    train_foods = np.unique(np.asarray(graph.sample_food)[np.asarray(graph.sample_split) == 0])
    real = np.asarray(graph.food_nutrients)[train_foods] * np.asarray(stats["std"]) + np.asarray(stats["mean"])
    assert high == pytest.approx(real[:, 1].max(), rel=1e-5)
    code, out, err = run_cli(["predict", "--checkpoint", pushed, "--sample", tmp_path / "s.csv"], capsys)
    assert code == 0 and "outside the training foods' range" in out


# ---- (9) silent oddities -----------------------------------------------------------------------------
def write_tables(directory: Path, sep: str = ",", samples_per_food=(3, 3, 1), zero_sample: bool = False,
                 nutrient_cell: str = "1.5", mz_cell: str = "100.5") -> dict[str, Path]:
    """A tiny GNPS-style study: foods f0.. with ``samples_per_food`` samples, 6 molecules, 2 nutrients."""
    directory.mkdir(parents=True, exist_ok=True)
    samples = [(f"s{f}_{i}.mzML", f"f{f}") for f, n in enumerate(samples_per_food) for i in range(n)]
    if zero_sample:
        samples.append(("blank.mzML", "f0"))
    rng = np.random.default_rng(0)
    header = ["row ID", "row m/z", "row retention time"] + [f"{s} Peak area" for s, _ in samples]
    rows = [sep.join(header)]
    for m in range(6):
        areas = [f"{rng.uniform(1e3, 1e6):.1f}" if (m + k) % 3 else "0" for k in range(len(samples))]
        if zero_sample:
            areas[-1] = "0"
        rows.append(sep.join([str(m + 1), mz_cell if m == 0 else f"{100 + m}.5", "1.0", *areas]))
    paths = {"feature_table": directory / "features.csv", "metadata": directory / "metadata.csv",
             "nutrients": directory / "nutrients.csv"}
    paths["feature_table"].write_text("\n".join(rows) + "\n")
    paths["metadata"].write_text("\n".join([sep.join(["filename", "sample_type_group5"])]
                                           + [sep.join(s) for s in samples]) + "\n")
    foods = sorted({food for _, food in samples})
    paths["nutrients"].write_text("\n".join([sep.join(["food", "Protein (g)", "Fat (g)"])]
                                            + [sep.join([food, nutrient_cell if i == 0 else "2.0", str(i + 1.0)])
                                               for i, food in enumerate(foods)]) + "\n")
    return paths


def build_args(paths, out):
    return ["build-graph", "--out", out, "--feature-table", paths["feature_table"], "--metadata", paths["metadata"],
            "--nutrients", paths["nutrients"]]


def test_food_with_few_samples_and_empty_sample_are_reported(tmp_path, capsys):
    from jaxfood.graph.hetero_graph import load_graph

    paths = write_tables(tmp_path / "in", zero_sample=True)
    code, _, err = run_cli(build_args(paths, tmp_path / "g"), capsys)
    assert code == 0, err
    assert any("1 food(s) have fewer than 3 samples ('f2')" in line for line in err), err
    assert any("1 sample(s) have no detected peak" in line and "blank.mzML" in line for line in err), err
    graph = load_graph(tmp_path / "g")
    assert "blank.mzML" not in graph.meta.node_ids[schema.SAMPLE]
    assert graph.num_nodes[schema.SAMPLE] == 7


@pytest.mark.parametrize("split", ["1,0,0", "0.8,0.2,0", "0,0.5,0.5"])
def test_split_without_a_validation_or_test_share_is_refused(split, tmp_path, capsys):
    code, _, err = run_cli(["build-graph", "--out", tmp_path / "g", "--split", split], capsys)
    assert_one_error(code, err, f"--split '{split}'", "three positive fractions")
    assert not (tmp_path / "g").exists()


@pytest.mark.parametrize("sep", [";", "\t"])
def test_semicolon_and_tab_separated_csv_read_like_commas(sep, tmp_path, capsys):
    from jaxfood.graph.hetero_graph import load_graph

    assert run_cli(build_args(write_tables(tmp_path / "comma"), tmp_path / "g1"), capsys)[0] == 0
    assert run_cli(build_args(write_tables(tmp_path / "other", sep=sep), tmp_path / "g2"), capsys)[0] == 0
    a, b = load_graph(tmp_path / "g1"), load_graph(tmp_path / "g2")
    assert a.meta.node_ids == b.meta.node_ids
    np.testing.assert_array_equal(a.edges[schema.CONTAINS].attributes, b.edges[schema.CONTAINS].attributes)


def test_literal_nan_and_inf_are_called_by_their_names(tmp_path, capsys):
    paths = write_tables(tmp_path / "nan", nutrient_cell="NaN")
    code, _, err = run_cli(build_args(paths, tmp_path / "g"), capsys)
    assert_one_error(code, err, "nutrients.csv", "'Protein (g)'", "'NaN'")
    paths = write_tables(tmp_path / "inf", mz_cell="inf")
    code, _, err = run_cli(build_args(paths, tmp_path / "g"), capsys)
    assert_one_error(code, err, "features.csv", "'row m/z'", "value 'inf' is infinite")
    assert "np.float64" not in err[0]
    assert not (tmp_path / "g").exists()


def test_predict_refuses_the_empty_sample_build_graph_drops(tiny_run, tmp_path, capsys):
    root, graph, ckpt, _ = tiny_run
    sample = tmp_path / "s.csv"
    ids = graph.meta.node_ids[schema.MOLECULE]
    sample.write_text(f"molecule_id,intensity\n{ids[0]},0\n{ids[1]},0\n")
    code, _, err = run_cli(["predict", "--checkpoint", ckpt, "--sample", sample], capsys)
    assert_one_error(code, err, str(sample))


# ---- interface polish ------------------------------------------------------------------------------
def test_warnings_are_printed_as_warning_lines():
    import subprocess

    code = ("import warnings; from jaxfood.cli import run_command; "
            "run_command(lambda a: warnings.warn('something the user can fix'), None, debug=False)")
    done = subprocess.run([sys.executable, "-W", "always", "-c", code], capture_output=True, text=True, timeout=120,
                          cwd=ROOT)
    assert done.stderr == "warning: something the user can fix\n", done.stderr


def test_run_mtl_help_shows_no_none_defaults(capsys):
    with pytest.raises(SystemExit):
        _run_mtl().parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text and "(default: [])" not in text and "(default: embedded)" in text
    assert "(default: runs/mtl)" in text


def test_embedded_default_data_raises_no_warning():
    from jaxfood.data.default import build_default_graph

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graph = build_default_graph(seed=0)
    assert [str(w.message) for w in caught] == []
    assert graph.num_nodes[schema.SAMPLE] > 0


def test_every_loss_curve_has_its_own_colour(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from jaxfood.train.monitoring import write_curves

    names = [f"loss/task_{i}" for i in range(12)]
    history = {"train": [{"step": s, **{n: 1.0 + i + s for i, n in enumerate(names)}} for s in (1, 2, 3)], "val": []}
    colours = []
    close = plt.close

    def record(fig=None):
        if fig is not None and fig.axes and fig.axes[0].get_title() == "training losses":
            colours.extend(matplotlib.colors.to_hex(line.get_color()) for line in fig.axes[0].get_lines())
        close(fig)

    monkeypatch.setattr(plt, "close", record)
    write_curves(history, tmp_path)
    assert len(colours) == 12 and len(set(colours)) == 12, colours
