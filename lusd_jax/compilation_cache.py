"""JAX's persistent compilation cache, on by default for lusd-jax processes.

Compiling the LUSD step (`core.run_steps`) for SD1.5 takes tens of seconds; with the cache a second
process loads the compiled program from disk instead. The cache lives in `~/.cache/lusd_jax/xla`
unless told otherwise:

  LUSD_JAX_CACHE_DIR=/path   use this folder
  LUSD_JAX_NO_CACHE=1        leave JAX's cache settings alone (no persistent cache unless JAX's own
                             JAX_COMPILATION_CACHE_DIR asks for one)

A folder set through JAX itself (`JAX_COMPILATION_CACHE_DIR`, `jax.config.update`) is respected
when no path is passed and `LUSD_JAX_CACHE_DIR` is unset. As JAX warns, the cache is trusted code:
do not point it at a folder others can write to.

Example:

  from lusd_jax.compilation_cache import enable_compilation_cache
  enable_compilation_cache()  # once, at program start (the CLI's main does it)
"""

from __future__ import annotations

import os
import warnings

import jax

DEFAULT_CACHE_DIR = os.path.join("~", ".cache", "lusd_jax", "xla")
ENV_CACHE_DIR = "LUSD_JAX_CACHE_DIR"
ENV_NO_CACHE = "LUSD_JAX_NO_CACHE"
# Programs that compile faster than this are not written (JAX's default is 1 s, which would skip
# the VAE and text encoder programs on a GPU); op-by-op dispatch programs stay out of the folder.
MIN_COMPILE_TIME_SECS = 0.1

_FALSE = ("", "0", "false", "no", "off")


def cache_disabled() -> bool:
  """Whether `LUSD_JAX_NO_CACHE` asks for no persistent cache."""
  return os.environ.get(ENV_NO_CACHE, "").strip().lower() not in _FALSE


def cache_dir(path: str | os.PathLike | None = None) -> str:
  """The folder `enable_compilation_cache(path)` would use (user-expanded, absolute).

  Order: `path`, then `$LUSD_JAX_CACHE_DIR`, then a folder already set in JAX's config, then
  `~/.cache/lusd_jax/xla`.
  """
  chosen = path or os.environ.get(ENV_CACHE_DIR) or jax.config.jax_compilation_cache_dir or DEFAULT_CACHE_DIR
  return os.path.abspath(os.path.expanduser(os.fspath(chosen)))


def enable_compilation_cache(
  path: str | os.PathLike | None = None, *, min_compile_time_secs: float = MIN_COMPILE_TIME_SECS
) -> str | None:
  """Turns on JAX's persistent compilation cache (idempotent).

  Sets `jax_compilation_cache_dir` and `jax_persistent_cache_min_compile_time_secs`. Calling it
  again with the same folder changes nothing; a different folder re-points the cache (JAX's
  in-process cache handle is reset so that the new folder is used).

  Args:
    path: cache folder; default `$LUSD_JAX_CACHE_DIR`, a folder already configured in JAX, or
      `~/.cache/lusd_jax/xla`.
    min_compile_time_secs: programs compiling faster than this are not cached.

  Returns:
    The cache folder, or None when `LUSD_JAX_NO_CACHE=1` or the folder cannot be created (a
    warning says why; compilation still works, only without the cache).
  """
  if cache_disabled():
    return None
  folder = cache_dir(path)
  try:
    os.makedirs(folder, exist_ok=True)
  except OSError as e:
    warnings.warn(
      f"lusd_jax: persistent compilation cache disabled, cannot create {folder}: {e}", stacklevel=2
    )
    return None
  previous = jax.config.jax_compilation_cache_dir
  if previous is not None and os.path.abspath(os.path.expanduser(previous)) != folder:
    from jax.experimental.compilation_cache import compilation_cache

    compilation_cache.reset_cache()  # JAX opens its cache folder once; re-open at the new one
  jax.config.update("jax_compilation_cache_dir", folder)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_secs))
  return folder
