"""YAML configs loaded into frozen, validated dataclasses, overridable from the command line.

    cfg = load_config(TrainConfig, "suite.yaml", ["total_timesteps=2000", "env.p_t=0.001"], section="train")

- Unknown keys fail with a "did you mean" hint, naming the file.
- Values are checked against the field's type (int, float, bool, str, optional, tuple/list,
  nested dataclass); each dataclass's own `__post_init__` validates ranges.
- `to_dict(cfg)` / `save_config(cfg, path)` write the resolved config beside a run's outputs.
- A YAML file may hold a section per command (`train:`, `rrhf:`, ...): pass `section=`.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any, Sequence, TypeVar

import yaml

from llm_envs.io import atomic_write_text

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value or key is wrong; the message names it and how to fix it."""


def did_you_mean(key: str, options: Sequence[str]) -> str:
    """' Did you mean 'x'?' for the closest option, or '' when none is close."""
    close = difflib.get_close_matches(key, list(options), n=1)
    return f" Did you mean {close[0]!r}?" if close else ""


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check/convert one value against a type hint (the subset configs use)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if errors else f"{where}: {value!r} does not fit {hint}.")
    if origin is typing.Literal:
        if value not in typing.get_args(hint):
            raise ConfigError(f"{where}={value!r}; expected one of {list(typing.get_args(hint))}.")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}={value!r}; expected a list.")
        args = [a for a in typing.get_args(hint) if a is not Ellipsis]
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}={value!r}; expected a mapping.")
        return dict(value)
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}={value!r}; expected a mapping of {hint.__name__} fields.")
        return from_dict(hint, value, where=where)
    if hint is Any:
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}={value!r}; expected true or false.")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}={value!r}; expected an integer.")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}={value!r}; expected a number.")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}={value!r}; expected a string.")
    return value


def from_dict(cls: type[T], data: dict[str, Any], *, where: str = "config") -> T:
    """Build a (frozen) dataclass from a mapping, checking keys and types."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = unknown[0]
        raise ConfigError(
            f"{where}: unknown key {key!r} for {cls.__name__}.{did_you_mean(key, fields)} "
            f"Valid keys: {', '.join(sorted(fields))}."
        )
    hints = typing.get_type_hints(cls)
    values = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**values)
    except (TypeError, ValueError) as error:
        if isinstance(error, ConfigError):
            raise
        raise ConfigError(f"{where}: {error}") from error


def parse_override(text: str) -> tuple[list[str], Any]:
    """`"a.b=value"` -> (["a", "b"], value parsed as YAML, so 3 is an int and true a bool)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not key=value (for example total_timesteps=2000).")
    key, raw = text.split("=", 1)
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else ""


def set_key(data: dict[str, Any], keys: Sequence[str], value: Any, where: str) -> None:
    """Set `data[k0][k1]...[kn] = value`, creating sections; a mapping value is merged into a section."""
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{where}: {key!r} is not a section.")
    last = keys[-1]
    if isinstance(value, dict) and isinstance(node.get(last), dict):
        node[last] = {**node[last], **value}
    else:
        node[last] = value


def read_yaml(path: str | os.PathLike) -> Any:
    """A YAML file's content; a missing or unparsable file is a `ConfigError` naming it and the fix."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist; pass an existing YAML file.")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        where = getattr(error, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise ConfigError(f"{path} is not valid YAML{line} ({getattr(error, 'problem', None) or error}); fix the "
                          "file, or restore it (a run's config.yaml is rewritten by the next run).") from error


def load_config(
    cls: type[T],
    path: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
    *,
    section: str | None = None,
    ignore: Sequence[str] = (),
) -> T:
    """Defaults <- YAML file (optionally one section of it) <- `key=value` overrides.

    `ignore` names top-level keys of the file that are not fields (read by the caller itself)."""
    data: dict[str, Any] = {}
    where = cls.__name__
    if path is not None:
        path = Path(path)
        loaded = read_yaml(path) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a YAML mapping at the top level.")
        if section is not None:
            loaded = loaded.get(section, {}) or {}
        loaded = {k: v for k, v in loaded.items() if k not in ignore}
        data, where = loaded, f"{path}" + (f" [{section}]" if section else "")
    for text in overrides:
        keys, value = parse_override(text)
        set_key(data, keys, value, f"override {text!r}")
    return from_dict(cls, data, where=where)


def to_dict(cfg: Any) -> dict[str, Any]:
    """A resolved config as plain YAML-able data."""
    def plain(value: Any) -> Any:
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(cfg))


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    """Write the resolved config (YAML) beside a run's outputs."""
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
