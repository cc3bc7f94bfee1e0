"""Compatibility mode: the PyTorch project's intermediate JSON, checked against hand computation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from jaxfood.cli import main
from jaxfood.data.upstream import (
    UPSTREAM_RELATIONS,
    build_graph_from_upstream_json,
    read_upstream_mappings,
    upstream_mappings,
    write_upstream_mappings,
)
from jaxfood.errors import UserError
from jaxfood.graph import schema
from jaxfood.graph.hetero_graph import load_graph

EXAMPLE = Path(__file__).parent / "data" / "upstream" / "intermediate_samples.json"


def z(values):
    """Sample-std z-score (ddof=1); zero std (or a single value) -> 0, as upstream."""
    v = np.asarray(values, np.float64)
    std = v.std(ddof=1) if v.size > 1 else 0.0
    return np.zeros_like(v) if std == 0 else (v - v.mean()) / std


@pytest.fixture(scope="module")
def graph():
    return build_graph_from_upstream_json(EXAMPLE)


def test_node_order(graph):
    ids = graph.meta.node_ids
    assert ids["Molecule"] == ["30", "10", "20", "40"]  # metadata order, not sorted
    assert ids["Food"] == ["apple", "banana", "unknown"]  # sorted; missing food_name -> unknown
    assert ids["Nutrient"] == ["1003", "1008", "1087"]  # sorted ids
    assert ids["Sample"] == ["0", "1", "2", "7", "4"]  # file order
    assert graph.meta.nutrient_units == ["g", "mg", "kcal"]
    assert graph.meta.nutrient_names == ["Protein (g)", "Energy (kcal)", "Calcium, Ca (mg)"]


def test_feature_ids_sorted_when_not_listed(tmp_path):
    data = json.loads(EXAMPLE.read_text())
    del data["metadata"]["features"]
    (tmp_path / "x.json").write_text(json.dumps(data))
    g = build_graph_from_upstream_json(tmp_path / "x.json")
    assert g.meta.node_ids["Molecule"] == ["10", "20", "30", "40", "99"]


def test_intensity_zscore_matches_hand_computation(graph):
    e = graph.edges[schema.CONTAINS]
    # sample-major in file order, each sample's features as listed, unlisted id 99 skipped
    np.testing.assert_array_equal(e.senders, [0, 0, 1, 1, 2, 2, 2, 3, 3, 4, 4])
    np.testing.assert_array_equal(e.receivers, [0, 1, 1, 2, 1, 0, 3, 2, 1, 2, 0])
    f10 = z([2.0, 4.0, 6.0, 8.0])
    f20 = z([1.5, 2.5, 3.5])
    expected = [0.0, f10[0], f10[1], f20[0], f10[2], 0.0, 0.0, f20[1], f10[3], f20[2], 0.0]
    # feature 30 is constant (std 0) and feature 40 has one value: both 0; no log transform
    np.testing.assert_array_equal(e.attributes[:, 0], np.asarray(expected, np.float32))
    assert e.attributes.dtype == np.float32 and e.attributes.shape == (11, 1)


def test_amount_zscore_and_unit_onehot(graph):
    e = graph.edges[schema.HAS_NUTRIENT]
    # first (food, nutrient) occurrence in file order; banana's second protein (99.0) ignored
    pairs = list(zip(np.asarray(e.senders).tolist(), np.asarray(e.receivers).tolist()))
    assert pairs == [(1, 2), (1, 0), (1, 1), (0, 0), (0, 2), (0, 1), (2, 0), (2, 1)]
    protein = z([1.09, 0.26, 0.5])  # banana, apple, unknown
    calcium = z([5.0, 6.0])
    energy = z([89.0, 218.0, 100.0])  # per nutrient id: kcal and kJ together
    expected = [calcium[0], protein[0], energy[0], protein[1], calcium[1], energy[1], protein[2], energy[2]]
    np.testing.assert_array_equal(e.attributes[:, 0], np.asarray(expected, np.float32))
    onehot = np.asarray(e.attributes[:, 1:])
    np.testing.assert_array_equal(onehot, [[0, 1, 0], [1, 0, 0], [0, 0, 1], [1, 0, 0], [0, 1, 0],
                                           [0, 0, 0],  # 'kJ' is not in unique_nutrient_units
                                           [1, 0, 0], [0, 0, 1]])
    assert graph.food_nutrients[1, 0] == np.float32(protein[0])
    assert graph.food_nutrients[0, 2] == np.float32(calcium[1])
    assert graph.food_nutrients[2, 2] == 0.0  # 'unknown' has no calcium


def test_per_unit_grouping():
    g = build_graph_from_upstream_json(EXAMPLE, per_unit=True)
    amounts = g.edges[schema.HAS_NUTRIENT].attributes[:, 0]
    kcal = z([89.0, 100.0])
    np.testing.assert_array_equal(amounts[[2, 5, 7]], np.asarray([kcal[0], 0.0, kcal[1]], np.float32))
    assert g.meta.extra["zscore_nutrients_by"] == "nutrient_unit"


def test_all_samples_have_label_edges_and_are_train(graph):
    e = graph.edges[schema.IS_INSTANCE_OF]
    np.testing.assert_array_equal(e.senders, np.arange(5))
    np.testing.assert_array_equal(e.receivers, [1, 0, 1, 2, 0])
    np.testing.assert_array_equal(graph.sample_split, 0)
    np.testing.assert_array_equal(graph.sample_food, [1, 0, 1, 2, 0])
    assert graph.node_features == {}


def test_reverse_edges_copy_attributes(graph):
    assert list(graph.edges) == [schema.CONTAINS, schema.IS_INSTANCE_OF, schema.HAS_NUTRIENT,
                                 *(schema.reverse_key(k) for k in (schema.CONTAINS, schema.IS_INSTANCE_OF,
                                                                   schema.HAS_NUTRIENT))]
    for key in (schema.CONTAINS, schema.IS_INSTANCE_OF, schema.HAS_NUTRIENT):
        fwd, rev = graph.edges[key], graph.edges[schema.reverse_key(key)]
        np.testing.assert_array_equal(rev.senders, fwd.receivers)
        np.testing.assert_array_equal(rev.receivers, fwd.senders)
        np.testing.assert_array_equal(rev.attributes, fwd.attributes)
    assert set(UPSTREAM_RELATIONS.values()) == set(graph.edges)


def test_mappings_round_trip(graph, tmp_path):
    path = write_upstream_mappings(graph, tmp_path / "hetero_graph_mappings.json")
    raw = json.loads(path.read_text())
    assert raw["feature_ids"] == [30, 10, 20, 40] and raw["sample_ids"] == [0, 1, 2, 7, 4]
    assert raw["nutrient_ids"] == [1003, 1008, 1087] and raw["food_names"] == ["apple", "banana", "unknown"]
    assert raw["feature_id_to_index"]["20"] == 2 and raw["unit_values"] == ["g", "mg", "kcal"]
    back = read_upstream_mappings(path)
    assert back["feature_ids"] == graph.meta.node_ids["Molecule"]
    assert back["sample_ids"] == graph.meta.node_ids["Sample"]
    assert back["food_names"] == graph.meta.node_ids["Food"]
    assert back["nutrient_ids"] == graph.meta.node_ids["Nutrient"]
    assert upstream_mappings(graph)["zscore_nutrients_by"] == "nutrient"


def test_mappings_errors(tmp_path):
    p = tmp_path / "m.json"
    p.write_text(json.dumps({"feature_ids": [1], "food_names": ["a"], "nutrient_ids": [2]}))
    with pytest.raises(UserError, match=r"m.json: missing key 'sample_ids'"):
        read_upstream_mappings(p)
    p.write_text(json.dumps({"feature_ids": [1, 2], "food_names": ["a"], "nutrient_ids": [2], "sample_ids": [0],
                             "feature_id_to_index": {"1": 1}}))
    with pytest.raises(UserError, match=r"'feature_id_to_index' maps '1' to 1"):
        read_upstream_mappings(p)


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d.pop("samples"), "missing key 'samples'"),
    (lambda d: d["samples"][1].pop("id"), r"samples\[1\] has no key 'id'"),
    (lambda d: d["samples"][2].update(id=0), r"samples\[2\].id = 0 repeats samples\[0\].id"),
    (lambda d: d["samples"][0]["features"][1].update(intensity="high"), r"samples\[0\].features\[1\].intensity = 'high'"),
    (lambda d: d["samples"][3]["nutrients"][0].update(id="x"), r"samples\[3\].nutrients\[0\].id = 'x'"),
    (lambda d: [s.update(nutrients=[]) for s in d["samples"]], "no sample has nutrients"),
])
def test_bad_json(tmp_path, mutate, message):
    data = json.loads(EXAMPLE.read_text())
    mutate(data)
    p = tmp_path / "bad.json"
    p.write_text(json.dumps(data))
    with pytest.raises(UserError, match=message) as info:
        build_graph_from_upstream_json(p)
    assert str(p) in str(info.value)


def test_not_json(tmp_path):
    p = tmp_path / "x.json"
    p.write_text("{not json")
    with pytest.raises(UserError, match=r"x.json: not valid JSON"):
        build_graph_from_upstream_json(p)


def test_cli_upstream_writes_graph_and_mappings(tmp_path, capsys):
    out = tmp_path / "g"
    assert main(["build-graph", "--upstream-json", str(EXAMPLE), "--out", str(out), "--per-unit"]) == 0
    g = load_graph(out)
    ref = build_graph_from_upstream_json(EXAMPLE, per_unit=True)
    for key in ref.edges:
        np.testing.assert_array_equal(g.edges[key].attributes, ref.edges[key].attributes)
    assert read_upstream_mappings(out / "hetero_graph_mappings.json")["feature_ids"] == ["30", "10", "20", "40"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["splits"] == {"train": 5, "val": 0, "test": 0}
    assert "Sample|is_instance_of|Food" in capsys.readouterr().out
