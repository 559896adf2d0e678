"""The one config: the registered settings (`shards/settings.py`: each section defined by its owner), an optional user
file laid over them, then presets, then `--set` overrides.

It lives in `shards/` because both stages import `shards/` and because the config digest is part of the
on-disk contract (every sample records the digest of the settings that produced it).

Every key, its default, type, comment and constraints are a field of its owner's settings (`pipeline.yaml` is
generated from them); a section this process has not registered (`shards.settings.SECTION_NAMES`) is kept as given,
for its owner to check, and is not read here (`Config` refuses it: `shards.settings.Unregistered`). A value must have
the field's type (an int is accepted where a float is expected, a YAML 1.1 string like `1e-4` as a float, and an int
as its text where a string is, for keys like `eval.frames: all | middle | 3`), be one of its choices and at least its
minimum; a key set explicitly to another value than its default while the options make it do nothing
(`warmup_steps` under `schedule: step`) is refused too. A renamed key still works, with a warning. Errors are one
line, naming the key, raised as `ConfigError`.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import operator
import typing
from pathlib import Path
from typing import Any, Iterable

import yaml

from .errors import UserError
from .settings import (RENAMED, RETIRED, RULES, SECTION_NAMES, SECTIONS, Unregistered, as_yaml, default_of, defaults,
                       spec)

log = logging.getLogger(__name__)


class ConfigError(UserError):
    """A bad config file, key or value; the message is one line and names the key."""


# A config is a page of settings (the generated pipeline.yaml is 20 kB). A larger file is refused unparsed: a shard
# folder's pipeline.yaml is downloaded, and PyYAML's pure-Python parser takes minutes and gigabytes on 30 MB.
MAX_CONFIG_BYTES = 1 << 20
# libyaml's parser where PyYAML was built with it (it parses the same safe subset, ~10 times faster).
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def parse_yaml(text: str | bytes) -> Any:
    """`text` parsed as YAML's safe subset (plain data, no Python objects)."""
    return yaml.load(text, Loader=_YAML_LOADER)  # noqa: S506 (a safe loader)


class Config:
    """Read-only attribute view of a nested dict: `cfg.audio.num_mel_bins`. `explicit` holds the dotted keys that a
    file, preset or --set gave (by their current names). A section this process has not registered is held as given
    (`to_dict`, `to_yaml`), never read: `cfg.model` there is `Unregistered`, naming the owner's call."""

    def __init__(self, data: dict[str, Any], explicit: Iterable[str] = ()):
        object.__setattr__(self, "_data", data)
        object.__setattr__(self, "explicit", frozenset(explicit))

    def __getattr__(self, name: str) -> Any:
        if name in SECTION_NAMES and name not in SECTIONS:
            raise Unregistered(name)
        try:
            value = self._data[name]
        except KeyError:
            raise AttributeError(f"config has no key {name!r}") from None
        return Config(value) if isinstance(value, dict) else value

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("Config is read-only; use --set or with_overrides()")

    def __getitem__(self, name: str) -> Any:
        return getattr(self, name)

    def __contains__(self, name: str) -> bool:
        return name in self._data

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self._data)

    def to_yaml(self, *sections: str) -> str:
        """The config as YAML: the named sections only, when some are named."""
        data = {name: self._data[name] for name in sections} if sections else self._data
        return yaml.safe_dump(data, sort_keys=False)

    def with_overrides(self, sets: Iterable[str]) -> "Config":
        """This config with `sets` ("dotted.key=value") applied and checked as `load_config` checks them."""
        load = _Load(copy.deepcopy(self._data), set(self.explicit))
        for item in sets:
            load.set_item(item)
        return load.result()

    def digest(self, *sections: str) -> str:
        """Short stable hash of the named sections (all when none named)."""
        names = sections or tuple(sorted(self._data))
        payload = {name: self._data[name] for name in names}
        blob = json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def __repr__(self) -> str:
        return f"Config({self._data!r})"


def load_config(path: str | Path | None = None, sets: Iterable[str] = (), presets: Iterable[str] = (), *,
                sections: Iterable[str] | None = None) -> Config:
    """Defaults, then the user file `path` (if any), then each named preset, then `sets`.

    `sections` reads only those parts of the file, each a whole section (`audio`) or one key (`shards.pattern`): a
    shard folder's frozen pipeline.yaml is read for its sample-side settings only, the rest of it is never looked
    at; such a file is a record of the settings used, not a request, so a key of it that has no effect is not an
    error there. The result's `explicit` holds the dotted keys the file, presets and sets gave.

    A preset is an entry of the `presets:` section: a flat mapping of dotted keys to values, applied exactly
    like `--set` (so `--preset scale+` is shorthand for the handful of `--set`s of a recipe); a user file may add
    its own. `sets` are "dotted.key=value" strings, the value parsed as YAML.
    """
    load = _Load(defaults(), set())
    if path is not None:
        user = read_config_file(path)
        if sections is not None:
            user = _only(user, sections)
        load.merge_file(user, str(path), record=sections is not None)
    for name in presets:
        table = load.data["presets"]
        if name not in table:
            raise ConfigError(f"unknown preset {name!r}; known: {', '.join(sorted(table)) or 'none'}")
        for dotted, value in table[name].items():
            load.assign(dotted, value, f"--preset {name}")
    for item in sets:
        load.set_item(item)
    return load.result()


