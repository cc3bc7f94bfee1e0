"""PyTorch Geometric checkpoints -> jaxfood (and back): checked against the PyG original itself.

A PyG encoder built the original way runs on the graph of a small intermediate JSON, is saved in
the GraphCL checkpoint format (plain and with DDP ``module.`` prefixes), converted, and
``jaxfood embed`` on the same JSON must reproduce PyG's eval-mode embeddings to 1e-5.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
from conftest import LazyModule

from checkpoints_convert.cli import main as convert_main
from jaxfood.cli import main as jaxfood_main

torch = LazyModule("torch")
pyg_original = LazyModule("_pyg_original")

CONFIG = {"embedding_dim": 8, "hidden_dim": 8, "num_layers": 2, "num_heads": 2, "dropout": 0.1, "temperature": 0.2}
OURS = {"Sample": "Sample", "Molecule": "Feature", "Food": "Food", "Nutrient": "Nutrient"}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("convert")


@pytest.fixture(scope="module")
def upstream_json(workdir):
    return pyg_original.write_intermediate_json(workdir / "intermediate_samples.json")


def randomise(module: torch.nn.Module, seed: int) -> None:
    """Non-trivial values for every initialised parameter, biases included (PyG initialises biases
    to 0: a converter that dropped them would pass on the original's own init)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if not isinstance(p, torch.nn.parameter.UninitializedParameter):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)


def randomised_original(json_path, seed: int = 0, **kwargs):
    """:func:`make_original` with every parameter randomised, and its eval outputs recomputed."""
    encoder, _, parts = pyg_original.make_original(json_path, seed=seed, **kwargs)
    randomise(encoder, 100 + seed)
    _, ei, ea, _ = parts
    with torch.no_grad():
        out = {t: v.numpy() for t, v in encoder(ei, ea).items()}
    return encoder, out, parts


@pytest.fixture(scope="module")
def original(upstream_json):
    """(encoder, PyG eval outputs, graph parts) with lazy edge_dim=0 convs, as the original saves."""
    encoder, out, parts = randomised_original(upstream_json)
    biases = [p for name, p in encoder.named_parameters() if name.endswith("bias")]
    assert biases and all(float(b.abs().max()) > 0 for b in biases)
    return encoder, out, parts


def graphcl_file(path, encoder, prefix=""):
    state = pyg_original.GraphCLModel(encoder).state_dict()
    state = type(state)((prefix + k, v) for k, v in state.items())
    torch.save({"encoder_state": state, "config": dict(CONFIG), "graph_path": "data/hetero_graph.pt"}, path)
    return path


def assert_same_torch_object(a, b):
    assert type(a) is type(b) or (isinstance(a, dict) and isinstance(b, dict))
    if isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            assert_same_torch_object(a[k], b[k])
    elif isinstance(a, torch.nn.parameter.UninitializedParameter):
        assert isinstance(b, torch.nn.parameter.UninitializedParameter)
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    else:
        assert a == b


def run_convert(args, capsys):
    rc = convert_main([str(a) for a in args])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err

def _export_encoder(params, cfg, ckpt_dir, out, capsys):
    """Saves encoder ``params`` of ``cfg`` as a jaxfood checkpoint in ``ckpt_dir`` and exports it
    to the PyTorch file ``out`` (default layout) with the CLI."""
    from jaxfood.config import config_to_dict
    from jaxfood.train.checkpoint import save_checkpoint

    save_checkpoint(ckpt_dir, 0, {"params": {"encoder": params}}, {"kind": "graphcl",
                                                                    "encoder_config": config_to_dict(cfg)})
    rc, stdout, err = run_convert([ckpt_dir, "--to-torch", out], capsys)
    assert rc == 0, err
    assert "default layout" in stdout



@pytest.mark.parametrize("prefix", ["", "module."], ids=["plain", "ddp"])
def test_graphcl_checkpoint_converts_embeds_like_pyg_and_round_trips(prefix, original, upstream_json, workdir, capsys):
    encoder, pyg_out, _ = original
    src = graphcl_file(workdir / f"graphcl_{prefix or 'plain'}.pt", encoder, prefix)
    out, back = workdir / f"conv_{prefix or 'plain'}", workdir / f"back_{prefix or 'plain'}.pt"
    verify = ["--upstream-json", upstream_json] if not prefix else []  # same tensors: verify once
    rc, stdout, err = run_convert([src, "--out", out, *verify, "--to-torch", back], capsys)
    assert rc == 0, err

    report = json.loads((out / "conversion_report.json").read_text())
    assert report["format"] == "graphcl" and report["module_prefix"] == prefix
    assert report["architecture"]["num_nodes"] == {"Sample": 9, "Molecule": 12, "Food": 3, "Nutrient": 4}
    assert report["architecture"]["edge_dims"]["Food|has_nutrient|Nutrient"] == 4  # amount + 3 units
    assert report["renamed"]["Food|Contains|Nutrient"] == "Food|has_nutrient|Nutrient"
    assert report["renamed"]["Sample|Contains|Feature"] == "Sample|contains_molecule|Molecule"
    assert report["counts"] == {"tensors": 88, "mapped": 80, "inert": 8, "skipped": 0}
    assert all(k.endswith(("lin_edge.weight", "att_edge")) and "Is_of_type" in k for k in report["inert"])
    if verify:
        assert report["verify"]["passed"] and max(report["verify"]["max_abs_diff"].values()) < 1e-5
        assert set(report["verify"]["max_abs_diff"]) == set(OURS)
        assert "verify on" in stdout and "passed" in stdout

    # jaxfood embed on the same JSON == the original's eval-mode output, row for row
    emb_path = workdir / f"emb_{prefix or 'plain'}.npz"
    assert jaxfood_main(["embed", "--checkpoint", str(out), "--upstream-json", str(upstream_json),
                         "--out", str(emb_path)]) == 0
    with np.load(emb_path) as emb:
        assert sorted(emb.files) == sorted(OURS)
        for ours, theirs in OURS.items():
            assert emb[ours].shape == pyg_out[theirs].shape
            np.testing.assert_allclose(emb[ours], pyg_out[theirs], atol=1e-5, rtol=0)

    # jaxfood -> torch is bit-exact, including the uninitialised lazy lin_edge of edge_dim=0
    assert report["round_trip"]["exact"]
    assert_same_torch_object(pyg_original.torch_load(src), pyg_original.torch_load(back))


@pytest.mark.parametrize("zero_width", ["empty", "none"])
def test_edge_dim_zero_variants_verify_on_random_graph(zero_width, upstream_json, workdir, capsys):
    """``lin_edge.weight`` [H*C, 0] (edge_dim=0 with an empty edge_attr) or no lin_edge at all."""
    encoder, _, _ = randomised_original(upstream_json, zero_width=zero_width, seed=1)
    key = "encoder.layers.0.convs.<Sample___Is_of_type___Food>.lin_edge.weight"
    state = pyg_original.GraphCLModel(encoder).state_dict()
    if zero_width == "empty":
        assert tuple(state[key].shape) == (8, 0)
    else:
        assert key not in state
    src = graphcl_file(workdir / f"zw_{zero_width}.pt", encoder)
    out, back = workdir / f"zw_{zero_width}", workdir / f"zw_{zero_width}_back.pt"
    rc, stdout, err = run_convert([src, "--out", out, "--verify", "--to-torch", back], capsys)
    assert rc == 0, err
    report = json.loads((out / "conversion_report.json").read_text())
    assert report["verify"]["graph"].startswith("random graph")
    assert max(report["verify"]["max_abs_diff"].values()) < 1e-5
    assert len(report["inert"]) == (8 if zero_width == "empty" else 0)
    assert_same_torch_object(pyg_original.torch_load(src), pyg_original.torch_load(back))


def test_finetuned_old_style_keys_convert_and_list_heads(original, workdir, capsys):
    """A fine-tuned model's bare state dict, older PyG keys: encoder converts, heads are listed."""
    encoder, _, _ = original
    model = pyg_original.LinkPredModel(encoder, 8)
    state = model.state_dict()
    old = type(state)()
    for k, v in state.items():
        if ".convs.<" in k:
            head, rest = k.split(".convs.<", 1)
            rel, param = rest.split(">.", 1)
            k = f"{head}.convs.{rel.replace('___', '__')}.{param}"
        old[k] = v
    assert any(".convs.Sample__Contains__Feature." in k for k in old)
    src = workdir / "linkpred_old.pt"
    torch.save(old, src)
    out, back = workdir / "linkpred_conv", workdir / "linkpred_back.pt"
    rc, stdout, err = run_convert([src, "--out", out, "--to-torch", back], capsys)
    assert rc == 0, err
    report = json.loads((out / "conversion_report.json").read_text())
    heads = {k for k in old if k.startswith("decoders.")}
    assert set(report["skipped"]) == heads and len(heads) == 4
    assert report["key_style"] == ["old"] and report["format"] == "state_dict"
    assert "not converted: decoders.food.weight" in stdout
    # same params as the GraphCL conversion of the same encoder
    import jax

    from jaxfood.train.checkpoint import load_encoder

    plain = workdir / "linkpred_graphcl_conv"
    rc, _, err = run_convert([graphcl_file(workdir / "linkpred_graphcl.pt", encoder), "--out", plain], capsys)
    assert rc == 0, err
    _, a, _ = load_encoder(out)
    _, b, _ = load_encoder(plain)
    jax.tree_util.tree_map(np.testing.assert_array_equal, a, b)
    # the export is the encoder in the file's own layout (old keys), heads not included
    exported = pyg_original.torch_load(back)
    assert_same_torch_object(exported, type(old)((k, v) for k, v in old.items() if not k.startswith("decoders.")))


def test_bare_encoder_state_dict_and_rename(original, workdir, capsys):
    encoder, _, _ = original
    state = encoder.state_dict()  # no "encoder." prefix
    renamed = type(state)((k.replace("Feature", "Compound"), v) for k, v in state.items())
    src = workdir / "bare_compound.pt"
    torch.save(renamed, src)
    rc, _, err = run_convert([src, "--out", workdir / "bare_fail"], capsys)
    assert rc == 2 and "'Compound' is not a jaxfood node type" in err and "--rename Compound=" in err
    assert not (workdir / "bare_fail").exists()
    rc, _, err = run_convert([src, "--out", workdir / "bare_ok", "--rename", "Compound=Molecule",
                              "--rename", "Sample|Contains|Compound=Sample|contains_molecule|Molecule"], capsys)
    assert rc == 0, err
    report = json.loads((workdir / "bare_ok" / "conversion_report.json").read_text())
    assert report["format"] == "state_dict" and report["encoder_prefix"] == ""
    assert report["renamed"]["Compound"] == "Molecule"
    assert report["renamed"]["Compound|rev_Contains|Sample"] == "Molecule|rev_contains_molecule|Sample"


# ---- malformed checkpoints: exit 2, one line naming key and shapes, nothing written ----------------
class _Payload:
    """Any class outside torch's allow-list: unpickling it would import and run project code."""

    def __reduce__(self):
        return (os.getcwd, ())


def _graphcl_variant(original, change):
    encoder, _, _ = original
    state = pyg_original.GraphCLModel(encoder).state_dict()
    obj = {"encoder_state": state, "config": dict(CONFIG), "graph_path": "x"}
    change(obj)
    return obj


MALFORMED = {
    "missing_key": (lambda o: o["encoder_state"].pop("encoder.layers.1.convs.<Food___Contains___Nutrient>.att_src"),
                    ["missing 'encoder.layers.1.convs.<Food___Contains___Nutrient>.att_src'", "[1, 2, 4]"]),
    "unexpected_key": (lambda o: o["encoder_state"].__setitem__("encoder.layers.0.convs.<Sample___Likes___Food>.bias",
                                                                torch.zeros(8)),
                       ["encoder.layers.0.convs.<Sample___Likes___Food>.bias", "[8]", "no jaxfood equivalent"]),
    "unknown_tensor": (lambda o: o["encoder_state"].__setitem__("encoder.norm.weight", torch.ones(8)),
                       ["unexpected 'encoder.norm.weight' [8]"]),
    "wrong_shape": (lambda o: o["encoder_state"].__setitem__(
        "encoder.layers.0.convs.<Sample___Contains___Feature>.lin_src.weight", torch.zeros(8, 5)),
        ["'encoder.layers.0.convs.<Sample___Contains___Feature>.lin_src.weight' has shape [8, 5], expected [8, 8]"]),
    "wrong_embedding_rows": (lambda o: o["encoder_state"].__setitem__("encoder.embeddings.Food.weight", torch.zeros(3, 6)),
                             ["'encoder.embeddings.Food.weight' has shape [3, 6], expected [3, 8]"]),
    "wrong_config": (lambda o: o["config"].update(hidden_dim=16, num_layers=3),
                     ["config['hidden_dim'] = 16 but the tensors say 8", "config['num_layers'] = 3"]),
    "shared_and_embedding": (lambda o: o["encoder_state"].__setitem__("encoder.shared.Food", torch.zeros(1, 8)),
                             ["'encoder.shared.Food'", "no jaxfood input mode combines"]),
    "wrong_input_width": (lambda o: o["encoder_state"].update({"encoder.inputs.Nutrient.weight": torch.zeros(6, 5),
                                                               "encoder.inputs.Nutrient.bias": torch.zeros(8)}),
                          ["'encoder.inputs.Nutrient.weight' has shape [6, 5], expected [8, 5]"]),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_checkpoint_is_refused_with_both_shapes(case, original, workdir, capsys):
    change, expected = MALFORMED[case]
    src = workdir / f"bad_{case}.pt"
    torch.save(_graphcl_variant(original, change), src)
    out = workdir / "never" / f"bad_{case}"
    rc, stdout, err = run_convert([src, "--out", out], capsys)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {src}")
    for text in expected:
        assert text in lines[0]
    assert not out.exists()
    assert not any((workdir / "never").glob(".*tmp")) if (workdir / "never").exists() else True


def test_allow_partial_converts_the_rest_and_reports(original, upstream_json, workdir, capsys):
    from jaxfood.data.upstream import build_graph_from_upstream_json
    from jaxfood.graph.hetero_graph import save_graph

    graph_dir = workdir / "graph_partial"
    save_graph(build_graph_from_upstream_json(upstream_json), graph_dir)
    missing = "encoder.layers.1.convs.<Food___Contains___Nutrient>.att_src"
    src = workdir / "partial.pt"
    torch.save(_graphcl_variant(original, lambda o: o["encoder_state"].pop(missing)), src)
    out = workdir / "partial_conv"
    rc, stdout, err = run_convert([src, "--out", out, "--graph", graph_dir, "--allow-partial"], capsys)
    assert rc == 0, err
    report = json.loads((out / "conversion_report.json").read_text())
    assert report["strict"] is False
    assert [p["key"] for p in report["problems"]] == [missing]
    assert report["initialised"] == ["layer_1/Food|has_nutrient|Nutrient/att_src"]
    assert "freshly initialised" in stdout
    # the result is a complete encoder for the graph
    assert jaxfood_main(["embed", "--checkpoint", str(out), "--graph", str(graph_dir),
                         "--out", str(workdir / "partial.npz")]) == 0


@pytest.mark.parametrize("case", ["code_pickle", "text_file", "list_object", "missing_file"])
def test_untrusted_or_non_checkpoints_are_refused(case, workdir, capsys):
    src = workdir / f"not_{case}.pt"
    if case == "code_pickle":
        torch.save({"encoder_state": {"a": torch.zeros(1)}, "hook": _Payload()}, src)
        expected = ["refused", "arbitrary Python code", "weights_only=True"]
    elif case == "text_file":
        src.write_text('{"samples": []}\n')  # e.g. the intermediate JSON passed by mistake
        expected = ["not a PyTorch checkpoint"]
    elif case == "list_object":
        torch.save([torch.zeros(2), 3], src)
        expected = ["not a model checkpoint: found a list"]
    else:
        expected = ["file not found"]
    out = workdir / f"not_{case}_out"
    rc, _, err = run_convert([src, "--out", out], capsys)
    assert rc == 2
    assert len(err.strip().splitlines()) == 1
    for text in expected:
        assert text in err
    if case != "code_pickle":
        assert "refused" not in err
    assert not out.exists()


def test_mappings_reorder_rows_and_report_ids(original, upstream_json, workdir, capsys):
    """The original's Feature rows in another order, one id unknown to the graph, one missing."""
    from jaxfood.data.upstream import build_graph_from_upstream_json
    from jaxfood.graph.hetero_graph import save_graph
    from jaxfood.train.checkpoint import load_encoder

    encoder, _, (num_nodes, _, _, mappings) = original
    graph = build_graph_from_upstream_json(upstream_json)
    graph_dir = workdir / "graph_map"
    save_graph(graph, graph_dir)
    table = encoder.embeddings["Feature"].weight.detach().clone()
    ids = list(mappings["feature_ids"])
    rng = np.random.default_rng(3)
    perm = rng.permutation(len(ids))
    ck_ids = [ids[i] for i in perm]
    ck_table = table[torch.as_tensor(perm)]
    dropped = ck_ids.pop(4)  # the graph has it, the checkpoint does not
    ck_table = torch.cat([ck_table[:4], ck_table[5:], torch.full((1, 8), 7.0)])
    ck_ids.append(999999)  # the checkpoint has it, the graph does not
    state = pyg_original.GraphCLModel(encoder).state_dict()
    state["encoder.embeddings.Feature.weight"] = ck_table
    src = workdir / "reordered.pt"
    torch.save({"encoder_state": state, "config": dict(CONFIG), "graph_path": "x"}, src)
    mpath = workdir / "hetero_graph_mappings.json"
    mpath.write_text(json.dumps({**mappings, "feature_ids": ck_ids}))

    out, back = workdir / "reordered_conv", workdir / "reordered_back.pt"
    rc, stdout, err = run_convert([src, "--out", out, "--graph", graph_dir, "--mappings", mpath,
                                   "--to-torch", back], capsys)
    assert rc == 0, err
    report = json.loads((out / "conversion_report.json").read_text())
    mol = report["reordered"]["Molecule"]
    assert mol["only_in_checkpoint"] == ["999999"] and mol["only_in_graph"] == [str(dropped)]
    assert mol["matched"] == 11 and mol["rows_in_checkpoint"] == 12 and mol["rows_in_graph"] == 12
    assert report["reordered"]["Sample"]["identity"] is True
    _, params, _ = load_encoder(out)
    new = params["embed_Molecule"]["embedding"]
    graph_ids = graph.meta.node_ids["Molecule"]
    original_rows = dict(zip(ids, table.numpy()))
    for row, gid in zip(new, graph_ids):
        if int(gid) == dropped:
            np.testing.assert_allclose(row, np.delete(ck_table.numpy(), -1, 0).mean(0), rtol=1e-6)
        else:
            np.testing.assert_array_equal(row, original_rows[int(gid)])
    assert_same_torch_object(pyg_original.torch_load(src), pyg_original.torch_load(back))


def test_mapping_errors_name_both_sides(original, upstream_json, workdir, capsys):
    from jaxfood.data.upstream import build_graph_from_upstream_json
    from jaxfood.graph.hetero_graph import save_graph

    encoder, _, (_, _, _, mappings) = original
    graph_dir = workdir / "graph_maperr"
    save_graph(build_graph_from_upstream_json(upstream_json), graph_dir)
    src = graphcl_file(workdir / "maperr.pt", encoder)
    mpath = workdir / "short_mappings.json"
    mpath.write_text(json.dumps({**mappings, "feature_ids": mappings["feature_ids"][:-1]}))
    rc, _, err = run_convert([src, "--out", workdir / "maperr_out", "--graph", graph_dir, "--mappings", mpath], capsys)
    assert rc == 2 and "'feature_ids' lists 11 ids" in err and "has shape [12, 8], expected [11, 8]" in err
    rc, _, err = run_convert([src, "--out", workdir / "maperr_out", "--mappings", mpath], capsys)
    assert rc == 2 and "--mappings needs --graph" in err
    assert not (workdir / "maperr_out").exists()


def test_graph_mismatch_without_mappings_is_an_error(original, workdir, capsys):
    from conftest import make_toy_graph

    from jaxfood.graph.hetero_graph import save_graph

    encoder, _, _ = original
    graph_dir = workdir / "toy_graph"
    save_graph(make_toy_graph(), graph_dir)
    src = graphcl_file(workdir / "toy.pt", encoder)
    rc, _, err = run_convert([src, "--out", workdir / "toy_out", "--graph", graph_dir], capsys)
    assert rc == 2
    assert "'encoder.embeddings.Sample.weight' has shape [9, 8], expected [30, 8]" in err
    assert "lin_edge.weight' has shape [8, 4], expected [8, 3]" in err  # has_nutrient widths differ


def test_export_of_a_native_jaxfood_encoder_loads_into_the_original(upstream_json, workdir, capsys):
    """Default layout: the exported file loads strictly into the original module and agrees."""
    import jax

    from jaxfood.data.upstream import build_graph_from_upstream_json
    from jaxfood.models.encoder import EncoderConfig, make_encoder

    graph = build_graph_from_upstream_json(upstream_json)
    cfg = EncoderConfig(hidden_dim=8, num_heads=2, num_layers=2, embedding_dim=8, dropout=0.1)
    encoder = make_encoder(graph, cfg)
    rng = np.random.default_rng(5)  # random values everywhere (biases too); no slow RNG compile
    shapes = jax.eval_shape(lambda: encoder.init(jax.random.PRNGKey(0), graph))["params"]
    params = jax.tree_util.tree_map(lambda s: (0.4 * rng.normal(size=s.shape)).astype(np.float32), shapes)
    ckpt_dir, out = workdir / "native", workdir / "native.pt"
    _export_encoder(params, cfg, ckpt_dir, out, capsys)
    obj = pyg_original.torch_load(out)
    assert obj["config"]["hidden_dim"] == 8
    num_nodes, ei, ea, _ = pyg_original.build_original_graph(upstream_json)
    dims = {et: (ea[et].shape[1] if et in ea else 0) for et in ei}
    module = pyg_original.GraphCLModel(pyg_original.OriginalEncoder(num_nodes, list(ei), dims, 8, 8, 2, 2, 0.1))
    module.load_state_dict(obj["encoder_state"], strict=True)
    module.eval()
    with torch.no_grad():
        theirs = module.encoder(ei, ea)
    ours = jax.jit(lambda p, g: encoder.apply({"params": p}, g, deterministic=True))(params, graph)
    for t, name in OURS.items():
        np.testing.assert_allclose(np.asarray(ours[t]), theirs[name].numpy(), atol=1e-5, rtol=0)


def test_without_torch_the_cli_says_how_to_install(monkeypatch, workdir, capsys):
    monkeypatch.setitem(sys.modules, "torch", None)
    rc, _, err = run_convert([workdir / "whatever.pt", "--out", workdir / "no_torch"], capsys)
    assert rc == 2
    assert 'pip install -e ".[convert]"' in err  # the tests run from a checkout
    assert not (workdir / "no_torch").exists()


def test_verify_failure_exits_nonzero_and_writes_nothing(original, workdir, capsys, monkeypatch):
    """A conversion bug (simulated: a bias off by 1e-3) is caught by --verify."""
    import checkpoints_convert.convert as convert_mod

    encoder, _, _ = original
    src = graphcl_file(workdir / "verify_fail.pt", encoder)
    real = convert_mod._to_jax

    def off_by(param, x):
        y = real(param, x)
        return y + 1e-3 if param == "bias" else y

    monkeypatch.setattr(convert_mod, "_to_jax", off_by)
    out = workdir / "verify_fail_out"
    rc, stdout, err = run_convert([src, "--out", out, "--verify"], capsys)
    assert rc == 1
    assert "FAILED" in stdout and "verification failed" in err
    assert not out.exists()


@pytest.mark.parametrize("pair, text", [("Feature", "expected Old=New"),
                                        ("A|r|B=Molecule", "whole relation to a whole relation"),
                                        ("A|r|B=Sample|eats|Food", "not a jaxfood relation")])
def test_bad_rename_is_a_user_error(pair, text, original, workdir, capsys):
    src = graphcl_file(workdir / "rename_err.pt", original[0])
    rc, _, err = run_convert([src, "--out", workdir / "rename_err", "--rename", pair], capsys)
    assert rc == 2 and text in err
    assert not (workdir / "rename_err").exists()


# ---- jaxfood's other input modes: features / both / shared / profile ---------------------------------
MIXED_MODES = {"Sample": "profile", "Molecule": "both", "Food": "features", "Nutrient": "shared"}


@pytest.fixture(scope="module")
def mixed_encoder():
    """``(graph, cfg, params, outputs)``: a toy graph (Molecule and Food node features, stored
    log1p intensity statistics) and an encoder using every non-embedding input mode, with random
    values everywhere (biases too), and its eval-mode outputs."""
    import dataclasses

    import jax
    from conftest import make_toy_graph

    from jaxfood.models.encoder import EncoderConfig, make_encoder

    graph = make_toy_graph(num_samples=12, num_molecules=15, num_foods=3, num_nutrients=4, per_sample=5,
                           molecule_dim=3)
    rng = np.random.default_rng(7)
    norm = {"contains_molecule": {"transform": "log1p", "mean": rng.normal(size=15).tolist(),
                                  "std": rng.uniform(0.5, 2.0, 15).tolist()}}
    graph = graph.replace(meta=dataclasses.replace(graph.meta, normalisation=norm))
    assert set(np.asarray(graph.sample_split).tolist()) == {0, 1, 2}  # the profile statistics use train only
    cfg = EncoderConfig(hidden_dim=8, num_heads=2, num_layers=2, embedding_dim=6, dropout=0.1,
                        input_modes=dict(MIXED_MODES))
    encoder = make_encoder(graph, cfg)
    shapes = jax.eval_shape(lambda: encoder.init(jax.random.PRNGKey(0), graph))["params"]
    params = jax.tree_util.tree_map(lambda s: (0.4 * rng.normal(size=s.shape)).astype(np.float32), shapes)
    assert {"profile_Sample", "shared_Nutrient", "project_Food", "project_Molecule", "embed_Molecule"} <= set(params)
    out = jax.jit(lambda p, g: encoder.apply({"params": p}, g, deterministic=True))(params, graph)
    return graph, cfg, params, {t: np.asarray(v) for t, v in out.items()}


def _flat(tree):
    import jax

    return {jax.tree_util.keystr(path): np.asarray(v) for path, v in jax.tree_util.tree_leaves_with_path(tree)}


def assert_bit_identical(a, b):
    fa, fb = _flat(a), _flat(b)
    assert sorted(fa) == sorted(fb)
    for k in fa:
        assert fa[k].dtype == fb[k].dtype == np.float32 and fa[k].shape == fb[k].shape, k
        assert np.array_equal(fa[k].view(np.uint32), fb[k].view(np.uint32)), k


def _mixed_reference(graph, cfg, state):
    """The PyG reference encoder in the original's names with ``state`` (exported keys) loaded."""
    from checkpoints_convert.mapping import export_node_name, export_relation_name
    from checkpoints_convert.reference import build_reference_encoder

    rels = {k: export_relation_name(k) for k in graph.edges}
    edge_index = {r: torch.from_numpy(np.stack([np.asarray(graph.edges[k].senders),
                                                np.asarray(graph.edges[k].receivers)]).astype(np.int64))
                  for k, r in rels.items()}
    edge_attr = {r: torch.from_numpy(np.asarray(graph.edges[k].attributes, np.float32)) for k, r in rels.items()
                 if graph.edges[k].attributes.shape[1] > 0}
    module = build_reference_encoder(
        {export_node_name(t): n for t, n in graph.num_nodes.items()}, list(rels.values()),
        {r: edge_attr[r].shape[1] if r in edge_attr else 0 for r in rels.values()}, cfg.embedding_dim,
        cfg.hidden_dim, cfg.num_heads, cfg.num_layers, cfg.dropout,
        input_modes={export_node_name(t): m for t, m in cfg.input_modes.items()},
        feature_dims={export_node_name(t): x.shape[1] for t, x in graph.node_features.items()})
    module.load_state_dict({k[len("encoder."):]: v for k, v in state.items()}, strict=True)
    module.eval()
    x_dict = {export_node_name(t): torch.from_numpy(np.asarray(x)) for t, x in graph.node_features.items()}

    def run(sample_split=np.asarray(graph.sample_split)):
        with torch.no_grad():
            out = module(edge_index, edge_attr, x_dict, None if sample_split is None else torch.from_numpy(sample_split),
                         graph.meta.normalisation["contains_molecule"])
        return {t: out[export_node_name(t)].numpy() for t in graph.num_nodes}

    return run


def test_export_of_mixed_input_modes_runs_like_the_pyg_reference(mixed_encoder):
    """The exported file loads strictly into the PyG reference (original names) with input layers
    for every mode, and gives the jaxfood encoder's outputs for every node type."""
    from checkpoints_convert.export import export_object
    from jaxfood.config import config_to_dict

    graph, cfg, params, ours = mixed_encoder
    state = export_object(params, config_to_dict(cfg), None)["encoder_state"]
    for key in ("encoder.profile.Sample", "encoder.shared.Nutrient", "encoder.inputs.Food.weight",
                "encoder.inputs.Food.bias", "encoder.inputs.Feature.weight", "encoder.embeddings.Feature.weight"):
        assert key in state
    assert not any(k.startswith(("encoder.embeddings.Sample", "encoder.embeddings.Food",
                                 "encoder.embeddings.Nutrient")) for k in state)
    run = _mixed_reference(graph, cfg, state)
    theirs = run()
    assert sorted(theirs) == sorted(ours)
    for t in ours:
        assert ours[t].shape == theirs[t].shape
        np.testing.assert_allclose(ours[t], theirs[t], atol=1e-5, rtol=0, err_msg=t)
    # the profile really is standardised over the training samples only
    wrong = run(sample_split=None)
    assert np.max(np.abs(wrong["Sample"] - ours["Sample"])) > 1e-3


def test_mixed_input_modes_round_trip_jax_torch_jax_bit_identical(mixed_encoder, workdir):
    from checkpoints_convert.convert import convert_checkpoint
    from checkpoints_convert.errors import ConvertError
    from checkpoints_convert.export import export_object, write_torch
    from checkpoints_convert.load import load_checkpoint
    from jaxfood.config import config_to_dict

    graph, cfg, params, _ = mixed_encoder
    obj = export_object(params, config_to_dict(cfg), None)
    path = write_torch(obj, workdir / "mixed_lib.pt")
    conversion = convert_checkpoint(load_checkpoint(path))
    assert conversion.encoder_config["input_modes"] == MIXED_MODES
    assert conversion.architecture.feature_dims == {"Molecule": 3, "Food": 4}
    assert_bit_identical(params, conversion.params)
    # and back again, through the layout it was converted from
    again = export_object(conversion.params, conversion.encoder_config, conversion.torch_source)
    assert_same_torch_object(obj, again)
    # with the graph: same params, nothing freshly initialised
    with_graph = convert_checkpoint(load_checkpoint(path), graph=graph)
    assert with_graph.report["initialised"] == [] and not with_graph.report["problems"]
    assert_bit_identical(params, with_graph.params)
    # what cannot be expressed is one clear error naming the checkpoint and the tensor
    with pytest.raises(ConvertError, match=r"mixed_lib\.pt: 'encoder\.profile\.Sample' has one row per molecule.*--mappings"):
        convert_checkpoint(load_checkpoint(path), graph=graph, mappings={"feature_ids": graph.meta.node_ids["Molecule"]})
    with pytest.raises(ConvertError, match=r"^cfg: encoder_config aggr = 'max'; the original uses 'sum'$"):
        export_object(params, {**config_to_dict(cfg), "aggr": "max"}, None, source="cfg")


def test_mixed_input_modes_cli_to_torch_convert_back_and_verify(mixed_encoder, workdir, capsys):
    """``--to-torch`` of a jaxfood checkpoint, then converting that file back with ``--verify``
    (random graph: node features, splits, no intensity statistics) and ``--to-torch`` again."""
    from jaxfood.train.checkpoint import load_encoder

    _, cfg, params, _ = mixed_encoder
    native, exported = workdir / "mixed_native", workdir / "mixed.pt"
    _export_encoder(params, cfg, native, exported, capsys)
    out, back = workdir / "mixed_conv", workdir / "mixed_back.pt"
    rc, stdout, err = run_convert([exported, "--out", out, "--verify", "--to-torch", back], capsys)
    assert rc == 0, err
    report = json.loads((out / "conversion_report.json").read_text())
    assert report["verify"]["passed"] and set(report["verify"]["max_abs_diff"]) == set(MIXED_MODES)
    assert max(report["verify"]["max_abs_diff"].values()) < 1e-5
    assert report["round_trip"]["exact"] and report["counts"]["skipped"] == 0
    assert report["architecture"]["input_modes"] == MIXED_MODES
    cfg_back, params_back, _ = load_encoder(out)
    assert cfg_back["input_modes"] == MIXED_MODES
    assert_bit_identical(params, params_back)
    assert_same_torch_object(pyg_original.torch_load(exported), pyg_original.torch_load(back))
