"""Batches of edits as one compiled program, on one device or spread over a device mesh.

A batch is B independent LUSD edits, flattened from images x seeds x configs: element b has its own
`EditInputs` (source latent, prompts' embeddings, edit-token mask), its own PRNG key and its own
numeric hyperparameters (`LUSDNumeric` leaves [B]). One compiled program serves every batch of the
same size, model, latent size and static config (`num_steps`, `gradient`): `lusd_jax.sweep` runs a
whole hyperparameter grid x seeds through it, `sharded_optimize` is a drop-in for
`core.optimize` that spreads the seeds of one edit over devices.

Multi-device: `data_mesh()` is a 1-D `Mesh` named "data" over the devices. The batch axis is padded
to a multiple of the device count (copies of the last element, dropped afterwards), split into equal
blocks along "data", and the U-Net params are replicated. Each device runs its block under
`shard_map`: its own vmapped scan and filtered-resampling while loops, with no collective inside a
chunk of steps, so a device whose draws are accepted early does not wait for another's redraws.
Every element computes exactly what it computes alone, so sharded and single-device results agree
to float rounding.

  mesh = sharding.data_mesh()                       # all of jax.devices()
  out = sharding.sharded_optimize(unet_fn, params, inputs, keys_S, config, schedule=s, mesh=mesh)
  res = lusd_jax.sweep(model, img, src, tgt, grid={"reg_scale": [0.0, 0.05]}, seeds=[0, 1], mesh=mesh)

On a CPU, `XLA_FLAGS=--xla_force_host_platform_device_count=4` (set before JAX starts) gives four
host devices to try this on.

Multi-host (several machines, each with its own accelerators): start every process with the same
command and the same inputs, and call `jax.distributed.initialize()` before anything else touches
JAX (on Cloud TPU and SLURM it finds the coordinator by itself; elsewhere pass
`coordinator_address="host0:1234", num_processes=P, process_id=i`). `jax.devices()` then lists the
devices of all processes, and `data_mesh()` spans them all. Each process computes the same host
inputs (same image, prompts, seeds, grid), `jax.device_put` places the blocks of its own devices, and
`to_host` gathers the finished results onto every process (`multihost_utils.process_allgather`);
let process 0 (`jax.process_index() == 0`) write the files.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lusd_jax import schedule as schedule_lib
from lusd_jax.compiler import jit
from lusd_jax.lusd import core
from lusd_jax.lusd.config import LUSDConfig, LUSDNumeric, LUSDStatic

DATA_AXIS = "data"
T = TypeVar("T")


# ----------------------------------------------------------------------------- mesh and placement


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A 1-D mesh with axis "data" over `devices` (default: `jax.devices()`, every process's).

  Args:
    devices: the devices to spread batches over, in order.

  Returns:
    `Mesh` of shape [D] with axis name `DATA_AXIS`.
  """
  devices = jax.devices() if devices is None else list(devices)
  if not devices:
    raise ValueError("data_mesh needs at least one device")
  return Mesh(np.asarray(devices, dtype=object), (DATA_AXIS,))


def mesh_for(devices: int | None = None) -> Mesh | None:
  """The data mesh the command line uses: the first `devices` of `jax.devices()` (default: all).

  Returns None (plain single-device programs) when that is one device.

  Raises:
    io.InputError: `devices` is not between 1 and the number of devices.
  """
  from lusd_jax.io import InputError

  available = jax.devices()
  n = len(available) if devices is None else devices
  if not 1 <= n <= len(available):
    raise InputError(
      f"--devices: {devices} asked, {len(available)} {available[0].platform} device(s) available"
    )
  return data_mesh(available[:n]) if n > 1 else None


def add_devices_argument(parser) -> None:
  """Adds `--devices N` (read by `mesh_for`) to an argparse parser."""
  parser.add_argument(
    "--devices",
    type=int,
    default=None,
    metavar="N",
    help="spread the edits over the first N devices (default: all of them)",
  )


def num_devices(mesh: Mesh | None) -> int:
  """Devices along the data axis (1 without a mesh)."""
  return 1 if mesh is None else mesh.shape[DATA_AXIS]


