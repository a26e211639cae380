"""Orbax checkpointing of the train state together with the data-iterator state.

Layout: `workdir/checkpoints/<step>/{state, data_iter}`; Orbax writes every checkpoint into a temporary directory
and renames it when complete (atomic), keeps the newest `keep` and restores the latest automatically. The data
iterator is saved through grain's checkpoint handler (one JSON file per process), which accepts both grain iterators
and `pretrain.synthetic.SyntheticIterator`.
"""
from __future__ import annotations

import os
import signal
import threading
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from etils import epath


def _abs(path: str | os.PathLike) -> epath.Path:
  p = epath.Path(path)
  return p if (str(p).startswith("gs://") or p.is_absolute()) else epath.Path(os.path.abspath(os.fspath(p)))


class Checkpointer:
  """Thin wrapper of `ocp.CheckpointManager` with items `state` and `data_iter`.

  Args:
    directory: checkpoint root (local path or `gs://...`).
    keep: number of checkpoints kept.
    async_save: write in a background thread (the next steps run meanwhile).
  """

  def __init__(self, directory: str | os.PathLike, keep: int = 3, async_save: bool = True):
    self.directory = _abs(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state: Any, data_iter: Any | None = None, force: bool = True) -> bool:
    """Saves `state` (and the iterator) as checkpoint `step`."""
    items = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
      items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
    return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(self, abstract_state: Any, data_iter: Any | None = None, step: int | None = None) -> tuple[Any, int]:
    """Restores `(state, step)` into the shapes/shardings of `abstract_state`; `data_iter` is restored in place."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    if data_iter is not None:
      items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
    out = self.manager.restore(step, args=ocp.args.Composite(**items))
    return out["state"], step

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_like(state: Any, shardings: Any) -> Any:
  """`jax.ShapeDtypeStruct` tree with shardings, the restore target for `Checkpointer.restore`."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


class PreemptionFlag:
  """Sets a flag on SIGTERM (and SIGINT if asked) so the training loop saves and exits cleanly.

  Use as a context manager; the previous handlers are restored on exit. Only installs handlers in the main thread.
  """

  def __init__(self, sigint: bool = False):
    self.requested = False
    self.signum: int | None = None
    self._signals = [signal.SIGTERM] + ([signal.SIGINT] if sigint else [])
    self._old = {}

  def _handler(self, signum, frame):
    del frame
    self.requested = True
    self.signum = signum

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for s in self._signals:
        self._old[s] = signal.signal(s, self._handler)
    return self

  def __exit__(self, *exc):
    for s, h in self._old.items():
      signal.signal(s, h)
    return False