def _only(user: dict[str, Any], parts: Iterable[str]) -> dict[str, Any]:
    """The `parts` of a config file's mapping: whole sections (`audio`) or single keys (`shards.pattern`)."""
    out: dict[str, Any] = {}
    for part in parts:
        section, _, key = part.partition(".")
        if not key:
            if section in user:
                out[section] = user[section]
        elif isinstance(user.get(section), dict) and key in user[section]:
            out.setdefault(section, {})[key] = user[section][key]
    return out


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping a YAML config file holds ({} for an empty file), read only when it is a regular file of at most
    MAX_CONFIG_BYTES; every failure a one-line ConfigError naming the file."""
    from .store import open_regular  # store imports this module

    try:
        with open_regular(path) as f:
            text = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config ({exc.strerror or exc})") from None
    if len(text) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES >> 20} MiB, not a config file; refused unparsed")
    try:
        data = parse_yaml(text)
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "invalid YAML"
        raise ConfigError(f"{path}: not valid YAML ({first})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return data


class _Load:
    """One load: the settings so far, the explicit keys, where each key given by this load came from (those the
    no-effect rule checks: a base config was checked when it was made), the renamed keys already warned about."""

    def __init__(self, data: dict[str, Any], explicit: set[str]):
        self.data, self.explicit, self.given, self.warned = data, explicit, {}, set()

    def merge_file(self, user: dict[str, Any], source: str, record: bool = False) -> None:
        """Lay a config file's sections over the settings (a retired key is ignored: files outlive keys); `record`:
        the file records settings already used (not checked by the no-effect rule)."""
        for section, table in user.items():
            if section == "presets" and isinstance(table, dict):
                for name, recipe in table.items():  # a user file may define its own recipes
                    if not isinstance(recipe, dict):
                        raise ConfigError(f"{source}: preset 'presets.{name}' must be a mapping of dotted keys")
                    self.data["presets"][name] = recipe
                continue
            if section not in SECTION_NAMES:
                raise ConfigError(f"{source}: unknown config key '{section}'")
            if not isinstance(table, dict):
                raise ConfigError(f"{source}: '{section}' must be a mapping")
            for key, value in table.items():
                if f"{section}.{key}" not in RETIRED:
                    self.assign(f"{section}.{key}", value, source, record=record)

    def set_item(self, item: str) -> None:
        """Apply one "dotted.key=value"."""
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected dotted.key=value")
        dotted, raw = item.split("=", 1)
        try:
            value = parse_yaml(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        self.assign(dotted.strip(), value, "--set")

    def assign(self, dotted: str, value: Any, source: str, record: bool = False) -> None:
        """Set one key (by its current name when renamed) to a checked value, recording where it came from."""
        if dotted in RENAMED:
            if dotted not in self.warned:
                self.warned.add(dotted)
                log.warning("%s: '%s' is renamed '%s'; the old name goes in the next release", source, dotted,
                            RENAMED[dotted])
            dotted = RENAMED[dotted]
        if dotted in RETIRED:
            raise ConfigError(f"{source}: '{dotted}' was removed: {RETIRED[dotted]}")
        field = spec(dotted)
        section, _, key = dotted.partition(".")
        if field is None:
            if dotted in SECTION_NAMES:
                raise ConfigError(f"{source}: '{dotted}' is a section, set one of its keys")
            if section in SECTION_NAMES and section not in SECTIONS and key and "." not in key:
                self.data.setdefault(section, {})[key] = value  # another owner's section: it checks its keys
                self.explicit.add(dotted)
                return
            raise ConfigError(f"{source}: unknown config key '{dotted}'")
        self.data[section][key] = _checked(dotted, field, value, source)
        self.explicit.add(dotted)
        if not record:
            self.given[dotted] = source

    def result(self) -> Config:
        """The config, once no key this load gave is set to no effect (a `when=` of its field that does not hold),
        with every setting that follows others and is not set computed from them (again after each override, so a
        change of what it follows carries through), and once every rule between settings (`RULES`) holds."""
        for dotted, field in _followers():
            section, key = dotted.split(".")
            if section not in self.data:  # (a config loaded before that section's owner registered it)
                continue
            if self.data[section][key] is None or dotted not in self.explicit:
                self.explicit.discard(dotted)  # null means "follow"
                self.data[section][key] = _checked(dotted, field, field.metadata["follows"](self.data),
                                                   "unset, so following other settings")
        for dotted, source in self.given.items():
            field = spec(dotted)
            if field.metadata["when"] is None:
                continue
            section = dotted.split(".")[0]
            option, applies = field.metadata["when"]
            now = self.data[section][option]
            if now != applies and self.data[section][field.name] != default_of(field):
                raise ConfigError(f"{source}: '{dotted}' has no effect with {section}.{option}={as_yaml(now)} "
                                  f"(it applies to {as_yaml(applies)})")
        for rule in RULES:
            problem = rule(self.data)
            if problem:
                raise ConfigError(problem)
        return Config(self.data, self.explicit)


def check_setting(section: type, dotted: str, value: Any, source: str) -> Any:
    """`value` checked as the setting `dotted` of the section class `section` (type, choices, range): for a consumer
    that takes the value from code rather than from a config (a model constructor), so the constraints are written
    once; the class, not the registry, so that it holds in any process, whatever that registered."""
    key = dotted.partition(".")[2]
    field = {f.name: f for f in dataclasses.fields(section)}[key]
    return _checked(dotted, field, value, source, typing.get_type_hints(section)[key])


def _checked(dotted: str, field: Any, value: Any, source: str, kind: Any = None) -> Any:
    """`value` if it has the field's type (`kind`, else the registered one; see the module docstring) and meets its
    constraints, else ConfigError."""
    value = _typed(dotted, kind or _type_of(dotted), value, source)
    meta = field.metadata
    if meta["choices"] and value not in meta["choices"]:
        raise ConfigError(f"{source}: '{dotted}' must be one of {', '.join(map(str, meta['choices']))}; "
                          f"got {value!r}")
    _check_range(dotted, meta, value, source)
    if meta["check"] is not None:
        try:
            meta["check"](value)
        except ValueError as exc:
            raise ConfigError(f"{source}: {exc}") from None
    return value


def _followers() -> list[tuple[str, Any]]:
    """(dotted key, field) of every registered setting that follows others."""
    return [(f"{section}.{f.name}", f) for section, cls in SECTIONS.items() for f in dataclasses.fields(cls)
            if f.metadata["follows"] is not None]


def _check_range(dotted: str, meta: dict[str, Any], value: Any, source: str) -> None:
    """ConfigError unless `value` (each element of a list) is finite and in the field's range, and a list has its
    `length`."""
    if value is None or isinstance(value, (str, bool)):
        return
    if meta["length"] is not None and len(value) != meta["length"]:
        raise ConfigError(f"{source}: '{dotted}' must hold {meta['length']} numbers; got {len(value)}")
    for number in value if isinstance(value, list) else [value]:
        if not math.isfinite(number):
            raise ConfigError(f"{source}: '{dotted}' must be a finite number; got {value!r}")
        for name, sign, holds in _BOUNDS:
            if meta[name] is not None and not holds(number, meta[name]):
                raise ConfigError(f"{source}: '{dotted}' must be {sign} {meta[name]}; got {value!r}")


_BOUNDS = (("min", ">=", operator.ge), ("max", "<=", operator.le), ("above", ">", operator.gt),
           ("below", "<", operator.lt))


def _type_of(dotted: str) -> Any:
    section, key = dotted.split(".")
    return typing.get_type_hints(SECTIONS[section])[key]


def _typed(dotted: str, kind: Any, value: Any, source: str) -> Any:
    """`value` as a `kind` (int, float, str, bool, list[float], or one of those | None), else ConfigError."""
    args = typing.get_args(kind)
    if type(None) in args:  # X | None
        if value is None:
            return None
        kind = next(a for a in args if a is not type(None))
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is float and isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
        try:
            value, number = float(value), True
        except ValueError:
            pass
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = number and isinstance(value, int)
    elif kind is float:
        ok, value = number, float(value) if number else value
    elif kind is str:
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)  # `--set eval.frames=3`: YAML reads 3 as an int; the consumer parses it
        ok = isinstance(value, str)
    else:  # list[float]
        ok = isinstance(value, list) and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
        value = [float(v) for v in value] if ok else value
    if not ok:
        name = "list of numbers" if typing.get_origin(kind) is list else kind.__name__
        raise ConfigError(f"{source}: '{dotted}' must be {name}{' or null' if args else ''}, got "
                          f"{type(value).__name__} {value!r}")
    return value
