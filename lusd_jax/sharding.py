"""Placing batches on devices: the data mesh, padding, replication, sharding, gathering to the host.

The engine (`lusd_jax.engine`) runs every batch through these helpers. `data_mesh()` is a 1-D `Mesh`
named "data" over the devices. A batch axis is padded to a multiple of the device count (copies of
the last element, dropped afterwards), split into equal blocks along "data", and the params are
replicated. Every element computes exactly what it computes alone, so sharded and single-device
results agree to float rounding.

  mesh = sharding.data_mesh()                       # all of jax.devices()
  out = core.optimize(unet_fn, params, inputs, keys_S, config, schedule=s, mesh=mesh)
  res = lusd_jax.sweep(model, img, src, tgt, grid={"reg_scale": [0.0, 0.05]}, seeds=[0, 1], mesh=mesh)

On a CPU, `XLA_FLAGS=--xla_force_host_platform_device_count=4` (set before JAX starts) gives four
host devices to try this on.

Multi-host (several machines, each with its own accelerators): `lusd_jax.distributed` joins the
processes (`jax.distributed.initialize`) and gives each its share of the elements; each process
runs its share on a mesh of its own devices (`mesh_for`, over `jax.local_devices()`), so nothing
crosses hosts while computing. The other way, a mesh over every process's devices (`data_mesh()`
after `jax.distributed.initialize`, every process passing the same host inputs, `to_host`
gathering the results onto each with `multihost_utils.process_allgather`), is not tested.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

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
  """The data mesh over the first `devices` of this process's devices (default: all).

  This process's: `jax.local_devices()`, which is `jax.devices()` unless several processes were
  joined (`lusd_jax.distributed`); then each runs its own share on its own devices.

  Returns None (plain single-device programs) when that is one device.

  Raises:
    ValueError: `devices` is not between 1 and the number of devices, e.g. "4 asked, 1 cpu
      device(s) available" (the command line puts `--devices: ` in front).
  """
  available = jax.local_devices()
  n = len(available) if devices is None else devices
  if not 1 <= n <= len(available):
    raise ValueError(f"{devices} asked, {len(available)} {available[0].platform} device(s) available")
  return data_mesh(available[:n]) if n > 1 else None


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
