"""Graph builder (native path), the embedded default and the ``build-graph`` command."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxfood.cli import main
from jaxfood.data.build import build_graph, grouped_zscore
from jaxfood.data.readers import read_tables
from jaxfood.graph import schema
from jaxfood.graph.hetero_graph import load_graph, save_graph
from jaxfood.graph.splits import samples_reaching_own_food

SMALL = Path(__file__).parent / "data" / "small"
FDC = Path(__file__).parent / "data" / "fdc"

# Peak areas of tests/data/small/feature_table.csv: molecule row -> areas of S01..S10.
AREAS = {
    "101": [12000, 15000, 9000, 11000, 0, 0, 0, 0, 0, 0],
    "102": [0, 0, 0, 0, 54000, 61000, 47000, 0, 0, 0],
    "103": [0, 0, 0, 0, 0, 0, 0, 88000, 93000, 79000],
    "104": [500, 0, 700, 650, 800, 0, 900, 1000, 1200, 0],
    "105": [2500, 2500, 0, 0, 0, 0, 0, 0, 0, 0],
    "106": [0, 0, 0, 0, 0, 0, 0, 0, 0, 3300],
}


@pytest.fixture(scope="module")
def graph():
    tables = read_tables(SMALL / "feature_table.csv", SMALL / "metadata.csv", SMALL / "nutrients.csv",
                         molecule_embeddings=SMALL / "molecule_embeddings.npy")
    return build_graph(tables, seed=3)


def edge_value(g, key, src, dst, column=0):
    e = g.edges[key]
    hit = np.nonzero((np.asarray(e.senders) == src) & (np.asarray(e.receivers) == dst))[0]
    assert hit.size == 1, (key, src, dst)
    return float(np.asarray(e.attributes)[hit[0], column])


def test_node_order(graph):
    ids = graph.meta.node_ids
    assert ids["Molecule"] == list(AREAS)  # feature-table row order
    assert ids["Sample"] == [f"S{i:02d}.mzML" for i in range(1, 11)]  # feature-table column order
    assert ids["Food"] == ["apple", "banana", "cheddar"]  # sorted; kiwi has no samples
    assert ids["Nutrient"] == ["Energy (kcal)", "Protein (g)", "Total lipid (fat) (g)", "Calcium, Ca (mg)",
                               "Vitamin D (D2 + D3) (ug)"]  # column order
    assert graph.num_nodes == {"Sample": 10, "Molecule": 6, "Food": 3, "Nutrient": 5}
    np.testing.assert_array_equal(graph.sample_food, [0, 0, 0, 0, 1, 1, 1, 2, 2, 2])


def test_intensity_is_log1p_zscored_per_molecule(graph):
    key = schema.CONTAINS
    assert graph.edges[key].num_edges == sum(np.count_nonzero(v) for v in AREAS.values())
    for m, (mol, areas) in enumerate(AREAS.items()):
        areas = np.asarray(areas, float)
        det = np.nonzero(areas)[0]
        logs = np.log1p(areas[det])
        std = logs.std()  # population std (ddof=0)
        expected = (logs - logs.mean()) / std if std > 1e-9 else np.zeros_like(logs)
        got = [edge_value(graph, key, s, m) for s in det]
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6, err_msg=mol)
        stats = graph.meta.normalisation["contains_molecule"]
        assert stats["mean"][m] == pytest.approx(logs.mean())
        assert stats["std"][m] == pytest.approx(std if std > 1e-9 else 1.0)
    assert graph.meta.normalisation["contains_molecule"]["transform"] == "log1p"
    # molecule 105 (constant) and 106 (one detection) are all zero
    assert edge_value(graph, key, 0, 4) == 0.0 and edge_value(graph, key, 9, 5) == 0.0


def test_nutrients_zscored_per_nutrient_with_unit_onehot(graph):
    raw = np.array([[52, 0.26, 0.17, 6, 0], [89, 1.09, 0.33, 5, np.nan], [403, 24.9, 33.1, 721, 0.6]])
    assert graph.meta.nutrient_units == ["kcal", "g", "mg", "ug"]
    units = ["kcal", "g", "g", "mg", "ug"]
    key = schema.HAS_NUTRIENT
    assert graph.edges[key].num_edges == 14  # banana has no vitamin D value: no edge
    for n in range(5):
        col = raw[:, n]
        ok = ~np.isnan(col)
        z = (col[ok] - col[ok].mean()) / col[ok].std()
        for f, zf in zip(np.nonzero(ok)[0], z):
            assert edge_value(graph, key, f, n) == pytest.approx(zf, rel=1e-5)
            onehot = [edge_value(graph, key, f, n, 1 + u) for u in range(4)]
            assert onehot == [1.0 if u == units[n] else 0.0 for u in graph.meta.nutrient_units]
            assert graph.food_nutrients[f, n] == pytest.approx(zf, rel=1e-5)
        assert graph.meta.normalisation["has_nutrient"]["mean"][n] == pytest.approx(col[ok].mean())
    assert float(graph.food_nutrients[1, 4]) == 0.0  # missing value: mean-imputed (z = 0)
    np.testing.assert_array_equal(graph.node_features["Food"], graph.food_nutrients)
    assert graph.meta.attribute_names[key] == ["quantity", "unit=kcal", "unit=g", "unit=mg", "unit=ug"]


def test_features_categories_and_provenance(graph):
    vecs = np.load(SMALL / "molecule_embeddings.npy")
    np.testing.assert_array_equal(graph.node_features["Molecule"], vecs)
    assert graph.meta.food_categories == ["Dairy and Egg Products", "Fruits and Fruit Juices"]
    np.testing.assert_array_equal(graph.food_category, [1, 1, 0])
    extra = graph.meta.extra
    assert extra["seed"] == 3 and extra["label_column"] == "sample_type_group5" and extra["mode"] == "native"
    assert extra["sources"]["feature_table"].endswith("feature_table.csv")


def test_category_falls_back_to_metadata_hierarchy(tmp_path):
    nut = tmp_path / "n.csv"
    lines = (SMALL / "nutrients.csv").read_text().splitlines()
    nut.write_text("\n".join(ln.split(",", 2)[0] + "," + ln.split(",", 2)[2] for ln in lines) + "\n")
    g = build_graph(read_tables(SMALL / "feature_table.csv", SMALL / "metadata.csv", nut))
    assert g.meta.food_categories == ["cheese", "fleshy fruit"]  # sample_type_group4
    np.testing.assert_array_equal(g.food_category, [1, 1, 0])


def test_fdc_nutrients_build(graph):
    g = build_graph(read_tables(SMALL / "feature_table.csv", SMALL / "metadata.csv", FDC))
    assert g.meta.node_ids["Nutrient"][:4] == ["Protein (g)", "Total lipid (fat) (g)", "Energy (kcal)", "Energy (kJ)"]
    assert g.meta.food_categories == graph.meta.food_categories


def test_reverse_relations(graph):
    for key in (schema.CONTAINS, schema.IS_INSTANCE_OF, schema.HAS_NUTRIENT):
        fwd, rev = graph.edges[key], graph.edges[schema.reverse_key(key)]
        np.testing.assert_array_equal(rev.senders, fwd.receivers)
        np.testing.assert_array_equal(rev.receivers, fwd.senders)
        np.testing.assert_array_equal(rev.attributes, fwd.attributes)
    assert len(graph.edges) == 6


def test_splits_and_no_label_leakage(graph):
    split = np.asarray(graph.sample_split)
    sf = np.asarray(graph.sample_food)
    for f in range(3):  # stratified: every food in every split
        assert set(split[sf == f]) == {0, 1, 2}
    label = graph.edges[schema.IS_INSTANCE_OF]
    assert set(np.asarray(label.senders).tolist()) == set(np.nonzero(split == 0)[0].tolist())
    np.testing.assert_array_equal(np.asarray(label.receivers), sf[np.asarray(label.senders)])
    assert samples_reaching_own_food(graph).size == 0
    # a different seed gives a different split; the same seed the same one
    tables = read_tables(SMALL / "feature_table.csv", SMALL / "metadata.csv", SMALL / "nutrients.csv")
    again = build_graph(tables, seed=3)
    np.testing.assert_array_equal(again.sample_split, split)
    assert any(not np.array_equal(build_graph(tables, seed=s).sample_split, split) for s in range(4, 10))


def test_grouped_zscore_against_numpy():
    rng = np.random.default_rng(0)
    values, groups = rng.normal(size=50), rng.integers(0, 5, 50)
    for ddof in (0, 1):
        z, mean, std = grouped_zscore(values, groups, 6, ddof=ddof)
        for g in range(5):
            v = values[groups == g]
            np.testing.assert_allclose(z[groups == g], (v - v.mean()) / v.std(ddof=ddof), rtol=1e-10)
        assert mean[5] == 0 and std[5] == 1  # empty group


def test_save_load_round_trip_of_a_built_graph(graph, tmp_path):
    save_graph(graph, tmp_path / "g")
    back = load_graph(tmp_path / "g")
    assert jax.tree_util.tree_structure(graph.replace(meta=back.meta)) == jax.tree_util.tree_structure(back)
    for a, b in zip(jax.tree_util.tree_leaves(graph), jax.tree_util.tree_leaves(back)):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(a, b)
    assert back.meta.to_json() == json.loads(json.dumps(graph.meta.to_json()))


# ---- the embedded default ------------------------------------------------------------------------
def test_default_graph_has_full_schema():
    from jaxfood.data.default import build_default_graph

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the simulator leaves a few molecules without embedding
        g = build_default_graph(seed=0)
    assert set(g.num_nodes) == set(schema.NODE_TYPES) and all(n > 0 for n in g.num_nodes.values())
    for key in (schema.CONTAINS, schema.IS_INSTANCE_OF, schema.HAS_NUTRIENT):
        assert g.edges[key].num_edges > 0 and g.edges[schema.reverse_key(key)].num_edges > 0
    assert g.num_nodes["Food"] >= 60 and len(g.meta.food_categories) >= 8 and g.num_nodes["Nutrient"] >= 25
    assert samples_reaching_own_food(g).size == 0
    assert g.meta.extra["mode"] == "embedded-default"
    assert g.node_features["Molecule"].shape[0] == g.num_nodes["Molecule"]


# ---- the command ---------------------------------------------------------------------------------
def run_cli(args, capsys):
    code = main(["build-graph", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_files_end_to_end(tmp_path, capsys):
    out = tmp_path / "out"
    code, stdout, stderr = run_cli(["--out", str(out), "--feature-table", str(SMALL / "feature_table.csv"),
                                    "--metadata", str(SMALL / "metadata.csv"), "--nutrients", str(SMALL / "nutrients.csv"),
                                    "--molecule-embeddings", str(SMALL / "molecule_embeddings.npy"),
                                    "--seed", "3", "--split", "0.6,0.2,0.2"], capsys)
    assert code == 0, stderr
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary) == {"nodes", "edges", "splits", "molecule_features", "absent"}
    assert summary["molecule_features"]["source"] == "embeddings" and summary["molecule_features"]["width"] == 4
    assert summary["absent"] == {schema.IS_SIMILAR_TO: "no molecular network or spectra"}
    assert summary["nodes"] == {"Sample": 10, "Molecule": 6, "Food": 3, "Nutrient": 5}
    assert summary["edges"][schema.CONTAINS] == 20 and summary["edges"][schema.HAS_NUTRIENT] == 14
    assert set(summary["edges"]) == set(schema.KNOWN_RELATIONS) - {schema.IS_SIMILAR_TO, schema.reverse_key(schema.IS_SIMILAR_TO)}
    assert sum(summary["splits"].values()) == 10
    assert summary["edges"][schema.IS_INSTANCE_OF] == summary["splits"]["train"]
    assert "Sample|contains_molecule|Molecule" in stdout and "graph written to" in stdout
    g = load_graph(out)
    assert g.meta.extra["split_fractions"] == [0.6, 0.2, 0.2]
    assert sorted(p.name for p in out.iterdir()) == ["graph.json", "graph.npz", "summary.json"]


def test_cli_prints_counted_warnings(tmp_path, capsys):
    d = tmp_path / "d"
    shutil.copytree(SMALL, d)
    (d / "nutrients.csv").write_text((SMALL / "nutrients.csv").read_text().replace("banana,", "plantain,"))
    code, _, stderr = run_cli(["--out", str(tmp_path / "o"), "--feature-table", str(d / "feature_table.csv"),
                               "--metadata", str(d / "metadata.csv"), "--nutrients", str(d / "nutrients.csv")], capsys)
    assert code == 0
    assert "warning:" in stderr and "1 food(s)" in stderr and "1 warning(s)" in stderr
    assert load_graph(tmp_path / "o").meta.extra["warnings"][0].startswith(str(d / "nutrients.csv"))


@pytest.mark.parametrize("case", ["bad_file", "missing_metadata", "bad_split", "mixed_modes"])
def test_cli_errors_exit_2_and_write_nothing(tmp_path, capsys, case):
    d = tmp_path / "d"
    shutil.copytree(SMALL, d)
    (d / "feature_table.csv").write_text((SMALL / "feature_table.csv").read_text().replace("1000,1200,0", "1000,-1200,0"))
    out = tmp_path / "nested" / "out"
    files = ["--feature-table", str(d / "feature_table.csv"), "--metadata", str(d / "metadata.csv")]
    args = {"bad_file": files + ["--nutrients", str(d / "nutrients.csv")],
            "missing_metadata": files[:2],  # --nutrients is optional, --metadata is not
            "bad_split": ["--split", "0.5,0.5"],
            "mixed_modes": ["--upstream-json", "x.json", "--metadata", "m.csv"]}[case]
    code, stdout, stderr = run_cli(["--out", str(out), *args], capsys)
    assert code == 2
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    expected = {"bad_file": ["feature_table.csv", "column 'S09.mzML Peak area'", "line 5", "negative"],
                "missing_metadata": ["--metadata"], "bad_split": ["--split", "0.5,0.5"],
                "mixed_modes": ["--upstream-json", "--metadata"]}[case]
    for part in expected:
        assert part in lines[0]
    assert not out.exists()
    assert not (tmp_path / "nested").exists() or not any((tmp_path / "nested").iterdir())


def test_cli_help_explains_inputs(capsys):
    with pytest.raises(SystemExit) as info:
        main(["build-graph", "--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--feature-table", "--metadata", "--nutrients", "--molecule-embeddings", "--upstream-json",
                 "--label-column", "--seed", "--split", "embedded default"):
        assert flag in text


def test_cli_default_writes_full_summary(tmp_path, capsys):
    out = tmp_path / "default"
    code, stdout, stderr = run_cli(["--out", str(out)], capsys)
    assert code == 0, stderr
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["nodes"]) == set(schema.NODE_TYPES)
    for key in (schema.CONTAINS, schema.IS_INSTANCE_OF, schema.HAS_NUTRIENT):
        assert summary["edges"][key] > 0 and summary["edges"][schema.reverse_key(key)] == summary["edges"][key]
    assert summary["splits"]["val"] > 0 and summary["splits"]["test"] > 0
    assert sum(summary["splits"].values()) == summary["nodes"]["Sample"]
    assert summary["edges"][schema.IS_INSTANCE_OF] == summary["splits"]["train"]


def test_graph_package_imports_nothing_from_data():
    """DESIGN: imports point down (graph <- data); the builder lives in jaxfood.data."""
    import ast

    graph_dir = Path(__file__).parents[1] / "jaxfood" / "graph"
    offenders = []
    for path in sorted(graph_dir.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.name}: {n}" for n in names if n.startswith("jaxfood.data")]
    assert offenders == []
