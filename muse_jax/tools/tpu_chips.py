"""Per-chip specifications of Cloud TPU generations, for memory checks and roofline estimates.

Every number is the per-chip value as published by Google Cloud TPU documentation (the page is in `source`); units
are kept as published (the v4 page says GiB, the v5e/v5p/v6e pages say GB) and converted to bytes/FLOP/s here.
Nothing in this module imports libtpu or touches a device: it is a plain table.

Two caveats the numbers do not capture:
  * The HBM a program may use differs from the published capacity: the memories are binary-sized and libtpu keeps
    a reserve. libtpu 0.0.42.1 lets a program use 30.75 GiB (v4), 15.75 GiB (v5e), 95.74 GiB (v5p) and 31.25 GiB
    (v6e) per chip (read from its RESOURCE_EXHAUSTED messages when compiling for those topologies on a CPU host);
    so "16 GB" on the v5e page means 16 GiB. `compiler_hbm_bytes` holds these measured limits and is what fit checks
    use; `hbm_bytes` is the published figure in the published unit.
  * Peak FLOP/s is the dense bf16 matrix-unit peak. float32 matmuls run as several bf16 passes on the MXU, so a
    float32 model reaches only a fraction of it; roofline estimates built on these numbers are optimistic bounds.
"""
from __future__ import annotations

import dataclasses

GB = 10**9
GIB = 2**30


@dataclasses.dataclass(frozen=True)
class TpuChip:
  """One TPU chip generation.

  Attributes:
    name: short name used in topology strings (`v5p`, `v5e`, ...).
    device_kinds: `jax.Device.device_kind` strings of this chip as libtpu reports them.
    hbm_bytes: published HBM capacity per chip, bytes.
    peak_bf16_flops: published peak dense bf16 compute per chip, FLOP/s.
    hbm_bandwidth: published HBM bandwidth per chip, bytes/s.
    cores_per_chip: TensorCores per chip (v4 and v5p: 2, fused into one JAX device in megacore mode).
    compiler_hbm_bytes: HBM the TPU compiler lets one program use, per chip, as libtpu 0.0.42.1 reports it in its
      RESOURCE_EXHAUSTED message ("exceeds available HBM (15.75G)" on v5e; G = GiB); measured, not published.
    source: where the published numbers come from.
    note: the published wording of the values.
  """
  name: str
  device_kinds: tuple[str, ...]
  hbm_bytes: int
  peak_bf16_flops: float
  hbm_bandwidth: float
  cores_per_chip: int
  compiler_hbm_bytes: int
  source: str
  note: str


CHIPS: dict[str, TpuChip] = {
    "v4": TpuChip(
        name="v4", device_kinds=("TPU v4",), hbm_bytes=32 * GIB, peak_bf16_flops=275e12, hbm_bandwidth=1200 * GB,
        cores_per_chip=2, compiler_hbm_bytes=int(30.75 * GIB), source="https://cloud.google.com/tpu/docs/v4",
        note="as published by Google Cloud TPU documentation: peak compute per chip 275 teraflops (bf16 or int8); "
             "HBM2 capacity and bandwidth 32 GiB, 1200 GBps"),
    "v5e": TpuChip(
        name="v5e", device_kinds=("TPU v5 lite", "TPU v5e"), hbm_bytes=16 * GB, peak_bf16_flops=197e12,
        hbm_bandwidth=819 * GB, cores_per_chip=1,
        compiler_hbm_bytes=int(15.75 * GIB), source="https://cloud.google.com/tpu/docs/v5e",
        note="as published by Google Cloud TPU documentation: peak compute per chip (bf16) 197 TFLOPs; "
             "HBM2 capacity and bandwidth 16 GB, 819 GBps (a later revision of the page lists 800 GiBps)"),
    "v5p": TpuChip(
        name="v5p", device_kinds=("TPU v5", "TPU v5p"), hbm_bytes=95 * GB, peak_bf16_flops=459e12,
        hbm_bandwidth=2765 * GB, cores_per_chip=2,
        compiler_hbm_bytes=int(95.74 * GIB), source="https://cloud.google.com/tpu/docs/v5p",
        note="as published by Google Cloud TPU documentation: peak compute per chip (bf16) 459 TFLOPs; "
             "HBM2e capacity and bandwidth 95 GB, 2765 GBps"),
    "v6e": TpuChip(
        name="v6e", device_kinds=("TPU v6 lite", "TPU v6e"), hbm_bytes=32 * GB, peak_bf16_flops=918e12,
        hbm_bandwidth=1640 * GB, cores_per_chip=1,
        compiler_hbm_bytes=int(31.25 * GIB), source="https://cloud.google.com/tpu/docs/v6e",
        note="as published by Google Cloud TPU documentation: peak compute per chip (bf16) 918 TFLOPs; "
             "HBM capacity per chip 32 GB; HBM bandwidth per chip 1640 GBps (a later revision lists 1638 GBps)"),
}

# Accelerator-type prefixes accepted in topology strings, mapped to the chip table (e.g. `v5litepod-8` is a v5e).
_ALIASES = {"v5litepod": "v5e", "v5lite": "v5e", "v6litepod": "v6e", "trillium": "v6e"}


def chip_by_name(name: str) -> TpuChip:
  """Returns the chip for a generation name (`v4`, `v5e`, `v5p`, `v6e`, or an alias such as `v5litepod`).

  Raises:
    ValueError: for an unknown name.
  """
  key = _ALIASES.get(name.lower(), name.lower())
  if key not in CHIPS:
    raise ValueError(f"unknown TPU generation {name!r}; expected one of {sorted(CHIPS)} (or {sorted(_ALIASES)})")
  return CHIPS[key]


def chip_for_topology(topology: str) -> TpuChip:
  """Returns the chip of a topology string such as `v5p:2x2x4` or `v5e:2x4`.

  Raises:
    ValueError: when the string has no `generation:shape` form or the generation is unknown.
  """
  gen, sep, shape = topology.partition(":")
  if not sep or not shape:
    raise ValueError(f"topology {topology!r} must look like 'v5p:2x2x4' (generation:chip grid)")
  return chip_by_name(gen)


def chip_for_device_kind(device_kind: str) -> TpuChip:
  """Returns the chip whose libtpu `device_kind` (e.g. 'TPU v5 lite') matches.

  Raises:
    ValueError: for a device kind not in the table.
  """
  for chip in CHIPS.values():
    if device_kind in chip.device_kinds:
      return chip
  raise ValueError(f"unknown TPU device kind {device_kind!r}; known: "
                   f"{[k for c in CHIPS.values() for k in c.device_kinds]}")


def topology_chip_count(topology: str) -> int:
  """Number of chips in a topology string (`v5p:2x2x4` -> 16)."""
  _, _, shape = topology.partition(":")
  try:
    dims = [int(d) for d in shape.lower().split("x")]
  except ValueError as e:
    raise ValueError(f"topology {topology!r}: chip grid {shape!r} must be integers joined by 'x'") from e
  n = 1
  for d in dims:
    n *= d
  return n
