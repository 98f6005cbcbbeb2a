"""lusd_jax.compiler: the XLA options every lusd-jax program compiles with."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lusd_jax import compiler
from lusd_jax.models import vae
from lusd_jax.tiny import TINY_VAE

DOT, CONV, REDUCE = (
  f"LIBRARY_FUSION_TYPE_{t}" for t in ("INDIVIDUAL_DOT", "INDIVIDUAL_CONVOLUTION", "REDUCE")
)


def test_options_drop_only_ynn_convolutions():
  options = compiler.compiler_options(xla_flags="", defaults=(DOT, CONV, REDUCE))
  assert options == {compiler.YNN_FUSION_OPTION: f"{DOT},{REDUCE}"}


@pytest.mark.parametrize(
  "xla_flags, defaults",
  [
    ("--xla_cpu_experimental_ynn_fusion_type=reduce", (DOT, CONV, REDUCE)),  # the user chose
    ("", None),  # this jaxlib has no such option: nothing is read
    ("", ()),
    ("", (DOT, REDUCE)),  # nothing to drop
    ("", (CONV,)),  # dropping would leave an empty list, which XLA would not take as "none"
  ],
)
def test_options_leave_xla_alone(xla_flags, defaults, monkeypatch):
  monkeypatch.setattr(compiler, "default_ynn_fusion_types", lambda: defaults)
  assert compiler.compiler_options(xla_flags=xla_flags, defaults=defaults) == {}


def test_private_jax_names_still_work():
  """Fails (never skips) when a jaxlib upgrade moves the private names this module reads.

  `default_ynn_fusion_types` and `_top_level` fall back quietly in the library (XLA's defaults,
  plain jit); here they must read real values on the jaxlib pinned in constraints.txt.
  """
  from jax._src import core
  from jax._src.lib import _jax

  assert callable(core.trace_state_clean) and hasattr(_jax, "CompileOptions")
  defaults = compiler.default_ynn_fusion_types()
  assert isinstance(defaults, tuple) and defaults, f"no {compiler.YNN_FUSION_OPTION} in XLA's debug options"
  assert CONV in defaults, defaults  # the option still has something to drop: re-measure if not
  if "XLA_FLAGS" not in os.environ or compiler.YNN_FUSION_OPTION not in os.environ["XLA_FLAGS"]:
    assert compiler.COMPILER_OPTIONS == {
      compiler.YNN_FUSION_OPTION: ",".join(t for t in defaults if t != CONV)
    }
  seen = []
  assert compiler._top_level()
  jax.jit(lambda x: seen.append(compiler._top_level()) or x)(1.0)
  assert seen == [False]


def test_a_user_choice_in_xla_flags_wins():
  """With the flag in XLA_FLAGS at start-up, XLA reads the user's list and lusd-jax adds no option."""
  code = (
    "from lusd_jax import compiler; print(compiler.default_ynn_fusion_types(), compiler.COMPILER_OPTIONS)"
  )
  env = {**os.environ, "XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=reduce"}
  out = subprocess.run(
    [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
  ).stdout
  if out.startswith("None"):
    pytest.skip("this jaxlib exposes no YNNPACK fusion option")
  assert out.split() == [f"('{REDUCE}',)", "{}"]


def _conv(x, w):
  return jax.nn.relu(
    jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))
  )


def _ynn_convolutions(hlo: str) -> int:
  """How many YNNPACK fusions of the optimized HLO wrap a convolution."""
  computations = {}
  for block in hlo.split("\n\n"):
    head = block.strip().split(" ", 1)[0]
    computations[head.lstrip("%")] = block
  count = 0
  for line in hlo.splitlines():
    if "__ynn_fusion" in line and "calls=%" in line:
      called = line.split("calls=%", 1)[1].split(",", 1)[0]
      count += " convolution(" in computations.get(called, "")
  return count


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="an XLA:CPU option")
def test_jit_keeps_convolutions_out_of_ynnpack():
  if not compiler.COMPILER_OPTIONS:
    pytest.skip("this jaxlib hands no convolution to YNNPACK by default")
  x = jax.random.normal(jax.random.key(0), (2, 32, 32, 64))
  w = jax.random.normal(jax.random.key(1), (3, 3, 64, 64)) * 0.05
  plain = jax.jit(_conv).lower(x, w).compile()
  ours = compiler.jit(_conv).lower(x, w).compile()
  assert _ynn_convolutions(plain.as_text()) == 1  # XLA's default: the convolution goes to YNNPACK
  assert _ynn_convolutions(ours.as_text()) == 0
  np.testing.assert_allclose(ours(x, w), plain(x, w), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="an XLA:CPU option")
def test_library_programs_compile_with_the_options():
  """A program of the library (the VAE decoder, convolutions throughout) uses `compiler.jit`."""
  if not compiler.COMPILER_OPTIONS:
    pytest.skip("this jaxlib hands no convolution to YNNPACK by default")
  config = vae.VAEConfig.from_dict(TINY_VAE)
  params = vae.init_params(config, jax.random.key(0))
  z = jnp.zeros((1, 8, 8, config.latent_channels))
  hlo = vae.decode.lower(params, config, z).compile().as_text()
  assert " convolution(" in hlo
  assert _ynn_convolutions(hlo) == 0


def test_programs_nest_inside_other_programs():
  """JAX refuses compiler options on a nested jit: a `Program` traced inside another goes plain."""
  double = compiler.jit(lambda x: x * 2)
  scanned = lambda x: jax.lax.scan(lambda c, _: (double(c), None), x, None, length=2)[0]
  outer = compiler.jit(lambda x: double(x) + scanned(x) + jax.vmap(double)(x))
  np.testing.assert_allclose(outer(jnp.ones(3)), np.full(3, 2.0 + 4.0 + 2.0))
  assert double.__doc__ is None and double.__name__ == "<lambda>"
