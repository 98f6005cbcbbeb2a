"""`enable_compilation_cache`: JAX config, environment overrides, a second process reads the cache.

Each case runs in a fresh interpreter: JAX opens its persistent cache once per process, and the
test process's own config must stay untouched.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

_PROBE = """
import json, os, sys
import jax, jax.numpy as jnp
from jax._src import compilation_cache as cc
from lusd_jax.compilation_cache import enable_compilation_cache
args = json.loads(sys.argv[1])
kw = {"min_compile_time_secs": 0.0} if args.get("compile") else {}
first = enable_compilation_cache(args.get("path"), **kw)
second = enable_compilation_cache(args.get("path"), **kw)
hits = []
jax.monitoring.register_event_listener(
  lambda name, **kw: hits.append(name) if name == "/jax/compilation_cache/cache_hits" else None
)
if args.get("compile"):
  f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum(axis=0) * 3.0)
  f(jnp.ones((64, 64))).block_until_ready()
print(json.dumps(dict(
  first=first, second=second, dir=jax.config.jax_compilation_cache_dir,
  min_time=jax.config.jax_persistent_cache_min_compile_time_secs, hits=len(hits),
)))
"""


def _probe(tmp_path, env_overrides=None, **args):
  env = {k: v for k, v in os.environ.items() if k not in ("LUSD_JAX_CACHE_DIR", "LUSD_JAX_NO_CACHE")}
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  env["HOME"] = str(tmp_path / "home")
  env["JAX_PLATFORMS"] = "cpu"
  env.update(env_overrides or {})
  out = subprocess.run(
    [sys.executable, "-c", _PROBE, json.dumps(args)], env=env, capture_output=True, text=True, timeout=300
  )
  assert out.returncode == 0, out.stderr
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_default_folder_is_under_home_and_calls_are_idempotent(tmp_path):
  got = _probe(tmp_path)
  want = str(tmp_path / "home" / ".cache" / "lusd_jax" / "xla")
  assert got["first"] == got["second"] == got["dir"] == want
  assert os.path.isdir(want)
  assert got["min_time"] < 1.0


def test_explicit_path_and_environment_override(tmp_path):
  got = _probe(tmp_path, {"LUSD_JAX_CACHE_DIR": str(tmp_path / "env")})
  assert got["dir"] == str(tmp_path / "env")
  got = _probe(tmp_path, {"LUSD_JAX_CACHE_DIR": str(tmp_path / "env")}, path=str(tmp_path / "arg"))
  assert got["dir"] == str(tmp_path / "arg")


def test_no_cache_leaves_jax_config_alone(tmp_path):
  got = _probe(tmp_path, {"LUSD_JAX_NO_CACHE": "1"})
  assert got["first"] is None and got["second"] is None and got["dir"] is None
  assert not os.path.exists(tmp_path / "home" / ".cache")


def test_a_second_process_loads_the_program_from_the_cache(tmp_path):
  env = {"LUSD_JAX_CACHE_DIR": str(tmp_path / "xla")}
  cold = _probe(tmp_path, env, compile=True)
  assert cold["hits"] == 0
  assert os.listdir(tmp_path / "xla"), "the first process wrote no cache entry"
  warm = _probe(tmp_path, env, compile=True)
  assert warm["hits"] >= 1
