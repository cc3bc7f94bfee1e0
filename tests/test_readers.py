"""Readers: the real formats in tests/data, and every bad input with the message it must give."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

from jaxfood.data.build import BuildWarning, build_graph
from jaxfood.data.csv_input import DataWarning
from jaxfood.data.molecule_files import read_molecule_embeddings
from jaxfood.data.nutrients import parse_nutrient_header, read_nutrients
from jaxfood.data.readers import read_feature_table, read_metadata, read_tables
from jaxfood.errors import UserError

DATA = Path(__file__).parent / "data"
SMALL = DATA / "small"
FDC = DATA / "fdc"


@pytest.fixture
def small(tmp_path) -> Path:
    """A writable copy of tests/data/small (each test edits one file)."""
    dst = tmp_path / "small"
    shutil.copytree(SMALL, dst)
    return dst


def edit(path: Path, old: str, new: str, count: int = 1) -> Path:
    text = path.read_text()
    assert old in text, old
    path.write_text(text.replace(old, new, count))
    return path


def raises(match_parts, fn, *args, **kwargs) -> str:
    """Calls ``fn``; asserts a one-line UserError containing every part of ``match_parts``."""
    with pytest.raises(UserError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg
    for part in match_parts:
        assert str(part) in msg, (part, msg)
    return msg


def read_small(d: Path, **kwargs):
    return read_tables(d / "feature_table.csv", d / "metadata.csv", d / "nutrients.csv", **kwargs)


# ---- good input ---------------------------------------------------------------------------------
def test_feature_table_csv_is_read_sparse_in_file_order():
    ft = read_feature_table(SMALL / "feature_table.csv")
    assert ft.molecule_ids == ["101", "102", "103", "104", "105", "106"]
    assert ft.sample_ids == [f"S{i:02d}.mzML" for i in range(1, 11)]
    dense = np.zeros((10, 6))
    dense[ft.sample_index, ft.molecule_index] = ft.intensity
    assert dense[0, 0] == 12000 and dense[9, 5] == 3300 and dense[4, 0] == 0
    assert ft.intensity.shape == (20,) and np.all(ft.intensity > 0)
    np.testing.assert_allclose(ft.molecule_mz[:2], [181.0707, 243.0863])
    np.testing.assert_allclose(ft.molecule_rt[-1], 7.70)


def test_feature_table_npz_matches_csv(tmp_path):
    ft = read_feature_table(SMALL / "feature_table.csv")
    path = tmp_path / "ft.npz"
    np.savez(path, sample_ids=np.asarray(ft.sample_ids), molecule_ids=np.asarray(ft.molecule_ids),
             sample_index=ft.sample_index.astype(np.int32), molecule_index=ft.molecule_index.astype(np.int32),
             intensity=ft.intensity.astype(np.float32), mz=ft.molecule_mz, rt=ft.molecule_rt)
    z = read_feature_table(path)
    assert z.sample_ids == ft.sample_ids and z.molecule_ids == ft.molecule_ids
    np.testing.assert_array_equal(z.sample_index, ft.sample_index)
    np.testing.assert_array_equal(z.intensity, ft.intensity)
    np.testing.assert_array_equal(z.molecule_mz, ft.molecule_mz)


def test_metadata_and_nutrients():
    md = read_metadata(SMALL / "metadata.csv")
    assert md.food_labels[:5] == ["apple"] * 4 + ["banana"]
    assert md.hierarchy["sample_type_group4"][-1] == "cheese"
    assert md.ndb_number[0] == "9003"
    nt = read_nutrients(SMALL / "nutrients.csv")
    assert nt.foods == ["apple", "banana", "cheddar", "kiwi"]
    assert nt.nutrient_names[2] == "Total lipid (fat)" and nt.units[2] == "g"
    assert nt.column_names[-1] == "Vitamin D (D2 + D3) (ug)"
    assert np.isnan(nt.values[1, 4]) and nt.values[2, 3] == 721
    assert nt.food_category[2] == "Dairy and Egg Products"
    assert nt.provenance["fdc_id"][0] == "171688"


@pytest.mark.parametrize("header,expected", [("Protein (g)", ("Protein", "g")),
                                             ("Total lipid (fat) (g)", ("Total lipid (fat)", "g")),
                                             ("Vitamin D (D2 + D3) (ug)", ("Vitamin D (D2 + D3)", "ug"))])
def test_nutrient_header(header, expected):
    assert parse_nutrient_header(header) == expected


def test_fdc_directory_is_joined_through_ndb_number():
    md = read_metadata(SMALL / "metadata.csv")
    nt = read_nutrients(FDC, metadata=md)
    assert nt.foods == ["apple", "banana", "cheddar"]  # kiwi's NDB is not in the metadata
    # columns by nutrient id: 1003, 1004, 1008, 1062, 1087, 1110
    assert nt.column_names == ["Protein (g)", "Total lipid (fat) (g)", "Energy (kcal)", "Energy (kJ)",
                               "Calcium, Ca (mg)", "Vitamin D (D2 + D3), International Units (IU)"]
    np.testing.assert_allclose(nt.values[2, :5], [24.9, 33.1, 403, 1684, 721])
    assert np.isnan(nt.values[0, 5]) and nt.values[2, 5] == 24
    assert nt.food_category == ["Fruits and Fruit Juices", "Fruits and Fruit Juices", "Dairy and Egg Products"]
    assert nt.provenance["fdc_id"] == ["171688", "173944", "173414"]
    assert nt.provenance["usda_data_type"][1] == "sr_legacy_food"


def test_fdc_without_metadata_lists_every_sr_legacy_food():
    nt = read_nutrients(FDC)
    assert sorted(nt.foods) == ["1009", "9003", "9040", "9148"]


def test_embeddings_with_ids_in_another_order(tmp_path):
    vecs = np.load(SMALL / "molecule_embeddings.npy")
    np.save(tmp_path / "e.npy", vecs[::-1])
    (tmp_path / "ids.txt").write_text("\n".join(["106", "105", "104", "103", "102", "101"]) + "\n")
    emb = read_molecule_embeddings(tmp_path / "e.npy", tmp_path / "ids.txt")
    assert emb.molecule_ids[0] == "106"
    np.testing.assert_array_equal(emb.vectors[0], vecs[5])
    # the default ids file is molecule_ids.txt beside the matrix
    assert read_molecule_embeddings(SMALL / "molecule_embeddings.npy").molecule_ids[0] == "101"


def test_read_tables_clean_input_gives_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tables = read_small(SMALL, molecule_embeddings=SMALL / "molecule_embeddings.npy")
        build_graph(tables)
    assert tables.metadata.sample_ids == tables.features.sample_ids


def test_metadata_tsv_and_extension_insensitive_match(small):
    text = (small / "metadata.csv").read_text().replace(",", "\t").replace(".mzML", ".mzXML")
    (small / "metadata.tsv").write_text(text)
    tables = read_tables(small / "feature_table.csv", small / "metadata.tsv", small / "nutrients.csv")
    assert tables.metadata.food_labels[-1] == "cheddar" and len(tables.features.sample_ids) == 10


# ---- bad input: errors naming file, column/line, expectation -------------------------------------
def test_missing_file():
    raises(["nope.csv", "not found"], read_feature_table, DATA / "nope.csv")


def test_feature_table_missing_row_id(small):
    p = edit(small / "feature_table.csv", "row ID,", "rowid,")
    raises([str(p), "missing column 'row ID'"], read_feature_table, p)


def test_feature_table_without_peak_area_columns(tmp_path):
    p = tmp_path / "ft.csv"
    p.write_text("row ID,row m/z,row retention time,S1 Peak height\n1,100,1,5\n")
    raises([str(p), "Peak area"], read_feature_table, p)


def test_non_numeric_intensity(small):
    p = edit(small / "feature_table.csv", "102,243.0863,2.45,0,0,0", "102,243.0863,2.45,0,0,abc")
    raises([str(p), "column 'S03.mzML Peak area'", "line 3", "'abc'", "not a peak area"], read_feature_table, p)


def test_negative_intensity(small):
    p = edit(small / "feature_table.csv", "104,100.0757,0.80,500", "104,100.0757,0.80,-500")
    raises([str(p), "column 'S01.mzML Peak area'", "line 5", "negative"], read_feature_table, p)


def test_infinite_intensity(small):
    p = edit(small / "feature_table.csv", "104,100.0757,0.80,500", "104,100.0757,0.80,inf")
    raises([str(p), "column 'S01.mzML Peak area'", "line 5", "infinite"], read_feature_table, p)


def test_empty_intensity_cells_are_a_counted_warning(small):
    p = edit(small / "feature_table.csv", "105,150.0583,3.30,2500,2500,0", "105,150.0583,3.30,,,0")
    with pytest.warns(DataWarning, match=r"2 empty or NaN peak area cell\(s\) in 2 column\(s\)") as rec:
        ft = read_feature_table(p)
    assert str(p) in str(rec[0].message)
    assert ft.intensity.shape == (18,)  # the two empty cells are not detections


def test_duplicate_sample_column(small):
    p = edit(small / "feature_table.csv", "S02.mzML Peak area", "S01.mzML Peak area")
    raises([str(p), "'S01.mzML Peak area'", "more than once"], read_feature_table, p)


def test_duplicate_sample_after_stripping(small):
    p = edit(small / "feature_table.csv", "S02.mzML Peak area", "S01.mzML  Peak area")
    raises([str(p), "same sample file 'S01.mzML'"], read_feature_table, p)


def test_duplicate_row_id(small):
    p = edit(small / "feature_table.csv", "102,243", "101,243")
    raises([str(p), "column 'row ID'", "line 3", "duplicate row ID '101'", "line 2"], read_feature_table, p)


def test_empty_feature_table(tmp_path):
    p = tmp_path / "ft.csv"
    p.write_text("row ID,row m/z,row retention time,S1 Peak area\n")
    raises([str(p), "no data rows"], read_feature_table, p)
    p.write_text("")
    raises([str(p), "empty"], read_feature_table, p)


def test_metadata_duplicate_filename(small):
    p = edit(small / "metadata.csv", "S02.mzML,", "S01.mzML,")
    raises([str(p), "column 'filename'", "line 3", "duplicate sample file name 'S01.mzML'"], read_metadata, p)


def test_metadata_missing_label_column(small):
    p = small / "metadata.csv"
    raises([str(p), "missing food label column 'sample_type_group6'", "sample_type_group5", "--label-column"],
           read_metadata, p, label_column="sample_type_group6")


def test_metadata_missing_filename_column(small):
    p = edit(small / "metadata.csv", "filename,", "file,")
    raises([str(p), "missing column 'filename'"], read_metadata, p)


def test_samples_absent_from_metadata_are_dropped_with_a_count(small):
    md = small / "metadata.csv"
    lines = md.read_text().splitlines()
    md.write_text("\n".join(lines[:-2]) + "\n")  # S09, S10 gone
    with pytest.warns(DataWarning, match=r"2 sample\(s\) absent from .*metadata.csv.*'S09.mzML', 'S10.mzML'"):
        tables = read_small(small)
    assert tables.features.sample_ids == [f"S{i:02d}.mzML" for i in range(1, 9)]
    assert tables.features.sample_index.max() == 7


def test_metadata_samples_without_spectra_are_dropped_with_a_count(small):
    edit(small / "metadata.csv", "S10.mzML,food,animal,dairy,cheese,cheddar,1009",
         "S10.mzML,food,animal,dairy,cheese,cheddar,1009\nS11.mzML,food,animal,dairy,cheese,cheddar,1009")
    with pytest.warns(DataWarning, match=r"1 sample\(s\) have no '<filename> Peak area' column.*'S11.mzML'"):
        read_small(small)


def test_no_sample_in_metadata_is_an_error(small):
    p = edit(small / "metadata.csv", "S", "X", count=100)
    raises([str(p), "column 'filename'", "matches none of the 10 sample columns"], read_small, small)


def test_foods_without_nutrients_warn_and_get_mean_profile(small):
    edit(small / "nutrients.csv", "banana,", "plantain,")
    tables = read_small(small)
    with pytest.warns(BuildWarning, match=r"1 food\(s\) of .*metadata.csv column 'sample_type_group5' have no nutrients.*'banana'"):
        g = build_graph(tables)
    banana = g.meta.node_ids["Food"].index("banana")
    np.testing.assert_array_equal(g.food_nutrients[banana], 0.0)
    hn = g.edges["Food|has_nutrient|Nutrient"]
    assert banana not in set(np.asarray(hn.senders).tolist())


def test_no_food_with_nutrients_is_an_error(small):
    p = small / "nutrients.csv"
    p.write_text(p.read_text().replace("apple,", "x1,").replace("banana,", "x2,").replace("cheddar,", "x3,"))
    raises([str(p), "none of the 3 food labels", "column 'sample_type_group5'", "column 'food'"], read_small, small)


def test_unparseable_nutrient_header(small):
    p = edit(small / "nutrients.csv", "Protein (g)", "Protein")
    raises([str(p), "column 'Protein'", "expected 'Name (unit)'"], read_nutrients, p)


def test_non_numeric_and_negative_nutrient_values(small):
    p = edit(small / "nutrients.csv", "89,1.09", "89,lots")
    raises([str(p), "column 'Protein (g)'", "line 3", "'lots'", "not an amount per 100 g"], read_nutrients, p)
    p.write_text(SMALL.joinpath("nutrients.csv").read_text().replace("89,1.09", "89,-1.09"))
    raises([str(p), "column 'Protein (g)'", "line 3", "negative"], read_nutrients, p)


def test_nutrients_missing_food_column_and_duplicate_food(small):
    p = edit(small / "nutrients.csv", "food,food_category", "name,food_category")
    raises([str(p), "missing column 'food'"], read_nutrients, p)
    p.write_text(SMALL.joinpath("nutrients.csv").read_text().replace("kiwi,", "apple,"))
    raises([str(p), "column 'food'", "line 5", "duplicate food 'apple'"], read_nutrients, p)


def test_fdc_needs_ndb_number_and_its_files(small, tmp_path):
    md = read_metadata(small / "metadata.csv")
    md.ndb_number = None
    raises(["metadata.csv", "missing column 'ndb_number'"], read_nutrients, FDC, metadata=md)
    fdc = tmp_path / "fdc"
    shutil.copytree(FDC, fdc)
    (fdc / "food_nutrient.csv").unlink()
    raises([str(fdc / "food_nutrient.csv"), "not found"], read_nutrients, fdc, metadata=read_metadata(SMALL / "metadata.csv"))


def test_fdc_bad_amount_names_file_column_line(tmp_path):
    fdc = tmp_path / "fdc"
    shutil.copytree(FDC, fdc)
    edit(fdc / "food_nutrient.csv", '"173944","1004","0.33"', '"173944","1004","n/a"')
    raises([str(fdc / "food_nutrient.csv"), "column 'amount'", "'n/a'"], read_nutrients, fdc,
           metadata=read_metadata(SMALL / "metadata.csv"))


def test_molecules_without_embedding_warn_and_get_zero_vectors(small):
    vecs = np.load(SMALL / "molecule_embeddings.npy")
    np.save(small / "e.npy", vecs[:4])
    (small / "ids.txt").write_text("101\n102\n103\n104\n")
    tables = read_small(small, molecule_embeddings=small / "e.npy", molecule_ids=small / "ids.txt")
    with pytest.warns(BuildWarning, match=r"2 of 6 molecule\(s\) .* have no embedding \('105', '106'\)"):
        g = build_graph(tables)
    x = np.asarray(g.node_features["Molecule"])
    np.testing.assert_array_equal(x[:4], vecs[:4])
    np.testing.assert_array_equal(x[4:], 0.0)


def test_embedding_ids_count_mismatch(small):
    (small / "ids.txt").write_text("101\n102\n")
    raises([str(small / "ids.txt"), "2 ids, expected 6"], read_molecule_embeddings, small / "molecule_embeddings.npy",
           small / "ids.txt")


def test_embedding_with_nan(small):
    vecs = np.load(SMALL / "molecule_embeddings.npy")
    vecs[3, 1] = np.nan
    np.save(small / "molecule_embeddings.npy", vecs)
    raises([str(small / "molecule_embeddings.npy"), "row 3", "NaN"], read_molecule_embeddings,
           small / "molecule_embeddings.npy")


def test_embeddings_no_matching_ids(small):
    (small / "molecule_ids.txt").write_text("a\nb\nc\nd\ne\nf\n")
    raises(["molecule_embeddings.npy", "none of its molecule ids", "'row ID'"], read_small, small,
           molecule_embeddings=small / "molecule_embeddings.npy")


def test_npz_bad_input(tmp_path):
    p = tmp_path / "ft.npz"
    np.savez(p, sample_ids=np.asarray(["a"]), molecule_ids=np.asarray(["1", "2"]), sample_index=np.array([0]),
             intensity=np.array([1.0]))
    raises([str(p), "missing array 'molecule_index'"], read_feature_table, p)
    np.savez(p, sample_ids=np.asarray(["a"]), molecule_ids=np.asarray(["1", "2"]), sample_index=np.array([0]),
             molecule_index=np.array([2]), intensity=np.array([1.0]))
    raises([str(p), "'molecule_index'", "outside [0, 2)"], read_feature_table, p)
    np.savez(p, sample_ids=np.asarray(["a"]), molecule_ids=np.asarray(["1", "2"]), sample_index=np.array([0]),
             molecule_index=np.array([1]), intensity=np.array([-1.0]))
    raises([str(p), "'intensity'", "entry 0", "negative"], read_feature_table, p)


def test_unlabelled_sample_is_kept_without_label(small):
    edit(small / "metadata.csv", "S01.mzML,food,plant,fruit,fleshy fruit,apple,9003", "S01.mzML,food,plant,fruit,fleshy fruit,,9003")
    tables = read_small(small)
    with pytest.warns(BuildWarning, match=r"1 sample\(s\) have an empty 'sample_type_group5' \('S01.mzML'\)"):
        g = build_graph(tables)
    assert int(g.sample_food[0]) == -1
    assert 0 not in set(np.asarray(g.edges["Sample|is_instance_of|Food"].senders).tolist())
