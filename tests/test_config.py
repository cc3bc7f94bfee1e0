import dataclasses

import pytest

from jaxfood.config import dump_config, load_config
from jaxfood.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class Opt:
    lr: float = 1e-3
    schedule: str = "cosine"


@dataclasses.dataclass(frozen=True)
class Cfg:
    steps: int = 10
    use_x: bool = False
    dims: tuple[int, ...] = (1, 2)
    opt: Opt = dataclasses.field(default_factory=Opt)


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 5\nopt:\n  lr: 0.1\n")
    cfg = load_config(Cfg(), path, ["opt.schedule=constant", "use_x=true", "dims=3,4"])
    assert cfg == Cfg(steps=5, use_x=True, dims=(3, 4), opt=Opt(lr=0.1, schedule="constant"))
    assert load_config(Cfg(), None, []) == Cfg()
    assert "schedule: constant" in dump_config(cfg)


@pytest.mark.parametrize("override, message", [
    ("stepz=3", "unknown key 'stepz'"),
    ("opt.rate=3", "unknown key 'opt.rate'"),
    ("steps=abc", "key 'steps' = 'abc': expected an integer"),
    ("opt.lr=fast", "key 'opt.lr' = 'fast': expected a number"),
    ("steps", "expected key=value"),
])
def test_bad_keys_and_values_are_named(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(Cfg(), None, [override])


def test_bad_yaml_names_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: [1,\n")
    with pytest.raises(ConfigError, match="c.yaml"):
        load_config(Cfg(), path)
    path.write_text("- 1\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(Cfg(), path)


@dataclasses.dataclass(frozen=True)
class Rates:
    rates: dict[str, float] = dataclasses.field(default_factory=lambda: {"a": 0.1, "b": 0.2})


def test_dotted_set_into_a_dict_keeps_the_other_entries():
    assert load_config(Rates(), None, ["rates.b=0.5"]).rates == {"a": 0.1, "b": 0.5}
    assert load_config(Rates(), None, ["rates.c=1"]).rates == {"a": 0.1, "b": 0.2, "c": 1.0}
    with pytest.raises(ConfigError, match="rates.b"):
        load_config(Rates(), None, ["rates.b=high"])
