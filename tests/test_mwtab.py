"""Metabolomics Workbench studies: ``build-graph --mwtab`` on mwTab files the tests write in the
Workbench format (text and JSON) and bad studies (a Workbench study end to end: test_no_nutrients)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from jaxfood.cli import main
from jaxfood.graph import schema

HEADER = """#METABOLOMICS WORKBENCH STUDY_ID:ST009999 ANALYSIS_ID:AN009999
VERSION             \t1.5
CREATED_ON          \t2026-12-01
#PROJECT
PR:PROJECT_TITLE                 \tTest wines
#STUDY
ST:STUDY_ID                      \tST009999
ST:STUDY_TITLE                   \tWines by origin
#SUBJECT
SU:SUBJECT_TYPE                  \tPlant
#SUBJECT_SAMPLE_FACTORS:         \tSUBJECT(optional)[tab]SAMPLE[tab]FACTORS(NAME:VALUE pairs separated by |)[tab]Additional sample data
"""


def write_mwtab(path: Path, samples, labels, metabolites, areas, mz=None, rt=None) -> Path:
    """An mwTab text file: ``areas`` [metabolites, samples] (NaN: empty cell, the others to the
    digit), factors Origin and Year."""
    lines = [HEADER.rstrip("\n")]
    for s, label in zip(samples, labels):
        lines.append(f"SUBJECT_SAMPLE_FACTORS           \t-\t{s}\tOrigin:{label} | Year:2019\t")
    lines += ["#COLLECTION", "CO:COLLECTION_SUMMARY            \ttest", "#MS_METABOLITE_DATA",
              "MS_METABOLITE_DATA:UNITS\tPeak area", "MS_METABOLITE_DATA_START", "Samples\t" + "\t".join(samples),
              "Factors\t" + "\t".join(f"Origin:{label} | Year:2019" for label in labels)]
    for name, row in zip(metabolites, areas):
        lines.append(name + "\t" + "\t".join("" if np.isnan(v) else repr(float(v)) for v in row))
    lines += ["MS_METABOLITE_DATA_END", "#METABOLITES", "METABOLITES_START", "metabolite_name\tmoverz_quant\tri\tri_type"]
    for i, name in enumerate(metabolites):
        lines.append(f"{name}\t{'' if mz is None else mz[i]}\t{'' if rt is None else rt[i]}\tRT")
    lines += ["METABOLITES_END", "#END"]
    path.write_text("\n".join(lines) + "\n")
    return path


SMALL = dict(samples=["S1", "S2", "S3", "S4"], labels=["France", "Italy", "France", "Italy"],
             metabolites=["caffeine", "quercetin", "tartaric acid"],
             areas=np.array([[10.0, 20.0, np.nan, 5.0], [np.nan, 7.0, 3.0, 1.0], [1.0, 1.0, 1.0, 1.0]]),
             mz=[195.0877, 303.0499, 149.0086], rt=[3.2, 5.1, 0.9])


def _build(args, capsys):
    code = main(["build-graph", *args])
    return code, capsys.readouterr()


def test_mwtab_text_and_json_give_the_same_graph_with_factor_labels_and_molecule_details(tmp_path, capsys):
    import mwtab

    from jaxfood.graph.hetero_graph import load_graph, molecule_details

    text = write_mwtab(tmp_path / "study.txt", **SMALL)
    study = next(mwtab.read_files(str(text)))
    with open(tmp_path / "study.json", "w") as fh:
        study.write(fh, file_format="json")
    graphs = []
    for src in (text, tmp_path / "study.json"):
        out = tmp_path / f"g_{src.suffix[1:]}"
        code, captured = _build(["--mwtab", str(src), "--label-column", "Origin", "--out", str(out),
                                 "--split", "0.5,0.25,0.25"], capsys)
        assert code == 0, captured.err
        graphs.append(load_graph(out))
    for g in graphs:
        assert g.meta.node_ids[schema.FOOD] == ["France", "Italy"]
        assert g.meta.node_ids[schema.SAMPLE] == SMALL["samples"]
        assert g.meta.extra["label_column"] == "Origin"
        assert g.edges[schema.CONTAINS].num_edges == int(np.sum(SMALL["areas"] > 0))  # empty cells: not detected
        d = molecule_details(g, g.meta.node_ids[schema.MOLECULE].index("quercetin"))
        assert d == {"molecule_id": "quercetin", "mz": pytest.approx(303.0499), "rt": pytest.approx(5.1),
                     "annotation": "quercetin"}
    np.testing.assert_array_equal(graphs[0].edges[schema.CONTAINS].attributes, graphs[1].edges[schema.CONTAINS].attributes)


@pytest.mark.parametrize("change, args, message", [
    ({}, [], "factors ['Origin', 'Year']; pass --label-column"),
    ({}, ["--label-column", "Region"], "--label-column 'Region' is not a factor of the study"),
    ({"areas": np.array([[1.0, -2.0, 1.0, 1.0]] * 3)}, ["--label-column", "Origin"], "is not a peak area >= 0"),
    ({"metabolites": ["a", "a", "b"]}, ["--label-column", "Origin"], "metabolite 'a' appears twice"),
])
def test_bad_studies_exit_2_with_one_line(tmp_path, capsys, change, args, message):
    path = write_mwtab(tmp_path / "study.txt", **{**SMALL, **change})
    code, captured = _build(["--mwtab", str(path), "--out", str(tmp_path / "g"), *args], capsys)
    lines = captured.err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "study.txt" in lines[0], lines
    assert message in lines[0]
    assert not (tmp_path / "g").exists()


def test_missing_package_names_the_extra(tmp_path, capsys, monkeypatch):
    path = write_mwtab(tmp_path / "study.txt", **SMALL)
    monkeypatch.setitem(sys.modules, "mwtab", None)  # import mwtab -> ImportError
    code, captured = _build(["--mwtab", str(path), "--label-column", "Origin", "--out", str(tmp_path / "g")], capsys)
    assert code == 2 and "needs the mwtab package" in captured.err and ".[mwtab]" in captured.err


def test_mwtab_replaces_feature_table_and_metadata(tmp_path, capsys):
    code, captured = _build(["--mwtab", "x.txt", "--feature-table", "f.csv", "--out", str(tmp_path / "g")], capsys)
    assert code == 2 and "--mwtab replaces --feature-table and --metadata" in captured.err
