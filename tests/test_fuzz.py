"""Fuzzing the commands a user feeds files to: ``build-graph``, ``predict`` and ``evaluate``.

Each case mutates a small valid input (shuffled, missing or duplicated columns, wrong types,
NaN/inf/negative values, truncated or random bytes, other encodings and delimiters) and runs the
command in-process. The promise checked: exit 0 with a correct result, or exit 2 with exactly one
``error:`` line; never a traceback (any exception escaping the command fails the test); never a
half-written output (the output location is either absent or complete)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from jaxfood import cli
from jaxfood.graph import schema

SAMPLES = [(f"s{f}_{i}.mzML", f"food{f}") for f in range(3) for i in range(3)]
NUM_MOLECULES = 8


def _areas(m: int, k: int) -> str:
    return "0" if (m + 2 * k) % 4 == 0 else f"{1000.0 * (1 + (7 * m + 3 * k) % 11):.1f}"


def base_tables() -> dict[str, list[list[str]]]:
    """Rows (header first) of a valid feature table, metadata and nutrient table."""
    features = [["row ID", "row m/z", "row retention time"] + [f"{s} Peak area" for s, _ in SAMPLES]]
    for m in range(NUM_MOLECULES):
        features.append([str(m + 1), f"{150 + 10 * m}.25", f"{1 + m / 10:.2f}"]
                        + [_areas(m, k) for k in range(len(SAMPLES))])
    metadata = [["filename", "sample_type_group4", "sample_type_group5"]] + [[s, "plant", f] for s, f in SAMPLES]
    nutrients = [["food", "Protein (g)", "Sodium (mg)"]] + [[f"food{f}", f"{1 + f}.5", f"{10 * f}"] for f in range(3)]
    return {"features": features, "metadata": metadata, "nutrients": nutrients}


def render(rows, sep=",") -> str:
    return "\n".join(sep.join(r) for r in rows) + "\n"


def _cols(rows, order):
    return [[r[i] for i in order] for r in rows]


def _set(table, row, col, value):
    def mutate(t):
        t[table][row][col] = value
    return mutate


def _raw(table, make_bytes):
    """Replaces ``table``'s file by bytes computed from its valid text."""
    return ("raw", table, make_bytes)


RNG_BYTES = np.random.default_rng(14).integers(0, 256, 600, dtype=np.uint8).tobytes()

