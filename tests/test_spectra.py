"""MS/MS spectra: ``build-graph --spectra F.mgf [--spectra-network]`` -> Molecule features and ``is_similar_to``.

The MGF files are written here, in the layout GNPS feature-based molecular networking exports
(``FEATURE_ID``/``SCANS`` = the table's ``row ID``), for the small table of ``tests/data/small``
(molecules 101..106): 101 and 102 share eight fragments with different intensities (one network
edge with a cosine computed below with numpy), 103 has four other fragments, 105 has one peak
left after cleaning (removed: zero row), 104 and 106 have no spectrum, 999 is not in the table.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from jaxfood.cli import main
from jaxfood.graph import schema

SMALL = Path(__file__).parent / "data" / "small"
FILES = ["--feature-table", str(SMALL / "feature_table.csv"), "--metadata", str(SMALL / "metadata.csv")]

FRAGMENTS = [55.0178, 69.0335, 85.0284, 97.0284, 115.0390, 127.0390, 145.0495, 163.0601]
PEAKS = {
    "101": (181.0707, FRAGMENTS, [80.0, 150.0, 1000.0, 300.0, 420.0, 220.0, 610.0, 900.0]),
    "102": (243.0863, FRAGMENTS, [100.0, 120.0, 800.0, 350.0, 500.0, 200.0, 700.0, 1000.0]),
    "103": (313.1400, [91.0542, 119.0491, 147.0441, 175.0390], [300.0, 1000.0, 500.0, 200.0]),
    "105": (150.0583, [104.0495, 132.0444], [1000.0, 5.0]),  # 5/1000 < 1 %: one peak left, removed
    "999": (500.0, [100.0, 200.0, 300.0], [1.0, 2.0, 3.0]),
}


def mgf(peaks=PEAKS, key="FEATURE_ID") -> str:
    blocks = []
    for fid, (precursor, mz, intensity) in peaks.items():
        lines = ["BEGIN IONS", f"{key}={fid}", f"PEPMASS={precursor}", "CHARGE=1+", "MSLEVEL=2"]
        lines += [f"{m} {a}" for m, a in zip(mz, intensity)]
        blocks.append("\n".join(lines + ["END IONS"]))
    return "\n\n".join(blocks) + "\n"


def build(tmp_path, capsys, text=None, extra=(), name="spectra.mgf"):
    path = tmp_path / name
    if text is not None:
        path.write_text(text) if isinstance(text, str) else path.write_bytes(text)
    out = tmp_path / "g"
    code = main(["build-graph", "--out", str(out), *FILES, "--spectra", str(path), *extra])
    return code, out, capsys.readouterr()


def expected_binned(fid: str) -> np.ndarray:
    """1 Da bins over [0, 2000), intensities relative to the base peak, sqrt, L2 (numpy, by hand)."""
    _, mz, intensity = PEAKS[fid]
    v = np.zeros(2000)
    for m, a in zip(mz, intensity):
        v[int(m)] += a / max(intensity)
    v = np.sqrt(v)
    return v / np.linalg.norm(v)


@pytest.fixture(scope="module")
def graph_dir(tmp_path_factory):
    """The graph with spectra features, the spectral network and nutrients (built once)."""
    import warnings

    root = tmp_path_factory.mktemp("spectra")
    (root / "spectra.mgf").write_text(mgf())
    out = root / "graph"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main(["build-graph", "--out", str(out), *FILES, "--nutrients", str(SMALL / "nutrients.csv"),
                     "--spectra", str(root / "spectra.mgf"), "--spectra-network"])
    assert code == 0
    return out


def test_binning_matches_numpy_and_the_reduction_keeps_inner_products():
    from jaxfood.data.spectra import binned_spectra, reduce_spectra

    ids = ["101", "102", "103"]
    binned = binned_spectra([np.asarray(PEAKS[i][1]) for i in ids],
                            [np.asarray(PEAKS[i][2]) / max(PEAKS[i][2]) for i in ids])
    assert binned.shape == (3, 2000)
    for row, fid in zip(binned, ids):
        np.testing.assert_allclose(row, expected_binned(fid), atol=1e-12)
    reduced, record = reduce_spectra(binned)
    # Three independent spectra: full rank, so the projection keeps every inner product.
    assert record["width"] == 3 and record["explained_variance"] == pytest.approx(1.0)
    np.testing.assert_allclose(reduced @ reduced.T, binned @ binned.T, atol=1e-10)
    again, _ = reduce_spectra(binned.copy())
    np.testing.assert_array_equal(reduced, again)  # deterministic, signs included
    capped, record = reduce_spectra(binned, max_width=2)
    assert capped.shape == (3, 2) and record["explained_variance"] < 1.0


def test_spectra_become_molecule_features_zero_rows_where_missing(graph_dir):
    from jaxfood.graph.hetero_graph import load_graph

    graph = load_graph(graph_dir)
    ids = graph.meta.node_ids[schema.MOLECULE]
    x = np.asarray(graph.node_features[schema.MOLECULE])
    assert x.shape == (6, 3)
    has = {m: bool(np.any(x[i] != 0)) for i, m in enumerate(ids)}
    assert has == {"101": True, "102": True, "103": True, "104": False, "105": False, "106": False}
    # Features keep the binned spectra's geometry: inner products equal those of the numpy vectors.
    rows = [ids.index(m) for m in ("101", "102", "103")]
    binned = np.stack([expected_binned(m) for m in ("101", "102", "103")])
    np.testing.assert_allclose(x[rows] @ x[rows].T, binned @ binned.T, atol=1e-5)
    assert graph.meta.feature_names[schema.MOLECULE] == ["spectrum_0", "spectrum_1", "spectrum_2"]
    summary = json.loads((graph_dir / "summary.json").read_text())
    features = summary["molecule_features"]
    assert features["source"] == "spectra" and features["file"].endswith("spectra.mgf")
    assert features["width"] == 3 and features["molecules_with_spectrum"] == 3
    assert features["molecules_without_features"] == 3
    assert "Molecule features" not in summary["absent"]
    assert graph.meta.extra["sources"]["spectra"].endswith("spectra.mgf")
    assert graph.meta.extra["sources"]["molecule_embeddings"] is None


def test_spectral_network_edge_has_the_cosine_of_matchms_and_numpy(graph_dir):
    from matchms import Spectrum
    from matchms.similarity import CosineGreedy

    from jaxfood.graph.hetero_graph import load_graph

    graph = load_graph(graph_dir)
    ids = graph.meta.node_ids[schema.MOLECULE]
    e = graph.edges[schema.IS_SIMILAR_TO]
    pairs = {(ids[s], ids[r]): float(a[0]) for s, r, a in zip(e.senders, e.receivers, np.asarray(e.attributes))}
    a, b = np.asarray(PEAKS["101"][2]), np.asarray(PEAKS["102"][2])
    cosine = a @ b / np.linalg.norm(a) / np.linalg.norm(b)  # the same eight fragments: every peak matches
    assert pairs == pytest.approx({("101", "102"): cosine}, abs=1e-6)
    spectra = [Spectrum(mz=np.asarray(PEAKS[f][1]), intensities=np.asarray(PEAKS[f][2]),
                        metadata={"precursor_mz": PEAKS[f][0]}) for f in ("101", "102")]
    score = CosineGreedy().pair(*spectra)
    assert float(score["score"]) == pytest.approx(cosine) and int(score["matches"]) == 8
    rev = graph.edges[schema.reverse_key(schema.IS_SIMILAR_TO)]
    assert (ids[int(rev.senders[0])], ids[int(rev.receivers[0])]) == ("102", "101")
    summary = json.loads((graph_dir / "summary.json").read_text())
    assert summary["edges"][schema.IS_SIMILAR_TO] == 1 and schema.IS_SIMILAR_TO not in summary["absent"]
    assert "CosineGreedy >= 0.7" in graph.meta.extra["sources"]["molecular_network"]


@pytest.mark.parametrize("min_matched_peaks, min_cosine", [(6, 0.7), (3, 0.3), (5, 0.5)])
def test_candidate_pairs_never_miss_a_pair_matchms_links(min_matched_peaks, min_cosine):
    """The prefilter is an upper bound: on random spectra it keeps every pair the full matrix links."""
    from matchms import Spectrum, calculate_scores
    from matchms.similarity import CosineGreedy

    from jaxfood.data.spectra import Spectra, candidate_pairs, spectral_network

    rng = np.random.default_rng(0)
    base = np.sort(rng.uniform(50, 300, 12))
    mz, inten = [], []
    for _ in range(14):  # variations of one spectrum: many pairs near the thresholds
        keep = rng.random(12) < 0.75
        mz.append(np.sort(base[keep] + rng.uniform(-0.09, 0.09, keep.sum())))
        inten.append(rng.uniform(0.05, 1.0, keep.sum()))
    spectra = Spectra(ids=[str(i) for i in range(14)], mz=mz, intensities=inten, precursor_mz=np.full(14, 400.0))
    objects = [Spectrum(mz=m, intensities=a, metadata={"precursor_mz": 400.0}) for m, a in zip(mz, inten)]
    full = calculate_scores(objects, objects, CosineGreedy(), is_symmetric=True).to_array()
    score, matches = full["CosineGreedy_score"], full["CosineGreedy_matches"]
    linked = {(i, j) for i in range(14) for j in range(i + 1, 14)
              if score[i, j] >= min_cosine and matches[i, j] >= min_matched_peaks}
    assert linked  # the check is not vacuous
    candidates = {tuple(p) for p in candidate_pairs(spectra, min_matched_peaks, min_cosine).tolist()}
    assert linked <= candidates
    assert len(candidates) < 14 * 13 // 2 or min_cosine < 0.5  # and it prunes
    sim = spectral_network(spectra, min_cosine=min_cosine, min_matched_peaks=min_matched_peaks)
    assert {(int(s), int(t)) for s, t in zip(sim.source_ids, sim.target_ids)} == linked


def test_build_warns_with_counts_and_spectra_ids_from_scans(tmp_path, capsys):
    ms1 = "BEGIN IONS\nSCANS=104\nPEPMASS=100.0757\nMSLEVEL=1\n100.0757 1000\n101.08 50\n102.08 20\nEND IONS\n\n"
    repeat = mgf({"101": PEAKS["103"]}, key="SCANS")  # a second spectrum of 101: the first is kept
    code, out, captured = build(tmp_path, capsys, ms1 + mgf(key="SCANS") + "\n" + repeat)
    assert code == 0, captured.err
    assert "1 spectrum(s) repeat the id of an earlier one" in captured.err
    assert "1 spectrum id(s) are not in" in captured.err and "'999'" in captured.err
    assert "1 spectrum(s) removed by cleaning" in captured.err
    assert "3 of 6 molecule(s)" in captured.err and "have no spectrum" in captured.err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["molecule_features"]["width"] == 3  # MS1 of 104 skipped, the repeat of 101 ignored
    assert schema.IS_SIMILAR_TO in summary["absent"]  # no --spectra-network


def _one_error(code, out, captured, *fragments):
    lines = captured.err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    assert not out.exists()


@pytest.mark.parametrize("text, fragments", [
    (None, ["spectra.mgf", "not found"]),
    ("row ID,Cosine\n1,0.5\n", ["spectra.mgf", "no spectrum found", "expected an MGF file"]),
    (b"\xff\xfe\x00binary", ["spectra.mgf", "not a text file", "expected an MGF file"]),
    ("BEGIN IONS\nFEATURE_ID=101\nPEPMASS=100\n12 ab\nEND IONS\n", ["spectra.mgf", "cannot be read as MGF"]),
    ("BEGIN IONS\nPEPMASS=100\n12 1\n13 1\n14 1\nEND IONS\n", ["spectra.mgf", "has FEATURE_ID or SCANS"]),
    (mgf({"7": PEAKS["999"], "8": PEAKS["101"]}), ["spectra.mgf", "none of its spectrum ids match", "'row ID'"]),
    (mgf({"105": PEAKS["105"]}), ["spectra.mgf", "no spectrum is left after cleaning"]),
], ids=["missing", "csv", "binary", "malformed", "no-ids", "no-match", "all-cleaned"])
def test_bad_spectra_files_exit_2_with_one_line_and_write_nothing(tmp_path, capsys, text, fragments):
    code, out, captured = build(tmp_path, capsys, text)
    _one_error(code, out, captured, *fragments)


@pytest.mark.parametrize("extra, fragment", [
    (["--molecule-embeddings", str(SMALL / "molecule_embeddings.npy")], "--spectra and --molecule-embeddings"),
    (["--spectra-network", "--network", str(SMALL / "metadata.csv")], "--spectra-network and --network"),
    (["--min-cosine", "0.5"], "apply only with --spectra-network"),
    (["--spectra-network", "--min-cosine", "1.5"], "--min-cosine 1.5: expected a number in [0, 1]"),
])
def test_conflicting_options_are_refused(tmp_path, capsys, extra, fragment):
    code, out, captured = build(tmp_path, capsys, mgf(), extra)
    _one_error(code, out, captured, fragment)


def test_without_matchms_the_error_names_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matchms", None)
    code, out, captured = build(tmp_path, capsys, mgf())
    _one_error(code, out, captured, '--spectra needs matchms: pip install -e ".[spectra]"')


#: The smallest model and run that exercises every command after the graph (plumbing, not accuracy).
ENCODER = ["encoder.hidden_dim=8", "encoder.num_heads=2", "encoder.embedding_dim=8", "encoder.num_layers=1"]
FINETUNE = ["steps=2", "eval_every=2", "patience=0", "scorers=[intensity_attribution]", "figures=false", "tensorboard=false",
            "heads.hidden_dim=8", "heads.pool_dim=8", "heads.attention_dim=4", "heads.projection_dim=4",
            "loss.salient_top_k=3", "salient_k=3", "stability_perturbations=0", *ENCODER]


def _settings(items):
    return [arg for item in items for arg in ("--set", item)]


@pytest.mark.slow
def test_finetune_evaluate_predict_and_embed_run_on_a_graph_with_spectra_and_spectral_network(graph_dir, tmp_path,
                                                                                             capsys):
    """finetune, evaluate, predict and embed on the graph build-graph made from the spectra (Molecule
    inputs from the spectra, the is_similar_to relation). GraphCL is left out: it would compile a
    second training step for this graph alone, and what it adds is tested elsewhere -- pretraining
    over is_similar_to edges and the `jaxfood pretrain` command in test_pretrain (which also runs
    `finetune --pretrained` to its checks), pretraining then fine-tuning in the main-job tests."""
    graph = ["--graph", str(graph_dir)]
    fine = tmp_path / "fine"
    assert main(["finetune", *graph, "--workdir", str(fine), "--quiet", *_settings(FINETUNE)]) == 0
    ckpt = str(fine / "checkpoints")
    metrics = json.loads((fine / "metrics.json").read_text())
    assert 0.0 <= metrics["food_classification"]["accuracy"] <= 1.0
    assert main(["evaluate", *graph, "--checkpoint", ckpt, "--out", str(tmp_path / "eval.json")]) == 0
    (tmp_path / "sample.csv").write_text("molecule_id,intensity\n101,12000\n102,300\n105,2500\n")
    capsys.readouterr()
    assert main(["predict", *graph, "--checkpoint", ckpt, "--sample", str(tmp_path / "sample.csv"), "--json"]) == 0
    prediction = json.loads(capsys.readouterr().out)
    assert prediction["samples"][0]["top_molecules"]
    assert main(["embed", *graph, "--checkpoint", ckpt, "--out", str(tmp_path / "emb.npz")]) == 0
    with np.load(tmp_path / "emb.npz") as emb:
        assert any(len(emb[k]) == 6 for k in emb.files)  # one row per molecule


@pytest.mark.slow
@pytest.mark.parametrize("modes", ["embedding", "default"])
def test_converter_round_trip_and_pyg_parity_with_the_spectral_network(graph_dir, tmp_path, capsys, modes):
    """An encoder of the graph (is_similar_to included) exports to the PyTorch layout and converts
    back exactly; --verify runs the PyG reference against it: with learned embeddings only (the
    original project's encoder), and with the default model's input modes (the spectra as Molecule
    features beside an embedding, Sample inputs from the intensity profile, residual layers)."""
    import jax

    from checkpoints_convert.cli import main as convert_main
    from jaxfood.config import config_to_dict
    from jaxfood.graph.hetero_graph import load_graph
    from jaxfood.models.encoder import EncoderConfig, make_encoder
    from jaxfood.train.checkpoint import save_checkpoint

    graph = load_graph(graph_dir)
    cfg = EncoderConfig(hidden_dim=8, num_heads=2, num_layers=1, embedding_dim=8, dropout=0.1)
    if modes == "default":
        cfg = dataclasses.replace(cfg, residual=True, input_modes={
            schema.SAMPLE: "profile", schema.MOLECULE: "both", schema.FOOD: "both"})
    encoder = make_encoder(graph, cfg)
    rng = np.random.default_rng(5)
    shapes = jax.eval_shape(lambda: encoder.init(jax.random.PRNGKey(0), graph))["params"]
    params = jax.tree_util.tree_map(lambda s: (0.4 * rng.normal(size=s.shape)).astype(np.float32), shapes)
    assert any(schema.IS_SIMILAR_TO in "/".join(map(str, path))
               for path, _ in jax.tree_util.tree_leaves_with_path(params))
    save_checkpoint(tmp_path / "native", 0, {"params": {"encoder": params}},
                    {"kind": "graphcl", "encoder_config": config_to_dict(cfg)})
    back = tmp_path / "encoder.pt"
    assert convert_main([str(tmp_path / "native"), "--to-torch", str(back)]) == 0
    capsys.readouterr()
    code = convert_main([str(back), "--out", str(tmp_path / "converted"), "--graph", str(graph_dir), "--verify",
                         "--to-torch", str(tmp_path / "again.pt")])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    report = json.loads((tmp_path / "converted" / "conversion_report.json").read_text())
    assert report["verify"]["passed"] and report["round_trip"]["exact"]
    from _pyg_original import torch_load

    assert any("is_similar_to" in key.lower() for key in torch_load(back)["encoder_state"])  # upstream: Is_similar_to