def padded_size(n: int, multiple: int) -> int:
  """The smallest multiple of `multiple` that is >= n (n >= 1)."""
  return max(1, math.ceil(n / multiple)) * multiple


def pad_batch(tree: T, size: int) -> T:
  """Pads every leaf's leading axis [n, ...] to [size, ...] with copies of its last element.

  Copies of a real element (rather than zeros) keep the padding well defined: valid PRNG keys,
  finite latents, the same number of redraws as a real element.
  """

  def pad(x):
    n = x.shape[0]
    if size < n:
      raise ValueError(f"cannot pad a batch of {n} to {size}")
    return x if size == n else jnp.concatenate([x, jnp.repeat(x[-1:], size - n, axis=0)])

  return jax.tree.map(pad, tree)


def unpad_batch(tree: T, n: int) -> T:
  """The first n elements of every leaf (drops what `pad_batch` added)."""
  return jax.tree.map(lambda x: x[:n], tree)


def broadcast_batch(tree: T, n: int) -> T:
  """Adds a leading [n] axis to every leaf (one copy per batch element)."""
  return jax.tree.map(lambda x: jnp.broadcast_to(x, (n,) + jnp.shape(x)), tree)


def replicate(tree: T, mesh: Mesh) -> T:
  """Places a full copy of every leaf on every device of `mesh` (params, shared constants)."""
  return jax.device_put(tree, NamedSharding(mesh, P()))


def shard_batch(tree: T, mesh: Mesh) -> T:
  """Splits every leaf's leading axis into equal blocks along "data" (size: a multiple of D)."""
  d = num_devices(mesh)
  for x in jax.tree.leaves(tree):
    if x.shape[0] % d:
      raise ValueError(f"batch of {x.shape[0]} is not a multiple of the {d} devices; pad_batch first")
  return jax.device_put(tree, NamedSharding(mesh, P(DATA_AXIS)))


def to_host(tree: Any) -> Any:
  """NumPy copies of a pytree of arrays, gathered from every process when they span several."""
  from jax.experimental import multihost_utils

  def get(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)

  return jax.tree.map(get, tree)


# ----------------------------------------------------------------------------- compiled programs


@jit
def init_batch(inputs_B: core.EditInputs, keys_B: jax.Array, numeric_B: LUSDNumeric) -> core.EditState:
  """`core.init_state` of every batch element: the carry before step 0.

  Args:
    inputs_B: `EditInputs` with a leading [B] axis on every leaf.
    keys_B: [B] PRNG keys.
    numeric_B: `LUSDNumeric` with leaves [B].

  Returns:
    `EditState` [B] (placed like the inputs: sharded inputs give a sharded state).
  """

  def one(inputs, key, numeric):
    return jax.tree.map(lambda x: x[0], core.init_state(inputs, key[None], numeric))

  return jax.vmap(one)(inputs_B, keys_B, numeric_B)


def _local_steps(unet_fn, params, inputs_B, state_B, k0, numeric_B, *, static, schedule, num, noise_fn):
  """`core.run_steps` of each element of a (device-local) batch, each with its own inputs/numeric."""

  def one(inputs, state, numeric):
    state_1 = jax.tree.map(lambda x: x[None], state)  # run_steps batches over seeds: one seed here
    out_1 = core.run_steps(
      unet_fn, params, inputs, state_1, k0, numeric, static=static, schedule=schedule, num=num,
      noise_fn=noise_fn,
    )  # fmt: skip
    return jax.tree.map(lambda x: x[0], out_1)

  return jax.vmap(one)(inputs_B, state_B, numeric_B)


