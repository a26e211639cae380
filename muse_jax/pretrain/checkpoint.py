"""Orbax checkpointing of the train state together with the data-iterator state.

Layout: `workdir/checkpoints/<step>/{state, data_iter}`; Orbax writes every checkpoint into a temporary directory
and renames it when complete (atomic), keeps the newest `keep` and restores the latest automatically. The data
iterator is saved through grain's checkpoint handler (one JSON file per process), which accepts both grain iterators
and `pretrain.synthetic.SyntheticIterator`.
"""
from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging as absl_logging
from etils import epath

from muse_jax import cli


def _abs(path: str | os.PathLike) -> epath.Path:
  p = epath.Path(path)
  return p if (str(p).startswith("gs://") or p.is_absolute()) else epath.Path(os.path.abspath(os.fspath(p)))


class CheckpointSaveError(cli.UserError):
  """A checkpoint could not be written (disk full, no permission, ...). Training stops at once; the checkpoints
  written before stay intact (Orbax renames a checkpoint into place only when it is complete)."""

  def __init__(self, directory, step: int, cause: BaseException, last_good: int | None):
    self.step, self.cause, self.last_good = step, cause, last_good
    cause_s = " ".join(f"{type(cause).__name__}: {cause}".split())
    keep = "none" if last_good is None else f"step {last_good}"
    super().__init__(f"saving the checkpoint of step {step} failed", str(directory),
                     f"{cause_s}; training stopped; last good checkpoint: {keep} (fix the cause, then rerun the same "
                     "command to resume from it)")


class _OrbaxErrorFilter(logging.Filter):
  """Drops Orbax's own ERROR records (with tracebacks) while a `Checkpointer` is open: a failed save is reported
  once, as a `CheckpointSaveError`. `MUSE_DEBUG=1` (or a CLI's `--debug`) keeps them."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno >= logging.ERROR and f"{os.sep}orbax{os.sep}" in (record.pathname or ""):
      return os.environ.get("MUSE_DEBUG", "") not in ("", "0")
    return True


_FILTER = _OrbaxErrorFilter()


class Checkpointer:
  """Thin wrapper of `ocp.CheckpointManager` with items `state` and `data_iter`.

  A failed save raises `CheckpointSaveError` (from `save`, `check` or `close`), naming the directory, the step and
  the cause; with `async_save`, `check()` (called once per training step) surfaces a background failure as soon
  as the save has ended, so training stops before the next save.

  Args:
    directory: checkpoint root (local path or `gs://...`).
    keep: number of checkpoints kept.
    async_save: write in a background thread (the next steps run meanwhile).
  """

  def __init__(self, directory: str | os.PathLike, keep: int = 3, async_save: bool = True):
    self.directory = _abs(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
    self.manager = ocp.CheckpointManager(self.directory, options=options)
    self.last_good: int | None = self.manager.latest_step()
    self._in_flight: int | None = None
    absl_logging.get_absl_logger().addFilter(_FILTER)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def _failed(self, step: int, e: BaseException) -> CheckpointSaveError:
    self._in_flight = None
    return CheckpointSaveError(self.directory, step, e, self.last_good)

  def _settle(self) -> None:
    """Waits for the save in flight; its failure raises `CheckpointSaveError`."""
    if self._in_flight is None:
      return
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-exception-caught
      raise self._failed(self._in_flight, e) from e
    self.last_good, self._in_flight = self._in_flight, None

  def save(self, step: int, state: Any, data_iter: Any | None = None, force: bool = True) -> bool:
    """Saves `state` (and the iterator) as checkpoint `step`; raises `CheckpointSaveError` when this save (or the
    previous one, still in flight) fails."""
    self._settle()
    items = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
      items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
    try:
      saved = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
    except Exception as e:  # pylint: disable=broad-exception-caught
      raise self._failed(step, e) from e
    if saved:
      self._in_flight = step
      if not self.manager.is_saving_in_progress():  # synchronous save: done
        self._settle()
    return saved

  def check(self) -> None:
    """Non-blocking: raises `CheckpointSaveError` if the save in flight has ended with an error."""
    if self._in_flight is not None and not self.manager.is_saving_in_progress():
      self._settle()

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
    self._settle()

  def close(self, raise_errors: bool = True) -> None:
    """Waits for the save in flight and closes; `raise_errors=False` (while another error propagates) only
    closes."""
    try:
      self._settle()
    except CheckpointSaveError:
      self._close_quietly()
      if raise_errors:
        raise
      return
    if not raise_errors:
      self._close_quietly()
      return
    try:
      self.manager.close()
    finally:
      absl_logging.get_absl_logger().removeFilter(_FILTER)

  def _close_quietly(self) -> None:
    try:
      self.manager.close()
    except Exception:  # pylint: disable=broad-exception-caught
      pass  # a failure is being reported already
    finally:
      absl_logging.get_absl_logger().removeFilter(_FILTER)


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
