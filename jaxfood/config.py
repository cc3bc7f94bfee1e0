"""Typed configuration: dataclasses, YAML files and ``--set key=value`` overrides.

A run is described by one (possibly nested) dataclass. :func:`load_config` starts from its
defaults, applies a YAML file, then ``--set`` overrides (dotted keys for nested sections), and
checks every key and value: an unknown key or a value of the wrong type is a :class:`ConfigError`
naming the key, the source and what was expected.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from jaxfood.errors import ConfigError

T = TypeVar("T")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, source: str) -> Any:
    """Checks/coerces ``value`` to the annotated type ``tp``."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key, source)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(f"{source}: key '{key}' = {value!r}: expected {tp}")
    if origin is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{source}: key '{key}' = {value!r}: expected one of {list(allowed)}")
        return value
    if origin in (tuple, list, Sequence) or tp in (tuple, list):
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: key '{key}' = {value!r}: expected a list")
        args = typing.get_args(tp)
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, key, source) for v in value]
        return tuple(items) if origin is tuple or tp is tuple else items
    if origin in (dict, Mapping) or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{source}: key '{key}' = {value!r}: expected a mapping")
        args = typing.get_args(tp)
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _coerce(v, vt, f"{key}.{k}", source) for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{source}: key '{key}' = {value!r}: expected true or false")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{source}: key '{key}' = {value!r}: expected an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise ConfigError(f"{source}: key '{key}' = {value!r}: expected an integer")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{source}: key '{key}' = {value!r}: expected a number")
        if isinstance(value, (int, float)):
            result = float(value)
        else:
            try:
                result = float(str(value))
            except ValueError:
                raise ConfigError(f"{source}: key '{key}' = {value!r}: expected a number") from None
        if result != result:
            raise ConfigError(f"{source}: key '{key}' = {value!r}: expected a number, not NaN")
        return result
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{source}: key '{key}' = {value!r}: expected a string")
        return str(value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{source}: key '{key}' = {value!r}: expected a mapping of {_type_name(tp)} fields")
        return _apply(tp(), value, source, prefix=f"{key}.")
    return value


def _apply(cfg: T, updates: Mapping[str, Any], source: str, prefix: str = "", merge_dicts: bool = False) -> T:
    hints = typing.get_type_hints(type(cfg))
    names = {f.name for f in dataclasses.fields(cfg)}
    changes = {}
    for key, value in updates.items():
        if key not in names:
            raise ConfigError(
                f"{source}: unknown key '{prefix}{key}' (known keys: {', '.join(sorted(names))})"
            )
        current = getattr(cfg, key)
        if dataclasses.is_dataclass(current) and isinstance(value, Mapping):
            changes[key] = _apply(current, value, source, prefix=f"{prefix}{key}.", merge_dicts=merge_dicts)
        elif merge_dicts and isinstance(current, Mapping) and isinstance(value, Mapping):
            # --set a.b.c=v on a dict-valued key updates one entry and keeps the others.
            changes[key] = _coerce({**current, **value}, hints[key], f"{prefix}{key}", source)
        else:
            changes[key] = _coerce(value, hints[key], f"{prefix}{key}", source)
    return dataclasses.replace(cfg, **changes)


def parse_overrides(pairs: Sequence[str]) -> list[tuple[str, Any]]:
    """Parses ``key=value`` strings; values are read as YAML scalars (``3``, ``1e-3``, ``true``)."""
    parsed = []
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set {pair!r}: expected key=value")
        key, raw = pair.split("=", 1)
        key = key.strip()
        if not key:
            raise ConfigError(f"--set {pair!r}: expected key=value with a non-empty key")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        parsed.append((key, value))
    return parsed


def _nest(key: str, value: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    node = out
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def load_config(default: T, path: str | Path | None = None, overrides: Sequence[str] = ()) -> T:
    """Defaults <- YAML file at ``path`` <- ``--set`` overrides; every key and value checked."""
    cfg = default
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{path}:{where}: not valid YAML ({getattr(err, 'problem', err)})") from None
        if not isinstance(data, Mapping):
            raise ConfigError(f"{path}: expected a mapping of config keys at the top level")
        for key in data:
            _hint_section_prefix(cfg, str(key), data[key], str(path))
        cfg = _apply(cfg, data, str(path))
    for key, value in parse_overrides(overrides):
        head, _, rest = key.partition(".")
        if rest:
            _hint_section_prefix(cfg, head, _nest(rest, value), f"--set {key}", f"--set {rest}=...")
        cfg = _apply(cfg, _nest(key, value), f"--set {key}", merge_dicts=True)
    return cfg


def _hint_section_prefix(cfg: Any, head: str, value: Any, source: str, fix: str | None = None) -> None:
    """An unknown top-level key whose contents are valid keys of ``cfg`` (``finetune.steps`` given to
    ``jaxfood finetune``, whose keys are run_mtl's ``finetune.*`` without the prefix): say so."""
    names = {f.name for f in dataclasses.fields(cfg)}
    if head in names or not isinstance(value, Mapping) or not value:
        return
    try:
        _apply(cfg, value, source, merge_dicts=True)
    except ConfigError:
        return
    raise ConfigError(f"{source}: unknown key '{head}': this command's keys have no '{head}.' prefix "
                      f"(use {fix or 'the keys under ' + repr(head) + ' at the top level'})")


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A plain dict (tuples as lists) suitable for YAML/JSON."""

    def convert(x: Any) -> Any:
        if dataclasses.is_dataclass(x):
            return {f.name: convert(getattr(x, f.name)) for f in dataclasses.fields(x)}
        if isinstance(x, (list, tuple)):
            return [convert(v) for v in x]
        if isinstance(x, Mapping):
            return {str(k): convert(v) for k, v in x.items()}
        return x

    return convert(cfg)


def config_from_dict(default: T, data: Mapping[str, Any], source: str = "config") -> T:
    """Inverse of :func:`config_to_dict`, with the same checks as :func:`load_config`."""
    return _apply(default, data, source)


def dump_config(cfg: Any) -> str:
    return yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
