"""LUSD hyperparameters: one flat frozen config, split into a static part and a traced part.

Field names follow the official code's `run.py` flags (`--num_steps`, `--lr`, `--reg_scale`,
`--t_min`, `--t_max`, `--ds_high`, `--ds_low`, `--speed`, `--threshold`,
`--threshold_decay_rate`, `--cross_attn_momentum`) so a CLI maps them one to one. Seeds
(`--init_seed`, `--num_seed`) and snapshots (`--save_step`) are arguments of the edit itself,
not of the algorithm.

`LUSDConfig.static()` holds what shapes the compiled program (number of steps, gradient family);
`LUSDConfig.numeric()` is a pytree of scalars passed traced, numbers and switches alike (ablations,
official-code behaviours), so changing one never recompiles and stacked numerics can be vmapped:

  cfgs = [LUSDConfig(reg_scale=r) for r in (0.0, 0.02, 0.05)]
  numeric_C = stack_numeric(cfgs)   # every leaf [3]
  jax.vmap(lambda n: edit_latents(..., n, static=cfgs[0].static(), ...))(numeric_C)
"""

from __future__ import annotations

import dataclasses
import numbers
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp

from lusd_jax.configs import ConfigError  # noqa: F401  (re-exported: LUSDConfig's errors)

GRADIENTS = ("sbp", "dds", "sds")
EDIT_TOKEN_RULES = ("paper", "official")
OUTPUT_ROUNDINGS = ("round", "truncate")
# Every Stable Diffusion 1.x/2.x schedule has 1000 training timesteps; a model's own count is
# checked by `LUSDConfig.check_timesteps`.
MAX_TRAIN_TIMESTEPS = 1000


@dataclasses.dataclass(frozen=True)
class LUSDStatic:
  """The program-shaping part of `LUSDConfig` (hashable; a jit static argument)."""

  num_steps: int = 300  # N: the length of the scan
  gradient: str = "sbp"  # the U-Net batch (1 row for "sds", 2 otherwise)


class LUSDNumeric(NamedTuple):
  """The traced part of `LUSDConfig`: scalars (or, stacked, [C] arrays for a vmapped sweep).

  Switches are traced booleans too, so an ablation study is a vmap, not a recompilation.
  """

  lr: jax.Array  # float32
  loss_scale: jax.Array  # float32
  reg_scale: jax.Array  # float32, lambda
  t_min: jax.Array  # int32
  t_max: jax.Array  # int32
  ds_high: jax.Array  # float32, gamma_high
  ds_low: jax.Array  # float32, gamma_low
  speed: jax.Array  # float32, sigmoid range of the gamma schedule
  threshold: jax.Array  # float32, eta_0
  threshold_decay_rate: jax.Array  # float32
  cross_attn_momentum: jax.Array  # float32, alpha
  max_attempts: jax.Array  # int32
  spatial_reg: jax.Array  # bool
  normalize: jax.Array  # bool
  anneal: jax.Array  # bool
  filtering: jax.Array  # bool
  redraw_t_on_reject: jax.Array  # bool
  mask_from_previous_step: jax.Array  # bool
  beta_linspace: jax.Array  # bool
  official_t_range: jax.Array  # bool
  accept_zero_direction: jax.Array  # bool


# The traced fields that are integers and booleans (the rest of `LUSDNumeric` is float32).
INT_NUMERIC = ("t_min", "t_max", "max_attempts")
BOOL_NUMERIC = (
  "spatial_reg",
  "normalize",
  "anneal",
  "filtering",
  "redraw_t_on_reject",
  "mask_from_previous_step",
  "beta_linspace",
  "official_t_range",
  "accept_zero_direction",
)


def _field(default, help_text: str):
  """A config field with a one-line help (read by the CLI)."""
  return dataclasses.field(default=default, metadata={"help": help_text})


