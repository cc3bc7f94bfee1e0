"""``wide_init=fit``: fine-tuning starts at the logistic regression of the training samples'
intensity profiles, with the deep paths silenced, and the loop evaluates that starting state."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import TINY_FINETUNE, make_toy_graph

from jaxfood.graph.hetero_graph import SPLIT_CODES


@pytest.mark.slow
def test_fine_tuning_starts_at_the_logistic_regression_and_evaluates_it(tmp_path):
    from jaxfood.config import load_config
    from jaxfood.graph.splits import prepare_graph
    from jaxfood.models.heads import CLASS_ATTENTION, make_multitask_model
    from jaxfood.train.finetune import CLASS_LOGITS_START, FinetuneConfig
    from jaxfood.workflows import finetune

    graph = make_toy_graph(num_samples=40, num_molecules=30, num_foods=4)
    cfg = load_config(FinetuneConfig(), None, [*TINY_FINETUNE, "wide_init=fit", "eval_every=3"])
    result = finetune(graph, cfg, tmp_path / "run", progress=False)
    init = result.initial_params

    # The classifier's and the nutrient head's deep outputs start at 0 (but for the classifier's
    # intercept), the class branches small.
    for leaf in init["nutrient_head"]["mlp"]["out"].values():
        assert np.all(np.asarray(leaf) == 0)
    assert np.all(np.asarray(init["classifier"]["mlp"]["out"]["kernel"]) == 0)
    np.testing.assert_array_equal(init["salient_pool"][CLASS_ATTENTION]["logit_log_scale"], CLASS_LOGITS_START)

    # The classifier starts at the logistic-regression baseline: the baseline's own function, on its
    # own features (raw peak areas -> TIC -> log1p -> standardised), predicts the same foods.
    from jaxfood.eval.baselines import logreg_baseline, preprocess_intensities
    from jaxfood.eval.evaluator import model_programs
    from jaxfood.eval.pipeline import raw_peak_areas

    prepared = prepare_graph(graph).to_numpy()
    model = make_multitask_model(prepared, result.encoder_config, cfg.heads)
    labels = np.asarray(prepared.sample_food)
    split = np.asarray(prepared.sample_split)
    train = (split == SPLIT_CODES["train"]) & (labels >= 0)
    others = (split != SPLIT_CODES["train"]) & (labels >= 0)
    x = preprocess_intensities(raw_peak_areas(graph))
    want = logreg_baseline(x[train], labels[train], x[others], labels[others], n_classes=4)["proba"]
    # (The forward pass the evaluation compiled for this model and graph: no compilation here.)
    out = model_programs(model).predict(jax_tree(init), prepared)
    wide = np.asarray(out.wide_food_logits) + np.asarray(init["classifier"]["mlp"]["out"]["bias"])
    proba = np.exp(wide - wide.max(1, keepdims=True))
    np.testing.assert_allclose((proba / proba.sum(1, keepdims=True))[others], want, atol=1e-4)
    assert float(np.abs(init["classifier"]["wide_kernel"]).max()) > 1e-2  # a fitted kernel, not the zeros it replaces

    # The starting model is that logistic regression plus at most exp(-3) of standardised class logits.
    deep = np.asarray(out.food_logits - out.wide_food_logits) - np.asarray(init["classifier"]["mlp"]["out"]["bias"])
    assert np.all(np.std(deep, axis=0) <= 1.01 * np.exp(CLASS_LOGITS_START))
    train_accuracy = np.mean(np.argmax(np.asarray(out.food_logits)[train], -1) == labels[train])
    assert train_accuracy == 1.0  # the toy foods are separable by their marker molecules

    # The starting state is evaluated (step 0) beside the later steps, which pay one standard error
    # of the validation accuracy (0.5 / sqrt(validation samples)) to replace it.
    val = result.history["val"]
    assert [row["step"] for row in val] == [0, 3]
    num_val = int(np.sum((np.asarray(prepared.sample_split) == SPLIT_CODES["val"]) & (labels >= 0)))
    assert "selection_margin" not in val[0]
    assert np.isclose(val[1]["selection_margin"], 0.5 / np.sqrt(num_val))
    kept = 0 if val[0]["selection_score"] >= val[1]["selection_score"] else 3
    assert result.best_step == kept

    # A kept start carries the trained representation (encoder, Food projection) of step 3 and its own heads.
    from jaxfood.train.checkpoint import restore_checkpoint

    state, meta = restore_checkpoint(result.checkpoint_dir)
    assert result.composed_step == meta.get("composed_step") == (3 if kept == 0 else None)
    assert result.metrics["composed_step"] == result.composed_step
    parts = result.composed_parts or ()
    assert result.metrics["composed_parts"] == meta.get("composed_parts") == (list(parts) if kept == 0 else None)
    took_head = "nutrient_head" in parts
    changed = {name: not all(np.array_equal(a, b) for a, b in zip(jax.tree_util.tree_leaves(state["params"][name]),
                                                                  jax.tree_util.tree_leaves(init[name])))
               for name in ("encoder", "food_projection", "classifier", "nutrient_head", "salient_pool")}
    assert changed == {"encoder": True, "food_projection": True, "classifier": kept != 0,
                       "nutrient_head": kept != 0 or took_head, "salient_pool": kept != 0}
    if took_head:  # only because the trained head (on the trained encoder) validates better than the start
        from jaxfood.eval.evaluator import Evaluator

        val_r2 = Evaluator(model, prepared).evaluate(jax_tree(state["params"]), "val")["nutrition"]["nutrient_r2"]
        assert val_r2 > val[0]["nutrition/nutrient_r2"]


def test_start_margin_is_a_number_or_null():
    import pytest

    from jaxfood.config import load_config
    from jaxfood.errors import ConfigError
    from jaxfood.train.finetune import FinetuneConfig, check_config

    assert check_config(load_config(FinetuneConfig(), None, ["start_margin=0.1"])).start_margin == 0.1
    with pytest.raises(ConfigError, match="start_margin.*expected a number >= 0"):
        check_config(load_config(FinetuneConfig(), None, ["start_margin=-1"]))
    with pytest.raises(ConfigError, match="wide_init_c.*expected a number > 0"):
        check_config(load_config(FinetuneConfig(), None, ["wide_init_c=0"]))


def jax_tree(params):
    import jax

    return jax.tree_util.tree_map(jnp.asarray, params)


def test_the_kept_start_takes_the_nutrient_head_only_when_it_validates_better():
    from jaxfood.train.finetune import REPRESENTATION_PARAMS, compose_start

    start = {"params": {"encoder": 0, "food_projection": 0, "classifier": 0, "nutrient_head": 0}, "step": 0}
    trained = {"params": {"encoder": 1, "food_projection": 1, "classifier": 1, "nutrient_head": 1}, "step": 5}
    seen = []

    def r2_of(value):
        def r2(params):
            seen.append(dict(params))
            return value
        return r2

    state, parts = compose_start(start, trained, 0.5, r2_of(0.6))
    assert parts == REPRESENTATION_PARAMS + ("nutrient_head",)
    assert state == {"params": {"encoder": 1, "food_projection": 1, "classifier": 0, "nutrient_head": 1}, "step": 0}
    assert seen[-1] == state["params"]  # the composition itself was scored
    for r2 in (0.5, 0.4, float("nan")):
        state, parts = compose_start(start, trained, 0.5, r2_of(r2))
        assert parts == REPRESENTATION_PARAMS
        assert state["params"] == {"encoder": 1, "food_projection": 1, "classifier": 0, "nutrient_head": 0}
    # No nutrient table (the start's R² is -inf) or no nutrient head: nothing to score.
    count = len(seen)
    assert compose_start(start, trained, float("-inf"), r2_of(1.0))[1] == REPRESENTATION_PARAMS
    headless = {"params": {k: v for k, v in trained["params"].items() if k != "nutrient_head"}}
    assert compose_start(start, headless, 0.5, r2_of(1.0))[1] == REPRESENTATION_PARAMS
    assert len(seen) == count
