"""The editing methods that the engine runs, by name (the command line's `--method`).

Each entry names a method's `engine.Method` class (its compiled steps) and its config class (a
frozen dataclass with `static()` and `numeric()`). The engine never imports a method; this registry
sits above both, and the pipeline and the command line read it.
"""

from __future__ import annotations

from typing import NamedTuple

from lusd_jax.lusd.config import LUSDConfig
from lusd_jax.lusd.core import LUSD
from lusd_jax.unifyedit.config import UnifyEditConfig
from lusd_jax.unifyedit.core import UnifyEdit


class MethodEntry(NamedTuple):
  method: type  # an engine.Method (frozen dataclass)
  config: type  # its config: static() / numeric()
  summary: str  # one line for --help


METHODS: dict[str, MethodEntry] = {
  "lusd": MethodEntry(LUSD, LUSDConfig, "Localized Update Score Distillation (ICCV 2025)"),
  "unifyedit": MethodEntry(
    UnifyEdit, UnifyEditConfig, "UnifyEdit: attention-constrained latent optimization (Mao et al.)"
  ),
}


def get(name: str) -> MethodEntry:
  """The registry entry of `name`; ValueError naming the known methods otherwise."""
  if name not in METHODS:
    raise ValueError(f"unknown method {name!r}; choose one of: {', '.join(METHODS)}")
  return METHODS[name]
