"""Typed configuration: the dataclass schema (`src.schema`) holds every default, YAML presets what differs, the
command line dotted overrides (`train.steps=200`). OmegaConf merges and type-checks; this module adds cross-field
checks, "did you mean", and the listing of every key (`describe`)."""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import typing
from pathlib import Path
from typing import Any, List

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException, ValidationError

from src import schema
from src.config_checks import DATA_SOURCES, TFDS_PREFIX, ConfigError, check as _check  # noqa: F401 (re-exported)
from src.schema import (  # noqa: F401 (re-exported: the schema's names are the config's)
    ATTENTION_IMPLS, REMAT_POLICIES, VARIANTS, Config, ConditioningConfig, DataConfig, LoRAConfig, MeshConfig,
    ModelConfig, ObjectiveConfig, OptimConfig, SyntheticConfig, TextConfig, TrainConfig, VAEConfig)


def valid_keys(node: Any = Config, prefix: str = "") -> list[str]:
  """Every dotted key of the schema, e.g. 'train.steps'."""
  keys = []
  for f in dataclasses.fields(node):
    key = f"{prefix}{f.name}"
    keys.append(key)
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if dataclasses.is_dataclass(default):
      keys += valid_keys(type(default), key + ".")
  return keys


def _comments() -> dict[tuple[str, str], str]:
  """(class, field) -> the field's comment in src/schema.py: on its line, else the comment lines right above it."""
  import io
  import tokenize

  source = inspect.getsource(schema)
  lines, own, trailing = source.splitlines(), {}, {}
  for tok in tokenize.generate_tokens(io.StringIO(source).readline):
    if tok.type == tokenize.COMMENT:
      row, col = tok.start
      text = tok.string.lstrip("#").strip()
      (own if not lines[row - 1][:col].strip() else trailing)[row] = text
  out = {}
  for cls in (n for n in ast.parse(source).body if isinstance(n, ast.ClassDef)):
    for stmt in (s for s in cls.body if isinstance(s, ast.AnnAssign)):
      found = [trailing[r] for r in range(stmt.lineno, stmt.end_lineno + 1) if r in trailing]
      if not found:
        row = stmt.lineno - 1
        while row in own:
          found.insert(0, own[row])
          row -= 1
      out[cls.name, stmt.target.id] = " ".join(found)
  return out


def _type_name(t) -> str:
  origin, args = typing.get_origin(t), typing.get_args(t)
  if origin is typing.Literal:
    return "|".join(map(str, args))
  if origin is typing.Union:
    return " or ".join("null" if a is type(None) else _type_name(a) for a in args)
  if origin in (list, tuple, dict):
    inner = ", ".join("..." if a is Ellipsis else _type_name(a) for a in args)
    return f"{origin.__name__}[{inner}]"
  return getattr(t, "__name__", str(t))


def describe(node: Any = Config, prefix: str = "", comments: dict | None = None) -> list[str]:
  """Every key of the schema, one line each: `key (type, default D): meaning`, under a header per section."""
  comments = _comments() if comments is None else comments
  hints, out = typing.get_type_hints(node, vars(schema)), []
  for f in dataclasses.fields(node):
    key = f"{prefix}{f.name}"
    default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    if dataclasses.is_dataclass(default):
      doc = " ".join((inspect.getdoc(type(default)) or "").split())
      out += ["", f"{key}: {doc}"] + describe(type(default), key + ".", comments)
    else:
      shown = yaml.safe_dump(default, default_flow_style=True, width=1e9).strip().removesuffix("...").strip()
      out.append(f"  {key} ({_type_name(hints[f.name])}, default {shown}): {comments[node.__name__, f.name]}")
  return out


def _hint(key: str) -> str:
  close = difflib.get_close_matches(key, valid_keys(), n=1, cutoff=0.5)
  if not close:  # a misspelt leaf under a right section: match the leaf name alone
    leaf = key.rsplit(".", 1)[-1]
    by_leaf = {k.rsplit(".", 1)[-1]: k for k in valid_keys()}
    close = [by_leaf[m] for m in difflib.get_close_matches(leaf, list(by_leaf), n=1, cutoff=0.6)]
  return f" Did you mean '{close[0]}'?" if close else ""


def _explain(err: OmegaConfBaseException, source: str, key: str = "") -> ConfigError:
  key = str(getattr(err, "full_key", "") or "") or key
  if isinstance(err, (ConfigKeyError, ConfigAttributeError)):
    return ConfigError(f"{source}: unknown config key '{key}'.{_hint(key)}")
  if isinstance(err, ValidationError):
    msg = str(err).splitlines()[0]
    what = "bad value" if msg.startswith("Invalid value") else "wrong type"  # Literal choices say the former
    return ConfigError(f"{source}: {what} for config key '{key}': {msg}")
  return ConfigError(f"{source}: {str(err).splitlines()[0]} (key '{key}')")


def load(path: str | Path | None = None, overrides: List[str] = ()) -> Config:
  """Defaults <- YAML file <- dotted `key=value` overrides, type-checked."""
  merged = OmegaConf.structured(Config)
  try:
    if path is not None:
      if not Path(path).is_file():
        raise ConfigError(f"config file not found: {path}")
      merged = OmegaConf.merge(merged, OmegaConf.load(path))
  except OmegaConfBaseException as e:
    raise _explain(e, str(path)) from None
  except yaml.YAMLError as e:  # a syntax error: file, line and column, one line
    mark = getattr(e, "problem_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
    raise ConfigError(f"{where}: YAML syntax error: {getattr(e, 'problem', None) or e}") from None
  for item in overrides:
    if "=" not in item:
      raise ConfigError(f"override '{item}' is not of the form key.sub=value.")
    try:
      merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
    except OmegaConfBaseException as e:
      raise _explain(e, f"override '{item}'", item.split("=", 1)[0]) from None
  cfg = OmegaConf.to_object(merged)
  _check(cfg)
  return cfg


def to_yaml(cfg: Config) -> str:
  return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> dict:  # plain dicts and lists, e.g. for a checkpoint's JSON
  return OmegaConf.to_container(OmegaConf.structured(cfg))


def from_dict(d: dict, source: str = "saved config") -> Config:
  """A config saved by `to_dict` (e.g. in a checkpoint), checked like a YAML file."""
  try:
    cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config), d))
  except OmegaConfBaseException as e:
    raise _explain(e, source) from None
  _check(cfg)
  return cfg
