"""GraphCL pretraining: NT-Xent against a hand-written reference, masked edges vs. removed edges,
one compilation per run, loss decrease, outputs, checkpoint reload into the fine-tuning encoder."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest
from conftest import make_toy_graph

from jaxfood.cli import main
from jaxfood.config import load_config
from jaxfood.errors import CheckpointError, ConfigError
from jaxfood.graph import schema
from jaxfood.graph.hetero_graph import EdgeSet, save_graph
from jaxfood.graph.sampling import SamplerConfig
from jaxfood.models.encoder import EncoderConfig, init_encoder, make_encoder
from jaxfood.train import pretrain as pretrain_module
from jaxfood.train.augment import AugmentConfig, augment, prepare_pretrain_graph
from jaxfood.train.checkpoint import load_encoder, save_checkpoint
from jaxfood.train.graphcl import (
    VALIDATION_STEP,
    PretrainConfig,
    PretrainSampler,
    check_pretrain_config,
    make_eval_fn,
    make_model,
    nt_xent_loss,
)
from jaxfood.train.pretrain import load_pretrained_encoder

SMALL_ENCODER = EncoderConfig(hidden_dim=16, num_heads=2, num_layers=1, embedding_dim=16, dropout=0.1,
                              input_modes={"Sample": "shared", "Molecule": "both", "Food": "both"})


# ---- the loss ------------------------------------------------------------------------------------
def _reference_nt_xent(z1, z2, valid, tau, beta):
    """Loop-by-loop SimCLR NT-Xent with Robinson et al. (2021) reweighting (tau+ = 0)."""
    z = np.concatenate([z1, z2]).astype(np.float64)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    v = np.concatenate([valid, valid])
    b = len(z1)
    losses = []
    for i in range(2 * b):
        if not v[i]:
            continue
        pos = i + b if i < b else i - b
        s_pos = z[i] @ z[pos] / tau
        negs = np.array([z[i] @ z[j] / tau for j in range(2 * b) if j not in (i, pos) and v[j]])
        if negs.size == 0:
            continue
        w = np.exp(beta * negs) / np.mean(np.exp(beta * negs))
        losses.append(-np.log(np.exp(s_pos) / (np.exp(s_pos) + np.sum(w * np.exp(negs)))))
    return np.mean(losses)


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_nt_xent_matches_reference(beta):
    rng = np.random.default_rng(0)
    z1, z2 = rng.normal(size=(7, 5)), rng.normal(size=(7, 5))
    valid = np.array([1, 1, 0, 1, 1, 1, 0], bool)
    got = nt_xent_loss(z1, z2, valid, temperature=0.3, hard_negative_beta=beta)
    np.testing.assert_allclose(float(got), _reference_nt_xent(z1, z2, valid, 0.3, beta), rtol=1e-5)
    # Invalid rows do not enter: dropping them physically gives the same loss.
    kept = nt_xent_loss(z1[valid], z2[valid], None, temperature=0.3, hard_negative_beta=beta)
    np.testing.assert_allclose(float(got), float(kept), rtol=1e-5)


def test_nt_xent_prefers_aligned_views_and_hard_negatives_weigh_more():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(16, 8))
    aligned = float(nt_xent_loss(z, z + 0.01 * rng.normal(size=z.shape)))
    shuffled = float(nt_xent_loss(z, rng.permutation(z)))
    assert aligned < shuffled
    # beta > 0 upweights the negatives most similar to the anchor: never lowers the loss.
    assert float(nt_xent_loss(z, z, hard_negative_beta=2.0)) > float(nt_xent_loss(z, z))
    # An all-zero projection (a node isolated in its view) gives finite gradients.
    z0 = z.copy()
    z0[3] = 0.0
    grads = jax.grad(lambda a: nt_xent_loss(a, z))(z0)
    assert np.all(np.isfinite(grads))


# ---- masks are removals -----------------------------------------------------------------------
def _physically_removed(graph, masks):
    """The same graph with every masked edge deleted (numpy)."""
    edges = {}
    for key, e in graph.edges.items():
        keep = np.asarray(masks[key])
        edges[key] = EdgeSet(np.asarray(e.senders)[keep], np.asarray(e.receivers)[keep],
                             np.asarray(e.attributes)[keep])
    return graph.replace(edges=edges)


@pytest.mark.parametrize("num_layers", [1, 2])
def test_masked_edges_have_no_effect(num_layers):
    graph = make_toy_graph(num_samples=24, num_molecules=30, per_sample=6, seed=3, similar=True)
    aug = AugmentConfig(node_drop={"Molecule": 0.2, "Sample": 0.2, "Food": 0.2},
                        edge_drop={"contains_molecule": 0.3, "has_nutrient": 0.3, "is_similar_to": 0.3},
                        edge_add={"contains_molecule": 0.2, "is_similar_to": 0.2},
                        feature_mask={"Molecule": 0.3}, edge_attr_mask={"contains_molecule": 0.3})
    pre = prepare_pretrain_graph(graph, aug, seed=0)
    enc_cfg = dataclasses.replace(SMALL_ENCODER, num_layers=num_layers)
    encoder = make_encoder(pre, enc_cfg)
    params = init_encoder(encoder, jax.random.key(0), pre)
    apply = jax.jit(lambda g, m: encoder.apply({"params": params}, g, edge_masks=m))
    view, masks = jax.device_get(jax.jit(lambda k: augment(pre, k, aug))(jax.random.key(7)))
    assert any(not np.all(m) for m in masks.values())
    assert np.any(masks[schema.CONTAINS][-10:]) or np.any(masks[schema.IS_SIMILAR_TO][-5:])  # some added
    masked = apply(view, masks)
    removed_graph = _physically_removed(view, masks)
    removed = apply(removed_graph, None)
    for t in masked:
        np.testing.assert_allclose(masked[t], removed[t], rtol=1e-5, atol=1e-5, err_msg=t)


# ---- a whole run through the CLI --------------------------------------------------------------
RUN_SETTINGS = ["epochs=6", "steps_per_epoch=4", "warmup_steps=2", "batch_size=16", "learning_rate=0.01",
                "projection_hidden=16", "projection_dim=8", "patience=0", "encoder.hidden_dim=16",
                "encoder.embedding_dim=16", "encoder.num_heads=2", "seed=3"]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("pretrain")
    graph = make_toy_graph(num_samples=40, num_molecules=50, num_foods=5, per_sample=8, seed=2)
    save_graph(graph, root / "graph")
    results = []
    original = pretrain_module.pretrain

    def capture(*args, **kwargs):
        results.append(original(*args, **kwargs))
        return results[-1]

    args = ["pretrain", "--graph", str(root / "graph"), "--workdir", str(root / "w"), "--quiet"]
    for s in RUN_SETTINGS:
        args += ["--set", s]
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pretrain_module, "pretrain", capture)
        code = main(args)
    assert code == 0
    return root / "w", results[0], graph


def test_run_compiles_the_step_once_and_loss_decreases(cli_run):
    _, result, _ = cli_run
    assert result.num_step_compilations == 1
    hist = result.history
    assert len(hist["loss"]) == len(hist["val_loss"]) == 6
    # Held-out views are fixed, so their loss is comparable across epochs.
    assert hist["val_loss"][-1] < hist["val_loss"][0] - 0.05
    assert np.mean(hist["loss"][-2:]) < hist["loss"][0]


def test_run_writes_its_outputs(cli_run):
    workdir, result, _ = cli_run
    metrics = json.loads((workdir / "pretrain_metrics.json").read_text())
    assert set(metrics) == {"pretrained", "random"}
    for side in metrics.values():
        assert set(side) == {"knn_purity", "linear_probe_accuracy"}
        assert 0.0 <= side["knn_purity"] <= 1.0 and 0.0 <= side["linear_probe_accuracy"] <= 1.0
    history = json.loads((workdir / "pretrain_history.json").read_text())
    assert history["loss"] == pytest.approx(result.history["loss"])
    resolved = (workdir / "pretrain_config.yaml").read_text()
    assert "epochs: 6" in resolved and "hidden_dim: 16" in resolved
    assert list((workdir / "tb").glob("events.out.tfevents.*"))
    png = (workdir / "figures" / "pretrain_food_embeddings.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_sampled_run_validates_on_fixed_subgraphs_and_reads_out_the_whole_graph(tmp_path):
    """``--sampled``: the held-out view loss is the mean loss of fixed view pairs of fixed subgraphs
    (a full graph's views need not fit in memory), recomputed here from the public pieces; the
    read-out embeddings still cover every Sample and Food of the graph."""
    graph = make_toy_graph(num_samples=40, num_molecules=50, num_foods=5, per_sample=8, seed=2)
    save_graph(graph, tmp_path / "graph")
    settings = ["epochs=2", "steps_per_epoch=2", "warmup_steps=0", "patience=0", "projection_hidden=16",
                "projection_dim=8", "encoder.hidden_dim=16", "encoder.embedding_dim=16", "encoder.num_heads=2",
                "encoder.num_layers=1", "seed=3"]
    args = ["pretrain", "--graph", str(tmp_path / "graph"), "--workdir", str(tmp_path / "w"), "--quiet",
            "--sampled", "--batch-size", "8"]
    results = []
    original = pretrain_module.pretrain
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pretrain_module, "pretrain", lambda *a, **k: results.append(original(*a, **k)) or results[-1])
        assert main(args + [x for s in settings for x in ("--set", s)]) == 0
    result = results[0]

    cfg = load_config(PretrainConfig(), None, settings)
    model = make_model(prepare_pretrain_graph(graph, cfg.augment, seed=cfg.seed), cfg)
    views = PretrainSampler(graph, cfg, SamplerConfig(batch_size=8, seed=cfg.seed))
    keys = jax.random.split(jax.random.split(jax.random.key(cfg.seed), 3)[2], cfg.val_views)

    @jax.jit
    def view_loss(params, sub, key):
        return model.total_loss(model.view_losses(params, sub.graph, key, deterministic=True,
                                                  node_index=sub.node_index, node_mask=sub.node_mask))

    subs = [views.batch(VALIDATION_STEP, i) for i in range(cfg.val_views)]
    assert len({tuple(np.asarray(s.node_index[schema.SAMPLE])[np.asarray(s.node_mask[schema.SAMPLE])])
                for s in subs}) == cfg.val_views  # distinct subgraphs
    expected = np.mean([float(view_loss(result.params, s, k)) for s, k in zip(subs, keys)])
    assert min(result.history["val_loss"]) == pytest.approx(expected, rel=1e-5)
    # The full graph's views give another loss: the comparison tells the two apart.
    full = make_eval_fn(model, keys)(result.params, prepare_pretrain_graph(graph, cfg.augment, seed=cfg.seed))[0]
    assert abs(float(full["loss"]) - expected) > 1e-3
    for side in ("pretrained", "random"):
        assert result.embeddings[side][schema.SAMPLE].shape == (40, 16)
        assert result.embeddings[side][schema.FOOD].shape == (5, 16)


def _read_scalars(tb_dir) -> dict[str, list[float]]:
    """Scalars of TensorBoard event files (TFRecord framing: length, crc, Event proto, crc)."""
    import struct

    from tensorboardX.proto import event_pb2

    scalars: dict[str, list[float]] = {}
    for path in sorted(tb_dir.glob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos:pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + length])
            pos += 12 + length + 4
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append(value.simple_value)
    return scalars


def test_tensorboard_scalars(cli_run):
    workdir, _, _ = cli_run
    scalars = _read_scalars(workdir / "tb")
    for tag in ("pretrain/loss/Sample", "pretrain/loss/Food", "pretrain/learning_rate", "pretrain/grad_norm",
                "pretrain_val/loss"):
        assert tag in scalars
    assert len(scalars["pretrain_val/loss"]) == 6
    lr = scalars["pretrain/learning_rate"]
    assert len(lr) == 24 and lr[0] < lr[1] and lr[-1] < max(lr)  # warmup, then cosine decay


def test_checkpoint_reloads_into_the_fine_tuning_encoder(cli_run):
    workdir, result, graph = cli_run
    config, params = load_pretrained_encoder(workdir / "checkpoints")
    assert config == result.encoder_config
    cfg_dict, params2, meta = load_encoder(workdir / "checkpoints")
    assert meta["kind"] == "graphcl" and meta["best_step"] == result.best_epoch * 4  # steps_per_epoch=4
    # Fine-tuning builds the encoder on the full graph (label edges included) and loads the params.
    encoder = make_encoder(graph, config)
    fresh = init_encoder(encoder, jax.random.key(0), graph)
    assert jax.tree_util.tree_structure(fresh) == jax.tree_util.tree_structure(params)
    embed = jax.jit(lambda p: encoder.apply({"params": p}, graph))
    got, expected = embed(params), embed(result.params["encoder"])
    for t in expected:
        np.testing.assert_array_equal(got[t], expected[t])
    # ...and the pretrained weights differ from a fresh initialisation.
    assert not np.allclose(got[schema.SAMPLE], embed(fresh)[schema.SAMPLE])


def test_finetune_with_an_encoder_pretrained_on_another_graph_exits_2_and_writes_nothing(cli_run, tmp_path, capsys):
    """`jaxfood finetune --pretrained` reads the pretraining run's checkpoint; one made for another
    graph (50 molecules, this one has 40) is one line naming it and the parameter, exit status 2,
    and no workdir (the run's config.yaml used to be written before the check)."""
    workdir, _, _ = cli_run
    save_graph(make_toy_graph(num_samples=30, num_molecules=40, seed=0), tmp_path / "graph")
    capsys.readouterr()
    code = main(["finetune", "--graph", str(tmp_path / "graph"), "--workdir", str(tmp_path / "fine"),
                 "--pretrained", str(workdir / "checkpoints"), "--quiet", "--set", "steps=1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"error: {workdir / 'checkpoints'}: encoder parameter ") and "(50, 16)" in err[0] \
        and "this graph needs (40, 16)" in err[0], err
    assert not (tmp_path / "fine").exists()


def test_bad_inputs_are_one_line_errors(tmp_path, capsys):
    assert main(["pretrain", "--workdir", str(tmp_path / "w"), "--set", "no_such_key=1"]) == 2
    assert "no_such_key" in capsys.readouterr().err
    assert main(["pretrain", "--workdir", str(tmp_path / "w"), "--graph", str(tmp_path / "missing")]) == 2
    assert "missing" in capsys.readouterr().err
    graph = make_toy_graph()
    with pytest.raises(ConfigError, match="loss_weights.Recipe"):
        check_pretrain_config(PretrainConfig(loss_weights={"Recipe": 1.0}), graph)
    with pytest.raises(ConfigError, match="temperature"):
        check_pretrain_config(PretrainConfig(temperature=0.0), graph)
    with pytest.raises(ConfigError, match="loss_weights"):
        make_model(graph, PretrainConfig(loss_weights={"Sample": 0.0}))
    save_checkpoint(tmp_path / "ck", 1, {"params": {"encoder": {"w": np.zeros(2)}}},
                    {"kind": "graphcl", "encoder_config": {"hidden_dim": "wide"}})
    with pytest.raises(CheckpointError, match="hidden_dim"):
        load_pretrained_encoder(tmp_path / "ck")
