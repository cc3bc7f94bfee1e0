"""GNPS molecular networks: ``build-graph --network`` -> ``(Molecule, is_similar_to, Molecule)``."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from jaxfood.cli import main
from jaxfood.graph import schema

SMALL = Path(__file__).parent / "data" / "small"
FILES = ["--feature-table", str(SMALL / "feature_table.csv"), "--metadata", str(SMALL / "metadata.csv")]

#: As GNPS writes it (tab-separated, extra columns, singletons as self loops); 101-102 twice, both directions.
EDGES = """CLUSTERID1\tCLUSTERID2\tDeltaMZ\tMEH\tCosine\tOtherScore\tComponentIndex
101\t102\t62.0156\t0\t0.81\t0.7\t1
102\t101\t-62.0156\t0\t0.90\t0.7\t1
103\t105\t163.08\t0\t0.72\t0.6\t1
104\t104\t0\t0\t1.0\t1.0\t-1
106\t999\t0\t0\t0.75\t0.6\t2
"""


def _build(tmp_path, edges: str, capsys, extra=()):
    path = tmp_path / "edges.tsv"
    path.write_text(edges)
    out = tmp_path / "g"
    code = main(["build-graph", "--out", str(out), *FILES, "--network", str(path), *extra])
    return code, out, capsys.readouterr()


def test_network_becomes_is_similar_to_with_cosine_and_reverse(tmp_path, capsys):
    from jaxfood.graph.hetero_graph import load_graph

    code, out, captured = _build(tmp_path, EDGES, capsys)
    assert code == 0, captured.err
    # 999 is not a row ID of the table: dropped with a counted warning naming the file.
    assert "edges.tsv" in captured.err and "1 similarity edge(s)" in captured.err
    summary = json.loads((out / "summary.json").read_text())
    rev = schema.reverse_key(schema.IS_SIMILAR_TO)
    assert summary["edges"][schema.IS_SIMILAR_TO] == 2 and summary["edges"][rev] == 2
    assert schema.IS_SIMILAR_TO not in summary["absent"]
    graph = load_graph(out)
    ids = graph.meta.node_ids[schema.MOLECULE]
    e = graph.edges[schema.IS_SIMILAR_TO]
    pairs = {(ids[s], ids[r]): float(a[0]) for s, r, a in zip(e.senders, e.receivers, np.asarray(e.attributes))}
    assert pairs == pytest.approx({("101", "102"): 0.90, ("103", "105"): 0.72})  # the higher cosine of the pair
    r = graph.edges[rev]
    assert sorted(zip(r.senders.tolist(), r.receivers.tolist())) == sorted(zip(e.receivers.tolist(), e.senders.tolist()))
    assert graph.meta.attribute_names[schema.IS_SIMILAR_TO] == ["similarity"]


def test_graphcl_defaults_drop_network_edges_like_molecule_edges(tmp_path, capsys):
    from jaxfood.graph.hetero_graph import load_graph
    from jaxfood.train.adapt import adapt_to_graph
    from jaxfood.train.graphcl import PretrainConfig, check_pretrain_config

    code, out, _ = _build(tmp_path, EDGES, capsys, ["--nutrients", str(SMALL / "nutrients.csv")])
    assert code == 0
    graph = load_graph(out)
    cfg, notes = adapt_to_graph(PretrainConfig(), graph)
    assert cfg.augment.edge_drop["is_similar_to"] == PretrainConfig().augment.edge_drop["contains_molecule"]
    assert any("edge_drop.is_similar_to" in n for n in notes)
    check_pretrain_config(cfg, graph)
    # A config that names the relation keeps its own rate.
    default = PretrainConfig()
    named = dataclasses.replace(default, augment=dataclasses.replace(
        default.augment, edge_drop={"contains_molecule": 0.2, "is_similar_to": 0.0}))
    assert adapt_to_graph(named, graph)[0].augment.edge_drop["is_similar_to"] == 0.0


@pytest.mark.parametrize("edges, message", [
    ("CLUSTERID1\tCLUSTERID2\tScore\n101\t102\t0.9\n", "missing column 'Cosine'"),
    ("CLUSTERID1\tCLUSTERID2\tCosine\n101\t102\t1.7\n", "column 'Cosine', line 2: value 1.7 is above 1"),
    ("CLUSTERID1\tCLUSTERID2\tCosine\n101\t102\tx\n", "column 'Cosine', line 2"),
    ("CLUSTERID1\tCLUSTERID2\tCosine\n101\t101\t1.0\n", "no edge between two different molecules"),
    ("CLUSTERID1\tCLUSTERID2\tCosine\n7\t8\t0.9\n", "none of its cluster ids match"),
])
def test_bad_network_files_exit_2_with_one_line_and_write_nothing(tmp_path, capsys, edges, message):
    code, out, captured = _build(tmp_path, edges, capsys)
    lines = captured.err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "edges.tsv" in lines[0], lines
    assert message in lines[0]
    assert not out.exists()
