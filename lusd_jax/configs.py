"""Frozen-dataclass configs from `config.json` dicts: the one rule for known, unknown and ignored keys.

diffusers and transformers write bookkeeping beside the architecture keys (`_class_name`,
`_diffusers_version`, generation defaults, dropouts). Every config's `from_dict` goes through
`config_kwargs`, which says per config which of those it drops and which unknown key is an error.
This module imports nothing from the project, so the models and `schedule` may use it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Mapping
from typing import Any


class ConfigError(ValueError):
  """A hyperparameter out of range; `field` names the config field (the CLI names its flag)."""

  def __init__(self, field: str, problem: str, config: str = "LUSDConfig"):
    self.field = field
    self.problem = problem
    super().__init__(f"{config}.{field} {problem}")


def tuplify(value: Any) -> Any:
  """Lists (JSON arrays) as tuples, nested ones too: configs are hashable (they pick compiled programs)."""
  if isinstance(value, list | tuple):
    return tuple(tuplify(v) for v in value)
  return value


def config_kwargs(
  cls: type,
  d: Mapping[str, Any],
  *,
  name: str,
  strict: bool = True,
  ignore: Collection[str] = (),
  default_only: Mapping[str, Any] | None = None,
  convert: Callable[[str, Any], Any] | None = None,
) -> dict[str, Any]:
  """The keyword arguments of the dataclass `cls` in a `config.json` dict.

  Keys starting with "_" (diffusers' / transformers' metadata) and `ignore` keys are dropped; a
  `default_only` key is dropped when it holds that default and an error otherwise; a key that is not
  a field of `cls` is an error when `strict`, else dropped. Values pass through `tuplify`, then
  `convert(key, value)` when given.

  Args:
    cls: a dataclass.
    d: the `config.json` contents.
    name: the config's name in error messages ("UNet config").
    strict: whether an unknown key is an error (architecture configs) or ignored (a scheduler's
      sampler settings, transformers' vision config).
    ignore: keys that change nothing this code computes.
    default_only: key -> the only value this implementation supports.
    convert: rewrites a known key's value (e.g. a list of token ids -> its first id).

  Returns:
    `{field: value}` for `cls(**kwargs)`.

  Raises:
    ValueError: naming the key, for an unknown key (when `strict`) or a `default_only` key with
      another value.
  """
  fields = {f.name for f in dataclasses.fields(cls)}
  default_only = default_only or {}
  kwargs = {}
  for key, value in d.items():
    if key.startswith("_") or key in ignore:
      continue
    value = tuplify(value)
    if key in default_only:
      if value != default_only[key]:
        raise ValueError(
          f"{name}: {key}={value!r} is not supported (only the default {default_only[key]!r})."
        )
      continue
    if key not in fields:
      if strict:
        raise ValueError(f"{name}: unknown key {key!r} (value {value!r}).")
      continue
    kwargs[key] = convert(key, value) if convert else value
  return kwargs
