"""UnifyEdit hyperparameters (Mao et al., Sec. 3-5): one frozen config, a static and a traced part.

`UnifyEditConfig.static()` holds what shapes the compiled program: the number of DDIM steps, which
self-attention layers L_SAP reads, where the source maps come from and how many times the latent is
updated per step (MAX_IT). `UnifyEditConfig.numeric()` is a pytree of traced scalars: beta, k, tau,
the guidance, the blend start, and every switch of the ablations (gradient family, schedule form,
region SAP, blending), so a sweep over any of them, or an ablation study, is a vmap of one program.

Presets are the paper's Sec. 5.2 settings per edit type: `UnifyEditConfig.preset("color")`.
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from lusd_jax.configs import ConfigError

# Eq. 15 (balanced, scheduled lambdas), Eq. 13 (normalized, static lambdas), Eq. 12 (raw gradients,
# static lambdas), and the two one-constraint ablations (Sec. 5.5).
GRADIENTS = ("blc", "norm", "naive", "sap_only", "caa_only")
SCHEDULE_FORMS = ("eq14", "algorithm1")
INVERSIONS = ("nti", "ddim")
MAPS_FROM = ("denoising", "inversion")
OUTPUT_ROUNDINGS = ("round", "truncate")
EDIT_TYPES = ("color", "texture", "object", "background", "style", "face")
# Self-attention heights are given for SD's 64x64 latent (512 px) and scale with the latent.
REFERENCE_LATENT = 64


@dataclasses.dataclass(frozen=True)
class UnifyEditStatic:
  """The program-shaping part of `UnifyEditConfig` (hashable; a jit static argument)."""

  num_steps: int = 50
  sa_resolutions: str | tuple[int, ...] = "all"
  maps_from: str = "denoising"
  max_it: int = 1

  def sa_heights(self, latent_h: int) -> str | tuple[int, ...]:
    """The self-attention heights L_SAP reads at this latent height ("all" or a tuple)."""
    if self.sa_resolutions == "all":
      return "all"
    return tuple(sorted({r * latent_h // REFERENCE_LATENT for r in self.sa_resolutions}, reverse=True))


class UnifyEditNumeric(NamedTuple):
  """The traced part of `UnifyEditConfig` (scalars; [C] arrays when stacked for a sweep)."""

  guidance: jax.Array  # float32, w of classifier-free guidance in both branches
  beta1: jax.Array  # float32
  beta2: jax.Array  # float32
  k1: jax.Array  # float32
  k2: jax.Array  # float32
  tau1: jax.Array  # int32: L_CAA active while t >= tau1
  tau2: jax.Array  # int32: L_SAP active while t >= tau2
  blend_start: jax.Array  # float32: blending from t <= T - int(blend_start T)
  blend: jax.Array  # bool
  region_sap: jax.Array  # bool: Eq. 8 instead of Eq. 7 when a mask is given
  algorithm1_form: jax.Array  # bool: Algorithm 1's printed scheduler instead of Eq. 14
  scheduled: jax.Array  # bool: lambdas from the scheduler (blc, sap_only, caa_only), else beta
  normalized: jax.Array  # bool: unit-norm gradients (all but naive)
  use_sap: jax.Array  # bool
  use_caa: jax.Array  # bool


# The config fields passed traced (`numeric()`): a sweep may vary them within one program.
TRACED_FIELDS = (
  "guidance", "beta1", "beta2", "k1", "k2", "tau1", "tau2", "blend_start", "blend", "region_sap",
  "schedule_form", "gradient",
)  # fmt: skip
_INT_NUMERIC = ("tau1", "tau2")
_BOOL_NUMERIC = ("blend", "region_sap", "algorithm1_form", "scheduled", "normalized", "use_sap", "use_caa")


def _field(default, help_text: str):
  """A config field with a one-line help (read by the CLI)."""
  return dataclasses.field(default=default, metadata={"help": help_text})


@dataclasses.dataclass(frozen=True)
class UnifyEditConfig:
  """Every UnifyEdit hyperparameter. Defaults are the texture preset's (k = 0.08, tau = 25).

  For a denoising step with step index t = T, ..., 1 (not the DDPM timestep):
    lambda1 = beta1 (1 - exp(-k1 (T - t))), lambda2 = beta2 exp(-k2 (T - t))         (Eq. 14)
    G = lambda1 g_SAP / ||g_SAP|| + lambda2 g_CAA / ||g_CAA||                          (Eq. 15)
    z*_t <- z*_t - M (.) G                                                            (Eq. 16)
  with L_CAA active while t >= tau1 and L_SAP while t >= tau2.

  Static (`static()`; a change compiles a new program):
    num_steps: T, DDIM steps of inversion and editing.
    sa_resolutions: the self-attention layers of L_SAP: "all", or their feature-map heights for a
      64x64 latent (e.g. (16, 8) = latent/4 and latent/8 for object replacement); they scale with
      the latent (at 256 px, (16, 8) reads the 8x8 and 4x4 layers).
    maps_from: the source self-attention maps A^l: "denoising" (the source branch's latent) or
      "inversion" (the DDIM-inversion pass at the same timestep, Sec. 5.7).
    max_it: MAX_IT, latent updates per step.

  Traced (`numeric()`; changing them never recompiles):
    guidance: w in both branches (7.5).
    beta1, beta2, k1, k2: the scheduler (Eq. 14).
    tau1, tau2: the last step index at which L_CAA / L_SAP act.
    blend_start: localized edits blend the target into the source outside the mask from step index
      t <= T - int(blend_start T) on (Prompt-to-Prompt's LocalBlend start, 0.2).
    blend: the blending on (it needs a mask).
    region_sap: Eq. 8 (both maps restricted to the mask, M M^T) instead of Eq. 7, with a mask.
    schedule_form: "eq14" or "algorithm1" (beta1 exp(-k1 t), beta2 (1 - exp(-k2 t)), as printed in
      Algorithm 1; for comparison).
    gradient: "blc" (Eq. 15), "norm" (Eq. 13: unit-norm gradients, lambda = beta), "naive" (Eq. 12:
      raw gradients, lambda = beta), "sap_only" / "caa_only" (blc without the other constraint).

  Read by the inversion phase, the prompt analysis and the output:
    inversion: "nti" (null-text inversion, per-step null embeddings) or "ddim" ("" at every step).
    nti_inner_steps: most Adam steps per step of null-text inversion (10).
    edit_token_rule: how the edit token s* is found when no edit words are given (see
      `prompts.find_edit_tokens`: the nouns of the differing words).
    output_rounding: "round" or "truncate" for 8-bit images.
  """

  # static
  num_steps: int = _field(50, "T, DDIM steps")
  sa_resolutions: str | tuple[int, ...] = _field(
    "all", "L_SAP's self-attention layers: all, or heights at 64x64"
  )
  maps_from: str = _field("denoising", "source self-attention maps: denoising or inversion")
  max_it: int = _field(1, "MAX_IT, latent updates per step")
  # traced
  guidance: float = _field(7.5, "classifier-free guidance w of both branches")
  beta1: float = _field(5.0, "beta1, scale of lambda1 (L_SAP)")
  beta2: float = _field(5.0, "beta2, scale of lambda2 (L_CAA)")
  k1: float = _field(0.08, "k1, rate of lambda1")
  k2: float = _field(0.08, "k2, rate of lambda2")
  tau1: int = _field(25, "tau1, L_CAA acts while t >= tau1")
  tau2: int = _field(25, "tau2, L_SAP acts while t >= tau2")
  blend_start: float = _field(0.2, "blend from step index t <= T - int(blend_start T)")
  blend: bool = _field(True, "blend the target into the source outside the mask (with a mask)")
  region_sap: bool = _field(False, "Eq. 8: L_SAP inside the mask only (with a mask)")
  schedule_form: str = _field("eq14", "scheduler: eq14, or algorithm1 as printed")
  gradient: str = _field("blc", "update: blc, norm, naive, sap_only or caa_only")
  # inversion, prompts, output
  inversion: str = _field("nti", "inversion: nti (null-text) or ddim")
  nti_inner_steps: int = _field(10, "null-text inversion: most Adam steps per step")
  edit_token_rule: str = _field("paper", "edit-token rule when no edit words are given: paper or official")
  output_rounding: str = _field("round", "8-bit output: round or truncate")

  def __post_init__(self):
    res = self.sa_resolutions
    if isinstance(res, str) and res != "all":  # "16,8" (the command line's spelling)
      try:
        res = tuple(int(r) for r in res.split(","))
      except ValueError:
        pass  # reported below
    if isinstance(res, list | tuple):
      res = tuple(res)  # hashable
    object.__setattr__(self, "sa_resolutions", res)

    def need(ok: bool, field: str, what: str):
      if not ok:
        raise ConfigError(field, f"{what}, got {getattr(self, field)!r}", "UnifyEditConfig")

    def is_int(v) -> bool:
      return isinstance(v, numbers.Integral) and not isinstance(v, bool)

    need(is_int(self.num_steps) and 1 <= self.num_steps <= 1000, "num_steps", "must be an int in [1, 1000]")
    res = self.sa_resolutions
    need(
      res == "all" or (isinstance(res, tuple) and res and all(is_int(r) and r >= 1 for r in res)),
      "sa_resolutions",
      'must be "all" or positive ints such as 16,8 (self-attention heights at a 64x64 latent)',
    )
    need(self.maps_from in MAPS_FROM, "maps_from", f"must be one of {MAPS_FROM}")
    need(is_int(self.max_it) and self.max_it >= 1, "max_it", "must be an int >= 1")
    need(self.guidance >= 0, "guidance", "must be >= 0")
    for f in ("beta1", "beta2", "k1", "k2"):
      need(self.__dict__[f] >= 0, f, "must be >= 0")
    for f in ("tau1", "tau2"):
      need(is_int(self.__dict__[f]) and self.__dict__[f] >= 0, f, "must be an int >= 0")
    need(0 <= self.blend_start <= 1, "blend_start", "must be in [0, 1]")
    need(self.schedule_form in SCHEDULE_FORMS, "schedule_form", f"must be one of {SCHEDULE_FORMS}")
    need(self.gradient in GRADIENTS, "gradient", f"must be one of {GRADIENTS}")
    need(self.inversion in INVERSIONS, "inversion", f"must be one of {INVERSIONS}")
    need(is_int(self.nti_inner_steps) and self.nti_inner_steps >= 1, "nti_inner_steps", "must be an int >= 1")
    need(self.edit_token_rule in ("paper", "official"), "edit_token_rule", "must be paper or official")
    need(self.output_rounding in OUTPUT_ROUNDINGS, "output_rounding", f"must be one of {OUTPUT_ROUNDINGS}")

  # What the prompt analysis shared with LUSD reads (`prepare.check_edit`).
  edit_token_last_subtoken = False

  def check_timesteps(self, num_train_timesteps: int) -> None:
    """The DDIM steps against a model's schedule (T <= its training timesteps)."""
    if self.num_steps > num_train_timesteps:
      raise ConfigError(
        "num_steps", f"must be <= the model's {num_train_timesteps} training timesteps", "UnifyEditConfig"
      )

  @classmethod
  def preset(cls, edit_type: str, **overrides) -> UnifyEditConfig:
    """The paper's settings for an edit type (Sec. 5.2): beta1 = beta2 = 5 and

    color 0.05 (tau1 = 5), texture 0.08, object 0.15 (L_SAP on latent/4 and latent/8),
    background 0.08, style 0.10, face 0.25; k1 = k2 = k, tau1 = tau2 = 25 unless noted.
    """
    if edit_type not in EDIT_TYPES:
      raise ConfigError("edit_type", f"must be one of {EDIT_TYPES}, got {edit_type!r}", "UnifyEditConfig")
    k = {"color": 0.05, "texture": 0.08, "object": 0.15, "background": 0.08, "style": 0.10, "face": 0.25}
    fields = dict(beta1=5.0, beta2=5.0, k1=k[edit_type], k2=k[edit_type], tau1=25, tau2=25)
    if edit_type == "color":
      fields["tau1"] = 5
    if edit_type == "object":
      fields["sa_resolutions"] = (16, 8)
    return cls(**{**fields, **overrides})

  def replace(self, **changes) -> UnifyEditConfig:
    return dataclasses.replace(self, **changes)

  def static(self) -> UnifyEditStatic:
    return UnifyEditStatic(**{f.name: getattr(self, f.name) for f in dataclasses.fields(UnifyEditStatic)})

  def numeric(self) -> UnifyEditNumeric:
    g = self.gradient
    values = dict(
      guidance=self.guidance, beta1=self.beta1, beta2=self.beta2, k1=self.k1, k2=self.k2,
      tau1=self.tau1, tau2=self.tau2, blend_start=self.blend_start, blend=self.blend,
      region_sap=self.region_sap, algorithm1_form=self.schedule_form == "algorithm1",
      scheduled=g in ("blc", "sap_only", "caa_only"), normalized=g != "naive",
      use_sap=g != "caa_only", use_caa=g != "sap_only",
    )  # fmt: skip

    def dtype(name):
      return jnp.int32 if name in _INT_NUMERIC else jnp.bool_ if name in _BOOL_NUMERIC else jnp.float32

    return UnifyEditNumeric(
      **{name: jnp.asarray(values[name], dtype(name)) for name in UnifyEditNumeric._fields}
    )


def stack_numeric(configs: Sequence[UnifyEditConfig]) -> UnifyEditNumeric:
  """Stacks configs that share a static part into one numeric pytree with leaves [C] (for vmap).

  Raises:
    ValueError: if the configs differ in a static field.
  """
  if not configs:
    raise ValueError("stack_numeric needs at least one config")
  statics = {c.static() for c in configs}
  if len(statics) > 1:
    raise ValueError(f"configs differ in static fields and cannot share a program: {statics}")
  return jax.tree.map(lambda *xs: jnp.stack(xs), *[c.numeric() for c in configs])
