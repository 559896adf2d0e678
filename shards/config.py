"""The one config: `pipeline.yaml` defaults, an optional user file laid over them, then `--set` overrides.

It lives in `shards/` because both stages import `shards/` and because the config digest is part of the
on-disk contract (every sample records the digest of the settings that produced it).

The schema *is* the defaults file: a key that is not in `pipeline.yaml` is unknown, and a value must have the
type of its default (an int is accepted where a float is expected, and as its text where a string is, for
keys like `eval.frames: all | middle | 3`; a `null` default accepts any scalar).
Errors are one line, naming the key, raised as `ConfigError`.
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, Iterable

import yaml

from .names import PatternError, check_pattern

DEFAULTS_PATH = Path(__file__).resolve().parent.parent / "pipeline.yaml"


class ConfigError(ValueError):
    """A bad config file, key or value; the message is one line and names the key."""


class Config:
    """Read-only attribute view of a nested dict: `cfg.audio.num_mel_bins`."""

    def __init__(self, data: dict[str, Any], explicit: Iterable[str] = ()):
        object.__setattr__(self, "_data", data)
        object.__setattr__(self, "explicit", frozenset(explicit))

    def __getattr__(self, name: str) -> Any:
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
        data, explicit = copy.deepcopy(self._data), set(self.explicit)
        for item in sets:
            explicit.add(_apply_set(data, item))
        check_values(data, "config")
        return Config(data, explicit)

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

    `sections` reads only those sections of the file (a shard folder's frozen pipeline.yaml: only its sample-side
    settings mean anything). The result's `explicit` holds the dotted keys the file, presets and sets gave.

    A preset is an entry of the `presets:` section: a flat mapping of dotted keys to values, applied exactly
    like `--set` (so `--preset scale+` is shorthand for the handful of `--set`s of a recipe).
    `sets` are "dotted.key=value" strings, the value parsed as YAML.
    """
    data, explicit = _read_yaml(DEFAULTS_PATH), set()
    if path is not None:
        user = _read_yaml(Path(path))
        if sections is not None:
            user = {name: user[name] for name in sections if name in user}
        _merge(data, user, prefix="", source=str(path), explicit=explicit)
    for name in presets:
        table = data.get("presets", {})
        if name not in table:
            raise ConfigError(f"unknown preset {name!r}; known: {', '.join(sorted(table)) or 'none'}")
        for dotted, value in table[name].items():
            explicit.add(_apply_set(data, f"{dotted}={json.dumps(value)}"))
    for item in sets:
        explicit.add(_apply_set(data, item))
    check_values(data, "config" if path is None else str(path))
    return Config(data, explicit)


POSITIVE = ("audio.sample_rate", "audio.num_mel_bins", "video.num_frames", "video.image_size",
            "shards.samples_per_shard", "ray.num_cpus_per_task", "model.target_length", "model.num_mel_bins",
            "model.image_size")
NON_NEGATIVE = ("ray.workers", "ray.max_retries", "data.num_workers")


def check_values(data: dict[str, Any], source: str) -> None:
    """Values that type-check but cannot work, refused when the config loads (before anything is written, e.g. the
    frozen pipeline.yaml of an output folder): sizes that must be >= 1, and an unsafe `shards.pattern`."""
    for names, least in ((POSITIVE, 1), (NON_NEGATIVE, 0)):
        for dotted in names:
            section, key = dotted.split(".")
            value = data.get(section, {}).get(key)
            if value is not None and value < least:
                raise ConfigError(f"{source}: '{dotted}' must be >= {least}; got {value!r}")
    pattern = data.get("shards", {}).get("pattern")
    if pattern is not None:
        try:
            check_pattern(pattern)
        except PatternError as exc:
            raise ConfigError(f"{source}: {exc}") from None


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config ({exc.strerror or exc})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "invalid YAML"
        raise ConfigError(f"{path}: not valid YAML ({first})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections")
    return data


# Keys that existed once: a file that has them (a shard folder's frozen pipeline.yaml, an old run's config.yaml)
# still loads, ignoring them; `--set` of one is an error that says why it went.
RETIRED = {"data.shuffle_buffer": "every training epoch is a full permutation now, with no shuffle buffer"}


def _merge(base: dict[str, Any], over: dict[str, Any], prefix: str, source: str, explicit: set[str]) -> None:
    for key, value in over.items():
        dotted = f"{prefix}{key}"
        if dotted in RETIRED:
            continue
        if prefix == "presets." and isinstance(value, dict):
            base[key] = value  # a user file may define its own recipes
            continue
        if key not in base:
            raise ConfigError(f"{source}: unknown config key '{dotted}'")
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: '{dotted}' must be a mapping")
            _merge(base[key], value, prefix=f"{dotted}.", source=source, explicit=explicit)
        else:
            base[key] = _checked(dotted, base[key], value, source)
            explicit.add(dotted)


def _apply_set(data: dict[str, Any], item: str) -> str:
    """Apply one "dotted.key=value"; returns the dotted key."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected dotted.key=value")
    dotted, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    parts = dotted.strip().split(".")
    if dotted.strip() in RETIRED:
        raise ConfigError(f"--set: '{dotted.strip()}' was removed: {RETIRED[dotted.strip()]}")
    node = data
    for i, part in enumerate(parts):
        if not isinstance(node, dict) or part not in node:
            raise ConfigError(f"--set: unknown config key '{'.'.join(parts[: i + 1])}'")
        if i == len(parts) - 1:
            if isinstance(node[part], dict):
                raise ConfigError(f"--set: '{dotted}' is a section, set one of its keys")
            node[part] = _checked(dotted, node[part], value, "--set")
            return dotted.strip()
        else:
            node = node[part]


def _checked(key: str, default: Any, value: Any, source: str) -> Any:
    """Return `value` if it has the type of `default` (int widens to float), else raise ConfigError."""
    if default is None:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{source}: '{key}' must be a single value")
        return value
    if isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, float):
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, list):
        ok = isinstance(value, list)
    elif isinstance(default, str) and isinstance(value, int) and not isinstance(value, bool):
        value, ok = str(value), True  # `--set eval.frames=3`: YAML reads 3 as an int; the consumer parses it
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ConfigError(
            f"{source}: '{key}' must be {type(default).__name__}, got {type(value).__name__} {value!r}"
        )
    return value


def check_choice(cfg: Config, dotted: str, choices: Iterable[str]) -> str:
    """Value of `dotted` if it is one of `choices`, else a ConfigError naming the key."""
    value: Any = cfg
    for part in dotted.split("."):
        value = value[part]
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(f"config '{dotted}' must be one of {', '.join(choices)}; got {value!r}")
    return value
