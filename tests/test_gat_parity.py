"""Numerical parity of HeteroGATConv / HeteroGATEncoder with PyTorch Geometric (the real one).

PyG ``HeteroConv({rel: GATConv((d_src, d_dst), C, heads=H, edge_dim=F, add_self_loops=False)})``
weights are copied into the Flax modules; eval-mode outputs must agree to 1e-5, attention
coefficients to 1e-5 and gradients (inputs and weights) to 1e-4.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conftest import LazyModule, make_toy_graph  # noqa: E402

from jaxfood.graph.hetero_graph import make_edge_set  # noqa: E402
from jaxfood.models.encoder import EncoderConfig, make_encoder  # noqa: E402
from jaxfood.models.gat import HeteroGATConv  # noqa: E402

torch = LazyModule("torch")
pyg = LazyModule("benchmarks._pyg_reference")

OUT_TOL = dict(rtol=1e-5, atol=1e-5)
GRAD_TOL = dict(rtol=1e-4, atol=1e-4)

# (src, dst, edge attribute width); 'D' only ever sends, so HeteroConv drops it from the output.
RELATION_POOL = [("A", "B", 1), ("B", "A", 0), ("A", "C", 3), ("C", "C", 2), ("D", "B", 0), ("B", "C", 1)]


def random_hetero_graph(seed: int, num_relations: int, empty_relation: bool = False):
    """Node features and edges of a random heterogeneous graph.

    The last node of every type is isolated (no edge of any relation touches it) and the one before
    it never receives an edge, so "no incoming edges" and "isolated" are both exercised; edges may
    repeat (multigraph), as PyG allows.
    """
    rng = np.random.default_rng(seed)
    picks = rng.choice(len(RELATION_POOL), num_relations, replace=False)
    relations = [RELATION_POOL[i] for i in sorted(picks)]
    types = sorted({t for s, d, _ in relations for t in (s, d)})
    counts = {t: int(rng.integers(6, 12)) for t in types}
    dims = {t: int(rng.integers(3, 7)) for t in types}
    x = {t: rng.normal(size=(counts[t], dims[t])).astype(np.float32) for t in types}
    edges = {}
    for i, (s, d, f) in enumerate(relations):
        num_edges = 0 if (empty_relation and i == 0) else int(rng.integers(10, 40))
        senders = rng.integers(0, counts[s] - 1, num_edges)
        receivers = rng.integers(0, counts[d] - 2, num_edges)
        attributes = rng.normal(size=(num_edges, f)).astype(np.float32) if f else None
        edges[f"{s}|r{i}|{d}"] = make_edge_set(senders, receivers, attributes)
    return x, edges, dims


def randomise(module: torch.nn.Module, seed: int) -> None:
    """Non-trivial values for every parameter (PyG initialises the bias to 0)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


def pyg_layer(keys, dims, edges, heads, channels, concat, aggr, seed, residual=False):
    conv = pyg.make_hetero_conv(keys, dims, {k: e.attribute_dim for k, e in edges.items()}, heads, channels,
                            concat=concat, aggr=aggr, residual=residual)
    randomise(conv, seed)
    return conv.eval()


def flax_layer(keys, heads, channels, concat, aggr, edge_block=None, residual=False):
    return HeteroGATConv(tuple(keys), heads, channels, concat=concat, aggr=aggr, edge_block=edge_block,
                         residual=residual)


def layer_forward_and_grads(layer, params, x_jax, edges, masks, probes):
    """One compilation: outputs, attention and the gradients of sum(out * probe) (params, inputs)."""

    def loss(p, xs):
        out, attention = layer.apply({"params": p}, xs, edges, masks, return_attention=True)
        return sum(jnp.sum(out[t] * probes[t]) for t in out), (out, attention)

    (_, (out, attention)), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, x_jax)
    return out, attention, grads


def assert_tree_close(actual: dict, expected: dict, path: str = "", **tol) -> None:
    assert set(actual) == set(expected), f"{path}: keys {sorted(actual)} != {sorted(expected)}"
    for k in expected:
        if isinstance(expected[k], dict):
            assert_tree_close(actual[k], expected[k], f"{path}/{k}", **tol)
        else:
            np.testing.assert_allclose(np.asarray(actual[k]), expected[k], err_msg=f"{path}/{k}", **tol)


CASES = [
    # seed, relations, heads, channels, concat, aggr, empty relation, edge block (0: one block;
    # small blocks exercise the blocked scan, its padding and its VJP), residual (PyG
    # GATConv(residual=True): the root weight)
    (0, 2, 2, 3, True, "sum", False, 0, False),
    (1, 3, 4, 2, True, "sum", True, 7, False),
    (2, 4, 3, 4, True, "sum", False, 8, False),
    (3, 4, 2, 3, True, "mean", False, 0, False),
    (4, 4, 2, 3, True, "max", False, 5, False),
    (5, 3, 3, 2, False, "sum", False, 0, False),
    (6, 4, 2, 3, False, "mean", True, 9, False),
    (7, 4, 2, 3, True, "sum", False, 0, True),
    (8, 3, 3, 2, False, "mean", True, 7, True),
]