@dataclasses.dataclass(frozen=True)
class LUSDConfig:
  """Every LUSD hyperparameter (paper Sec. 3-4, Algorithms 1-2, supplementary Sec. 6).

  Defaults are the paper's; `LUSDConfig.official()` switches on the behaviours of the official
  PyTorch code that produced the paper's numbers.

  Static (`static()`; a change compiles a new program):
    num_steps: N, optimization steps.
    gradient: "sbp" (eps_tgt(z_t) - eps_src(z_t), the paper's default), "dds" (eps_tgt(z_t) -
      eps_src(z_src,t), Appendix 14 / Eq. 6) or "sds" (eps_tgt(z_t) - eps). The mask, filtering,
      normalization and annealing apply to every family.

  Traced (`numeric()`; changing them never recompiles):
    lr: SGD learning rate (official `--lr`, default 1).
    loss_scale: the official code's fixed factor on the surrogate loss (backward of 2000 * loss);
      the optax.sgd learning rate is lr * loss_scale.
    reg_scale: lambda in d = (1 - lambda) M_hat * g + lambda (z - z_src).
    t_min, t_max: the timestep range.
    ds_high, ds_low: gamma_high and gamma_low of the annealing schedule.
    speed: gamma_k = ds_low + (ds_high - ds_low) (1 - sigmoid(linspace(-speed, speed, N)[k])).
    threshold: eta_0, the std(g) acceptance threshold at the start of each step.
    threshold_decay_rate: eta *= this after each rejection.
    cross_attn_momentum: alpha of the mask's moving average M_k = (1 - alpha) M_{k-1} + alpha M.
    max_attempts: at most this many U-Net calls per step; the last draw is used (and reported)
      when no draw passed the filter.

  Traced switches, ablations of the paper's Table 4:
    spatial_reg: attention mask and L2 pull to z_src. False: "no spatial regularization",
      lambda = 0 and M = 1.
    normalize: divide the update by its standard deviation (Eq. 4). False: "no normalization".
    anneal: scale the update by the reverse-sigmoid gamma_k. False: "no annealing", gamma = 1.
      The official `--no_direction_scale` is normalize=False, anneal=False.
    filtering: the std(g) >= eta acceptance test with redraws. False: "no filtering" (eta_0 = 0,
      the first draw is accepted).

  Traced switches, behaviours of the official code (all on in `official()`):
    redraw_t_on_reject: (1) a rejection redraws t together with eps (the paper keeps t).
    mask_from_previous_step: (2) the mask used at step k comes from the attention maps of step
      k-1's accepted U-Net call, so step 0 has no mask.
    beta_linspace: (3) beta_k = linspace(0, 1, N)[k] = k / (N - 1); the paper's is k / N.
    official_t_range: t is drawn as torch.randint(t_min, min(t_max, T) - 1), i.e. t <= t_max - 2;
      the paper draws t in {t_min, ..., t_max - 1}.
    accept_zero_direction: a draw whose unmasked update (1 - lambda) g + lambda (z - z_src) is
      exactly zero is accepted whatever its std (identical prompts at step 0).

  Read by the prompt analysis and the output, not by the optimization:
    edit_token_rule: "paper" (the differing substring, case-insensitive, positions from character
      offsets; `prompts.find_edit_tokens`) or "official" (5): the official code's rule, bug-compatible
      (position-wise after the common suffix, case-sensitive, punctuation dropped from the count).
    edit_token_last_subtoken: official behaviour (4): each edit word contributes only its last
      sub-token position (the paper averages all its sub-tokens).
    output_rounding: "round" (nearest 8-bit level) or "truncate" (7): the official code's
      `(x * 255).astype(uint8)`, half a level darker on average.
  """

  # static
  num_steps: int = _field(300, "N, optimization steps")
  gradient: str = _field("sbp", "score-distillation gradient: sbp, dds or sds")
  # traced numbers
  lr: float = _field(1.0, "SGD learning rate (times loss_scale)")
  loss_scale: float = _field(2000.0, "the official code's factor on the surrogate loss")
  reg_scale: float = _field(0.02, "lambda, weight of the pull back to the source latent")
  t_min: int = _field(50, "smallest timestep drawn")
  t_max: int = _field(950, "timesteps are drawn below this")
  ds_high: float = _field(0.15, "gamma_high, update scale at the start")
  ds_low: float = _field(0.01, "gamma_low, update scale at the end")
  speed: float = _field(5.0, "sigmoid range of the gamma schedule")
  threshold: float = _field(0.01, "eta_0, std(g) acceptance threshold")
  threshold_decay_rate: float = _field(0.99, "eta is multiplied by this after each rejection")
  cross_attn_momentum: float = _field(0.1, "alpha, moving-average weight of a new mask")
  max_attempts: int = _field(1000, "at most this many draws per step")
  # traced switches: ablations
  spatial_reg: bool = _field(True, "attention mask and pull to the source (off: lambda = 0, M = 1)")
  normalize: bool = _field(True, "divide the update by its std")
  anneal: bool = _field(True, "scale the update by gamma_k (off: gamma = 1)")
  filtering: bool = _field(True, "redraw while std(g) < eta (off: accept the first draw)")
  # traced switches: official-code behaviours
  redraw_t_on_reject: bool = _field(False, "official: redraw t with eps after a rejection")
  mask_from_previous_step: bool = _field(False, "official: mask from the previous step's attention maps")
  beta_linspace: bool = _field(False, "official: beta_k = k / (N - 1) instead of k / N")
  official_t_range: bool = _field(False, "official: t < t_max - 1 (torch.randint(t_min, t_max - 1))")
  accept_zero_direction: bool = _field(False, "official: accept an all-zero update whatever its std")
  # prompt analysis and output
  edit_token_rule: str = _field("paper", "edit-token rule: paper or official (bug-compatible)")
  edit_token_last_subtoken: bool = _field(False, "official: only each edit word's last sub-token")
  output_rounding: str = _field("round", "8-bit output: round, or truncate as the official code")

  def __post_init__(self):
    def need(ok: bool, field: str, what: str):
      if not ok:
        raise ConfigError(field, f"{what}, got {getattr(self, field)!r}")

    need(
      isinstance(self.num_steps, numbers.Integral) and self.num_steps >= 1, "num_steps", "must be an int >= 1"
    )
    need(self.gradient in GRADIENTS, "gradient", f"must be one of {GRADIENTS}")
    need(self.lr >= 0, "lr", "must be >= 0")
    need(self.loss_scale > 0, "loss_scale", "must be > 0")
    need(0 <= self.reg_scale <= 1, "reg_scale", "must be in [0, 1]")
    need(isinstance(self.t_min, numbers.Integral) and self.t_min >= 0, "t_min", "must be an int >= 0")
    need(
      isinstance(self.t_max, numbers.Integral) and self.t_max > self.t_min,
      "t_max",
      f"must be an int > t_min={self.t_min}",
    )
    if self.official_t_range:
      need(self.t_max - 1 > self.t_min, "t_max", "must exceed t_min + 1 with official_t_range")
    need(self.ds_low >= 0, "ds_low", "must be >= 0")
    need(self.ds_high >= self.ds_low, "ds_high", f"must be >= ds_low={self.ds_low}")
    need(self.speed >= 0, "speed", "must be >= 0")
    need(self.threshold >= 0, "threshold", "must be >= 0")
    need(0 < self.threshold_decay_rate <= 1, "threshold_decay_rate", "must be in (0, 1]")
    need(0 < self.cross_attn_momentum <= 1, "cross_attn_momentum", "must be in (0, 1]")
    need(
      isinstance(self.max_attempts, numbers.Integral) and self.max_attempts >= 1,
      "max_attempts",
      "must be an int >= 1",
    )
    need(self.edit_token_rule in EDIT_TOKEN_RULES, "edit_token_rule", f"must be one of {EDIT_TOKEN_RULES}")
    need(self.output_rounding in OUTPUT_ROUNDINGS, "output_rounding", f"must be one of {OUTPUT_ROUNDINGS}")
    need(
      self.t_max <= MAX_TRAIN_TIMESTEPS,
      "t_max",
      f"must be <= {MAX_TRAIN_TIMESTEPS} (no Stable Diffusion schedule has more timesteps)",
    )

  def check_timesteps(self, num_train_timesteps: int) -> None:
    """Checks the t range against a model's schedule (timesteps 0 .. num_train_timesteps - 1).

    Raises:
      ConfigError: t_max above num_train_timesteps (t is drawn below t_max), so no t is ever capped
        silently; t_min must leave a timestep to draw.
    """
    if self.t_max > num_train_timesteps:
      raise ConfigError(
        "t_max", f"must be <= the model's {num_train_timesteps} training timesteps, got {self.t_max}"
      )

  @classmethod
  def official(cls, **overrides) -> LUSDConfig:
    """The official PyTorch code's behaviours (see README, "Paper vs. official code")."""
    flags = dict(
      redraw_t_on_reject=True,
      mask_from_previous_step=True,
      beta_linspace=True,
      edit_token_rule="official",
      edit_token_last_subtoken=True,
      official_t_range=True,
      accept_zero_direction=True,
      output_rounding="truncate",
    )
    return cls(**{**flags, **overrides})

  def replace(self, **changes) -> LUSDConfig:
    return dataclasses.replace(self, **changes)

  def static(self) -> LUSDStatic:
    return LUSDStatic(**{f.name: getattr(self, f.name) for f in dataclasses.fields(LUSDStatic)})

  def numeric(self) -> LUSDNumeric:
    def dtype(name):
      return jnp.int32 if name in INT_NUMERIC else jnp.bool_ if name in BOOL_NUMERIC else jnp.float32

    return LUSDNumeric(
      **{name: jnp.asarray(getattr(self, name), dtype(name)) for name in LUSDNumeric._fields}
    )


def stack_numeric(configs: Sequence[LUSDConfig]) -> LUSDNumeric:
  """Stacks configs that share a static part into one numeric pytree with leaves [C], for vmap.

  Raises:
    ValueError: if the configs differ in a static field (they would need different programs).
  """
  if not configs:
    raise ValueError("stack_numeric needs at least one config")
  statics = {c.static() for c in configs}
  if len(statics) > 1:
    raise ValueError(f"configs differ in static fields and cannot share a program: {statics}")
  return jax.tree.map(lambda *xs: jnp.stack(xs), *[c.numeric() for c in configs])
