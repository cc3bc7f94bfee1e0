"""``jaxfood embed``: eval-mode node embeddings of a graph, and clear errors for a wrong graph."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from conftest import make_toy_graph

from jaxfood.cli import main as jaxfood_main
from jaxfood.config import config_to_dict
from jaxfood.graph import schema
from jaxfood.graph.hetero_graph import make_edge_set, save_graph
from jaxfood.models.encoder import EncoderConfig, make_encoder
from jaxfood.train.checkpoint import save_checkpoint

CFG = EncoderConfig(hidden_dim=8, num_heads=2, num_layers=2, embedding_dim=8, dropout=0.5,
                    input_modes={"Molecule": "both", "Food": "features"})


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A toy graph (with input features) and a checkpoint of an encoder for it (random params)."""
    root = tmp_path_factory.mktemp("embed")
    graph = make_toy_graph(num_samples=12, num_molecules=15, num_foods=3, num_nutrients=4)
    graph_dir = save_graph(graph, root / "graph")
    encoder = make_encoder(graph, CFG)
    shapes = jax.eval_shape(lambda: encoder.init(jax.random.PRNGKey(0), graph))["params"]
    rng = np.random.default_rng(0)
    params = jax.tree_util.tree_map(lambda s: (0.5 * rng.normal(size=s.shape)).astype(np.float32), shapes)
    ckpt = root / "ckpt"
    save_checkpoint(ckpt, 7, {"params": {"encoder": params, "food_head": {"w": np.ones(3, np.float32)}}},
                    {"kind": "finetune", "encoder_config": config_to_dict(CFG)})
    return root, graph, graph_dir, encoder, params, ckpt


def test_embed_writes_one_eval_mode_array_per_node_type(setup, capsys):
    root, graph, graph_dir, encoder, params, ckpt = setup
    out = root / "emb.npz"
    assert jaxfood_main(["embed", "--checkpoint", str(ckpt), "--graph", str(graph_dir), "--out", str(out)]) == 0
    assert "eval mode" in capsys.readouterr().out
    expected = jax.jit(lambda p, g: encoder.apply({"params": p}, g, deterministic=True))(params, graph)
    with np.load(out) as emb:
        assert emb.files == list(schema.NODE_TYPES)  # graph node type order
        for t in schema.NODE_TYPES:
            assert emb[t].shape == (graph.num_nodes[t], 8) and emb[t].dtype == np.float32
            np.testing.assert_allclose(emb[t], np.asarray(expected[t]), atol=1e-6, rtol=0)
        first = {t: emb[t].copy() for t in emb.files}
    # deterministic (dropout 0.5 is off in eval mode): a second run gives the same numbers
    assert jaxfood_main(["embed", "--checkpoint", str(ckpt), "--graph", str(graph_dir), "--out", str(out)]) == 0
    with np.load(out) as emb:
        for t in emb.files:
            np.testing.assert_array_equal(emb[t], first[t])


def _expect_error(argv, capsys, *texts):
    assert jaxfood_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    for text in texts:
        assert text in err, err


def test_node_count_mismatch_names_both_shapes(setup, capsys):
    root, _, _, _, _, ckpt = setup
    other = save_graph(make_toy_graph(num_samples=20, num_molecules=15, num_foods=3, num_nutrients=4),
                       root / "bigger")
    out = root / "never.npz"
    _expect_error(["embed", "--checkpoint", str(ckpt), "--graph", str(other), "--out", str(out)], capsys,
                  "embed_Sample/embedding has shape [12, 8]", "20 'Sample' nodes", "expected [20, 8]")
    assert not out.exists()


def test_edge_width_mismatch_names_both_shapes(setup, capsys):
    root, graph, _, _, _, ckpt = setup
    e = graph.edges[schema.CONTAINS]
    wide = make_edge_set(e.senders, e.receivers, np.ones((e.num_edges, 3), np.float32))
    rk = schema.reverse_key(schema.CONTAINS)
    edges = {**graph.edges, schema.CONTAINS: wide,
             rk: make_edge_set(e.receivers, e.senders, np.ones((e.num_edges, 3), np.float32))}
    other = save_graph(graph.replace(edges=edges), root / "wide")
    _expect_error(["embed", "--checkpoint", str(ckpt), "--graph", str(other), "--out", str(root / "n.npz")],
                  capsys, "contains_molecule|", "/lin_edge/kernel has shape [1, 8]", "have 3 attributes")


def test_feature_width_and_relation_mismatches(setup, capsys):
    root, graph, _, _, _, ckpt = setup
    feats = dict(graph.node_features)
    feats["Molecule"] = np.zeros((graph.num_nodes["Molecule"], 6), np.float32)
    other = save_graph(graph.replace(node_features=feats), root / "feat6")
    _expect_error(["embed", "--checkpoint", str(ckpt), "--graph", str(other), "--out", str(root / "n.npz")],
                  capsys, "project_Molecule/kernel has shape [4, 8]", "6 columns")
    similar = save_graph(make_toy_graph(num_samples=12, num_molecules=15, num_foods=3, num_nutrients=4,
                                        similar=True), root / "similar")
    _expect_error(["embed", "--checkpoint", str(ckpt), "--graph", str(similar), "--out", str(root / "n.npz")],
                  capsys, "Molecule|is_similar_to|Molecule", "no parameters for")


def test_missing_or_foreign_checkpoint(setup, capsys, tmp_path):
    root, _, graph_dir, _, _, _ = setup
    _expect_error(["embed", "--checkpoint", str(tmp_path / "nope"), "--graph", str(graph_dir),
                   "--out", str(tmp_path / "e.npz")], capsys, "checkpoint directory not found")
    foreign = tmp_path / "foreign"
    save_checkpoint(foreign, 0, {"params": {"head": {"w": np.zeros(2, np.float32)}}}, {"kind": "other"})
    _expect_error(["embed", "--checkpoint", str(foreign), "--graph", str(graph_dir),
                   "--out", str(tmp_path / "e.npz")], capsys, "encoder_config")


def test_graph_source_is_required_and_exclusive(setup, tmp_path):
    root, _, graph_dir, _, _, ckpt = setup
    with pytest.raises(SystemExit) as exc:
        jaxfood_main(["embed", "--checkpoint", str(ckpt), "--out", str(tmp_path / "e.npz")])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        jaxfood_main(["embed", "--checkpoint", str(ckpt), "--graph", str(graph_dir), "--upstream-json", "x.json",
                      "--out", str(tmp_path / "e.npz")])
    assert exc.value.code == 2
