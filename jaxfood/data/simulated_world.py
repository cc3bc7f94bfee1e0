"""The generative model of the simulator (:mod:`jaxfood.data.simulate` describes the simulated
world): chemical classes and roles, the study's sizes and rates (:class:`SimConfig`, :data:`PRESETS`),
the food x molecule detection probabilities and log-intensities (:func:`make_world`), the replicate
runs drawn from them (:func:`draw_samples`) and the molecules' spectral embeddings
(:func:`make_embeddings`). Every draw comes from the generator it is given.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxfood.data.tables import NutrientTable
from jaxfood.errors import UserError

CLASSES = ("lipid", "peptide", "sugar", "polyphenol", "alkaloid", "terpenoid", "steroid", "fatty_acyl",
           "amino_acid", "organic_acid", "nucleotide", "contaminant")
ROLES = ("biomarker", "category_marker", "nutrient_linked", "profile", "background", "contaminant")

#: Nutrient-linked chemical class -> nutrient name (as in ``foods_usda.csv``) its abundance follows.
NUTRIENT_LINKS = {"lipid": "Total lipid (fat)", "peptide": "Protein", "sugar": "Carbohydrate, by difference"}

# Typical (m/z low, m/z high, RT low, RT high [min]) of each class on a reversed-phase C18 run.
CLASS_RANGES = {
    "lipid": (600.0, 950.0, 9.0, 14.0),
    "peptide": (350.0, 1400.0, 2.5, 8.0),
    "sugar": (150.0, 700.0, 0.4, 2.0),
    "polyphenol": (250.0, 650.0, 3.0, 7.5),
    "alkaloid": (130.0, 420.0, 1.5, 6.0),
    "terpenoid": (200.0, 550.0, 6.0, 11.5),
    "steroid": (370.0, 480.0, 8.5, 12.5),
    "fatty_acyl": (200.0, 420.0, 7.5, 12.0),
    "amino_acid": (75.0, 250.0, 0.4, 2.5),
    "organic_acid": (90.0, 260.0, 0.5, 3.0),
    "nucleotide": (240.0, 520.0, 0.5, 2.5),
    "contaminant": (180.0, 900.0, 0.3, 14.5),
}

# Classes of food-specific molecules (biomarkers, category markers, profile) by kingdom.
_KINGDOM_CLASSES = {
    "plant": {"polyphenol": 0.3, "terpenoid": 0.2, "alkaloid": 0.15, "steroid": 0.08, "organic_acid": 0.12,
              "fatty_acyl": 0.1, "amino_acid": 0.05},
    "animal": {"amino_acid": 0.2, "fatty_acyl": 0.2, "steroid": 0.12, "nucleotide": 0.12, "organic_acid": 0.14,
               "peptide": 0.12, "lipid": 0.1},
    "fungi": {"terpenoid": 0.3, "amino_acid": 0.2, "steroid": 0.2, "nucleotide": 0.15, "organic_acid": 0.15},
}
_BACKGROUND_CLASSES = {"amino_acid": 0.35, "organic_acid": 0.35, "nucleotide": 0.3}

# Global FoodOmics-style hierarchy: USDA category -> (sample_type_group1, sample_type_group2).
_CATEGORY_GROUPS = {
    "Fruits and Fruit Juices": ("plant", "fruit"),
    "Vegetables and Vegetable Products": ("plant", "vegetable"),
    "Dairy and Egg Products": ("animal", "dairy"),
    "Finfish and Shellfish Products": ("animal", "seafood"),
    "Poultry Products": ("animal", "meat"),
    "Beef Products": ("animal", "meat"),
    "Pork Products": ("animal", "meat"),
    "Lamb, Veal, and Game Products": ("animal", "meat"),
    "Sausages and Luncheon Meats": ("animal", "meat"),
    "Cereal Grains and Pasta": ("plant", "grain"),
    "Legumes and Legume Products": ("plant", "legume"),
    "Nut and Seed Products": ("plant", "nut_seed"),
    "Beverages": ("plant", "beverage"),
    "Spices and Herbs": ("plant", "spice_herb"),
    "Fats and Oils": ("plant", "oil"),
    "Sweets": ("plant", "sweet"),
}
_FOOD_GROUPS = {"mushroom": ("fungi", "fungus"), "egg": ("animal", "egg"), "honey": ("animal", "sweet")}


@dataclasses.dataclass(frozen=True)
class SimConfig:
    """Sizes and rates of the simulated study (:mod:`jaxfood.data.simulate` describes the roles)."""

    replicates_per_food: int = 8
    num_molecules: int = 1500  # all roles; ``profile`` takes what the others leave
    biomarkers_per_food: int = 3
    markers_per_category: int = 6
    nutrient_linked_per_class: int = 100
    background: int = 140
    contaminants: int = 100
    embedding_dim: int = 32
    # detection probabilities (before the per-sample efficiency)
    biomarker_detection: float = 0.9
    biomarker_leak_category: float = 0.05
    biomarker_leak_elsewhere: float = 0.01
    biomarker_visibility: float = 0.75  # fraction of runs that show their food's biomarkers
    masked_biomarker_factor: float = 0.1  # detection multiplier of biomarkers in the other runs
    category_marker_detection: float = 0.5
    shared_jitter: float = 0.1  # food-to-food relative variation of a shared molecule's detection rate
    category_marker_level_sd: float = 0.3  # food-to-food sd of a marker's log-intensity
    nutrient_linked_detection: float = 0.75
    profile_in_category: float = 0.95  # fraction of its home category's foods a profile molecule is in
    profile_elsewhere: float = 0.01
    profile_detection: tuple[float, float] = (2.0, 3.0)  # beta(a, b) per molecule
    profile_stray_factor: float = 0.3  # detection multiplier outside the home category
    profile_level_sd: float = 0.4  # food-to-food sd of a profile molecule's log-intensity
    background_detection: float = 0.75
    contaminants_per_sample: float = 8.0
    sample_efficiency: tuple[float, float] = (6.0, 2.0)  # beta(a, b)
    # log-intensities (natural log of peak area)
    base_log_intensity: tuple[float, float] = (12.0, 1.2)  # normal(mean, sd) per molecule
    biomarker_boost: float = 1.5
    dilution_sd: float = 0.4
    peak_noise_sd: float = 0.6
    missing_embedding_fraction: float = 0.0


PRESETS = {
    "default": SimConfig(),
    # GNPS-scale: 65 foods x 80 runs = 5,200 samples, 200,000 molecules, ~11M detected peaks.
    "large": SimConfig(
        replicates_per_food=80,
        num_molecules=200_000,
        biomarkers_per_food=20,
        markers_per_category=40,
        nutrient_linked_per_class=1_000,
        background=800,
        contaminants=5_000,
        profile_elsewhere=0.01,
        profile_detection=(1.2, 8.0),
        contaminants_per_sample=40.0,
    ),
}


def food_groups(foods: list[str], categories: list[str], descriptions: list[str]) -> dict[str, list[str]]:
    """Global FoodOmics-style ``sample_type_group1..5`` per food (kingdom, kind, category, item, food)."""
    group1, group2 = zip(*(_FOOD_GROUPS.get(f, _CATEGORY_GROUPS.get(c, ("plant", "other")))
                           for f, c in zip(foods, categories)))
    group4 = [d.split(",")[0].strip().lower() for d in descriptions]
    return {"sample_type_group1": list(group1), "sample_type_group2": list(group2),
            "sample_type_group3": list(categories), "sample_type_group4": group4,
            "sample_type_group5": list(foods)}


# ---- the simulated world --------------------------------------------------------------------------
@dataclasses.dataclass
class World:
    """Food x molecule detection probabilities and log-intensities, molecules in role-block order."""

    detect: np.ndarray  # [F, M] float32
    log_intensity: np.ndarray  # [F, M] float32
    role: np.ndarray  # [M] int8 index into ROLES
    chem_class: np.ndarray  # [M] int8 index into CLASSES
    target: list[str]  # [M] what a molecule marks: food label, category, nutrient or ""
    base: np.ndarray  # [M] float32 base log-intensity
    food_category: np.ndarray  # [F] int32 index into categories
    categories: list[str]


def _sample_classes(rng: np.random.Generator, probs: dict[str, float], n: int) -> np.ndarray:
    names = list(probs)
    p = np.asarray([probs[k] for k in names])
    picks = rng.choice(len(names), size=n, p=p / p.sum())
    return np.asarray([CLASSES.index(k) for k in names], np.int8)[picks]


def make_world(config: SimConfig, nutrients: NutrientTable, rng: np.random.Generator) -> World:
    foods = nutrients.foods
    num_foods = len(foods)
    categories = sorted(set(nutrients.food_category))
    food_cat = np.asarray([categories.index(c) for c in nutrients.food_category], np.int32)
    num_cats = len(categories)
    kingdom = food_groups(foods, nutrients.food_category, nutrients.provenance["usda_description"])[
        "sample_type_group1"]
    cat_kingdom = [kingdom[int(np.nonzero(food_cat == c)[0][0])] for c in range(num_cats)]
    foods_per_cat = np.bincount(food_cat, minlength=num_cats)
    # Only a category of two or more foods has molecules its foods share (markers, profile); the
    # food of a one-food category is recognised by its own biomarkers.
    shared_cats = np.nonzero(foods_per_cat >= 2)[0]

    n_bio = config.biomarkers_per_food * num_foods
    n_cat = config.markers_per_category * shared_cats.size
    n_nut = config.nutrient_linked_per_class * len(NUTRIENT_LINKS)
    n_fixed = n_bio + n_cat + n_nut + config.background + config.contaminants
    n_prof = config.num_molecules - n_fixed
    if n_prof < 0:
        raise UserError(f"simulator: num_molecules={config.num_molecules} is smaller than the "
                        f"{n_fixed} molecules the fixed roles need")
    sizes = [n_bio, n_cat, n_nut, n_prof, config.background, config.contaminants]
    num_mol = sum(sizes)
    starts = np.cumsum([0] + sizes)
    blocks = {r: slice(int(starts[i]), int(starts[i + 1])) for i, r in enumerate(ROLES)}
    role = np.repeat(np.arange(len(ROLES), dtype=np.int8), sizes)

    detect = np.zeros((num_foods, num_mol), np.float32)
    log_int = np.zeros((num_foods, num_mol), np.float32)
    mu, sd = config.base_log_intensity
    base = rng.normal(mu, sd, num_mol).astype(np.float32)
    chem = np.zeros(num_mol, np.int8)
    target = [""] * num_mol
    same_cat = food_cat[:, None] == food_cat[None, :]  # [F, F]

    def jitter(shape, lo=0.7, hi=1.3):
        return rng.uniform(lo, hi, shape).astype(np.float32)

    # Biomarkers: owner food o(m); mostly there, leaking into the owner's category and rarely elsewhere.
    b = blocks["biomarker"]
    owner = np.repeat(np.arange(num_foods), config.biomarkers_per_food)
    own = np.arange(num_foods)[:, None] == owner[None, :]  # [F, n_bio]
    in_cat = same_cat[:, owner] & ~own
    elsewhere = ~same_cat[:, owner] & (rng.random((num_foods, n_bio)) < 0.15)
    p = np.where(own, np.minimum(config.biomarker_detection * jitter((num_foods, n_bio)), 0.95),
                 np.where(in_cat, config.biomarker_leak_category * jitter((num_foods, n_bio), 0.3, 1.7),
                          np.where(elsewhere, config.biomarker_leak_elsewhere, 0.0)))
    detect[:, b] = p
    log_int[:, b] = base[b][None, :] + np.where(own, config.biomarker_boost, -0.5)
    chem[b] = _kingdom_classes(rng, [kingdom[o] for o in owner])
    for i, o in enumerate(owner):
        target[b.start + i] = foods[o]

    # Category markers: shared by the foods of one category at food-specific levels.
    b = blocks["category_marker"]
    cat_owner = np.repeat(shared_cats, config.markers_per_category)
    member = food_cat[:, None] == cat_owner[None, :]  # [F, n_cat]
    marker_rate = config.category_marker_detection * jitter(n_cat, 0.5, 1.5)
    shared = jitter((num_foods, n_cat), 1.0 - config.shared_jitter, 1.0 + config.shared_jitter)
    detect[:, b] = np.where(member, marker_rate[None, :] * shared,
                            np.where(rng.random((num_foods, n_cat)) < 0.05, 0.01, 0.0))
    log_int[:, b] = base[b][None, :] + rng.normal(0.0, config.category_marker_level_sd, (num_foods, n_cat))
    chem[b] = _kingdom_classes(rng, [cat_kingdom[c] for c in cat_owner])
    for i, c in enumerate(cat_owner):
        target[b.start + i] = categories[c]

    # Nutrient-linked: detection is a sigmoid of log1p(amount per 100 g) around a per-molecule
    # threshold; log-intensity rises with it, so class abundance tracks the real nutrient.
    b = blocks["nutrient_linked"]
    per = config.nutrient_linked_per_class
    for j, (cls, nutrient) in enumerate(NUTRIENT_LINKS.items()):
        cols = slice(b.start + j * per, b.start + (j + 1) * per)
        amount = np.nan_to_num(nutrients.values[:, nutrients.nutrient_names.index(nutrient)], nan=0.0)
        x = np.log1p(amount).astype(np.float32)  # [F]
        threshold = rng.uniform(np.quantile(x, 0.15), np.quantile(x, 0.9), per).astype(np.float32)
        slope = rng.uniform(0.6, 1.2, per).astype(np.float32)
        detect[:, cols] = config.nutrient_linked_detection / (1.0 + np.exp(-(x[:, None] - threshold[None]) / 0.3))
        log_int[:, cols] = base[cols][None, :] + slope[None, :] * (x[:, None] - x.mean())
        chem[cols] = CLASSES.index(cls)
        target[cols] = [nutrient] * per

    # Profile: each molecule at home in one shared category (chosen in proportion to its foods,
    # so every food gets a similar share), present in about half its foods, sporadically elsewhere.
    b = blocks["profile"]
    if n_prof:
        weight = foods_per_cat[shared_cats] / foods_per_cat[shared_cats].sum()
        home = shared_cats[rng.choice(shared_cats.size, size=n_prof, p=weight)]
        at_home = food_cat[:, None] == home[None, :]  # [F, n_prof]
        present = rng.random((num_foods, n_prof), dtype=np.float32) < np.where(
            at_home, config.profile_in_category, config.profile_elsewhere)
        stray = present & ~at_home
        a, bb = config.profile_detection
        # Rate and level are properties of the molecule, varying little between the foods that
        # contain it: foods of a category differ by which of its molecules they have, not how much.
        rate = rng.beta(a, bb, n_prof).astype(np.float32)
        shared = jitter((num_foods, n_prof), 1.0 - config.shared_jitter, 1.0 + config.shared_jitter)
        detect[:, b] = np.where(present, rate[None, :] * shared, 0.0)
        detect[:, b] *= np.where(stray, config.profile_stray_factor, 1.0)
        log_int[:, b] = base[b][None, :] + rng.normal(0.0, config.profile_level_sd, (num_foods, n_prof))
        chem[b] = _kingdom_classes(rng, [cat_kingdom[c] for c in home])

    # Background: in every food at similar levels.
    b = blocks["background"]
    detect[:, b] = config.background_detection * jitter((num_foods, config.background), 0.8, 1.2)
    log_int[:, b] = base[b][None, :] + rng.normal(0.0, 0.3, (num_foods, config.background))
    chem[b] = _sample_classes(rng, _BACKGROUND_CLASSES, config.background)

    # Contaminants: never in the food profiles; drawn per sample in draw_samples.
    b = blocks["contaminant"]
    chem[b] = CLASSES.index("contaminant")
    base[b] -= 1.0
    return World(detect=detect, log_intensity=log_int, role=role, chem_class=chem, target=target,
                  base=base, food_category=food_cat, categories=categories)


def _kingdom_classes(rng: np.random.Generator, kingdoms: list[str]) -> np.ndarray:
    """One chemical class per molecule, drawn from the class mix of its food's kingdom."""
    out = np.zeros(len(kingdoms), np.int8)
    kingdoms_arr = np.asarray(kingdoms)
    for k, probs in _KINGDOM_CLASSES.items():
        sel = np.nonzero(kingdoms_arr == k)[0]
        if sel.size:
            out[sel] = _sample_classes(rng, probs, sel.size)
    return out