@pytest.mark.parametrize("seed,num_relations,heads,channels,concat,aggr,empty,block,residual", CASES)
def test_layer_outputs_attention_and_gradients_match_pyg(seed, num_relations, heads, channels, concat, aggr, empty,
                                                         block, residual):
    x, edges, dims = random_hetero_graph(seed, num_relations, empty)
    keys = list(edges)
    conv = pyg_layer(keys, dims, edges, heads, channels, concat, aggr, seed, residual)
    edge_index, edge_attr = pyg.edges_to_pyg(edges)
    x_torch = {t: torch.tensor(v, requires_grad=True) for t, v in x.items()}
    expected = conv(x_torch, edge_index, edge_attr_dict=edge_attr)

    # Gradients of a fixed random projection of every output, wrt inputs and weights.
    rng = np.random.default_rng(seed + 100)
    probes = {t: rng.normal(size=tuple(v.shape)).astype(np.float32) for t, v in expected.items()}
    layer = flax_layer(keys, heads, channels, concat, aggr, block, residual)
    params = pyg.hetero_conv_to_flax(conv, keys)
    assert ("res" in params[keys[0]]) == residual
    x_jax = {t: jnp.asarray(v) for t, v in x.items()}
    out, attention, (grad_params, grad_x) = layer_forward_and_grads(layer, params, x_jax, edges, None, probes)

    # HeteroConv only returns node types some relation ends in; so must we.
    assert set(out) == set(expected)
    for t in expected:
        np.testing.assert_allclose(np.asarray(out[t]), expected[t].detach().numpy(), err_msg=t, **OUT_TOL)

    for key in keys:
        src, _, dst = key.split("|")
        gat = conv.convs[tuple(key.split("|"))]
        _, (ei, alpha) = gat((x_torch[src], x_torch[dst]), edge_index[tuple(key.split("|"))],
                             edge_attr.get(tuple(key.split("|"))), return_attention_weights=True)
        assert attention[key].shape == (edges[key].num_edges, heads)
        np.testing.assert_allclose(np.asarray(attention[key]), alpha.detach().numpy(), err_msg=key, **OUT_TOL)

    sum((expected[t] * torch.as_tensor(probes[t])).sum() for t in expected).backward()
    assert_tree_close(grad_params, pyg.hetero_conv_to_flax(conv, keys, grads=True), "params", **GRAD_TOL)
    for t in x:
        expected_grad = x_torch[t].grad
        expected_grad = np.zeros_like(x[t]) if expected_grad is None else expected_grad.numpy()
        np.testing.assert_allclose(np.asarray(grad_x[t]), expected_grad, err_msg=f"d/dx[{t}]", **GRAD_TOL)


@pytest.mark.parametrize("seed", [10, 11])
def test_masked_edges_equal_removed_edges_in_pyg(seed):
    x, edges, dims = random_hetero_graph(seed, 4)
    keys = list(edges)
    heads, channels = 2, 3
    conv = pyg_layer(keys, dims, edges, heads, channels, True, "sum", seed)
    rng = np.random.default_rng(seed)
    masks = {k: rng.uniform(size=e.num_edges) < 0.6 for k, e in edges.items()}
    # Mask out every incoming edge of one destination: it must get the bias only, like in PyG.
    first = keys[0]
    masks[first] &= np.asarray(edges[first].receivers) != np.asarray(edges[first].receivers)[0]
    kept = {k: make_edge_set(np.asarray(e.senders)[masks[k]], np.asarray(e.receivers)[masks[k]],
                             np.asarray(e.attributes)[masks[k]]) for k, e in edges.items()}
    edge_index, edge_attr = pyg.edges_to_pyg(kept)
    x_torch = {t: torch.tensor(v, requires_grad=True) for t, v in x.items()}
    expected = conv(x_torch, edge_index, edge_attr_dict=edge_attr)

    layer = flax_layer(keys, heads, channels, True, "sum", edge_block=6 if seed % 2 else 0)
    params = pyg.hetero_conv_to_flax(conv, keys)
    x_jax = {t: jnp.asarray(v) for t, v in x.items()}
    jmasks = {k: jnp.asarray(m) for k, m in masks.items()}
    probes = {t: np.random.default_rng(seed).normal(size=tuple(v.shape)).astype(np.float32)
              for t, v in expected.items()}
    out, attention, (grad_params, grad_x) = layer_forward_and_grads(layer, params, x_jax, edges, jmasks, probes)
    for t in expected:
        np.testing.assert_allclose(np.asarray(out[t]), expected[t].detach().numpy(), err_msg=t, **OUT_TOL)
    for key in keys:
        et = tuple(key.split("|"))
        gat = conv.convs[et]
        _, (_, alpha) = gat((x_torch[et[0]], x_torch[et[2]]), edge_index[et], edge_attr.get(et),
                            return_attention_weights=True)
        att = np.asarray(attention[key])
        assert att.shape == (edges[key].num_edges, heads)  # shapes unchanged
        np.testing.assert_array_equal(att[~masks[key]], 0.0)
        np.testing.assert_allclose(att[masks[key]], alpha.detach().numpy(), err_msg=key, **OUT_TOL)

    sum((expected[t] * torch.as_tensor(probes[t])).sum() for t in expected).backward()
    assert all(np.all(np.isfinite(g)) for g in jax.tree_util.tree_leaves(grad_params))
    assert_tree_close(grad_params, pyg.hetero_conv_to_flax(conv, keys, grads=True), "params", **GRAD_TOL)
    for t in x:
        expected_grad = x_torch[t].grad
        expected_grad = np.zeros_like(x[t]) if expected_grad is None else expected_grad.numpy()
        np.testing.assert_allclose(np.asarray(grad_x[t]), expected_grad, err_msg=f"d/dx[{t}]", **GRAD_TOL)


