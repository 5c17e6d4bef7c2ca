"""YAML -> frozen dataclasses: the one loader behind every config (job, fine-tuning).

A config is its dataclass's defaults, then a YAML file merged over them, then `--set a.b=value`
overrides (values parsed as YAML scalars), then built into frozen dataclasses recursively. Unknown keys
and bad values raise ConfigError naming the key's dotted path; enum fields accept their string values
and refuse anything else with the choices listed.

    cfg = load(FinetuneConfig, "jobs/configs/finetune_tiny.yaml", overrides=["optim.lr=1e-4"])
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

import yaml

from mcs_batch.errors import ConfigError

T = TypeVar("T")

_SCIENTIFIC = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")  # YAML 1.1 reads 1e-5 as a string


def to_plain(value: Any) -> Any:
    """Dataclasses -> dicts, tuples -> lists, enums -> their values (what YAML / JSON can hold)."""
    if dataclasses.is_dataclass(value):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple | list):
        return [to_plain(v) for v in value]
    if isinstance(value, Enum):
        return value.value
    return value


def build(cls: type[T], data: Any, path: str = "") -> T:
    """Instantiate dataclass `cls` from a mapping, recursively, naming bad keys by their path."""
    if not isinstance(data, dict):
        raise ConfigError(f"{path or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - names)
    if unknown:
        where = f"{path}." if path else ""
        raise ConfigError(f"unknown config key {where}{unknown[0]} (known: {', '.join(sorted(names))})")
    kwargs = {name: _coerce(hints[name], value, f"{path}.{name}" if path else name) for name, value in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{path or 'config'}: {e}") from e


def _coerce(hint: Any, value: Any, path: str):
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return value if isinstance(value, hint) else build(hint, value, path)
    if origin is tuple:
        args = typing.get_args(hint)
        if isinstance(value, str | dict) or not isinstance(value, list | tuple):
            value = [value]
        if Ellipsis in args or len(args) == 1:  # tuple[X, ...]: any length
            items = [args[0]] * len(value)
        elif len(value) != len(args):
            raise ConfigError(f"{path}: expected {len(args)} values, got {len(value)}")
        else:
            items = list(args)
        return tuple(_coerce(item, v, f"{path}[{i}]") for i, (item, v) in enumerate(zip(items, value, strict=True)))
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, path)
            except ConfigError:
                continue
        kinds = " or ".join(_describe(a) for a in args if a is not type(None))
        raise ConfigError(f"{path}: expected {kinds}, got {value!r}")
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, str) and _SCIENTIFIC.match(value.strip()):
            value = float(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if isinstance(hint, type) and issubclass(hint, Enum):
        try:
            return hint(value)
        except ValueError as e:
            raise ConfigError(f"{path}: {value!r} is not one of {', '.join(str(m.value) for m in hint)}") from e
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    return value


def _describe(hint: Any) -> str:
    names = {int: "an integer", float: "a number", str: "a string", bool: "true/false"}
    if hint in names:
        return names[hint]
    if isinstance(hint, type) and issubclass(hint, Enum):
        return "one of " + ", ".join(str(m.value) for m in hint)
    return getattr(hint, "__name__", str(hint))


def read_yaml_file(path: str | Path) -> dict:
    """A YAML config file as a mapping; ConfigError naming the file when it is not one."""
    try:
        loaded = yaml.safe_load(Path(path).read_text()) or {}
    except FileNotFoundError as e:
        raise ConfigError(f"config file {path} does not exist") from e
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {path}: invalid YAML ({e})") from e
    if not isinstance(loaded, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top level")
    return loaded


def merge(base: dict, extra: dict) -> None:
    """Merge `extra` into `base`, recursively for mappings (lists and values replace)."""
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            merge(base[key], value)
        else:
            base[key] = value


def parse_override(text: str) -> tuple[str, Any]:
    """'a.b=value' -> ('a.b', YAML-parsed value)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {key}: cannot parse value {raw!r} ({e})") from e
    return key.strip(), value


def set_path(tree: dict, dotted: str, value: Any) -> None:
    """tree[a][b] = value for 'a.b' (list items by index: 'targets.0.name')."""
    keys = dotted.split(".")
    node: Any = tree
    for key in keys[:-1]:
        if isinstance(node, list):
            if not key.isdigit() or int(key) >= len(node):
                raise ConfigError(f"--set {dotted}: no item {key} (the list has {len(node)})")
            node = node[int(key)]
            continue
        node = node.setdefault(key, {})
        if not isinstance(node, dict | list):
            raise ConfigError(f"--set {dotted}: {key} is not a section")
    last = keys[-1]
    if last.isdigit() and isinstance(node, list):
        node[int(last)] = value
    else:
        node[last] = value


def apply_overrides(tree: dict, overrides: list[str] | tuple[str, ...]) -> None:
    """`--set key=value` overrides, in order."""
    for text in overrides:
        set_path(tree, *parse_override(text))


def load(
    cls: type[T],
    path: str | Path | None = None,
    *,
    overrides: list[str] | tuple[str, ...] = (),
    tree: dict | None = None,
) -> T:
    """Defaults (or `tree`, a complete plain config) <- YAML file <- `--set` overrides, built and validated."""
    tree = to_plain(cls()) if tree is None else tree  # complete, so that --set can address any key
    if path is not None:
        merge(tree, read_yaml_file(path))
    apply_overrides(tree, overrides)
    return build(cls, tree)
