"""The fitted start's settings and how a kept start takes trained parts. That a run starts at the
logistic regression (``wide_init=fit``) and evaluates it: test_finetune (on its runs)."""

from __future__ import annotations


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
