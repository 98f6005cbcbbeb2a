"""Several processes (hosts): JAX's distributed runtime and each process's share of the work.

A multi-host run starts one process per host with the same command and the same inputs. Each
process joins the others (`initialize`, i.e. `jax.distributed.initialize`), takes its own
contiguous share of the flat work list (`assign`: every process computes the same split, from the
list's length alone, so they agree without talking), runs that share on its own devices (a mesh of
`jax.local_devices()`, `sharding.mesh_for`) and writes only the files of that share. Nothing is
gathered across processes while computing: a process never waits for another's resampling loops,
and a rerun of the same command resumes every process from its own files.

  from lusd_jax import distributed, sharding
  me, count = distributed.initialize("host0:1234", num_processes=2, process_id=0)  # or () on TPU/SLURM
  jobs = [lusd_jax.EditJob(image, source, target, seeds=(0,)) for image, source, target in rows]
  mine = distributed.assign(len(jobs), me, count)
  for j, result in lusd_jax.edit_many(model, [jobs[i] for i in mine], mesh=sharding.mesh_for()):
    ...  # write job mine[j]'s files

`lusd-jax batch --distributed` does this over the folder's (row, seed) pairs (`lusd_jax.cli.edit`).
"""

from __future__ import annotations

import os
import sys
from typing import NamedTuple

from lusd_jax.io import InputError

# Set by `initialize`: this process is one of several (read by `end_on_error`), and how long a
# `barrier` waits for the others (its `exit_wait_s`).
_joined = False
_wait_s = 7 * 24 * 3600


class Process(NamedTuple):
  """This process's place among the processes of a run."""

  index: int  # jax.process_index(), in [0, count)
  count: int  # jax.process_count()


def check_flags(
  distributed: bool, coordinator: str | None, num_processes: int | None, process_id: int | None
) -> None:
  """Checks the command line's `--distributed` group; needs no JAX (runs before anything starts).

  Args:
    distributed: `--distributed`.
    coordinator: `--coordinator HOST:PORT` (None: JAX's cluster auto-detection).
    num_processes: `--num-processes N` (None: auto-detection).
    process_id: `--process-id I` (None: auto-detection).

  Raises:
    InputError: one line naming the flag: a flag of the group without `--distributed`, N < 1,
      I outside [0, N), a coordinator that is not HOST:PORT, or only some of the three given.
  """
  given = {
    "--coordinator": coordinator is not None,
    "--num-processes": num_processes is not None,
    "--process-id": process_id is not None,
  }
  if not distributed:
    for flag, there in given.items():
      if there:
        raise InputError(f"{flag} needs --distributed")
    return
  if num_processes is not None and num_processes < 1:
    raise InputError(f"--num-processes must be >= 1, got {num_processes}")
  if process_id is not None and process_id < 0:
    raise InputError(f"--process-id must be >= 0, got {process_id}")
  if process_id is not None and num_processes is not None and process_id >= num_processes:
    raise InputError(f"--process-id {process_id} is not below --num-processes {num_processes}")
  if coordinator is not None:
    host, sep, port = coordinator.rpartition(":")
    if not (sep and host and port.isdigit() and 0 < int(port) < 65536):
      raise InputError(f"--coordinator takes HOST:PORT (e.g. host0:1234), got {coordinator!r}")
  # JAX auto-detects all three (TPU, SLURM, Open MPI) or needs all three: a partial set would fail
  # inside jax.distributed.initialize after a long wait, with a less direct message.
  if any(given.values()) and not all(given.values()):
    missing = ", ".join(flag for flag, there in given.items() if not there)
    raise InputError(f"{missing}: give --coordinator, --num-processes and --process-id together (or none)")


