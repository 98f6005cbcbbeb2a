"""The one host driver: any method, over a flat batch of elements, on one device or a device mesh.

A batch is B independent runs. Element b has its own inputs (a pytree with a leading [B] axis: a
photo's latent, prompts' embeddings, ...), its own PRNG key and its own numeric hyperparameters;
seeds, sweep cells and images are all just elements. A method is a small frozen (hashable)
dataclass of pure functions over ONE element; the engine vmaps them, scans them over steps, and owns
what is the same for every method:

  padding B to a multiple of the devices (copies of the last element, dropped afterwards), placing
  the blocks on the mesh's "data" axis (params replicated), chunked execution with a progress
  callback, the NaN/inf report (step and element), snapshots, and the return of per-element results.

One device and a mesh run the same compiled program (`run_chunk`: vmap over elements of a lax.scan
over steps); with a mesh, each device runs its block under `shard_map`, with no collective inside a
chunk, so a device whose resampling loops end early never waits for another's.

The method interface (`Method`), for one element:

  num_steps                                   # int: the scan's length (static)
  init(inputs, key, numeric) -> state         # the carry before step 0
  step(params, inputs, numeric, state, k) -> (state, stats)   # step k; stats.finite: bool
  snapshot(state) -> pytree                   # what `snapshot_every` keeps
  finish(state) -> pytree                     # the element's result
  watched: str                                # what a NaN/inf was found in, for the message

A method with several phases (UnifyEdit: inversion, then editing) is one `Method` per phase, run in
turn, the second taking the first's results among its inputs.

Example:

  method = LUSD(FlaxUNet(unet_config), config.static(), schedule)
  out = engine.run(method, params, inputs_B, keys_B, numeric_B, mesh=sharding.data_mesh())
  z_B, mask_B = out.final
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from lusd_jax import sharding
from lusd_jax.compiler import jit


class Method(Protocol):
  """A method as the engine runs it (see the module docstring). Implementations are frozen dataclasses."""

  watched: str

  @property
  def num_steps(self) -> int: ...

  def init(self, inputs: Any, key: jax.Array, numeric: Any) -> Any: ...

  def step(self, params: Any, inputs: Any, numeric: Any, state: Any, k: jax.Array) -> tuple[Any, Any]: ...

  def snapshot(self, state: Any) -> Any: ...

  def finish(self, state: Any) -> Any: ...


class NonFiniteError(FloatingPointError):
  """NaN or inf appeared in what a method watches (LUSD: the gradient g or the latent z)."""


class RunOutput(NamedTuple):
  """What `run` returns, NumPy on the host (B elements, N steps, K snapshots; padding dropped)."""

  final: Any  # method.finish(state), leaves [B, ...]
  stats: Any  # the per-step stats, leaves [B, N]
  snapshot_steps: tuple[int, ...]  # [K] steps completed at each snapshot
  snapshots: Any | None  # method.snapshot(state), leaves [B, K, ...]


@functools.partial(jit, static_argnames=("method",))
def init_batch(method: Method, inputs_B, keys_B, numeric_B):
  """`method.init` of every element: the carry before step 0 (placed like the inputs)."""
  return jax.vmap(method.init)(inputs_B, keys_B, numeric_B)


def _local_chunk(method: Method, num: int, params, inputs_B, state_B, k0, numeric_B):
  """Steps k0 .. k0 + num - 1 of every element of a (device-local) batch; steps >= N are skipped."""
  ks = jnp.asarray(k0, jnp.int32) + jnp.arange(num, dtype=jnp.int32)

  def one(inputs, state, numeric):
    step = functools.partial(method.step, params, inputs, numeric)
    stats_shape = jax.eval_shape(step, state, ks[0])[1]

    def body(state, k):
      # k is the same for every element, so this is a real branch under vmap: a chunk's padding
      # steps past N cost nothing.
      skip = lambda state, k: (state, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), stats_shape))
      return jax.lax.cond(k < method.num_steps, step, skip, state, k)

    return jax.lax.scan(body, state, ks)

  return jax.vmap(one)(inputs_B, state_B, numeric_B)


@functools.partial(jit, static_argnames=("method", "num", "mesh"))
def run_chunk(
  method: Method, params, inputs_B, state_B, k0, numeric_B, *, num: int, mesh: Mesh | None = None
):
  """Runs `num` steps from step k0 for every element: the one compiled program of every method.

  Compiled once per (method, num, mesh, B and shapes); k0, inputs, keys and numerics are traced.

  Args:
    method: a `Method` (static, hashable).
    params: the network params (replicated over `mesh`).
    inputs_B, state_B, numeric_B: pytrees with a leading [B] axis (B a multiple of the devices).
    k0: first step index (traced).
    num: steps to run (static).
    mesh: None (one device) or a `sharding.data_mesh`: each device runs its block of B / D.

  Returns:
    (state_B, stats with leaves [B, num]), sharded along "data" with a mesh.
  """
  local = functools.partial(_local_chunk, method, num)
  if mesh is None:
    return local(params, inputs_B, state_B, k0, numeric_B)
  data, rep = P(sharding.DATA_AXIS), P()
  # check_vma=False: the while loops inside start from unvarying constants and end varying per
  # device; nothing inside communicates, so there is no replication to check.
  spmd = jax.shard_map(
    local, mesh=mesh, in_specs=(rep, data, data, rep, data), out_specs=data, check_vma=False
  )
  return spmd(params, inputs_B, state_B, k0, numeric_B)


def _check_positive(**values) -> None:
  for name, value in values.items():
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
      raise ValueError(f"{name} must be a positive int or None, got {value!r}")


def run(
  method: Method,
  params: Any,
  inputs_B: Any,
  keys_B: jax.Array,
  numeric_B: Any,
  *,
  mesh: Mesh | None = None,
  batch_size: int | None = None,
  chunk_size: int | None = None,
  snapshot_every: int | None = None,
  ids: Sequence[str] | None = None,
  on_chunk: Callable[[int, Any, Any], None] | None = None,
) -> RunOutput:
  """Runs a method on B elements, in chunks of steps, checking for NaN/inf after each chunk.

  Args:
    method: a `Method`.
    params: network params (with a mesh, replicated here; `sharding.replicate` them once beforehand
      to skip the copy on every call).
    inputs_B: the method's inputs, leaves [B, ...] (`sharding.broadcast_batch` one shared input).
    keys_B: [B] PRNG keys.
    numeric_B: the method's numeric config, leaves [B].
    mesh: optional `sharding.data_mesh`: the batch is padded to a multiple of its size and sharded.
    batch_size: pad the batch to this size (>= B) so that batches of varying B share one program.
    chunk_size: steps per compiled call (default: all at once); the host regains control between
      chunks (`on_chunk`). `snapshot_every` sets the chunk when given.
    snapshot_every: keep `method.snapshot(state)` after every this many steps (and at the end).
    ids: [B] names of the elements for error messages (default "batch element b").
    on_chunk: called as on_chunk(steps_done, state, chunk_stats) after each chunk: `state` the
      padded (with a mesh, sharded) carry on device, chunk_stats NumPy [B, chunk] (padding dropped).

  Returns:
    `RunOutput`.

  Raises:
    NonFiniteError: naming the first step and element whose stats say `finite` is False.
  """
  _check_positive(snapshot_every=snapshot_every, chunk_size=chunk_size, batch_size=batch_size)
  n = method.num_steps
  chunk = min(snapshot_every or chunk_size or n, n)
  b = keys_B.shape[0]
  ids = [f"batch element {i}" for i in range(b)] if ids is None else list(ids)
  size = sharding.padded_size(max(b, batch_size or b), sharding.num_devices(mesh))

  inputs_B, keys_B, numeric_B = sharding.pad_batch((inputs_B, keys_B, numeric_B), size)
  if mesh is not None:
    params = sharding.replicate(params, mesh)
    inputs_B, keys_B, numeric_B = sharding.shard_batch((inputs_B, keys_B, numeric_B), mesh)
  state = init_batch(method, inputs_B, keys_B, numeric_B)
  stats, snapshots, snapshot_steps = [], [], []
  for k0 in range(0, n, chunk):
    state, chunk_stats = run_chunk(method, params, inputs_B, state, k0, numeric_B, num=chunk, mesh=mesh)
    chunk_stats = sharding.unpad_batch(sharding.to_host(chunk_stats), b)
    bad_BN = ~np.asarray(chunk_stats.finite)[:, : n - k0]
    if bad_BN.any():
      step = int(np.argmax(bad_BN.any(axis=0)))  # the first bad step, then its first bad element
      elem = int(np.argmax(bad_BN[:, step]))
      raise NonFiniteError(
        f"non-finite values (NaN/inf) in {method.watched} at step {k0 + step} for {ids[elem]}"
      )
    stats.append(chunk_stats)
    done = min(k0 + chunk, n)
    if snapshot_every:
      snapshots.append(sharding.unpad_batch(sharding.to_host(jax.vmap(method.snapshot)(state)), b))
      snapshot_steps.append(done)
    if on_chunk is not None:
      on_chunk(done, state, chunk_stats)

  stats = jax.tree.map(lambda *xs: np.concatenate(xs, axis=1)[:, :n], *stats)
  return RunOutput(
    final=sharding.unpad_batch(sharding.to_host(jax.vmap(method.finish)(state)), b),
    stats=stats,
    snapshot_steps=tuple(snapshot_steps),
    snapshots=jax.tree.map(lambda *xs: np.stack(xs, axis=1), *snapshots) if snapshot_every else None,
  )


@contextlib.contextmanager
def progress(num_steps: int, desc: str, enabled: bool = True, postfix: Callable[[Any], dict] | None = None):
  """A tqdm bar over the steps of an engine run; yields the `on_chunk` callback that moves it.

  Args:
    num_steps: N, the bar's total.
    desc: its label.
    enabled: False yields None (no bar, `engine.run` runs without a callback).
    postfix: optional; called with the stats of the steps a chunk completed (leaves [B, k], the
      chunk's steps past N dropped), returns what the bar shows after it.

  Yields:
    on_chunk(done, state, stats) for `engine.run`, or None.
  """
  if not enabled:
    yield None
    return
  from tqdm.auto import tqdm

  bar = tqdm(total=num_steps, desc=desc, unit="step", dynamic_ncols=True)
  # The first chunk compiles the program (seconds to a minute; later runs read XLA's cache).
  bar.set_postfix_str("compiling", refresh=True)

  def on_chunk(done, _state, stats):
    new = jax.tree.map(lambda a: np.asarray(a)[:, : done - bar.n], stats)
    bar.set_postfix(postfix(new) if postfix else {}, refresh=False)
    bar.update(done - bar.n)

  try:
    yield on_chunk
  finally:
    bar.close()
