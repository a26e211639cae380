"""A checkpointable synthetic pretraining batch source (tests, benchmarks; no files needed).

Batches follow the data contract of `muse_jax.data.pipeline.make_pretrain_dataset`: `{'global': {...}, 'local': {...}}`
with `images` uint8 [B, V, S, S, 3], `coords` float32 [B, V, M, 2] (x, y) in view pixels, `ids` int32 [B, V, M]
(-1 = pad), `mask` bool [B, V, M], `mpp` float32 [B, V]; with `crop_buffers` the 'device' augmentation layout
(`crops`, `box`, `geom` instead of `images`; `muse_jax.data.pipeline.batch_layout`). Each sample is a "region" with `n_region` nuclei; every view
holds a random subset of them, so views share some ids. Batch `k` of process `p` depends only on (seed, k, p), and
the iterator state is the batch counter, so it resumes exactly.
"""
from __future__ import annotations

import json
from typing import Any

import numpy as np


def _views(rng: np.random.Generator, b: int, v: int, size: int, m: int, n_region: int,
           crop_buffer: int | None = None) -> dict[str, np.ndarray]:
  if crop_buffer is None:
    images = rng.integers(0, 256, size=(b, v, size, size, 3), dtype=np.uint8)
  else:  # 'device' augmentation layout: unresized windows, the field of view inside, geometric flags
    crops = rng.integers(0, 256, size=(b, v, crop_buffer, crop_buffer, 3), dtype=np.uint8)
    fov = rng.uniform(0.5, 1.0, size=(b, v)) * (crop_buffer - 5)
    box = np.stack([rng.uniform(2.0, 3.0, size=(b, v)), rng.uniform(2.0, 3.0, size=(b, v)), fov], -1)
    geom = np.stack([rng.integers(0, 2, size=(b, v)), rng.integers(0, 2, size=(b, v)),
                     rng.integers(0, 4, size=(b, v))], -1).astype(np.int32)
  ids = np.full((b, v, m), -1, np.int32)
  mask = np.zeros((b, v, m), bool)
  coords = np.zeros((b, v, m, 2), np.float32)
  for bi in range(b):
    for vi in range(v):
      n = int(rng.integers(1, m + 1))
      chosen = rng.choice(n_region, size=min(n, n_region), replace=False)
      ids[bi, vi, :len(chosen)] = chosen
      mask[bi, vi, :len(chosen)] = True
      coords[bi, vi, :len(chosen)] = rng.uniform(0, size, size=(len(chosen), 2))
  mpp = rng.uniform(0.25, 0.5, size=(b, v)).astype(np.float32)
  out = {"coords": coords, "ids": ids, "mask": mask, "mpp": mpp}
  if crop_buffer is None:
    out["images"] = images
  else:
    out.update(crops=crops, box=box.astype(np.float32), geom=geom)
  return out


class SyntheticIterator:
  """Iterator of host-local synthetic batches with grain-compatible `get_state`/`set_state` (bytes)."""

  def __init__(self, *, batch_size: int, n_global: int, n_local: int, global_size: int, local_size: int,
               max_nuclei_global: int, max_nuclei_local: int, n_region: int = 32, seed: int = 0, process_index: int = 0, process_count: int = 1,
               crop_buffers: tuple[int, int] | None = None):
    if batch_size % process_count:
      raise ValueError(f"batch_size={batch_size} is not divisible by process_count={process_count}")
    self.local_batch = batch_size // process_count
    self.cfg = dict(n_global=n_global, n_local=n_local, global_size=global_size, local_size=local_size,
                    max_nuclei_global=max_nuclei_global, max_nuclei_local=max_nuclei_local, n_region=n_region)
    self.crop_buffers = crop_buffers or (None, None)  # (global, local) crop sides: the 'device' layout
    self.seed = seed
    self.process_index = process_index
    self.process_count = process_count
    self.batch_size = batch_size
    self.step = 0

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, Any]:
    c = self.cfg
    # The global batch is generated identically on every process; each process keeps its slice, so a run with P
    # processes sees exactly the same global batch as a run with one process.
    rng = np.random.default_rng([self.seed, self.step])
    out = {"global": _views(rng, self.batch_size, c["n_global"], c["global_size"], c["max_nuclei_global"], c["n_region"],
                            self.crop_buffers[0])}
    if c["n_local"] > 0:
      out["local"] = _views(rng, self.batch_size, c["n_local"], c["local_size"], c["max_nuclei_local"], c["n_region"],
                            self.crop_buffers[1])
    lo = self.process_index * self.local_batch
    out = {g: {k: v[lo:lo + self.local_batch] for k, v in d.items()} for g, d in out.items()}
    self.step += 1
    return out

  def get_state(self) -> bytes:
    return json.dumps({"step": self.step, "seed": self.seed}).encode()

  def set_state(self, state: bytes) -> None:
    d = json.loads(state.decode() if isinstance(state, (bytes, bytearray)) else state)
    self.step = int(d["step"])
    self.seed = int(d["seed"])

  def start_prefetch(self) -> None:
    """No-op (grain's checkpoint handler calls it after restoring)."""