@functools.partial(jit, static_argnames=("unet_fn", "static", "schedule", "num", "noise_fn", "mesh"))
def batch_steps(
  unet_fn, params, inputs_B, state_B, k0, numeric_B, *, static, schedule, num, noise_fn=None, mesh=None
):
  """Runs steps k0, ..., k0 + num - 1 of Algorithm 1 for every batch element.

  Compiled once per (unet_fn, static, schedule, num, noise_fn, mesh, B and shapes): k0, prompts,
  edit masks, keys and numerics are traced, so a sweep over other prompts or grid values of the
  same shape reuses the program.

  Args:
    unet_fn: `core.UNetFn` (static, hashable), e.g. `core.FlaxUNet(config)`.
    params: U-Net params (replicated over `mesh`).
    inputs_B: `EditInputs` with leaves [B, ...].
    state_B: `EditState` [B] from `init_batch` or a previous call.
    k0: int, first step index (traced).
    numeric_B: `LUSDNumeric` with leaves [B].
    static: `LUSDStatic` shared by the batch.
    schedule: `Schedule`.
    num: steps to run (static).
    noise_fn: optional `core.NoiseFn`.
    mesh: None (one device), or a `data_mesh`: B must be a multiple of its size; each device runs
      its block of B / D elements.

  Returns:
    (state_B, `StepStats` with leaves [B, num]), sharded along "data" when `mesh` is given.
  """
  local = functools.partial(
    _local_steps, unet_fn, static=static, schedule=schedule, num=num, noise_fn=noise_fn
  )
  if mesh is None:
    return local(params, inputs_B, state_B, k0, numeric_B)
  data, rep = P(DATA_AXIS), P()
  # check_vma=False: the while loops start from unvarying constants and end varying per device;
  # nothing inside communicates, so there is no replication to check.
  spmd = jax.shard_map(
    local, mesh=mesh, in_specs=(rep, data, data, rep, data), out_specs=data, check_vma=False
  )
  return spmd(params, inputs_B, state_B, k0, numeric_B)


# ----------------------------------------------------------------------------- host drivers


def optimize_batch(
  unet_fn: core.UNetFn,
  params: Any,
  inputs_B: core.EditInputs,
  keys_B: jax.Array,
  numeric_B: LUSDNumeric,
  *,
  static: LUSDStatic,
  schedule: schedule_lib.Schedule,
  mesh: Mesh | None = None,
  batch_size: int | None = None,
  noise_fn: core.NoiseFn | None = None,
  snapshot_every: int | None = None,
  chunk_size: int | None = None,
  ids: Sequence[str] | None = None,
  on_chunk: Callable[[int, core.EditState, core.StepStats], None] | None = None,
) -> core.EditOutput:
  """Runs B edits as one program (per chunk of steps), checking for NaN/inf after each chunk.

  Args:
    unet_fn: `core.UNetFn`, e.g. `core.FlaxUNet(config)`.
    params: U-Net params (with a mesh, `replicate`d here; replicate them once beforehand to skip
      the copy on every call).
    inputs_B: `EditInputs` with leaves [B, ...] (`broadcast_batch` one shared input).
    keys_B: [B] PRNG keys.
    numeric_B: `LUSDNumeric` with leaves [B] (`broadcast_batch(config.numeric(), B)`, or configs
      repeated per seed for a sweep).
    static: `LUSDStatic` shared by the batch.
    schedule: the checkpoint's `Schedule`.
    mesh: optional `data_mesh`: the batch is padded to a multiple of its size and sharded.
    batch_size: pad the batch to this size (>= B) so that batches of varying B share a program.
    noise_fn: optional replayable draw `noise_fn(key, step, attempt) -> (t, eps)`.
    snapshot_every: keep z and M_k after every this many steps (and at the end).
    chunk_size: steps per compiled call when no snapshots are asked (default: all N at once).
    ids: [B] names of the elements for error messages (default "batch element b").
    on_chunk: called as on_chunk(steps_done, state, chunk_stats) after each chunk; `state` is the
      padded (and, with a mesh, sharded) `EditState` on device, chunk_stats the chunk's
      `StepStats` as numpy [B, chunk] (padding dropped).

  Returns:
    `core.EditOutput` with a leading [B] axis (padding dropped), NumPy on the host.

  Raises:
    core.NonFiniteError: naming the first step and element whose g or z holds NaN/inf.
  """
  n = static.num_steps
  for name, value in (("snapshot_every", snapshot_every), ("chunk_size", chunk_size)):
    if value is not None and (not isinstance(value, int) or value < 1):
      raise ValueError(f"{name} must be a positive int or None, got {value!r}")
  chunk = min(snapshot_every or chunk_size or n, n)
  b = keys_B.shape[0]
  ids = [f"batch element {i}" for i in range(b)] if ids is None else list(ids)
  size = padded_size(max(b, batch_size or b), num_devices(mesh))

  inputs_B, keys_B, numeric_B = pad_batch((inputs_B, keys_B, numeric_B), size)
  if mesh is not None:
    params = replicate(params, mesh)
    inputs_B, keys_B, numeric_B = shard_batch((inputs_B, keys_B, numeric_B), mesh)
  state = init_batch(inputs_B, keys_B, numeric_B)
  stats, snaps_z, snaps_m, snap_steps = [], [], [], []
  for k0 in range(0, n, chunk):
    state, chunk_stats = batch_steps(
      unet_fn, params, inputs_B, state, k0, numeric_B, static=static, schedule=schedule, num=chunk,
      noise_fn=noise_fn, mesh=mesh,
    )  # fmt: skip
    chunk_stats = unpad_batch(to_host(chunk_stats), b)
    bad_BN = ~chunk_stats.finite
    if bad_BN.any():
      step = int(np.argmax(bad_BN.any(axis=0)))  # first bad step, then its first bad element
      elem = int(np.argmax(bad_BN[:, step]))
      raise core.NonFiniteError(
        f"non-finite values (NaN/inf) in the gradient g or the latent z at step {k0 + step} for {ids[elem]}"
      )
    stats.append(chunk_stats)
    done = min(k0 + chunk, n)
    if snapshot_every:
      snaps_z.append(to_host(state.z)[:b])
      snaps_m.append(to_host(state.mask_ema)[:b])
      snap_steps.append(done)
    if on_chunk is not None:
      on_chunk(done, state, chunk_stats)

  stats = jax.tree.map(lambda *xs: np.concatenate(xs, axis=1)[:, :n], *stats)
  return core.EditOutput(
    z=to_host(state.z)[:b],
    mask=to_host(state.mask_ema)[:b],
    t=stats.t,
    rejections=stats.rejections,
    hit_max_attempts=stats.hit_max_attempts,
    grad_std=stats.grad_std,
    zero_gradient=stats.zero_gradient,
    snapshot_steps=tuple(snap_steps),
    z_snapshots=np.stack(snaps_z, axis=1) if snapshot_every else None,
    mask_snapshots=np.stack(snaps_m, axis=1) if snapshot_every else None,
  )


