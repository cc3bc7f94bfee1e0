"""init_params draws every parameter as the compiled ``module.init`` does, bit for bit, without
compiling the initialisation; where its recipe does not apply it falls back to that program."""

from __future__ import annotations

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import make_toy_graph

from jaxfood.compile_cache import KeptCache
from jaxfood.graph.splits import prepare_graph
from jaxfood.models import initialise
from jaxfood.models.heads import make_multitask_model
from jaxfood.models.initialise import init_params
from jaxfood.train.finetune import FinetuneConfig
from jaxfood.train.graphcl import PretrainConfig, make_model, prepare_pretrain_graph


def _flat(tree) -> dict[str, np.ndarray]:
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _assert_identical(got, expected) -> None:
    got, expected = _flat(got), _flat(expected)
    assert list(got) == list(expected)  # same parameters, in the order Flax creates them
    for name, value in expected.items():
        assert got[name].dtype == value.dtype and got[name].shape == value.shape, name
        np.testing.assert_array_equal(got[name], value, err_msg=name)


def _compiled_only(patch) -> None:
    """Every init_params call through the compiled ``module.init`` (the reference)."""
    patch.setattr(initialise, "_plan", lambda *args: None)
    patch.setattr(initialise, "_PLANS", KeptCache(256))  # no recorded plans either way


def _never_compiled(patch) -> None:
    """An init_params call that falls back to compiling ``module.init`` fails the test."""
    real = initialise.shared_program
    patch.setattr(initialise, "_PLANS", KeptCache(256))

    def refuse(kind, key, build):
        assert kind != "init_program", "init_params compiled module.init"
        return real(kind, key, build)

    patch.setattr(initialise, "shared_program", refuse)


def test_multitask_and_pretraining_models_initialise_as_the_compiled_init(monkeypatch):
    """The default configuration (every module the tests' tiny models have, and more)."""
    graph = make_toy_graph()
    cfg = FinetuneConfig()
    tuned = prepare_graph(graph)
    model = make_multitask_model(tuned, cfg.encoder, cfg.heads)
    pre_graph = prepare_pretrain_graph(graph, PretrainConfig().augment, seed=0).to_numpy()
    pretrain = make_model(pre_graph, PretrainConfig())
    with monkeypatch.context() as patch:
        _compiled_only(patch)
        expected = model.init(jax.random.key(3), tuned), pretrain.init(jax.random.key(4), pre_graph)
    with monkeypatch.context() as patch:
        _never_compiled(patch)
        _assert_identical(model.init(jax.random.key(3), tuned), expected[0])
        _assert_identical(pretrain.init(jax.random.key(4), pre_graph), expected[1])
        # Another key: other values (no array is cached), still those of the compiled init.
        again = model.init(jax.random.key(5), tuned)
    embedding = "['encoder']['embed_Molecule']['embedding']"
    assert not np.array_equal(_flat(again)[embedding], _flat(expected[0])[embedding])
    _compiled_only(monkeypatch)
    _assert_identical(again, model.init(jax.random.key(5), tuned))


class _SplitKey(nn.Module):
    """Draws a parameter from a key it makes itself (not Flax's folded one)."""

    @nn.compact
    def __call__(self, x):
        key = jax.random.split(self.make_rng("params"))[1]
        w = self.param("w", lambda _: jax.random.normal(key, (x.shape[-1], 3)))
        return x @ w


class _FromData(nn.Module):
    """Initialises a parameter from its input's values."""

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", lambda _key: jnp.mean(x, 0))
        return nn.Dense(2)(x * scale)


@pytest.mark.parametrize("module", [_SplitKey(), _FromData()], ids=["own-key", "data-dependent"])
def test_modules_outside_the_recipe_get_the_compiled_init(module):
    x = np.arange(12, dtype=np.float32).reshape(4, 3) / 7
    expected = jax.jit(module.init)(jax.random.key(0), x)["params"]
    _assert_identical(init_params(module, jax.random.key(0), x), expected)


class _Sized(nn.Module):
    @nn.compact
    def __call__(self, x, n: int):
        return nn.Dense(n)(x)


def test_python_scalar_arguments_are_sizes(monkeypatch):
    x = np.ones((2, 5), np.float32)
    _never_compiled(monkeypatch)
    got = init_params(_Sized(), jax.random.key(1), x, 4)
    assert got["Dense_0"]["kernel"].shape == (5, 4)
    _assert_identical(got, jax.jit(_Sized().init, static_argnums=2)(jax.random.key(1), x, 4)["params"])


def test_a_traced_key_uses_the_compiled_init():
    module = nn.Dense(3)
    x = np.ones((2, 5), np.float32)
    traced = jax.jit(lambda key: init_params(module, key, x))(jax.random.key(2))
    _assert_identical(traced, init_params(module, jax.random.key(2), x))


def test_an_existing_parameter_is_checked_against_its_initialiser_once_traced(monkeypatch):
    """Applying a module checks each parameter's shape against its initialiser as Flax does (same
    error), from an abstract value traced once per initialiser and arguments, not in every apply."""
    dense = nn.Dense(3)
    x = jnp.ones((2, 4))
    params = dense.init(jax.random.key(0), x)
    calls = []
    real = jax.eval_shape
    monkeypatch.setattr(initialise, "_ABSTRACT", KeptCache(16))
    monkeypatch.setattr(initialise.jax, "eval_shape", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = dense.apply(params, x)
    assert len(calls) == 2  # kernel and bias
    np.testing.assert_array_equal(dense.apply(params, x), first)
    np.testing.assert_array_equal(jax.jit(dense.apply)(params, x), first)
    assert len(calls) == 2  # neither applied again nor traced
    wrong = {"params": {**params["params"], "kernel": jnp.ones((5, 3))}}
    with pytest.raises(flax.errors.ScopeParamShapeError, match=r"kernel.*shape \(4, 3\).*has shape \(5, 3\)"):
        dense.apply(wrong, x)
    wide = jnp.ones((2, 5))  # other arguments: another initialiser shape, checked and accepted
    assert dense.apply(wrong, wide).shape == (2, 3) and len(calls) == 3
