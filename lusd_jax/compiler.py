"""XLA compiler options for lusd-jax's compiled programs, and `jit`, which applies them.

Every program lusd-jax compiles (the LUSD steps, the VAE, the text and image encoders, the
benchmarks) goes through `jit` here: `jax.jit` with `compiler_options=COMPILER_OPTIONS`. The
options are per program, so JAX code outside lusd-jax is left as the user configured it.

The one option today concerns XLA:CPU. Since jaxlib 0.10, XLA:CPU hands dots, reductions and
convolutions to YNNPACK (`xla_cpu_experimental_ynn_fusion_type` = individual_dot,
individual_convolution, reduce). On the 2-core AMD EPYC of `benchmarks/RESULTS.md`, YNNPACK's 3x3
convolutions run 1.2-1.4x slower than XLA's own at every SD1.5 shape (64x64x320 ... 16x16x1280),
and they made the U-Net forward 1.2x PyTorch's (oneDNN). lusd-jax keeps XLA's default list minus
individual_convolution. The U-Net forward then runs as fast as PyTorch's at 512x512, and 0.9x its
time at 256x256. The option names a CPU debug option, which GPU and TPU compilers ignore.

Two private JAX names, kept on purpose: JAX has no public way to read XLA's default debug options
(`jax._src.lib._jax.CompileOptions`, for the default fusion list) nor to ask whether a trace is
under way (`jax._src.core.trace_state_clean`; `compiler_options` are refused on a jit nested in
another). The alternatives were worse: hard-coding jaxlib's default list would silently turn on
options that a later jaxlib dropped or renamed, and dropping the option costs the U-Net 1.2x on CPU.
Both reads are guarded here (a missing name means "leave XLA alone"), so the library never breaks;
`tests/test_compiler.py::test_private_jax_names_still_work` fails loudly, not skips, when either
name moves or XLA:CPU's default list stops holding YNNPACK convolutions, so that a jaxlib upgrade
re-measures instead of silently losing the speed-up.

To choose for yourself, put the flag in `XLA_FLAGS` before starting Python. lusd-jax then passes no
option of its own, e.g. XLA's default again:

  XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=individual_dot,individual_convolution,reduce

Example:

  from lusd_jax.compiler import jit

  @jit
  def f(x):
    return x * 2
"""

from __future__ import annotations

import functools
import os

import jax

YNN_FUSION_OPTION = "xla_cpu_experimental_ynn_fusion_type"
# The YNNPACK fusion type that lusd-jax turns off (see the module docstring for the measurements).
SLOW_YNN_FUSION_TYPES = ("LIBRARY_FUSION_TYPE_INDIVIDUAL_CONVOLUTION",)


def default_ynn_fusion_types() -> tuple[str, ...] | None:
  """The YNNPACK fusion types XLA:CPU uses by default in this jaxlib, or None if it has no such option.

  Read from a default `CompileOptions` (no backend is started); `XLA_FLAGS` is part of that default.
  """
  try:
    from jax._src.lib import _jax  # noqa: PLC0415  (private: guarded, a missing name means "unknown")

    # Keep each parent alive while reading: the children are views into it.
    options = _jax.CompileOptions()
    build_options = options.executable_build_options
    text = str(build_options.debug_options)
  except Exception:  # noqa: BLE001  (any failure: leave XLA's defaults alone)
    return None
  prefix = YNN_FUSION_OPTION + ":"
  return tuple(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith(prefix))


def compiler_options(xla_flags: str | None = None, defaults: tuple[str, ...] | None = None) -> dict[str, str]:
  """The options `jit` passes to XLA: {} or {YNN_FUSION_OPTION: comma-separated enum names}.

  Args:
    xla_flags: the `XLA_FLAGS` in effect (default: the environment's). A flag naming
      `xla_cpu_experimental_ynn_fusion_type` there is the user's choice: no option is added.
    defaults: XLA's default fusion types (default: `default_ynn_fusion_types()`).

  Returns:
    {} when the user chose, when this jaxlib has no such option, or when XLA's default list has
    nothing to drop; else the default list minus `SLOW_YNN_FUSION_TYPES`.
  """
  xla_flags = os.environ.get("XLA_FLAGS", "") if xla_flags is None else xla_flags
  if YNN_FUSION_OPTION in xla_flags:
    return {}
  defaults = default_ynn_fusion_types() if defaults is None else defaults
  if not defaults:
    return {}
  kept = [t for t in defaults if t not in SLOW_YNN_FUSION_TYPES]
  if len(kept) == len(defaults) or not kept:
    return {}
  return {YNN_FUSION_OPTION: ",".join(kept)}


# Read once, when lusd_jax is imported: set XLA_FLAGS before that (as for any XLA flag).
COMPILER_OPTIONS = compiler_options()


def _top_level() -> bool:
  """Whether JAX is tracing nothing now (a jit called here compiles its own program)."""
  try:
    from jax._src import core  # noqa: PLC0415  (private: guarded, unknown means "not top level")

    return bool(core.trace_state_clean())
  except (ImportError, AttributeError):
    return False


class Program:
  """A function jitted twice: with the options for top-level calls, plainly when traced inside another.

  JAX takes `compiler_options` only on a top-level jit: a program staged into an outer jit, scan or
  vmap compiles with the outer program's options. `core.run_steps`, the VAE and the encoders are
  called both ways, so each call picks the matching `jax.jit` object. Anything else (`_cache_size`,
  `eval_shape`, `trace`) is the top-level one's.
  """

  def __init__(self, fun, options: dict[str, str], kwargs: dict):
    self._top = jax.jit(fun, compiler_options=options or None, **kwargs)
    self._nested = jax.jit(fun, **kwargs) if options else self._top
    functools.update_wrapper(self, fun)

  def _pick(self):
    return self._top if _top_level() else self._nested

  def __call__(self, *args, **kwargs):
    return self._pick()(*args, **kwargs)

  def lower(self, *args, **kwargs):
    return self._pick().lower(*args, **kwargs)

  def __getattr__(self, name):
    if name.startswith("__") or name in ("_top", "_nested"):
      raise AttributeError(name)
    return getattr(self._top, name)


def jit(fun=None, **kwargs):
  """`jax.jit` with lusd-jax's `COMPILER_OPTIONS` on top-level calls; same arguments, `@jit` or `partial(jit, ...)`.

  Returns a `Program` (callable, with `lower`), which is plain `jax.jit` when traced inside another
  program.
  """
  if fun is None:
    return functools.partial(jit, **kwargs)
  options = {**COMPILER_OPTIONS, **kwargs.pop("compiler_options", {})}
  return Program(fun, options, kwargs)