@dataclasses.dataclass
class Peaks:
    sample_food: np.ndarray  # [S] int32, samples in file order
    sample_index: np.ndarray  # [nnz] int32
    molecule_index: np.ndarray  # [nnz] int32 (role-block order)
    intensity: np.ndarray  # [nnz] float32


def draw_samples(config: SimConfig, world: World, rng: np.random.Generator) -> Peaks:
    """Replicate runs per food: detection dropout, dilution, log-normal peaks, contaminants.

    Vectorised per food (one [replicates, food molecules] draw each); no loop over peaks.
    """
    num_foods, num_mol = world.detect.shape
    reps = config.replicates_per_food
    # File order is shuffled so that neighbouring files are not replicates of one food.
    sample_food = rng.permutation(np.repeat(np.arange(num_foods, dtype=np.int32), reps))
    num_samples = sample_food.size
    efficiency = rng.beta(*config.sample_efficiency, num_samples).astype(np.float32)
    dilution = rng.normal(0.0, config.dilution_sd, num_samples).astype(np.float32)
    # Some runs barely show their food's biomarkers (another variety, part or preparation of the
    # food); these are the samples a classifier must recognise from the rest of the profile.
    masked = rng.random(num_samples) >= config.biomarker_visibility
    is_biomarker = world.role == ROLES.index("biomarker")

    s_parts, m_parts, v_parts = [], [], []
    for f in range(num_foods):
        samples = np.nonzero(sample_food == f)[0].astype(np.int32)
        mols = np.nonzero(world.detect[f] > 0)[0].astype(np.int32)
        p = world.detect[f, mols][None, :] * efficiency[samples][:, None]  # [reps, n]
        p = np.where(masked[samples][:, None] & is_biomarker[mols][None, :], p * config.masked_biomarker_factor, p)
        hit = rng.random(p.shape, dtype=np.float32) < p
        rows, cols = np.nonzero(hit)
        log_area = (world.log_intensity[f, mols[cols]] + dilution[samples[rows]]
                    + rng.normal(0.0, config.peak_noise_sd, rows.size).astype(np.float32))
        s_parts.append(samples[rows])
        m_parts.append(mols[cols])
        v_parts.append(log_area.astype(np.float32))

    contaminant_ids = np.nonzero(world.role == ROLES.index("contaminant"))[0].astype(np.int32)
    if contaminant_ids.size:
        counts = rng.poisson(config.contaminants_per_sample, num_samples)
        s = np.repeat(np.arange(num_samples, dtype=np.int32), counts)
        m = contaminant_ids[rng.integers(0, contaminant_ids.size, s.size)]
        # A contaminant drawn twice for one sample is one peak.
        _, first = np.unique(s.astype(np.int64) * num_mol + m, return_index=True)
        s, m = s[first], m[first]
        log_area = world.base[m] + dilution[s] + rng.normal(0.0, 1.0, s.size).astype(np.float32)
        s_parts.append(s)
        m_parts.append(m)
        v_parts.append(log_area.astype(np.float32))

    sample_index = np.concatenate(s_parts)
    molecule_index = np.concatenate(m_parts)
    intensity = np.exp(np.concatenate(v_parts)).astype(np.float32)
    return Peaks(sample_food=sample_food, sample_index=sample_index, molecule_index=molecule_index,
                  intensity=intensity)


def make_embeddings(config: SimConfig, world: World, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Spectral embeddings [M, d] clustered by chemical class, and a mask of molecules that have one."""
    num_mol = world.role.size
    d = config.embedding_dim
    centroids = rng.normal(0.0, 1.0, (len(CLASSES), d)).astype(np.float32)
    vectors = centroids[world.chem_class] + 0.6 * rng.normal(0.0, 1.0, (num_mol, d)).astype(np.float32)
    has = np.ones(num_mol, bool)
    fraction = config.missing_embedding_fraction
    n_missing = max(3, int(round(fraction * num_mol))) if num_mol > 10 and fraction > 0 else 0
    has[rng.choice(num_mol, size=n_missing, replace=False)] = False
    return vectors.astype(np.float32), has
