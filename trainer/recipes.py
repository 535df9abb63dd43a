"""Recipes in, config.yaml out: a YAML file or a shipped recipe by name (configs/, installed as odis.configs),
then dotted overrides (`optim.lr=1e-3`) and the command's own options, into trainer.config.Config.

Bad input raises ConfigError naming the key, and the file when the file set it.
"""
from __future__ import annotations

import dataclasses
import math
from importlib import resources
from pathlib import Path
from typing import Any, Mapping, get_type_hints

import yaml

from odis.files import write_atomic
from odis.trainer.config import Config, ConfigError, to_dict


def _coerce(value: Any, typ: Any, key: str) -> Any:
    """Turn a YAML value into the field's type, or say which key is wrong."""
    origin = getattr(typ, "__origin__", None)
    args = getattr(typ, "__args__", ())
    if value is None:
        if type(None) in args or typ is Any:
            return None
        raise ConfigError(f"config key {key!r} may not be null", key)
    if origin is tuple or typ is tuple:
        if not isinstance(value, (list, tuple)) or (args and len(value) != len(args)):
            raise ConfigError(f"config key {key!r} expects a list of {len(args)} numbers, got {value!r}", key)
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    if args and type(None) in args:  # Optional[X] / X | None
        inner = [a for a in args if a is not type(None)][0]
        return _coerce(value, inner, key)
    if typ is float:
        return _finite(value, key)
    if typ in (int, str, bool) and not isinstance(value, typ):
        raise ConfigError(f"config key {key!r} expects {typ.__name__}, got {value!r}", key)
    if typ is int and isinstance(value, bool):
        raise ConfigError(f"config key {key!r} expects int, got {value!r}", key)
    return value


def _finite(value: Any, key: str) -> float:
    """A float from a number or a string (YAML reads "1e-3", without a dot, as a string). true/false are no
    numbers, and nan/inf are refused here: nan passes no range check (every comparison is false)."""
    try:
        number = math.nan if isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        raise ConfigError(f"config key {key!r} expects a finite number, got {value!r}", key)
    return number


def _set(cfg: Any, dotted: Any, value: Any, prefix: str = "") -> list[str]:
    """Set one (dotted) key, or a section from a mapping. Returns the dotted keys set, for load_config's errors."""
    if not isinstance(dotted, str):  # YAML reads `1:` or `true:` as a number or a bool
        key = prefix + str(dotted)
        raise ConfigError(f"config key {key!r} must be a name, got the {type(dotted).__name__} {dotted!r}", key)
    head, _, rest = dotted.partition(".")
    hints = get_type_hints(type(cfg))
    if head not in hints:
        known = ", ".join(sorted(hints))
        raise ConfigError(f"unknown config key {prefix + head!r} (known here: {known})", prefix + head)
    if rest:
        return _set(getattr(cfg, head), rest, value, prefix + head + ".")
    if dataclasses.is_dataclass(hints[head]):
        if not isinstance(value, dict):
            raise ConfigError(f"config key {prefix + head!r} is a section; give a mapping", prefix + head)
        return [done for k, v in value.items() for done in _set(getattr(cfg, head), k, v, prefix + head + ".")]
    setattr(cfg, head, _coerce(value, hints[head], prefix + head))
    return [prefix + head]


YAML_NULLS = ("", "~", "null", "Null", "NULL")  # what YAML reads as null: an override sets None with them


def _hint(cfg: Any, dotted: str) -> Any:
    """The type of a dotted config key; None for an unknown one (_set names it)."""
    head, _, rest = dotted.partition(".")
    hint = get_type_hints(type(cfg)).get(head)
    if rest and hint is not None and dataclasses.is_dataclass(hint):
        return _hint(getattr(cfg, head), rest)
    return None if rest else hint


def _is_text(hint: Any) -> bool:
    """A `str` or `str | None` setting."""
    return hint is str or set(getattr(hint, "__args__", ())) == {str, type(None)}