def sharded_optimize(
  unet_fn: core.UNetFn,
  params: Any,
  inputs: core.EditInputs,
  keys_S: jax.Array,
  config: LUSDConfig,
  *,
  schedule: schedule_lib.Schedule,
  mesh: Mesh | None = None,
  numeric: LUSDNumeric | None = None,
  noise_fn: core.NoiseFn | None = None,
  snapshot_every: int | None = None,
  chunk_size: int | None = None,
  seed_ids: Sequence[Any] | None = None,
  on_chunk: Callable[[int, core.EditState, core.StepStats], None] | None = None,
) -> core.EditOutput:
  """`core.optimize` with its seeds spread over `mesh` (same arguments and result, plus `mesh`).

  Example:
    >>> mesh = data_mesh()  # doctest: +SKIP
    >>> out = sharded_optimize(unet_fn, params, inputs, keys_S, config, schedule=s, mesh=mesh)  # doctest: +SKIP
    >>> out.z.shape  # [S, h, w, c], equal to core.optimize's to float rounding  # doctest: +SKIP

  Args:
    mesh: a `data_mesh` (None: one device, still through the batch program).
    The others: as `core.optimize`.

  Returns:
    `core.EditOutput` ([S] leading axis).
  """
  s = keys_S.shape[0]
  numeric = config.numeric() if numeric is None else numeric
  seed_ids = list(range(s)) if seed_ids is None else list(seed_ids)
  return optimize_batch(
    unet_fn,
    params,
    broadcast_batch(inputs, s),
    keys_S,
    broadcast_batch(numeric, s),
    static=config.static(),
    schedule=schedule,
    mesh=mesh,
    noise_fn=noise_fn,
    snapshot_every=snapshot_every,
    chunk_size=chunk_size,
    ids=[f"seed {i}" for i in seed_ids],
    on_chunk=on_chunk,
  )