#: name -> mutation of the tables dict (in place), or ("raw", table, text -> bytes); and whether
#: the result must equal the graph of the valid input (a mere re-formatting).
BUILD_CASES = {
    "valid": (lambda t: None, True),
    "shuffled_feature_columns": (lambda t: t.update(features=_cols(t["features"], [5, 0, 9, 2, 1, 3, 4, 6, 7, 8, 10, 11])),
                                 True),
    "shuffled_metadata_columns": (lambda t: t.update(metadata=_cols(t["metadata"], [2, 0, 1])), True),
    "shuffled_rows": (lambda t: t.update(features=[t["features"][0]] + t["features"][1:][::-1]), False),
    "missing_row_id": (lambda t: t.update(features=_cols(t["features"], range(1, 12))), False),
    "missing_filename": (lambda t: t.update(metadata=_cols(t["metadata"], [1, 2])), False),
    "missing_label_column": (lambda t: t.update(metadata=_cols(t["metadata"], [0, 1])), False),
    "missing_food_column": (lambda t: t.update(nutrients=_cols(t["nutrients"], [1, 2])), False),
    "no_peak_area_columns": (lambda t: t.update(features=_cols(t["features"], [0, 1, 2])), False),
    "duplicated_row_id_column": (lambda t: t.update(features=_cols(t["features"], [0, 0] + list(range(1, 12)))), False),
    "duplicated_sample_column": (lambda t: t.update(features=_cols(t["features"], list(range(12)) + [3])), False),
    "duplicated_molecule_row": (lambda t: t["features"].append(list(t["features"][1])), False),
    "duplicated_metadata_row": (lambda t: t["metadata"].append(list(t["metadata"][1])), False),
    "duplicated_food_row": (lambda t: t["nutrients"].append(list(t["nutrients"][1])), False),
    "text_peak_area": (_set("features", 2, 4, "abc"), False),
    "negative_peak_area": (_set("features", 2, 4, "-5"), False),
    "nan_peak_area": (_set("features", 2, 4, "NaN"), False),
    "inf_peak_area": (_set("features", 2, 4, "inf"), False),
    "negative_mz": (_set("features", 3, 1, "-150.5"), False),
    "inf_retention_time": (_set("features", 3, 2, "-inf"), False),
    "text_nutrient": (_set("nutrients", 1, 1, "lots"), False),
    "negative_nutrient": (_set("nutrients", 1, 2, "-1"), False),
    "inf_nutrient": (_set("nutrients", 2, 1, "inf"), False),
    "nutrient_header_without_unit": (_set("nutrients", 0, 1, "Protein"), False),
    "empty_label": (_set("metadata", 1, 2, ""), False),
    "all_labels_empty": (lambda t: [r.__setitem__(2, "") for r in t["metadata"][1:]], False),
    "nutrients_of_other_foods": (lambda t: [r.__setitem__(0, r[0] + "_x") for r in t["nutrients"][1:]], False),
    "all_areas_zero": (lambda t: [r.__setitem__(slice(3, None), ["0"] * 9) for r in t["features"][1:]], False),
    "one_sample_all_zero": (lambda t: [r.__setitem__(3, "0") for r in t["features"][1:]], False),
    "metadata_unknown_samples": (lambda t: [r.__setitem__(0, "x" + r[0]) for r in t["metadata"][1:]], False),
    "header_only_features": (lambda t: t.update(features=t["features"][:1]), False),
    "ragged_row": (lambda t: t["features"][3].pop(), False),
    "semicolon_delimited": (("sep", ";"), True),
    "tab_delimited": (("sep", "\t"), True),
    "bom_and_crlf": (_raw("features", lambda s: ("\ufeff" + s.replace("\n", "\r\n")).encode()), True),
    "utf16_features": (_raw("features", lambda s: s.encode("utf-16")), False),
    "latin1_metadata": (_raw("metadata", lambda s: s.replace("plant", "pl\u00e4nt").encode("latin-1")), False),
    "truncated_features": (_raw("features", lambda s: s.encode()[: len(s) // 2]), False),
    "truncated_mid_header": (_raw("features", lambda s: s.encode()[:25]), False),
    "random_bytes_features": (_raw("features", lambda s: RNG_BYTES), False),
    "random_bytes_nutrients": (_raw("nutrients", lambda s: RNG_BYTES), False),
    "empty_metadata": (_raw("metadata", lambda s: b""), False),
    "nul_bytes_metadata": (_raw("metadata", lambda s: s.encode().replace(b"food1", b"fo\x00d1")), False),
}


def write_case(name: str, directory: Path) -> dict[str, Path]:
    tables, sep = base_tables(), ","
    mutation, _ = BUILD_CASES[name]
    raw = {}
    if isinstance(mutation, tuple) and mutation[0] == "sep":
        sep = mutation[1]
    elif isinstance(mutation, tuple) and mutation[0] == "raw":
        raw[mutation[1]] = mutation[2]
    else:
        mutation(tables)
    directory.mkdir(parents=True)
    paths = {}
    for key, rows in tables.items():
        paths[key] = directory / f"{key}.csv"
        text = render(rows, sep)
        paths[key].write_bytes(raw[key](text) if key in raw else text.encode())
    return paths


def run(argv, capsys) -> tuple[int, str, list[str]]:
    """Runs the command in-process: an exception escaping it (a traceback for the user) fails."""
    try:
        code = cli.main([str(a) for a in argv])
    except SystemExit as exit_:  # argparse
        code = exit_.code
    except Exception as err:  # noqa: BLE001 -- exactly what the fuzz test looks for
        pytest.fail(f"traceback: {type(err).__name__}: {err}")
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    return code, captured.out, captured.err.strip().splitlines()


def assert_exit_2_one_line(code, err):
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("error: "), err


def no_leftovers(directory: Path) -> list[str]:
    """Temporary files/dirs an interrupted atomic write would leave (``.name.xxx.tmp``)."""
    return [p.name for p in directory.iterdir() if p.name.endswith(".tmp")]


@pytest.fixture(scope="module")
def valid_graph(tmp_path_factory):
    from jaxfood.graph.hetero_graph import load_graph

    root = tmp_path_factory.mktemp("fuzz_valid")
    paths = write_case("valid", root / "in")
    assert cli.main(["build-graph", "--out", str(root / "g"), "--feature-table", str(paths["features"]),
                     "--metadata", str(paths["metadata"]), "--nutrients", str(paths["nutrients"])]) == 0
    return load_graph(root / "g")


@pytest.mark.parametrize("case", sorted(BUILD_CASES))
def test_build_graph_fuzz(case, valid_graph, tmp_path, capsys):
    from jaxfood.graph.hetero_graph import load_graph

    capsys.readouterr()
    paths = write_case(case, tmp_path / "in")
    out = tmp_path / "g"
    code, stdout, err = run(["build-graph", "--out", out, "--feature-table", paths["features"],
                             "--metadata", paths["metadata"], "--nutrients", paths["nutrients"]], capsys)
    assert no_leftovers(tmp_path) == []
    if code == 2:
        assert_exit_2_one_line(code, err)
        assert not out.exists(), "half-written output"
        assert not BUILD_CASES[case][1], f"a mere re-formatting was refused: {err}"
        return
    assert code == 0, err
    graph = load_graph(out)  # validates the schema
    assert sorted(p.name for p in out.iterdir()) == ["graph.json", "graph.npz", "summary.json"]
    metadata = {s: f for s, f in SAMPLES}
    senders = np.asarray(graph.edges[schema.CONTAINS].senders)
    for i, sid in enumerate(graph.meta.node_ids[schema.SAMPLE]):
        assert sid in metadata and (senders == i).any(), sid  # known sample with a detected molecule
    assert np.isfinite(np.asarray(graph.edges[schema.CONTAINS].attributes)).all()
    assert json.loads((out / "summary.json").read_text())["nodes"][schema.SAMPLE] == graph.num_nodes[schema.SAMPLE]
    if BUILD_CASES[case][1]:  # a re-formatting: the same graph up to node order
        assert canonical(graph) == canonical(valid_graph)


def canonical(graph) -> dict:
    """The graph's content keyed by ids (node order is the input's column/row order)."""
    ids = graph.meta.node_ids
    contains = graph.edges[schema.CONTAINS]
    peaks = sorted((ids[schema.SAMPLE][s], ids[schema.MOLECULE][m], round(float(a), 5)) for s, m, a in zip(
        np.asarray(contains.senders), np.asarray(contains.receivers), np.asarray(contains.attributes)[:, 0]))
    foods = {ids[schema.SAMPLE][i]: ids[schema.FOOD][f] for i, f in enumerate(np.asarray(graph.sample_food))}
    nutrients = {ids[schema.FOOD][f]: np.round(np.asarray(graph.food_nutrients)[f], 5).tolist()
                 for f in range(graph.num_nodes[schema.FOOD])}
    return {"peaks": peaks, "foods": foods, "nutrients": nutrients}


# ---- predict: malformed --sample files ----------------------------------------------------------------
def _sample_rows(graph):
    contains = graph.edges[schema.CONTAINS]
    mols = np.asarray(contains.receivers)[np.asarray(contains.senders) == 0]
    ids = graph.meta.node_ids[schema.MOLECULE]
    return [["molecule_id", "intensity"]] + [[ids[m], f"{1000.0 * (1 + j)}"] for j, m in enumerate(mols)]


PREDICT_CASES = {
    "valid": lambda rows: render(rows).encode(),
    "shuffled_columns": lambda rows: render(_cols(rows, [1, 0])).encode(),
    "semicolon_delimited": lambda rows: render(rows, ";").encode(),
    "missing_intensity": lambda rows: render(_cols(rows, [0])).encode(),
    "duplicated_molecule": lambda rows: render(rows + [rows[1]]).encode(),
    "text_intensity": lambda rows: render(rows[:1] + [[rows[1][0], "high"]] + rows[2:]).encode(),
    "nan_intensity": lambda rows: render(rows[:1] + [[rows[1][0], "NaN"]] + rows[2:]).encode(),
    "inf_intensity": lambda rows: render(rows[:1] + [[rows[1][0], "inf"]] + rows[2:]).encode(),
    "negative_intensity": lambda rows: render(rows[:1] + [[rows[1][0], "-3"]] + rows[2:]).encode(),
    "all_unknown_ids": lambda rows: render(rows[:1] + [["nosuch" + r[0], r[1]] for r in rows[1:]]).encode(),
    "all_zero": lambda rows: render(rows[:1] + [[r[0], "0"] for r in rows[1:]]).encode(),
    "header_only": lambda rows: render(rows[:1]).encode(),
    "empty": lambda rows: b"",
    "random_bytes": lambda rows: RNG_BYTES,
    "utf16": lambda rows: render(rows).encode("utf-16"),
    "truncated_mid_header": lambda rows: render(rows).encode()[:9],
}


@pytest.mark.parametrize("case", sorted(PREDICT_CASES))
def test_predict_fuzz(case, tiny_run, tmp_path, capsys):
    _, graph, ckpt, _ = tiny_run
    sample = tmp_path / "sample.csv"
    sample.write_bytes(PREDICT_CASES[case](_sample_rows(graph)))
    code, out, err = run(["predict", "--checkpoint", ckpt, "--sample", sample, "--json", "--top-k", "3"], capsys)
    if code == 2:
        assert_exit_2_one_line(code, err)
        assert case not in ("valid", "shuffled_columns", "semicolon_delimited"), err
        return
    assert code == 0, err
    result = json.loads(out)
    (s,) = result["samples"]
    probabilities = [f["probability"] for f in s["top_foods"]]
    assert len(probabilities) == 3 and sum(probabilities) <= 1 + 1e-6 and probabilities == sorted(probabilities)[::-1]
    assert all(v >= 0 for v in s["nutrients_per_100g"].values())
    if case in ("valid", "shuffled_columns", "semicolon_delimited"):
        assert s["molecules_known"] == len(_sample_rows(graph)) - 1 and s["molecules_unknown"] == 0


# ---- evaluate: malformed graphs, biomarkers and checkpoints ------------------------------------------------
def _graph_copy(root: Path, dest: Path, damage) -> Path:
    shutil.copytree(root / "graph", dest)
    damage(dest)
    return dest


def _rewrite(name, make_bytes):
    return lambda d: (d / name).write_bytes(make_bytes((d / name).read_bytes()))


EVALUATE_GRAPH_CASES = {
    "graph_json_truncated": _rewrite("graph.json", lambda b: b[: len(b) // 2]),
    "graph_json_random": _rewrite("graph.json", lambda b: RNG_BYTES),
    "graph_json_not_a_graph": _rewrite("graph.json", lambda b: b'{"format": "something else"}'),
    "graph_npz_truncated": _rewrite("graph.npz", lambda b: b[: len(b) // 2]),
    "graph_npz_random": _rewrite("graph.npz", lambda b: RNG_BYTES),
    "graph_npz_missing": lambda d: (d / "graph.npz").unlink(),
}
EVALUATE_BIOMARKER_CASES = {
    "biomarkers_random_bytes": RNG_BYTES,
    "biomarkers_missing_column": b"feature,food\n1,x\n",
    "biomarkers_empty": b"",
    "biomarkers_utf16": "feature,category\n1,food0\n".encode("utf-16"),
    "biomarkers_empty_cell": b"feature,category\n,food0\n",
    "biomarkers_unknown": b"feature,category\nnope,nowhere\n",
}


@pytest.mark.parametrize("case", sorted(EVALUATE_GRAPH_CASES) + sorted(EVALUATE_BIOMARKER_CASES) + ["checkpoint_meta_zeroed"])
def test_evaluate_fuzz(case, tiny_run, tmp_path, capsys):
    root, _, ckpt, _ = tiny_run
    graph_dir, biomarkers = root / "graph", []
    if case in EVALUATE_GRAPH_CASES:
        graph_dir = _graph_copy(root, tmp_path / "graph", EVALUATE_GRAPH_CASES[case])
    elif case in EVALUATE_BIOMARKER_CASES:
        (tmp_path / "b.csv").write_bytes(EVALUATE_BIOMARKER_CASES[case])
        biomarkers = ["--biomarkers", tmp_path / "b.csv"]
    else:
        shutil.copytree(ckpt, tmp_path / "ckpt")
        meta = tmp_path / "ckpt" / "1" / "meta" / "metadata"
        meta.write_bytes(b"\0" * meta.stat().st_size)
        ckpt = tmp_path / "ckpt"
    out = tmp_path / "out" / "metrics.json"
    code, _, err = run(["evaluate", "--checkpoint", ckpt, "--graph", graph_dir, "--out", out, *biomarkers], capsys)
    assert_exit_2_one_line(code, err)  # every case here is unusable input
    assert not out.exists()


def test_evaluate_valid_writes_complete_metrics(tiny_run, tmp_path, capsys):
    root, _, ckpt, _ = tiny_run
    out = tmp_path / "metrics.json"
    code, stdout, err = run(["evaluate", "--checkpoint", ckpt, "--graph", root / "graph", "--out", out], capsys)
    assert code == 0, err
    metrics = json.loads(out.read_text())
    assert {"food_classification", "nutrition", "salient_molecules"} <= set(metrics)
    assert 0.0 <= metrics["food_classification"]["accuracy"] <= 1.0
    assert no_leftovers(tmp_path) == []