def _parse_yaml(text: str, where: str, lines: bool) -> Any:
    """YAML -> Python, or a ConfigError naming `where` (and, with `lines`, the line) of the syntax error."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}{_yaml_error_line(e, text) if lines else ''}: not valid YAML: "
                          f"{_yaml_problem(e, lines)}") from None


def _yaml_error_line(e: yaml.YAMLError, text: str) -> str:
    mark = getattr(e, "problem_mark", None)
    if mark is not None:
        return f", line {mark.line + 1}, column {mark.column + 1}"
    position = getattr(e, "position", None)  # a ReaderError (a character YAML does not allow) has an offset
    if position is None:
        return ""
    line = text.count("\n", 0, position) + 1
    return f", line {line}"


def _yaml_problem(e: yaml.YAMLError, lines: bool) -> str:
    """The parser's problem in one line, with what it was parsing (and from which line): a missing `]` shows up
    only at the end of the file."""
    if getattr(e, "problem", None) is None:  # a ReaderError: its first line is the problem
        return str(e).splitlines()[0]
    context, mark = getattr(e, "context", None), getattr(e, "context_mark", None)
    if context and mark is not None and lines:
        context += f" from line {mark.line + 1}"
    return e.problem + (f" ({context})" if context else "")


def _read_config_file(path: Path) -> dict:
    """The top-level mapping of a YAML config file; errors name the file."""
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        raw = path.read_bytes()
    except OSError as e:  # permissions, a vanished mount: cli/train.py prints ValueErrors, not OSErrors
        raise ConfigError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"{path}, line {line}: not UTF-8 text (byte {raw[e.start]:#04x}: {e.reason}); save it "
                          "as UTF-8") from None
    data = _parse_yaml(text, str(path), lines=True) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a config file must be a mapping at the top level")
    return data


def recipe_names() -> list[str]:
    """The recipes that ship with odis (`configs/*.yaml`, installed as odis.configs)."""
    return sorted(p.name[:-5] for p in resources.files("odis.configs").iterdir() if p.name.endswith(".yaml"))


def find_recipe(name_or_path: str | Path) -> Path:
    """A recipe file: `name_or_path` itself when it is a file, else a shipped recipe by name (`vit_small_coco`,
    `vit_small_coco.yaml` or `configs/vit_small_coco.yaml`), so that `-c` works from any folder."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    stem = path.name[:-5] if path.name.endswith(".yaml") else path.name
    if stem in recipe_names() and (path.parent == Path(".") or path.parent.name == "configs"):
        return Path(str(resources.files("odis.configs") / f"{stem}.yaml"))
    raise FileNotFoundError(f"config file not found: {name_or_path} (a path, or one of the shipped recipes: "
                            f"{', '.join(recipe_names())})")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                options: Mapping[str, Any] | None = None) -> Config:
    """Defaults <- YAML file <- `key.sub=value` overrides (values parsed as YAML: numbers, lists, null; a text
    setting takes the text as typed, unless quoted or null) <- `options` ({dotted key: value}, None left out).

    Bad input raises ConfigError (a ValueError) naming the key, and the file when the file set it."""
    cfg = Config()
    source: dict[str, str | None] = {}  # key -> the file that set it last (None: an override, which names itself)
    if path is not None:
        path = find_recipe(path)
        for key, value in _read_config_file(path).items():
            try:
                source.update(dict.fromkeys(_set(cfg, key, value), str(path)))
            except ConfigError as e:
                raise ConfigError(f"{path}: {e}", *e.keys) from None
    for item in overrides or []:
        key, eq, raw = item.partition("=")
        if not eq:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key = key.strip()
        if _is_text(_hint(cfg, key)) and not raw.lstrip().startswith(("'", '"')) and raw.strip() not in YAML_NULLS:
            value = raw.strip()  # a text setting takes the text as typed: `out=runs/exp #3`, `data.shards=2024-01-01`
        else:
            value = _parse_yaml(raw, f"override {item!r}", lines=False)
        source.update(dict.fromkeys(_set(cfg, key, value)))
    for key, value in (options or {}).items():  # a command's own options, typed already: last word
        if value is not None:
            source.update(dict.fromkeys(_set(cfg, key, value)))
    try:
        return cfg.validate()
    except ConfigError as e:
        wheres = [source[k] for k in e.keys if k in source]
        if not wheres or None in wheres:  # defaults only, or an override had a hand in it: the key names it
            raise
        raise ConfigError(f"{wheres[0]}: {e}", *e.keys) from None


def save_config(cfg: Config, path: str | Path) -> None:
    """config.yaml, written atomically: a resume compares against it."""
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    write_atomic(path, lambda tmp: tmp.write_text(text))
