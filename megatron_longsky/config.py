"""Typed configs: nested dataclasses loaded from YAML with ``key=value`` overrides.

Every component owns a small dataclass. A job config nests them; YAML gives the
values and the command line overrides single fields with dotted keys
(``model.num_layers=4``). Unknown keys and values of the wrong type are errors that
name the key and the file, never silently ignored.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

from megatron_longsky.errors import UserError

T = TypeVar("T")


class ConfigError(UserError, ValueError):
    """A config file or override that does not fit the schema."""


class _Loader(yaml.SafeLoader):
    """The one YAML loader of every config file, override and checkpoint ``config.yaml``:
    PyYAML's safe YAML 1.1 loader with two changes. ``1e-3`` / ``3e-3`` are floats (YAML 1.2
    and what Megatron-LM users write; YAML 1.1 needs a dot, ``1.0e-3``, and reads them as
    strings), and a key given twice in one mapping is an error naming its line (YAML 1.1
    lets the last one win silently)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node.start_mark)
                except TypeError:  # an unhashable key: the base class reports it
                    continue
                if first is not key_node.start_mark:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first given on line {first.line + 1}; "
                        "YAML would silently keep the last)", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


# Exponent floats without a dot (1e-3, -2E+5): YAML 1.2's float syntax.
_Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                              re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                              list("-+0123456789"))


def yaml_load(stream):
    """Parse YAML text (or an open file) with the project's loader (see :class:`_Loader`)."""
    return yaml.load(stream, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


_BOOL_WORDS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp, where: str):
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except ConfigError as exc:
                errors.append(str(exc))
        if len(errors) == 1:  # Optional[X]: X's own error says what is wrong
            raise ConfigError(errors[0])
        raise ConfigError(f"{where}: {value!r} does not fit {_type_name(tp)}")
    if origin is Literal:
        options = get_args(tp)
        if isinstance(value, bool):  # YAML 1.1 reads off/no/on/yes as booleans
            spelled = [w for w in (("on", "yes", "true") if value else ("off", "no", "false")) if w in options]
            if spelled:
                return spelled[0]
            raise ConfigError(f"{where}: {str(value).lower()} is not one of {list(options)} "
                              "(YAML reads unquoted on/off/yes/no as true/false)")
        if value not in options:
            raise ConfigError(f"{where}: {value!r} is not one of {list(options)}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = get_args(tp)
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
        return items if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _BOOL_WORDS:
            return _BOOL_WORDS[value.strip().lower()]
        raise ConfigError(f"{where}: expected true/false (or yes/no, on/off), got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{where}: expected a finite number, got {value!r}")
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict, where: str = "config") -> T:
    """Build dataclass ``cls`` from a mapping, checking names and types."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {unknown}; valid keys for {cls.__name__}: {sorted(fields)}"
        )
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    try:
        obj = cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    return obj


def to_dict(obj) -> dict:
    """A plain-data (YAML-safe) copy of a config dataclass."""
    return dataclasses.asdict(obj)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``a.b=3`` -> (['a', 'b'], 3); the value is parsed as YAML (so lists work)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    key = key.strip().lstrip("-")
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = dict(data)
    for text in overrides:
        path, value = parse_override(text)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            child = dict(child) if isinstance(child, dict) else {}
            node[part] = child
            node = child
        node[path[-1]] = value
    return data


def load_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml_load(f)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{where}: invalid YAML: {' '.join(problem.split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping")
    return data


def _split_swallowed_overrides(flags: dict, overrides: list[str], keys: set[str]) -> tuple[dict, list[str]]:
    """argparse lets a multi-valued flag (``--input-prefix a b seed=3``) swallow the
    ``key=value`` overrides after it: items naming a config key go back to the overrides."""
    flags, overrides = dict(flags), list(overrides)
    for name, value in flags.items():
        if isinstance(value, list) and all(isinstance(v, str) for v in value):
            moved = [v for v in value if "=" in v and v.split("=", 1)[0].split(".")[0] in keys]
            if moved:
                overrides = moved + overrides
                flags[name] = [v for v in value if v not in moved] or None
    return flags, overrides


def merge_config_sources(path: str | Path | None = None, flags: dict | None = None,
                         overrides: list[str] = (), keys: set[str] | None = None,
                         origins: dict[str, str] | None = None) -> dict:
    """The one way every command builds its config data: the YAML file (optional), then the
    command-line flags that were given (``None`` means not given), then ``key=value``
    overrides. ``keys``: the config's top-level keys, to recover overrides that a
    multi-valued flag swallowed. ``origins`` (optional) receives, for each dotted key set on
    the command line, where it came from (see :func:`name_origin`)."""
    data = load_yaml(path) if path else {}
    flags, overrides = _split_swallowed_overrides(flags or {}, list(overrides), keys or set())
    given = {k: v for k, v in flags.items() if v is not None}
    data.update(given)
    if origins is not None:
        origins.update({k: "a command-line flag" for k in given})
        for text in overrides:
            origins[".".join(parse_override(text)[0])] = f"the command line: {' '.join(text.split())}"
    return apply_overrides(data, overrides)


def name_origin(exc: ConfigError, where: str, origins: dict[str, str], from_file: bool = True) -> ConfigError:
    """``exc`` about key ``<where>.a.b`` when ``a.b`` (or a parent) came from the command line:
    the same error naming the command line instead of the YAML file ``where`` (``from_file``)."""
    text = str(exc)
    if not origins or not text.startswith(f"{where}."):
        return exc
    key = re.match(r"[A-Za-z0-9_.\-]*", text[len(where) + 1:]).group(0).rstrip(".")
    for candidate in sorted(origins, key=len, reverse=True):
        if key == candidate or key.startswith(candidate + "."):
            not_file = f", not {where}" if from_file else ""
            return ConfigError(f"{key}{text[len(where) + 1 + len(key):]} (from {origins[candidate]}{not_file})")
    return exc


def load_config(cls: type[T], path: str | Path | None = None, overrides: list[str] = (),
                flags: dict | None = None, where: str | None = None) -> T:
    """Build ``cls`` from a YAML file (optional), given command-line flags and ``key=value``
    overrides (later sources win); errors name the file, else ``where``, and for a value
    given on the command line, the command line."""
    keys = {f.name for f in dataclasses.fields(cls)}
    origins: dict[str, str] = {}
    data = merge_config_sources(path, flags, overrides, keys, origins)
    where = str(path) if path else (where or "config")
    try:
        return from_dict(cls, data, where=where)
    except ConfigError as exc:
        raise name_origin(exc, where, origins, from_file=bool(path)) from None
