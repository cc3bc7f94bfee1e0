"""The whole-graph evaluation is fitted to the memory before a run trains (jaxfood.eval.memory):
scorers that do not fit are left out (the headline falls back), a forward pass that does not fit is
a one-line error before anything is written. The toy graph stands in for a graph of tens of
millions of edges: the edge threshold is lowered and the memory available is set."""

from __future__ import annotations

import json

import jax
import pytest
import yaml
from conftest import make_toy_graph
from test_finetune import SMALL

from jaxfood import cli
from jaxfood.config import load_config
from jaxfood.eval import memory
from jaxfood.graph.hetero_graph import save_graph
from jaxfood.graph.splits import prepare_graph
from jaxfood.models.heads import make_multitask_model
from jaxfood.train.finetune import FinetuneConfig

SCORERS = ["input_gradient", "class_attention", "gat_attention"]


@pytest.fixture(scope="module")
def measured():
    """The model of SMALL on the toy graph and every evaluation program's bytes, measured with
    room for all of them (and the edge threshold at 0, so that the toy graph is measured)."""
    cfg = load_config(FinetuneConfig(), None, SMALL)
    graph = prepare_graph(make_toy_graph())
    model = make_multitask_model(graph, cfg.encoder, cfg.heads)
    params = model.init(jax.random.key(0), graph)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(memory, "CHECK_ABOVE_EDGES", 0)
        headline, scorers, needs = memory.fit_scorers(model, params, graph, "input_gradient", SCORERS, 3,
                                                      available=1 << 40)
    assert (headline, scorers) == ("input_gradient", tuple(SCORERS))
    return model, params, graph, needs


def test_the_gradient_scorer_needs_the_most_and_is_left_out_where_it_does_not_fit(measured, monkeypatch):
    model, params, graph, needs = measured
    # A backward pass through the model holds more than any forward-only program.
    rest = max(v for k, v in needs.items() if k != "input_gradient")
    assert needs["input_gradient"] > rest > 0
    monkeypatch.setattr(memory, "CHECK_ABOVE_EDGES", 0)
    between = int((rest + needs["input_gradient"]) / 2 / memory.HEADROOM)  # usable: HEADROOM of it
    headline, scorers, _ = memory.fit_scorers(model, params, graph, "input_gradient", SCORERS, 3, available=between)
    assert headline == memory.FALLBACK[0] == "intensity_attribution"
    assert scorers == ("class_attention", "gat_attention")
    with pytest.raises(memory.EvaluationMemoryError, match=r"^graph: evaluating the whole graph \(predict\) needs"):
        memory.fit_scorers(model, params, graph, "input_gradient", SCORERS, 3, available=needs["predict"] - 1)


def test_small_graphs_are_not_measured(measured):
    model, params, graph, _ = measured
    assert memory.fit_scorers(model, params, graph, "input_gradient", SCORERS, 3, available=1) == (
        "input_gradient", tuple(SCORERS), {})


def _finetune_args(tmp_path, workdir, extra=()):
    save_graph(make_toy_graph(), tmp_path / "graph")
    args = ["finetune", "--graph", str(tmp_path / "graph"), "--workdir", str(workdir), "--quiet"]
    for item in [s for s in SMALL if not s.startswith("scorers=")] + [f"scorers=[{', '.join(SCORERS)}]", *extra]:
        args += ["--set", item]
    return args


def test_a_run_records_and_reports_the_scorers_that_fit(measured, tmp_path, monkeypatch):
    _, _, _, needs = measured
    rest = max(v for k, v in needs.items() if k != "input_gradient")
    between = int((rest + needs["input_gradient"]) / 2 / memory.HEADROOM)
    monkeypatch.setattr(memory, "CHECK_ABOVE_EDGES", 0)
    monkeypatch.setattr(memory, "available_bytes", lambda: between)
    workdir = tmp_path / "w"
    assert cli.main(_finetune_args(tmp_path, workdir, ["salient_scorer=input_gradient"])) == 0
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    assert config["salient_scorer"] == "intensity_attribution"
    assert config["scorers"] == ["class_attention", "gat_attention"]
    salient = json.loads((workdir / "metrics.json").read_text())["salient_molecules"]
    assert salient["scorer"] == "intensity_attribution"
    assert set(salient["per_scorer"]) == {"intensity_attribution", "class_attention", "gat_attention"}


def test_a_forward_pass_that_does_not_fit_stops_the_run_before_it_writes(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(memory, "CHECK_ABOVE_EDGES", 0)
    monkeypatch.setattr(memory, "available_bytes", lambda: 1000)
    workdir = tmp_path / "w"
    assert cli.main(_finetune_args(tmp_path, workdir)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: graph: evaluating the whole graph (predict) needs"), err
    assert not workdir.exists() or not any(workdir.iterdir())