def initialize(
  coordinator: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
  *,
  timeout_s: int = 300,
  exit_wait_s: int = 7 * 24 * 3600,
) -> Process:
  """Joins the run's other processes (`jax.distributed.initialize`); call it before any JAX work.

  Without arguments JAX finds them itself on Cloud TPU, SLURM and Open MPI (and reads
  `JAX_COORDINATOR_ADDRESS`); elsewhere give all three. Process 0 also runs the coordinator service
  at `coordinator`'s port. Afterwards `jax.devices()` lists every process's devices and
  `jax.local_devices()` this process's.

  Args:
    coordinator: "HOST:PORT" of process 0, the same for every process.
    num_processes: how many processes the run has.
    process_id: this process's index, in [0, num_processes).
    timeout_s: how long to wait for the others to join.
    exit_wait_s: how long a process that has finished its share waits at exit for the others
      (JAX's shutdown barrier). When it runs out JAX aborts every process, the ones still working
      too, so it must exceed the largest gap between the processes' finishing times (a resumed
      process may have nothing left to do). A process that dies is still noticed within JAX's
      heartbeat timeout (100 s).

  Returns:
    `Process(index, count)`.

  Raises:
    RuntimeError: the others did not join in time, or JAX had already started (a computation ran).
  """
  global _joined, _wait_s
  import jax

  jax.distributed.initialize(
    coordinator_address=coordinator,
    num_processes=num_processes,
    process_id=process_id,
    initialization_timeout=timeout_s,
    shutdown_timeout_seconds=exit_wait_s,
  )
  _joined, _wait_s = True, exit_wait_s
  # jax.process_index() starts the backend, which every process must do: each one's start waits for
  # the others' device lists, so a process that never touched JAX would stall the others' start.
  return Process(jax.process_index(), jax.process_count())


def assign(n: int, process_index: int, process_count: int) -> range:
  """The elements of a work list of n that process `process_index` of `process_count` runs.

  Contiguous and balanced: process p gets [floor(n p / P), floor(n (p + 1) / P)), so shares differ
  by at most one element, every element has exactly one process, and neighbouring elements (a
  row's seeds) stay together. It depends on n and P only: every process computes the same split
  without talking to the others, and a rerun gives each process the same share back.

  Args:
    n: length of the work list (>= 0).
    process_index: p, in [0, P).
    process_count: P >= 1.

  Returns:
    The indices of process p's elements, ascending (empty when n < P leaves p nothing).

  Example:
    >>> [list(assign(5, p, 2)) for p in range(2)]
    [[0, 1], [2, 3, 4]]
  """
  if process_count < 1 or not 0 <= process_index < process_count or n < 0:
    raise ValueError(f"assign: bad n={n}, process {process_index} of {process_count}")
  return range(n * process_index // process_count, n * (process_index + 1) // process_count)


def owner(i: int, n: int, process_count: int) -> int:
  """The process whose `assign` share holds element i of n (the inverse of `assign`)."""
  if not 0 <= i < n:
    raise ValueError(f"owner: element {i} is not in [0, {n})")
  # Largest p with floor(n p / P) <= i.
  return ((i + 1) * process_count - 1) // n


def joined() -> bool:
  """Whether this process joined others (`initialize`)."""
  return _joined


def end_on_error(code: int) -> None:
  """Ends this process at once with exit status `code` when it joined others (`initialize`).

  For a command that stopped on an error. A normal exit waits at JAX's shutdown barrier for every
  other process to finish its share, while they may be waiting for this one at a `barrier`; ending
  without it makes JAX's heartbeat end the run everywhere (within 100 s) instead of a hang. A rerun
  resumes from the files written. Without `initialize` this does nothing.
  """
  if _joined:
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def barrier(name: str) -> None:
  """Waits until every process reaches `barrier(name)` (a no-op with one process).

  The coordination service's barrier (the one `initialize` joined), which waits as long as a
  finished process waits at exit (`initialize`'s `exit_wait_s`): processes reach it when their
  shares are done, minutes apart. Not a collective over the devices (`multihost_utils.
  sync_global_devices`): on CPU its first use sets up JAX's gloo context, which gives up when the
  processes arrive more than 30 s apart. Each process must call it the same number of times with
  the same names; a name is used once per run.
  """
  import jax

  if jax.process_count() == 1:
    return
  from jax._src import distributed as jax_distributed  # the client `jax.distributed.initialize` made

  client = jax_distributed.global_state.client
  if client is None:  # (not started by jax.distributed.initialize)
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(name)
    return
  client.wait_at_barrier(name, timeout_in_ms=int(_wait_s * 1000))