@pytest.mark.parametrize("aggr,block,residual", [("sum", 0, False), ("mean", 64, False), ("sum", 0, True)])
def test_encoder_matches_pyg_encoder(aggr, block, residual):
    # 80 molecules for 30 samples x 8: many molecules contained by no sample (isolated in the
    # contains relations), all four attribute widths (1, 0, 3, 1) and a Molecule->Molecule relation.
    graph = make_toy_graph(num_molecules=80, similar=True, seed=3)
    cfg = EncoderConfig(hidden_dim=12, num_heads=3, num_layers=2, embedding_dim=8, dropout=0.3, aggr=aggr,
                        residual=residual)
    encoder = make_encoder(graph, cfg).clone(edge_block=block)
    relations = list(graph.edges)
    reference = pyg.PygHeteroGATEncoder(graph.num_nodes, relations, graph.edge_dims(), hidden_dim=12, num_heads=3,
                                    num_layers=2, embedding_dim=8, dropout=0.3, aggr=aggr, residual=residual)
    randomise(reference, 7)
    reference.eval()
    edge_index, edge_attr = pyg.edges_to_pyg(graph.edges)
    expected = reference(edge_index, edge_attr)
    params = reference.to_flax()

    # Same tree structure as a freshly initialised encoder: the layout is the documented one.
    init_params = jax.eval_shape(lambda: encoder.init(jax.random.key(0), graph)["params"])
    assert jax.tree_util.tree_structure(init_params) == jax.tree_util.tree_structure(params)
    assert jax.tree_util.tree_map(np.shape, init_params) == jax.tree_util.tree_map(np.shape, params)

    probes = {t: np.random.default_rng(1).normal(size=tuple(v.shape)).astype(np.float32) for t, v in expected.items()}

    def loss(p):
        out = encoder.apply({"params": p}, graph)
        return sum(jnp.sum(out[t] * probes[t]) for t in out), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    assert set(out) == set(expected)
    for t in expected:
        np.testing.assert_allclose(np.asarray(out[t]), expected[t].detach().numpy(), err_msg=t, **OUT_TOL)
    sum((expected[t] * torch.as_tensor(probes[t])).sum() for t in expected).backward()
    assert_tree_close(grads, reference.to_flax(grads=True), "params", **GRAD_TOL)


def test_residual_pyg_checkpoint_converts_verifies_and_round_trips(tmp_path, capsys):
    """``GATConv(residual=True)`` checkpoints: ``res.weight`` maps to ``res/kernel``, the converted
    encoder has ``residual`` on and embeds like PyG (the converter's own verify on the original
    graph), and ``--to-torch`` gives back the same tensors."""
    import json

    from _pyg_original import GraphCLModel, make_original, torch_load, write_intermediate_json

    from checkpoints_convert.cli import main as convert_main

    upstream = write_intermediate_json(tmp_path / "intermediate_samples.json")
    encoder, _, _ = make_original(upstream, residual=True)
    state = GraphCLModel(encoder).state_dict()
    assert any(k.endswith(".res.weight") for k in state)
    src = tmp_path / "graphcl_residual.pt"
    config = {"embedding_dim": 8, "hidden_dim": 8, "num_layers": 2, "num_heads": 2, "dropout": 0.1}
    torch.save({"encoder_state": state, "config": config, "graph_path": "data/hetero_graph.pt"}, src)
    out, back = tmp_path / "converted", tmp_path / "back.pt"
    rc = convert_main([str(src), "--out", str(out), "--upstream-json", str(upstream), "--to-torch", str(back)])
    err = capsys.readouterr().err
    assert rc == 0, err
    report = json.loads((out / "conversion_report.json").read_text())
    assert report["verify"]["passed"] and max(report["verify"]["max_abs_diff"].values()) < 1e-5
    assert report["counts"]["skipped"] == 0
    original, returned = torch_load(src), torch_load(back)
    res_keys = [k for k in original["encoder_state"] if k.endswith(".res.weight")]
    assert res_keys and all(torch.equal(original["encoder_state"][k], returned["encoder_state"][k]) for k in res_keys)
