r"""CLI of MUSE pretraining: parses flags and calls `muse_jax.pretrain.train.run`.

  python -m muse_jax.main --config configs/pretrain.py:tiny --workdir runs/tiny [--config.batch_size=16]

Multi-host (TPU pod slice, multi-node GPU): run the same command on every host and add `--multihost` (or set
`MUSE_MULTIHOST=1`); `jax.distributed.initialize()` then reads the cluster from the environment (TPU metadata,
SLURM, or `--coordinator_address`, `--num_processes`, `--process_id`).
"""
from __future__ import annotations

import json
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Pretraining config file, e.g. configs/pretrain.py:tiny.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory (local or gs://); resumes if it holds checkpoints.")
_MULTIHOST = flags.DEFINE_bool("multihost", os.environ.get("MUSE_MULTIHOST", "0") == "1",
                               "Call jax.distributed.initialize() (several processes/hosts).")
_COORD = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-host without auto-detect).")
_NPROC = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host without auto-detect).")
_PID = flags.DEFINE_integer("process_id", None, "This process's index (multi-host without auto-detect).")


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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  maybe_initialize_distributed(_MULTIHOST.value, _COORD.value, _NPROC.value, _PID.value)
  from muse_jax.pretrain import train  # pylint: disable=import-outside-toplevel
  out = train.run(_CONFIG.value, _WORKDIR.value)
  print(json.dumps({k: v for k, v in out.items() if k != "last_metrics"}), flush=True)


if __name__ == "__main__":
  sys.path.insert(0, os.getcwd())  # so config files can `from configs import ...` when run from the repo root
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
