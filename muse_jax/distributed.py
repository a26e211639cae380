"""Multi-process start-up shared by the training CLIs (`muse_jax.main`, `muse_jax.finetune`).

Multi-host (TPU pod slice, multi-node GPU): run the same command on every host with `--multihost` (or
`MUSE_MULTIHOST=1`); `jax.distributed.initialize()` then reads the cluster from the environment (TPU metadata,
SLURM, ...) unless `--coordinator_address`, `--num_processes` and `--process_id` are given.
"""
from __future__ import annotations

import logging
import os

from absl import flags


def define_flags() -> dict[str, flags.FlagHolder]:
  """Defines `--multihost`, `--coordinator_address`, `--num_processes`, `--process_id` (call once per CLI)."""
  return {
      "multihost": flags.DEFINE_bool("multihost", os.environ.get("MUSE_MULTIHOST", "0") == "1",
                                     "Call jax.distributed.initialize() (several processes/hosts)."),
      "coordinator_address": flags.DEFINE_string("coordinator_address", None,
                                                 "host:port of process 0 (multi-host without auto-detect)."),
      "num_processes": flags.DEFINE_integer("num_processes", None,
                                            "Number of processes (multi-host without auto-detect)."),
      "process_id": flags.DEFINE_integer("process_id", None, "This process's index (multi-host without auto-detect)."),
  }


def maybe_initialize_distributed(multihost: bool, coordinator_address: str | None = None,
                                 num_processes: int | None = None, process_id: int | None = None) -> None:
  """`jax.distributed.initialize` when asked; arguments left None are auto-detected by JAX."""
  if not multihost:
    return
  import jax  # pylint: disable=import-outside-toplevel
  kwargs = {k: v for k, v in dict(coordinator_address=coordinator_address, num_processes=num_processes,
                                  process_id=process_id).items() if v is not None}
  jax.distributed.initialize(**kwargs)
  logging.info("process %d of %d; %d local / %d global devices", jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())


def initialize_from_flags(holders: dict[str, flags.FlagHolder]) -> None:
  """`maybe_initialize_distributed` with the values of `define_flags()`'s flags."""
  maybe_initialize_distributed(*(holders[k].value for k in ("multihost", "coordinator_address", "num_processes",
                                                              "process_id")))
