"""Data parallelism over every device of every host: one mesh axis, batch sharded, parameters replicated.

`jax.jit` with `NamedSharding` replaces `pmap` (in maintenance in current JAX): the train step is written for the
global batch and XLA inserts the gradient all-reduce. Each process feeds only its own slice of the global batch.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mutualnet_jax.errors import UserError

DATA_AXIS = 'data'


def initialize_distributed(coordinator_address: str = '', num_processes: int = 0, process_id: int = -1) -> None:
  """Joins a multi-process job. With no arguments JAX auto-detects TPU pods / SLURM / Open MPI; on CPU the
  collectives go through gloo, so two processes on one machine also form a real multi-host job."""
  # Only affects CPU devices; must be set before the backend starts (so no jax.default_backend() here).
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  kwargs = {}
  if coordinator_address:
    kwargs = dict(coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id)
  jax.distributed.initialize(**kwargs)


def make_mesh() -> Mesh:
  return Mesh(np.asarray(jax.devices()), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_size(global_batch_size: int, mesh: Mesh, what: str = 'config.batch_size') -> None:
  """The global batch must split evenly over devices (and so over processes)."""
  if global_batch_size <= 0 or global_batch_size % mesh.size:
    raise UserError(f'{what}={global_batch_size} does not divide over {mesh.size} devices: use a multiple of '
                    f'{mesh.size}.')


def global_batch(local: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each process's slice of the batch into global arrays sharded over the data axis."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local.items()}


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places host values (identical on every process) on every device of the mesh."""
  sharding = replicated_sharding(mesh)

  def put(x: Any) -> jax.Array:
    if isinstance(x, jax.Array) and x.sharding == sharding:
      return x
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  return jax.tree.map(put, tree)


def host_values(tree: Any) -> Any:
  """Every leaf of a tree of replicated arrays as its value on this host, fetched in one round (every copy is started
  before any is waited on, not one blocking transfer per leaf). Every process holds all of a replicated array, also
  where it spans devices of other processes (where jax.device_get refuses): such a leaf is read from a local shard."""
  local = jax.tree.map(lambda x: x.addressable_shards[0].data
                       if isinstance(x, jax.Array) and not x.is_fully_addressable else x, tree)
  return jax.tree.map(np.asarray, jax.device_get(local))


def abstract(tree: Any, sharding: NamedSharding) -> Any:
  """Shape/dtype/sharding stand-ins for ahead-of-time lowering."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), tree)
