"""Device mesh and shardings for pretraining.

The mesh has axes `('data', 'fsdp')`. The batch is split over both axes (every device gets a distinct slice of the
global batch); parameters, optimizer state (which holds the teacher) are replicated over `data` and, when
`fsdp > 1`, leaves with at least `fsdp_min_size` elements are split along their largest dimension divisible by the
`fsdp` size (other leaves are replicated).
"""
from __future__ import annotations

from typing import Any, Sequence

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")


def make_mesh(mesh_cfg: ml_collections.ConfigDict, devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds the `('data', 'fsdp')` mesh.

  Args:
    mesh_cfg: fields `data` (int, -1 = all remaining devices) and `fsdp` (int >= 1).
    devices: devices to use (default: `jax.devices()`).

  Raises:
    ValueError: when the sizes do not multiply to the device count.
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  fsdp = int(mesh_cfg.get("fsdp", 1))
  data = int(mesh_cfg.get("data", -1))
  if fsdp < 1 or n % fsdp:
    raise ValueError(f"config.mesh.fsdp={fsdp} must be >= 1 and divide the device count {n}")
  if data == -1:
    data = n // fsdp
  if data * fsdp != n:
    raise ValueError(f"config.mesh: data={data} x fsdp={fsdp} = {data * fsdp} devices, but {n} devices are present "
                     "(use data=-1 to take all remaining devices)")
  arr = np.array(devices, dtype=object).reshape(data, fsdp)
  return Mesh(arr, AXES, axis_types=(jax.sharding.AxisType.Auto,) * 2)


def check_batch(global_batch: int, mesh: Mesh, process_count: int | None = None) -> None:
  """Raises a clear ValueError when the global batch does not split evenly over devices and processes."""
  n = mesh.devices.size
  pc = jax.process_count() if process_count is None else process_count
  if global_batch <= 0 or global_batch % n:
    raise ValueError(f"config.batch_size={global_batch} must be a positive multiple of the number of devices in the "
                     f"mesh ({n} = data {mesh.shape['data']} x fsdp {mesh.shape['fsdp']}); e.g. use "
                     f"{max(n, (global_batch // n) * n) if global_batch > 0 else n}")
  if global_batch % pc:
    raise ValueError(f"config.batch_size={global_batch} must be divisible by the process count {pc}")


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension split over all devices."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def leaf_spec(shape: Sequence[int], fsdp: int, min_size: int) -> P:
  """FSDP spec for one leaf: split its largest dim divisible by `fsdp` when it has >= `min_size` elements."""
  if fsdp <= 1 or int(np.prod(shape, dtype=np.int64)) < min_size:
    return P()
  order = sorted(range(len(shape)), key=lambda d: -shape[d])
  for d in order:
    if shape[d] % fsdp == 0:
      spec = [None] * len(shape)
      spec[d] = "fsdp"
      return P(*spec)
  return P()


def state_shardings(abstract_state: Any, mesh: Mesh, min_size: int = 2**14) -> Any:
  """NamedShardings for a (abstract) train-state pytree: FSDP rule for array leaves, scalars replicated."""
  fsdp = mesh.shape["fsdp"]

  def f(x):
    shape = getattr(x, "shape", ())
    return NamedSharding(mesh, leaf_spec(tuple(shape), fsdp, min_size))
  return jax.tree.map(f, abstract_state)
