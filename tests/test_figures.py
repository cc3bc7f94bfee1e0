"""jaxfood.eval.figures: every figure is a real, non-blank PNG of a sensible size, written atomically."""

from __future__ import annotations

import struct

import matplotlib.image
import numpy as np
import pytest

from jaxfood.eval import figures as Fg

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path) -> tuple[int, int]:
    """(width, height) in pixels from the PNG's IHDR chunk."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, f"{path} is not a PNG"
    return struct.unpack(">II", data[16:24])


def assert_real_png(path, min_width: int = 300, min_height: int = 200) -> tuple[int, int]:
    width, height = png_size(path)
    assert width >= min_width and height >= min_height, (width, height)
    pixels = matplotlib.image.imread(path)
    assert pixels.std() > 0.01  # something was drawn
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]  # no temporary left
    return width, height


def test_category_order_groups_foods():
    names = ["pear", "beef", "apple", "pork", "kiwi"]
    cats = ["fruit", "meat", "fruit", "meat", "fruit"]
    order = Fg.category_order(names, cats)
    assert [names[i] for i in order] == ["apple", "kiwi", "pear", "beef", "pork"]


def test_confusion_64_foods_is_large_enough_to_read(tmp_path):
    n = 64
    rng = np.random.default_rng(0)
    cm = np.diag(rng.integers(1, 5, n)) + (rng.random((n, n)) < 0.03)
    names = [f"food name {i}" for i in range(n)]
    cats = [f"category {i % 7}" for i in range(n)]
    path = Fg.plot_confusion(cm, names, tmp_path / "confusion.png", cats)
    assert path == tmp_path / "confusion.png"
    width, height = assert_real_png(path)
    assert height >= 15 * n  # at least 15 px per food row, so 64 labels do not overlap
    with pytest.raises(ValueError):
        Fg.plot_confusion(cm[:3, :3], names, tmp_path / "bad.png", cats)
    assert not (tmp_path / "bad.png").exists()


def test_confusion_small_with_counts(tmp_path):
    cm = np.array([[3, 1], [0, 4]])
    assert_real_png(Fg.plot_confusion(cm, ["apple", "pear"], tmp_path / "c.png", normalise=False))


def test_embedding_maps(tmp_path):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 8)) * 3
    cats = np.repeat(["fruit", "meat", "dairy", "grain"], 6)
    emb = centres[np.repeat(np.arange(4), 6)] + rng.normal(size=(24, 8))
    names = [f"food {i}" for i in range(24)]
    assert_real_png(Fg.plot_embedding_categories(emb, cats, tmp_path / "cat.png", point_labels=names))
    protein = rng.random(24)
    protein[3] = np.nan  # missing nutrient
    assert_real_png(Fg.plot_embedding_nutrient(emb, protein, tmp_path / "protein.png", value_name="Protein (g)",
                                               method="tsne"))
    coords = Fg.embedding_2d(emb, "pca")
    assert coords.shape == (24, 2)
    # PCA of the L2-normalised rows: first coordinate carries the most variance.
    assert coords[:, 0].var() >= coords[:, 1].var()
    with pytest.raises(ValueError):
        Fg.embedding_2d(emb, "umap")


def test_top_molecules_scores_and_ranks(tmp_path):
    scored = {f"food {f}": [(f"m{f}_{j}", 1.0 / (j + 1)) for j in range(12)] for f in range(6)}
    reference = {"food 0": {"m0_0", "m0_3"}, "food 5": {"m5_1"}}
    path = Fg.plot_top_molecules(scored, tmp_path / "top.png", k=10, reference=reference)
    assert_real_png(path, min_width=600, min_height=300)
    ranked = {f"food {f}": [f"m{j}" for j in range(15)] for f in range(30)}
    assert_real_png(Fg.plot_top_molecules(ranked, tmp_path / "top_ranked.png", k=5, max_foods=8))


def test_model_vs_baselines(tmp_path):
    results = {
        "jaxfood": {"accuracy": 0.9, "weighted_f1": 0.88, "nutrient_r2": 0.4, "precision_at_10": 0.3},
        "logistic regression": {"accuracy": 0.7, "weighted_f1": 0.65},
        "ridge": {"nutrient_r2": -0.1},
        "fold change + VIP": {"precision_at_10": float("nan")},
    }
    path = Fg.plot_model_vs_baselines(results, tmp_path / "bars.png", errors={"jaxfood": {"accuracy": 0.02}})
    assert_real_png(path)
    with pytest.raises(ValueError):
        Fg.plot_model_vs_baselines({}, tmp_path / "none.png")


def test_tensorboard_events_written_and_read_back_without_importing_torch(tmp_path):
    """tensorboardX imports torch (installed for the PyG tests) unless told otherwise: seconds at
    the start of every run. In a fresh interpreter, as a run starts."""
    import subprocess
    import sys

    tb_dir = repr(str(tmp_path))
    code = (
        "import sys\n"
        "from jaxfood.train.monitoring import TensorBoard, read_scalars\n"
        f"tb = TensorBoard({tb_dir})\n"
        "tb.write(3, {'loss': {'total': 1.5}, 'skipped': float('nan')}, prefix='train/')\n"
        "tb.close()\n"
        f"print(read_scalars({tb_dir}), 'torch' in sys.modules)\n"
        "import torch\n"  # still importable afterwards
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "{'train/loss/total': [(3, 1.5)]} False"
