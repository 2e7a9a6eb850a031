"""The device mesh and where arrays live on it.

One `data` axis over every device of every process: batches are split along it, the
train state is replicated. Steps are `jax.jit`-compiled with these shardings, so BatchNorm
statistics, losses and metrics are computed over the global batch by XLA's collectives.
"""
from __future__ import annotations

import glob
import os
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = "data"
# Device files that say an accelerator is attached (TPU VMs: /dev/accel* on v2-v4,
# /dev/vfio/N on v5e and later; NVIDIA: /dev/nvidiaN), and the install that lets JAX use it.
ACCELERATORS = (("TPU", ("accel[0-9]*", "vfio/[0-9]*"), 'pip install -e ".[tpu]"'),
                ("NVIDIA GPU", ("nvidia[0-9]*",), 'pip install -e ".[cuda]"'))


def unused_accelerator(backend: str, dev: str = "/dev") -> str | None:
  """A warning when the machine has an accelerator that JAX's `backend` does not use (a
  CPU-only jaxlib on a TPU VM or a GPU host would train on the host CPU), else None."""
  if backend != "cpu":
    return None
  for name, patterns, install in ACCELERATORS:
    found = sorted(p for pattern in patterns for p in glob.glob(os.path.join(dev, pattern)))
    if found:
      return (f"warning: this machine has a {name} ({found[0]}) but JAX runs on the CPU: "
              f"install JAX for it with `{install}` (README, \"On Cloud TPU\")")
  return None


def maybe_initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                                 process_id: int | None = None) -> None:
  """`jax.distributed.initialize` when asked by arguments or by the environment.

  On Cloud TPU pods and SLURM/Open MPI clusters, JAX finds the cluster itself when
  `JAXDEFENSE_DISTRIBUTED=1`; elsewhere pass the coordinator address, process count and id.
  """
  if coordinator is None and os.environ.get("JAXDEFENSE_DISTRIBUTED", "0") != "1":
    return
  if jax.distributed.is_initialized():
    return
  kwargs = {}
  if coordinator is not None:
    kwargs = dict(coordinator_address=coordinator, num_processes=num_processes,
                  process_id=process_id)
  jax.distributed.initialize(**kwargs)


def make_mesh(devices: list | None = None) -> Mesh:
  """A 1-D mesh named `data` over all (global) devices."""
  return Mesh(np.array(devices if devices is not None else jax.devices()), (AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_size(batch_size: int, mesh: Mesh, what: str = "train.batch_size") -> None:
  """The global batch must split evenly over the devices (and so over processes)."""
  n = mesh.devices.size
  if batch_size <= 0 or batch_size % n:
    raise ValueError(f"{what}={batch_size} must be a positive multiple of the device count "
                     f"{n} (the batch is split evenly over devices); try "
                     f"{max(n, batch_size // n * n)}")


def shard_batch(mesh: Mesh, local: Any) -> Any:
  """Global arrays split on `data` from this process's share of the batch (numpy leaves)."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(lambda a: jax.make_array_from_process_local_data(sharding, a), local)


def replicate(mesh: Mesh, tree: Any) -> Any:
  """Places a pytree on every device (the train state's layout)."""
  return jax.device_put(tree, replicated(mesh))


def to_host(x: jax.Array) -> np.ndarray:
  """The whole of a (possibly sharded across processes) array as numpy, on every process."""
  if jax.process_count() > 1:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)
