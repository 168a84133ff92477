"""Typed configuration: dataclasses that round-trip to YAML, with ``key.sub=value`` overrides; where
the presets ship and where cached artefacts live."""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
import warnings
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


def to_dict(cfg: Any) -> dict:
    """A dataclass as plain YAML-able values (tuples become lists)."""
    def plain(v):
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(cfg)


RESUMABLE = "resumable"  # field metadata: ``--resume`` may change this setting (it does not define the run)


def resumable(default: Any = dataclasses.MISSING, *, default_factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field that a resumed run may change (how long it runs, how it logs and checkpoints, how the
    steps are computed), marked in its metadata; every other field defines the run."""
    return dataclasses.field(default=default, default_factory=default_factory, metadata={RESUMABLE: True})


def resumable_keys(cls: type, part: str = "") -> set[str]:
    """The dotted keys (as in ``key=value`` overrides) of the fields marked by ``resumable`` in dataclass
    ``cls`` and the dataclasses it nests; with ``part`` (a dotted key naming a nested dataclass) only
    those under it, e.g. ``resumable_keys(ImageConfig, "distill")`` -> {"distill.iterations", ...}."""
    for name in filter(None, part.split(".")):
        fields = {f.name for f in dataclasses.fields(cls)}
        if name not in fields:
            raise KeyError(f"{cls.__name__} has no field {name!r} (fields: {', '.join(sorted(fields))})")
        cls = _nested_dataclass(typing.get_type_hints(cls)[name])
        if cls is None:
            raise KeyError(f"{part} is a value, not a group of keys")

    def walk(c: type, prefix: str) -> set[str]:
        hints, keys = typing.get_type_hints(c), set()
        for f in dataclasses.fields(c):
            inner = _nested_dataclass(hints[f.name])
            if inner is not None:
                keys |= walk(inner, f"{prefix}{f.name}.")
            elif f.metadata.get(RESUMABLE):
                keys.add(prefix + f.name)
        return keys
    return walk(cls, f"{part}." if part else "")


def _nested_dataclass(tp: Any) -> type | None:
    """The dataclass a field of type ``tp`` holds (``X`` or ``X | None``), else None."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        tp = args[0] if len(args) == 1 else None
    return tp if isinstance(tp, type) and dataclasses.is_dataclass(tp) else None


class ConfigError(ValueError):
    """A bad config value or key; ``key`` is its dotted path (e.g. ``distill.lr``)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


def _convert(tp, value, where: str):
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(where, f"{where}: expected a mapping of keys, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or len(args) == 1:
            return None if value is None else _convert(args[0], value, where)
        for a in args:  # e.g. int | str: the first type the value is
            try:
                return _convert(a, value, where)
            except ConfigError:
                pass
        raise ConfigError(where, f"{where}: expected {' or '.join(a.__name__ for a in args)}, got {value!r}")
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(where, f"{where}: expected a mapping of keys, got {value!r:.80}")
        return dict(value)
    if origin in (tuple, list):
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(where, f"{where}: expected a list, got {value!r}")
        if origin is tuple and len(args) > 1 and args[-1] is not Ellipsis:  # fixed length, e.g. tuple[int, float]
            if len(value) != len(args):
                raise ConfigError(where, f"{where}: expected {len(args)} values, got {value!r}")
            return tuple(_convert(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        inner = args[0] if args else Any
        seq = [_convert(inner, v, where) for v in value]
        return tuple(seq) if origin is tuple else seq
    if tp is float and not isinstance(value, bool):
        try:  # PyYAML reads "3e-4" (no dot) as a string
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(where, f"{where}: expected a number, got {value!r}") from None
    if tp in (int, str, bool) and not isinstance(value, tp):
        raise ConfigError(where, f"{where}: expected {tp.__name__}, got {value!r}")
    return value


def from_dict(cls: type[T], data: dict | None, where: str = "") -> T:
    """Build dataclass ``cls`` from a dict. An unknown key is a ConfigError naming it by its dotted path,
    with the closest valid key when one is close."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            dotted = f"{where}.{key}" if where else key
            close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.6)
            hint = f"did you mean '{where + '.' if where else ''}{close[0]}'?" if close else \
                f"valid keys{' of ' + where if where else ''}: {', '.join(names)}"
            raise ConfigError(dotted, f"unknown config key '{dotted}'; {hint}")
    kwargs = {k: _convert(hints[k], v, f"{where}.{k}" if where else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except ValueError as e:  # a dataclass's own validation (__post_init__)
        raise ConfigError(where, f"{where + ': ' if where else ''}{e}") from None


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``a.b=value`` strings (value parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"override {item!r} must look like key=value (e.g. distill.iterations=100)")
        node = data
        *parents, leaf = key.strip().split(".")
        for p in parents:
            if not isinstance(node.setdefault(p, {}), dict):
                raise ValueError(f"override {item!r}: {p} is a value, not a group of keys")
            node = node[p]
        try:
            node[leaf] = safe_load(raw, f"override {key.strip()}")
        except yaml.YAMLError as e:
            shown = item if len(item) <= 100 else f"{item[:80]}...({len(item)} characters)"
            raise ValueError(f"override {shown!r}: the value is not valid YAML ({_yaml_problem(e)})") from None
    return data


def merge(base: dict, update: dict) -> dict:
    """``update`` read over ``base``: nested mappings merge key by key, everything else is replaced."""
    out = dict(base)
    for k, v in update.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


PRESETS = Path(__file__).parent / "configs"  # the YAML presets shipped with fdistill
DIGITS_PRESET = "digits"  # the default preset of the image commands (fdistill/configs/digits.yaml)


def cache_dir() -> Path:
    """Where fdistill caches what it computes once (the digits classifier, reference statistics):
    $FDISTILL_CACHE, else ~/.cache/fdistill."""
    return Path(os.environ.get("FDISTILL_CACHE") or Path.home() / ".cache" / "fdistill").expanduser()


MAX_YAML_BYTES = 1 << 20  # a config file (or an override's value) larger than this is refused, unread
MAX_YAML_DEPTH = 100  # nesting deeper than this is refused (PyYAML composes nodes recursively)


class SafeLoader(yaml.SafeLoader):
    """PyYAML's SafeLoader without anchors and aliases (``&a``, ``*a``, ``<<: *a``): an alias shares a node,
    and a few lines of aliases of aliases (a "billion laughs") expand, once copied, into billions of values.
    Nesting is bounded by MAX_YAML_DEPTH. Each refusal is a ``yaml.YAMLError`` with the line and column."""

    def __init__(self, stream) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise yaml.composer.ComposerError(None, None, "YAML anchors and aliases (&name, *name) are not "
                                              "accepted in fdistill configs; write each value out", event.start_mark)
        if self._depth >= MAX_YAML_DEPTH:
            raise yaml.composer.ComposerError(None, None, f"nested more than {MAX_YAML_DEPTH} levels deep",
                                              event.start_mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def safe_load(text: str, where: str) -> Any:
    """YAML ``text`` (from ``where``: a file, an override) by ``SafeLoader``: refused with one line when larger
    than MAX_YAML_BYTES, nested too deeply or using anchors and aliases; ``yaml.YAMLError`` when malformed."""
    if len(text) > MAX_YAML_BYTES:
        raise ValueError(f"{where} is {len(text)} characters of YAML; fdistill reads configs of at most "
                         f"{MAX_YAML_BYTES} bytes (1 MiB)")
    try:
        return yaml.load(text, Loader=SafeLoader)  # noqa: S506 (SafeLoader subclass)
    except RecursionError:
        raise ValueError(f"{where} is nested too deeply (at most {MAX_YAML_DEPTH} levels)") from None


def read_yaml_file(path: Path) -> Any:
    """The YAML in file ``path`` by ``safe_load``: a file over MAX_YAML_BYTES is refused before it is read."""
    size = path.stat().st_size
    if size > MAX_YAML_BYTES:
        raise ValueError(f"{path} is {size} bytes; fdistill reads YAML configs of at most {MAX_YAML_BYTES} bytes "
                         "(1 MiB)")
    with open(path, "rb") as f:
        data = f.read(MAX_YAML_BYTES + 1)  # bounded even if the file grew since
    return safe_load(data.decode(), str(path))


def _yaml_problem(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    what = getattr(e, "problem", None) or str(e).splitlines()[0]
    return f"{what} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else what


def preset_names() -> list[str]:
    return sorted(p.stem for p in PRESETS.glob("*.yaml"))


def load_yaml(path: str | Path) -> dict:
    """A YAML file, or a preset shipped with fdistill by name (``cifar10`` = fdistill/configs/cifar10.yaml).
    A run folder's ``config.yaml`` (``{run: ..., config: ...}``) gives its ``config``."""
    path = Path(path)
    if not path.is_file() and (PRESETS / f"{path}.yaml").is_file():
        path = PRESETS / f"{path}.yaml"
    if path.is_dir() and (path / RUN_CONFIG).is_file():
        path = path / RUN_CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path} (presets shipped with fdistill: "
                                f"{', '.join(preset_names())}; `fdistill presets` lists them)")
    try:
        data = read_yaml_file(path) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path} is not valid YAML: {_yaml_problem(e)}") from None
    except UnicodeDecodeError:
        raise ValueError(f"{path} is not a text (YAML) file") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a YAML mapping of keys at the top level, got {type(data).__name__}")
    if set(data) == {"run", "config"}:  # a run folder's config.yaml
        data = data["config"] or {}
    return data


def rename_keys(data: dict, renamed: dict[str, tuple[str, Any]]) -> dict:
    """Keys renamed since a config was written, read with a one-line notice naming the new key: ``renamed`` maps
    an old dotted key to (its new dotted key, the old default); an old key at its old default is dropped (a run
    folder's config.yaml records every key)."""
    for old, (new, default) in renamed.items():
        *parents, leaf = old.split(".")
        node = data
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if not (isinstance(node, dict) and leaf in node):
            continue
        value = node.pop(leaf)
        if value == default:
            continue
        warnings.warn(f"config key {old} is deprecated: read as {new}={value!r}; write {new} instead",
                      FutureWarning, stacklevel=3)
        *parents, leaf = new.split(".")
        node = data
        for p in parents:
            node = node.setdefault(p, {})
        node.setdefault(leaf, value)
    return data


def load(cls: type[T], path: str | Path | list | None, overrides: list[str] = (), base: dict | None = None,
         renamed: dict[str, tuple[str, Any]] | None = None) -> T:
    """Config ``cls`` from ``path`` (a YAML file, a preset name or a run folder, or a list of them, each read
    over the ones before, e.g. ``["cifar10", "fastgen"]``; all read over ``base`` when given), then the
    ``key=value`` overrides, then the ``renamed`` keys (``rename_keys``). Errors name the override or the file
    the bad key came from."""
    paths = [] if path is None else list(path) if isinstance(path, (list, tuple)) else [path]
    data = base or {}
    for p in paths:
        data = merge(data, load_yaml(p))
    path = None if not paths else ", ".join(map(str, paths))
    data = rename_keys(apply_overrides(data, list(overrides)), renamed or {})
    try:
        return from_dict(cls, data)
    except ConfigError as e:
        keys = {o.partition("=")[0].strip(): o for o in overrides}
        given = [o for k, o in keys.items() if e.key == k or e.key.startswith((k + ".", k + "["))]
        if not given and e.key:  # a section's own check failed: an override in it whose value the message quotes
            given = [o for k, o in keys.items() if k.startswith(e.key + ".")
                     and f"'{o.partition('=')[2].strip()}'" in str(e)]
        source = f"the override {given[-1]}" if given else str(path) if path is not None else "the defaults"
        raise ConfigError(e.key, f"{e} (in {source})") from None


RUN_CONFIG = "config.yaml"  # what a run folder records at start: {run: {command, teacher, ...}, config: {...}}


def save_yaml(cfg: Any, path: str | Path) -> None:
    with open(path, "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
